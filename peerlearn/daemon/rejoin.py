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
on reaches this daemon, so the resumed workers never wait for one that was dropped. What else of
the state the algorithm needs comes in the tag, as integers (DASGD: ``("state", s, *V)``, the
version vector its worker reported with that model).

Algorithms whose frames are kept and that can resume (DASGD, the elastic family) need their
state before they send anything: DASGD numbers its messages per origin, and a restarted process
must not reuse a number its last incarnation sent; a restarted center must not serve before it
is rebuilt. Their daemon starts its workers only once every peer has sent its first note
(``Missed(None)`` when it dropped nothing) and the state asked for, if any, has come
(:meth:`Rejoin.settled`) — or after ``peer_timeout``, with the peers heard so far.

Several peers may have dropped frames: a starting daemon waits for every peer's first note (up
to ``peer_timeout``), then asks the one that dropped the latest iterations (the furthest ahead;
for lockstep protocols the *slowest*, which still waits for this daemon's value of the
iteration it last sent, and whose link sends it its last iterations' frames again), one request
at a time, and asks again (that peer or another)
while a notice it holds is still ahead of its workers — a request unanswered within
``REQUEST_TIMEOUT`` is given up. Everything runs on the event loop; the workers take their
resumed programs at their next effect (:meth:`~peerlearn.runtime.worker.Worker.rejoin`).

For the papers' guarantees: a resumed process holds a model another process held at that
iteration, so every model stays in the convex hull of the live models, which the contraction
arguments of Alg 1 and 2 need; the resumed process skips the iterations in between, like a
process that was slow. Agreement has no resume entry point (``resume=None``: each process's
inputs are its own); it drops frames for a peer that is away and says when it cannot rejoin.

The asynchronous elastic family rejoins between the center and its workers instead (the
records' resume entry point says how): a restarted daemon hosting the center asks every daemon
hosting workers for their workers' *ledgers* — ``("ledger", pid, answered, waiting)`` frames
whose value is the sum of the center's differences that worker applied — and resumes the center
from all of them (after ``REQUEST_TIMEOUT`` with those it has, holding the other workers'
requests until their ledgers come); a restarted daemon hosting workers asks the center's daemon,
which answers with its record of their ledgers and then a state frame with the center's model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from peerlearn.algorithms.spec import (
    AlgorithmSpec,
    DeliveryPolicy,
    Ledger,
    RejoinState,
    Resumer,
)
from peerlearn.config import RunConfig
from peerlearn.effects import Vector
from peerlearn.membership import Membership
from peerlearn.problems import Problem
from peerlearn.runtime.delivery import Delivery
from peerlearn.runtime.worker import Worker, WorkerState
from peerlearn.transport.catchup import Catchup, Missed, StateRequest
from peerlearn.transport.peers import Transport
from peerlearn.wire import Data

__all__ = ["LEDGER_KIND", "REQUEST_TIMEOUT", "STATE_KIND", "STUCK", "Rejoin", "Rejoined"]

log = logging.getLogger(__name__)

#: the tag kind of a state frame: ``("state", r)``, the iteration to resume at
STATE_KIND = "state"
#: the tag kind of a ledger frame: ``("ledger", pid, answered, waiting)`` (centered algorithms)
LEDGER_KIND = "ledger"
#: how long a state request may go unanswered before it is made again (to whichever peer is
#: furthest ahead then)
REQUEST_TIMEOUT = 10.0
#: how long a worker waits on an iteration a peer dropped frames of before it catches up
STUCK = 1.0
#: how soon a worker's ledger is read again when it was taking an answer (a vector sum away)
LEDGER_RETRY = 0.01


@dataclass(frozen=True)
class Rejoined:
    """The last catch-up: from which daemon, from and to which iteration, when (monotonic)."""

    peer: int | None  # None: a center rebuilt from its workers' ledgers
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
        self._keeps = self._spec.delivery is DeliveryPolicy.KEEP
        self._problem = problem
        self._membership = membership
        self.workers = workers
        self._transport: Transport | None = None
        #: peer cluster → the latest iteration it said it dropped frames of for this daemon
        self._missed: dict[int, int] = {}
        #: the same, never cleared by a catch-up: what a restarted daemon decides on
        self._dropped: dict[int, int] = {}
        #: the peer asked, when (time.monotonic()), and whether because the workers stalled
        self.asking: tuple[int, float] | None = None
        self._stalled_ask = False
        #: peers that did not answer a request in time: asked again only when no other can be
        self._unanswered: set[int] = set()
        #: the highest iteration of a peer's frame this daemon dropped on arrival (too far
        #: ahead of its workers: Transport's tag window); -1: none
        self._dropped_here = -1
        #: no local worker is behind this iteration any more once the resumed programs run
        self._floor = 0
        self.rejoins = 0
        self.last: Rejoined | None = None
        self._told_cannot = False
        self._ignored = 0  # state frames not asked for (logged once, then counted)
        self._delivery: Delivery | None = None  # this daemon's own mailboxes
        self._cannot = False  # a state was refused by the algorithm: no rejoin in this run
        self._next_stall_ask = 0.0  # a stalled daemon asks at most once per REQUEST_TIMEOUT
        self._stall_asks = 0
        #: peers that sent their first note since this daemon started
        self.noted: set[int] = set()
        #: peer → the iteration it said it waits to start at from its checkpoint (kept once said:
        #: the agreement counts it even after the peer has started), and the one it said its
        #: workers resumed at in a whole-cluster restart (peerlearn/daemon/restore.py)
        self.starts: dict[int, int] = {}
        self.resumed: dict[int, int] = {}
        #: the state asked for is taken whatever it is, as every process takes it after a
        #: whole-cluster restart (``AlgorithmSpec.cluster_restart``)
        self._adopting = False
        #: set whenever a note or a state arrives (a daemon waiting to start re-checks)
        self.changed = asyncio.Event()
        # Centered algorithms (the elastic family): the center's process, the ledgers received
        # by worker pid, and — on the center's daemon — the peers whose ledgers are still due.
        # (Synchronous EASGD moves in lockstep: it rejoins as the other lockstep protocols do.)
        centered = self._spec.center and not self._spec.lockstep
        self._center = run.center if centered and self._spec.resume is not None else None
        self._ledgers: dict[int, Ledger] = {}
        self._gathering: dict[int, set[int]] = {}
        self._gather_asked: set[int] = set()
        self._gather_since: float | None = None
        self._gathered = False
        #: after a rebuild without them: the peers whose workers' ledgers are still due (asked
        #: again every REQUEST_TIMEOUT while connected; joined into the running center)
        self._late: dict[int, set[int]] = {}
        self._late_asked = 0.0
        self._refused_late: set[int] = set()  # workers whose late ledger was refused (logged)
        #: a daemon that resumed from its checkpoint: the center is rebuilt even if no peer
        #: ran on (a whole-cluster restart), counting the checkpointed ledgers of the workers
        #: here, which resume from their checkpoints instead of starting over
        self._rebuild = False
        self._checkpointed: dict[int, Ledger] = {}
        #: the local workers' ledgers are not to be told yet: this daemon has not decided
        #: whether they resume from their checkpoints or start over (restore.py)
        self.deciding = False
        #: a DOWNPOUR center hosted here resumes from its checkpoint: not rebuilt (it cannot be)
        self.center_restored = False
        self._expected: set[int] = set()  # the peers whose first note a starting daemon awaits
        self._expect_until = 0.0
        #: this daemon's incarnation (its boot time in ns): resumed programs that tell their
        #: peers they restarted say which incarnation they are
        self.incarnation = 1

    def attach(self, transport: Transport) -> None:
        self._transport = transport

    # --- notes from peers (event loop) --------------------------------------------------------

    def on_note(self, peer: int, note: Catchup) -> None:
        match note:
            case Missed(upto=upto, start=start, resumed=resumed):
                self.noted.add(peer)
                if start is not None:
                    self.starts.setdefault(peer, start)
                if resumed is not None:
                    self.resumed[peer] = resumed
                if upto is not None:
                    self._dropped[peer] = max(upto, self._dropped.get(peer, -1))
                if upto is not None and upto > self._missed.get(peer, -1):
                    self._missed[peer] = upto
                    self._unanswered.discard(peer)
                self.consider()
                self.changed.set()
            case StateRequest(restart=restart):
                self._answer(peer, restart)

    @property
    def cannot_resume(self) -> bool:
        """A peer's state could not be resumed from: no catch-up in this run."""
        return self._cannot

    def dropped_here(self, peer: int, upto: int) -> None:
        """This daemon dropped a frame of iteration ``upto`` from daemon ``peer`` on arrival
        (too far ahead of its workers, where frames may drop): as if the peer had said it
        dropped it — a worker that reaches that iteration would wait for good, so it catches
        up from a peer's state instead."""
        self._dropped[peer] = max(upto, self._dropped.get(peer, -1))
        self._dropped_here = max(upto, self._dropped_here)
        if upto > self._missed.get(peer, -1):
            self._missed[peer] = upto
            self._unanswered.discard(peer)
        self.consider()
        self.changed.set()

    def consider(self) -> None:
        """Ask for state if a local worker waits, or will, for frames a peer dropped (also
        called every second: a request unanswered in time is made again, to another peer if
        there is one)."""
        now = time.monotonic()
        if self.asking is not None and now - self.asking[1] >= REQUEST_TIMEOUT:
            peer = self.asking[0]
            log.info("daemon %d did not answer the state request in time", peer)
            self._unanswered.add(peer)
            self.asking = None
            self._adopting = False
            self.changed.set()
        if self.asking is not None or self._transport is None or self._cannot:
            return
        if self._center is not None:
            self._consider_center(now)
            return
        behind = self._behind()
        if behind is None:
            return
        if (
            self._keeps
            and self._spec.resume is not None
            and not self._starting()
            and not self._spec.lockstep
        ):
            # Frames are kept: what a peer dropped is what a restart lost, which the state
            # taken before the workers started covers (the algorithm repairs the rest itself).
            # Not so in lockstep: a peer away while this daemon restarted says what it dropped
            # only once it is back, after the workers started over — and they wait, for good,
            # for what it dropped, unless they take its state then.
            self._consider_stall(now)
            return
        if self.rejoins == 0 and not self.noted >= self._expected and now < self._expect_until:
            # A restart: ask once every peer has said what it dropped (or in time). Asked at
            # the first note, the state may be older than what the next peer dropped: a
            # second catch-up, and a second pause for the peers waiting on this daemon.
            return
        ahead = [(upto, peer) for peer, upto in self._missed.items() if upto >= behind]
        if self._spec.lockstep:  # a peer that sent it nothing (not a neighbour) has no round
            ahead = [(upto, peer) for upto, peer in ahead if upto > 0]
        if not ahead:
            self._consider_stall(now)
            return
        if not self._stuck(max(upto for upto, _ in ahead), now):
            return  # they go on with what arrives (the quorum may not need those frames)
        fresh = [(upto, peer) for upto, peer in ahead if peer not in self._unanswered]
        # Lockstep: the slowest peer waits for this daemon's frames of the iteration it last
        # sent (what it dropped up to): resume there, or it waits for good.
        upto, peer = min(fresh or ahead) if self._spec.lockstep else max(fresh or ahead)
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
        self._ask(peer, now, stalled=False)
        log.info(
            "behind: daemon %d dropped messages up to iteration %d for workers here at "
            "iteration %d; asking it for its state",
            peer,
            upto,
            behind,
        )

    def _stuck(self, upto: int, now: float) -> bool:
        """Whether a local worker needs what was dropped: not started yet, or waiting for
        STUCK seconds on an iteration at or before ``upto`` (a healthy worker whose quorum is
        met without those frames is left alone)."""
        for w in self.workers:
            if not _resumable(w):
                continue
            if w.state is WorkerState.CREATED:
                return True
            wt = w.mailbox.waiting()
            if wt is None or now - wt.since < STUCK:
                continue
            t = wt.tag[1] if len(wt.tag) > 1 and isinstance(wt.tag[1], int) else None
            if t is None or t <= upto:  # an inbox wait has no iteration: it may need them
                return True
        return False

    def _consider_stall(self, now: float) -> None:
        """Where frames are kept (DASGD), a daemon that resumed once and whose workers have
        waited on their inboxes for REQUEST_TIMEOUT asks a peer for its state again: the
        peers that could answer what its workers wait for may have ended since (a peer's
        final state says so)."""
        if not self._keeps or self.rejoins == 0 or not self._spec.rejoin_when_stalled:
            return
        if now < self._next_stall_ask:
            return
        waits = [w.mailbox.waiting() for w in self.workers if _resumable(w)]
        if not waits or any(wt is None or now - wt.since < REQUEST_TIMEOUT for wt in waits):
            return
        self._next_stall_ask = now + REQUEST_TIMEOUT
        self._stall_asks += 1
        peers = sorted(self._transport.connected_clusters()) if self._transport else []
        if not peers:
            return
        peer = peers[self._stall_asks % len(peers)]
        log.info(
            "workers waited %.0fs since resuming: asking daemon %d for its state",
            REQUEST_TIMEOUT,
            peer,
        )
        self._ask(peer, now, stalled=True)

    def _ask(self, peer: int, now: float, stalled: bool) -> None:
        assert self._transport is not None
        self.asking = (peer, now)
        self._stalled_ask = stalled
        self._transport.request_state(peer, restart=self._starting())

    def dropped_for_us(self, at: int) -> bool:
        """A peer said it dropped frames for this daemon of iteration ``at`` or later: it had
        sent its last incarnation that far, so it ran on while this one was away."""
        return any(upto >= at for upto in self._dropped.values())

    def dropped_by(self, peer: int) -> bool:
        """``peer`` said it dropped frames for this daemon (it ran on while this one was away)."""
        return peer in self._dropped

    def furthest(self) -> int | None:
        """The peer that dropped the latest iterations for this daemon (None: none did)."""
        return max(self._dropped, key=lambda p: (self._dropped[p], -p), default=None)

    def ask_state(self, peer: int) -> None:
        """Ask ``peer`` for its state now (a daemon that comes up after a whole-cluster restart
        and is behind where the others resumed)."""
        self._ask(peer, time.monotonic(), stalled=False)

    def adopt(self, peer: int) -> None:
        """Ask ``peer`` for its state and take it whatever it is (a whole-cluster restart)."""
        self._adopting = True
        self._ask(peer, time.monotonic(), stalled=False)

    def _starting(self) -> bool:
        """No local worker has started yet (a daemon that waits to rejoin before it sends)."""
        return any(w.state is WorkerState.CREATED for w in self.workers)

    def expect(self, peers: set[int], until: float) -> None:
        """A starting daemon's first catch-up waits until ``peers`` have all sent their first
        note, or until ``until`` (time.monotonic()): the state is asked of the peer furthest
        ahead among them then, once, rather than of the first to say it dropped something
        (where frames are kept, the workers start only after that)."""
        self._expected = set(peers)
        self._expect_until = until

    def settled(self, peers: set[int]) -> bool:
        """Every peer of ``peers`` sent its first note, and no state request is out."""
        return self.noted >= peers and not self.waiting_for_state()

    def waiting_for_state(self) -> bool:
        """A state request is out (made again, to the peer furthest ahead, if it times out),
        or a restarted center still waits for its workers' ledgers."""
        return self.asking is not None or self._gather_since is not None

    # --- centered algorithms: the elastic family ------------------------------------------

    def checkpointed(self, ledgers: dict[int, Ledger]) -> None:
        """The local workers resume from their checkpoints, with these ledgers: a center
        rebuilt here counts them, and does not start those workers over."""
        self._checkpointed = dict(ledgers)

    def rebuild_center(self) -> None:
        """Rebuild the center hosted here (from every worker's ledger) though no peer ran on:
        this daemon resumes from its checkpoint, a whole-cluster restart maybe."""
        self._rebuild = True
        self.consider()

    def _consider_center(self, now: float) -> None:
        """A restarted daemon (its workers not started, a peer said it lost frames for it):
        hosting the center, it asks every daemon hosting workers for their ledgers and
        rebuilds the center from them; hosting workers only, it asks the center's daemon for
        the center's model and its record of their ledgers."""
        if self._late:
            self._ask_late(now)
        if not (self._missed or self._rebuild) or self._gathered:
            return
        local = any(w.pid == self._center for w in self.workers)
        if not self._starting():
            if local and not self._told_cannot:
                # A restart noticed only after the center started afresh (the notes came after
                # peer_timeout): requests lost with the last center are never answered.
                self._told_cannot = True
                log.warning(
                    "daemon(s) %s lost frames for this daemon after its center had started: "
                    "the center was not rebuilt, and workers waiting on answers lost with its "
                    "last incarnation stay blocked",
                    ", ".join(map(str, sorted(self._missed))),
                )
            return
        center_cluster = self._membership.cluster_of[self._center]  # type: ignore[index]
        if not local:
            if center_cluster in self._missed and self.rejoins == 0:
                self._ask(center_cluster, now, stalled=False)
                log.info("restarted: asking daemon %d, the center's, for its state", center_cluster)
            return
        assert self._transport is not None
        if self.center_restored:
            return
        if self._gather_since is None:
            if not self._center_can_resume():
                return
            self._gather_since = now
        for peer in sorted(self.noted - self._gather_asked):
            pids = {p for p in self._membership.members[peer] if p != self._center}
            if pids:
                self._gather_asked.add(peer)
                self._gathering[peer] = pids
                self._transport.request_state(peer, restart=True)
        if now - self._gather_since >= REQUEST_TIMEOUT:
            late = {peer: set(pids) for peer, pids in self._gathering.items()}
            for peer in self._owing() - self._gather_asked:
                late[peer] = {p for p in self._membership.members[peer] if p != self._center}
            log.warning(
                "the center is rebuilt without the ledgers of daemon(s) %s, which did not "
                "answer in %.0fs: it holds their workers' requests until their ledgers come "
                "(asked again every %.0fs)",
                ", ".join(map(str, sorted(late))),
                REQUEST_TIMEOUT,
                REQUEST_TIMEOUT,
            )
            self._resume_center()
            if not self._cannot:
                self._late = late
                self._late_asked = now
        elif not self._gathering and self._gather_asked >= self._owing():
            self._resume_center()

    def _ask_late(self, now: float) -> None:
        """Ask the peers whose ledgers the rebuilt center lacks again, while they are
        connected (a daemon away during the rebuild answers once it is back)."""
        if self._transport is None or now - self._late_asked < REQUEST_TIMEOUT:
            return
        self._late_asked = now
        for peer in sorted(set(self._late) & self._transport.connected_clusters()):
            self._transport.request_state(peer, restart=True)

    def _center_can_resume(self) -> bool:
        """Whether this algorithm's center can be rebuilt from ledgers at all (DOWNPOUR's and
        MDOWNPOUR's cannot: no use waiting for the workers' daemons then); said once if not."""
        assert self._spec.resume is not None and self._center is not None
        if self._problem is None:
            return False
        try:  # building the programs runs none of them
            self._spec.resume(
                self._run, self._problem, [self._center], RejoinState(1, self._problem.x0())
            )
        except ValueError as exc:
            log.warning("restarted, but the center cannot resume: %s", exc)
            self._cannot = True
            self._gathered = True
            self.changed.set()
            return False
        return True

    def gathering(self) -> list[int]:
        """The daemons whose workers' ledgers a restarted center still waits for."""
        if self._gather_since is None:
            return sorted(self._late)  # after a rebuild: the ones still late
        return sorted(set(self._gathering) | (self._owing() - self._gather_asked))

    def _owing(self) -> set[int]:
        """The peer daemons hosting workers of the center."""
        me = {w.pid for w in self.workers}
        return {
            c
            for c, pids in enumerate(self._membership.members)
            if any(p != self._center and p not in me for p in pids)
        }

    def _resume_center(self) -> None:
        self._gathered = True
        self._gather_since = None
        self._gathering.clear()
        self.changed.set()
        # (workers here that resume from their checkpoints are counted by their ledgers)
        workers = [w for w in self.workers if _resumable(w) and w.pid not in self._checkpointed]
        model = self._problem.x0() if self._problem is not None else None
        if model is None or self._spec.resume is None:
            return
        ledgers = {**self._ledgers, **self._checkpointed}
        try:
            programs = self._spec.resume(
                self._run,
                self._problem,
                [w.pid for w in workers],
                RejoinState(1, model, (), ledgers),
            )
        except ValueError as exc:
            log.warning("the center cannot resume, no rejoin in this run: %s", exc)
            self._cannot = True
            return
        for w, program in zip(workers, programs, strict=True):
            w.rejoin(1, program)
        self.rejoins += 1
        self.last = Rejoined(None, 0, 1, time.monotonic())
        log.info(
            "center rebuilt from the ledgers of %d worker(s) (%d checkpointed here); %d "
            "request(s) lost with it are answered",
            len(ledgers),
            len(self._checkpointed),
            sum(1 for lg in ledgers.values() if lg.waiting is not None),
        )

    def on_ledger(self, data: Data) -> None:
        """A ledger frame ``("ledger", pid, answered, waiting)``: a worker's, for the center's
        daemon; the center's record of a local worker's, before the center's state frame."""
        peer = self._membership.cluster_of[data.sender]
        tag = data.tag
        ok = len(tag) == 4 and all(type(v) is int and v >= 0 for v in tag[1:])
        pid = tag[1] if ok else None
        if (
            not ok
            or not isinstance(pid, int)
            or pid >= len(self._membership.cluster_of)
            or pid == self._center
        ):
            self._ignored += 1
            if self._ignored == 1:  # then counted only: a peer cannot flood the log
                log.warning("ignoring a malformed ledger frame from daemon %d", peer)
            return
        assert isinstance(pid, int)
        answered, waiting = int(tag[2]), int(tag[3])
        late = self._late.get(peer)
        if late is not None and pid in late:
            if self._join_late(pid, answered, waiting, data.value):
                late.discard(pid)
                if not late:
                    del self._late[peer]
                self._ledgers[pid] = Ledger(answered, waiting or None, data.value)
            return
        if self._gathered and pid in self._ledgers:
            return  # an answer to a request made again after the first answer: counted once
        asked_center = self.asking is not None and self.asking[0] == peer
        owed = self._gathering.get(peer)
        if owed is not None and pid in owed:
            owed.discard(pid)
            if not owed:
                del self._gathering[peer]
        elif not asked_center:
            self._ignored += 1
            if self._ignored == 1:
                log.warning("ignoring a ledger frame from daemon %d that was not asked for", peer)
            return
        self._ledgers[pid] = Ledger(answered, waiting or None, data.value)
        if owed is not None:
            self.consider()

    def _join_late(self, pid: int, answered: int, waiting: int, total: Vector) -> bool:
        """A ledger the rebuilt center lacked: into the center's inbox, which adds it (the
        center program's *late ledger*); False if it is one no worker of the run can hold."""
        assert self._center is not None and self._spec.resume is not None
        if self._delivery is None or self._problem is None:
            return False
        ledger = Ledger(answered, waiting or None, total)
        try:  # the record's check of a ledger (building a program runs none of it)
            self._spec.resume(
                self._run, self._problem, [pid], RejoinState(1, total, (), {pid: ledger})
            )
        except ValueError as exc:
            self._ignored += 1
            if pid not in self._refused_late:  # once per worker: it is asked again and again
                self._refused_late.add(pid)
                log.warning(
                    "refusing the late ledger of worker %s: %s; the center keeps holding its "
                    "requests",
                    self._membership.name(pid),
                    exc,
                )
            return False
        self._delivery.deliver_to(
            [self._center], (LEDGER_KIND, pid, answered, waiting), pid, total, True
        )
        log.info(
            "the ledger of worker %s came late (answered %d, waiting on %s): joined into the "
            "center",
            self._membership.name(pid),
            answered,
            waiting or "none",
        )
        return True

    def _answer_center(self, peer: int) -> None:
        """The center's daemon answers a restarted worker daemon with the center's model and
        its record of that daemon's workers' ledgers; a worker daemon answers the restarted
        center's with every local worker's ledger."""
        assert self._transport is not None
        asker = self._membership.members[peer]
        center = next((w for w in self.workers if w.pid == self._center), None)
        if center is not None:
            step, xc, key = center.position
            if xc is None:
                log.info("daemon %d asked for the center's state: the center has not started", peer)
                return
            sums = center.ledger[1] if center.ledger is not None else {}
            last = dict(
                zip([p for p in range(self._run.processes) if p != self._center], key, strict=False)
            )
            for pid in asker:
                total = sums.get(pid)
                if total is None:
                    total = np.zeros_like(xc)
                tag = (LEDGER_KIND, pid, int(last.get(pid, 0)), 0)
                self._transport.send_state(peer, tag, center.pid, step, total)
            self._transport.send_state(peer, (STATE_KIND, step, *key), center.pid, step, xc)
            log.info(
                "daemon %d asked for state: sent the center's, after %d requests", peer, step - 1
            )
        elif self._center in asker:
            ledgers = [self._ledger_of(w) for w in self.workers if w.pid != self._center]
            # Not decided yet (the held checkpoint's ledgers may not be the ones they go on
            # with), unless the asker resumed from a checkpoint too and dropped nothing for
            # this daemon: then they are (a whole-cluster restart); or a worker is taking an
            # answer. Soon again, while the link lives.
            wait = self.deciding and (peer not in self.starts or peer in self._dropped)
            if wait or any(lg is None for lg in ledgers):
                if peer in self._transport.connected_clusters():
                    loop = asyncio.get_running_loop()
                    loop.call_later(LEDGER_RETRY, self._answer_center, peer)
                return
            for pid, lg in zip(
                [w.pid for w in self.workers if w.pid != self._center], ledgers, strict=True
            ):
                assert lg is not None
                tag = (LEDGER_KIND, pid, lg.answered, lg.waiting or 0)
                self._transport.send_state(peer, tag, pid, lg.answered, lg.total)
            log.info("the center's daemon %d restarted: sent it the workers' ledgers", peer)
        else:
            log.info("daemon %d asked for state: neither it nor this daemon hosts the center", peer)

    def _ledger_of(self, w: Worker) -> Ledger | None:
        """Worker ``w``'s ledger as the restarted center must count it; None while it cannot be
        told (``w`` has just taken an answer and not yet reported what it applied).

        A worker reports that it waits on the request of iteration t before sending it, and
        computes a gradient before it takes the answer: the last center's answer may be in its
        mailbox already. Then the worker will apply it, and the center must count it — the
        ledger is the one after that answer. Answers of the last center that are not in the
        mailbox never come (the link dropped them when the center's restart was seen)."""
        assert self._problem is not None and self._center is not None
        snapshot = w.ledger
        if snapshot is None:
            return Ledger(0, None, np.zeros(self._problem.dim, self._problem.dtype))
        answered, total, key = snapshot
        waiting = key[0] if key and type(key[0]) is int else None
        if waiting is None:
            return Ledger(answered, None, total)
        held, taken = w.mailbox.held(("rep", waiting), self._center)
        if w.ledger is not snapshot:
            return None  # it reported meanwhile: read again
        if held is not None:
            total = total + held.value
            total.flags.writeable = False
            return Ledger(waiting, None, total)
        if taken and w.live and not w.done.is_set():
            return None
        return Ledger(answered, waiting, total)

    def _partners(self) -> set[int]:
        """The peer daemons this daemon's workers exchange frames with: the center's and its
        workers' (centered algorithms), the neighbours' (a topology), or every peer."""
        cluster_of = self._membership.cluster_of
        me = {w.pid for w in self.workers}
        if self._spec.center:
            center = self._run.center
            pids = set(range(len(cluster_of))) if center in me else {center}
        elif self._spec.topology is not None:
            pids = {j for p in me for j in self._run.graph.neighbours[p]}
        else:
            pids = set(range(len(cluster_of)))
        return {cluster_of[p] for p in pids - me} - {cluster_of[p] for p in me}

    def _behind(self) -> int | None:
        """The iteration of the slowest unfinished live local worker (at least the last
        resume point); None if none is left."""
        steps = [w.step for w in self.workers if _resumable(w)]
        return max(min(steps), self._floor) if steps else None

    # --- answering a peer (event loop) --------------------------------------------------------

    def _answer(self, peer: int, restart: bool) -> None:
        if self._center is not None:
            if self._transport is not None:
                self._answer_center(peer)
            return
        live = [w for w in self.workers if w.live and w.position[1] is not None]
        if not live or self._transport is None:
            log.info("daemon %d asked for state: no live worker here to give it", peer)
            return
        worker = max(live, key=lambda w: w.position[0])
        step, model, extra = worker.position
        assert model is not None
        lost = self._transport.lost_upto(peer)
        # Where frames drop, iteration s's own frames may be gone: resume after them. Where
        # they are kept, the state is exact at s (and the algorithm repairs the rest itself).
        resume_at = step + 1 if not self._keeps and lost is not None and lost >= step else step
        if self._spec.lockstep and lost is not None and 0 < lost < step:
            # Past the iteration it last sent the asker: that one's round still waits for the
            # asker's value (at the peers it has not reached), so the asker resumes there.
            resume_at = lost
        if self._run.steps is not None and not self._keeps:  # T + 1 iterations at most
            resume_at = min(resume_at, self._run.steps + 1)
        tag = (STATE_KIND, resume_at, *(int(v) for v in extra))
        self._transport.send_state(peer, tag, worker.pid, step, model)
        if self._keeps and restart:
            # Its program must not end before the restarted node is complete again: it may be
            # the one that node needs (peerlearn/algorithms/dasgd.py, "Ending"). Only for a
            # restart, which takes the state whatever it is.
            self._tell_rejoining(worker, peer)
        log.info(
            "daemon %d asked for state: sent, at iteration %d (resume at %d)",
            peer,
            step,
            resume_at,
        )

    def _tell_rejoining(self, worker: Worker, peer: int) -> None:
        if self._delivery is None:
            return
        zeros = np.zeros_like(worker.position[1])
        zeros.flags.writeable = False
        for pid in self._membership.members[peer]:
            self._delivery.deliver_to([worker.pid], ("rejoining", pid, 0), pid, zeros, True)

    def deliver_with(self, delivery: Delivery) -> None:
        """Where notes for this daemon's own workers go (the ``rejoining`` letter)."""
        self._delivery = delivery

    # --- a state frame (event loop, from the router) ------------------------------------------

    def on_state(self, data: Data) -> None:
        if data.tag[0] == LEDGER_KIND:
            self.on_ledger(data)
            return
        peer = self._membership.cluster_of[data.sender]
        resume_at = data.tag[1]
        if self.asking is None or self.asking[0] != peer or not isinstance(resume_at, int):
            self._ignored += 1  # a late answer, or one nobody asked for: never taken
            if self._ignored == 1:
                log.warning("ignoring a state frame from daemon %d that was not asked for", peer)
            return
        stalled = self._stalled_ask
        self.asking = None
        self.changed.set()
        behind = self._behind()
        resume = self._spec.resume
        if resume is None or behind is None:
            return
        # The peer cannot know which of its frames this daemon dropped on arrival: resumed at
        # an iteration whose frames were dropped here, the workers would wait for them. Past
        # them by one iteration of its model at most (as a peer that dropped frames answers);
        # a model older than that is not taken — a peer further ahead is asked.
        if self._dropped_here >= resume_at:
            if self._dropped_here > data.step:
                log.info(
                    "state from daemon %d (iteration %d) is older than frames dropped here "
                    "(iteration %d): asking another peer",
                    peer,
                    data.step,
                    self._dropped_here,
                )
                self._missed.pop(peer, None)
                self.consider()
                return
            resume_at = self._dropped_here + 1
        if self._run.steps is not None and not self._keeps:
            resume_at = min(resume_at, self._run.steps + 1)
        extra = tuple(v for v in data.tag[2:] if isinstance(v, int))
        adopting, self._adopting = self._adopting, False
        if adopting and self._spec.cluster_restart is not None:
            extra = self._spec.cluster_restart(extra)
        if not adopting and (resume_at < behind or (resume_at == behind and not stalled)):
            # It is not ahead: what it said it dropped is not what the workers here miss.
            log.info(
                "state from daemon %d (iteration %d) is not ahead of the workers here (%d)",
                peer,
                resume_at,
                behind,
            )
            self._missed.pop(peer, None)
            self.consider()
            return
        workers = [w for w in self.workers if _resumable(w)]
        if self._center is not None:  # the center's state: each worker resumes at its own step
            self._resume_from_center(
                peer,
                resume,
                workers,
                RejoinState(resume_at, data.value, extra, dict(self._ledgers)),
            )
            return
        try:
            programs = resume(
                self._run,
                self._problem,
                [w.pid for w in workers],
                RejoinState(resume_at, data.value, extra, incarnation=self.incarnation),
            )
        except ValueError as exc:  # a state this algorithm cannot resume from, ever
            log.warning("state from daemon %d not taken, no rejoin in this run: %s", peer, exc)
            self._cannot = True
            self.changed.set()
            return
        for w, program in zip(workers, programs, strict=True):
            # a stalled worker takes a state at its own step: the hand-over must be ahead
            w.rejoin(max(resume_at, w.step + 1) if stalled else resume_at, program)
        self._floor = resume_at
        self.rejoins += 1
        self.last = Rejoined(peer, behind, resume_at, time.monotonic())
        if self._spec.lockstep:
            # Every peer that dropped frames for the last incarnation sends its last iterations'
            # frames again: those ahead of resume_at too, and resuming further would skip the
            # round the slowest waits in. Nothing more to ask anyone.
            self._missed.clear()
        elif self._missed.get(peer, -1) <= (resume_at if self._keeps else resume_at - 1):
            # Its frames from resume_at on reach this daemon: what it dropped is covered. Not
            # a note that overtook the answer on the link (notes go before queued frames) for
            # a later iteration: that drop still stands.
            self._missed.pop(peer, None)
        log.info(
            "caught up: workers %s resume at iteration %d from daemon %d's model (were at %d)",
            ", ".join(w.name for w in workers),
            resume_at,
            peer,
            behind,
        )
        if not self._keeps and self._transport is not None:
            # They skip iterations < resume_at: a peer that waits for their frames of those
            # must be told, as if they had been dropped, or it would wait for good.
            self._transport.lose_all(resume_at - 1)
        elif self._spec.lockstep and self._transport is not None:
            # Lockstep: the peers that said what they dropped for the last incarnation are at
            # resume_at or past it. One that did not (away meanwhile) may wait for a frame of
            # an earlier iteration the last incarnation owed it: it is told frames up to
            # resume_at are lost, and asks for a state when it is back — whose answer resumes
            # it at resume_at (``_answer``: the lost iteration), the first this incarnation
            # sends it. (At resume_at − 1 it would wait for a frame nobody sends.)
            for peer in sorted(self._partners() - self.noted):
                self._transport.lose_to(peer, resume_at)
        self.consider()  # another peer may have dropped later iterations still

    def _resume_from_center(
        self, peer: int, resume: Resumer, workers: list[Worker], state: RejoinState
    ) -> None:
        try:
            programs = resume(self._run, self._problem, [w.pid for w in workers], state)
        except ValueError as exc:
            log.warning("state from daemon %d not taken, no rejoin in this run: %s", peer, exc)
            self._cannot = True
            return
        starts = []
        for w, program in zip(workers, programs, strict=True):
            own = state.ledgers.get(w.pid)
            starts.append((own.answered if own is not None else 0) + 1)
            w.rejoin(starts[-1], program)
            if own is not None and w.state is WorkerState.CREATED:
                w.ledger = (own.answered, own.total, ())  # not a held checkpoint's any more
        self.rejoins += 1
        self._gathered = True
        self.last = Rejoined(peer, 0, min(starts, default=1), time.monotonic())
        log.info(
            "caught up: workers %s resume from the center's model (daemon %d, %d requests "
            "served), each after its last answered request",
            ", ".join(w.name for w in workers),
            peer,
            state.step - 1,
        )


def _resumable(w: Worker) -> bool:
    """Live and not done: a worker that can still take a resumed program."""
    return w.state in (WorkerState.CREATED, WorkerState.RUNNING) and not w.done.is_set()
