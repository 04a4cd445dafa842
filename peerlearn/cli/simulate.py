"""``peerlearn simulate``: one run in the deterministic simulator."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from peerlearn.cli import render
from peerlearn.cli.flags import parse_set, takes_flags
from peerlearn.config import load_config, merge
from peerlearn.console import fail
from peerlearn.errors import ConfigError, PeerlearnError

if TYPE_CHECKING:
    from peerlearn.problems.base import Problem
    from peerlearn.sim.runner import SimResult

__all__ = ["MAX_LOGGED", "simulate"]

MAX_LOGGED = 2_000_000  # DASGD local steps whose logs simulate keeps for Ŝ


@takes_flags("simulate")
def simulate(
    config: Path | None,
    set_: list[str] | None,
    out_dir: Path | None,
    quiet: bool,
    overrides: dict[str, Any],
) -> None:
    """Run an algorithm in the deterministic simulator and report how it went.

    Flags override the --config file; the defaults shown apply when neither sets a field."""
    from peerlearn.runs import build_problem, planned_iterations
    from peerlearn.sim.output import write_outputs
    from peerlearn.sim.runner import run_simulation

    try:
        # a field both a flag and --set give takes the --set value
        cfg = load_config(config, merge(overrides, parse_set(set_ or [])))
        if cfg.steps is None:
            raise ConfigError("the simulator needs a finite number of steps (--steps)")
        prob = build_problem(cfg)
    except PeerlearnError as exc:
        raise fail(str(exc)) from None
    warnings = cfg.unused_settings()
    if prob is not None:
        warnings += cfg.theory_warnings(prob.constants)
    render.warnings(warnings)
    render.describe_simulation(cfg, prob is not None)

    with render.progress(quiet) as bar:
        task = bar.add_task("iterations", total=planned_iterations(cfg))
        # DASGD's apply and compute logs give the loose staleness Ŝ offline; they grow with
        # n²T, so very long runs report the tight S only.
        logs = ("staleness", "compute") if planned_iterations(cfg) <= MAX_LOGGED else ()
        result = run_simulation(
            cfg,
            record_reports=logs if cfg.spec.staleness else (),
            progress=lambda done, total: bar.update(task, completed=done),
        )

    render.simulation_result(cfg, result, _evaluate_mean(prob, result), MAX_LOGGED)
    if out_dir is not None:
        render.written(write_outputs(result, out_dir))
    if result.status in ("failed", "diverged"):
        raise typer.Exit(code=1)


def _evaluate_mean(prob: Problem | None, result: SimResult) -> dict[str, float]:
    """The problem's quality figures (e.g. test accuracy) of the live processes' mean model."""
    if prob is None:
        return {}
    import numpy as np

    from peerlearn.effects import quiet_float_errors

    live = [p.x for p in result.live() if p.x is not None]
    if not live:
        return {}
    with quiet_float_errors():  # huge models near divergence evaluate to inf
        return prob.evaluate(np.mean(live, axis=0))
