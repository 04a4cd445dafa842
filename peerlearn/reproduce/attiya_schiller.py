"""Attiya–Schiller's results, measured: Alg 1's error against Thm 1, and the agreement's
contraction per round against Lemmas 16, 19 and 20.

Every run is a seeded simulation (``run_simulation``), so the report is the same on every
rebuild on a machine; the number of seeds and the run lengths are the experiment's ``Size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peerlearn.algorithms import InverseTime, diam2
from peerlearn.config import RunConfig, load_config
from peerlearn.problems import DoubleWell, NoisyQuadratic
from peerlearn.reproduce.claims import Check, Claim, Interval, Outcome
from peerlearn.reproduce.report import new_figure, save_figure
from peerlearn.sim import SimResult, Status, run_simulation
from peerlearn.sim.trace import contraction_ratios, receive_sets_differ, rounds_by
from peerlearn.ties import at_most

__all__ = [
    "QUAD",
    "TIGHT",
    "WIDE",
    "alg1_error",
    "alg1_errors",
    "exact_sequential_error",
    "maa_contraction",
    "thm1_bounds",
]

PAPER = "Attiya–Schiller"

# Thm 1's numeric instance: μ = L = 1, β = 2, γ = 3, σ² = 1, ‖x_1 − x*‖² = 10.
BETA, GAMMA, SIGMA2, START2 = 2.0, 3.0, 1.0, 10.0
QUAD: dict[str, Any] = {
    "name": "quadratic",
    "dim": 4,
    "mu": 1.0,
    "L": 1.0,
    "sigma": 1.0,
    "start_distance2": START2,
}
# A near-tight instance: x_1 = x* removes the first term, and with β = 10, γ = 9 the noise
# term β²σ²/((γ+T+1)(βμ−1)N) is only ~2.1× the exact error of mini-batch-N SGD.
TIGHT_BETA, TIGHT_GAMMA = 10.0, 9.0
TIGHT: dict[str, Any] = {**QUAD, "dim": 10, "start_distance2": 0.0}
#: the same constants in 64 coordinates: a seed's error varies 4× less
WIDE: dict[str, Any] = {**QUAD, "dim": 64}

THM1 = Claim(
    PAPER,
    "Thm 1",
    "η_t = β/(γ+t), β > 1/μ, β/(γ+1) ≤ 1/L: E‖x_{T+1}^i − x*‖² ≤ ((γ+1)‖x_1−x*‖² + "
    "β²σ²/((βμ−1)N)) / (γ+T+1) (external); the internal E‖x^i − x^j‖² with 4× the noise term",
)


POWER = Claim(
    "this report",
    "the near-tight instance",
    "without averaging (plain SGD, N = 1) the N = 4 bound fails: the check can fail",
)


@dataclass(frozen=True)
class Size:
    """How much an experiment runs: seeds, and its run lengths."""

    seeds: int
    steps: tuple[int, ...]


def cfg(**over: Any) -> RunConfig:
    return load_config(overrides=over)


def thm1_bounds(
    quorum: int,
    steps: int,
    beta: float = BETA,
    gamma: float = GAMMA,
    start2: float = START2,
    mu: float = 1.0,
) -> tuple[float, float]:
    """(external, internal) right-hand sides of Thm 1."""
    head = (gamma + 1) * start2 / (gamma + steps + 1)
    noise = beta**2 * SIGMA2 / ((gamma + steps + 1) * (beta * mu - 1) * quorum)
    return head + noise, head + 4 * noise


def alg1_run(
    quorum: int,
    seed: int,
    steps: int,
    problem: dict[str, Any] = QUAD,
    beta: float = BETA,
    gamma: float = GAMMA,
    processes: int = 8,
    clusters: int = 4,
) -> SimResult:
    res = run_simulation(
        cfg(
            algorithm="alg1",
            problem=problem,
            processes=processes,
            clusters=clusters,
            quorum=quorum,
            steps=steps,
            seed=seed,
            lr={"schedule": "inverse_time", "beta": beta, "gamma": gamma},
            sim={"sample_every": 1e9},
        )
    )
    if res.status is not Status.FINISHED:
        raise RuntimeError(f"Alg 1 (N = {quorum}, seed {seed}) ended {res.status.value}")
    return res


def errors_of(res: SimResult) -> tuple[np.ndarray, float]:
    """(‖x_i − x*‖² of each process, max_{i,j} ‖x_i − x_j‖²) at the end of one run."""
    assert res.problem is not None and res.problem.constants.x_star is not None
    xs = np.stack([p.x for p in res.processes if p.x is not None])
    return ((xs - res.problem.constants.x_star) ** 2).sum(axis=1), diam2(list(xs))


def alg1_errors(
    quorum: int,
    seeds: int,
    steps: int,
    problem: dict[str, Any] = QUAD,
    beta: float = BETA,
    gamma: float = GAMMA,
    processes: int = 8,
    clusters: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeds 0 … seeds − 1: each process's external error (seeds × processes) and the largest
    internal error (per seed) at the end of the run."""
    ext, internal = [], []
    for seed in range(seeds):
        res = alg1_run(quorum, seed, steps, problem, beta, gamma, processes, clusters)
        e, i = errors_of(res)
        ext.append(e)
        internal.append(i)
    return np.stack(ext), np.asarray(internal)


def largest(errors: np.ndarray) -> list[float]:
    """Per seed, the largest error over the processes: a bound on every process's expectation
    holds for the expected largest one only if it holds with room, so holding the largest to
    it is the stronger check."""
    return [float(e) for e in errors.max(axis=1)]


def exact_sequential_error(
    batch: int,
    steps: int,
    problem: dict[str, Any] = QUAD,
    beta: float = BETA,
    gamma: float = GAMMA,
) -> float:
    """E‖x_{T+1} − x*‖² of sequential mini-batch SGD, by exact moment propagation.

    On Q = ½ Σ λ_k (x_k − x*_k)² with isotropic noise of total variance σ², each coordinate's
    second moment obeys e_{t+1} = (1 − η_t λ_k)² e_t + η_t² σ² / (d · batch).
    """
    prob = NoisyQuadratic(**{k: v for k, v in problem.items() if k != "name"})
    assert prob.constants.x_star is not None
    lam = prob.eigenvalues
    e = (prob.x0() - prob.constants.x_star) ** 2
    eta = InverseTime(beta, gamma)
    for t in range(1, steps + 1):
        e = (1 - eta(t) * lam) ** 2 * e + eta(t) ** 2 * SIGMA2 / (prob.dim * batch)
    return float(e.sum())


def alg1_error(quick: bool, figures: Path, say: Callable[[str], None]) -> Outcome:
    """Alg 1's external and internal error against Thm 1, as T and N grow, next to
    sequential mini-batch-N SGD."""
    size = Size(8, (100, 300)) if quick else Size(40, (100, 300, 1000))
    quorums = (1, 2, 4, 8)
    last = size.steps[-1]
    checks: list[Check] = []
    curves: dict[int, list[float]] = {}
    copied = False  # N = 1: every run ended with equal models
    for n_q in quorums:
        say(f"N = {n_q}: T = {', '.join(map(str, size.steps))}, {size.seeds} seeds")
        curves[n_q] = []
        for steps in size.steps:
            errors, internal = alg1_errors(n_q, size.seeds, steps, WIDE)
            ext = largest(errors)
            curves[n_q].append(float(np.mean(ext)))
            if steps != last:
                continue
            bound_ext, bound_int = thm1_bounds(n_q, steps)
            what = f"N = {n_q}, T = {steps}"
            checks.append(
                Check(f"external error, {what}", Interval.over(ext), THM1, "at_most", bound_ext)
            )
            if n_q == 1:
                copied = float(np.max(internal)) == 0.0
            if n_q < 8:  # N = n: every process averages the same models, internal = 0
                checks.append(
                    Check(
                        f"internal error, {what}",
                        Interval.over(list(internal)),
                        THM1,
                        "at_most",
                        bound_int,
                    )
                )
    loose = [c.ratio for c in checks if c.ratio is not None and c.ratio > 0]
    say(f"the near-tight instance, N = 4, T = {last}")
    errors, internal = alg1_errors(4, size.seeds, last, TIGHT, TIGHT_BETA, TIGHT_GAMMA)
    ext = largest(errors)
    t_ext, t_int = thm1_bounds(4, last, TIGHT_BETA, TIGHT_GAMMA, start2=0.0)
    plain = exact_sequential_error(1, last, TIGHT, TIGHT_BETA, TIGHT_GAMMA)
    tight = Check(
        f"near-tight: external error, N = 4, T = {last}",
        Interval.over(ext),
        THM1,
        "at_most",
        t_ext,
        note="x_1 = x*, β = 10, γ = 9, d = 10",
    )
    checks += [
        tight,
        Check(
            f"near-tight: internal error, N = 4, T = {last}",
            Interval.over(list(internal)),
            THM1,
            "at_most",
            t_int,
            note="the same runs",
        ),
        # The instance has power: plain SGD (N = 1), computed exactly, is above the N = 4 bound.
        Check(
            "near-tight: plain SGD (N = 1), exact",
            Interval.exact(plain),
            POWER,
            "at_least",
            t_ext,
            note="the bound must fail without averaging",
        ),
    ]
    # N = n: each process averages all n models, so Alg 1 *is* sequential mini-batch-n SGD.
    steps = last
    say(f"n = N = 4 against exact sequential mini-batch-4 SGD, and n = 8, N = 4; T = {steps}")
    same = largest(alg1_errors(4, size.seeds, steps, WIDE, processes=4, clusters=2)[0])
    more = largest(alg1_errors(4, size.seeds, steps, WIDE, processes=8, clusters=4)[0])
    exact4 = exact_sequential_error(4, steps, WIDE)
    vs_seq = Interval.over(more)
    checks += [
        Check(
            f"error, n = N = 4, T = {steps}",
            Interval.over(same),
            Claim(
                PAPER,
                "Alg 1, N = n",
                "every process averages the same n models: it is sequential mini-batch-n SGD",
            ),
            "equals",
            exact4,
            note="exact: mini-batch-4 SGD's moment recursion",
        ),
        Check(
            f"error, n = 8, N = 4, T = {steps}",
            vs_seq,
            Claim(PAPER, "Alg 1, N < n", "no statement against mini-batch-N SGD"),
            "none",
            note=f"mini-batch-4 SGD: {exact4:.4g}",
        ),
    ]
    fig, (ax, bx) = new_figure(2)
    for n_q in quorums:
        line = ax.loglog(size.steps, curves[n_q], "o-", label=f"Alg 1, N = {n_q}")[0]
        bounds = [thm1_bounds(n_q, t)[0] for t in size.steps]
        ax.loglog(size.steps, bounds, "--", color=line.get_color(), alpha=0.6)
        seq = [exact_sequential_error(n_q, t, WIDE) for t in size.steps]
        ax.loglog(size.steps, seq, ":", color=line.get_color())
    ax.set_xlabel("iterations T")
    ax.set_ylabel("E max_i ‖x_i − x*‖²")
    ax.set_title("n = 8, m = 4: measured (o), Thm 1 (--), mini-batch-N SGD (:)", fontsize=10)
    ax.legend(fontsize=8)
    labels = ["Alg 1, N = 4", "Thm 1 bound, N = 4", "plain SGD (exact)"]
    heights = [tight.measured.mean, t_ext, plain]
    bx.bar(labels, heights, color=["tab:green", "tab:gray", "tab:red"])
    bx.errorbar(
        [0],
        [tight.measured.mean],
        yerr=[
            [tight.measured.mean - tight.measured.low],
            [tight.measured.high - tight.measured.mean],
        ],
        fmt="none",
        color="black",
    )
    bx.set_ylabel(f"E max_i ‖x_i − x*‖² at T = {last}")
    bx.set_title("near-tight: x_1 = x*, β = 10, γ = 9", fontsize=10)
    shown = [save_figure(fig, figures, "alg1-error")]
    return Outcome(
        name="alg1-error",
        title="Alg 1: error against T and N (Thm 1)",
        paper=PAPER,
        setup=(
            "Alg 1 in the simulator, n = 8 processes in m = 4 clusters, quorum N ∈ {1, 2, 4, 8}, "
            f"T ∈ {{{', '.join(map(str, size.steps))}}}, {size.seeds} seeds each, on Thm 1's "
            "instance: a quadratic with μ = L = 1, gradient noise of total variance σ² = 1, "
            "‖x_1 − x*‖² = 10, η_t = 2/(3 + t), in d = 64 (the bound does not depend on d; "
            "more coordinates make a seed's error vary less). The measured quantity per seed "
            "is the largest error over the processes. The near-tight instance starts at x* "
            "(the bound's first term vanishes) with β = 10, γ = 9, d = 10. The last two rows "
            "compare Alg 1 with exact sequential mini-batch SGD (its moment recursion)."
        ),
        checks=tuple(checks),
        figures=tuple(shown),
        findings=_alg1_findings(
            loose,
            tight,
            copied,
            vs_seq,
            exact4,
            # the first term's share of the bound at N = 4, T = last
            (GAMMA + 1) * START2 / (GAMMA + last + 1) / thm1_bounds(4, last)[0],
            all(c.verdict == "PASS" for c in checks if c.claim is POWER),
        ),
    )


def _alg1_findings(
    loose: list[float],
    tight: Check,
    copied: bool,
    vs_seq: Interval,
    exact4: float,
    first: float,
    power: bool,
) -> str:
    """What the numbers say, each sentence as the measurements have it."""
    text = (
        "**What the numbers say.** On Thm 1's own instance the measurements sit far under the "
        f"bound (measured/bound {min(loose):.2g}–{max(loose):.2g}): most of the bound is its "
        f"first term (γ+1)‖x_1−x*‖²/(γ+T+1) — {first:.0%} of it at N = 4 and the longest T — "
        "the start's distance, which the runs shed long before, so this instance proves "
        f"little. The near-tight instance removes that term: there Alg 1 measures "
        f"{tight.ratio or 0:.2f} of the bound"
        + (
            ", and plain SGD — no averaging — lies above it, so the check can fail. "
            if power
            else ". "
        )
    )
    if copied:
        text += (
            "With N = 1 a process takes the first model that reaches it, often one of its own "
            "cluster's: the processes copied each other and ended equal (internal error 0 in "
            "every run). "
        )
    text += (
        "Alg 1 with N = n is sequential mini-batch-n SGD exactly, and the last-but-one row "
        "compares it with the exact value. "
    )
    gap = 1 - vs_seq.mean / exact4
    if vs_seq.high < exact4:
        text += (
            f"With N < n its error sits below mini-batch-N SGD's ({gap:.0%} below, the whole "
            "interval under it): different processes average different subsets of N models, "
            "so a process's next model mixes models whose noise came from more than N "
            "gradients of the iterations before. The last two rows show it: the same N, the "
            "same d, n = N against n = 2N."
        )
    else:
        text += (
            f"With N < n (n = 2N) its error is {vs_seq.mean / exact4:.2f}× mini-batch-N SGD's "
            f"here, not told apart from it by these {vs_seq.n} seeds."
        )
    return text


# --- the agreement: contraction per round -----------------------------------------------------

#: the schedules the agreement runs under (tests/test_agreement.py runs the same): name →
#: (what the report calls it, the config's overrides)
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "no-crash": ("no crash", {}),
    "cluster-crash": ("a cluster crashes", {"sim": {"crashes": ["cluster:2@time=3.0"]}}),
    "mid-broadcast": (
        "a crash mid-broadcast",
        {"sim": {"crashes": ["process:1.0@t=2:mid-broadcast", "process:0.2@time=7"]}},
    ),
    "stragglers": ("3 stragglers ×20", {"sim": {"stragglers": 3, "slowdown": 20.0}}),
}
#: aggregator → (SMMAA factor, Lemma; cluster-round factor, Lemma)
FACTORS = {
    "midext": ((7 / 8, "Lemma 16"), (23 / 24, "Lemma 19")),
    "approachext": ((31 / 32, "Lemma 16"), (79 / 80, "Lemma 20")),
}
#: below this squared diameter a round's ratio is rounding, not contraction
_EPS = 1e-24


def maa_run(aggregator: str, seed: int, scenario: str, dim: int = 3, steps: int = 3) -> SimResult:
    """The standalone agreement (``maa``), 9 processes in 3 clusters, traced, with receive
    sets recorded; RuntimeError unless it finished."""
    res = run_simulation(
        cfg(
            algorithm="maa",
            processes=9,
            clusters=3,
            steps=steps,
            dim=dim,
            seed=seed,
            trace=True,
            maa={"aggregator": aggregator},
            **SCENARIOS[scenario][1],
        ),
        record_receives=True,
    )
    if res.status is not Status.FINISHED:
        raise RuntimeError(f"MAA ({aggregator}, {scenario}, seed {seed}) ended {res.status.value}")
    return res


def _worst(ratios: list[tuple[tuple[int, ...], float, float]]) -> list[float]:
    return [after / before for _, before, after in ratios if before > _EPS]


def maa_contraction(quick: bool, figures: Path, say: Callable[[str], None]) -> Outcome:
    """The agreement's squared diameter per round, shared-memory (Alg 4) and cluster (Alg 3)
    rounds, MidExtremes and ApproachExtreme, with and without crashes."""
    # ApproachExt's rounds are many (111 cluster rounds of 73 SMMAA rounds): one instance a
    # run when quick
    seeds, instances = (1, 1) if quick else (10, 2)
    checks: list[Check] = []
    depth: dict[str, list[float]] = {}
    zero_at: list[int] = []  # MidExt: the cluster round an instance's diameter reached 0
    instances_seen = 0
    derived: dict[str, int] = {}
    for aggregator, ((f_sm, lemma_sm), (f_cl, lemma_cl)) in FACTORS.items():
        inner: list[float] = []
        outer: list[float] = []
        q_ratio: list[float] = []
        for scenario in SCENARIOS:
            say(f"{aggregator}, {scenario}: {seeds} seed(s)")
            for seed in range(seeds):
                res = maa_run(aggregator, seed, scenario, steps=instances)
                if not receive_sets_differ(res, "await", "maa"):
                    raise RuntimeError(
                        f"{scenario}: every process heard the same senders — a contraction "
                        "measured on that would be trivial"
                    )
                inner += _worst(contraction_ratios(rounds_by(res, inner=True)))
                groups = rounds_by(res, inner=False)
                outer += _worst(contraction_ratios(groups))
                rounds, _ = res.config.agreement_rounds()
                derived[aggregator] = rounds
                for instance in range(1, instances + 1):
                    diams = [
                        diam2(list(groups[(instance, r)].values())) for r in range(1, rounds + 2)
                    ]
                    q_ratio.append(diams[-1] / diams[0])
                    if aggregator == "midext":
                        instances_seen += 1
                        zero = next((r for r, d in enumerate(diams) if d == 0), None)
                        if zero is not None:
                            zero_at.append(zero)
                        if scenario == "no-crash" and seed == 0 and instance == 1:
                            depth["midext"] = diams
        claim_sm = Claim(
            PAPER, lemma_sm, f"each SMMAA round: diam²(A_{{k+1}}) ≤ {_frac(f_sm)}·diam²(A_k)"
        )
        claim_cl = Claim(
            PAPER, lemma_cl, f"each cluster round: diam²(x_{{r+1}}) ≤ {_frac(f_cl)}·diam²(x_r)"
        )
        n_runs = seeds * len(SCENARIOS)
        checks.append(
            Check(
                f"{aggregator}: largest ratio of {len(inner)} SMMAA rounds",
                Interval.exact(max(inner)),
                claim_sm,
                "at_most",
                f_sm,
                note=f"{n_runs} runs, every scenario",
            )
        )
        checks.append(
            Check(
                f"{aggregator}: largest ratio of {len(outer)} cluster rounds",
                Interval.exact(max(outer)),
                claim_cl,
                "at_most",
                f_cl,
                note=f"{n_runs} runs, every scenario",
            )
        )
        checks.append(
            Check(
                f"{aggregator}: output/input diam² of {len(q_ratio)} instances",
                Interval.exact(max(q_ratio)),
                Claim(PAPER, "Thm 2", "R = ⌈log_f q⌉ cluster rounds reach q = 1/4"),
                "at_most",
                0.25,
            )
        )
    fig, (ax,) = new_figure()
    diams = depth["midext"]
    ax.semilogy(
        range(1, len(diams) + 1),
        [max(d, 1e-33) for d in diams],
        "o-",
        ms=3,
        label="measured diam² (0 drawn at 1e-33)",
    )
    ax.semilogy(
        range(1, len(diams) + 1),
        [diams[0] * (23 / 24) ** r for r in range(len(diams))],
        "--",
        label="Lemma 19: (23/24)^r",
    )
    ax.set_xlabel("cluster round r")
    ax.set_ylabel("diam² of the values")
    ax.set_title(f"MidExt, 9 processes in 3 clusters: {derived['midext']} rounds derived")
    ax.legend(fontsize=8)
    shown = [save_figure(fig, figures, "maa-contraction")]
    return Outcome(
        name="maa-contraction",
        title="Agreement: contraction per round (Lemmas 16, 19, 20)",
        paper=PAPER,
        setup=(
            "Alg 3 over Alg 4 (algorithm `maa`) in the simulator, 9 processes in 3 clusters, "
            f"d = 3, {instances} instance(s) a run, {seeds} seed(s) for each of four schedules: "
            f"{', '.join(name for name, _ in SCENARIOS.values())}. Every round of every cluster "
            "is traced; a round's ratio "
            "is diam² after over diam² before (rounds already at diam² ≤ 1e-24 are left out: "
            "their ratio is rounding). The bounds hold for every round, so the measured "
            "quantity is the largest ratio seen. Each run checks that processes heard "
            "different senders — with equal receive sets a contraction would be trivial."
        ),
        checks=tuple(checks),
        figures=tuple(shown),
        findings=(
            "**What the numbers say.** "
            + (
                "Every round contracts at least as the lemmas say, under crashes and "
                "stragglers too. "
                if all(c.verdict == "PASS" for c in checks)
                else "Not every round contracts as the lemmas say: see the failed rows. "
            )
            + _zero_text(derived["midext"], sorted(zero_at), instances_seen)
        ),
    )


def _zero_text(derived: int, zero_at: list[int], instances: int) -> str:
    if not zero_at:
        return (
            f"MidExt's {derived} derived cluster rounds (q = 1/4) never brought the diameter "
            "to exactly 0 here."
        )
    return (
        f"The derived number of rounds is far more than the diameter needs: MidExt's {derived} "
        f"cluster rounds (q = 1/4) brought it to exactly 0 — in floating point — in "
        f"{len(zero_at)} of {instances} instances, after {zero_at[0]}–{zero_at[-1]} rounds. "
        "The bound is for the worst schedule: a round's MidExt takes the midpoint of the "
        "farthest pair the process heard, and once two processes heard the same extremes they "
        "hold the same value; the worst case, where every process hears a different extreme "
        "pair each round, is rare under random delays."
    )


def _frac(f: float) -> str:
    for den in (8, 24, 32, 80):
        if abs(f * den - round(f * den)) < 1e-12:
            return f"{round(f * den)}/{den}"
    return f"{f:g}"


# --- Alg 2: disagreement against the number of agreement rounds (Lemma 21) ----------------------

#: Lemma 21's instance: η ≤ min{1/2, 1/L} with L = 2 for the non-convex problem, σ² = 1, N = 4
ALG2_ETA, ALG2_N = 0.25, 4
LEMMA21 = Claim(
    PAPER,
    "Lemma 21",
    "Alg 2 with a constant η ≤ min{1/2, 1/L} and q_t = η/4 (R = ⌈log_{23/24} q_t⌉ cluster "
    "rounds): E‖x_{t+1}^i − x_{t+1}^j‖² ≤ 2σ²η³/N for every t",
)


def alg2_disagreements(seeds: int, rounds: int | None, steps: int) -> np.ndarray:
    """seeds × steps: max_{i,j} ‖x_{t+1}^i − x_{t+1}^j‖² after each iteration's agreement;
    ``rounds`` cluster rounds per agreement (None: derived from q_t = η/4)."""
    out = []
    over: dict[str, Any] = {} if rounds is None else {"rounds": rounds}
    for seed in range(seeds):
        res = run_simulation(
            cfg(
                algorithm="alg2",
                problem={"name": "nonconvex", "dim": 5, "sigma": 1.0},
                processes=8,
                clusters=4,
                quorum=ALG2_N,
                steps=steps,
                seed=seed,
                lr={"eta": ALG2_ETA},
                trace=True,
                sim={"sample_every": 1e9},
                maa=over,
            ),
            record_receives=True,
        )
        if res.status is not Status.FINISHED:
            raise RuntimeError(f"Alg 2 (seed {seed}) ended {res.status.value}")
        if not receive_sets_differ(res, "await", "grad"):
            raise RuntimeError("every process averaged the same gradients: nothing to agree on")
        groups = rounds_by(res, inner=False)
        last = res.config.agreement_rounds()[0] + 1
        out.append([diam2(list(groups[(t, last)].values())) for t in range(1, steps + 1)])
    return np.asarray(out)


def alg2_agreement(quick: bool, figures: Path, say: Callable[[str], None]) -> Outcome:
    """Alg 2's disagreement after each iteration against Lemma 21's bound, with the derived
    number of agreement rounds and with fewer."""
    seeds, steps = (3, 8) if quick else (10, 32)
    bound = 2 * 1.0 * ALG2_ETA**3 / ALG2_N
    derived, inner = cfg(
        algorithm="alg2", processes=8, clusters=4, quorum=ALG2_N, lr={"eta": ALG2_ETA}
    ).agreement_rounds()
    counts = (0, 1, 2, 3, 5, 8) if quick else (0, 1, 2, 3, 4, 5, 6, 8, 10, 13)
    checks: list[Check] = []
    worst: dict[int, list[float]] = {}
    for r in (*counts, None):
        label = f"{derived} (derived)" if r is None else str(r)
        say(f"{label} cluster rounds: {seeds} seeds × {steps} iterations")
        per_seed = [float(v) for v in alg2_disagreements(seeds, r, steps).max(axis=1)]
        worst[derived if r is None else r] = per_seed
        measured = Interval.over(per_seed)
        if r is None:
            checks.append(
                Check(
                    f"largest disagreement over {steps} iterations, R = {derived} (derived)",
                    measured,
                    LEMMA21,
                    "at_most",
                    bound,
                )
            )
        else:
            checks.append(
                Check(
                    f"the same, R = {r}" + (" (agreement off)" if r == 0 else ""),
                    measured,
                    Claim(PAPER, "Lemma 21 with R < derived", "the lemma assumes the derived R"),
                    "none",
                    note=f"measured/bound {measured.mean / bound:.3g}",
                )
            )
    # the fewest rounds tried whose whole interval lies under the bound
    enough = next((r for r in counts if at_most(Interval.over(worst[r]).high, bound)), None)
    exact = max(worst[derived]) == 0.0
    fig, (ax,) = new_figure()
    xs = [*counts, derived]
    means = [float(np.mean(worst[r])) for r in xs]
    ax.semilogy(xs, [max(m, 1e-33) for m in means], "o-", label="measured (0 drawn at 1e-33)")
    ax.axhline(bound, color="tab:red", ls="--", label="Lemma 21: 2σ²η³/N")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("cluster rounds R per agreement (the last point: derived)")
    ax.set_ylabel("E max_t max_{i,j} ‖x^i − x^j‖²")
    ax.set_title(f"Alg 2, n = 8, m = 4, N = 4, η = {ALG2_ETA}, d = 5", fontsize=10)
    ax.legend(fontsize=8)
    shown = [save_figure(fig, figures, "alg2-agreement")]
    return Outcome(
        name="alg2-agreement",
        title="Alg 2: disagreement against the agreement rounds (Lemma 21)",
        paper=PAPER,
        setup=(
            "Alg 2 in the simulator on the smooth non-convex Q(x) = Σ_k φ(x_k − c_k), "
            "φ(u) = u²/(1+u²) (L = 2), d = 5, gradient noise σ² = 1; n = 8 processes in m = 4 "
            f"clusters, N = {ALG2_N}, constant η = {ALG2_ETA} ≤ min{{1/2, 1/L}}, {steps} "
            f"iterations, {seeds} seeds. The derived count is R = ⌈log_{{23/24}}(η/4)⌉ = "
            f"{derived} cluster rounds (each of {inner} shared-memory rounds); the runs with fewer "
            "set "
            "`maa.rounds`. Measured per seed: the largest squared distance between two "
            "processes' models after any iteration's agreement — the lemma bounds its "
            "expectation at every t, so holding the largest to it is the stronger check."
        ),
        checks=tuple(checks),
        figures=tuple(shown),
        findings=(
            "**What the numbers say.** "
            + (
                "With the derived number of rounds the processes agree exactly — the "
                "disagreement is 0 in floating point in every run, so the bound holds trivially "
                "and proves little. "
                if exact
                else "With the derived number of rounds the disagreement is "
                f"{checks[-1].ratio or 0:.2g} of the bound. "
            )
            + "The rows with fewer rounds show where it bites: with the agreement off the "
            f"disagreement is {np.mean(worst[0]) / bound:.2g}× the bound; "
            + (
                f"the fewest rounds tried whose whole interval lies under it is R = {enough}, "
                if enough is not None
                else "none of the reduced counts brings the whole interval under it, "
            )
            + f"where the lemma's worst-case contraction (23/24 a round) asks for {derived}: "
            "the derived count is for the worst schedule, and the agreement experiment "
            "measures how much a round contracts under these random delays."
        ),
    )


# --- Thm 5: a partition of the clusters into halves ------------------------------------------

THM5 = Claim(
    PAPER,
    "Thm 5",
    "with only ⌊m/2⌋ clusters able to communicate, no algorithm implements SGD on a split "
    "non-convex Q: the halves can settle in different minima",
)
ALG3_MAJORITY = Claim(
    PAPER,
    "Section 4.1",
    "Alg 3 needs ⌊m/2⌋ + 1 clusters, each with a live process: with fewer reachable, Alg 2 "
    "waits (and must not go on)",
)


#: the double well's minimisers are ±WELL (≈ 0.9575)
WELL = round(DoubleWell().minimizers[1], 4)


#: Thm 5's cut: four clusters of two processes, clusters {0, 1} and {2, 3} apart for good
CUT: dict[str, Any] = {"partitions": [{"groups": [[0, 1], [2, 3]]}]}


def alg1_across_cut(seed: int) -> RunConfig:
    """Alg 1 (N = a half's processes) on the double well across :data:`CUT`, 300 iterations."""
    return cfg(
        algorithm="alg1",
        problem={"name": "double_well", "sigma": 0.5},
        processes=8,
        clusters=4,
        quorum=4,
        steps=300,
        seed=seed,
        lr={"schedule": "inverse_time", "beta": 3.0, "gamma": 5.0},
        sim=CUT,
    )


def alg2_across_cut(seed: int) -> RunConfig:
    """Alg 2 across :data:`CUT`: its majority of clusters is out of reach, so it blocks."""
    return cfg(
        algorithm="alg2",
        problem={"name": "double_well"},
        processes=8,
        clusters=4,
        quorum=4,
        steps=5,
        seed=seed,
        maa={"rounds": 2, "inner_rounds": 2},
        sim=CUT,
    )


def partition(quick: bool, figures: Path, say: Callable[[str], None]) -> Outcome:
    """Thm 5 on the double well: the clusters cut into two halves for good."""
    seeds = 8 if quick else 40
    say(f"Alg 1 (N = a half), 300 iterations, {seeds} seeds")
    gaps, wells = [], []
    spread = off_well = 0.0
    for seed in range(seeds):
        res = run_simulation(alg1_across_cut(seed))
        if res.status is not Status.FINISHED:
            raise RuntimeError(f"Alg 1 across the cut (seed {seed}) ended {res.status.value}")
        halves = [
            [float(p.x[0]) for p in res.processes if p.cluster in g and p.x is not None]
            for g in ([0, 1], [2, 3])
        ]
        wells.append((float(np.mean(halves[0])), float(np.mean(halves[1]))))
        gaps.append((wells[-1][0] - wells[-1][1]) ** 2)
        # how far a model is from its half's mean, and a half's mean from the nearer well
        spread = max(
            spread, *(abs(x - m) for half, m in zip(halves, wells[-1], strict=True) for x in half)
        )
        off_well = max(off_well, *(abs(abs(m) - WELL) for m in wells[-1]))
    split = sum(1 for a, b in wells if a * b < 0)
    say(f"Alg 2 across the same cut, {seeds} seeds")
    blocked = 0
    for seed in range(seeds):
        res = run_simulation(alg2_across_cut(seed))
        blocked += res.status is Status.BLOCKED and all(
            b.unit == "clusters" and b.have == 2 for b in res.outcome.blocked
        )
    checks = (
        Check(
            f"runs whose halves ended in opposite wells, of {seeds}",
            Interval.exact(split),
            THM5,
            "none",
            note="no internal convergence in those",
        ),
        Check(
            "largest squared gap between the halves' models",
            Interval.exact(max(gaps)),
            THM5,
            "none",
            note=f"the wells are at ±{WELL}: (2·{WELL})² = {(2 * WELL) ** 2:.2f}",
        ),
        Check(
            f"share of Alg 2 runs blocked waiting for a third cluster, of {seeds}",
            Interval.exact(blocked / seeds),
            ALG3_MAJORITY,
            "equals",
            1.0,
        ),
    )
    fig, (ax,) = new_figure()
    ax.scatter([a for a, _ in wells], [b for _, b in wells], s=18)
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xlabel("clusters 0, 1: final x")
    ax.set_ylabel("clusters 2, 3: final x")
    ax.set_title(f"Alg 1 across a cut, {seeds} seeds: each half settles in a well", fontsize=10)
    shown = [save_figure(fig, figures, "partition")]
    return Outcome(
        name="partition",
        title="A partition into halves (Thm 5)",
        paper=PAPER,
        setup=(
            "The double well Q(x) = −exp(−(x−1)²) − exp(−(x+1)²) on ℝ, started at its local "
            f"maximum 0, minima at ±{WELL}, gradient noise σ = 0.5 (sequential SGD ends in "
            "either well with probability ½); n = 8 processes in m = 4 clusters cut into "
            "{0, 1} and "
            "{2, 3} for the whole run. Alg 1 with N = 4 (each half's size: it goes on inside "
            f"each half), η_t = 3/(5 + t), 300 iterations, {seeds} seeds; Alg 2 with N = 4 "
            "across the same cut, 5 iterations, 2 agreement rounds."
        ),
        checks=checks,
        figures=tuple(shown),
        findings=(
            "**What the numbers say.** Inside each half Alg 1's models ended within "
            f"{spread:.2g} of their half's mean, and each half's mean within {off_well:.2g} of "
            f"a well (±{WELL}). Across the cut nothing ties the halves together, and in {split} "
            f"of {seeds} runs they settled in opposite wells"
            + (
                ": no internal convergence there, as Thm 5 says no algorithm can promise here. "
                if split
                else " — none here, which these runs do not promise either. "
            )
            + "The theorem is an impossibility, so it has no bound to measure against: the "
            "runs show how it plays out. Alg 2, whose agreement needs a majority of clusters, "
            + (
                "does not go on: every run ended blocked, each process waiting for a third "
                "cluster — the simulator says so instead of letting the halves drift apart."
                if blocked == seeds
                else f"ended blocked in only {blocked} of {seeds} runs: see the failed row."
            )
        ),
    )


# --- Alg 2: the gradient norm against Lemma 22 (Thm 4) ----------------------------------------

LEMMA22 = Claim(
    PAPER,
    "Lemma 22 (Thm 4)",
    "T ≥ max{16L²N, 4N}, η = √(N/T), q_t = η/4: min_{t ∈ [T+1]} E‖∇Q(x_t^i)‖² ≤ "
    "4(Q(x_1) − Q*)/√(NT) + 20σ²L/√(NT) + 16σ²/√(NT)",
)
LEMMA22_POWER = Claim(
    "this report",
    "Lemma 22's instance",
    "a run that never descends fails the bound: ‖∇Q(x_1)‖² is above it",
)
#: Lemma 22's instance: Q = Σ_k φ(x_k − c_k) in d = 10, every coordinate started where φ is
#: steepest (|u| = 1/√3), so ‖∇Q(x_1)‖² = d·27/64 is above the bound of both layouts
NONCONVEX_STEEP: dict[str, Any] = {
    "name": "nonconvex",
    "dim": 10,
    "sigma": 1.0,
    "start": 1 / math.sqrt(3),
}


def lemma22_bound(q_gap: float, sigma2: float, lipschitz: float, quorum: int, steps: int) -> float:
    """The right-hand side of Lemma 22."""
    return (4 * q_gap + 20 * sigma2 * lipschitz + 16 * sigma2) / math.sqrt(quorum * steps)


def alg2_gradients(
    seeds: int, processes: int, clusters: int, quorum: int, steps: int
) -> tuple[np.ndarray, float, float]:
    """seeds × processes × (T + 1): ‖∇Q(x_t^i)‖² for t = 1 … T + 1 (index t − 1) of Alg 2 with
    η = √(N/T) and the derived agreement rounds, T = ``steps``; Q(x_1) − Q*; ‖∇Q(x_1)‖²."""
    out = []
    gap = start = 0.0
    for seed in range(seeds):
        res = run_simulation(
            cfg(
                algorithm="alg2",
                problem=NONCONVEX_STEEP,
                processes=processes,
                clusters=clusters,
                quorum=quorum,
                steps=steps,
                seed=seed,
                lr={"schedule": "sqrt_n_over_t"},
                sim={"sample_every": 1e9},
            ),
            record_reports=("model",),
        )
        if res.status is not Status.FINISHED:
            raise RuntimeError(f"Alg 2 (seed {seed}) ended {res.status.value}")
        problem = res.problem
        assert problem is not None
        x1 = problem.x0()
        gap = problem.loss(x1) - (problem.constants.q_star or 0.0)
        start = float(problem.full_grad(x1) @ problem.full_grad(x1))
        norms: dict[int, list[float]] = {}
        for pid, rep in res.reports:  # each process reports x_1 … x_{T+1}
            if rep.name == "model":
                g = problem.full_grad(rep.value)
                norms.setdefault(pid, []).append(float(g @ g))
        out.append([norms[pid][: steps + 1] for pid in sorted(norms)])
    return np.asarray(out), gap, start


def alg2_gradient(quick: bool, figures: Path, say: Callable[[str], None]) -> Outcome:
    """Alg 2's smallest expected squared gradient norm over the run against Lemma 22, at the
    smallest T the lemma allows, for two N."""
    lipschitz, sigma2 = 2.0, 1.0
    # (n, m, N), each at T = max{16L²N, 4N}; quick: the smaller layout only
    layouts = ((4, 2, 2),) if quick else ((4, 2, 2), (8, 4, 4))
    seeds = 1 if quick else 4  # a seed of the smaller layout takes ≈ 20 s: 82 rounds × 14
    checks: list[Check] = []
    curves: dict[int, np.ndarray] = {}
    runs: list[tuple[int, int]] = []  # (N, T) of each row
    for n, m, quorum in layouts:
        steps = int(max(16 * lipschitz**2 * quorum, 4 * quorum))
        rounds, inner = cfg(
            algorithm="alg2",
            processes=n,
            clusters=m,
            quorum=quorum,
            steps=steps,
            lr={"schedule": "sqrt_n_over_t"},
        ).agreement_rounds()
        say(f"n = {n}, N = {quorum}, T = {steps}, R = {rounds}: {seeds} seeds")
        runs.append((quorum, steps))
        norms, gap, start = alg2_gradients(seeds, n, m, quorum, steps)
        bound = lemma22_bound(gap, sigma2, lipschitz, quorum, steps)
        # at every t the worst process's ‖∇Q‖² (seeds × (T + 1)); its mean over seeds; the t
        # where that is least
        worst_t = norms.max(axis=1)
        expected = worst_t.mean(axis=0)
        best = int(np.argmin(expected))  # index t − 1
        curves[quorum] = expected
        where = f"n = {n}, N = {quorum}, T = {steps}"
        checks += [
            Check(
                f"E max_i ‖∇Q(x_t^i)‖² at its least t (t = {best + 1}), {where}",
                Interval.over(list(worst_t[:, best])),
                LEMMA22,
                "at_most",
                bound,
                note=f"η = {math.sqrt(quorum / steps):.4g}, R = {rounds} × {inner}",
            ),
            Check(
                f"‖∇Q(x_1)‖², {where}",
                Interval.exact(start),
                LEMMA22_POWER,
                "at_least",
                bound,
                note="every process starts there",
            ),
        ]
    fig, (ax,) = new_figure()
    for quorum, expected in curves.items():
        t = range(1, len(expected) + 1)
        ax.semilogy(t, expected, label=f"N = {quorum}, T = {len(expected) - 1}")
    for c in checks:
        if c.claim is LEMMA22 and c.bound is not None:
            ax.axhline(c.bound, ls="--", color="gray")
    ax.set_xlabel("iteration t")
    ax.set_ylabel("E max_i ‖∇Q(x_t^i)‖² (dashed: Lemma 22)")
    ax.set_title("Alg 2 on the smooth non-convex Q, d = 10, σ² = 1", fontsize=10)
    ax.legend(fontsize=8)
    shown = [save_figure(fig, figures, "alg2-gradient")]
    judged = [c for c in checks if c.claim is LEMMA22]
    ratios = [c.ratio for c in judged if c.ratio is not None]
    # the measured value over the bound's noise terms alone
    floors = [
        c.measured.mean * math.sqrt(quorum * steps) / (20 * sigma2 * lipschitz + 16 * sigma2)
        for c, (quorum, steps) in zip(judged, runs, strict=True)
    ]
    return Outcome(
        name="alg2-gradient",
        title="Alg 2: the gradient norm against Lemma 22",
        paper=PAPER,
        setup=(
            "Alg 2 in the simulator on Q(x) = Σ_k φ(x_k − c_k), φ(u) = u²/(1+u²) (L = 2, "
            "Q* = 0), d = 10, gradient noise of total variance σ² = 1, every coordinate started "
            "at |x − c| = 1/√3, where φ is steepest — so ‖∇Q(x_1)‖² is above the bound and a "
            "run that never descended would fail it; at the smallest T the lemma allows, "
            "T = max{16L²N, 4N}, with η = √(N/T) and the agreement rounds derived from "
            f"q = η/4; {seeds} seed(s) per layout. Measured: at every t the largest "
            "‖∇Q(x_t^i)‖² over the processes, its mean over seeds, and the t where that is "
            "least (chosen on the same runs)."
        ),
        checks=tuple(checks),
        figures=tuple(shown),
        findings=(
            "**What the numbers say.** "
            + (
                "The lemma holds"
                if all(c.verdict == "PASS" for c in judged)
                else "The lemma does not hold everywhere: see the failed rows"
            )
            + " (measured/bound "
            + "–".join(f"{r:.2g}" for r in sorted({min(ratios), max(ratios)}))
            + "), on an instance where it could fail: the start is above the bound. Alg 2 "
            "descends well below it; the least value measured is "
            + ", ".join(f"{f:.2g}" for f in floors)
            + " of the bound's noise terms (20σ²L + 16σ²)/√(NT) alone, so those terms make "
            "the bound loose here, whatever the start."
        ),
    )
