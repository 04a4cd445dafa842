"""Pieces several records share: theory-warning sentences and parameter descriptions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from peerlearn.effects import Vector

if TYPE_CHECKING:
    from peerlearn.config import RunConfig
    from peerlearn.problems import Problem

__all__ = ["first_eta", "sentence", "start_point", "step_size"]


def sentence(conditions: Mapping[str, str], result: str, broken: list[str]) -> list[str]:
    """``[]`` when nothing is broken, else the one warning: the result, its whole condition as
    the paper states it, then the parts this run breaks."""
    if not broken:
        return []
    verb = "need" if result.startswith("Lemmas") else "needs"
    return [f"{result} {verb} {conditions[result]}: {'; '.join(broken)}"]


def first_eta(cfg: RunConfig) -> float | None:
    """η_1, or None when it is not known (√(N/T) without a finite T)."""
    if cfg.lr.schedule == "sqrt_n_over_t" and not cfg.steps:
        return None
    return cfg.schedule()(1)


def step_size(cfg: RunConfig) -> list[str]:
    """``η=…`` for a one-line description (fixed-η algorithms)."""
    eta = first_eta(cfg)
    return [] if eta is None else [f"η={eta:g}"]


def start_point(problem: Problem | None) -> Vector:
    """x_1, common to every process and read-only: programs share it."""
    assert problem is not None, "this algorithm needs a problem"
    x1 = problem.x0()
    x1.flags.writeable = False  # shared by every program: nobody may mutate it
    return x1
