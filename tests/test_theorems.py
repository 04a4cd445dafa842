"""SGD bounds in expectation: Thm 1 (Alg 1) and Lemma 21 (Alg 2), averaged over seeds.

Statistical, so σ > 0 and several seeds; the fast variants use few seeds where the measured
value sits far below the bound, the `slow` variants use many more seeds.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from peerlearn.algorithms import InverseTime
from peerlearn.problems import NoisyQuadratic
from peerlearn.reproduce.attiya_schiller import (
    ALG2_ETA,
    BETA,
    GAMMA,
    QUAD,
    TIGHT,
    TIGHT_BETA,
    TIGHT_GAMMA,
    WIDE,
    alg2_disagreements,
    exact_sequential_error,
    thm1_bounds,
)
from peerlearn.reproduce.attiya_schiller import alg1_errors as seeded_alg1_errors
from peerlearn.sim import run_simulation

from .helpers import cfg

# Thm 1, docs/papers.md: μ = L = 1, β = 2, γ = 3, σ² = 1, ‖x_1 − x*‖² = 10, T = 1000, N = 4
# (QUAD); the near-tight instance x_1 = x*, β = 10, γ = 9 (TIGHT): Alg 1 measures ~0.4 of the
# bound there, and with its averaging switched off each process is plain SGD (N = 1 in effect)
# and measures ~2 times the bound. The functions are the reproduction report's
# (peerlearn/reproduce/attiya_schiller.py), so the report and these tests measure alike.
T = 1000


def alg1_errors(
    n_quorum: int,
    seeds: int,
    steps: int = T,
    problem: dict[str, Any] = QUAD,
    beta: float = BETA,
    gamma: float = GAMMA,
) -> tuple[float, float]:
    """(max_i E‖x_i − x*‖², E max_{i,j} ‖x_i − x_j‖²) over seeds, n = 8 processes in 4 clusters."""
    ext, internal = seeded_alg1_errors(n_quorum, seeds, steps, problem, beta, gamma)
    return float(ext.mean(axis=0).max()), float(internal.mean())


def sequential_minibatch_error(batch: int, seeds: int, steps: int = T) -> float:
    """E‖x_{T+1} − x*‖² of sequential SGD with mini-batch ``batch`` on the same schedule."""
    prob = NoisyQuadratic(**{k: v for k, v in QUAD.items() if k != "name"})  # type: ignore[arg-type]
    eta = InverseTime(BETA, GAMMA)
    assert prob.constants.x_star is not None
    errs = []
    for seed in range(seeds):
        rng = np.random.default_rng(10_000 + seed)
        x = prob.x0()
        for t in range(1, steps + 1):
            x = x - eta(t) * np.mean([prob.grad(x, rng) for _ in range(batch)], axis=0)
        errs.append(float(((x - prob.constants.x_star) ** 2).sum()))
    return float(np.mean(errs))


# WIDE: QUAD's constants in 64 coordinates. The error is the same in expectation (σ² is the total
# noise variance), but a sum of 64 squares fluctuates sqrt(16)× less than one of 4, so 40 seeds
# resolve the 1/N noise term well enough to tell mini-batch 4 from mini-batch 3.


def test_alg1_with_full_quorum_matches_exact_moment_propagation() -> None:
    """With N = n every process averages the same n parameters, so Alg 1 *is* sequential
    mini-batch-n SGD: its mean squared error must match the exact second-moment recursion
    within the Monte-Carlo standard error."""
    errs = []
    for seed in range(40):
        res = run_simulation(
            cfg(
                algorithm="alg1",
                problem=WIDE,
                processes=4,
                clusters=2,
                steps=300,
                seed=seed,
                lr={"schedule": "inverse_time", "beta": BETA, "gamma": GAMMA},
                sim={"sample_every": 1e9},
            )
        )
        assert res.problem is not None and res.problem.constants.x_star is not None
        x = res.processes[0].x
        assert x is not None
        errs.append(float(((x - res.problem.constants.x_star) ** 2).sum()))
    exact = exact_sequential_error(4, 300, problem=WIDE)
    stderr = float(np.std(errs, ddof=1) / np.sqrt(len(errs)))
    assert abs(float(np.mean(errs)) - exact) < 3.5 * stderr, (np.mean(errs), exact, stderr)
    # The test's power: mini-batch 3 (one model left out of the mean) lies far outside the band.
    assert abs(exact_sequential_error(3, 300, problem=WIDE) - exact) > 7 * stderr


def test_thm1_bound_formula_on_the_spec_instance() -> None:
    ext_bound, int_bound = thm1_bounds(4, T)
    assert ext_bound == pytest.approx(0.0408, abs=1e-4)  # docs/papers.md, Thm 1's instance
    assert int_bound == pytest.approx(0.0438, abs=1e-4)


def _tight_thm1(seeds: int, steps: int) -> tuple[float, float, float, float]:
    """(external, internal, external bound, internal bound) on the near-tight instance, N = 4."""
    external, internal = alg1_errors(
        4, seeds=seeds, steps=steps, problem=TIGHT, beta=TIGHT_BETA, gamma=TIGHT_GAMMA
    )
    ext_bound, int_bound = thm1_bounds(
        4, steps=steps, beta=TIGHT_BETA, gamma=TIGHT_GAMMA, start2=0.0
    )
    # The instance has the power to catch missing averaging: plain SGD (N = 1) exceeds the
    # N = 4 bound in expectation, exactly computed.
    plain = exact_sequential_error(
        1, steps=steps, problem=TIGHT, beta=TIGHT_BETA, gamma=TIGHT_GAMMA
    )
    assert plain > 1.5 * ext_bound
    return external, internal, ext_bound, int_bound


def test_thm1_external_and_internal_bounds() -> None:
    external, internal, ext_bound, int_bound = _tight_thm1(seeds=16, steps=300)
    assert external < ext_bound, (external, ext_bound)
    assert internal < int_bound, (internal, int_bound)
    assert internal > 0  # receive sets differed: the processes did not move in lockstep


@pytest.mark.slow
def test_thm1_bounds_over_100_seeds() -> None:
    external, internal, ext_bound, int_bound = _tight_thm1(seeds=100, steps=T)
    assert external < ext_bound and internal < int_bound


def _n_speedup(seeds: int, quorums: tuple[int, ...]) -> dict[int, float]:
    return {n: alg1_errors(n, seeds=seeds, steps=400)[0] for n in quorums}


def test_thm1_error_falls_with_n() -> None:
    err = _n_speedup(10, (1, 8))
    assert err[1] / err[8] > 3.0  # ~8 in expectation


@pytest.mark.slow
def test_thm1_error_scales_as_one_over_n_and_matches_sequential_minibatch() -> None:
    quorums = (1, 2, 4, 8)
    err = _n_speedup(60, quorums)
    for a, b in itertools.pairwise(quorums):
        assert err[a] > err[b]
        assert 1.3 < err[a] / err[b] < 3.0  # ≈ 2 per doubling of N
    for n in (1, 4):
        seq = sequential_minibatch_error(n, seeds=60, steps=400)
        exact = exact_sequential_error(n, 400)
        assert 0.8 < seq / exact < 1.25  # the Monte-Carlo reference agrees with the recursion
        assert 0.6 < err[n] / exact < 1.7, (n, err[n], exact)


# --- Lemma 21: disagreement of Alg 2 ----------------------------------------------------------

ETA = ALG2_ETA  # 0.25 ≤ min{1/2, 1/L} with L = 2 for the non-convex problem


def alg2_disagreement(seeds: int, rounds: int | None, steps: int = 16) -> float:
    """max over t of (mean over seeds of max_{i,j} ‖x_{t+1}^i − x_{t+1}^j‖²) — the report's runs
    (``alg2_disagreements``: n = 8 in 4 clusters, N = 4, η = 0.25, d = 5, σ = 1)."""
    return float(alg2_disagreements(seeds, rounds, steps).mean(axis=0).max())


def test_lemma21_disagreement_bound_and_maa_ablation() -> None:
    bound = 2 * 1.0 * ETA**3 / 4  # 2σ²η³/N
    with_maa = alg2_disagreement(seeds=3, rounds=None)
    without = alg2_disagreement(seeds=3, rounds=0)
    assert with_maa <= bound
    assert without > bound  # visibly larger with agreement switched off
    assert without > 10 * with_maa


@pytest.mark.slow
def test_lemma21_over_many_seeds() -> None:
    bound = 2 * ETA**3 / 4
    assert alg2_disagreement(seeds=20, rounds=None, steps=32) <= bound
