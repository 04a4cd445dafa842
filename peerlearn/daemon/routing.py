"""Where a daemon's messages go: its workers' messages out, its peers' frames in.

The daemon's router is what its workers call for ``Broadcast``, ``Send`` and ``Post``, and what
its transport calls with every Data frame a peer daemon sent. The local part of either — a value
into the mailboxes of this daemon's workers — is the shared
:class:`~peerlearn.runtime.delivery.Delivery`, the same code the in-process runtime uses; this
module adds what only a daemon has: remote daemons to reach once each, frames that name their
receivers, and the record of what it heard from remote workers (:class:`Heard`), which the
monitor (:mod:`peerlearn.daemon.monitor`) reads for the global consensus distance and the lag.

Kept apart from the lifecycle (:mod:`peerlearn.daemon.node`) because it runs on other threads —
every local worker's and the event loop — and needs none of the daemon's state besides the
collaborators it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from peerlearn.compression import Compressor, Scheme
from peerlearn.effects import Msg, Tag, Vector
from peerlearn.membership import Membership
from peerlearn.runtime.delivery import Delivery, share
from peerlearn.transport.peers import Beyond, Transport
from peerlearn.wire import Data
from peerlearn.wire.messages import Packed

if TYPE_CHECKING:
    from peerlearn.config import RunConfig

__all__ = ["DaemonRouter", "Heard", "Packer", "packing"]

#: what a frame for a remote daemon carries instead of a value's floats: (tag, value, sender) →
#: its packed bytes, or None (plain floats)
Packer = Callable[[Tag, Vector, int], Packed | None]


def packing(cfg: RunConfig, compressors: Mapping[int, Compressor]) -> Packer | None:
    """The run's packer: the values of the tag kinds its algorithm rounds (the record's
    ``compressible``) go packed — the bytes the sender's compressor made when it rounded the
    value, or packed here if it was not the one that rounded it (a relay), and only if that
    is exact; anything else goes as plain floats. None: the run compresses nothing."""
    scheme, block = cfg.compression.scheme, cfg.compression.block
    kinds = cfg.spec.compressible
    if scheme is Scheme.NONE:
        return None
    stored = block if scheme is Scheme.INT8 else 0

    def pack(tag: Tag, value: Vector, sender: int) -> Packed | None:
        if tag[0] not in kinds:
            return None
        compressor = compressors.get(sender)
        raw = compressor.packed(value) if compressor is not None else None
        if raw is None or value.ndim != 1:
            return Packed.of(scheme, value, block)
        return Packed(scheme, stored, raw)

    return pack


#: the tag window never shrinks below this many iterations for large frames
MIN_WINDOW = 8


def tag_window(iterations: int, budget: int, frame_bytes: int, senders: int) -> int:
    """The tag window in iterations: ``iterations``, or as many as fit ``budget`` bytes of
    frames from ``senders`` remote processes (one frame each per iteration) — what a worker's
    mailbox may hold ahead of it — but at least MIN_WINDOW (or ``iterations``, if fewer)."""
    fit = budget // (max(frame_bytes, 1) * max(senders, 1))
    return min(iterations, max(fit, MIN_WINDOW))


#: tag kinds that are no iteration's message: never held back for the tag window
_UNWINDOWED = ("snapshot", "state", "ledger")

#: tag kinds whose values are models (used for the global consensus distance)
_MODEL_KINDS = ("params", "maa", "avg", "gossip", "x", "center", "pair", "paired", "snapshot")


class Heard:
    """What this daemon heard from remote workers, written by the router on the event loop.

    ``models``: the latest model of each remote worker whose messages carry one (or which sent
    a snapshot), with when it came (``time.monotonic()``) — for the global consensus distance.
    ``fastest_step``: the highest step any remote message was computed at — for the lag.
    """

    def __init__(self) -> None:
        self.models: dict[int, tuple[float, Vector]] = {}
        self.fastest_step = 0


class DaemonRouter:
    """Broadcasts of local workers: every local mailbox by reference, each remote daemon once;
    sends and posts: the listed local mailboxes, and one frame per daemon hosting the others.
    Frames from remote daemons: every local mailbox, or the ones they list.

    :param delivery: the local delivery over this daemon's mailboxes (pid → mailbox).
    :param membership: which cluster (daemon) hosts each process.
    :param heard: where models and steps heard from remote workers are recorded.
    :param state: where a peer's state frame (``("state", r)``, catching up) goes.

    Until :meth:`attach` gives it the transport, messages reach the local mailboxes only.
    """

    def __init__(
        self,
        delivery: Delivery,
        membership: Membership,
        heard: Heard,
        state: Callable[[Data], None] | None = None,
        window: int = 1024,
        drop_ahead: Callable[[], bool] = lambda: False,
        packing: Packer | None = None,
    ) -> None:
        self._delivery = delivery
        self._mailboxes = delivery.mailboxes
        self._local = tuple(delivery.mailboxes)  # this daemon's processes, in pid order
        self._cluster_of = membership.cluster_of
        self._heard = heard
        self._state = state  # where a peer's state frame goes (catching up)
        self._transport: Transport | None = None
        self._window = window
        self._drop_ahead = drop_ahead
        self._pack = packing

    def attach(self, transport: Transport) -> None:
        """From now on, messages for remote processes go out through ``transport``."""
        self._transport = transport

    def broadcast(self, sender: int, tag: Tag, value: Vector, step: int) -> None:
        share(value)
        self._delivery.fan_out(tag, Msg(sender, value), step)
        if self._transport is not None:
            # packed once, on the worker's thread, for every link
            packed = self._pack(tag, value, sender) if self._pack is not None else None
            self._transport.broadcast(tag, sender, step, value, packed)

    def send(
        self, sender: int, to: tuple[int, ...], tag: Tag, value: Vector, step: int, post: bool
    ) -> None:
        share(value)
        mailboxes = self._mailboxes
        self._delivery.deliver_to([p for p in to if p in mailboxes], tag, sender, value, post)
        if self._transport is None:
            return
        remote: dict[int, list[int]] = {}
        for p in to:
            if p not in mailboxes:
                remote.setdefault(self._cluster_of[p], []).append(p)
        packed = self._pack(tag, value, sender) if remote and self._pack is not None else None
        for cluster, pids in remote.items():
            self._transport.send(cluster, tag, sender, step, value, tuple(pids), post, packed)

    def beyond(self, data: Data) -> Beyond:
        """What to do with a peer's frame now (on the event loop): within the tag window, or
        never windowed (posts, state, snapshots): deliver; further ahead: where frames may
        drop and the workers run, drop it — the workers catch up from a peer's state if they
        get there (a straggler must not pace its senders) — else hold it (see :meth:`holds`)."""
        if not self.holds(data):
            return Beyond.DELIVER
        return Beyond.DROP if self._drop_ahead() else Beyond.HOLD

    def holds(self, data: Data) -> bool:
        """Whether a peer's frame must wait (on the event loop): a message for an iteration
        more than the tag window ahead of the slowest live worker it is for, which would only
        sit in the mailboxes — the transport keeps it unacknowledged, so that the sender's
        window bounds it, until the workers come near (:meth:`Transport.release`). Posts are
        never held: a worker drains its inbox whole, whatever its iteration."""
        t = data.tag[1]  # an int, as the transport checked (kind, iteration, …)
        if data.post or data.tag[0] in _UNWINDOWED or not isinstance(t, int):
            return False
        mailboxes = self._mailboxes
        slowest = min(
            (box.step for pid in data.to or self._local if not (box := mailboxes[pid]).retired),
            default=None,
        )
        return slowest is not None and t > slowest + self._window

    def reach(self) -> int:
        """No held frame of a later iteration can be due: the fastest live worker's step plus
        the tag window (a frame may be for that worker alone)."""
        steps = [box.step for box in self._mailboxes.values() if not box.retired]
        return max(steps, default=0) + self._window if steps else 2**62

    def deliver(self, data: Data) -> None:
        """A Data frame from a peer daemon (on the event loop)."""
        heard = self._heard
        if data.tag[0] == "snapshot":  # for the global consensus distance only
            heard.models[data.sender] = (time.monotonic(), data.value)
            return
        if data.tag[0] in ("state", "ledger"):  # a peer's answer to a state request
            if self._state is not None:
                self._state(data)
            return
        if data.to or data.post:
            pids = data.to or self._local
            self._delivery.deliver_to(pids, data.tag, data.sender, data.value, data.post)
        else:
            self._delivery.fan_out(data.tag, Msg(data.sender, data.value), data.step)
        if data.step > heard.fastest_step:
            heard.fastest_step = data.step
        if data.tag and data.tag[0] in _MODEL_KINDS:
            heard.models[data.sender] = (time.monotonic(), data.value)
