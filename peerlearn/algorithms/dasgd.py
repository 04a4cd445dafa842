"""Tosi–Theobald DASGD, Algorithm 1, as an effect program, with a relay for sparse topologies.

Each node is one process: received gradients are applied first, one per local step; only when
none is ready does the node compute a gradient on its current model, apply it at once and send
it. Every step applies exactly one gradient with the same fixed η, so the model is always
x⁰ − η Σ applied gradients (Remark 1) and all nodes end with the same model.

Messages (all ``Post``, into the inboxes of the node's neighbours in the topology):

* ``("dg", origin, seq, *V)`` — the gradient ``seq`` (0, 1, 2, …) of ``origin``, computed on
  the state with version vector ``V`` (``V[k]`` = how many of k's gradients the origin had
  applied, its own included). Its identity is ``(origin, seq)``.
* ``("done", origin, count)`` — ``origin`` computed ``count`` gradients in all.

Relaying (V1) makes any connected topology work: a node forwards every gradient and DONE it
sees for the first time to its neighbours on arrival, and drops copies it already saw (dedupe
by ``(origin, seq)``), so each gradient is applied exactly once everywhere. It skips the
origin's own neighbours, which the origin posted to directly (links lose nothing): along a
shortest path from the origin every node is either one of those or the next hop of a relayer,
so flooding still reaches everybody — and on the complete graph nothing is relayed at all.

Version vectors are exact only when each origin's gradients are applied in sequence order;
several paths can reorder them, so a gradient that arrives before its predecessor from the
same origin is held until the gap fills (a reorder buffer). Then the
applied set is always ``{(k, c): c < V[k]}`` and the tight staleness of Def. 1 is the L1
distance ``Σ_k |V_i^t[k] − V_j^s[k]|`` (own gradients: 0).

Reports: ``"model"`` (x after ``step − 1`` local steps), ``"staleness"`` (|S| of the gradient
applied at this step; ``key = (origin, seq)``) and ``"compute"`` (``value`` = the version vector
a node's own gradient ``key = (me, seq)`` was computed on) — the last two are the apply and
compute logs from which :mod:`peerlearn.algorithms.staleness` derives S and Ŝ offline.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import Any

import numpy as np

from peerlearn.effects import Effect, Grad, Letter, Post, Receive, Report, Vector

__all__ = ["dasgd"]


class _Seen:
    """Which sequence numbers of one origin arrived: a contiguous prefix plus the ones above."""

    __slots__ = ("above", "prefix")

    def __init__(self) -> None:
        self.prefix = 0
        self.above: set[int] = set()

    def add(self, seq: int) -> bool:
        """Record ``seq``; False if it was seen before."""
        if seq < self.prefix or seq in self.above:
            return False
        self.above.add(seq)
        while self.prefix in self.above:
            self.above.remove(self.prefix)
            self.prefix += 1
        return True


def dasgd(
    me: int,
    x0: Vector,
    eta: float,
    samples: int | None,
    graph: tuple[tuple[int, ...], ...],
) -> Generator[Effect, Any, Vector]:
    """Node ``me`` of ``n = len(graph)``: compute ``samples`` gradients (None: forever), apply
    everyone's; ``graph[k]`` are node k's neighbours."""
    n = len(graph)
    neighbours = graph[me]
    reached = [frozenset((k, *graph[k])) for k in range(n)]  # what an origin's own post reaches
    x = x0
    t = 0  # local steps = gradients applied
    applied = [0] * n  # version vector of the current state
    seen = [_Seen() for _ in range(n)]
    released = [0] * n  # per origin: the next sequence number to move to ``ready``
    held: list[dict[int, tuple[tuple[int, ...], Vector]]] = [{} for _ in range(n)]
    ready: deque[tuple[int, int, tuple[int, ...], Vector]] = deque()
    finals: dict[int, int] = {}  # origin -> gradients it computed in all (from DONE)
    computed = 0
    zeros = np.zeros_like(x0)
    zeros.flags.writeable = False

    def forward(letter: Letter, origin: int) -> Generator[Effect, Any, None]:
        skip = reached[origin]
        others = tuple(k for k in neighbours if k != letter.sender and k not in skip)
        if others:
            yield Post(others, letter.tag, letter.value)

    def take(letters: tuple[Letter, ...]) -> Generator[Effect, Any, None]:
        for letter in letters:
            tag = letter.tag
            origin, number = int(tag[1]), int(tag[2])
            if tag[0] == "done":
                if origin not in finals:
                    finals[origin] = number
                    yield from forward(letter, origin)
                continue
            if not seen[origin].add(number):
                continue  # a copy over another path
            yield from forward(letter, origin)
            held[origin][number] = (tuple(int(v) for v in tag[3:]), letter.value)
            while released[origin] in held[origin]:  # what is in sequence now
                vv, g = held[origin].pop(released[origin])
                ready.append((origin, released[origin], vv, g))
                released[origin] += 1

    def done() -> bool:
        return len(finals) == n and all(applied[k] == finals[k] for k in range(n))

    yield Report("model", x, step=1)
    if samples == 0:
        finals[me] = 0
        if neighbours:
            yield Post(neighbours, ("done", me, 0), zeros)
    while not done():
        yield from take((yield Receive(block=False)))
        if ready:  # received gradients have priority (Alg. 1 line 7)
            origin, seq, vv, g = ready.popleft()
            stale = sum(abs(a - b) for a, b in zip(applied, vv, strict=True))
        elif samples is None or computed < samples:
            vv = tuple(applied)
            g = yield Grad(x)
            origin, seq, stale = me, computed, 0
            computed += 1
            yield Report("compute", vv, step=t + 1, key=(me, seq))
            if neighbours:
                yield Post(neighbours, ("dg", me, seq, *vv), g)
            seen[me].add(seq)
            released[me] += 1
            if computed == samples:
                finals[me] = computed
                if neighbours:
                    yield Post(neighbours, ("done", me, computed), zeros)
        else:  # out of samples: wait for the others' gradients — unless the receive above
            # brought the last DONE, after which nothing more will ever arrive
            if not done():
                yield from take((yield Receive(block=True)))
            continue
        x = x - eta * g
        applied[origin] += 1
        t += 1
        yield Report("staleness", stale, step=t, key=(origin, seq))
        yield Report("model", x, step=t + 1)
    return x
