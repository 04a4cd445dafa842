"""The daemon's network side: a listening server for inbound links, one OutLink per peer.

Inbound connections start with the dialer's ``Hello``: the versions it speaks, its cluster id
(a peer in the static membership) and its incarnation. An incarnation greater than the last one
seen from that cluster is a restarted daemon: what was kept for the old one (the sequence number
of the last frame delivered, its connections) is dropped; an older one is refused. The answer
is ``Welcome`` (the version, this daemon's own incarnation) or ``Refuse(reason)``. Then the
dialer's ``Join`` says its run (process ids, model dimension and dtype, fingerprint), answered
with an ``Ack`` of the last frame delivered from it, or ``Refuse`` — a refused handshake is
logged with its reason, counted, and the connection closed. Then come ``Data`` frames:
duplicates (seq ≤ the last delivered from that daemon, after a reconnect) are dropped and
counted, the rest handed to ``deliver`` on the event loop, and acked cumulatively once per read
batch. A Data
frame whose values are not all finite is acked too but dropped (counted ``non_finite``): no
model may take it in, and a link closed over it would have the sender resend it forever.

A frame for a tag far ahead of the workers it is for (more than the daemon's tag window of
iterations ahead of the slowest of them) never reaches a mailbox; the daemon's router says
what happens instead (``beyond``, :class:`Beyond`). Where frames may drop and the workers run,
it is acked and dropped (counted ``ahead``) and ``ahead`` is told, so that a worker that gets
there catches up from a peer's state. Elsewhere it is *held*: not delivered, not acked, so that
the sender's window — its per-peer budget of frames and bytes — is what bounds it, never this
daemon's memory. Frames behind a held one are delivered as they come (a state answer must get
through to the workers that would release it); the cumulative ack stays at the last frame
before the first one held, and frames delivered beyond it are remembered so that a resend after
a reconnect is dropped as a duplicate. Held frames go to the workers as soon as they come
within the window (:meth:`Transport.release`). A sender that holds more than four times the
window this daemon would keep for it (a member that ignores its window) is not read from until
the workers catch up.

Loopback loses nothing in flight, so tests lose frames on purpose through a test-only seam,
:attr:`Transport.fault` (None in production): it may lose a chosen Data frame (not delivered,
not acked, its connection aborted) or take it twice (tests/test_reliability.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from peerlearn.effects import Tag, Vector, finite, tag_text
from peerlearn.membership import Membership
from peerlearn.transport import auth, catchup
from peerlearn.transport.catchup import Catchup
from peerlearn.transport.links import LinkSettings, LinkState, OutLink, Throttle
from peerlearn.transport.pool import BufferPool, give_back_memory
from peerlearn.transport.protocol import FrameProtocol
from peerlearn.transport.stats import TransportStats
from peerlearn.wire import (
    PREFIX,
    Ack,
    Bye,
    Codec,
    Control,
    Data,
    HandshakeError,
    Hello,
    Join,
    Message,
    Ping,
    Pong,
    Reason,
    Refuse,
    RemoteProtocolError,
    Welcome,
    check_join,
    negotiate,
)
from peerlearn.wire.messages import Packed

__all__ = ["Beyond", "FaultAction", "FrameFault", "PeerAddress", "Transport"]

log = logging.getLogger(__name__)


#: the largest header a dialer may send before its Join is accepted (a Hello, a Join of a
#: daemon with some thousand workers); its read buffer is this small until then
PRE_TRUST_HEADER = 4096
#: handshakes under way at once, in all and per source address; more are closed at once
MAX_PENDING = 256
MAX_PENDING_PER_SOURCE = 64

#: remote hosts whose refusals are logged at a backed-off rate (beyond: the least recently
#: refused is forgotten, and logged anew if it comes back)
_MAX_REFUSALS_TRACKED = 256


@dataclass(frozen=True)
class PeerAddress:
    cluster: int
    host: str
    port: int


class FaultAction(StrEnum):
    """What the test-only fault hook (:attr:`Transport.fault`) does with one Data frame."""

    DELIVER = "deliver"  # as usual
    #: lost in flight: not delivered, not acked, and the connection it came on is cut (aborted)
    #: — what a link that breaks with frames outstanding does; the sender resends it after
    #: the reconnect (and the hook sees it again)
    LOSE = "lose"
    #: taken twice, as if resent: delivered, then the copy must be dropped as a duplicate
    DUPLICATE = "duplicate"


class Beyond(StrEnum):
    """What the tag window says of a peer's Data frame (the daemon's router decides)."""

    DELIVER = "deliver"  # within the window, or not windowed
    HOLD = "hold"  # far ahead: held, unacknowledged, until the workers come near
    #: far ahead where frames may drop and the workers run: acknowledged and dropped (counted
    #: ``ahead``); ``ahead`` is told, so that a worker that gets there catches up
    DROP = "drop"


#: the fault hook: (the sending daemon's cluster, the frame) -> what to do with it
FrameFault = Callable[[int, Data], FaultAction]


@dataclass
class _Inbound:
    cluster: int | None = None  # set once the Hello is accepted
    incarnation: int = 0  # the dialer's, from its Hello
    name: str = ""  # the dialer's display name, from its Hello
    joined: bool = False  # its Join is accepted: Data may come
    ack_pending: bool = False
    since: float = 0.0  # accepted (time.monotonic()): the handshake must end in time
    hello: Hello | None = None  # the dialer's Hello and this side's Welcome: what the
    welcome: Welcome | None = None  # dialer's proof of the cluster secret covers
    host: str = ""  # the dialer's address, for the per-source cap on pending handshakes
    received: int = 0  # the sequence number of the last Data frame read on this connection
    #: frames kept back, a heap by (iteration, seq): the earliest to come due on top
    held: list[tuple[int, int, Data]] = field(default_factory=list)
    paused: bool = False  # not read from: it holds too much (a sender ignoring its window)


#: a sender holding this many times this daemon's own window of frames beyond the tag window
#: is not read from until the workers catch up (a member ignoring its window; windows are
#: per daemon, so an honest peer's may be larger than this one's)
_PAUSE_WINDOWS = 4

#: a hold that reached this many payload bytes and is (nearly) empty again has the C heap
#: trimmed, TRIM_DELAY seconds later (the frames taken from it are in the workers' hands until
#: then), at most once per TRIM_INTERVAL (a trim walks the whole heap: up to a few hundred ms
#: for a fragmented 300 MB, so on a thread)
TRIM_AFTER = 1 << 20
TRIM_DELAY = 2.0
TRIM_INTERVAL = 30.0

#: how long a producer waits on one full window before it tries the other full ones again
BROADCAST_SLICE = 0.01


class Transport:
    """Links of this daemon (cluster ``hello.cluster``) to every other daemon of the run."""

    def __init__(
        self,
        hello: Hello,
        join: Join,
        membership: Membership,
        listen: tuple[str, int],
        peers: list[PeerAddress],
        deliver: Callable[[Data], None],
        settings: LinkSettings,
        stats: TransportStats | None = None,
        pool: BufferPool | None = None,
        catchup: Callable[[int, Catchup], None] | None = None,
        beyond: Callable[[Data], Beyond] | None = None,
        ahead: Callable[[int, int], None] | None = None,
    ) -> None:
        self.hello = hello
        self.join = join
        self.membership = membership
        self.listen = listen
        self.peers = peers
        self.settings = settings
        self.stats = stats or TransportStats()
        self.pool = pool or BufferPool()
        self._deliver = deliver
        #: called on the event loop with each catch-up note a joined peer sends (its cluster)
        self._catchup = catchup
        #: what the tag window says of a Data frame (None: every frame is delivered)
        self._beyond = beyond
        #: told (peer cluster, iteration) of every frame dropped as too far ahead
        self._ahead = ahead
        #: frames held on all connections (read from worker threads: whether to wake the loop)
        self.holding = 0
        #: the payload bytes of those frames
        self.held_bytes = 0
        #: the most held_bytes has been since the C heap was last trimmed
        self._peak = 0
        self._trim: asyncio.TimerHandle | None = None  # a trim to come
        self._trimming: asyncio.Future[bool] | None = None  # a trim under way (a thread)
        self._last_trim = -math.inf
        self.trims = 0  # times the heap was given back after a backlog
        #: the earliest iteration of a frame held (None: none): a worker's advance wakes the
        #: loop only when it brings a held frame within reach
        self.due_at: int | None = None
        #: test-only: consulted for every Data frame of a joined connection, before anything
        #: else is done with it, to lose or duplicate chosen frames (tests/test_reliability.py:
        #: loopback itself loses nothing in flight). None in production: one attribute check.
        self.fault: FrameFault | None = None
        self._loop = asyncio.get_running_loop()
        self.links = [
            OutLink(p.cluster, p.host, p.port, hello, join, settings, self.stats, self._loop)
            for p in peers
        ]
        self._by_cluster = {link.cluster: link for link in self.links}
        self._inbound: dict[FrameProtocol, _Inbound] = {}
        # (remote host, reason) -> when to log its refusal again, least recently refused
        # first (a dict keeps insertion order), at most _MAX_REFUSALS_TRACKED
        self._refusals: dict[tuple[str, str], Throttle] = {}
        self._delivered: dict[int, int] = {}  # peer cluster -> last seq delivered (and acked)
        #: peer cluster -> sequence numbers delivered past ``_delivered`` (behind a held frame)
        self._early: dict[int, set[int]] = {}
        self._incarnations: dict[int, int] = {}  # peer cluster -> its latest incarnation
        self._non_finite_from: set[int] = set()  # peer clusters already logged for it
        self._control_log = Throttle()  # bad control messages: once, then at doubling intervals
        self._pending_log = Throttle()  # connections closed before their handshake ended
        self._server: asyncio.Server | None = None
        self._closed = asyncio.Event()
        self.port: int | None = None

    def __repr__(self) -> str:
        return f"Transport(cluster={self.hello.cluster}, port={self.port}, peers={len(self.links)})"

    def __str__(self) -> str:  # how log lines name this end: in words, not a repr
        return f"daemon {self.hello.cluster}"

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, tasks: asyncio.TaskGroup, sock: socket.socket | None = None) -> None:
        """Listen (on ``sock`` if given: a socket bound beforehand, e.g. to port 0 so that its
        address can go into every daemon's config), and start one task per outbound link in
        ``tasks`` (the daemon's group)."""
        tls: dict[str, Any] = {}
        if self.settings.tls is not None:
            # A connection is made (and counted against the caps on pending handshakes) once
            # its TLS handshake succeeded; until then only ssl_handshake_timeout bounds it.
            # (Wrapping an accepted connection later, with start_tls, is what would let the
            # caps count it — but uvloop reads before a protocol can pause it.)
            tls = {
                "ssl": self.settings.tls.server,
                "ssl_handshake_timeout": self.settings.handshake_timeout,
            }
        if sock is not None:
            self._server = await self._loop.create_server(self._accept, sock=sock, **tls)
        else:
            host, port = self.listen
            self._server = await self._loop.create_server(self._accept, host, port, **tls)
        self.port = self._server.sockets[0].getsockname()[1]
        for link in self.links:
            tasks.create_task(link.run(), name=f"link-{link.name}")
        tasks.create_task(self._drop_silent(), name="inbound-liveness")

    async def close(self, drain_unconnected: bool = True) -> None:
        """Drain outbound links, then stop intake and close everything (``drain_unconnected``:
        also wait for peers that never connected, see OutLink.close).

        The server listens until the links have drained: when several daemons stop at once,
        a peer whose link to this one is reconnecting right then must still get through, to
        take this daemon's acks and Bye — with the server closed first, its drain (and this
        one's, waiting on it in turn) would wait out drain_timeout."""
        self._closed.set()
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        if self._trimming is not None:
            await asyncio.wait({self._trimming})  # a thread: it ends by itself, soon
        await asyncio.gather(*(link.close(drain_unconnected) for link in self.links))
        if self._server is not None:
            self._server.close()
        for proto in list(self._inbound):
            proto.send(Bye(reason="shutdown"))
            proto.close()
        if self._server is not None:
            await self._server.wait_closed()

    # --- sending (worker threads) -------------------------------------------------------------

    def broadcast(
        self, tag: Tag, sender: int, step: int, value: Vector, packed: Packed | None = None
    ) -> None:
        """One frame per remote daemon (the receiving daemon fans out to its workers). Every
        link takes it as soon as its window has room: a producer held by one hung or away peer
        has already sent the frame to all the others (it waits on the full windows together,
        in slices of ``BROADCAST_SLICE``, each as its link's policy says)."""
        since = time.monotonic()
        full = [
            link
            for link in self.links
            if link.offer_within(tag, sender, step, value, since, since, packed) is None
        ]
        for link in full:
            link.note_wait()
        while len(full) > 1:
            until = time.monotonic() + BROADCAST_SLICE
            full = [
                link
                for i, link in enumerate(full)
                if link.offer_within(
                    tag, sender, step, value, until if i == 0 else 0.0, since, packed
                )
                is None
            ]
        if full:  # one left: it waits as long as its policy says, in one go
            full[0].offer_within(tag, sender, step, value, math.inf, since, packed)

    def send(
        self,
        cluster: int,
        tag: Tag,
        sender: int,
        step: int,
        value: Vector,
        to: tuple[int, ...],
        post: bool,
        packed: Packed | None = None,
    ) -> None:
        """One frame to daemon ``cluster`` for its processes ``to`` (into their inbox queues
        if ``post``); ``packed``: ``value``'s packed bytes, which the frame carries instead."""
        link = self._by_cluster.get(cluster)
        if link is None:  # membership lists the cluster, the config no address: counted
            self.stats.drop("no_link")
            return
        link.offer(tag, sender, step, value, to, post, packed)

    def release_producers(self) -> None:
        """Shutdown: no worker may stay blocked on a full link (see OutLink.release_producers)."""
        for link in self.links:
            link.release_producers()

    def connected(self) -> int:
        return sum(1 for link in self.links if link.state is LinkState.CONNECTED)

    def connected_clusters(self) -> set[int]:
        """The peer daemons frames can come from now: over this daemon's link to them, or
        theirs to it (a handshake that succeeded in either direction)."""
        out = {link.cluster for link in self.links if link.state is LinkState.CONNECTED}
        return out | {
            s.cluster for s in self._inbound.values() if s.joined and s.cluster is not None
        }

    # --- inbound ------------------------------------------------------------------------------

    async def _drop_silent(self) -> None:
        """Close inbound connections that said nothing for ``peer_timeout`` — a dialer pings at
        least twice per period when it hears nothing, so silence means it stopped, or the route
        is cut, and a connection nobody closes keeps its peer's frames waiting — and tell the
        others, a few times per period, that this side is alive (an unasked Pong)."""
        timeout = self.settings.peer_timeout
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout / 4)
            now = time.monotonic()
            self.release()
            for proto, state in list(self._inbound.items()):
                if state.paused:  # not read from on purpose: its silence says nothing
                    proto.heard_at = now
                if not state.joined and now - state.since > self.settings.handshake_timeout:
                    # Bytes trickled in keep a connection from being silent, not from being
                    # late: a handshake has a deadline of its own.
                    self.stats.error("handshake_timeout")
                    if (count := self._pending_log.due(f"late {state.host}")) is not None:
                        log.warning(
                            "%s: closing a connection from %s: no handshake within %gs (%d so far)",
                            self,
                            proto.remote,
                            self.settings.handshake_timeout,
                            count,
                        )
                    proto.abort()
                    continue
                if state.joined and now - proto.heard_at <= timeout:
                    # This side's sign of life: the dialer's Ping waits behind the part it is
                    # writing, which on a slow link may take longer than peer_timeout to send.
                    proto.send(Pong(nonce=0))
                if now - proto.heard_at > timeout:
                    who = self._label(state.cluster) if state.cluster is not None else "a dialer"
                    log.warning(
                        "%s: no sign of life from %s (%s) for %.1fs: connection dropped",
                        self,
                        who,
                        proto.remote,
                        now - proto.heard_at,
                    )
                    self.stats.error("peer_silent")
                    proto.abort()

    def _accept(self) -> FrameProtocol:
        # Until its Join is accepted a dialer gets a small buffer and small frames only: a
        # connection costs a few KiB, not a read buffer and a model-sized payload.
        codec = Codec(
            max_payload=0,
            allocator=self.pool,
            max_header=PRE_TRUST_HEADER,
            read_buffer_size=PREFIX.size + PRE_TRUST_HEADER,
        )
        proto = FrameProtocol(
            codec,
            self._on_message,
            self._on_error,
            self._on_lost,
            timeout=self.settings.peer_timeout,
            on_made=self._on_made,
        )
        return proto

    def _on_made(self, proto: FrameProtocol) -> None:
        """Cap the handshakes under way, in all and per source address. Over a cap the
        *oldest* handshake (from that source, or of all) is closed, counted — not the newcomer:
        a flood of idle connections churns through the slots while an honest dialer, whose
        handshake takes milliseconds, still gets through."""
        state = self._inbound[proto] = _Inbound(since=time.monotonic())
        peer = proto.peername
        state.host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        pending = [(p, s) for p, s in self._inbound.items() if not s.joined]
        same = [(p, s) for p, s in pending if s.host == state.host]
        for group, cap in ((same, MAX_PENDING_PER_SOURCE), (pending, MAX_PENDING)):
            if len(group) > cap:
                oldest, old = min(group, key=lambda item: item[1].since)
                self.stats.error("too_many_pending")
                if (count := self._pending_log.due(old.host)) is not None:
                    log.warning(
                        "%s: closing the oldest handshake under way (from %s): %d under way, "
                        "%d from its source; at most %d, %d per source (%d so far)",
                        self,
                        oldest.remote,
                        len(pending),
                        len(same),
                        MAX_PENDING,
                        MAX_PENDING_PER_SOURCE,
                        count,
                    )
                oldest.abort()
                # Out of the count now, not when its loss is reported: connections accepted in
                # one batch would otherwise all pick this one again.
                self._inbound.pop(oldest, None)
                return

    def _on_message(self, proto: FrameProtocol, msg: Message) -> None:
        state = self._inbound.get(proto)
        if state is None:  # closed over the caps, its last bytes still being read
            return
        if not state.joined or state.cluster is None:
            self._handshake(proto, state, msg)
            return
        match msg:
            case Data() as data:
                peer = state.cluster
                if state.incarnation != self._incarnations.get(peer):
                    return  # a connection of the daemon's last incarnation, being closed
                if self.fault is not None and self._faulty(proto, peer, data):
                    return
                problem = self._data_problem(peer, data)
                if problem is not None:  # well-framed but not of this run: close, count
                    self.stats.error("bad_data")
                    log.error("%s: closing link from %s: %s", self, self._label(peer), problem)
                    proto.close()
                    return
                last = self._delivered.get(peer, 0)
                if not state.ack_pending:  # acked once per read batch, duplicates included:
                    state.ack_pending = True  # a resent frame must be acked or it stays queued
                    self._loop.call_soon(self._ack, proto, state)
                if data.seq <= last or data.seq <= state.received:
                    self.stats.drop("duplicate")
                    return
                expected = max(last, state.received) + 1
                if data.seq != expected:
                    self.stats.error("sequence_gap")
                    log.error("%s: frame %d after %d from %s", self, data.seq, expected - 1, peer)
                    proto.close()
                    return
                state.received = data.seq
                early = self._early.get(peer)
                if early is not None and data.seq in early:  # resent: delivered past a held one
                    self.stats.drop("duplicate")
                    return
                self.stats.count("in", str(data.tag[0]), self._label(peer), proto.codec.last_size)
                if not finite(data.value):  # judged first: it is no news of any iteration
                    self._take(peer, data)  # (dropped there, counted)
                    return
                match self._beyond(data) if self._beyond is not None else Beyond.DELIVER:
                    case Beyond.HOLD:
                        self._hold_back(proto, state, data)
                    case Beyond.DROP:
                        self._taken(peer, data.seq)  # acked like any frame, never resent
                        self.stats.drop("ahead")
                        if self._ahead is not None:
                            self._ahead(peer, int(data.tag[1]))
                    case _:
                        self._take(peer, data, checked=True)
            case Ping(nonce=nonce):
                proto.send(Pong(nonce=nonce))
            case Control() as control:
                self._on_control(proto, state, control)
            case Bye():
                # The dialer stops (its workers are gone): this daemon's link to it need not
                # wait for acks any more, even while it is down and would never hear the bye.
                link = self._by_cluster.get(state.cluster)
                current = state.incarnation == self._incarnations.get(state.cluster)
                if link is not None and current:
                    link.peer_stopped()
                if state.held and current:
                    # It leaves for good: what it sent and this daemon held is all there will
                    # be of it — the workers take it when they get there (a late daemon
                    # finishes from the frames of peers that finished and left).
                    for _, _, data in sorted(state.held):
                        self._take(state.cluster, data, checked=True)
                    self._unhold(state)
                proto.close()
            case _:
                self.stats.error("unexpected_message")
                log.warning("%s: unexpected %s from %s", self, msg.kind, proto.remote)
                proto.close()

    def _take(self, peer: int, data: Data, checked: bool = False) -> None:
        """Deliver one frame of daemon ``peer`` (or drop it, counted, if not all finite) and
        count it as taken: the cumulative ack moves past it once every frame before it is.
        ``checked``: its values were just found finite (one pass over a model is enough)."""
        self._taken(peer, data.seq)
        # Checked on the payload just received into its buffer: the last point before a
        # mailbox, where a quorum could take the value — and the algorithm's averaging, which
        # reads the values anyway, comes after the quorum is chosen.
        if not checked and not finite(data.value):
            self.stats.drop("non_finite")  # acked like any frame, never resent
            if peer not in self._non_finite_from:
                self._non_finite_from.add(peer)
                log.warning(
                    "dropping a message with non-finite values from daemon %s "
                    "(process %s, tag %s); further ones are only counted",
                    self._label(peer),
                    self.membership.name(data.sender),
                    tag_text(data.tag),
                )
            return
        self._deliver(data)

    def _taken(self, peer: int, seq: int) -> None:
        last = self._delivered.get(peer, 0)
        if seq != last + 1:
            self._early.setdefault(peer, set()).add(seq)
            return
        early = self._early.get(peer)
        while early and seq + 1 in early:  # frames delivered past a held one: in order now
            seq += 1
            early.discard(seq)
        self._delivered[peer] = seq

    def _hold_back(self, proto: FrameProtocol, state: _Inbound, data: Data) -> None:
        iteration = data.tag[1]
        assert isinstance(iteration, int) and state.cluster is not None  # (checked on entry)
        heapq.heappush(state.held, (iteration, data.seq, data))
        self.holding += 1
        self.held_bytes += data.value.nbytes
        self._peak = max(self._peak, self.held_bytes)
        if self.due_at is None or iteration < self.due_at:
            self.due_at = iteration
            # A worker may have advanced since the frame was judged, and found nothing held
            # then: look again now that due_at says so, or it would wait for the next sweep.
            self._loop.call_soon(self.release)
        ahead = len(state.held) + len(self._early.get(state.cluster, ()))
        if not state.paused and ahead >= _PAUSE_WINDOWS * self.settings.window:
            state.paused = True
            self.stats.error("window_exceeded")
            log.warning(
                "%s: %s sent %d frames beyond what its workers can take: not reading from it "
                "until they catch up",
                self,
                self._label(state.cluster),
                ahead,
            )
            proto.pause_reading()

    def held_from(self) -> dict[int, int]:
        """Frames held back now, per peer cluster."""
        out: dict[int, int] = {}
        for state in self._inbound.values():
            if state.held and state.cluster is not None:
                out[state.cluster] = out.get(state.cluster, 0) + len(state.held)
        return out

    def release(self, reach: int | None = None) -> None:
        """Deliver the held frames that are within the window now (on the loop; called when
        a worker advances, and from the liveness loop every little while). ``reach``: no
        frame of a later iteration can be due (the fastest worker's step plus the window):
        only the frames up to it are looked at, so that what a flood holds far ahead costs
        nothing per step."""
        if not self.holding or self._beyond is None:
            return
        beyond = self._beyond
        for proto, state in list(self._inbound.items()):
            peer = state.cluster
            if not state.held or peer is None or state.incarnation != self._incarnations.get(peer):
                continue
            still: list[tuple[int, int, Data]] = []
            taken = 0
            heap = state.held
            while heap and (reach is None or heap[0][0] <= reach):
                entry = heapq.heappop(heap)
                data = entry[2]
                verdict = beyond(data)
                if verdict is Beyond.HOLD:  # not yet for the workers it is for
                    still.append(entry)
                    continue
                taken += 1
                self.held_bytes -= data.value.nbytes
                if data.seq <= self._delivered.get(peer, 0) or data.seq in self._early.get(
                    peer, ()
                ):  # taken meanwhile from a resend on a newer connection
                    continue
                if verdict is Beyond.DROP:  # held before the workers ran, far behind it still
                    self._taken(peer, data.seq)
                    self.stats.drop("ahead")
                    if self._ahead is not None:
                        self._ahead(peer, int(data.tag[1]))
                else:
                    self._take(peer, data, checked=True)  # (judged finite on arrival)
            for entry in still:
                heapq.heappush(heap, entry)
            if not taken:
                continue
            self.holding -= taken
            self._trim_later()
            if not state.ack_pending:
                state.ack_pending = True
                self._loop.call_soon(self._ack, proto, state)
            ahead = len(heap) + len(self._early.get(peer, ()))
            if state.paused and ahead < self.settings.window:
                state.paused = False
                proto.resume_reading()
        self._due()

    def _unhold(self, state: _Inbound) -> None:
        """Let go of all ``state`` holds (taken at a bye, or resent after a lost link)."""
        self.holding -= len(state.held)
        self.held_bytes -= sum(data.value.nbytes for _, _, data in state.held)
        state.held = []
        self._due()
        self._trim_later()

    def _trim_later(self) -> None:
        """Once the hold is empty again after a backlog (a daemon back from a stop or a
        partition takes in up to its senders' windows at once — 6 MB for three peers of a
        1,000-parameter model), give the freed heap back to the system a moment later, when
        the workers have been through the frames: the C allocator keeps a peak of small
        blocks otherwise, and a long run's memory would grow by each new peak. "Empty": an
        eighth of the peak at most, so that a frame held for long does not put it off."""
        if (
            self._closed.is_set()
            or self._peak < TRIM_AFTER
            or self.held_bytes > self._peak // 8
            or self._trim is not None
            or self._trimming is not None
        ):
            return
        delay = max(TRIM_DELAY, self._last_trim + TRIM_INTERVAL - time.monotonic())
        self._trim = self._loop.call_later(delay, self._give_back)

    def _give_back(self) -> None:
        self._trim = None
        if self._closed.is_set() or self.held_bytes > self._peak // 8:
            return  # a new backlog: trimmed once it is gone
        self._peak = self.held_bytes
        self._last_trim = time.monotonic()
        self._trimming = self._loop.run_in_executor(None, give_back_memory)
        self._trimming.add_done_callback(self._trimmed)

    def _trimmed(self, done: asyncio.Future[bool]) -> None:
        self._trimming = None
        if not done.cancelled() and done.exception() is None and done.result():
            self.trims += 1
        self._trim_later()  # a backlog that came and went meanwhile

    def _due(self) -> None:
        """The earliest iteration of a frame held on any connection (None: none held)."""
        self.due_at = min((st.held[0][0] for st in self._inbound.values() if st.held), default=None)

    def _on_control(self, proto: FrameProtocol, state: _Inbound, control: Control) -> None:
        peer = state.cluster
        assert peer is not None
        if state.incarnation != self._incarnations.get(peer):
            return  # a connection of the daemon's last incarnation, being closed
        try:
            note = catchup.parse(control)
        except catchup.CatchupError as exc:  # counted; the link itself is sound
            self.stats.error("bad_control")
            if (count := self._control_log.due(str(peer))) is not None:
                log.warning(
                    "%s: ignoring a control message from %s: %s (%d so far)",
                    self,
                    self._label(peer),
                    exc,
                    count,
                )
            return
        if self._catchup is not None:
            self._catchup(peer, note)

    def request_state(self, cluster: int, restart: bool) -> None:
        """Ask daemon ``cluster`` for its state (on the event loop; the answer is a Data frame);
        ``restart``: this daemon's workers have not started yet."""
        link = self._by_cluster.get(cluster)
        if link is not None:
            link.control(catchup.StateRequest(restart).control())

    def send_state(self, cluster: int, tag: Tag, sender: int, step: int, value: Vector) -> bool:
        """A state frame to daemon ``cluster``, from the event loop (beyond the window if it is
        full); False only if there is no link to it or the link is closing."""
        link = self._by_cluster.get(cluster)
        return link is not None and link.offer_nowait(tag, sender, step, value)

    def announce_start(self, step: int | None, resumed: int | None = None) -> None:
        """Say in every first note that this daemon waits to start its workers from a
        checkpoint at iteration ``step`` (None: it does not); a change is said at once to
        every peer told before. ``resumed``: the iteration they resumed at in a whole-cluster
        restart, said once to each peer — now if connected, else in the first note when it
        comes (a daemon up late joins there; a restart of it later is no part of this one)."""
        for link in self.links:
            told = link.start_note
            link.start_note, link.resumed_note = step, resumed
            if link.noted and (told != step or resumed is not None):
                link.control(catchup.Missed(link.lost_upto, step, resumed).control())
                link.resumed_note = None

    def lose_all(self, step: int) -> None:
        """Tell every peer that frames of iterations up to ``step`` will never come from this
        daemon (its workers skipped them, resuming past them)."""
        for link in self.links:
            link.lose(step)

    def lose_to(self, cluster: int, step: int) -> None:
        """Tell daemon ``cluster`` that frames of iterations up to ``step`` will never come
        from this daemon (no link to it: nothing to tell)."""
        link = self._by_cluster.get(cluster)
        if link is not None:
            link.lose(step)

    def lost_upto(self, cluster: int) -> int | None:
        """The highest iteration of a frame dropped for daemon ``cluster`` (None: none)."""
        link = self._by_cluster.get(cluster)
        return link.lost_upto if link is not None else None

    def _faulty(self, proto: FrameProtocol, peer: int, data: Data) -> bool:
        """Apply the fault hook to one frame; True if the caller must not go on with it."""
        hook = self.fault
        assert hook is not None
        match hook(peer, data):
            case FaultAction.LOSE:
                log.info("%s: fault hook: frame %d from %s lost", self, data.seq, peer)
                proto.abort()
                return True
            case FaultAction.DUPLICATE:
                self.fault = None  # the original, past the hook; the caller takes the copy
                try:
                    self._on_message(proto, data)
                finally:
                    self.fault = hook
                return proto.transport is None or proto.transport.is_closing()
        return False

    def _handshake(self, proto: FrameProtocol, state: _Inbound, msg: Message) -> None:
        if state.cluster is None:
            self._hello(proto, state, msg)
        else:
            self._join(proto, state, msg)

    def _hello(self, proto: FrameProtocol, state: _Inbound, msg: Message) -> None:
        if not isinstance(msg, Hello):
            self._refuse(proto, None, "bad_handshake", f"expected hello, got {msg.kind}")
            return
        who = f"daemon {msg.name!r} (cluster {msg.cluster})"
        try:
            version = negotiate(msg)
        except HandshakeError as exc:
            self._refuse(proto, who, str(exc.reason), str(exc))
            return
        # With a secret, what the Hello claims is checked only once the Join has proved it
        # (_join): a refusal before the proof would tell a stranger which claims are right.
        if self.settings.secret is None and (problem := self._claim_problem(msg)) is not None:
            self._refuse(proto, who, *problem)
            return
        # The incarnation is taken only once the Join shows a daemon of this run: a Hello alone
        # must not reset what this daemon keeps for the cluster, nor close its connections.
        state.cluster, state.incarnation, state.name = msg.cluster, msg.incarnation, msg.name
        welcome = Welcome(
            version=version,
            cluster=self.hello.cluster,
            incarnation=self.hello.incarnation,
            nonce=secrets.randbits(63),
        )
        secret = self.settings.secret
        if secret is not None:
            welcome = replace(welcome, mac=auth.proof(secret, "acceptor", msg, welcome))
        state.hello, state.welcome = msg, welcome
        proto.send(welcome)

    def _claim_problem(self, hello: Hello) -> tuple[str, str] | None:
        """Why the cluster and incarnation a Hello claims cannot be taken: (reason, text)."""
        if not 0 <= hello.cluster < self.membership.clusters or hello.cluster == self.hello.cluster:
            text = f"cluster {hello.cluster} is not a peer of cluster {self.hello.cluster}"
            return "membership_mismatch", text
        known = self._incarnations.get(hello.cluster)
        if known is not None and hello.incarnation < known:
            text = f"incarnation {hello.incarnation} is older than {known}, already seen"
            return Reason.STALE_INCARNATION, text
        return None

    def _new_incarnation(self, proto: FrameProtocol, state: _Inbound) -> None:
        """The daemon that joined on ``proto`` is a new incarnation of its cluster (a first
        start, or a restart): its frames are numbered from 1 anew, and connections of its last
        incarnation (half-open after a crash) are closed."""
        assert state.cluster is not None
        restarted = state.cluster in self._incarnations
        self._incarnations[state.cluster] = state.incarnation
        self._delivered.pop(state.cluster, None)
        self._early.pop(state.cluster, None)
        for other, st in list(self._inbound.items()):
            if other is not proto and st.cluster == state.cluster:
                other.close()
        link = self._by_cluster.get(state.cluster)
        if link is not None:
            # Before any of its frames is delivered: what this daemon queues in answer to them
            # is for the new incarnation, and must not be dropped as the old one's.
            link.peer_restarted(state.incarnation)
            link.retry_now()
        if restarted:
            log.info(
                "%s: daemon %s restarted (new incarnation): its frames are numbered anew",
                self,
                state.name,
            )

    def _join(self, proto: FrameProtocol, state: _Inbound, msg: Message) -> None:
        who = f"daemon {state.name!r} (cluster {state.cluster})"
        if not isinstance(msg, Join):
            self._refuse(proto, who, "bad_handshake", f"expected join, got {msg.kind}")
            return
        # Nothing the Join says is looked at before it proves the cluster secret.
        secret = self.settings.secret
        if secret is not None and (
            state.hello is None
            or state.welcome is None
            or not auth.verify(secret, "dialer", state.hello, state.welcome, msg.mac)
        ):
            why = "no proof" if not msg.mac else "a wrong proof"
            self._refuse(proto, who, "bad_secret", f"{why} of the cluster secret")
            return
        if secret is None and msg.mac:
            text = "it proves a cluster secret and this daemon has none (--secret-file)"
            self._refuse(proto, who, "bad_secret", text)
            return
        if (
            secret is not None
            and state.hello is not None
            and (problem := self._claim_problem(state.hello)) is not None
        ):
            self._refuse(proto, who, *problem)
            return
        try:
            check_join(
                msg,
                expect_dim=self.join.dim,
                expect_dtype=self.join.dtype,
                expect_fingerprint=self.join.fingerprint,
            )
        except HandshakeError as exc:
            if exc.reason == Reason.FINGERPRINT_MISMATCH and secret is not None and msg.settings:
                # Both proved the secret: a member is told which settings differ (and this
                # daemon's values), and this log names them too.
                mine = self.settings.run_settings
                names = auth.differing(secret, mine, msg.settings)
                if names:
                    here = ", ".join(f"{n} (here {mine.get(n, '(none)')[:60]})" for n in names)
                    text = f"its run settings differ from this daemon's: {here}"
                    detail = auth.refusal_detail(names, mine)
                    self._refuse(proto, who, str(exc.reason), text, detail)
                    return
            self._refuse(proto, who, str(exc.reason), str(exc))
            return
        assert state.cluster is not None
        members = self.membership.members[state.cluster]
        if tuple(msg.workers) != members:
            text = (
                f"cluster {state.cluster} hosts processes {list(members)} here, "
                f"but says {list(msg.workers)}"
            )
            self._refuse(proto, who, "membership_mismatch", text)
            return
        known = self._incarnations.get(state.cluster)
        if known is not None and state.incarnation < known:  # overtaken since its Hello
            text = f"incarnation {state.incarnation} is older than {known}, already seen"
            self._refuse(proto, who, Reason.STALE_INCARNATION, text)
            return
        if known is None or state.incarnation > known:
            self._new_incarnation(proto, state)
        elif (current := self._joined(state.cluster)) is not None:
            # One connection per member: a second one of the same start is refused while the
            # first shows signs of life (the dialer pings at least twice per peer_timeout), so
            # that no one but the sender of that link moves its sequence numbers. A silent one
            # is half-open — its dialer gave it up, the route was cut — and makes way.
            quiet = time.monotonic() - current.heard_at
            if quiet < self.settings.peer_timeout / 2:
                text = f"cluster {state.cluster} is connected already (from {current.remote})"
                self._refuse(proto, who, "already_connected", text)
                return
            log.info(
                "%s: %s connects again; its last connection (%s) was silent for %.1fs: closed",
                self,
                who,
                current.remote,
                quiet,
            )
            current.abort()
        state.joined = True
        proto.codec.widen(max_payload=self.settings.max_payload)
        proto.send(Ack(seq=self._delivered.get(state.cluster, 0)))
        log.info("%s: inbound link from %s (%s) established", self, who, proto.remote)

    def _joined(self, cluster: int) -> FrameProtocol | None:
        """The joined connection of daemon ``cluster``, if there is one."""
        incarnation = self._incarnations.get(cluster)
        for proto, state in self._inbound.items():
            if state.joined and state.cluster == cluster and state.incarnation == incarnation:
                return proto
        return None

    def _refuse(
        self, proto: FrameProtocol, who: str | None, reason: str, text: str, detail: str = ""
    ) -> None:
        """Refuse a dialer: the reason code goes back (the dialer words it from its side; the
        details would be this run's settings, sent to a peer not authenticated), the details
        into this daemon's log — once, then at doubling intervals per remote host and reason,
        as a dialer retries every few seconds. Keyed by the host, not by anything the Hello
        claims: a stranger varying its name or fingerprint gets no log line per connection."""
        self.stats.error(reason)
        host = proto.peername[0] if isinstance(proto.peername, tuple) else str(proto.peername)
        who = who or host
        key = (host, reason)
        throttle = self._refusals.pop(key, None) or Throttle()
        self._refusals[key] = throttle  # most recently refused last: the first is evicted
        if len(self._refusals) > _MAX_REFUSALS_TRACKED:
            del self._refusals[next(iter(self._refusals))]
        if (count := throttle.due(reason)) is not None:
            again = f" (refused {count} times so far)" if count > 1 else ""
            # Connected already: most often a dialer's reconnect overlapping its last
            # connection for a moment — or someone claiming a member's place.
            level = logging.WARNING if reason == "already_connected" else logging.ERROR
            log.log(level, "refusing %s at %s: %s%s", who, proto.remote, text, again)
        proto.send(Refuse(reason=reason, detail=detail))
        proto.close()

    def _data_problem(self, peer: int, data: Data) -> str | None:
        """Why a Data frame from daemon ``peer`` cannot be a message of this run, or None."""
        if data.sender not in self.membership.members[peer]:
            return f"sender {data.sender} is not a process of cluster {peer}"
        if data.value.shape != (self.join.dim,) or data.value.dtype.name != self.join.dtype:
            return (
                f"value of shape {data.value.shape} and dtype {data.value.dtype}, "
                f"expected ({self.join.dim},) {self.join.dtype}"
            )
        if any(p not in self.join.workers for p in data.to):
            return f"recipients {data.to} are not all processes of this daemon"
        if (
            len(data.tag) < 2
            or not isinstance(data.tag[0], str)
            or not isinstance(data.tag[1], int)
        ):
            return f"tag {data.tag!r} is not (kind, iteration, …)"
        return None

    def _ack(self, proto: FrameProtocol, state: _Inbound) -> None:
        state.ack_pending = False
        if state.cluster is not None and state.incarnation == self._incarnations.get(state.cluster):
            proto.send(Ack(seq=self._delivered.get(state.cluster, 0)))

    def _on_error(self, proto: FrameProtocol, exc: RemoteProtocolError) -> None:
        self.stats.error(str(exc.reason))

    def _on_lost(self, proto: FrameProtocol, exc: Exception | None) -> None:
        state = self._inbound.pop(proto, None)
        if state is not None and state.held:  # unacked: the sender resends them
            self._unhold(state)

    def _label(self, cluster: int) -> str:
        for link in self.links:
            if link.cluster == cluster:
                return link.name
        return str(cluster)
