"""Resuming from a checkpoint (``--state-dir``): at which iteration, from which model.

A daemon started on a state directory that holds a checkpoint
(:mod:`peerlearn.daemon.checkpoint`) does not start its workers at once. Its first note to
every peer says that it waits, and at which iteration its checkpoint is
(:class:`~peerlearn.transport.catchup.Missed` ``start``); it waits for every peer's first
note (up to ``peer_timeout``), then:

* **Restart with live peers** — a peer said it dropped frames for this daemon of the
  checkpoint's iteration or later: it ran on while this one was away. The workers resume from
  the checkpoint (each its own iteration, model and generator state), and the peers' state
  wins where it is newer: the catch-up of :mod:`peerlearn.daemon.rejoin` asks for it as for any
  restarted daemon. Where frames are kept and numbered (DASGD), a live peer's state is always
  taken, before the workers start — its own checkpoint may count gradients that never reached
  anyone — and the checkpoint is the starting point only if no peer answers.

* **Whole-cluster restart** — no peer ran on that far (every daemon heard is starting too, or
  none is up, or the peers are behind this checkpoint and will take its state). The daemons
  agree on **the highest iteration every one of them has checkpointed**: the lowest of their
  checkpoints' iterations, T*. Every process resumes at iteration T*: from its own checkpointed
  model (Alg 1 and 2, the MixML protocols, synchronous EASGD) — a daemon whose checkpoint is
  further along keeps its newer model and counts its iterations from T* again — or, where a
  model agrees with the rest of the state only as a pair (DASGD: x and its version vector),
  from the checkpointed state of the daemon at T* (the lowest cluster id among ties), which
  every daemon takes (``AlgorithmSpec.cluster_restart`` says what of it still holds). Why: Alg 1
  and 2 wait in each iteration for a quorum of that iteration's values, and every message of
  the last incarnations is gone: daemons resuming at different iterations would wait for values
  nobody sends again. Where frames are dropped (Alg 1 and 2), each daemon that resumed tells
  its peers that frames of the iterations before its resume point will never come
  (:meth:`Transport.lose_all`), so a daemon that comes
  up late (it meets running peers) and is behind takes a newer state, and one that is ahead
  gives its own.

The asynchronous elastic family (asynchronous EASGD, EAMSGD) checkpoints its workers only: each
worker's model with the *ledger* that goes with it (the sum D_i of the center's differences it
applied, its last answered request — taken as the worker reports its model, between two
requests). Its center is never resumed from a checkpoint; it is rebuilt, x̃ = x̃_1 + Σ_i D_i,
from every worker's ledger: the checkpointed ones of the workers hosted with it, and those the
daemons hosting the others send (:mod:`peerlearn.daemon.rejoin`) — live ones if they ran on,
their checkpointed ones after a whole-cluster restart. There is no agreed iteration: each
worker resumes from its own checkpoint at its own iteration (the center serves requests in any
order). A daemon hosting workers only waits for the first note of the center's daemon, however
long (its workers can do nothing without the center), and goes by it: that daemon ran on (it
dropped frames for this one) — the workers take the center's model and its record of their
ledgers, asked for until it comes (the center served requests their checkpoint does not
count); it starts from a checkpoint too — they resume from theirs; it started without one —
they start over with its new center. The center's model is then the sum of the ledgers the
workers resume with, and each worker's model has had exactly its own ledger applied, so
x̃ + Σ_i x^i is what the gradients made of it (the conservation law), though the checkpoints
were taken at different moments. EAMSGD's momentum is not kept: it restarts at 0.

DOWNPOUR's and MDOWNPOUR's center cannot be rebuilt (its model is not a sum the workers hold):
it resumes from its own checkpoint (model, requests served, the last answered per worker), and
every worker, hosted with it or not, from its model after the last request its record answered
for that worker — so each request is served once; it counts as served what its record answered
(not the count it saved). A center's daemon restarted alone while its workers run on resumes it
the same way, but requests its last incarnation had not answered are lost, and those answered
after its checkpoint are not counted (no ledger says which they were): workers waiting on one
stay blocked and the center never counts the run done — a whole-cluster restart recovers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from peerlearn.algorithms.spec import AlgorithmSpec, DeliveryPolicy, Ledger, RejoinState
from peerlearn.config import RunConfig
from peerlearn.daemon.checkpoint import Checkpoint, CheckpointError, SavedWorker, iteration
from peerlearn.daemon.rejoin import REQUEST_TIMEOUT, Rejoin
from peerlearn.effects import Program, Tag, Vector
from peerlearn.problems import Problem
from peerlearn.runtime.worker import Worker
from peerlearn.transport.peers import Transport

if TYPE_CHECKING:
    from peerlearn.daemon.node import Daemon

__all__ = ["Restore", "resumable", "start_from_checkpoint"]

log = logging.getLogger(__name__)


def resumable(spec: AlgorithmSpec) -> str | None:
    """Why a checkpoint of ``spec``'s runs cannot be resumed from; None if it can."""
    if spec.resume is None:
        return f"{spec.name} has no resume entry point (each process's inputs are its own)"
    return None


class Restore:
    """The checkpoint one daemon resumes from, and how its workers take it."""

    def __init__(
        self,
        run: RunConfig,
        problem: Problem | None,
        workers: Sequence[Worker],
        checkpoint: Checkpoint,
        incarnation: int,
    ) -> None:
        self._run = run
        self.spec = run.spec
        self._problem = problem
        self._workers = workers
        self.checkpoint = checkpoint
        self._incarnation = incarnation
        self._saved = {s.pid: s for s in checkpoint.workers}
        #: a center served asynchronously (the elastic family, DOWNPOUR): no agreed iteration
        self.centered = self.spec.center and not self.spec.lockstep
        #: the asynchronous elastic family: the center is rebuilt from ledgers, never resumed
        #: from its checkpoint; its workers resume from theirs with the ledgers that go with them.
        #: DOWNPOUR's and MDOWNPOUR's center resumes from its checkpoint, and their workers
        #: from its model and record.
        self.rebuilt = self.spec.center_rebuilt
        self._center = run.center if self.centered else None
        #: how it resumed: "live peers", "whole-cluster restart", "joined a whole-cluster
        #: restart" or, for elastic workers, "center started afresh" (None: not yet)
        self.mode: str | None = None
        self.agreed: int | None = None  # the whole-cluster restart's iteration
        #: frames are kept and numbered: a live peer's state is taken before the workers start
        #: (the elastic family: a live center's)
        self.takes_live_state = self.spec.delivery is DeliveryPolicy.KEEP and not self.spec.lockstep
        #: frames for an away peer are dropped: resumed workers tell their peers that frames of
        #: the iterations they skipped never come (where frames are kept, nothing is skipped
        #: that a peer waits for: it has them, or gets them resent)
        self.drops = self.spec.delivery is DeliveryPolicy.DROP_WHEN_AWAY

    @property
    def step(self) -> int:
        """The checkpoint's iteration: its slowest worker's (a center counts requests, not
        iterations)."""
        return iteration(self.checkpoint, self._center)

    def check(self) -> None:
        """CheckpointError unless every worker can resume from its checkpointed state: its
        iteration within the run, a program the algorithm builds from it."""
        limit = None
        if self._run.steps is not None:
            # one process's iterations; where frames are kept (DASGD) a step applies anyone's
            # gradient, so a process makes at most what all of them do
            keeps = self.spec.delivery is DeliveryPolicy.KEEP
            limit = (self.spec.planned_iterations(self._run) if keeps else self._run.steps) + 1
        for w in self._resuming():
            saved = self._saved[w.pid]
            if limit is not None and saved.step > limit:
                raise CheckpointError(
                    f"cannot resume {w.name}: its checkpoint is at iteration {saved.step}, past "
                    f"the {limit - 1} iterations of this run"
                )
            self._program(w, saved, saved.step, saved.extra).close()

    def own(self, at: int | None = None) -> None:
        """Every worker from its own checkpointed state — at iteration ``at`` instead of its
        own when given (a whole-cluster restart's agreed point); an elastic center is rebuilt
        instead, and workers hosted with a DOWNPOUR center resume from its model and record."""
        for w in self._resuming():
            saved = self._saved[w.pid]
            self._restore(w, saved, saved.step if at is None else at, saved.extra)
        if self.centered and not self.rebuilt:
            self._from_center()

    def _from_center(self) -> None:
        """Workers hosted with a DOWNPOUR center: each resumes after the last request the
        center's checkpoint answered for it, from the center's checkpointed model (as a worker
        daemon resumes from the center's state)."""
        center = self._saved.get(self._center) if self._center is not None else None
        if center is None:
            return
        answered = dict(zip(_workers_of(self._run), center.extra, strict=False))
        for w in self._workers:
            if w.pid == self._center:
                continue
            last = answered.get(w.pid, 0)
            ledgers = {w.pid: Ledger(last, None, np.zeros_like(center.model))}
            state = RejoinState(center.step, center.model, center.extra, ledgers)
            resume = self.spec.resume
            assert resume is not None
            [program] = resume(self._run, self._problem, [w.pid], state)
            rng = self._saved[w.pid].rng
            w.restore(last + 1, program, center.model, (), rng)

    def hold(self) -> None:
        """Every worker shows its checkpointed state without taking it yet (frames kept and
        numbered: a live peer's state is taken instead, if one answers) — and its ledger, which
        a restarted center is rebuilt from; its generator goes on from the checkpoint's either
        way. An elastic center holds nothing: it is rebuilt."""
        for w in self._workers:
            if w.pid != self._center or not self.rebuilt:
                saved = self._saved[w.pid]
                w.hold(saved.step, saved.model, saved.extra, saved.rng, _ledger_report(saved))

    def start_over(self) -> None:
        """The held workers start over after all (a center that started afresh): they hold no
        ledger a center could count."""
        for w in self._workers:
            w.forget_ledger()

    def checkpoint_of_center(self) -> SavedWorker:
        """The checkpointed state of the center hosted here."""
        assert self._center is not None
        return self._saved[self._center]

    def ledgers(self) -> dict[int, Ledger]:
        """The checkpointed ledgers of the local workers of an elastic run."""
        return {
            w.pid: Ledger(lg[0], lg[1], lg[2])
            for w in self._resuming()
            if (lg := self._saved[w.pid].ledger) is not None
        }

    def _resuming(self) -> list[Worker]:
        """The local workers that resume from their own checkpointed state: all but an elastic
        center (rebuilt); of a DOWNPOUR run, its center only."""
        if self.centered and not self.rebuilt:
            return [w for w in self._workers if w.pid == self._center]
        return [w for w in self._workers if w.pid != self._center]

    def own_agreed(self) -> None:
        """Every worker from the state this daemon gives after a whole-cluster restart, as
        every peer takes it: its most advanced worker's, as a state answer is."""
        best = max(self.checkpoint.workers, key=lambda s: s.step)
        assert self.spec.cluster_restart is not None
        extra = self.spec.cluster_restart(best.extra)
        for w in self._workers:
            own = self._saved[w.pid]
            self._restore(
                w, SavedWorker(w.pid, best.step, best.model, extra, own.rng), best.step, extra
            )

    def _program(self, w: Worker, saved: SavedWorker, step: int, extra: tuple[int, ...]) -> Program:
        resume = self.spec.resume
        assert resume is not None
        state = RejoinState(step, saved.model, extra, incarnation=self._incarnation)
        if self.centered:  # its own model, iteration and ledger (a center: its record)
            lg = saved.ledger
            ledgers = {} if lg is None else {w.pid: Ledger(lg[0], lg[1], lg[2])}
            state = RejoinState(
                step, saved.model, extra, ledgers, incarnation=self._incarnation, own=True
            )
        try:
            [program] = resume(self._run, self._problem, [w.pid], state)
        except ValueError as exc:  # not a state of this run (its topology, its size, …)
            raise CheckpointError(f"cannot resume {w.name} from its checkpoint: {exc}") from None
        return program

    def _restore(self, w: Worker, saved: SavedWorker, step: int, extra: tuple[int, ...]) -> None:
        program = self._program(w, saved, step, extra)
        w.restore(step, program, saved.model, extra, saved.rng, _ledger_report(saved))

    def agreed_point(self, starts: dict[int, int]) -> int:
        """T*: the lowest checkpoint iteration among this daemon's and those of the peers that
        said they wait to start from one (``starts``)."""
        return min([self.step, *starts.values()])

    def source(self, me: int, starts: dict[int, int]) -> int:
        """The daemon whose state every daemon takes (``cluster_restart`` algorithms): the one
        whose checkpoint is at the agreed point, the lowest cluster id among ties."""
        candidates = [(self.step, me), *((s, c) for c, s in starts.items())]
        return min(candidates)[1]


async def start_from_checkpoint(daemon: Daemon, restore: Restore) -> None:
    """Wait for the peers' first notes, then set the workers up as the module docstring says;
    returns when they may start (or is cancelled by a stop: decided either way)."""
    try:
        await _start_from_checkpoint(daemon, restore)
    finally:
        daemon.rejoin.deciding = False


async def _start_from_checkpoint(daemon: Daemon, restore: Restore) -> None:
    transport, rejoin = daemon.transport, daemon.rejoin
    assert transport is not None
    peers = {link.cluster for link in transport.links}
    until = time.monotonic() + daemon.cfg.peer_timeout
    rejoin.expect(peers, until)
    # Also until this daemon's own first notes are out: a peer that decides once it has them
    # must have heard this checkpoint's iteration, not the None said after deciding.
    while (
        not (rejoin.noted >= peers and all(link.noted for link in transport.links))
        and (now := time.monotonic()) < until
    ):
        rejoin.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rejoin.changed.wait(), min(until - now, 1.0))
    silent = sorted(peers - rejoin.noted)
    me = daemon.me.cluster
    if restore.centered:
        resumed = await _resume_elastic(daemon, restore)
        # (a daemon hosting workers only that comes up later goes by this)
        transport.announce_start(None, restore.step if resumed else None)
        return
    # Where frames are kept, a peer drops nothing for a daemon that was away unless it sent
    # its last incarnation something: any drop means it ran on. Elsewhere a peer that resumed
    # in this restart drops frames before its resume point (Transport.lose_all).
    if rejoin.dropped_for_us(0 if restore.takes_live_state else restore.step):
        restore.mode = "live peers"
        log.info(
            "peers ran on while this daemon was away: resuming from the checkpoint at "
            "iteration %d, and from a peer's state where it is newer",
            restore.step,
        )
        # (the catch-up may have taken a peer's state already, even before this task ran)
        if restore.takes_live_state and rejoin.rejoins == 0:
            if not rejoin.waiting_for_state() and (peer := rejoin.furthest()) is not None:
                rejoin.ask_state(peer)
            if not await _state_taken(rejoin, 0):
                log.warning("no peer answered with its state: resuming from the checkpoint")
                restore.own()
        elif restore.drops:
            transport.lose_all(restore.step - 1)
        transport.announce_start(None)
        return
    if rejoin.resumed:
        await _join_resumed(transport, rejoin, restore, dict(rejoin.resumed))
    else:
        await _agree(transport, rejoin, restore, me, silent)
    transport.announce_start(None, restore.agreed)


def _workers_of(run: RunConfig) -> list[int]:
    """The workers of a centered run, in the order of the center's record (its model's key)."""
    return [p for p in range(run.processes) if p != run.center]


def _ledger_report(saved: SavedWorker) -> tuple[int, Vector, Tag] | None:
    """A checkpointed ledger as the worker's ``Report("ledger", …)`` holds it."""
    if saved.ledger is None:
        return None
    answered, waiting, total = saved.ledger
    return (answered, total, () if waiting is None else (waiting,))


async def _resume_elastic(daemon: Daemon, restore: Restore) -> bool:
    """The asynchronous elastic family (the module docstring): the center's daemon rebuilds the
    center from every worker's ledger; a daemon hosting workers only does what the center's
    daemon's first note calls for. Whether the center was rebuilt here."""
    rejoin = daemon.rejoin
    center = daemon.run_cfg.center
    if center in daemon.pids and not restore.rebuilt:
        restore.mode = "live peers" if rejoin.dropped_for_us(0) else "whole-cluster restart"
        restore.own()  # the center from its checkpoint, the workers here from its record
        log.info(
            "%s: the center resumes from its checkpoint, counting the requests its record "
            "answered; the workers here resume after the last one it answered them",
            restore.mode,
        )
        if restore.mode == "live peers":
            log.warning(
                "requests the center's last incarnation had not answered are lost (%s keeps no "
                "ledgers to tell them): workers still waiting on one stay blocked",
                restore.spec.name,
            )
        return True
    if center in daemon.pids:
        restore.mode = "live peers" if rejoin.dropped_for_us(0) else "whole-cluster restart"
        log.info(
            "%s: the center is rebuilt from every worker's ledger; the workers here resume "
            "from the checkpoint (iteration %d)",
            restore.mode,
            restore.step,
        )
        rejoin.rebuild_center()
        # (the catch-up may have rebuilt it already, with peers that ran on: once per start)
        if await _state_taken(rejoin, 0):
            restore.own()  # (their ledgers are in the rebuilt center)
            return True
        log.error(
            "the center could not be rebuilt from its workers' ledgers: it starts over, and so "
            "do the workers here; workers resumed elsewhere will not agree with it"
        )
        return False
    keeper = daemon.membership.cluster_of[center]
    await _first_note(daemon, keeper)
    if daemon.stop_reason is not None:
        return False
    resumed = keeper in rejoin.starts or keeper in rejoin.resumed
    # It ran on: its record counts requests this checkpoint does not. Or (DOWNPOUR) it resumed
    # from its checkpoint: its model and record are what the workers go on from.
    if rejoin.dropped_by(keeper) or (resumed and not restore.rebuilt):
        restore.mode = "live peers" if rejoin.dropped_by(keeper) else "whole-cluster restart"
        log.info(
            "%s: resuming from the center's model and its record of the workers' requests "
            "(daemon %d)",
            restore.mode,
            keeper,
        )
        while rejoin.rejoins == 0 and daemon.stop_reason is None and not rejoin.cannot_resume:
            if not rejoin.waiting_for_state():
                rejoin.ask_state(keeper)
            if not await _state_taken(rejoin, 0):
                log.warning("the center's daemon %d has not sent its state: asking again", keeper)
        if rejoin.cannot_resume:
            restore.start_over()
            log.error(
                "the center's state could not be taken: the workers here start over, and the "
                "center's record of their ledgers will not agree with them"
            )
    elif resumed:
        restore.mode = "whole-cluster restart"
        log.info(
            "whole-cluster restart: the workers resume from the checkpoint, each at its own "
            "iteration (this checkpoint: %d), the center from their ledgers",
            restore.step,
        )
        restore.own()
    else:
        restore.mode = "center started afresh"
        restore.start_over()
        log.warning(
            "the center's daemon %d started without a checkpoint: the workers here start over "
            "with its new center (their checkpoint does not agree with it)",
            keeper,
        )
    return False


async def _first_note(daemon: Daemon, peer: int) -> None:
    """Wait for ``peer``'s first note, however long (the workers here can do nothing without
    it); said once it is later than ``peer_timeout``."""
    rejoin = daemon.rejoin
    told = False
    until = time.monotonic() + daemon.cfg.peer_timeout
    while peer not in rejoin.noted and daemon.stop_reason is None:
        if not told and time.monotonic() >= until:
            told = True
            log.warning(
                "waiting for daemon %d, the center's, to say how it starts: the workers here "
                "resume only once it has",
                peer,
            )
        rejoin.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rejoin.changed.wait(), 1.0)


async def _agree(
    transport: Transport, rejoin: Rejoin, restore: Restore, me: int, silent: list[int]
) -> None:
    """A whole-cluster restart: resume at the lowest checkpointed iteration heard."""
    spec = restore.spec
    starts = dict(rejoin.starts)
    agreed = restore.agreed_point(starts)
    restore.mode, restore.agreed = "whole-cluster restart", agreed
    log.info(
        "whole-cluster restart: resuming at iteration %d, the highest every daemon waiting "
        "to start has checkpointed (daemons %s; this one's checkpoint: %d)%s",
        agreed,
        ", ".join(str(c) for c in sorted({me, *starts})),
        restore.step,
        f"; not heard from: {', '.join(map(str, silent))}" if silent else "",
    )
    if spec.cluster_restart is None:
        restore.own(at=agreed)  # every local worker, those further along too
        if restore.drops:
            transport.lose_all(agreed - 1)
        return
    source = restore.source(me, starts)
    if source == me:
        restore.own_agreed()
        return
    log.info("taking daemon %d's checkpointed state, as every daemon does", source)
    before = rejoin.rejoins
    rejoin.adopt(source)
    if not await _state_taken(rejoin, before):
        log.warning(
            "daemon %d did not send its state: resuming from this daemon's own checkpoint "
            "(the models may not agree at the end)",
            source,
        )
        restore.own_agreed()


async def _join_resumed(
    transport: Transport, rejoin: Rejoin, restore: Restore, resumed: dict[int, int]
) -> None:
    """This daemon came up after the others resumed in a whole-cluster restart: it joins them
    where they resumed — from a peer's state where it is behind that point or where frames are
    kept and numbered (the peers' live state is the consistent one), from its own checkpoint
    otherwise."""
    at = min(resumed.values())
    restore.mode, restore.agreed = "joined a whole-cluster restart", at
    peer = min(c for c, r in resumed.items() if r == at)
    log.info(
        "the other daemons resumed at iteration %d in a whole-cluster restart (this one's "
        "checkpoint: %d): joining them",
        at,
        restore.step,
    )
    if restore.takes_live_state or restore.step < at:
        before = rejoin.rejoins
        rejoin.ask_state(peer)
        if await _state_taken(rejoin, before):
            return
        log.warning("daemon %d did not send its state: resuming from the checkpoint", peer)
    restore.own(at=at)
    if restore.drops:
        transport.lose_all(at - 1)


async def _state_taken(rejoin: Rejoin, before: int) -> bool:
    """Wait for the state asked for (made again meanwhile), up to three request timeouts;
    whether one was taken since the catch-up counted ``before`` rejoins."""
    until = time.monotonic() + 3 * REQUEST_TIMEOUT
    while rejoin.waiting_for_state() and (now := time.monotonic()) < until:
        rejoin.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rejoin.changed.wait(), min(until - now, 1.0))
        rejoin.consider()
    return rejoin.rejoins > before
