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

Rejoin. A node that restarted (or lost messages) resumes from a live node's state: its model x
and version vector V, which describe each other exactly (x = x⁰ − η Σ_{(k, c): c < V[k]} g_{k,c}).
What it still needs is every gradient outside V, exactly once, and its own numbering must go on
after every gradient of its last incarnation that anybody saw. So every node keeps the gradients
it saw, the last :data:`RETAIN` per origin, and the resumed node asks its neighbours:

* ``("have", me, *V)`` — resumed node to its neighbours: what it has applied. A neighbour
  answers with every gradient it keeps that is not in V (in sequence order, as ``"dg"`` letters),
  the DONEs it knows, and ``("had", me, next)``: the next sequence number of the asker's own
  gradients after the last one it saw. It also posts what it keeps of the asker's own gradients to
  the asker's other neighbours — the receivers of the asker's direct posts, some of which a death
  may have cut off — who drop what they already have.
* The resumed node applies what arrives as usual, and computes its first gradient only once every
  neighbour has answered (``"had"``), numbered after the largest ``next`` heard.

Ending. A node that applied every gradient is *complete* and says so (``("complete", me, 0)``,
relayed like DONE); it ends only once every node is complete — until then it may have to answer a
node that restarted. The node whose state a restarted node took is told so by its runtime
(``("rejoining", k, 0)`` in its inbox): it forgets that k was complete, so it cannot end before
the new k is complete again, and k can always get from it what it lacks.

Letters are FIFO per link, so a ``"had"`` comes after the gradients it answers with. A node
more than :data:`RETAIN` gradients of one origin behind the node it resumed from cannot be
repaired exactly (docs/algorithms.md, "Restarts and rejoin").

Reports: ``"model"`` (x after ``step − 1`` local steps; ``key`` its :func:`state_key`, which a
node's state for rejoin is read from), ``"state"`` (the same model and step with a newer
``key``: a DONE or COMPLETE learned between two steps), ``"staleness"`` (|S| of the gradient
applied at this step; ``key = (origin, seq)``) and ``"compute"`` (``value`` = the version vector
a node's own gradient ``key = (me, seq)`` was computed on) — the last two are the apply and
compute logs from which :mod:`peerlearn.algorithms.staleness` derives S and Ŝ offline.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import Any

import numpy as np

from peerlearn.algorithms.vectors import descend
from peerlearn.effects import Effect, Grad, Letter, Post, Quantize, Receive, Report, Vector

__all__ = ["RETAIN", "dasgd", "state_key"]

#: gradients kept per origin for rejoin (the newest): far beyond the staleness window of a run
#: (a handful of gradients per node) and small for the models DASGD is run on here
RETAIN = 1024


class _Seen:
    """Which sequence numbers of one origin arrived: a contiguous prefix plus the ones above."""

    __slots__ = ("above", "prefix")

    def __init__(self) -> None:
        self.prefix = 0
        self.above: set[int] = set()

    def next(self) -> int:
        """One past the highest sequence number seen (0: none)."""
        return max(self.above, default=self.prefix - 1) + 1

    def skip_to(self, seq: int) -> None:
        """Count every number below ``seq`` as seen."""
        self.prefix = max(self.prefix, seq)
        self.above = {s for s in self.above if s >= self.prefix}
        while self.prefix in self.above:
            self.above.remove(self.prefix)
            self.prefix += 1

    def add(self, seq: int) -> bool:
        """Record ``seq``; False if it was seen before."""
        if seq < self.prefix or seq in self.above:
            return False
        self.above.add(seq)
        while self.prefix in self.above:
            self.above.remove(self.prefix)
            self.prefix += 1
        return True


def state_key(applied: list[int], finals: dict[int, int], complete: set[int]) -> tuple[int, ...]:
    """A node's state besides its model, as the ``key`` of its model reports: its version
    vector, each node's gradient count from its DONE (−1: not known) and which nodes are known
    complete (1/0) — what :func:`dasgd` resumes from."""
    n = len(applied)
    return (
        *applied,
        *(finals.get(k, -1) for k in range(n)),
        *(int(k in complete) for k in range(n)),
    )


def dasgd(
    me: int,
    x0: Vector,
    eta: float,
    samples: int | None,
    graph: tuple[tuple[int, ...], ...],
    resume: tuple[int, ...] | None = None,
) -> Generator[Effect, Any, Vector]:
    """Node ``me`` of ``n = len(graph)``: compute ``samples`` gradients (None: forever), apply
    everyone's; ``graph[k]`` are node k's neighbours. ``resume``: rejoin from a live node's
    state — ``x0`` is its model and ``resume`` the :func:`state_key` it reported with it."""
    n = len(graph)
    neighbours = graph[me]
    reached = [frozenset((k, *graph[k])) for k in range(n)]  # what an origin's own post reaches
    x = x0
    if resume is not None and len(resume) != 3 * n:
        raise ValueError(f"a DASGD state has 3·n = {3 * n} entries, got {len(resume)}")
    # V of the current state, the DONE counts known and the nodes known complete
    applied = list(resume[:n]) if resume is not None else [0] * n
    finals: dict[int, int] = {}  # origin -> gradients it computed in all (from DONE)
    complete: set[int] = set()  # nodes that applied every gradient (from COMPLETE)
    if resume is not None:
        finals = {k: c for k, c in enumerate(resume[n : 2 * n]) if c >= 0}
        # without itself: it says so again, to the node it resumed from, which forgot it
        complete = {k for k, bit in enumerate(resume[2 * n :]) if bit and k != me}
    t = sum(applied)  # local steps = gradients applied
    seen = [_Seen() for _ in range(n)]
    for k, count in enumerate(applied):
        seen[k].prefix = count
    released = list(applied)  # per origin: the next sequence number to move to ``ready``
    held: list[dict[int, tuple[tuple[int, ...], Vector]]] = [{} for _ in range(n)]
    ready: deque[tuple[int, int, tuple[int, ...], Vector]] = deque()
    #: per origin, the gradients seen (the newest RETAIN), for a node that rejoins
    kept: list[dict[int, tuple[tuple[int, ...], Vector]]] = [{} for _ in range(n)]
    computed = applied[me]
    #: a resumed node computes only once these neighbours said what they saw of it
    unanswered = set(neighbours) if resume is not None else set()
    zeros = np.zeros_like(x0)
    zeros.flags.writeable = False

    def keep(origin: int, seq: int, vv: tuple[int, ...], g: Vector) -> None:
        box = kept[origin]
        box[seq] = (vv, g)
        if len(box) > RETAIN:
            del box[next(iter(box))]  # the oldest seen (insertion order)

    def answer(asker: int, have: tuple[int, ...]) -> Generator[Effect, Any, None]:
        """What ``asker`` (resumed with version ``have``) lacks of what this node keeps."""
        for k in range(n):
            for seq in sorted(c for c in kept[k] if c >= have[k]):
                vv, g = kept[k][seq]
                yield Post((asker,), ("dg", k, seq, *vv), g)
        for k, count in finals.items():
            yield Post((asker,), ("done", k, count), zeros)
        for k in complete:
            yield Post((asker,), ("complete", k, 0), zeros)
        # Its own gradients may have reached some of its neighbours only before it died —
        # also ones its new state counts (the node it resumed from had them): all of them.
        others = tuple(j for j in graph[asker] if j != me)
        if others:
            for seq in sorted(kept[asker]):
                vv, g = kept[asker][seq]
                yield Post(others, ("dg", asker, seq, *vv), g)
        yield Post((asker,), ("had", me, seen[asker].next()), zeros)

    def forward(letter: Letter, origin: int) -> Generator[Effect, Any, None]:
        # The origin posted to its neighbours itself — unless it is this node, restarted: its
        # last incarnation's posts may have died with it, so they go to all of them again.
        skip = reached[origin] if origin != me else frozenset((me,))
        others = tuple(k for k in neighbours if k != letter.sender and k not in skip)
        if others:
            yield Post(others, letter.tag, letter.value)

    def take(letters: tuple[Letter, ...]) -> Generator[Effect, Any, None]:
        nonlocal computed
        for letter in letters:
            tag = letter.tag
            if tag[0] == "have":
                asker = int(tag[1])
                if asker in complete:  # it resumed: it says so again once it is
                    complete.discard(asker)
                    learned.append(asker)
                yield from answer(asker, tuple(int(v) for v in tag[2:]))
                if asker in unanswered:  # it restarted too: this node's "have" died with it
                    yield Post((asker,), ("have", me, *applied), zeros)
                continue
            if tag[0] == "rejoining":  # its runtime gave our state to a restarted node k
                k = int(tag[1])
                if k in complete:  # k must say it again: it may need this node until then
                    complete.discard(k)
                    learned.append(k)
                continue
            if tag[0] == "had":
                if int(tag[1]) in unanswered:
                    unanswered.discard(int(tag[1]))
                    computed = max(computed, int(tag[2]))
                    if not unanswered:
                        yield from answered()
                continue
            origin, number = int(tag[1]), int(tag[2])
            if tag[0] == "done":
                if origin not in finals:
                    finals[origin] = number
                    learned.append(origin)
                    yield from forward(letter, origin)
                continue
            if tag[0] == "complete":
                if origin not in complete:
                    complete.add(origin)
                    learned.append(origin)
                    yield from forward(letter, origin)
                continue
            if not seen[origin].add(number):
                continue  # a copy over another path
            yield from forward(letter, origin)
            vv = tuple(int(v) for v in tag[3:])
            keep(origin, number, vv, letter.value)
            held[origin][number] = (vv, letter.value)
            while released[origin] in held[origin]:  # what is in sequence now
                vv, g = held[origin].pop(released[origin])
                ready.append((origin, released[origin], vv, g))
                released[origin] += 1

    #: DONEs and COMPLETEs learned since the last report of the state: a node that resumes
    #: from this one's state must know them (the nodes that sent them may have ended)
    learned: list[int] = []

    def report_state() -> Generator[Effect, Any, None]:
        if learned:
            learned.clear()
            yield Report("state", x, step=t + 1, key=state_key(applied, finals, complete))

    def answered() -> Generator[Effect, Any, None]:
        """Every neighbour said what it saw of this (resumed) node's own gradients."""
        # Each of them came before that neighbour's "had": in sequence, so released[me] ==
        # computed — unless one was beyond what the neighbours keep (RETAIN): it is skipped
        # here, not waited for.
        if released[me] < computed:
            released[me] = computed
            seen[me].skip_to(computed)
        if samples is not None and computed >= samples and me not in finals:
            finals[me] = computed  # its last incarnation had computed them all
            learned.append(me)
        if me in finals and neighbours:
            # its last incarnation's DONE may have reached only some (the state knew it)
            yield Post(neighbours, ("done", me, finals[me]), zeros)

    def done() -> bool:
        return len(finals) == n and all(applied[k] == finals[k] for k in range(n))

    yield Report("model", x, step=t + 1, key=state_key(applied, finals, complete))
    if unanswered:
        yield Post(neighbours, ("have", me, *applied), zeros)
    if samples == 0:
        finals[me] = 0
        if neighbours:
            yield Post(neighbours, ("done", me, 0), zeros)
    # A node that applied everything is complete, and says so; it ends once every node is:
    # until then it may have to answer a node that restarted (nothing else is left to do).
    while not (done() and len(complete) == n):
        yield from report_state()
        if done():
            if me not in complete:
                complete.add(me)
                learned.append(me)
                if neighbours:
                    yield Post(neighbours, ("complete", me, 0), zeros)
            else:
                yield from take((yield Receive(block=True)))
            continue
        yield from take((yield Receive(block=False)))
        if ready:  # received gradients have priority (Alg. 1 line 7)
            origin, seq, vv, g = ready.popleft()
            stale = sum(abs(a - b) for a, b in zip(applied, vv, strict=True))
        elif unanswered:  # resumed: its numbering waits for what the neighbours saw of it
            yield from take((yield Receive(block=True)))
            continue
        elif samples is None or computed < samples:
            vv = tuple(applied)
            # rounded once, here: it applies what its neighbours will (relays forward it as is)
            g = yield Quantize(("dg",), (yield Grad(x)))
            origin, seq, stale = me, computed, 0
            computed += 1
            yield Report("compute", vv, step=t + 1, key=(me, seq))
            if neighbours:
                yield Post(neighbours, ("dg", me, seq, *vv), g)
            seen[me].add(seq)
            keep(me, seq, vv, g)
            released[me] += 1
            if computed == samples:
                finals[me] = computed
                learned.append(me)
                if neighbours:
                    yield Post(neighbours, ("done", me, computed), zeros)
        else:  # out of samples: wait for the others' gradients — unless the receive above
            # brought the last DONE, after which nothing more will ever arrive
            if not done():
                yield from take((yield Receive(block=True)))
            continue
        x = descend(x, eta, g)  # x − η·g
        applied[origin] += 1
        t += 1
        yield Report("staleness", stale, step=t, key=(origin, seq))
        yield Report("model", x, step=t + 1, key=state_key(applied, finals, complete))
        learned.clear()  # the model's report says it all
    yield from report_state()
    return x
