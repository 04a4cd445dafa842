"""Tosi–Theobald's DASGD, measured: iterations to ε as one node slows down (the paper's
Section 5 on its quadratic and its logistic regression), and the staleness of Def. 1–2 against
the paper's statements.

The simulator runs the paper's strict Algorithm 1 (a node applies a received gradient when one
is ready, else computes one; it cannot apply while it computes). Every compute takes 1 (the
slowed node's x) and applying takes no time — the paper adds 0.05 s to each gradient so that
computing costs far more than applying; messages take 0.05; σ = 0.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peerlearn.algorithms.staleness import apply_log, summarize, version_vectors
from peerlearn.config import RunConfig, load_config
from peerlearn.problems import make_problem
from peerlearn.reproduce.claims import Check, Claim, Interval, Outcome
from peerlearn.reproduce.report import new_figure, save_figure
from peerlearn.sim import SimResult, Status, run_simulation

__all__ = ["dasgd_slowdown", "dasgd_staleness"]

PAPER = "Tosi–Theobald"
#: the paper's quadratic (Section 5) is f = ½‖Ax − b‖² with A's eigenvalues in [1, 2]: this one's
#: Hessian has its eigenvalues spread over [1, 4] alike (μ = 1, L = 4, f* = 0), σ = 0
L_QUAD = 4.0
QUADRATIC: dict[str, Any] = {"name": "quadratic", "sigma": 0.0, "mu": 1.0, "L": L_QUAD}
#: the paper's logistic regression (Section 5): 100 Gaussian points in ℝ²⁰, random ±1 labels
LOGISTIC: dict[str, Any] = {"name": "gaussian_logistic", "dim": 20, "samples": 100}
#: every compute takes 1 (far more than an apply, which takes none), every message 0.05
CONSTANT: dict[str, Any] = {"dist": "constant", "mean": 1.0}
LATENCY: dict[str, Any] = {"dist": "constant", "mean": 0.05}
#: compute times drawn from an exponential distribution of mean 1: no two nodes in step
EXPONENTIAL: dict[str, Any] = {"dist": "exponential", "mean": 1.0}
ETA, EPSILON, WINDOW = 0.002, 1e-12, 30


def dasgd_config(
    n: int,
    steps: int,
    *,
    eta: float = ETA,
    slowdown: float = 1.0,
    topology: str = "complete",
    compute: dict[str, Any] = CONSTANT,
    delay: dict[str, Any] = LATENCY,
    spread: float = 0.0,
    problem: dict[str, Any] = QUADRATIC,
    seed: int = 0,
    crashes: tuple[str, ...] = (),
    sample_every: float = 1.0,
) -> RunConfig:
    """n nodes, ``steps`` own gradients each; compute and ``delay`` distributions (one node's
    compute × ``slowdown`` when it is over 1), no spread over links by default; metric samples
    every ``sample_every`` of virtual time."""
    return load_config(
        overrides={
            "algorithm": "dasgd",
            "processes": n,
            "clusters": n,
            "steps": steps,
            "seed": seed,
            "topology": topology,
            "lr": {"eta": eta},
            "problem": problem,
            "sim": {
                "stragglers": 1 if slowdown > 1 else 0,
                "slowdown": slowdown,
                "compute": compute,
                "delay_remote": delay,
                "delay_local": delay,
                "link_spread": spread,
                "crashes": list(crashes),
                "sample_every": sample_every,
            },
        }
    )


def _run(config: RunConfig, reports: tuple[str, ...]) -> SimResult:
    res = run_simulation(config, record_reports=reports)
    if res.status is not Status.FINISHED:
        raise RuntimeError(f"DASGD ({config.processes} nodes) ended {res.status.value}")
    return res


def iterations_to_epsilon(res: SimResult, epsilon: float = EPSILON) -> dict[int, int | None]:
    """Per node: the first local step t at which the mean of ‖∇f(x_i)‖ over its last
    ``WINDOW`` steps is ≤ ``epsilon`` (the paper's stopping rule), None if never."""
    assert res.problem is not None
    models: dict[int, list[np.ndarray]] = {}
    for pid, rep in res.reports:
        if rep.name == "model":
            models.setdefault(pid, []).append(rep.value)
    out: dict[int, int | None] = {}
    for pid, xs in models.items():
        norms = np.array([float(np.linalg.norm(res.problem.full_grad(x))) for x in xs])
        mean = np.convolve(norms, np.ones(WINDOW) / WINDOW, mode="valid")
        hit = np.flatnonzero(mean <= epsilon)
        out[pid] = int(hit[0]) + WINDOW - 1 if hit.size else None
    return out


def serial_iterations(
    problem: dict[str, Any] = QUADRATIC, eta: float = ETA, epsilon: float = EPSILON
) -> int:
    """Serial gradient descent on the same problem, same η, same stopping rule."""
    params = dict(problem)
    prob = make_problem(params.pop("name"), **params)
    x = prob.x0()
    norms: list[float] = []
    for t in range(2_000_000):
        g = prob.full_grad(x)
        norms.append(float(np.linalg.norm(g)))
        if t + 1 >= WINDOW and np.mean(norms[-WINDOW:]) <= epsilon:
            return t
        x = x - eta * g
    raise RuntimeError("serial gradient descent did not reach ε")


#: own gradients per node, as a multiple of the faster node's share of serial gradient
#: descent's steps: the faster node must not run out before ε, or the run's end is serial
OWN = 1.25


def _later_node(
    problem: dict[str, Any], x: int, serial: int, eta: float, epsilon: float
) -> tuple[int, SimResult]:
    """Two nodes, one ×``x``: the later node's local steps to ε (and the run). Each node gets
    enough own gradients that the faster could take it to ε at serial's pace with ``OWN`` to
    spare, and the run is checked to have both nodes computing still when ε is reached — a
    node out of gradients would leave the other alone, computing fresh gradients serially."""
    steps = math.ceil(OWN * serial * x / (x + 1)) + 2 * WINDOW
    # no metric samples: they come every unit of virtual time, and a node x times slower makes
    # the run's virtual time long (at ×100 sampling took most of the run's time)
    config = dasgd_config(2, steps, slowdown=x, eta=eta, problem=problem, sample_every=1e12)
    res = _run(config, ("model", "staleness"))
    hits = iterations_to_epsilon(res, epsilon)
    if any(h is None for h in hits.values()):
        raise RuntimeError(
            f"×{x}: a node did not reach ε while both computed ({steps} own gradients each, "
            f"{OWN}× the faster node's share of serial gradient descent's {serial} steps)"
        )
    later, hit = max(((pid, h) for pid, h in hits.items() if h is not None), key=lambda ph: ph[1])
    # how many of each origin's gradients the later node had applied when it reached ε
    applied = Counter(
        rep.key[0]
        for pid, rep in res.reports
        if pid == later and rep.name == "staleness" and rep.step <= hit + 1
    )
    if max(applied.values()) >= steps - 1:
        raise RuntimeError(
            f"×{x}: a node had used up its {steps} own gradients before ε was reached: the "
            "run's end was serial, not asynchronous"
        )
    return hit, res


def dasgd_slowdown(quick: bool, figures: Path, say: Callable[[str], None]) -> Outcome:
    """Section 5's two-node runs, iterations to ε against the slowdown: on the quadratic
    (Fig. 2a, deterministic: one run each) and on the logistic regression (Fig. 2b, a data
    draw per seed)."""
    slowdowns = (1, 10) if quick else (1, 10, 50, 100)
    serial = serial_iterations()
    checks: list[Check] = []
    claim = Claim(
        PAPER,
        "Section 5 (Fig. 2a, 2b)",
        "no significant impact of Ŝ_max on the number of iterations necessary to reach ε "
        "(two nodes, one x times slower; η = 0.002, ε = 1e-12 on the mean gradient norm of "
        "the last 30 iterations)",
    )
    found: dict[int, int] = {}
    smax: dict[int, int] = {}
    savg: dict[int, float] = {}
    fresh: dict[int, float] = {}  # the share of steps that applied a gradient with |S| ≤ 1
    for x in slowdowns:
        say(f"quadratic, two nodes, one ×{x}")
        found[x], res = _later_node(QUADRATIC, x, serial, ETA, EPSILON)
        # the steps up to ε: after it the run goes on (the slower node's own gradients)
        until = {pid: sizes[: found[x]] for pid, sizes in res.staleness.items()}
        savg[x], smax[x] = summarize(until)
        sizes = [v for node in until.values() for v in node]
        fresh[x] = sum(v <= 1 for v in sizes) / len(sizes)
        checks.append(
            Check(
                f"quadratic: local steps to ε, slowdown ×{x} (S_max = {smax[x]})",
                Interval.exact(found[x]),
                claim,
                "none",
                note=f"{found[x] / serial:.3f}× serial gradient descent's {serial}",
            )
        )
    logistic = _logistic_slowdown(quick, claim, say)
    checks.extend(logistic.checks)
    fig, (ax, bx) = new_figure(2)
    ax.plot(list(found), list(found.values()), "o-", label="DASGD, the later of the two nodes")
    ax.axhline(serial, color="gray", ls="--", label="serial gradient descent")
    ax.set_xscale("log")
    ax.set_xlabel("slowdown x of one node")
    ax.set_ylabel(f"local steps until the mean ‖∇f‖ of {WINDOW} ≤ {EPSILON:g}")
    ax.set_ylim(0, max(found.values()) * 1.2)
    ax.set_title("the paper's quadratic (σ = 0)", fontsize=10)
    ax.legend(fontsize=8)
    xs = list(logistic.ratio)
    bx.errorbar(
        xs,
        [logistic.ratio[x].mean for x in xs],
        yerr=[
            [logistic.ratio[x].mean - logistic.ratio[x].low for x in xs],
            [logistic.ratio[x].high - logistic.ratio[x].mean for x in xs],
        ],
        fmt="o-",
        capsize=3,
        label="DASGD, the later node"
        + (f" (95 % interval, {logistic.seeds} seeds)" if logistic.seeds > 1 else " (one seed)"),
    )
    bx.axhline(1.0, color="gray", ls="--", label="serial gradient descent")
    bx.set_xscale("log")
    bx.set_xlabel("slowdown x of one node")
    bx.set_ylabel("local steps to ε / serial gradient descent's")
    bx.set_ylim(0, 1.5)
    bx.set_title(
        f"logistic regression, d = 20, m = 100 (η = {logistic.eta}, ε = {logistic.epsilon:g})",
        fontsize=10,
    )
    bx.legend(fontsize=8)
    shown = [save_figure(fig, figures, "dasgd-slowdown")]
    spread = max(found.values()) / min(found.values()) - 1
    return Outcome(
        name="dasgd-slowdown",
        title="DASGD: iterations to ε as one node slows down (Section 5)",
        paper=PAPER,
        setup=(
            "DASGD in the simulator, n = 2 nodes, full gradients (σ = 0), from x⁰ = 0; one "
            "node's compute takes x (the other's 1), messages 0.05. Iterations to ε: the first "
            "local step (every applied gradient counts) at which the mean ‖∇f‖ over the last "
            f"{WINDOW} steps is ≤ ε — the paper's rule — for the later of the two nodes; serial "
            "gradient descent with the same η and rule beside it. Each node has own gradients "
            f"enough for {OWN}× the faster node's share of serial's steps, and every run is "
            "checked to reach ε while both nodes still compute (a node that ran out would "
            "leave the other computing alone: serial). **Quadratic** (Fig. 2a): d = "
            "10, the Hessian's eigenvalues spread over [1, 4] — as the paper's f = ½‖Ax − b‖² "
            f"with A's in [1, 2]: μ = 1, L = 4, f* = 0 — η = {ETA}, ε = {EPSILON:g}; the runs "
            "are deterministic (constant timing): one run each. **Logistic regression** (Fig. "
            "2b): f(x) = (1/m) Σ log(1 + exp(−b_j a_jᵀx)), a_j ~ N(0, I₂₀), m = 100, labels "
            "b_j uniform in {−1, +1} — one draw per seed (L ≈ 0.5) — "
            f"η = {logistic.eta}, ε = {logistic.epsilon:g}"
            + (
                " (the paper's are 0.002 and 1e-12: about 200k steps a run, the full run's)"
                if quick
                else ""
            )
            + f", slowdowns ×{', ×'.join(map(str, logistic.ratio))}, "
            + _count(logistic.seeds, "seed")
            + "; "
            "the measured quantity is the ratio to serial gradient descent on the same draw."
        ),
        checks=tuple(checks),
        figures=tuple(shown),
        findings=(
            "**What the numbers say.** "
            + (
                "On the quadratic, as the paper reports, staleness leaves the iterations to ε "
                "where they were: "
                if spread < 0.05
                else "On the quadratic, unlike the paper's report, staleness changes the "
                "iterations to ε: "
            )
            + f"from ×{slowdowns[0]} to ×{slowdowns[-1]} slowdown (S_max "
            f"{smax[slowdowns[0]]} to {smax[slowdowns[-1]]}) they differ by {spread:.1%}, and "
            f"they sit within {max(abs(v / serial - 1) for v in found.values()):.1%} of serial "
            "gradient descent's. "
            + logistic.finding
            + " The paper states it qualitatively, so these rows carry no verdict. "
            "The share of quadratic steps up to ε that apply a nearly fresh gradient (|S| ≤ 1) is "
            + ", ".join(f"{fresh[x]:.0%} at ×{x}" for x in slowdowns)
            + f" (S_avg {', '.join(f'{v:.2f}' for v in savg.values())})"
            + (
                ": the slower one node, the rarer its stale gradients among all the steps."
                if all(a <= b for a, b in itertools.pairwise(fresh[x] for x in slowdowns))
                else "."
            )
        ),
    )


@dataclass(frozen=True)
class _Logistic:
    """The logistic half of the slowdown experiment."""

    checks: tuple[Check, ...]
    ratio: dict[int, Interval]  # slowdown → local steps to ε / serial GD's, over seeds
    seeds: int
    eta: float
    epsilon: float
    finding: str


def _logistic_slowdown(quick: bool, claim: Claim, say: Callable[[str], None]) -> _Logistic:
    """Fig. 2b: two nodes on the logistic regression, one seed per data draw. Quick runs take
    a larger η and ε (about a tenth of the steps) and one seed."""
    eta, epsilon = (0.01, 1e-6) if quick else (ETA, EPSILON)
    slowdowns = (1, 10) if quick else (1, 10, 100)
    seeds = range(1) if quick else range(4)
    ratios: dict[int, list[float]] = {x: [] for x in slowdowns}
    found: dict[int, list[int]] = {x: [] for x in slowdowns}
    serials: list[int] = []
    for seed in seeds:
        problem = {**LOGISTIC, "seed": seed}
        serial = serial_iterations(problem, eta, epsilon)
        serials.append(serial)
        for x in slowdowns:
            say(f"logistic regression, seed {seed}, two nodes, one ×{x}")
            hit, _ = _later_node(problem, x, serial, eta, epsilon)
            found[x].append(hit)
            ratios[x].append(hit / serial)
    ratio = {x: Interval.over(r) for x, r in ratios.items()}
    checks = tuple(
        Check(
            f"logistic: local steps to ε / serial gradient descent's, slowdown ×{x}",
            ratio[x],
            claim,
            "none",
            note=f"local steps {', '.join(map(str, found[x]))}; serial "
            f"{', '.join(map(str, serials))}",
        )
        for x in slowdowns
    )
    means = [r.mean for r in ratio.values()]
    finding = (
        "On the logistic regression the ratio to serial gradient descent is "
        + ", ".join(f"{ratio[x].mean:.3f} at ×{x}" for x in slowdowns)
        + f" — within {max(means) / min(means) - 1:.2%} of each other"
    )
    # one draw's runs are deterministic, so the intervals over seeds can be narrower than any
    # difference that matters: the spread is judged by its size, as on the quadratic
    finding += (
        ": as the paper reports, staleness does not change them"
        if max(means) / min(means) - 1 < 0.05
        else ": unlike the paper's report, the slowdown changes them"
    ) + (f" ({len(seeds)} seeds)." if len(seeds) > 1 else " (one seed).")
    return _Logistic(checks, ratio, len(seeds), eta, epsilon, finding)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("s" if n != 1 else "")


def one_sided(res: SimResult) -> tuple[int, int]:
    """(max over applied gradients of |G_i^t \\ G_j^s|, of |G_j^s \\ G_i^t|): what the
    receiver had applied that the gradient's snapshot lacked, and the reverse."""
    log = apply_log(res.reports)
    ahead = behind = 0
    for node, rows in log.applies.items():
        for v, row in zip(version_vectors(log, node), rows, strict=True):
            w = log.computes[row.gid]
            ahead = max(ahead, sum(max(0, a - b) for a, b in zip(v, w, strict=True)))
            behind = max(behind, sum(max(0, b - a) for a, b in zip(v, w, strict=True)))
    return ahead, behind


def dasgd_staleness(quick: bool, figures: Path, say: Callable[[str], None]) -> Outcome:
    """S_avg and S_max (Def. 2) against n and topology, and two nodes against the slowdown."""
    ns = (2, 4, 8) if quick else (2, 4, 8, 16)
    heuristic = Claim(
        PAPER,
        "Section 4.1",
        "with equal compute and latency below it: fully connected S_avg = (n+1)/2, S_max = n; "
        "ring S_avg = (n²+1)/2, S_max = n² (a heuristic, not derived)",
    )
    checks: list[Check] = []
    complete: dict[int, tuple[float, int, int, int]] = {}
    logs = ("compute", "staleness")
    for n in ns:
        say(f"complete graph, n = {n}")
        res = _run(dasgd_config(n, 100 if n < 8 else 40), logs)
        s_avg, s_max = summarize(res.staleness)
        ahead, behind = one_sided(res)
        complete[n] = (s_avg, s_max, ahead, behind)
        checks.append(
            Check(
                f"S_max, complete graph, n = {n}",
                Interval.exact(s_max),
                heuristic,
                "none",
                note=f"the heuristic: {n}; 2n − 1 = {2 * n - 1}",
            )
        )
        checks.append(
            Check(
                f"S_avg, complete graph, n = {n}",
                Interval.exact(s_avg),
                heuristic,
                "none",
                note=f"the heuristic: {(n + 1) / 2:g}",
            )
        )
    random: dict[int, tuple[float, int]] = {}
    for n in ns:
        say(f"complete graph, n = {n}, random compute times")
        res = _run(dasgd_config(n, 100 if n < 8 else 40, compute=EXPONENTIAL), logs)
        random[n] = summarize(res.staleness)
        checks.append(
            Check(
                f"S_avg, complete graph, n = {n}, random compute times",
                Interval.exact(random[n][0]),
                heuristic,
                "none",
                note=f"S_max {random[n][1]}; the heuristic: S_avg = {(n + 1) / 2:g}, S_max = {n}",
            )
        )
    ring: dict[tuple[str, float], tuple[float, int]] = {}
    for topology in ("complete", "ring"):
        for latency in (0.05, 1.0):
            if topology == "complete" and latency == 0.05 and 8 in complete:
                ring[topology, latency] = complete[8][:2]  # run above
                continue
            say(f"{topology}, n = 8, latency {latency}")
            delay = {"dist": "constant", "mean": latency}
            res = _run(dasgd_config(8, 40, topology=topology, delay=delay), logs)
            ring[topology, latency] = summarize(res.staleness)
            checks.append(
                Check(
                    f"S_avg, {topology}, n = 8, latency {latency}",
                    Interval.exact(ring[topology, latency][0]),
                    heuristic,
                    "none",
                    note=f"S_max {ring[topology, latency][1]}"
                    + ("; the heuristic: S_avg = 32.5, S_max = 64" if topology == "ring" else ""),
                )
            )
    two: dict[int, tuple[int, int]] = {}
    two_claim = Claim(
        PAPER,
        "Section 5",
        "one of two nodes made x times slower gives an expected Ŝ_max ≈ x",
    )
    for x in (1, 10, 50):
        say(f"two nodes, one ×{x}")
        res = _run(dasgd_config(2, 200, slowdown=x), logs)
        s_max = summarize(res.staleness)[1]
        two[x] = (s_max, one_sided(res)[0])
        checks.append(
            Check(
                f"S_max, two nodes, one ×{x}",
                Interval.exact(s_max),
                two_claim,
                "none",
                note=f"x + 2 = {x + 2}",
            )
        )
    fig, (ax, bx) = new_figure(2)
    ax.plot(ns, [complete[n][1] for n in ns], "o-", label="S_max measured")
    ax.plot(ns, [complete[n][0] for n in ns], "s-", label="S_avg measured")
    ax.plot(ns, list(ns), "--", color="gray", label="the paper: S_max = n")
    ax.plot(ns, [(n + 1) / 2 for n in ns], ":", color="gray", label="the paper: S_avg = (n+1)/2")
    ax.set_xlabel("nodes n (complete graph)")
    ax.set_ylabel("staleness (Def. 2)")
    ax.set_title("equal compute 1, latency 0.05", fontsize=10)
    ax.legend(fontsize=8)
    xs = list(two)
    bx.plot(xs, [two[x][0] for x in xs], "o-", label="S_max measured")
    bx.plot(xs, xs, "--", color="gray", label="the paper: ≈ x")
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("slowdown x of one of two nodes")
    bx.set_title("two nodes", fontsize=10)
    bx.legend(fontsize=8)
    shown = [save_figure(fig, figures, "dasgd-staleness")]
    return Outcome(
        name="dasgd-staleness",
        title="DASGD: staleness against n, topology and slowdown (Def. 1–2)",
        paper=PAPER,
        setup=(
            "DASGD in the simulator on the paper's quadratic, σ = 0, every compute 1 (a slowed "
            "node's x), every message 0.05 unless stated; staleness is Def. 1's tight "
            "S = G_i^t Δ G_j^s from version vectors, S_avg and S_max as Def. 2 (per-node mean "
            "over all steps, then the max; the max over all steps). Complete graphs "
            f"n ∈ {{{', '.join(map(str, ns))}}}; "
            "n = 8 on a complete graph and a ring at latency 0.05 and 1.0; two nodes with one "
            "×1, ×10, ×50; and the complete graphs again with compute times drawn from an "
            "exponential distribution (mean 1, seed 0). One run each."
        ),
        checks=tuple(checks),
        figures=tuple(shown),
        findings=(
            "**What the numbers say.** The paper's staleness figures are heuristics (Section "
            "4.1 says so), so no row has a verdict; where they differ, the runs show why. "
            + _staleness_text(ns, complete, random, two, ring)
        ),
    )


def _staleness_text(
    ns: tuple[int, ...],
    complete: dict[int, tuple[float, int, int, int]],
    random: dict[int, tuple[float, int]],
    two: dict[int, tuple[int, int]],
    ring: dict[tuple[str, float], tuple[float, int]],
) -> str:
    """What the staleness runs show, each sentence as the measurements have it."""
    big = ns[-1]
    twice = all(complete[n][1] == 2 * n - 1 for n in ns)
    one_way = all(a == m and b == 0 for _, m, a, b in complete.values())
    text = (
        "On the complete graph S_max is "
        + ("2n − 1 at every n here, not n" if twice else "not n")
        + f" ({', '.join(f'{complete[n][1]} at n = {n}' for n in ns)}), and S_avg is "
        + ", ".join(f"{complete[n][0]:.2f}" for n in ns)
        + " against the heuristic's "
        + ", ".join(f"{(n + 1) / 2:g}" for n in ns)
        + ". "
    )
    if one_way:
        text += (
            "It is not the symmetric difference in Def. 1: counted one way only — what the "
            "receiver had applied that the gradient's snapshot lacked — the largest is the "
            "same at every n, and the other way it is 0. "
        )
        if twice:
            text += (
                "It is the timing model: a node of Algorithm 1 cannot apply while it computes, "
                "so with equal compute times every node starts its next gradient just before "
                "the others' arrive, and a gradient's snapshot misses a whole round: by the time "
                "it is applied the receiver has taken about two rounds of gradients. "
            )
    else:
        text += (
            f"Counted one way (what the receiver had that the snapshot lacked) the largest at "
            f"n = {big} is {complete[big][2]}, the other way {complete[big][3]}. "
        )
    text += (
        "The timing decides it, as the paper's word heuristic warns: with compute times drawn "
        "at random (exponential, mean 1) S_avg is "
        + ", ".join(f"{random[n][0]:.2f}" for n in ns)
        + " and S_max "
        + ", ".join(str(random[n][1]) for n in ns)
        + " for the same n: the average "
        + ("lower" if all(random[n][0] < complete[n][0] for n in ns) else "moved")
        + ", the maximum "
        + ("higher. " if all(random[n][1] > complete[n][1] for n in ns) else "moved. ")
    )
    if all(s == x + 2 and a == s for x, (s, a) in two.items()):
        text += (
            "Two nodes with one ×x give S_max = x + 2, not x, every one of them on the "
            "receiver's side: the fast gradient still on its way when the slow node took its "
            "snapshot (both finish a compute at the same instant), the x the fast node "
            "computes during one slow compute, and the one it is computing when the slow "
            "gradient arrives (no preemption). "
        )
    else:
        text += (
            "Two nodes with one ×x give S_max "
            + ", ".join(f"{s} at ×{x}" for x, (s, _) in two.items())
            + ". "
        )
    gaps = {lat: ring["ring", lat][0] - ring["complete", lat][0] for lat in (0.05, 1.0)}
    if all(g > 0 for g in gaps.values()):
        text += (
            "On a ring, relaying adds hops: S_avg exceeds the complete graph's"
            + (", more so as latency grows" if gaps[1.0] > gaps[0.05] else "")
            + f" ({ring['ring', 0.05][0]:.1f} against {ring['complete', 0.05][0]:.1f} at "
            f"latency 0.05, {ring['ring', 1.0][0]:.1f} against {ring['complete', 1.0][0]:.1f} "
            "at 1.0)"
            + (
                ", and S_max stays under the heuristic's n² = 64."
                if max(ring["ring", lat][1] for lat in (0.05, 1.0)) < 64
                else "."
            )
        )
    return text
