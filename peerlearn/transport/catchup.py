"""The two link-level notes of catching up, carried in the wire's ``Control`` message.

A daemon that dropped frames for a peer (the peer was away, its window stayed full, or it
restarted and lost everything it had been sent) tells it so once the link is back, with the
highest iteration it dropped frames of: :class:`Missed`. A daemon that learns it is missing
messages it still needs answers with :class:`StateRequest` on its own link to that peer; the
peer replies with its current state as a Data frame (``("state", resume_at)``, see
:mod:`peerlearn.daemon.rejoin`), reliable and in order like every frame of the run.

Parsing is sans-IO: a ``Control`` in, a record out, or :class:`CatchupError` — counted by the
transport as ``bad_control``, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

from peerlearn.errors import PeerlearnError
from peerlearn.wire import Control
from peerlearn.wire.messages import INT64_MAX

__all__ = ["Catchup", "CatchupError", "Missed", "StateRequest", "parse"]


class CatchupError(PeerlearnError):
    """A Control message that is no catch-up note this daemon knows, or one with bad fields."""


@dataclass(frozen=True, slots=True)
class Missed:
    """I dropped frames for you of iterations up to ``upto`` (they will never come); None: I
    dropped none. Sent at every connection, so a daemon that waits to start knows when it has
    heard from a peer. ``start``: I wait to start my workers from a checkpoint at this
    iteration (a whole-cluster restart agrees on the lowest: peerlearn/daemon/restore.py);
    None: I do not. ``resumed``: my workers resumed at this iteration in a whole-cluster restart
    (a daemon that comes up later joins there). Sent again when either changes."""

    upto: int | None
    start: int | None = None
    resumed: int | None = None
    kind: Literal["missed"] = "missed"

    def control(self) -> Control:
        body: dict[str, int | None] = {"upto": self.upto}
        if self.start is not None:  # (a peer of an earlier version ignores these)
            body["start"] = self.start
        if self.resumed is not None:
            body["resumed"] = self.resumed
        return Control(name=self.kind, body=body)


@dataclass(frozen=True, slots=True)
class StateRequest:
    """Send me your current state: I am behind and missing messages I need. ``restart``: my
    workers have not started yet (a restarted daemon), so I take whatever you send."""

    restart: bool = False
    kind: Literal["state_request"] = "state_request"

    def control(self) -> Control:
        return Control(name=self.kind, body={"restart": self.restart})


Catchup: TypeAlias = Missed | StateRequest


def parse(msg: Control) -> Catchup:
    """The catch-up note ``msg`` carries; CatchupError naming what is wrong otherwise."""
    match msg.name:
        case "missed":
            upto = msg.body.get("upto", False)
            if upto is not None and (type(upto) is not int or not 0 <= upto <= INT64_MAX):
                raise CatchupError(
                    f"missed: upto must be an iteration ≥ 0 or null, got {upto!r:.40}"
                )
            start, resumed = msg.body.get("start"), msg.body.get("resumed")
            for name, v in (("start", start), ("resumed", resumed)):
                if v is not None and (type(v) is not int or not 1 <= v <= INT64_MAX):
                    raise CatchupError(
                        f"missed: {name} must be an iteration ≥ 1 or null, got {v!r:.40}"
                    )
            return Missed(upto, start, resumed)
        case "state_request":
            restart = msg.body.get("restart", False)
            if type(restart) is not bool:
                raise CatchupError(f"state_request: restart must be a bool, got {restart!r:.40}")
            return StateRequest(restart)
    raise CatchupError(f"unknown control message {msg.name!r:.60}")
