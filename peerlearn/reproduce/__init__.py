"""``peerlearn reproduce``: the papers' results, regenerated and judged in one report.

Each experiment runs peerlearn's simulator or analysis code (one, two real daemons) on a
paper's own setting, over several seeds, and returns an :class:`Outcome`: the claims it checks
(the paper's statement, the measured 95 % interval, the bound, the verdict —
:mod:`peerlearn.reproduce.claims`) and its figures. :func:`reproduce` runs the ones asked for
and writes ``reproduction.md`` with its PNGs (:mod:`peerlearn.reproduce.report`). ``quick``
runs every experiment reduced — fewer seeds, shorter runs — and still judges every claim: the
test suite runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from peerlearn.reproduce import attiya_schiller, dasgd, dasgd_daemons, easgd, mixml
from peerlearn.reproduce.claims import Check, Claim, Interval, Outcome
from peerlearn.reproduce.report import FIGURES, REPORT, render

__all__ = [
    "EXPERIMENTS",
    "Check",
    "Claim",
    "Experiment",
    "Interval",
    "Outcome",
    "reproduce",
]

Say = Callable[[str], None]


@dataclass(frozen=True)
class Experiment:
    name: str
    paper: str
    summary: str
    run: Callable[[bool, Path, Say], Outcome]


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "alg1-error",
            "Attiya–Schiller",
            "Alg 1's error against T and N, with Thm 1's bounds and mini-batch SGD",
            attiya_schiller.alg1_error,
        ),
        Experiment(
            "maa-contraction",
            "Attiya–Schiller",
            "the agreement's contraction per round: 7/8, 31/32, 23/24, 79/80, under crashes",
            attiya_schiller.maa_contraction,
        ),
        Experiment(
            "alg2-agreement",
            "Attiya–Schiller",
            "Alg 2's disagreement against Lemma 21, with the derived number of rounds and fewer",
            attiya_schiller.alg2_agreement,
        ),
        Experiment(
            "alg2-gradient",
            "Attiya–Schiller",
            "Alg 2's squared gradient norm against Lemma 22 at the smallest T it allows",
            attiya_schiller.alg2_gradient,
        ),
        Experiment(
            "partition",
            "Attiya–Schiller",
            "Thm 5: clusters cut into halves — Alg 1 splits between wells, Alg 2 blocks",
            attiya_schiller.partition,
        ),
        Experiment(
            "dasgd-slowdown",
            "Tosi–Theobald",
            "iterations to ε as one of two nodes slows down (Section 5), next to serial GD",
            dasgd.dasgd_slowdown,
        ),
        Experiment(
            "dasgd-staleness",
            "Tosi–Theobald",
            "S_avg and S_max against n, topology and slowdown, next to the paper's heuristics",
            dasgd.dasgd_staleness,
        ),
        Experiment(
            "dasgd-daemons",
            "Tosi–Theobald",
            "the two-node slowdown on real daemons over TCP, one slowed by a sleep per gradient",
            dasgd_daemons.dasgd_daemons,
        ),
        Experiment(
            "easgd-quadratic",
            "EASGD supplement",
            "the center's error in Fig. 5's setting, stability condition (17), V_∞",
            easgd.easgd_quadratic,
        ),
        Experiment(
            "mixml-tmix",
            "MixML",
            "t_mix against n for every protocol (Fig. 3), against the paper's formulas",
            mixml.mixing_time,
        ),
        Experiment(
            "mixml-convergence",
            "MixML",
            "training loss and stationary distance as t_mix grows (Fig. 2, on the digits)",
            mixml.mixml_convergence,
        ),
    )
}


def reproduce(
    names: Sequence[str],
    out: Path,
    quick: bool = False,
    say: Say = lambda _: None,
    command: str = "peerlearn reproduce all",
) -> list[Outcome]:
    """Run the experiments ``names`` (in the registry's order) and write ``out/reproduction.md``
    and its figures in ``out/reproduction/``; the outcomes, in that order. KeyError for an
    unknown name (before anything runs). The report is rewritten after every experiment, so a
    long run that is stopped keeps what it measured; an experiment that raises is reported as
    failed, with its error, and the others still run."""
    chosen = [EXPERIMENTS[n] for n in names]
    out.mkdir(parents=True, exist_ok=True)
    figures = out / FIGURES
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    for i, exp in enumerate(chosen, 1):
        say(f"[{i}/{len(chosen)}] {exp.name}: {exp.summary}")
        t0 = time.perf_counter()
        try:
            got = exp.run(quick, figures, _prefixed(say, exp.name))
        except Exception as exc:  # one experiment's failure, a bug included, is its row
            say(f"  {exp.name} failed: {type(exc).__name__}: {exc}")
            got = _failed(exp, exc)
        outcomes.append(replace(got, seconds=time.perf_counter() - t0, quick=quick))
        text = render(outcomes, time.perf_counter() - started, command)
        (out / REPORT).write_text(text + "\n", encoding="utf-8")
    return outcomes


def _failed(exp: Experiment, exc: Exception) -> Outcome:
    """An experiment that could not finish: one failed check that says why."""
    ran = Check(
        "the experiment ran to its end",
        Interval.exact(0),
        Claim(exp.paper, "—", "every run of the experiment finishes"),
        "equals",
        1.0,
        note=f"{type(exc).__name__}: {exc}",
    )
    return Outcome(
        exp.name, exp.summary, exp.paper, "(it failed before its setup was done)", (ran,)
    )


def _prefixed(say: Say, name: str) -> Say:
    def inner(text: str) -> None:
        say(f"  {name}: {text}")

    return inner
