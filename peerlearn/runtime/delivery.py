"""Local delivery: a value into the mailboxes of this process's workers, by reference.

The one implementation of what happens to a message once it reaches the workers that share a
Python process — whether it comes from one of them (a broadcast, a send, a post) or from a
remote daemon's frame. Both runtimes route through it: the in-process runtime
(:mod:`peerlearn.runtime.local`) for every message, the daemon's router
(:mod:`peerlearn.daemon.routing`) for the local part of what its workers send and for what
its peers send. It lives in ``runtime/`` below both, so neither imports the other.

A value is frozen (:func:`share`) before it is delivered: every receiver holds the very same
array, and a program that wrote into one would change what the others received.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

from peerlearn.effects import Letter, Msg, Tag, Vector
from peerlearn.runtime.mailbox import Mailbox, Put

__all__ = ["Delivery", "share"]


def share(value: Vector) -> None:
    """Make ``value`` read-only: it is shared by reference from here on."""
    value.flags.writeable = False


class Delivery:
    """Puts messages into ``mailboxes`` (pid → mailbox; entries may be added until the first
    delivery) and counts every outcome (:attr:`counts`).

    :param dropped: called with the reason of every message a mailbox refused (late, overflow,
        receiver exited; a duplicate is not a drop: the first value counts).
    :param stored: called as ``stored(pid, step)`` for every broadcast message stored for
        ``pid`` (``step``: the iteration the message was computed at), under the counters'
        lock, so that it may update plain counters.
    """

    def __init__(
        self,
        mailboxes: Mapping[int, Mailbox],
        *,
        dropped: Callable[[str], None] | None = None,
        stored: Callable[[int, int], None] | None = None,
    ) -> None:
        self.mailboxes = mailboxes
        self.counts: dict[Put, int] = dict.fromkeys(Put, 0)
        self._dropped = dropped
        self._stored = stored
        # Producers are every local worker thread and the event loop: the counters (and
        # ``stored``) run under this lock, which guards counters only, never a wait.
        self._lock = threading.Lock()

    def fan_out(self, tag: Tag, msg: Msg, step: int) -> None:
        """``msg`` under ``tag`` into every mailbox (a broadcast)."""
        for pid, box in self.mailboxes.items():
            outcome = box.put(tag, msg)
            if outcome is not Put.STORED and outcome is not Put.DUPLICATE and self._dropped:
                self._dropped(str(outcome))
            with self._lock:
                self.counts[outcome] += 1
                if outcome is Put.STORED and self._stored is not None:
                    self._stored(pid, step)

    def deliver_to(
        self, pids: Iterable[int], tag: Tag, sender: int, value: Vector, post: bool
    ) -> None:
        """``value`` from ``sender`` into the mailboxes of ``pids``: under ``tag`` (a send), or
        as a letter into their inboxes (``post``)."""
        for pid in pids:
            box = self.mailboxes[pid]
            outcome = (
                box.post(Letter(tag, sender, value)) if post else box.put(tag, Msg(sender, value))
            )
            if outcome is not Put.STORED and outcome is not Put.DUPLICATE and self._dropped:
                self._dropped(str(outcome))
            with self._lock:
                self.counts[outcome] += 1
