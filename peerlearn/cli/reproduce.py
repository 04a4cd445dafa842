"""``peerlearn reproduce``: rebuild the report of the papers' results (``reproduction.md`` and
its figures) — every claim with its measured interval over seeds, its bound and its verdict.

Exit codes: 0 when every claim with a verdict passes, 1 when one fails (the report is written
either way, and says which), 2 for a user error (an unknown experiment, an unwritable folder).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from peerlearn.console import err, escape, fail, out

__all__ = ["reproduce"]


def reproduce(
    experiment: Annotated[
        str,
        typer.Argument(
            help="An experiment's name, or 'all'. 'peerlearn reproduce list' names them.",
            show_default=True,
        ),
    ] = "all",
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Where to write reproduction.md, and its figures in reproduction/ "
            "(docs/ rebuilds the committed report).",
        ),
    ] = Path("report"),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Every experiment reduced — fewer seeds, shorter runs — every claim still "
            "judged (what the test suite runs: under a minute).",
        ),
    ] = False,
) -> None:
    """Regenerate the papers' results: each claim, measured over seeds, with its verdict.

    Writes OUT/reproduction.md and OUT/reproduction/*.png. Exit 1 if a claim fails."""
    from peerlearn.reproduce import EXPERIMENTS
    from peerlearn.reproduce import reproduce as run

    if experiment == "list":
        for name, exp in EXPERIMENTS.items():
            out.print(
                escape(f"{name:<18} {exp.paper}: {exp.summary}"), highlight=False, soft_wrap=True
            )
        return
    names = list(EXPERIMENTS) if experiment == "all" else [experiment]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise fail(f"no experiment {unknown[0]!r}: one of {', '.join(EXPERIMENTS)}, or all")
    command = f"peerlearn reproduce {experiment} --out {shlex.quote(str(out_dir))}" + (
        " --quick" if quick else ""
    )
    started = time.perf_counter()

    def say(text: str) -> None:
        err.print(
            f"[dim]{time.perf_counter() - started:7.1f} s[/] {escape(text)}",
            highlight=False,
            soft_wrap=True,
        )

    try:
        outcomes = run(names, out_dir, quick=quick, say=say, command=command)
    except OSError as exc:
        raise fail(f"cannot write the report under {out_dir}: {exc.strerror or exc}") from None
    checks = [c for o in outcomes for c in o.checks]
    failed = [(o.name, c) for o in outcomes for c in o.failed]
    passed = sum(c.verdict == "PASS" for c in checks)
    out.print(
        escape(
            f"wrote {out_dir / 'reproduction.md'}: {passed} of {len(checks)} claims pass, "
            f"{len(failed)} fail, {len(checks) - passed - len(failed)} without a verdict "
            f"({time.perf_counter() - started:.0f} s)"
        ),
        highlight=False,
        soft_wrap=True,
    )
    for name, c in failed:
        out.print(
            escape(f"FAIL {name}: {c.quantity}: {c.measured.text()} {c.bound_text()}"),
            highlight=False,
            soft_wrap=True,
        )
    if failed:
        raise typer.Exit(1)
