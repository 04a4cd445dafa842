"""Attiya–Schiller: Alg 1 (average N parameter vectors), Alg 2 (gradients, then cluster
agreement) and standalone cluster agreement (Alg 3 over Alg 4).

The theory warnings quote Thm 1 and Lemmas 3, 4, 6 (Alg 1), Lemma 21 and Thms 3, 4 (Alg 2)
and the majority-of-clusters condition of Alg 3 (Alg 2 and agreement); docs/papers.md says
where each result is checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from peerlearn.algorithms.aggregate import maa_rounds
from peerlearn.algorithms.records._common import first_eta, sentence, start_point
from peerlearn.algorithms.sgd import alg1, alg2, maa_instances
from peerlearn.algorithms.spec import AlgorithmSpec, DeliveryPolicy, RejoinState
from peerlearn.effects import Program
from peerlearn.errors import ConfigError
from peerlearn.streams import Purpose, stream
from peerlearn.ties import at_most, compare

if TYPE_CHECKING:
    from peerlearn.config import RunConfig
    from peerlearn.problems import Problem
    from peerlearn.problems.base import Constants

__all__ = ["RECORDS"]

#: The whole hypothesis of each result, worded as the paper states it (Thm 1, Lemmas 3/4/6,
#: 21, Thm 3, Thm 4 with Lemma 22 and the q_t = η/4 correction, §4.1).
#: tests/test_theory_warnings.py holds the paper's wording and checks these against it.
CONDITIONS = {
    "Thm 1": (
        "an L-smooth, μ-strongly convex Q and η_t = β/(γ+t) ≤ 1/L (i.e. β/(γ+1) ≤ 1/L) "
        "with β > 1/μ and γ > 0"
    ),
    "Lemmas 3, 4 and 6": "an L-smooth, μ-strongly convex Q and η ≤ 1/L",
    "Lemma 21": "a constant η ≤ min{1/2, 1/L} and q_t = η/4",
    "Thm 3": "T ≥ 16L²N and a constant η = √(N/T)",
    "Thm 4": "T ≥ max{16L²N, 4N}, a constant η = √(N/T) and q_t = η/4",
    "Alg 3": "f_c ≤ ⌊(m−1)/2⌋ crashed clusters, i.e. ⌊m/2⌋+1 clusters with a live process",
}


# --- programs --------------------------------------------------------------------------------


def _alg1_programs(cfg: RunConfig, problem: Problem | None, pids: Sequence[int]) -> list[Program]:
    return _alg1_resume(cfg, problem, pids, RejoinState(1, start_point(problem)))


def _alg1_resume(
    cfg: RunConfig, problem: Problem | None, pids: Sequence[int], state: RejoinState
) -> list[Program]:
    eta = cfg.schedule()
    return [alg1(state.model, cfg.steps, cfg.n_quorum, eta, state.step) for _ in pids]


def _alg2_programs(cfg: RunConfig, problem: Problem | None, pids: Sequence[int]) -> list[Program]:
    return _alg2_resume(cfg, problem, pids, RejoinState(1, start_point(problem)))


def _alg2_resume(
    cfg: RunConfig, problem: Problem | None, pids: Sequence[int], state: RejoinState
) -> list[Program]:
    steps = cfg.steps
    rounds, inner = cfg.agreement_rounds()
    tau = None if steps is None else int(stream(cfg.seed, Purpose.TAU).integers(1, steps + 1))
    # Rounds per iteration follow q_t = η_t/4 unless q or the rounds were fixed in the config.
    per_t = cfg.maa.rounds is None and cfg.maa.q is None and cfg.lr.schedule == "inverse_time"
    r = None if per_t else rounds
    eta = cfg.schedule()
    return [
        alg2(
            state.model,
            steps,
            cfg.n_quorum,
            eta,
            tau,
            r,
            inner,
            cfg.maa.aggregator,
            state.step,
        )
        for _ in pids
    ]


def _maa_programs(cfg: RunConfig, problem: Problem | None, pids: Sequence[int]) -> list[Program]:
    if cfg.steps is None:
        raise ConfigError("standalone agreement needs a finite number of instances (steps)")
    rounds, inner = cfg.agreement_rounds()
    m = cfg.membership
    return [
        maa_instances(
            stream(cfg.seed, Purpose.INPUTS, m.cluster_of[p], m.index(p)).standard_normal(
                (cfg.steps, cfg.dim)
            ),
            rounds,
            inner,
            cfg.maa.aggregator,
        )
        for p in pids
    ]


# --- theory ----------------------------------------------------------------------------------


def _alg1_warnings(cfg: RunConfig, constants: Constants) -> list[str]:
    lr, big_l, mu = cfg.lr, constants.L, constants.mu
    parts = [] if mu is not None else ["μ is unknown (Q may not be strongly convex)"]
    if lr.schedule == "inverse_time":
        beta, gamma = lr.beta, lr.gamma
        if mu is not None and at_most(beta, 1 / mu):
            parts.append(f"β = {beta:g} is not above 1/μ = {1 / mu:g}")
        if big_l is not None and not at_most(beta / (gamma + 1), 1 / big_l):
            parts.append(f"β/(γ+1) = {beta / (gamma + 1):g} > 1/L = {1 / big_l:g}")
        return sentence(CONDITIONS, "Thm 1", parts)
    # a constant η: Thm 1 takes η_t = β/(γ+t), the per-iteration lemmas still hold
    eta1 = first_eta(cfg)
    if eta1 is not None and big_l is not None and not at_most(eta1, 1 / big_l):
        parts.append(f"η = {eta1:g} > 1/L = {1 / big_l:g}")
    return sentence(CONDITIONS, "Lemmas 3, 4 and 6", parts)


def _alg2_warnings(cfg: RunConfig, constants: Constants) -> list[str]:
    eta1, big_l = first_eta(cfg), constants.L
    out = sentence(CONDITIONS, "Lemma 21", _lemma21_broken(cfg, eta1, big_l))
    if cfg.steps is not None:
        t3, t4 = _thm34_broken(cfg, eta1, big_l)
        out += sentence(CONDITIONS, "Thm 3", t3)
        out += sentence(CONDITIONS, "Thm 4", t4)
    return out + _majority_warnings(cfg, _SGD_OPTIMAL)


def _majority_warnings(cfg: RunConfig, optimal: str) -> list[str]:
    """Alg 3 waits for ⌊m/2⌋+1 clusters: crash specs that leave fewer alive block it.
    ``optimal`` says why no algorithm can do better."""
    m = cfg.clusters
    dead = {p for c in cfg.crash_specs for p in c.pids}
    alive = sum(1 for ms in cfg.membership.members if any(p not in dead for p in ms))
    if alive >= m // 2 + 1:
        return []
    return sentence(
        CONDITIONS,
        "Alg 3",
        [
            f"the crash specs leave {alive} of {m} clusters a live process, fewer than "
            f"⌊m/2⌋+1 = {m // 2 + 1}, so processes will block ({optimal})"
        ],
    )


#: why a majority of live clusters is necessary: for SGD, the paper's Thm 5; for agreement
#: itself, even one-dimensional approximate agreement (Attiya, Kumari and Schiller, OPODIS 2020)
_SGD_OPTIMAL = "by Thm 5 no algorithm can do better"
_AGREEMENT_OPTIMAL = "no approximate agreement can do better, even in one dimension"


def _agreement_broken(cfg: RunConfig, eta1: float | None) -> list[str]:
    """The ways this run's agreement is not the "q_t = η/4" of Lemma 21 and Thm 4."""
    broken = []
    q = cfg.agreement_q()
    if eta1 is not None and compare(q, eta1 / 4) != 0:
        broken.append(f"q = {q:g} ≠ η/4 = {eta1 / 4:g}")
    rounds, inner = cfg.agreement_rounds()
    need, need_inner = maa_rounds(q, cfg.maa.aggregator)
    if rounds < need or inner < need_inner:
        broken.append(
            f"maa.rounds/inner_rounds = {rounds}/{inner} are below the {need}/{need_inner} "
            f"that a q-contraction needs"
        )
    return broken


def _lemma21_broken(cfg: RunConfig, eta1: float | None, big_l: float | None) -> list[str]:
    broken = []
    if cfg.lr.schedule == "inverse_time":
        broken.append("lr.schedule = inverse_time is not constant")
    bound = min(0.5, 1 / big_l) if big_l is not None else None
    if eta1 is not None and bound is not None and not at_most(eta1, bound):
        broken.append(f"η = {eta1:g} > min{{1/2, 1/L}} = {bound:g}")
    return broken + _agreement_broken(cfg, eta1)


def _thm34_broken(
    cfg: RunConfig, eta1: float | None, big_l: float | None
) -> tuple[list[str], list[str]]:
    """What this run breaks of Thm 3's and of Thm 4's conditions (T finite)."""
    steps, big_n = cfg.steps, cfg.n_quorum
    assert steps is not None
    rate: list[str] = []
    if cfg.lr.schedule == "inverse_time":
        rate.append("lr.schedule = inverse_time is not constant")
    elif eta1 is not None and compare(eta1, math.sqrt(big_n / steps)) != 0:
        rate.append(f"η = {eta1:g} ≠ √(N/T) = {math.sqrt(big_n / steps):g}")
    t3: list[str] = []
    t4: list[str] = []
    if big_l is not None and compare(steps, 16 * big_l**2 * big_n) < 0:
        t3.append(f"T = {steps} < 16L²N = {16 * big_l**2 * big_n:g}")
    need4 = max(16 * big_l**2 * big_n if big_l is not None else 0.0, 4.0 * big_n)
    if compare(steps, need4) < 0:
        what = "max{16L²N, 4N}" if big_l is not None else "4N"
        t4.append(f"T = {steps} < {what} = {need4:g}")
    return t3 + rate, t4 + rate + _agreement_broken(cfg, eta1)


_AGREEMENT = frozenset({"maa.aggregator", "maa.q", "maa.rounds", "maa.inner_rounds"})

RECORDS = (
    AlgorithmSpec(
        name="alg1",
        delivery=DeliveryPolicy.DROP_WHEN_AWAY,
        paper="Attiya–Schiller Alg 1",
        exchanges="parameters after a local step, to everyone",
        waits_for="the first N of iteration t",
        tolerates="any f < n crashes",
        parameters="`quorum` N",
        programs=_alg1_programs,
        resume=_alg1_resume,
        settings=frozenset({"quorum"}),
        fixed_eta=False,
        compressible=frozenset({"params"}),
        conditions={k: CONDITIONS[k] for k in ("Thm 1", "Lemmas 3, 4 and 6")},
        warnings=_alg1_warnings,
    ),
    AlgorithmSpec(
        name="alg2",
        delivery=DeliveryPolicy.DROP_WHEN_AWAY,
        paper="Attiya–Schiller Alg 2 + Alg 3/4",
        exchanges="gradients, then agreement values (clusters share registers)",
        waits_for="≥ N gradients, then ⌊m/2⌋+1 clusters per round",
        tolerates="a minority of clusters",
        parameters="`quorum`, `[maa]`",
        programs=_alg2_programs,
        resume=_alg2_resume,
        settings=frozenset({"quorum"}) | _AGREEMENT,
        fixed_eta=False,
        agreement=True,
        compressible=frozenset({"grad"}),  # the gradients; the agreement values stay exact
        conditions={k: CONDITIONS[k] for k in ("Lemma 21", "Thm 3", "Thm 4", "Alg 3")},
        warnings=_alg2_warnings,
        # q_t = η/4, as Lemma 21 and the round counts take it; Thm 4's statement prints
        # q_t = 1/4, an erratum (docs/papers.md)
        default_q=lambda cfg: min(1.0, cfg.schedule()(1) / 4),
    ),
    AlgorithmSpec(
        name="maa",
        delivery=DeliveryPolicy.DROP_WHEN_AWAY,
        paper="Attiya–Schiller Alg 3 over Alg 4",
        exchanges="agreement values only (seeded inputs)",
        waits_for="⌊m/2⌋+1 clusters",
        tolerates="a minority of clusters",
        parameters="`[maa]`, `dim`",
        programs=_maa_programs,
        settings=_AGREEMENT,
        needs_problem=False,
        fixed_eta=False,
        agreement=True,
        conditions={"Alg 3": CONDITIONS["Alg 3"]},
        warnings=lambda cfg, constants: _majority_warnings(cfg, _AGREEMENT_OPTIMAL),
    ),
)
