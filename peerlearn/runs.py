"""What every runtime builds the same way: random streams, the problem, the programs.

The programs come from the algorithm's record (:mod:`peerlearn.algorithms.registry`); the
random streams from :mod:`peerlearn.streams`, so a process computes the same gradients
whichever runtime hosts it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from peerlearn.config import RunConfig
from peerlearn.effects import Program
from peerlearn.problems import Problem, in_dtype, make_problem
from peerlearn.streams import Purpose, stream

__all__ = [
    "Purpose",
    "build_problem",
    "grad_stream",
    "make_programs",
    "planned_iterations",
    "stream",
]


def grad_stream(cfg: RunConfig, pid: int) -> np.random.Generator:
    """Process ``pid``'s own gradient-noise stream."""
    m = cfg.membership
    return stream(cfg.seed, Purpose.GRADIENT, m.cluster_of[pid], m.index(pid))


def build_problem(cfg: RunConfig) -> Problem | None:
    """The run's problem (None for standalone agreement, which computes no gradient)."""
    if not cfg.spec.needs_problem:
        return None
    return in_dtype(make_problem(cfg.problem.name, **cfg.problem.params), cfg.dtype)


def make_programs(cfg: RunConfig, problem: Problem | None, pids: Iterable[int]) -> list[Program]:
    """The programs of processes ``pids`` (a daemon builds only its own)."""
    return cfg.spec.programs(cfg, problem, tuple(pids))


def planned_iterations(cfg: RunConfig) -> int:
    """Iterations ("model" reports past the first) all processes of a finite run make in all:
    the denominator of a progress bar."""
    return cfg.spec.planned_iterations(cfg)
