"""What the commands print: the run's one-line description, the progress bar, the result
table and the lines under it. The command functions load the config, run, and hand what they
got to these functions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from peerlearn.config import RunConfig
from peerlearn.console import err, escape, out, warn

if TYPE_CHECKING:
    from peerlearn.sim.core import Restart
    from peerlearn.sim.runner import SimResult

__all__ = [
    "describe_params",
    "describe_simulation",
    "progress",
    "simulation_result",
    "warnings",
    "written",
]


def warnings(lines: Iterable[str]) -> None:
    for line in lines:
        warn(line)


def describe_simulation(cfg: RunConfig, has_problem: bool) -> None:
    """The run in one line on stderr: algorithm, problem, sizes and parameters."""
    spec = cfg.spec
    described = (
        f"{cfg.algorithm} on "
        f"{cfg.problem.name if has_problem else f'random inputs (d={cfg.dim})'}: "
        f"n={cfg.processes}, m={cfg.clusters}, "
        + (f"N={cfg.n_quorum}, " if spec.reads("quorum") else "")
        + f"f={cfg.failures}, T={cfg.steps}"
    )
    if spec.agreement:
        rounds, inner = cfg.agreement_rounds()
        described += f", agreement R={rounds}×{inner} ({cfg.maa.aggregator})"
    described += describe_params(cfg)
    err.print(described, markup=False, highlight=False)


def describe_params(cfg: RunConfig) -> str:
    """The parameters of ``cfg``'s algorithm, as its record describes them."""
    return "".join(f", {p}" for p in cfg.spec.describe(cfg))


def progress(quiet: bool) -> Progress:
    """The iterations bar on stderr; off with --quiet or without a terminal, gone at the end."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=True,
    )


def _restart(r: Restart) -> str:
    """``1.0 4→5``: the iteration it was in, the one it resumed at (``down``: nobody was left)."""
    return f"{r.name} {r.step}→{'down' if r.resumed_at is None else r.resumed_at}"


def simulation_result(
    cfg: RunConfig, result: SimResult, evaluation: Mapping[str, float], max_logged: int
) -> None:
    """The result table, then staleness, the mean model's ``evaluation``, blocked processes,
    divergence and failure. ``max_logged``: the longest run whose DASGD apply logs were kept
    (longer ones have no loose staleness Ŝ)."""
    table = Table(title=f"status: {result.status}", title_justify="left")
    table.add_column("final loss (mean, live)")
    table.add_column("max pairwise ‖xi−xj‖²")
    table.add_column("stationary distance")
    table.add_column("messages")
    table.add_column("virtual time")
    table.add_column("crashed")
    diverged = result.outcome.diverged
    if diverged:
        table.add_column("diverged")
    restarts = result.outcome.restarts
    if restarts:
        table.add_column("restarted")
    loss = result.final_loss
    spread = result.live()  # distances between no models (all crashed or diverged): none
    table.add_row(
        "—" if loss is None else f"{loss:.6g}",
        f"{result.max_pairwise_distance:.3g}" if spread else "—",
        f"{result.stationary_distance:.3g}" if spread else "—",
        f"{result.outcome.deliveries:,}",
        f"{result.outcome.time:.2f}",
        ", ".join(p.name for p in result.processes if p.crashed) or "none",
        *([_names([d.name for d in diverged], cfg.processes)] if diverged else []),
        *([", ".join(_restart(r) for r in restarts)] if restarts else []),
    )
    out.print(table)
    if result.staleness:
        from peerlearn.sim.output import staleness_figures

        fig = staleness_figures(result)
        assert fig is not None
        line = f"staleness (Def. 2): S_avg = {fig['S_avg']:.3g}, S_max = {fig['S_max']}"
        if fig["S_hat_avg"] is not None:
            line += f"; loose: Ŝ_avg = {fig['S_hat_avg']:.3g}, Ŝ_max = {fig['S_hat_max']}"
        elif result.outcome.restarts:
            line += " (Ŝ needs every node's whole apply log: none across a restart)"
        else:
            line += f" (Ŝ needs the apply logs: runs of at most {max_logged:,} steps)"
        out.print(line, highlight=False)
    for key, value in evaluation.items():
        out.print(f"{key} of the mean model: {value:.4f}")
    for b in result.outcome.blocked:
        out.print(
            f"[yellow]blocked[/] process {b.name} waits on {escape(str(b.tag))}: has {b.have} of "
            f"{b.need} {b.unit}",
            highlight=False,
        )
    if diverged:
        first = min(diverged, key=lambda d: (d.step, d.pid))
        more = f" ({len(diverged)} of {cfg.processes} processes diverged)" if diverged[1:] else ""
        out.print(
            f"[red]diverged:[/] process {first.name} computed a non-finite {first.quantity} at "
            f"iteration {first.step}{more}. A diverged process stops before sending the value, "
            "as if it crashed; a smaller learning rate may help.",
            highlight=False,
        )
    if result.outcome.error:
        out.print(f"[red]failed:[/] {escape(str(result.outcome.error))}", highlight=False)


def written(paths: Iterable[Path]) -> None:
    for path in paths:
        out.print(f"wrote {path}", markup=False, highlight=False)


def _names(names: list[str], total: int, most: int = 4) -> str:
    """A table cell listing ``names``, or how many when there are too many to read."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{len(names)} of {total}"
