"""What every runtime builds the same way: random streams, the problem, the programs.

Random streams all derive from the run seed (``numpy.random.SeedSequence`` with a spawn key of
``(purpose, cluster, index)``): gradient noise and agreement inputs are independent per process
(Attiya–Schiller's Lemma 1 needs independent samples), the simulator's schedule has its own
stream, and x_1 and τ are common to every process. A process therefore computes the same
gradients whichever runtime hosts it.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

import numpy as np

from peerlearn.algorithms import alg1, alg2, maa_instances
from peerlearn.algorithms.dasgd import dasgd
from peerlearn.algorithms.elastic import (
    Variant,
    center_requests,
    elastic_center,
    elastic_worker,
    sync_center,
    sync_worker,
)
from peerlearn.algorithms.mixml import async_gossip, averaging, sync_gossip
from peerlearn.config import RunConfig
from peerlearn.effects import Program, Vector
from peerlearn.errors import ConfigError
from peerlearn.problems import Problem, make_problem

__all__ = [
    "Purpose",
    "build_problem",
    "grad_stream",
    "make_programs",
    "planned_iterations",
    "stream",
]


class Purpose(IntEnum):
    GRADIENT = 0
    SCHEDULE = 1
    INPUTS = 2
    TAU = 3
    GOSSIP = 4  # async gossip's choice of neighbours, per process


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
    if cfg.algorithm not in ("alg1", "alg2"):
        return [_other_program(cfg, x1, p) for p in pids]
    eta = cfg.schedule()
    if cfg.algorithm == "alg1":
        return [alg1(x1, steps, big_n, eta) for _ in pids]
    tau = None if steps is None else int(stream(cfg.seed, Purpose.TAU).integers(1, steps + 1))
    # Rounds per iteration follow q_t = η_t/4 unless q or the rounds were fixed in the config.
    per_t = cfg.maa.rounds is None and cfg.maa.q is None and cfg.lr.schedule == "inverse_time"
    r = None if per_t else rounds
    return [alg2(x1, steps, big_n, eta, tau, r, inner, aggregator) for _ in pids]


_VARIANTS: dict[str, Variant] = {
    "async_easgd": "async",
    "eamsgd": "eamsgd",
    "downpour": "downpour",
    "mdownpour": "mdownpour",
    "async_ps": "mdownpour",  # δ = 0: MixML's asynchronous parameter server
}


def _other_program(cfg: RunConfig, x1: Vector, pid: int) -> Program:
    """The program of process ``pid`` for DASGD, the elastic family and the MixML protocols."""
    steps, n, algo = cfg.steps, cfg.processes, cfg.algorithm
    eta = cfg.schedule()(1)  # fixed η (validated)
    if algo == "dasgd":
        return dasgd(pid, x1, eta, steps, cfg.graph.neighbours)
    if algo in ("allreduce", "local_steps", "reduced_frequency", "slack"):
        gamma = cfg.mix.gamma if algo == "slack" else 1.0
        return averaging(x1, steps, eta, n, cfg.mix_period, gamma)
    if algo == "sync_gossip":
        w = cfg.graph.metropolis()
        row = {int(j): float(w[pid, j]) for j in (pid, *cfg.graph.neighbours[pid])}
        return sync_gossip(x1, steps, eta, pid, row)
    if algo == "async_gossip":
        m = cfg.membership
        rng = stream(cfg.seed, Purpose.GOSSIP, m.cluster_of[pid], m.index(pid))
        return async_gossip(x1, steps, eta, pid, cfg.graph.neighbours[pid], rng)
    center, el = cfg.center, cfg.elastic
    workers = tuple(p for p in range(n) if p != center)
    alpha = cfg.elastic_alpha
    if algo == "easgd":
        if pid == center:
            return sync_center(x1, steps, alpha, el.tau, workers)
        return sync_worker(x1, steps, eta, alpha, el.tau, center)
    variant = _VARIANTS[algo]
    delta = 0.0 if algo == "async_ps" else el.delta
    tau = 1 if variant == "mdownpour" else el.tau
    if pid == center:
        requests = None if steps is None else len(workers) * center_requests(variant, steps, tau)
        return elastic_center(variant, x1, requests, eta, alpha, delta)
    return elastic_worker(variant, x1, steps, eta, tau, delta, center)


def planned_iterations(cfg: RunConfig) -> int:
    """Iterations ("model" reports past the first) all processes of a finite run make in all:
    the denominator of a progress bar."""
    steps, n = cfg.steps or 0, cfg.processes
    if cfg.algorithm == "dasgd":
        return n * n * steps  # every node applies every node's gradients
    if cfg.algorithm in _VARIANTS:
        variant = _VARIANTS[cfg.algorithm]
        tau = 1 if variant == "mdownpour" else cfg.elastic.tau
        return (n - 1) * steps + (n - 1) * center_requests(variant, steps, tau)
    if cfg.algorithm == "easgd":
        return (n - 1) * steps + -(-steps // cfg.elastic.tau)
    return n * steps
