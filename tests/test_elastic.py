"""The EASGD family's real programs in the simulator against the closed forms (labels
A.1a–A.1e and the reference table: docs/papers.md).

Time indexing (checked by ``test_sync_programs_follow_a1a_time_indexing``): the center's k-th
"model" report holds x̃_{k−1} and a worker's t-th report holds x^i_{t−1}, in the paper's and
:mod:`peerlearn.analysis.easgd_theory`'s time t (x̃_0 initial, step t → t+1 reads time-t values
only). So ``report.step − 1`` is the theory's t, and the final report (step T + 1) is x̃_T.

Two ways of drawing Monte-Carlo samples of the 1-D recursion, both running the unmodified
programs:

* **independent seeds** (the plain recipe): R runs of a 1-D ``NoisyQuadratic`` through
  :func:`run_simulation`, one per run seed;
* **replicas**: one run of a ``NoisyQuadratic`` of dimension R with μ = L = h. Every coordinate is
  then an independent copy of the 1-D system: the Hessian is h·I, the noise is N(0, σ_tot²/R) per
  coordinate, i.i.d. (so σ_tot = σ√R gives per-coordinate σ), and every program is
  coordinate-wise linear. The initial offsets x₀ − x* = √d2 · u (u a random unit vector) differ
  per coordinate; the mean is linear in them, E[x̃_t − x*]_j = m_t·d_j with m_t the closed-form
  mean for x₀ = 1, so with d2 = R the least-squares estimate Σ_j e_j d_j / Σ_j d_j² of m_t has
  standard error √(V_t/R), exactly as R runs started at x₀ = 1. One replica run costs about as
  much as one scalar run, so R = 10⁴…10⁵ fits in seconds.

Pass criterion (docs/papers.md): |emp − V| < 4·V·√(2/R) for variances, 4 standard errors for means.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np
import pytest

from peerlearn.analysis.easgd_theory import (
    asymptotic_variance,
    beta_max,
    center_mean,
    center_variance,
    double_average_variance,
    propagate_moments,
    roots,
)
from peerlearn.config import RunConfig, load_config
from peerlearn.effects import Report, Vector
from peerlearn.errors import ConfigError
from peerlearn.problems.quadratic import NoisyQuadratic
from peerlearn.reproduce.easgd import quad_cfg, trajectories
from peerlearn.runs import Purpose, build_problem, grad_stream, make_programs, stream
from peerlearn.runtime.local import ThreadRun
from peerlearn.runtime.worker import WorkerState
from peerlearn.sim.core import Proc, Simulator, Status
from peerlearn.sim.runner import run_simulation

# Reference-table rows 1 and 2 (docs/papers.md): (p, η, α), h = 1, σ = 1, x₀ = x̃₀ = 1 (centered).
ROW1 = (4, 0.1, 0.05)
ROW2 = (10, 0.5, 0.09)
SIGMA = 1.0


# --- helpers ----------------------------------------------------------------------------------


def scalar_center_path(cfg: RunConfig) -> tuple[Vector, float]:
    """x̃_t − x* for t = 0..T of a 1-D run, and the sign of x₀ − x* (multiply by it to center
    the run on x₀ − x* = +√start_distance2)."""
    result = run_simulation(cfg, record_reports=("model",))
    assert result.status == Status.FINISHED, result.outcome
    path = np.array([float(v[0]) for v in trajectories(result)[cfg.center]])
    assert result.problem is not None and result.problem.constants.x_star is not None
    sign = float(np.sign(result.problem.x0()[0] - result.problem.constants.x_star[0]))
    return path, sign


class CenterSamples:
    """What one replica run keeps of the center: x̃_t − x* at the requested t and, if asked, the
    running sums S_t = Σ_{k<t} (x̃_k − x*) at the requested t (Lemma 7.2's t·z_t)."""

    def __init__(self, at: Collection[int], sums_at: Collection[int] = ()) -> None:
        self.at, self.sums_at = frozenset(at), frozenset(sums_at)
        self.values: dict[int, Vector] = {}
        self.sums: dict[int, Vector] = {}
        self.offsets: Vector | None = None  # x₀ − x* per coordinate
        self._sum: Vector | None = None


def run_replicas(cfg: RunConfig, keep: CenterSamples) -> CenterSamples:
    """Run ``cfg`` in the simulator, keeping only what ``keep`` asks for of the center's reports
    (run_simulation's record_reports would hold every report of every process: T·n·R floats).

    Built like :func:`run_simulation` (same programs, same per-process gradient streams); the
    delay distributions are constants, which a synchronous run cannot observe anyway."""
    problem = build_problem(cfg)
    assert problem is not None
    x_star = problem.constants.x_star
    assert x_star is not None
    keep.offsets = problem.x0() - x_star
    n, center = cfg.processes, cfg.center
    rngs = [grad_stream(cfg, pid) for pid in range(n)]

    def grad(pid: int, x: Vector) -> Vector:
        return problem.grad(x, rngs[pid])

    def on_report(proc: Proc, rep: Report) -> None:
        if rep.name != "model" or proc.pid != center:
            return
        t = rep.step - 1  # with τ = 1 the center's report at iteration k holds x̃_{k−1}
        e = rep.value - x_star
        if t in keep.sums_at:
            keep.sums[t] = np.zeros_like(e) if keep._sum is None else keep._sum.copy()
        if t in keep.at:
            keep.values[t] = e
        if keep.sums_at:
            keep._sum = e.copy() if keep._sum is None else keep._sum + e

    sim = Simulator(
        cfg.membership,
        make_programs(cfg, problem, range(n)),
        grad,
        stream(cfg.seed, Purpose.SCHEDULE),
        delay_remote=lambda k: np.full(k, 0.5),
        delay_local=lambda k: np.full(k, 0.05),
        compute=lambda: 1.0,
        read=lambda: 0.01,
        on_report=on_report,
    )
    outcome = sim.run()
    assert outcome.status == Status.FINISHED, outcome
    return keep


def assert_variance(emp: float, v: float, r: int, what: str) -> None:
    """The pass criterion |emp − V| < 4·V·√(2/R)."""
    tol = 4 * v * math.sqrt(2 / r)
    assert abs(emp - v) < tol, f"{what}: empirical {emp:.6g} vs {v:.6g} (tolerance {tol:.3g})"


def assert_mean(emp: float, m: float, v: float, r: int, what: str) -> None:
    """Within 4 standard errors √(V/R)."""
    tol = 4 * math.sqrt(v / r)
    assert abs(emp - m) < tol, f"{what}: empirical {emp:.6g} vs {m:.6g} (tolerance {tol:.3g})"


# --- A.1a: the synchronous programs' time indexing (deterministic) ----------------------------


def test_sync_programs_follow_a1a_time_indexing() -> None:
    """σ = 0: every report equals the recursion (40)/(41) written out by hand — the center's k-th
    report is x̃_{k−1}, a worker's t-th report is x^i_{t−1}, and both updates read time-t values."""
    p, eta, alpha = 3, 0.3, 0.2
    cfg = quad_cfg(p, eta, alpha, 0.0, 12, dim=2)
    result = run_simulation(cfg, record_reports=("model",))
    paths = trajectories(result)
    assert result.problem is not None and result.problem.constants.x_star is not None
    x = [result.problem.x0() - result.problem.constants.x_star] * p
    xc = x[0]
    workers = [pid for pid in range(cfg.processes) if pid != cfg.center]
    for t in range(13):
        assert np.allclose(paths[cfg.center][t], xc, rtol=0, atol=1e-14), t
        for i, pid in enumerate(workers):
            assert np.allclose(paths[pid][t], x[i], rtol=0, atol=1e-14), (t, pid)
        # (40) and (41)/(19), Jacobi: both right-hand sides use the time-t values (g = h·x, h = 1).
        x, xc = (
            [xi - eta * xi - alpha * (xi - xc) for xi in x],
            xc + alpha * sum(xi - xc for xi in x),
        )


@pytest.mark.parametrize("row", [ROW1, ROW2], ids=["row1", "row2"])
def test_sync_center_mean_is_the_mean_recursion_without_noise(
    row: tuple[int, float, float],
) -> None:
    """σ = 0: x̃_t equals eq. (15) and the propagated mean to 1e-12, for t = 0..100."""
    p, eta, alpha = row
    path, sign = scalar_center_path(quad_cfg(p, eta, alpha, 0.0, 100))
    means, _ = propagate_moments(100, p, eta, alpha, 0.0, 1.0, 1.0)
    formula = np.array([center_mean(t, p, eta, alpha, 1.0, 1.0) for t in range(101)])
    assert np.max(np.abs(sign * path - means)) < 1e-12
    assert np.max(np.abs(sign * path - formula)) < 1e-12
    assert sign * path[2] == pytest.approx(1 - p * alpha * eta, abs=1e-15)  # 0.98 / 0.55


# --- Lemma 7.1: Monte Carlo over independent seeds --------------------------------------------


def independent_seeds(p: int, eta: float, alpha: float, steps: int, r: int) -> Vector:
    """(R, T+1) array of x̃_t − x* (centered on x₀ = +1) from R runs with run seeds 0..R−1."""
    rows = []
    for seed in range(r):
        path, sign = scalar_center_path(quad_cfg(p, eta, alpha, SIGMA, steps, seed=seed))
        rows.append(sign * path)
    return np.array(rows)


def check_lemma_71(samples: Vector, p: int, eta: float, alpha: float, ts: tuple[int, ...]) -> None:
    r = samples.shape[0]
    means, variances = propagate_moments(max(ts), p, eta, alpha, SIGMA, 1.0, 1.0)
    for t in ts:
        m, v = center_mean(t, p, eta, alpha, 1.0, 1.0), center_variance(t, p, eta, alpha, SIGMA)
        assert means[t] == pytest.approx(m, abs=1e-12) and variances[t] == pytest.approx(v)
        col = samples[:, t]
        assert_mean(float(col.mean()), m, v, r, f"E x̃_{t}")
        assert_variance(float(col.var(ddof=1)), v, r, f"V x̃_{t}")
    assert np.all(samples[:, :2] == samples[0, 0])  # no noise reaches x̃_0, x̃_1


@pytest.mark.parametrize("row", [ROW1, ROW2], ids=["row1", "row2"])
def test_lemma_71_over_independent_seeds(row: tuple[int, float, float]) -> None:
    """Independent seeds: R = 600 runs; t = 2 (V = pα²η²σ²) and t = 10."""
    p, eta, alpha = row
    check_lemma_71(independent_seeds(p, eta, alpha, 10, 600), p, eta, alpha, (2, 10))


@pytest.mark.slow
@pytest.mark.parametrize("row", [ROW1, ROW2], ids=["row1", "row2"])
def test_lemma_71_over_independent_seeds_slow(row: tuple[int, float, float]) -> None:
    p, eta, alpha = row
    check_lemma_71(independent_seeds(p, eta, alpha, 50, 4000), p, eta, alpha, (2, 10, 50))


# --- Lemma 7.1 and V_∞: Monte Carlo over replicas ---------------------------------------------


def check_replicas(row: tuple[int, float, float], steps: int, ts: tuple[int, ...], r: int) -> None:
    p, eta, alpha = row
    cfg = quad_cfg(p, eta, alpha, SIGMA, steps, dim=r, start_distance2=float(r))
    keep = run_replicas(cfg, CenterSamples((*ts, steps)))
    d = keep.offsets
    assert d is not None and float(d @ d) == pytest.approx(r)
    means, variances = propagate_moments(steps, p, eta, alpha, SIGMA, 1.0, 1.0)
    for t in (*ts, steps):
        e = keep.values[t]
        m, v = center_mean(t, p, eta, alpha, 1.0, 1.0), center_variance(t, p, eta, alpha, SIGMA)
        assert means[t] == pytest.approx(m, abs=1e-12) and variances[t] == pytest.approx(v)
        m_hat = float(e @ d) / float(d @ d)
        assert_mean(m_hat, m, v, r, f"E x̃_{t} (replicas)")
        residual = e - m_hat * d
        assert_variance(float(residual @ residual) / (r - 1), v, r, f"V x̃_{t} (replicas)")
    # V_∞ (Corollary 7.1): the last t is deep in the stationary regime (V_T = V_∞ to 7 digits).
    v_inf = asymptotic_variance(p, eta, alpha, SIGMA)
    assert center_variance(steps, p, eta, alpha, SIGMA) == pytest.approx(v_inf, rel=1e-6)
    residual = keep.values[steps] - float(keep.values[steps] @ d) / r * d
    assert_variance(float(residual @ residual) / (r - 1), v_inf, r, "V_∞")


@pytest.mark.parametrize(
    ("row", "steps", "ts"),
    [(ROW1, 200, (2, 10, 100)), (ROW2, 50, (2, 10))],
    ids=["row1", "row2"],
)
def test_lemma_71_and_v_inf_over_replicas(
    row: tuple[int, float, float], steps: int, ts: tuple[int, ...]
) -> None:
    """R = 50 000 replicas: mean and variance of x̃_t at the table's t, and V_∞ at t = T."""
    check_replicas(row, steps, ts, 50_000)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("row", "steps", "ts"),
    [(ROW1, 200, (2, 10, 100)), (ROW2, 50, (2, 10))],
    ids=["row1", "row2"],
)
def test_lemma_71_and_v_inf_over_replicas_slow(
    row: tuple[int, float, float], steps: int, ts: tuple[int, ...]
) -> None:
    """200 000 Monte-Carlo runs (row 1 at T = 200, row 2 at T = 50)."""
    check_replicas(row, steps, ts, 200_000)


# --- stability (17) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factor", "steps"), [(0.95, 150), (1.05, 300), (0.999, 2000), (1.001, 2000)]
)
def test_stability_boundary_rate_without_noise(factor: float, steps: int) -> None:
    """σ = 0, x₀ ≠ x*, p = 4, ηh = 0.5 (β_max = 1.5): x̃_t = Aγ^t + Bφ^t, so log|x̃_t| grows at
    log max(|γ|, |φ|) = log|φ| per step once γ^t has died out; bounded below β_max, geometric
    growth above it."""
    p, eta = 4, 0.5
    alpha = factor * beta_max(p, eta) / p
    gamma, phi = roots(p, eta, alpha)
    rate = math.log(max(abs(gamma), abs(phi)))
    path, sign = scalar_center_path(quad_cfg(p, eta, alpha, 0.0, steps))
    means, _ = propagate_moments(steps, p, eta, alpha, 0.0, 1.0, 1.0)
    assert np.max(np.abs(sign * path - means) / np.maximum(1.0, np.abs(means))) < 1e-12
    half = steps // 2
    measured = (math.log(abs(path[steps])) - math.log(abs(path[half]))) / (steps - half)
    assert measured == pytest.approx(rate, abs=1e-6)
    if factor < 1:
        assert rate < 0 and np.max(np.abs(path)) <= 1.0 + 1e-12
    else:
        # |φ|^{T/2} = 5.6·10⁵ (1.05) and 6.3 (1.001): far past the start, and still growing
        assert rate > 0 and abs(path[steps]) > 5 * abs(path[half]) > 5 * abs(path[0])
    if factor == 1.05:
        assert abs(path[steps]) > 1e10  # |φ| = 1.0924: 300 steps multiply |x̃| by 3·10¹¹


@pytest.mark.parametrize("factor", [0.95, 1.05])
def test_stability_boundary_variance_with_noise(factor: float) -> None:
    """σ = 1, 5000 replicas: V[x̃_t] follows eq. (16) on both sides of β_max — settling at V_∞
    below it, growing like φ^{2t} above it (eq. (16) holds outside region (17) too)."""
    p, eta, r, steps = 4, 0.5, 5000, 80
    alpha = factor * beta_max(p, eta) / p
    cfg = quad_cfg(p, eta, alpha, SIGMA, steps, dim=r, start_distance2=0.0)
    keep = run_replicas(cfg, CenterSamples((40, 80)))
    var = {t: float(keep.values[t] @ keep.values[t]) / r for t in (40, 80)}  # known mean 0
    for t, emp in var.items():
        assert_variance(emp, center_variance(t, p, eta, alpha, SIGMA), r, f"V x̃_{t}")
    _, phi = roots(p, eta, alpha)
    if factor < 1:
        assert_variance(var[80], asymptotic_variance(p, eta, alpha, SIGMA), r, "V_∞")
    else:
        growth = var[80] / var[40]  # ≈ φ^80 = 1166
        assert math.log(growth) == pytest.approx(80 * math.log(abs(phi)), abs=0.2)


# --- Lemma 7.2: double averaging --------------------------------------------------------------


def check_double_average(row: tuple[int, float, float], steps: int, r: int) -> None:
    p, eta, alpha = row
    cfg = quad_cfg(p, eta, alpha, SIGMA, steps, dim=r, start_distance2=0.0)
    ts = (100, steps)
    keep = run_replicas(cfg, CenterSamples((), sums_at=ts))
    exact = double_average_variance(steps, p, eta, alpha, SIGMA)
    for t in ts:
        s = keep.sums[t]  # t·z_t − t·x*, known mean 0: t·V[z_t] = E[S_t²]/t
        assert_variance(float(s @ s) / r / t, float(exact[t]), r, f"t·V[z_{t}]")
    limit = SIGMA**2 / p  # σ²/(p h²)
    emp = float(keep.sums[steps] @ keep.sums[steps]) / r / steps
    assert abs(emp - limit) < 0.05 * limit + 4 * limit * math.sqrt(2 / r)


def test_lemma_72_double_averaging() -> None:
    """Row 1, t = 100 and 1000, 20 000 replicas: t·V[z_t] = 0.18886 / 0.24388 (exact) → 0.25."""
    check_double_average(ROW1, 1000, 20_000)


@pytest.mark.slow
@pytest.mark.parametrize("row", [ROW1, ROW2], ids=["row1", "row2"])
def test_lemma_72_double_averaging_slow(row: tuple[int, float, float]) -> None:
    check_double_average(row, 2000, 50_000)


# --- async EASGD with one worker ----------------------------------------------------------------

# Async EASGD (A.1b) with p = 1: at its iteration t the worker's snapshot is x = x_t. The center
# has served exactly the worker's t − 1 earlier requests, in order, so it holds x̃_t; it sets
# d = α(x_t − x̃_t), x̃_{t+1} = x̃_t + d and answers d, and the worker sets
# x_{t+1} = x_t − d − η g(x_t) = x_t − η g(x_t) − α(x_t − x̃_t). The gradient at the
# pre-elastic snapshot is the gradient at x_t, and sync EASGD (A.1a) also takes it at x_t, so
# this is (40)/(41) with p = 1, i.e. M with β = α, exactly. With τ > 1 both do plain SGD between
# exchanges and leave x̃ alone. Each process draws one gradient per iteration from its own
# stream in both programs, so even noisy trajectories coincide, up to the rounding of
# (x − d) − ηg against (x − ηg) − α(x − x̃). EAMSGD with δ = 0 has v = −ηg(x_t): async EASGD.
# (With p ≥ 2 the center meets the workers one at a time, which is not M.)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("tau", [1, 3])
def test_async_easgd_with_one_worker_is_sync_easgd(sigma: float, tau: int) -> None:
    def paths(algorithm: str, delta: float) -> dict[int, list[Vector]]:
        cfg = quad_cfg(
            1, 0.5, 0.5, sigma, 60, dim=3, algorithm=algorithm, tau=tau, delta=delta, seed=3
        )
        result = run_simulation(cfg, record_reports=("model",))
        assert result.status == Status.FINISHED
        return trajectories(result)

    sync, asyn, eamsgd = paths("easgd", 0.9), paths("async_easgd", 0.9), paths("eamsgd", 0.0)
    for pid in (0, 1):
        assert len(sync[pid]) == len(asyn[pid]) == len(eamsgd[pid])
        assert np.max(np.abs(np.array(sync[pid]) - np.array(asyn[pid]))) < 1e-12
        assert np.array_equal(np.array(asyn[pid]), np.array(eamsgd[pid]))
    if sigma == 0 and tau == 1:  # and the closed form: γ = 0.809, φ = −0.309 (table row 3)
        means, _ = propagate_moments(60, 1, 0.5, 0.5, 0.0, 1.0, 1.0)
        offset = asyn[1][0]  # x₀ − x* (a unit vector): the mean scales with it per coordinate
        assert np.max(np.abs(np.array(asyn[0]) - np.outer(means, offset))) < 1e-12


# --- convergence of the asynchronous variants -------------------------------------------------


@pytest.mark.parametrize(
    "algorithm", ["easgd", "async_easgd", "eamsgd", "downpour", "mdownpour", "async_ps"]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_variants_converge_on_the_default_quadratic(algorithm: str, seed: int) -> None:
    """4 workers, η = 0.01, β = 0.9, δ = 0.9, 1000 steps on the default 10-dim quadratic
    (loss₀ = 5.41): the center's loss ends below 2% of the initial loss (measured ≤ 0.5%).
    DOWNPOUR and the async PS move the center by plain (stale) SGD steps, so its squared
    distance to x* ends at SGD's noise floor Σ_k ησ_k²/(λ_k(2 − ηλ_k)) ≈ 0.0048 (measured
    0.4–1.7 floors over 6 seeds); momentum (EAMSGD, MDOWNPOUR) raises it, EASGD lowers it."""
    cfg = load_config(
        overrides={
            "algorithm": algorithm,
            "processes": 5,
            "clusters": 1,
            "steps": 1000,
            "seed": seed,
            "lr": {"eta": 0.01},
        }
    )
    result = run_simulation(cfg)
    assert result.status == Status.FINISHED
    problem = result.problem
    assert problem is not None and problem.constants.x_star is not None
    center = result.processes[cfg.center]
    assert center.x is not None and center.loss is not None
    assert center.loss < 0.02 * problem.loss(problem.x0())
    if algorithm in ("downpour", "async_ps"):
        assert isinstance(problem, NoisyQuadratic)
        lam = problem.eigenvalues
        floor = float(np.sum(0.01 / lam.size / (lam * (2 - 0.01 * lam))))  # σ² = 1 in total
        dist2 = float(np.sum((center.x - problem.constants.x_star) ** 2))
        assert dist2 < 4 * floor, (dist2, floor)


# --- thread runtime ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["easgd", "async_easgd"])
def test_thread_runtime_matches_the_simulator(algorithm: str) -> None:
    """Sync EASGD (any p) and async EASGD with p = 1 do not depend on the schedule, so real
    threads must end where the simulator ends (gradient streams are per process)."""
    processes = 5 if algorithm == "easgd" else 2
    cfg = load_config(
        overrides={
            "algorithm": algorithm,
            "processes": processes,
            "clusters": 2,
            "steps": 100,
            "seed": 2,
            "lr": {"eta": 0.05},
        }
    )
    sim = run_simulation(cfg)
    run = ThreadRun(cfg).start()
    try:
        assert run.wait(30)
    finally:
        run.stop()
    assert run.states() == [WorkerState.FINISHED] * processes
    for worker, proc in zip(run.workers, sim.processes, strict=True):
        assert worker.x is not None and proc.x is not None
        assert np.max(np.abs(worker.x - proc.x)) < 1e-12


# --- config validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"elastic": {"alpha": 1.0}}, "elastic.alpha: Input should be less than 1"),
        (
            {"processes": 3, "elastic": {"beta": 3.0}},
            "elastic α = β/p = 1.5 must be < 1 (β = 3, p = 2)",
        ),
        ({"processes": 1}, "easgd needs a center and at least one worker"),
        ({"elastic": {"center": "x.y"}}, "elastic.center 'x.y' is not a process name"),
        ({"elastic": {"center": "0"}}, "elastic.center '0' is not a process name"),
        ({"elastic": {"center": "7.0"}}, "elastic.center '7.0': no cluster 7: clusters are 0..0"),
        (
            {"elastic": {"center": "0.9"}},
            "elastic.center '0.9': no process 0.9: cluster 0 has indexes 0..7",
        ),
    ],
)
def test_config_rejects_bad_elastic_settings(over: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"algorithm": "easgd", "clusters": 1, **over})
    assert message in str(err.value)


def test_config_accepts_another_center() -> None:
    cfg = load_config(
        overrides={
            "algorithm": "easgd",
            "processes": 6,
            "clusters": 2,
            "steps": 20,
            "elastic": {"center": "1.2"},
        }
    )
    assert cfg.center == cfg.membership.pid(1, 2) != 0
    result = run_simulation(cfg)
    assert result.status == Status.FINISHED
    assert result.processes[cfg.center].steps_done == 20
