"""``peerlearn demo``: several daemons in this process, training live."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peerlearn.cli.flags import parse_set
from peerlearn.console import fail, out
from peerlearn.errors import PeerlearnError

__all__ = ["demo"]


def demo(
    algorithm: Annotated[
        str, typer.Option(help="Any algorithm of `simulate --help` (the README's table).")
    ] = "alg1",
    problem: Annotated[
        str, typer.Option(help="softmax (digits), mlp (digits, use with alg2), quadratic, …")
    ] = "softmax",
    daemons: Annotated[int, typer.Option(help="Number of daemons (clusters) in this process.")] = 3,
    workers: Annotated[int, typer.Option(help="Number of worker threads per daemon.")] = 2,
    duration: Annotated[float, typer.Option(help="Seconds of training.")] = 60.0,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Constant learning rate η.",
            show_default="per problem, within the algorithm's theory bounds",
        ),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where demo.png, summary.json and metrics.csv go.")
    ] = Path("runs/demo"),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any node config field, FIELD=VALUE: elastic.tau=4."),
    ] = None,
) -> None:
    """Several daemons in this process on 127.0.0.1, training live.

    Ends with the mean model's test accuracy next to sequential SGD with the same gradient
    budget, and writes a plot, summary.json and metrics.csv. Without a terminal (make demo >
    FILE) it prints a progress line every few seconds instead of the live table. Exits 1 when
    a worker crashed or diverged (summary.json's status: failed or diverged)."""
    from peerlearn.config import ALGORITHMS
    from peerlearn.demo import DemoSettings, run_demo

    if algorithm not in ALGORITHMS:
        raise fail(f"unknown algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
    if daemons < 1 or workers < 1 or duration <= 0:
        raise fail("--daemons and --workers must be ≥ 1 and --duration > 0")
    try:
        extra = parse_set(set_ or [])
        result = run_demo(
            DemoSettings(
                algorithm=algorithm,
                problem=problem,
                daemons=daemons,
                workers=workers,
                duration=duration,
                lr=lr,
                out=out_dir,
                extra=extra,
            ),
            out,
        )
    except PeerlearnError as exc:
        raise fail(str(exc)) from None
    if result["status"] in ("failed", "diverged"):  # as `simulate`: said above, and exit 1
        raise typer.Exit(code=1)
