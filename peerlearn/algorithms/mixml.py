"""MixML's communication protocols (Lu–Nash–De Sa, Sections 3 and 6) as programs.

Each worker runs SGD with a fixed η; the protocols differ only in how models are mixed — the
linear operators :mod:`peerlearn.analysis.mixing` analyses. The asynchronous parameter server is
:func:`peerlearn.algorithms.elastic.elastic_center` with δ = 0 (``mdownpour`` without momentum).

==================  ===========================================================================
``allreduce``       every iteration: step, then the exact average of all n models (J)
``local_steps``     m local steps, then the average (J every m iterations); m = 2 by default
``reduced_frequency`` the same operator with a long period (m = 10 by default): the paper's way of
                    raising t_mix by a known factor
``slack``           every iteration: x_i ← (1 − γ) x_i + γ x̄ (the slack matrix (1 − γ)I + γJ)
``sync_gossip``     every iteration: x_i ← Σ_j W_ij x_j over the topology's neighbours, W the
                    Metropolis weights (1/3 each on a ring: D-PSGD)
``async_gossip``    AD-PSGD: after each step a worker averages with one random neighbour;
                    meanwhile it serves the neighbours' requests, so nobody deadlocks
==================  ===========================================================================

Pairwise averaging keeps the sum of the models (both ends move by half their difference, from
the values they exchanged), so the network average evolves as in the sequential algorithm; a
worker that finished keeps serving requests until every neighbour said it finished too.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from itertools import count
from typing import Any

import numpy as np

from peerlearn.effects import (
    Await,
    Count,
    Effect,
    Exchange,
    Grad,
    Letter,
    Post,
    Receive,
    Report,
    Send,
    Vector,
)

__all__ = ["async_gossip", "averaging", "sync_gossip"]


def _clock(steps: int | None, start: int = 1) -> Iterable[int]:
    return count(start) if steps is None else range(start, steps + 1)


def _mean(values: Sequence[Vector]) -> Vector:
    out: Vector = np.mean(values, axis=0)
    return out


def averaging(
    x0: Vector, steps: int | None, eta: float, n: int, period: int = 1, gamma: float = 1.0
) -> Generator[Effect, Any, Vector]:
    """AllReduce (period 1, γ = 1), local steps / reduced frequency (period m) and the slack
    matrix (γ < 1): every ``period`` iterations x ← (1 − γ)x + γ·mean of all n models."""
    x = x0
    t = 0
    for t in _clock(steps):
        yield Report("model", x, step=t)
        g = yield Grad(x)
        x = x - eta * g
        if t % period == 0:
            xs = yield Exchange(("avg", t), x, Count(n))
            mean = _mean([m.value for m in xs])
            x = mean if gamma == 1.0 else (1 - gamma) * x + gamma * mean
    yield Report("model", x, step=t + 1)
    return x


def sync_gossip(
    x0: Vector,
    steps: int | None,
    eta: float,
    me: int,
    weights: dict[int, float],
) -> Generator[Effect, Any, Vector]:
    """D-PSGD: step, send to the neighbours, x ← Σ_j W_ij x_j (``weights`` is row ``me``)."""
    x = x0
    t = 0
    others = tuple(j for j in weights if j != me)
    for t in _clock(steps):
        yield Report("model", x, step=t)
        g = yield Grad(x)
        y = x - eta * g
        if others:
            yield Send(others, ("gossip", t), y)
            got = yield Await(("gossip", t), Count(len(others)))
            y = weights[me] * y + sum((weights[m.sender] * m.value for m in got), start=0 * y)
        x = y
    yield Report("model", x, step=t + 1)
    return x


def async_gossip(
    x0: Vector,
    steps: int | None,
    eta: float,
    me: int,
    neighbours: tuple[int, ...],
    rng: np.random.Generator,
    *,
    start: int = 1,
    incarnation: int = 0,
) -> Generator[Effect, Any, Vector]:
    """AD-PSGD: step, then average with a random neighbour, serving requests while waiting.

    ``start``, ``incarnation``: a process that restarted (``incarnation`` > 0, greater with
    every restart) resumes at iteration ``start`` from ``x0`` (a live peer's model) and first
    tells its neighbours (``("rejoined", incarnation)``): a
    neighbour waiting for its answer to a request the last incarnation took with it gives that
    request up (the exchange did not happen), and one that had its ``bye`` forgets it (and says
    its own again if it is done): the process will say bye once more when it ends."""
    x = x0
    #: neighbour → the iteration its incarnation started at (1: its first), once it said bye
    finished: dict[int, int] = {}
    ended = False  # this process said bye: a neighbour that rejoins is told again
    # A bye names the incarnation that says it, so that one delayed past a later "rejoined"
    # still counts (messages of two incarnations may arrive in any order).
    bye = ("bye", incarnation) if incarnation else ("bye",)

    heard: dict[int, int] = {}  # neighbour → its latest incarnation heard of (0: its first)

    def news_of(sender: int, since: int) -> Generator[Effect, Any, None]:
        """A neighbour's incarnation ``since`` exists (said by its "rejoined" or its bye,
        whichever comes first): a bye of an older one no longer counts, and if this process
        is done it says its bye again — the older one took it."""
        if since <= heard.get(sender, 0):
            return
        heard[sender] = since
        if finished.get(sender, 0) < since:
            finished.pop(sender, None)
        if ended:
            yield Post((sender,), (*bye[:1], t, *bye[1:]), x)

    def serve(letter: Letter) -> Generator[Effect, Any, None]:
        nonlocal x
        match letter.tag[0]:
            case "pair":  # a neighbour's request: answer with x, then move half-way
                yield Post((letter.sender,), ("paired", letter.tag[1]), x)
                x = x + (letter.value - x) / 2
            case "bye":
                since = int(letter.tag[2]) if len(letter.tag) > 2 else 0
                yield from news_of(letter.sender, since)
                finished[letter.sender] = max(finished.get(letter.sender, 0), since)
            case "rejoined":
                yield from news_of(letter.sender, int(letter.tag[1]))

    t = start - 1
    if incarnation and neighbours:
        yield Post(neighbours, ("rejoined", incarnation), x)
    for t in _clock(steps, start):
        yield Report("model", x, step=t)
        g = yield Grad(x)
        x = x - eta * g
        if not neighbours:
            continue
        j = neighbours[int(rng.integers(len(neighbours)))]
        sent = x
        yield Post((j,), ("pair", t), sent)
        answer: Vector | None = None
        while answer is None:
            for letter in (yield Receive(block=True)):
                if letter.tag[0] == "paired" and letter.tag[1] == t:
                    answer = letter.value
                else:
                    if letter.tag[0] == "rejoined" and letter.sender == j:
                        answer = sent  # j restarted: its last incarnation took the request
                    yield from serve(letter)
        # Both ends move by half the difference of the values they exchanged: the sum holds.
        x = x + (answer - sent) / 2
    if neighbours:
        yield Post(neighbours, (*bye[:1], t, *bye[1:]), x)
    ended = True
    while len(finished) < len(neighbours):
        for letter in (yield Receive(block=True)):
            yield from serve(letter)
    yield Report("model", x, step=t + 1)
    return x
