"""Per-worker mailboxes: messages by tag, one per sender, and a condition to wait on.

The network runtime's ``Await``: producers (the event loop delivering remote frames, local
workers broadcasting by reference) call :meth:`Mailbox.put`; the worker thread blocks in
:meth:`Mailbox.take` on a ``threading.Condition`` until its quorum holds — no polling.

Tags carry the iteration at index 1 (``("params", t)``, ``("maa", t, r)`` …). A worker that
reached iteration ``s`` (:meth:`advance`) has finished every tag with ``t < s``: messages for
those are *late* and dropped (counted). Tags of the current iteration whose ``take`` completed
are finished too. Anything else is buffered — also future tags of a faster sender, whose
messages a slower process will need: dropping them could deadlock it — up to ``max_buffered``
messages; beyond that a message is dropped and counted,
never silently. (A daemon keeps a peer's frames of tags far ahead of its workers out of the
mailboxes, unacknowledged, until they come within its window: see
:mod:`peerlearn.transport.peers`.) Finishing an iteration costs what that iteration held, not
what is buffered for later ones: tags are kept by iteration.

Besides the tag boxes, a mailbox holds an *inbox*: a FIFO of :class:`~peerlearn.effects.Letter`
filled by ``Post`` and drained whole by ``Receive`` (:meth:`post`, :meth:`receive`). Inbox
letters are never late nor deduplicated here (the transport delivers each exactly once), and
they count towards ``max_buffered`` like the rest.

A daemon that catches up (rejoin) hands its worker a resumed program through the mailbox
(:meth:`redirect`): a worker waiting in :meth:`take` or :meth:`receive` leaves the wait with
:class:`MailboxRedirected`, and the worker switches programs before its next effect.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from peerlearn.effects import Letter, Msg, Quorum, Tag, quorum_have, quorum_need, quorum_take
from peerlearn.errors import PeerlearnError

__all__ = ["Mailbox", "MailboxClosed", "MailboxRedirected", "Put", "Waiting"]


class MailboxClosed(PeerlearnError):
    """The mailbox was closed (shutdown or crash) while a worker waited on it."""


class MailboxRedirected(PeerlearnError):
    """A resumed program was handed over (:meth:`Mailbox.redirect`) while the worker waited."""


class Put(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # a second value from one sender for one tag: the first one counts
    LATE = "late"  # the tag is finished for this worker
    OVERFLOW = "overflow"  # too many buffered messages
    RETIRED = "receiver_exited"  # the worker ended (finished, stopped, crashed): nobody reads


@dataclass(frozen=True)
class Waiting:
    """What a worker waits for right now (for /status and stall detection)."""

    tag: Tag
    have: int
    need: int
    unit: str
    since: float  # time.monotonic() when the wait began
    #: the processes whose message for ``tag`` has arrived, by pid (none for the inbox: any
    #: process may post to it), so that /status can name the ones still missing
    senders: tuple[int, ...] = ()


def _iteration(tag: Tag) -> Any:
    return tag[1] if len(tag) > 1 and isinstance(tag[1], int) else None


class Mailbox:
    """The inbox of one worker (one process)."""

    def __init__(self, cluster_of: tuple[int, ...], clusters: int, max_buffered: int = 100_000):
        self._cluster_of = cluster_of
        self._clusters = clusters
        self._max = max_buffered
        self._cond = threading.Condition()
        self._boxes: dict[Tag, dict[int, Msg]] = {}
        #: the tags of ``_boxes`` and ``_done`` by iteration (tags without one: under None),
        #: so that advancing drops what ended without looking at what is buffered for later
        self._by_iteration: dict[int | None, set[Tag]] = {}
        self._buffered = 0
        self._step = 0
        self._done: set[Tag] = set()
        #: called (on the worker's thread, outside the lock) after each advance: a daemon
        #: that keeps frames back until its workers come near them looks again
        self.on_advance: Callable[[], None] | None = None
        self._closed = False
        self._retired = False
        self._waiting: tuple[Tag, Quorum, float] | None = None
        self._inbox: list[Letter] = []
        self._receiving: float | None = None  # since when the worker waits in receive()
        #: a resumed program for the worker, with the iteration it starts at (rejoin)
        self._redirect: tuple[int, Any] | None = None
        #: the iteration a hand-over resumes at, until the worker reports it (see ``step``)
        self._resuming: int | None = None

    def held(self, tag: Tag, sender: int) -> tuple[Msg | None, bool]:
        """What the mailbox holds of ``tag`` from ``sender`` and whether the worker has taken
        ``tag`` already (readers on other threads: a restarted center asks what a worker has
        received of it)."""
        with self._cond:
            box = self._boxes.get(tag)
            return (box.get(sender) if box else None), tag in self._done

    def put(self, tag: Tag, msg: Msg) -> Put:
        """Buffer ``msg`` under ``tag`` and wake the worker if it waits on that tag."""
        with self._cond:
            if self._retired:
                return Put.RETIRED
            t = _iteration(tag)
            if tag in self._done or (t is not None and t < self._step):
                return Put.LATE
            box = self._boxes.get(tag)
            if box is None:
                box = self._boxes[tag] = {}
                self._by_iteration.setdefault(t, set()).add(tag)
            elif msg.sender in box:
                return Put.DUPLICATE
            if self._buffered >= self._max:
                return Put.OVERFLOW
            box[msg.sender] = msg
            self._buffered += 1
            if self._waiting is not None and self._waiting[0] == tag:
                self._cond.notify()
            return Put.STORED

    def post(self, letter: Letter) -> Put:
        """Append ``letter`` to the inbox and wake the worker if it waits in :meth:`receive`."""
        with self._cond:
            if self._retired:
                return Put.RETIRED
            if self._buffered >= self._max:
                return Put.OVERFLOW
            self._inbox.append(letter)
            self._buffered += 1
            if self._receiving is not None:
                self._cond.notify()
            return Put.STORED

    def receive(self, block: bool) -> tuple[Letter, ...]:
        """The whole inbox, in arrival order; with ``block``, wait until it holds a letter."""
        with self._cond:
            if block and not self._inbox:
                self._receiving = time.monotonic()
                try:
                    while not self._inbox:
                        if self._closed:
                            raise MailboxClosed("mailbox closed while waiting in receive")
                        if self._redirect is not None:
                            raise MailboxRedirected("resumed while waiting in receive")
                        self._cond.wait()
                finally:
                    self._receiving = None
            got = tuple(self._inbox)
            self._inbox.clear()
            self._buffered -= len(got)
            return got

    def take(self, tag: Tag, quorum: Quorum) -> tuple[Msg, ...]:
        """Block until ``quorum`` holds for ``tag``; return the messages and finish the tag."""
        with self._cond:
            self._waiting = (tag, quorum, time.monotonic())
            try:
                while True:
                    if self._closed:
                        raise MailboxClosed(f"mailbox closed while waiting on {tag}")
                    if self._redirect is not None:
                        raise MailboxRedirected(f"resumed while waiting on {tag}")
                    box = self._boxes.get(tag)
                    got = (
                        quorum_take(quorum, list(box.values()), self._cluster_of, self._clusters)
                        if box
                        else None
                    )
                    if got is not None:
                        del self._boxes[tag]
                        self._buffered -= len(box or ())
                        self._done.add(tag)
                        self._by_iteration.setdefault(_iteration(tag), set()).add(tag)
                        return got
                    self._cond.wait()
            finally:
                self._waiting = None

    def advance(self, step: int) -> int:
        """The worker reached iteration ``step``: finish every tag of earlier iterations.
        Returns how many buffered messages became late (and were dropped)."""
        with self._cond:
            before, self._step = self._step, step
            if self._resuming is not None and step >= self._resuming:
                # (a report of the old program, made before the worker took the hand-over,
                # leaves the mark: frames of the resume iteration are for it already)
                self._resuming = None
            index = self._by_iteration
            # The iterations that ended: from the last step on, or — after a long jump (a
            # resumed program) — whichever of them are held, if fewer.
            if step - before <= len(index):
                ended = [t for t in range(before, step) if t in index]
            else:
                ended = [t for t in index if t is not None and t < step]
            dropped = 0
            for t in ended:
                for tag in index.pop(t):
                    self._done.discard(tag)
                    box = self._boxes.pop(tag, None)
                    if box is not None:
                        dropped += len(box)
            untimed = index.get(None)
            if untimed and self._done:  # a tag without an iteration is done once, as it was
                finished = untimed & self._done
                untimed -= finished
                self._done -= finished
            self._buffered -= dropped
        if self.on_advance is not None:
            self.on_advance()
        return dropped

    def waiting(self) -> Waiting | None:
        """What the worker waits for now, with how much it has and needs; None if it runs."""
        with self._cond:
            if self._receiving is not None:
                return Waiting(("inbox",), 0, 1, "messages", self._receiving)
            if self._waiting is None:
                return None
            tag, quorum, since = self._waiting
            box = list(self._boxes.get(tag, {}).values())
            unit = "clusters" if quorum.kind == "majority_of_clusters" else "processes"
            return Waiting(
                tag,
                quorum_have(quorum, box, self._cluster_of),
                quorum_need(quorum, self._clusters),
                unit,
                since,
                tuple(sorted(m.sender for m in box)),
            )

    def redirect(self, step: int, program: Any) -> None:
        """Hand the worker ``program``, a resumed one starting at iteration ``step``: it
        switches before its next effect, leaving a wait at once. A later hand-over replaces
        one not yet taken."""
        with self._cond:
            self._redirect = (step, program)
            self._resuming = step
            self._cond.notify_all()

    def take_redirect(self) -> tuple[int, Any] | None:
        """The program handed over, if any (once)."""
        if self._redirect is None:  # the worker asks before every effect: no lock then
            return None
        with self._cond:
            got, self._redirect = self._redirect, None
            return got

    def close(self) -> None:
        """Wake a waiting worker with :class:`MailboxClosed`; later puts are still accepted."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def retire(self) -> None:
        """The worker is gone for good: free what is buffered (it may pin pooled receive
        buffers) and refuse everything from now on."""
        with self._cond:
            self._retired = self._closed = True
            self._boxes.clear()
            self._by_iteration.clear()
            self._inbox.clear()
            self._buffered = 0
            self._cond.notify_all()
        if self.on_advance is not None:  # what was held for it is for nobody now
            self.on_advance()

    @property
    def buffered(self) -> int:
        return self._buffered

    @property
    def step(self) -> int:
        """The iteration the worker reached (:meth:`advance`) — or the one a program handed
        over resumes at, from the hand-over until the worker reports it: frames of that
        iteration are for it already. Read without the lock."""
        resuming = self._resuming
        return self._step if resuming is None or resuming < self._step else resuming

    @property
    def retired(self) -> bool:
        """The worker is gone for good: it reads nothing any more."""
        return self._retired
