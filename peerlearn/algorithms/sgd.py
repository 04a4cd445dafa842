"""Attiya–Schiller Alg 1 (strongly convex) and Alg 2 (non-convex) as effect programs.

Both report the model at the start of every iteration (``Report("model", x_t, step=t)``) and
the final one as ``step = T + 1``; that is how runtimes learn a process's progress.

Both can start at any iteration ``start`` (1 for a run): a process that rejoins resumes there
with a peer's model as its own x — the state of these algorithms is the iteration and the model.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from itertools import count
from typing import Any

from peerlearn.algorithms.aggregate import Aggregator, maa_rounds
from peerlearn.algorithms.maa import cluster_maa
from peerlearn.algorithms.schedules import Schedule
from peerlearn.algorithms.vectors import average, descend
from peerlearn.effects import AtLeast, Count, Effect, Exchange, Grad, Quantize, Report, Vector

__all__ = ["alg1", "alg2", "maa_instances"]


def _iterations(steps: int | None, start: int = 1) -> Iterable[int]:
    """t = start..T, or forever when T is None (a daemon that runs until stopped)."""
    return count(start) if steps is None else range(start, steps + 1)


def _mean(values: list[Vector]) -> Vector:
    return average(values) if len(values) > 1 else values[0]


def alg1(
    x1: Vector, steps: int | None, quorum: int, eta: Schedule, start: int = 1
) -> Generator[Effect, Any, Vector]:
    """Alg 1 of Attiya–Schiller: step on the parameters, exchange them, average exactly N."""
    x = x1
    t = start - 1
    for t in _iterations(steps, start):
        yield Report("model", x, step=t)
        g = yield Grad(x)
        y = yield Quantize(("params",), descend(x, eta(t), g))  # x − η_t·g, as sent
        ys = yield Exchange(("params", t), y, Count(quorum))
        x = _mean([m.value for m in ys])
    yield Report("model", x, step=t + 1)
    return x


def alg2(
    x1: Vector,
    steps: int | None,
    quorum: int,
    eta: Schedule,
    tau: int | None,
    rounds: int | None,
    inner_rounds: int,
    aggregator: Aggregator = Aggregator.MIDEXT,
    start: int = 1,
) -> Generator[Effect, Any, Vector]:
    """Alg 2 of Attiya–Schiller: exchange gradients, average all ≥ N, step from own x, then MAA_t.

    ``tau`` ∈ [1, T] is the common output iteration (None: output the last model);
    ``rounds`` is the number of cluster rounds of each MAA_t — None: derived for every t from
    q_t = η_t/4 (docs/papers.md, erratum a), so a decaying schedule gets more rounds as η_t shrinks;
    ``inner_rounds`` the shared-memory rounds per cluster round. A process started past τ
    (resumed) outputs its last model.
    """
    x = x1
    x_tau = x1
    t = start - 1
    for t in _iterations(steps, start):
        if t == tau:
            x_tau = x
        yield Report("model", x, step=t)
        g = yield Grad(x)
        g = yield Quantize(("grad",), g)
        gs = yield Exchange(("grad", t), g, AtLeast(quorum))
        y = descend(x, eta(t), _mean([m.value for m in gs]))
        r_t = rounds if rounds is not None else maa_rounds(min(1.0, eta(t) / 4), aggregator)[0]
        x = yield from cluster_maa(y, t, r_t, inner_rounds, aggregator)
    yield Report("model", x, step=t + 1)
    return x_tau if tau is not None and tau >= start else x


def maa_instances(
    inputs: Vector, rounds: int, inner_rounds: int, aggregator: Aggregator = Aggregator.MIDEXT
) -> Generator[Effect, Any, list[Vector]]:
    """Standalone agreement: one cluster-MAA instance per row of ``inputs`` (instances 1, 2, …)."""
    outputs: list[Vector] = []
    for j, x in enumerate(inputs, start=1):
        yield Report("model", x, step=j)
        outputs.append((yield from cluster_maa(x, j, rounds, inner_rounds, aggregator)))
    yield Report("model", outputs[-1] if outputs else inputs[0], step=len(inputs) + 1)
    return outputs
