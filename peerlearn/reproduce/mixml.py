"""MixML, measured: t_mix against n for every protocol (Fig. 3), against the paper's formula
where it gives one; and training as t_mix grows (Fig. 2, scaled down to the digits).

A deterministic protocol's t_mix is computed exactly (every start at once: the operator norm
of the window's product on the consensus complement); a random one's is sampled, each run's
window from t = 0, and the interval is over runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peerlearn.analysis.mixing import build_protocol
from peerlearn.config import RunConfig, load_config
from peerlearn.reproduce.claims import Check, Claim, Interval, Outcome
from peerlearn.reproduce.report import new_figure, save_figure
from peerlearn.sim import Status, run_simulation

__all__ = ["mixing_time", "mixml_convergence"]

PAPER = "MixML"

#: protocol, its parameters, what the paper says its t_mix is
LINES: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("allreduce", {}, "t_mix = n"),
    ("local_steps", {}, "t_mix = m·n"),
    ("reduced_frequency", {}, "t_mix = m·n"),
    ("slack", {}, "t_mix = n·⌈ln 2/−ln(1 − γ)⌉"),
    ("sync_gossip", {}, "t_mix = n·⌈ln 2/−ln|λ₂(W)|⌉"),
    ("async_ps", {"scheduling": "round_robin"}, "t_mix = n"),
    ("async_ps", {"scheduling": "random"}, "E t_mix = n·H_n (coupon collector)"),
    ("async_gossip", {}, "no closed form (Fig. 3 plots it)"),
)


def _label(name: str, params: dict[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k not in ("weights", "topology", "seed")}
    inner = ", ".join(
        f"{'γ' if k == 'gamma' else 'm' if k == 'period' else k} = {v}" for k, v in shown.items()
    )
    where = ", ring" if name.endswith("gossip") else ""
    return f"{name}{where}" + (f" ({inner})" if inner else "")


def mixing_time(quick: bool, figures: Path, say: Callable[[str], None]) -> Outcome:
    """t_mix of every protocol against n, each against its formula."""
    ns = (4, 8, 16) if quick else (4, 8, 16, 32)
    runs = 200 if quick else 1000
    checks: list[Check] = []
    curves: dict[str, tuple[list[int], list[float], list[float], list[float]]] = {}
    for name, params, formula in LINES:
        label = _label(name, build_protocol(name, ns[0], seed=0, **params).params)
        say(f"{label}: n = {', '.join(map(str, ns))}")
        xs: list[int] = []
        means: list[float] = []
        lows: list[float] = []
        highs: list[float] = []
        for n in ns:
            proto = build_protocol(name, n, seed=0, **params)
            if proto.random:
                values = proto.sample_tmix(runs, 0).values
                got = Interval.over([float(v) for v in values], unit="runs")
            else:
                got = Interval.exact(float(proto.exact_tmix()))
            xs.append(n)
            means.append(got.mean)
            lows.append(got.low)
            highs.append(got.high)
            claim = Claim(PAPER, f"t_mix of {label}", formula)
            what = f"t_mix, {label}, n = {n}"
            if proto.closed_form is None:
                checks.append(Check(what, got, claim, "none", note=f"{runs} runs from t = 0"))
            else:
                checks.append(
                    Check(
                        what,
                        got,
                        claim,
                        "equals",
                        float(proto.closed_form),
                        note=f"{runs} runs from t = 0" if proto.random else "exact",
                    )
                )
        curves[label] = (xs, means, lows, highs)
    fig, (ax,) = new_figure(width=7.5, height=5.0)
    markers = "osD^vPX*"
    for k, (label, (xs, means, lows, highs)) in enumerate(curves.items()):
        err = [
            [m - lo for m, lo in zip(means, lows, strict=True)],
            [hi - m for m, hi in zip(means, highs, strict=True)],
        ]
        ax.errorbar(
            xs,
            means,
            yerr=err,
            marker=markers[k % len(markers)],
            ms=8 - k % 4,
            capsize=2,
            label=label,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(ns), [str(n) for n in ns])
    ax.set_xlabel("workers n")
    ax.set_ylabel("t_mix (computation events)")
    ax.set_title(
        "Fig. 3: mixing time against n (random protocols: mean and 95 % interval)", fontsize=10
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    shown = [save_figure(fig, figures, "mixml-tmix")]
    gossip = next(means for label, (_, means, _, _) in curves.items() if "async_gossip" in label)
    growth = ", ".join(f"×{b / a:.1f}" for a, b in itertools.pairwise(gossip))
    return Outcome(
        name="mixml-tmix",
        title="MixML: mixing time against n (Fig. 3)",
        paper=PAPER,
        setup=(
            f"Every protocol of the paper on n ∈ {{{', '.join(map(str, ns))}}} workers "
            "(`peerlearn mixing`'s code): t_mix is the least window after which the "
            "communication halves ‖X − M_∞X‖ for every start X (Assumption 2), counted in "
            "computation events. Deterministic protocols exactly; random ones (async gossip, "
            f"the parameter server with random scheduling) over {runs} sampled schedules, each "
            "window from t = 0. Each algorithm's defaults (m, γ as labelled); gossip on a ring, "
            "synchronous gossip with Metropolis weights (1/3)."
        ),
        checks=tuple(checks),
        figures=tuple(shown),
        findings=(
            "**What the numbers say.** "
            + (
                "Every deterministic protocol's t_mix equals the paper's formula, computed over "
                "every start at once; the random parameter server's sampled mean holds the "
                "coupon collector's n·H_n in its interval. "
                if all(c.verdict == "PASS" for c in checks if c.relation == "equals")
                else "Not every protocol's t_mix matches the paper's formula: see the failed rows. "
            )
            + "Asynchronous gossip on a "
            "ring, which the paper plots without a formula, grows "
            + (
                f"faster than n² ({growth} per doubling of n): "
                if all(b > 4 * a for a, b in itertools.pairwise(gossip))
                else f"by {growth} per doubling of n: "
            )
            + f"{', '.join(f'{m:.1f}' for m in gossip)} for n = {', '.join(map(str, ns))}. "
            "This project counts a window whose norm is exactly ½ as halved."
        ),
    )


#: Fig. 2's base protocol and its two ways to a k times larger t_mix, n = 8 workers
WORKERS = 8
FIG2_ETA = 0.1


def _slack_gamma(k: int) -> float:
    """The γ whose slack matrix mixes in k·n events: n·⌈ln 2/−ln(1 − γ)⌉ = k·n (a hair over
    1 − 2^(−1/k), so that rounding cannot push the ceiling to k + 1)."""
    gamma = 1.0 - math.pow(2.0, -1.0 / k) * (1.0 - 1e-9)
    t_mix = build_protocol("slack", WORKERS, seed=0, gamma=gamma).closed_form
    if t_mix != k * WORKERS:
        raise RuntimeError(f"γ = {gamma} mixes in {t_mix} events, not {k * WORKERS}")
    return gamma


@dataclass(frozen=True)
class _Way:
    """A protocol of Fig. 2: its algorithm, its mix settings for a k-fold t_mix, its line."""

    algorithm: str
    mix: Callable[[int], dict[str, Any]]
    style: str


#: the base (t_mix = n), and the two ways to k·n: averaging every k iterations, or a slack
#: matrix whose γ mixes in k iterations
BASE = _Way("allreduce", lambda k: {}, "-")
REDUCED = _Way("reduced_frequency", lambda k: {"period": k}, "-")
SLACK = _Way("slack", lambda k: {"gamma": _slack_gamma(k)}, "--")
WAYS = (REDUCED, SLACK)


def _fig2_config(
    algorithm: str, mix: dict[str, Any], steps: int, seed: int, dtype: str
) -> RunConfig:
    return load_config(
        overrides={
            "algorithm": algorithm,
            "processes": WORKERS,
            "clusters": WORKERS,
            "steps": steps,
            "seed": seed,
            "lr": {"eta": FIG2_ETA},
            "problem": {"name": "mlp", "batch_size": 8},
            "mix": mix,
            "dtype": dtype,
            "sim": {"sample_every": steps / 50},
        }
    )


@dataclass(frozen=True)
class _Curve:
    """One protocol's run, per metric sample after the start: the workers' mean step, their
    mean training loss, and the stationary distance."""

    steps: list[float]
    loss: list[float]
    distance: list[float]

    def late_loss(self, total: int) -> float:
        """The mean training loss over the samples of the run's second half (by steps)."""
        return float(
            np.mean([lo for st, lo in zip(self.steps, self.loss, strict=True) if st >= total / 2])
        )


def _fig2_run(algorithm: str, mix: dict[str, Any], steps: int, seed: int, dtype: str) -> _Curve:
    res = run_simulation(_fig2_config(algorithm, mix, steps, seed, dtype))
    if res.status is not Status.FINISHED:
        raise RuntimeError(f"{algorithm} {mix} (seed {seed}) ended {res.status.value}")
    by_time: dict[float, tuple[list[int], list[float], float]] = {}
    for time, _, step, loss, distance in res.samples:
        if loss is not None:
            row = by_time.setdefault(time, ([], [], distance))
            row[0].append(step)
            row[1].append(loss)
    # virtual time is no common clock here (an AllReduce iteration waits for the slowest of
    # n, a local step does not): the curves are drawn against the workers' mean step; the
    # start (every model x₀, distance 0) is left out
    rows = [by_time[t] for t in sorted(by_time) if np.mean(by_time[t][0]) > 0]
    return _Curve(
        [float(np.mean(r[0])) for r in rows],
        [float(np.mean(r[1])) for r in rows],
        [r[2] for r in rows],
    )


def _fig2_label(name: str, k: int, dtype: str = "float32") -> str:
    what = f"{name}, t_mix = {k * WORKERS} ({k} iteration{'s' if k > 1 else ''})"
    return what + (f", {dtype}" if dtype != "float32" else "")


def mixml_convergence(quick: bool, figures: Path, say: Callable[[str], None]) -> Outcome:
    """Fig. 2 scaled down to the digits: training loss and stationary distance as t_mix grows,
    by reduced frequency and by the slack matrix."""
    steps, ks, seeds = (600, (1, 10, 100), 1) if quick else (3000, (1, 10, 100, 1000), 3)
    claim = Claim(
        PAPER,
        "Section 5, Fig. 2",
        "larger t_mix slows consensus and convergence; reduced frequency is more robust than "
        "the slack matrix, which is unstable at large t_mix (float32 precision)",
    )
    runs: dict[tuple[str, int, str], list[_Curve]] = {}
    cases: list[tuple[_Way, int, str]] = [(BASE, 1, "float32")]
    cases += [(way, k, "float32") for k in ks[1:] for way in WAYS]
    if not quick:
        cases.append((SLACK, ks[-1], "float64"))  # the paper's precision explanation
    for way, k, dtype in cases:
        name, mix = way.algorithm, way.mix(k)
        say(
            f"{_fig2_label(name, k, dtype)}: {seeds} seed{'s' if seeds > 1 else ''} × {steps} steps"
        )
        runs[name, k, dtype] = [_fig2_run(name, mix, steps, s, dtype) for s in range(seeds)]
    checks: list[Check] = []
    distance: dict[tuple[str, int, str], Interval] = {}
    late: dict[tuple[str, int, str], list[float]] = {}
    for (name, k, dtype), curves in runs.items():
        distance[name, k, dtype] = Interval.over([float(np.mean(c.distance)) for c in curves])
        late[name, k, dtype] = [c.late_loss(steps) for c in curves]
        checks.append(
            Check(
                f"stationary distance, mean over the run: {_fig2_label(name, k, dtype)}",
                distance[name, k, dtype],
                claim,
                "none",
            )
        )
        checks.append(
            Check(
                f"training loss, mean over the run's second half: {_fig2_label(name, k, dtype)}",
                Interval.over(late[name, k, dtype]),
                claim,
                "none",
            )
        )
    precision: Interval | None = None
    if (SLACK.algorithm, ks[-1], "float64") in late:
        # the same seeds in both precisions: their differences, seed by seed
        wide, narrow = (
            late[SLACK.algorithm, ks[-1], "float64"],
            late[SLACK.algorithm, ks[-1], "float32"],
        )
        pairs = zip(wide, narrow, strict=True)
        precision = Interval.over([a - b for a, b in pairs])
        checks.append(
            Check(
                f"late training loss, float64 − float32, slack matrix, t_mix = {ks[-1] * WORKERS}",
                precision,
                claim,
                "none",
                note="seed by seed",
            )
        )
    fig, (ax, bx) = new_figure(2)
    colors = dict(zip(ks, ("black", "tab:blue", "tab:orange", "tab:red"), strict=False))
    styles = {way.algorithm: way.style for way in (BASE, *WAYS)}
    for (name, k, dtype), curves in runs.items():
        style = styles[name] if dtype == "float32" else ":"
        first = curves[0]  # seed 0 drawn; the table has every seed
        ax.plot(first.steps, first.loss, style, color=colors[k], label=_fig2_label(name, k, dtype))
        bx.plot(
            first.steps, first.distance, style, color=colors[k], label=_fig2_label(name, k, dtype)
        )
    ax.set_xlabel("iterations (the workers' mean step)")
    ax.set_ylabel("training loss (mean over workers)")
    ax.set_yscale("log")
    ax.set_title("Fig. 2 on the digits: MLP, 8 workers (seed 0)", fontsize=10)
    ax.legend(fontsize=7)
    bx.set_xlabel("iterations (the workers' mean step)")
    bx.set_ylabel("stationary distance (1/n) Σ ‖x_i − x̄‖²")
    bx.set_yscale("log")
    bx.set_title("solid: reduced frequency, dashed: slack matrix", fontsize=10)
    shown = [save_figure(fig, figures, "mixml-convergence")]
    return Outcome(
        name="mixml-convergence",
        title="MixML: convergence as t_mix grows (Fig. 2, scaled down to the digits)",
        paper=PAPER,
        setup=(
            f"The simulator, n = {WORKERS} workers, the digits MLP (`mlp`, batch 8, η = "
            f"{FIG2_ETA}), float32 as the paper's GPUs, {steps} iterations, {seeds} "
            f"seed{'s' if seeds > 1 else ''} (the paper: ResNet20 on CIFAR10). The base "
            "protocol is AllReduce (t_mix = n = 8 computation events, one iteration); t_mix "
            "grows k-fold by reduced frequency (averaging every m = k iterations) or by the "
            "slack matrix (1 − γ)I + γJ every iteration with γ = 1 − 2^(−1/k), whose t_mix is "
            "n·⌈ln 2/−ln(1 − γ)⌉ = k·n; k ∈ {"
            + ", ".join(map(str, ks))
            + "}"
            + ("" if quick else f", and the slack matrix at k = {ks[-1]} again in float64")
            + ". Measured, per metric sample (the workers' mean step on the x-axis; the "
            "simulator's timing: compute times exponential of mean 1, messages 0.5): the "
            "stationary distance (1/n) Σ ‖x_i − x̄‖² averaged over the run, and the workers' "
            "training loss averaged over the run's second half."
        ),
        checks=tuple(checks),
        figures=tuple(shown),
        findings=_convergence_text(
            ks, distance, {key: Interval.over(v) for key, v in late.items()}, precision
        ),
    )


def _convergence_text(
    ks: tuple[int, ...],
    distance: dict[tuple[str, int, str], Interval],
    loss: dict[tuple[str, int, str], Interval],
    precision: Interval | None,
) -> str:
    """What the Fig. 2 runs show, each sentence as the measurements have it."""

    def series(table: dict[tuple[str, int, str], Interval], name: str) -> list[float]:
        return [table[BASE.algorithm, 1, "float32"].mean] + [
            table[name, k, "float32"].mean for k in ks[1:]
        ]

    text = "**What the numbers say.** "
    for name in (way.algorithm for way in WAYS):
        d, lo = series(distance, name), series(loss, name)
        grows_d = all(a < b for a, b in itertools.pairwise(d))
        grows_l = all(a < b for a, b in itertools.pairwise(lo))
        text += (
            f"With {name.replace('_', ' ')} the stationary distance "
            + ("grows with t_mix" if grows_d else "does not grow steadily with t_mix")
            + f" ({', '.join(f'{v:.2g}' for v in d)}) and the late training loss "
            + ("with it" if grows_l else "does not follow it steadily")
            + f" ({', '.join(f'{v:.4f}' for v in lo)}). "
        )
    rf = {k: loss[REDUCED.algorithm, k, "float32"] for k in ks[1:]}
    slack = {k: loss[SLACK.algorithm, k, "float32"] for k in ks[1:]}
    better = [k for k in ks[1:] if rf[k].mean < slack[k].mean]
    seeds = rf[ks[-1]].n
    clear = [k for k in better if rf[k].high < slack[k].low]
    text += (
        "At every t_mix above the base reduced frequency's mean late loss is below the slack "
        "matrix's, as the paper reports"
        if len(better) == len(ks) - 1
        else "Reduced frequency's mean late loss is below the slack matrix's at t_mix = "
        + (", ".join(str(k * WORKERS) for k in better) or "none")
        + " of "
        + ", ".join(str(k * WORKERS) for k in ks[1:])
    )
    if seeds == 1:
        text += " (one seed: no intervals). "
    elif clear:
        text += f" (intervals apart at t_mix = {', '.join(str(k * WORKERS) for k in clear)}). "
    else:
        text += " (the intervals overlap everywhere). "
    if precision is not None:
        behind = ks[-1] in better
        holds_zero = precision.low <= 0.0 <= precision.high
        # paired runs differ by rounding alone, so a tiny change can lie beyond their spread:
        # its size against the loss is what says whether precision matters
        share = abs(precision.mean) / loss[SLACK.algorithm, ks[-1], "float32"].mean
        if holds_zero:
            verdict = ": no change beyond the spread — precision is not what "
            verdict += "holds it back here. " if behind else "decides these runs. "
        elif share < 0.01:
            order = 10.0 ** round(math.log10(share)) if share > 0 else 0.0
            verdict = (
                f": measurable, but of the order of {order:.0e} of the loss — precision is not "
                + ("what holds it back here. " if behind else "what decides these runs. ")
            )
        else:
            verdict = f": {share:.1%} of the loss — precision shows. "
        text += (
            f"The paper blames float32 for the slack matrix's trouble at large t_mix. At "
            f"t_mix = {ks[-1] * WORKERS} the same seeds in float64 change the late loss by "
            f"{precision.mean:+.2g} [{precision.low:+.2g}, {precision.high:+.2g}]" + verdict
        )
    return text + "The paper gives the trends only: these rows carry no verdict."
