"""Catching up: a daemon that misses messages it needs takes a live peer's state instead.

A peer that dropped frames for this daemon — it was away (stopped, cut off, restarted: a new
incarnation has lost everything it was sent) or read too slowly — says so when the link is back
(:class:`~peerlearn.transport.catchup.Missed`, with the highest iteration it dropped). If a
local worker is still at or before that iteration, it would wait for good for messages that
will never come: this daemon asks that peer for its state
(:class:`~peerlearn.transport.catchup.StateRequest`) and the peer answers with a Data frame
``("state", r)``: the model of its most advanced live worker, from which every unfinished live
local worker resumes at iteration ``r`` through the algorithm's resume entry point
(``AlgorithmSpec.resume``). The answering peer picks ``r``: its worker's iteration ``s``, or
``s + 1`` when it had dropped frames of iteration ``s`` itself — every frame it sends from then
on reaches this daemon, so the resumed workers never wait for one that was dropped.

Several peers may have dropped frames: this daemon asks the one that dropped the latest
iterations (the furthest ahead), one request at a time, and asks again (that peer or another)
while a notice it holds is still ahead of its workers — a request unanswered within
``REQUEST_TIMEOUT`` is given up. Everything runs on the event loop; the workers take their
resumed programs at their next effect (:meth:`~peerlearn.runtime.worker.Worker.rejoin`).

For the papers' guarantees: a resumed process holds a model another process held at that
iteration, so every model stays in the convex hull of the live models, which the contraction
arguments of Alg 1 and 2 need; the resumed process skips the iterations in between, like a
process that was slow. Algorithms without a resume entry point (``resume=None``) keep their
frames instead (DASGD, the elastic family, gossip, MixML's synchronous protocols: their frames
for a peer that is away wait to be resent) and are told when they cannot rejoin.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from peerlearn.algorithms.spec import AlgorithmSpec, RejoinState
from peerlearn.config import RunConfig
from peerlearn.membership import Membership
from peerlearn.problems import Problem
from peerlearn.runtime.worker import Worker, WorkerState
from peerlearn.transport.catchup import Catchup, Missed, StateRequest
from peerlearn.transport.peers import Transport
from peerlearn.wire import Data

__all__ = ["REQUEST_TIMEOUT", "STATE_KIND", "Rejoin", "Rejoined"]

log = logging.getLogger(__name__)

#: the tag kind of a state frame: ``("state", r)``, the iteration to resume at
STATE_KIND = "state"
#: how long a state request may go unanswered before it is made again (to whichever peer is
#: furthest ahead then)
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class Rejoined:
    """The last catch-up: from which daemon, from and to which iteration, when (monotonic)."""

    peer: int
    was: int
    resumed_at: int
    at: float


class Rejoin:
    """Catch-up of one daemon's workers (see the module docstring)."""

    def __init__(
        self,
        run: RunConfig,
        problem: Problem | None,
        membership: Membership,
        workers: Sequence[Worker],
    ) -> None:
        self._run = run
        self._spec: AlgorithmSpec = run.spec
        self._problem = problem
        self._membership = membership
        self.workers = workers
        self._transport: Transport | None = None
        #: peer cluster → the latest iteration it said it dropped frames of for this daemon
        self._missed: dict[int, int] = {}
        #: the peer asked, and when (time.monotonic()); None: no request out
        self.asking: tuple[int, float] | None = None
        #: no local worker is behind this iteration any more once the resumed programs run
        self._floor = 0
        self.rejoins = 0
        self.last: Rejoined | None = None
        self._told_cannot = False

    def attach(self, transport: Transport) -> None:
        self._transport = transport

    # --- notes from peers (event loop) --------------------------------------------------------

    def on_note(self, peer: int, note: Catchup) -> None:
        match note:
            case Missed(upto=upto):
                if upto > self._missed.get(peer, -1):
                    self._missed[peer] = upto
                self.consider()
            case StateRequest():
                self._answer(peer)

    def consider(self) -> None:
        """Ask for state if a local worker waits, or will, for frames a peer dropped (also
        called every monitor tick: a request unanswered in time is made again)."""
        behind = self._behind()
        if behind is None:
            return
        ahead = [(upto, peer) for peer, upto in self._missed.items() if upto >= behind]
        if not ahead:
            return
        upto, peer = max(ahead)
        if self._spec.resume is None:
            if not self._told_cannot:
                self._told_cannot = True
                log.warning(
                    "daemon %d dropped messages up to iteration %d that workers here still "
                    "need, and %s cannot resume from a peer's state: they go on from iteration "
                    "%d with what arrives",
                    peer,
                    upto,
                    self._spec.name,
                    behind,
                )
            return
        now = time.monotonic()
        if self.asking is not None and now - self.asking[1] < REQUEST_TIMEOUT:
            return
        if self._transport is None:
            return
        self.asking = (peer, now)
        log.info(
            "behind: daemon %d dropped messages up to iteration %d for workers here at "
            "iteration %d; asking it for its state",
            peer,
            upto,
            behind,
        )
        self._transport.request_state(peer)

    def _behind(self) -> int | None:
        """The iteration of the slowest unfinished live local worker (at least the last
        resume point); None if none is left."""
        steps = [w.step for w in self.workers if _resumable(w)]
        return max(min(steps), self._floor) if steps else None

    # --- answering a peer (event loop) --------------------------------------------------------

    def _answer(self, peer: int) -> None:
        live = [w for w in self.workers if w.live and w.position[1] is not None]
        if not live or self._transport is None:
            log.info("daemon %d asked for state: no live worker here to give it", peer)
            return
        worker = max(live, key=lambda w: w.position[0])
        step, model = worker.position
        assert model is not None
        lost = self._transport.lost_upto(peer)
        resume_at = step + 1 if lost is not None and lost >= step else step
        sent = self._transport.send_state(peer, (STATE_KIND, resume_at), worker.pid, step, model)
        log.info(
            "daemon %d asked for state: %s, at iteration %d (resume at %d)",
            peer,
            "sent" if sent else "its link is full, not sent",
            step,
            resume_at,
        )

    # --- a state frame (event loop, from the router) ------------------------------------------

    def on_state(self, data: Data) -> None:
        peer = self._membership.cluster_of[data.sender]
        resume_at = data.tag[1]
        behind = self._behind()
        if self.asking is not None and self.asking[0] == peer:
            self.asking = None
        resume = self._spec.resume
        if resume is None or behind is None or not isinstance(resume_at, int):
            return
        if resume_at <= behind:
            log.info(
                "state from daemon %d (iteration %d) is not ahead of the workers here (%d)",
                peer,
                resume_at,
                behind,
            )
            self.consider()
            return
        workers = [w for w in self.workers if _resumable(w)]
        programs = resume(
            self._run,
            self._problem,
            [w.pid for w in workers],
            RejoinState(resume_at, data.value),
        )
        for w, program in zip(workers, programs, strict=True):
            w.rejoin(resume_at, program)
        self._floor = resume_at
        self.rejoins += 1
        self.last = Rejoined(peer, behind, resume_at, time.monotonic())
        log.info(
            "caught up: workers %s resume at iteration %d from daemon %d's model (were at %d)",
            ", ".join(w.name for w in workers),
            resume_at,
            peer,
            behind,
        )
        self.consider()  # another peer may have dropped later iterations still


def _resumable(w: Worker) -> bool:
    """Live and not done: a worker that can still take a resumed program."""
    return w.state in (WorkerState.CREATED, WorkerState.RUNNING) and not w.done.is_set()
