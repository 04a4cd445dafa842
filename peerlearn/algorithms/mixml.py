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

from peerlearn.algorithms.vectors import average, descend
from peerlearn.effects import (
    Await,
    Count,
    Done,
    Effect,
    Exchange,
    Grad,
    Letter,
    Post,
    Quantize,
    Receive,
    Report,
    Send,
    Vector,
)

__all__ = ["async_gossip", "averaging", "sync_gossip"]


def _clock(steps: int | None, start: int = 1) -> Iterable[int]:
    return count(start) if steps is None else range(start, steps + 1)


def _mean(values: Sequence[Vector]) -> Vector:
    return average(values) if len(values) > 1 else values[0].copy()


def averaging(
    x0: Vector,
    steps: int | None,
    eta: float,
    n: int,
    period: int = 1,
    gamma: float = 1.0,
    *,
    start: int = 1,
) -> Generator[Effect, Any, Vector]:
    """AllReduce (period 1, γ = 1), local steps / reduced frequency (period m) and the slack
    matrix (γ < 1): every ``period`` iterations x ← (1 − γ)x + γ·mean of all n models.
    ``start``: a restarted process resumes at that iteration from ``x0``."""
    x = x0
    t = start - 1
    for t in _clock(steps, start):
        yield Report("model", x, step=t)
        g = yield Grad(x)
        x = descend(x, eta, g)  # x − η·g
        if t % period == 0:
            x = yield Quantize(("avg",), x)  # as sent: its own share of the mean too
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
    *,
    start: int = 1,
) -> Generator[Effect, Any, Vector]:
    """D-PSGD: step, send to the neighbours, x ← Σ_j W_ij x_j (``weights`` is row ``me``).
    ``start``: a restarted process resumes at that iteration from ``x0``."""
    x = x0
    t = start - 1
    others = tuple(j for j in weights if j != me)
    for t in _clock(steps, start):
        yield Report("model", x, step=t)
        g = yield Grad(x)
        y = descend(x, eta, g)
        if others:
            y = yield Quantize(("gossip",), y)  # as sent: its own term of the mix too
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
    tells its neighbours (``("rejoined", incarnation)``). Messages name incarnations, so that
    both ends of an exchange agree on whether it happened whatever order they arrive in:

    - a request names the incarnation of its addressee as the requester knows it
      (``("pair", t, k)``; plain ``("pair", t)`` for a first one); an incarnation answers a
      request addressed to an older one neutrally (the requester's own value back: neither
      moves), and a requester that hears of a newer incarnation than the one it addressed
      gives its request up (the older one took it with it);
    - a bye names the incarnation that says it (``("bye", t, k)``): a neighbour that hears of a
      newer incarnation forgets the older one's bye, ignores a late one, and says its own bye
      again if it is done (the older one took it with it)."""
    x = x0
    #: neighbour → the incarnation whose bye it has (it finished), once it said bye
    finished: dict[int, int] = {}
    ended = False  # this process said bye: a neighbour that rejoins is told again
    bye = ("bye", incarnation) if incarnation else ("bye",)
    heard: dict[int, int] = {}  # neighbour → its latest incarnation heard of (0: its first)

    def say_bye(to: tuple[int, ...]) -> Post:
        return Post(to, (*bye[:1], t, *bye[1:]), x)

    def news_of(sender: int, since: int) -> Generator[Effect, Any, None]:
        """A neighbour's incarnation ``since`` exists (said by its "rejoined" or its bye,
        whichever comes first)."""
        if since <= heard.get(sender, 0):
            return
        heard[sender] = since
        if finished.get(sender, 0) < since:
            finished.pop(sender, None)
        if ended:
            yield say_bye((sender,))

    def serve(letter: Letter) -> Generator[Effect, Any, None]:
        nonlocal x
        match letter.tag[0]:
            case "pair":  # a neighbour's request: answer with x, then move half-way
                addressed = int(letter.tag[2]) if len(letter.tag) > 2 else 0
                if addressed < incarnation:  # meant for an older incarnation: no exchange
                    yield Post((letter.sender,), ("paired", letter.tag[1]), letter.value)
                    return
                answer = yield Quantize(("paired",), x)
                yield Post((letter.sender,), ("paired", letter.tag[1]), answer)
                x = x + (letter.value - answer) / 2
            case "bye":
                since = int(letter.tag[2]) if len(letter.tag) > 2 else 0
                if since < heard.get(letter.sender, 0):
                    return  # an older incarnation's, late
                yield from news_of(letter.sender, since)
                finished[letter.sender] = since
            case "rejoined":
                yield from news_of(letter.sender, int(letter.tag[1]))

    t = start - 1
    if incarnation and neighbours:
        yield Post(neighbours, ("rejoined", incarnation), x)
    for t in _clock(steps, start):
        yield Report("model", x, step=t)
        g = yield Grad(x)
        x = descend(x, eta, g)  # x − η·g
        if not neighbours:
            continue
        j = neighbours[int(rng.integers(len(neighbours)))]
        sent = yield Quantize(("pair",), x)
        addressed = heard.get(j, 0)
        yield Post((j,), ("pair", t, addressed) if addressed else ("pair", t), sent)
        answer: Vector | None = None
        while answer is None:
            for letter in (yield Receive(block=True)):
                if letter.tag[0] == "paired" and letter.tag[1] == t and letter.sender == j:
                    answer = letter.value
                    continue
                yield from serve(letter)
                if answer is None and heard.get(j, 0) > addressed:
                    answer = sent  # j restarted: the incarnation addressed took the request
        # Both ends move by half the difference of the values they exchanged: the sum holds.
        x = x + (answer - sent) / 2
    if neighbours:
        yield say_bye(neighbours)
    ended = True
    while len(finished) < len(neighbours):
        for letter in (yield Receive(block=True)):
            yield from serve(letter)
    yield Report("model", x, step=t + 1)
    if not neighbours:
        return x
    # Finished — but a neighbour that restarts after this has forgotten this process's bye and
    # may ask it for an exchange: it goes on answering, neutrally (the asker's own value back,
    # so neither moves), and says its bye again to every newer incarnation it hears of.
    yield Done(x)
    while True:
        for letter in (yield Receive(block=True)):
            match letter.tag[0]:
                case "pair":
                    yield Post((letter.sender,), ("paired", letter.tag[1]), letter.value)
                case "rejoined":
                    yield from news_of(letter.sender, int(letter.tag[1]))
                case "bye":
                    since = int(letter.tag[2]) if len(letter.tag) > 2 else 0
                    yield from news_of(letter.sender, since)
