"""What every runtime builds the same way: random streams, the problem, the programs.

Random streams all derive from the run seed (``numpy.random.SeedSequence`` with a spawn key of
``(purpose, cluster, index)``): gradient noise and agreement inputs are independent per process
(spec pitfall 9), the simulator's schedule has its own stream, and x_1 and τ are common to
every process. A process therefore computes the same gradients whichever runtime hosts it.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

import numpy as np

from peerlearn.algorithms import alg1, alg2, maa_instances
from peerlearn.config import RunConfig
from peerlearn.effects import Program
from peerlearn.errors import ConfigError
from peerlearn.problems import Problem, make_problem

__all__ = ["Purpose", "build_problem", "grad_stream", "make_programs", "stream"]


class Purpose(IntEnum):
    GRADIENT = 0
    SCHEDULE = 1
    INPUTS = 2
    TAU = 3


def stream(seed: int, purpose: Purpose, *key: int) -> np.random.Generator:
    """The random stream for ``purpose`` (and process ``key``) of the run with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(int(purpose), *key)))


def grad_stream(cfg: RunConfig, pid: int) -> np.random.Generator:
    """Process ``pid``'s own gradient-noise stream."""
    m = cfg.membership
    return stream(cfg.seed, Purpose.GRADIENT, m.cluster_of[pid], m.index(pid))


def build_problem(cfg: RunConfig) -> Problem | None:
    """The run's problem (None for standalone agreement, which computes no gradient)."""
    if cfg.algorithm == "maa":
        return None
    return make_problem(cfg.problem.name, **cfg.problem.params)


def make_programs(cfg: RunConfig, problem: Problem | None, pids: Iterable[int]) -> list[Program]:
    """The programs of processes ``pids`` (a daemon builds only its own)."""
    steps, big_n = cfg.steps, cfg.n_quorum
    rounds, inner = cfg.agreement_rounds()
    aggregator = cfg.maa.aggregator
    m = cfg.membership
    if cfg.algorithm == "maa":
        if steps is None:
            raise ConfigError("standalone agreement needs a finite number of instances (steps)")
        return [
            maa_instances(
                stream(cfg.seed, Purpose.INPUTS, m.cluster_of[p], m.index(p)).standard_normal(
                    (steps, cfg.dim)
                ),
                rounds,
                inner,
                aggregator,
            )
            for p in pids
        ]
    assert problem is not None
    x1 = problem.x0()
    x1.flags.writeable = False  # shared by every program: nobody may mutate it
    eta = cfg.schedule()
    if cfg.algorithm == "alg1":
        return [alg1(x1, steps, big_n, eta) for _ in pids]
    tau = None if steps is None else int(stream(cfg.seed, Purpose.TAU).integers(1, steps + 1))
    # Rounds per iteration follow q_t = η_t/4 unless q or the rounds were fixed in the config.
    per_t = cfg.maa.rounds is None and cfg.maa.q is None and cfg.lr.schedule == "inverse_time"
    r = None if per_t else rounds
    return [alg2(x1, steps, big_n, eta, tau, r, inner, aggregator) for _ in pids]
