"""Reliable links to the other daemons, as the papers' model assumes.

Each ordered pair of daemons has its own connection: daemon A dials B to send A's messages to
B, and B answers on it with cumulative acks. So no tie-breaking is needed, and each side of a
connection has one job.

Outbound (:class:`OutLink`, one per remote daemon, a nats-style lifecycle)::

    CONNECTING ─handshake ok─> CONNECTED ─connection lost─> RECONNECTING ─> … ─> CONNECTED
         └──────────────── close() ─> DRAINING (flush, bounded wait) ─> CLOSED

* Worker threads hand frames over with :meth:`OutLink.offer`. Up to a window of frames
  (``max_queue``, at most ``queue_bytes`` worth) may be outstanding (queued or sent but not
  acked); a producer beyond that waits (counted in ``queue_waits``, shown in /status). What
  ends the wait is the algorithm's delivery policy: frames that may drop wait up to
  ``queue_timeout`` (then ``queue_full``) or until the peer is away (``peer_away``) — counted and
  logged, never silent; frames that are kept wait for room however long.
* Every frame gets a per-link sequence number. Sent frames stay in a resend buffer until the
  peer acks them; after a reconnect the unacked ones go out again first, so a reconnect loses
  nothing, and the receiver drops the duplicates (seq ≤ the last it delivered).
* Reconnects back off exponentially with full jitter; a peer silent or unreachable longer than
  ``peer_timeout`` (a heartbeat asks for signs of life) is flagged (``away``) and logged.
* A link remembers the highest iteration it dropped frames of (``lost_upto``: dropped while the
  peer was away or the window stayed full, or discarded because the peer restarted) and says so
  at every connection (:class:`~peerlearn.transport.catchup.Missed`): a peer that still needs
  them catches up by state transfer instead of waiting for them for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeVar

import numpy as np

from peerlearn.effects import Tag, Vector, tag_text
from peerlearn.transport import auth
from peerlearn.transport.catchup import Missed
from peerlearn.transport.protocol import FrameProtocol
from peerlearn.transport.stats import TransportStats
from peerlearn.transport.tls import TlsContexts
from peerlearn.wire import (
    Ack,
    Bye,
    Codec,
    Control,
    Data,
    Hello,
    Join,
    LocalProtocolError,
    Message,
    Ping,
    Pong,
    Reason,
    Refuse,
    RemoteProtocolError,
    Welcome,
)
from peerlearn.wire.codec import DEFAULT_PART_BYTES, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from peerlearn.wire.messages import Packed

__all__ = ["LinkSettings", "LinkState", "OutLink", "Throttle"]

T = TypeVar("T")

log = logging.getLogger(__name__)


def _tiny_only(dtype: np.dtype[Any], shape: tuple[int, ...]) -> Vector:
    """Allocator of the out-link's receive side: a peer never sends data back on it."""
    raise RemoteProtocolError(Reason.BAD_FIELD, "data frame on an outbound link")


class Throttle:
    """When to log a condition that recurs on every retry: the first time, whenever its text
    changes, and — if it should be repeated — again at doubling intervals (``first`` seconds,
    then twice that, … up to ``longest``), so that a log stays readable for days."""

    def __init__(self, first: float = 10.0, longest: float = 600.0) -> None:
        self._first, self._longest = first, longest
        self._text: str | None = None
        self._count = 0
        self._interval = first
        self._next = 0.0

    def due(self, text: str, repeat: bool = True) -> int | None:
        """Count one occurrence of ``text``; the count so far if it should be logged now."""
        now = time.monotonic()
        if text != self._text:
            self._text, self._count, self._interval = text, 1, self._first
            self._next = now + self._interval
            return 1
        self._count += 1
        if repeat and now >= self._next:
            self._interval = min(self._interval * 2, self._longest)
            self._next = now + self._interval
            return self._count
        return None

    def reset(self) -> None:
        """The condition is over: its next occurrence is logged again."""
        self._text = None


class LinkState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DRAINING = "draining"
    CLOSED = "closed"


#: frames a restarted peer never gets again (a state answer, a model snapshot: asked anew)
_NOT_REPLAYED = ("state", "ledger", "snapshot")


@dataclass(frozen=True)
class LinkSettings:
    max_queue: int = 256  # outstanding frames per link (queued + unacked)
    queue_timeout: float = 30.0  # how long a producer may wait for room, when frames drop
    #: the bytes of frames a link keeps outstanding, at most (a large model's cap)
    queue_bytes: int = 256 * 1024 * 1024
    frame_bytes: int = 0  # the size of one frame of this run (a model vector); 0: unknown
    #: the algorithm's delivery policy: frames for a peer that is away are kept (and resent
    #: when it is back) rather than dropped, and a producer waits for room however long
    keep: bool = False
    #: a restarted peer gets the frames of the last three iterations sent to its last
    #: incarnation again, acked or not (lockstep algorithms: it resumes where the slowest waits
    #: — two neighbours of it may be two iterations apart — and needs what the others sent for
    #: that iteration); otherwise they are dropped
    replay: bool = False
    resolve_timeout: float = 5.0  # the peer's name lookup, before the connect
    connect_timeout: float = 5.0  # TCP connect + handshake
    #: an accepted connection whose handshake has not ended by then is closed
    handshake_timeout: float = 5.0
    backoff_initial: float = 0.05
    backoff_max: float = 2.0
    #: silent longer than this: the connection is dropped (the heartbeat asks at least twice
    #: per period, and the acceptor says it is alive a few times per period);
    #: away longer than this: flagged in /peers, metrics, log, and not waited for
    peer_timeout: float = 5.0
    #: frames kept (``keep``): away longer than this, the peer is given up on — the workers
    #: waiting on it are reported blocked and it is logged; its frames are still kept
    peer_give_up: float = 300.0
    drain_timeout: float = 5.0  # at shutdown: time to get unacked frames acked
    max_payload: int = 256 * 1024 * 1024
    #: a Data larger than this goes in parts of this size: heartbeats and catch-up notes wait
    #: behind one part at most, not behind a whole model (wire/codec.py, "Parts")
    part_bytes: int = DEFAULT_PART_BYTES
    #: the cluster secret (peerlearn/transport/auth.py); None: links are not authenticated
    secret: bytes | None = field(default=None, repr=False)
    #: what the run fingerprint covers, setting by setting (name -> JSON text): members are
    #: told which differ (auth.setting_digests)
    run_settings: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: mutual TLS on every link (peerlearn/transport/tls.py); None: plain TCP
    tls: TlsContexts | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.part_bytes < 1:
            raise ValueError(f"part_bytes {self.part_bytes} < 1")

    @property
    def window(self) -> int:
        """Frames a link may hold outstanding: ``max_queue``, and never more than
        ``queue_bytes`` worth. One window for both policies: it is also the flow control
        towards a connected peer that reads more slowly than this daemon sends (a window
        sized by bytes alone would let a small model queue a million frames)."""
        if not self.frame_bytes:
            return self.max_queue
        return min(self.max_queue, max(1, self.queue_bytes // self.frame_bytes))


class OutLink:
    """The sending side of the link to one remote daemon.

    :param name: the peer's label (``cluster:host:port``) for logs and metrics.
    :param hello: who this daemon is (a fresh nonce goes into each connection's copy).
    :param join: this daemon's run, said once the peer has answered the Hello.
    """

    def __init__(
        self,
        cluster: int,
        host: str,
        port: int,
        hello: Hello,
        join: Join,
        settings: LinkSettings,
        stats: TransportStats,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.cluster = cluster
        self.host, self.port = host, port
        self.name = f"{cluster}@{host}:{port}"
        self.state = LinkState.CONNECTING
        self._away_logged = False
        self._given_up_logged = False
        self.connected_since: float | None = None
        self.disconnected_since = time.monotonic()
        self.last_refusal: str | None = None  # the last refusal, in this daemon's words
        #: why the last attempt to connect failed (resolver, connect, handshake or refusal);
        #: None once connected
        self.last_error: str | None = None
        self.failed_attempts = 0  # since the last connection (or the start)
        self._error_log = Throttle()
        #: frames dropped for a full window: logged once, then at doubling intervals
        self._drop_log = Throttle()
        self._drop_lock = threading.Lock()
        self._hello = hello
        self._join = join
        #: the peer's incarnation at the last handshake: a greater one is a restarted daemon
        self.peer_incarnation: int | None = None
        self._settings = settings
        self._stats = stats
        self._loop = loop
        self._loop_thread = threading.get_ident()  # built on the loop's thread
        self._room = threading.Semaphore(settings.window)
        self._overdraft = 0  # frames queued beyond the window (offer_nowait)
        #: producers (worker threads, by ident) waiting for room now, and since when: a send
        #: wait, which /status shows next to the waits for messages
        self.senders_waiting: dict[int, float] = {}
        self._releasing = False
        self._queue: deque[Data] = deque()
        self._unacked: deque[Data] = deque()
        #: the parts of the frame being written not written yet (close() writes them before
        #: its Bye: a frame cut between parts would be lost to the peer)
        self._parts: deque[list[bytes | memoryview]] = deque()
        #: acked frames of the last three iterations sent (``settings.replay`` only)
        self._recent: deque[Data] = deque()
        self._recent_steps = (0, 0, 0)  # the last three distinct iterations among them
        self._seq = 0
        #: the highest iteration (a frame's ``step``) queued for the peer so far, and of a
        #: frame dropped for it: told to the peer at each connection (catch-up)
        self._sent_upto = 0
        self.lost_upto: int | None = None
        self._told: int | None = None  # lost_upto as last told on this connection
        self._noted = False  # whether this connection had its first note (even "none lost")
        #: the iteration this daemon waits to start its workers at from a checkpoint, said in
        #: every first note, and the one they resumed at in a whole-cluster restart, said once
        self.start_note: int | None = None
        self.resumed_note: int | None = None
        self._controls: deque[Control] = deque()  # link-level notes to send when connected
        self._wakeup = asyncio.Event()  # frames were queued
        self._acked = asyncio.Event()  # an ack arrived
        self._peer_left = False  # the peer said bye: it stops, nothing more will be acked
        self._refused = False  # the last connection attempt was refused: nothing listens
        self._stop = asyncio.Event()  # close() was called
        self._retry = asyncio.Event()  # the peer dialed this daemon: reconnect now
        self._closing = False
        self._proto: FrameProtocol | None = None
        #: the handshake answer awaited (Welcome to the Hello, Ack to the Join, or Refuse;
        #: None: the connection was lost), with the connection it must come on: an old
        #: connection whose close completes late must not answer the next one's handshake
        self._answer: tuple[FrameProtocol, asyncio.Future[Message | None]] | None = None
        #: the name lookup under way: one at a time, however long the resolver hangs
        self._lookup: asyncio.Future[list[Any]] | None = None

    def __repr__(self) -> str:
        queued, unacked = len(self._queue), len(self._unacked)
        return f"OutLink({self.name}, {self.state}, queued={queued}, unacked={unacked})"

    @property
    def outstanding(self) -> int:
        return len(self._queue) + len(self._unacked)

    # --- producers (worker threads) -----------------------------------------------------------

    def offer(
        self,
        tag: Tag,
        sender: int,
        step: int,
        value: Vector,
        to: tuple[int, ...] = (),
        post: bool = False,
        packed: Packed | None = None,
    ) -> bool:
        """Queue one frame for the peer (``packed``: ``value``'s packed bytes, which the frame
        carries instead); blocks while the link is full — bounded, unless the algorithm's
        frames are kept (``settings.keep``).

        Called from worker threads. False if the frame was dropped (counted)."""
        if self._closing:
            self._stats.drop("link_closed")
            return False
        if not self._room.acquire(blocking=False) and not self._wait_for_room(tag, step):
            return False
        self._loop.call_soon_threadsafe(self._enqueue, tag, sender, step, value, to, post, packed)
        return True

    def note_wait(self) -> None:
        """A producer begins to wait for room (:meth:`offer_within` does not count it)."""
        self._stats.queue_waits += 1

    def offer_within(
        self,
        tag: Tag,
        sender: int,
        step: int,
        value: Vector,
        until: float,
        since: float,
        packed: Packed | None = None,
    ) -> bool | None:
        """Queue one frame, waiting for room in the window until ``until`` at most (worker
        threads; time.monotonic()): True if queued, False if dropped (counted, as
        :meth:`offer` drops: the link closing, the peer away, or no room ``queue_timeout``
        after ``since``, when this producer began to wait), None if there is still no room —
        nothing done, nothing counted: call again. What a producer sending one frame to several
        full links waits with, so that each takes it as soon as it has room."""
        if self._closing:
            self._stats.drop("link_closed")
            return False
        if not self._room.acquire(blocking=False):
            me = threading.get_ident()
            self.senders_waiting[me] = since
            try:
                got = self._wait(tag, since + self._settings.queue_timeout, until)
            finally:
                self.senders_waiting.pop(me, None)
            if got is None:
                return None
            if not got:
                self._lose(step)
                return False
        self._loop.call_soon_threadsafe(self._enqueue, tag, sender, step, value, (), False, packed)
        return True

    def offer_nowait(
        self, tag: Tag, sender: int, step: int, value: Vector, to: tuple[int, ...] = ()
    ) -> bool:
        """Queue one frame from the event loop, which must never block: beyond the window if
        it is full (a rare frame — a state answer — that must not be lost to the workers'
        stream filling it); False (counted) only if the link is closing."""
        if self._closing:
            self._stats.drop("link_closed")
            return False
        if not self._room.acquire(blocking=False):
            self._overdraft += 1  # its slot is not given back when it is acked
        self._enqueue(tag, sender, step, value, to, False)
        return True

    def _free_slot(self) -> None:
        """A frame left the window (acked, dropped): its slot is free again."""
        if self._overdraft:
            self._overdraft -= 1
        else:
            self._room.release()

    @property
    def noted(self) -> bool:
        """This connection has sent its first note (and with it ``start_note``)."""
        return self._noted

    def control(self, msg: Control) -> None:
        """Send a link-level note (on the event loop): now if connected, else at the next
        connection. Not numbered, not resent: a note lost with its connection is asked again."""
        self._controls.append(msg)
        self._wakeup.set()

    def lose(self, step: int) -> None:
        """Frames of iterations up to ``step`` will never reach the peer (on the loop)."""
        self._lose(step)

    def _lose(self, step: int) -> None:
        """A frame of iteration ``step`` will never reach the peer: remember it, to tell."""
        with self._drop_lock:
            if self.lost_upto is None or step > self.lost_upto:
                self.lost_upto = step
            else:
                return
        if threading.get_ident() == self._loop_thread:
            self._wakeup.set()
        else:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def _wait_for_room(self, tag: Tag, step: int) -> bool:
        """Wait for a slot in the window; False (and counted) if the frame is dropped.

        Frames that may drop wait at most ``queue_timeout``, and the wait is sliced so that a
        peer turning *away* meanwhile releases the producer: crash-stop, a peer gone longer than
        peer_timeout with a full window is taken for dead, and waiting on it would stall every
        worker for queue_timeout per frame. Frames that are kept wait until there is room (the
        peer reads again, or comes back and takes the resent frames): the wait is reported."""
        self._stats.queue_waits += 1
        me = threading.get_ident()
        self.senders_waiting[me] = time.monotonic()
        try:
            if self._wait(tag):
                return True
            self._lose(step)
            return False
        finally:
            self.senders_waiting.pop(me, None)

    def _wait(
        self, tag: Tag, deadline: float | None = None, until: float | None = None
    ) -> bool | None:
        """Wait for a slot: True when taken, False when the frame is dropped (counted), None
        when ``until`` passes first (nothing counted)."""
        keep = self._settings.keep
        if deadline is None:
            deadline = time.monotonic() + self._settings.queue_timeout
        step = max(0.05, min(1.0, self._settings.peer_timeout / 4))
        while not self._releasing and not self._closing:  # the daemon is shutting down
            if not keep and self.away:
                self._stats.drop("peer_away")
                return False
            now = time.monotonic()
            if until is not None and now >= until:
                return None
            left = deadline - now if not keep else step
            if until is not None:
                left = min(left, until - now) if left > 0 else left
            if left <= 0:
                self._stats.drop("queue_full")
                with self._drop_lock:  # worker threads: one count, one line now and then
                    count = self._drop_log.due("queue_full")
                if count is not None:
                    log.warning(
                        "%s: queue full for %.1fs, frame %s dropped (%d so far; counted "
                        "in peerlearn_messages_dropped_total)",
                        self.name,
                        self._settings.queue_timeout,
                        tag_text(tag),
                        count,
                    )
                return False
            if self._room.acquire(timeout=min(step, left)):
                if self._releasing:
                    break
                return True
        self._stats.drop("queue_full")
        return False

    def release_producers(self) -> None:
        """Shutdown: wake producers waiting for room (a dead peer would otherwise hold a
        stopping worker); frames that find the link full from now on are dropped and counted.
        Frames that fit still go out and are drained."""
        self._releasing = True
        # room for the waiting ones and for as many again as a window of dropping frames
        for _ in range(
            len(self.senders_waiting) + min(self._settings.window, self._settings.max_queue)
        ):
            self._room.release()

    def _enqueue(
        self,
        tag: Tag,
        sender: int,
        step: int,
        value: Vector,
        to: tuple[int, ...],
        post: bool,
        packed: Packed | None = None,
    ) -> None:
        # Check before numbering: a skipped sequence number would read as a gap at the peer.
        try:
            frame = Data(self._seq + 1, tag, sender, step, value, to, post, packed)
            if value.nbytes > self._settings.max_payload:
                raise LocalProtocolError(
                    Reason.PAYLOAD_TOO_LARGE,
                    f"{value.nbytes} bytes > max_payload {self._settings.max_payload}",
                )
        except LocalProtocolError as exc:
            log.error("%s: cannot send %s: %s", self.name, tag_text(tag), exc)
            self._stats.drop("unsendable")
            self._free_slot()
            return
        self._seq += 1
        self._sent_upto = max(self._sent_upto, step)
        self._queue.append(frame)
        self._wakeup.set()

    # --- the link's task (owned by the transport's TaskGroup) ---------------------------------

    async def run(self) -> None:
        backoff = self._settings.backoff_initial
        while not self._closing:
            if await self._connect():
                backoff = self._settings.backoff_initial
                await self._pump()
                if self._closing:
                    break
                self._stats.reconnects += 1
            self.state = LinkState.RECONNECTING if self.connected_since else LinkState.CONNECTING
            self._check_away()
            # Full jitter: reconnect storms of many daemons spread out instead of syncing up.
            await self._sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, self._settings.backoff_max)
        if self._lookup is not None:
            self._lookup.cancel()  # a hung resolver: its thread ends when it ends
        self.state = LinkState.CLOSED

    async def _connect(self) -> bool:
        # Acks and handshake answers come back: nothing big is ever received on this link.
        codec = Codec(max_payload=self._settings.max_payload, allocator=_tiny_only)
        try:
            addresses = await self._resolve()
        except (OSError, TimeoutError) as exc:
            if not self._closing:
                self._failed(self._resolve_error(exc), logging.WARNING)
            return False
        try:
            proto = await self._unless_stopped(
                self._open(addresses, codec), self._settings.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            # Nobody listens any more where it was connected: the process is gone (killed, or
            # stopped) — away at once, not after peer_timeout: the port says so. One that never
            # connected may be starting still: it gets peer_timeout.
            refused = isinstance(exc, ConnectionRefusedError)
            self._refused = refused and self.connected_since is not None
            if not self._closing:
                self._failed(self._connect_error(exc), logging.INFO)
            return False
        self._refused = False
        hello = replace(self._hello, nonce=secrets.randbits(63))
        welcome = await self._ask(proto, hello, Welcome)
        if welcome is None:
            return False
        assert isinstance(welcome, Welcome)
        if (problem := self._welcome_problem(welcome)) is not None:
            proto.close()
            self._stats.error("bad_welcome")
            self._failed(problem, logging.ERROR, repeat=True)
            return False
        secret = self._settings.secret
        if (problem := self._proof_problem(secret, hello, welcome)) is not None:
            proto.close()  # before anything about the run is said to it
            self._stats.error("bad_secret")
            self._failed(problem, logging.ERROR, repeat=True)
            return False
        join = self._join
        if secret is not None:  # the acceptor proved it is a member: it may see the digests
            join = replace(
                join,
                mac=auth.proof(secret, "dialer", hello, welcome),
                settings=auth.setting_digests(secret, self._settings.run_settings),
            )
        if await self._ask(proto, join, Ack) is None:
            return False
        # Taken only now that the peer accepted this daemon's run: an answer from anything
        # else at that address must not make this link drop its frames.
        if self.peer_incarnation is not None and welcome.incarnation > self.peer_incarnation:
            self._peer_restarted()
        self.peer_incarnation = welcome.incarnation
        away = time.monotonic() - self.disconnected_since
        self._proto = proto
        self.state = LinkState.CONNECTED
        self.connected_since = time.monotonic()
        if self._given_up_logged:
            log.warning(
                "%s is back after %.0fs away: the frames kept for it go out, the run resumes",
                self.name,
                away,
            )
        elif self._away_logged:
            log.info("%s is back", self.name)
        self._away_logged = self._given_up_logged = False
        self.last_refusal = None
        self.last_error = None
        self.failed_attempts = 0
        self._error_log.reset()
        # Whatever was sent but not acked may be lost: it goes out again, first, in order.
        self._queue.extendleft(reversed(self._unacked))
        self._unacked.clear()
        self._noted = False  # the note may have been lost with the last connection: again
        return True

    async def _ask(
        self, proto: FrameProtocol, msg: Message, expect: type[Message]
    ) -> Message | None:
        """Send a handshake message and wait for its answer, of type ``expect``: the answer, or
        None (the connection closed and the failure recorded) on a refusal, a lost connection,
        no answer within ``connect_timeout`` or anything else."""
        future: asyncio.Future[Message | None] = self._loop.create_future()
        self._answer = (proto, future)
        if proto.closed.is_set():  # lost before this question: no answer will come
            future.set_result(None)
        proto.send(msg)
        try:
            answer = await self._unless_stopped(asyncio.shield(future))
        except TimeoutError:
            proto.close()
            if not self._closing:
                timeout = self._settings.connect_timeout
                self._failed(f"no answer to the handshake within {timeout:g}s", logging.INFO)
            return None
        if answer is None:  # the connection was lost during the handshake
            self._failed("connection closed during the handshake", logging.INFO)
            return None
        if isinstance(answer, Refuse):
            # A detail is read only in the answer to the Join: the acceptor proved the
            # secret in its Welcome first (a refused Hello comes from anyone at that address).
            why = self._refusal(answer.reason, answer.detail if expect is Ack else "")
            self.last_refusal = f"refused this daemon: {why}"
            # Connected already: this daemon's last connection, not yet seen closed there —
            # a moment's overlap after a reconnect, not an error.
            level = logging.INFO if answer.reason == "already_connected" else logging.ERROR
            self._failed(self.last_refusal, level, repeat=True)
            self._stats.error("handshake_refused")
            proto.close()
            return None
        if not isinstance(answer, expect):
            proto.close()
            self._stats.error("unexpected_message")
            self._failed(f"answered the handshake with {answer.kind}", logging.ERROR)
            return None
        return answer

    def _proof_problem(self, secret: bytes | None, hello: Hello, welcome: Welcome) -> str | None:
        """Why the acceptor is not a member of this run, or None: with a cluster secret its
        Welcome must prove it; without one, it must not expect a proof."""
        if secret is None:
            if welcome.mac:
                return (
                    "it runs with a cluster secret and this daemon has none: give every daemon "
                    "the same --secret-file"
                )
            return None
        if not welcome.mac:
            return (
                "it has no cluster secret (or an older peerlearn): give every daemon the same "
                "--secret-file"
            )
        if not auth.verify(secret, "acceptor", hello, welcome, welcome.mac):
            return "it does not know this run's cluster secret: the secret files differ"
        return None

    def _welcome_problem(self, welcome: Welcome) -> str | None:
        """Why the peer's Welcome cannot be taken, or None."""
        if not MIN_PROTOCOL_VERSION <= welcome.version <= PROTOCOL_VERSION:
            return (
                f"answered with protocol version {welcome.version}, which this daemon does not "
                f"speak ({MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION})"
            )
        if welcome.cluster != self.cluster:
            return (
                f"the daemon at {self.host}:{self.port} is cluster {welcome.cluster}, not "
                f"{self.cluster}: the daemon lists disagree"
            )
        if self.peer_incarnation is not None and welcome.incarnation < self.peer_incarnation:
            return (
                f"answered as incarnation {welcome.incarnation}, older than "
                f"{self.peer_incarnation} seen before: is a stale daemon still running there?"
            )
        return None

    def peer_restarted(self, incarnation: int) -> None:
        """The peer dialed this daemon as ``incarnation`` (on the event loop). Newer than the
        one this link knows: what is outstanding was numbered for the old process — dropped now,
        before the new one's frames are taken in (anything queued after is for the new one) —
        and a connection to the old one is aborted."""
        known = self.peer_incarnation
        if known is not None and incarnation > known:
            self._peer_restarted()
            if self._proto is not None:
                self._proto.abort()
        if known is None or incarnation > known:
            self.peer_incarnation = incarnation

    def _keep_recent(self, frame: Data) -> None:
        """Keep an acked frame while it is of one of the last three iterations sent (a state
        answer or a snapshot is never sent again)."""
        if frame.tag[0] in _NOT_REPLAYED:
            return
        first, second, last = self._recent_steps
        if frame.step > last:
            first, second, last = second, last, frame.step
            self._recent_steps = (first, second, last)
        self._recent.append(frame)
        while self._recent and self._recent[0].step < first:
            self._recent.popleft()

    def _peer_restarted(self) -> None:
        """The peer is a new incarnation: it keeps nothing of the frames numbered for the last
        one, so they are dropped (counted) and numbering starts over — or, where frames are
        replayed, the last three iterations' frames are sent again, numbered for the new one."""
        if self._settings.replay:
            self._replay()
            return
        dropped = self.outstanding
        self._queue.clear()
        self._unacked.clear()
        self._seq = 0
        # All it was sent is gone with the process, acked or not — and even if nothing was
        # sent, it must learn that it restarted (a DASGD node must not number anew from 0).
        self._lose(self._sent_upto)
        for _ in range(dropped):
            self._free_slot()
        if dropped:
            self._stats.drop("peer_restarted", dropped)
        log.info(
            "%s restarted (new incarnation): %d frames for its last incarnation dropped",
            self.name,
            dropped,
        )

    def _replay(self) -> None:
        before = self._recent_steps[0]
        acked = [f for f in self._recent if f.step >= before]  # their slots were given back
        pending = [*self._unacked, *self._queue]  # each holds a slot
        kept = [f for f in pending if f.step >= before and f.tag[0] not in _NOT_REPLAYED]
        for _ in range(len(pending) - len(kept)):
            self._free_slot()
        if len(pending) > len(kept):
            self._stats.drop("peer_restarted", len(pending) - len(kept))
        self._recent.clear()
        self._unacked.clear()
        self._queue.clear()
        self._seq = 0
        if self._sent_upto > 0:  # its process is gone all the same: it must rejoin
            self._lose(self._sent_upto)  # (from a peer that sent it something: not a stranger)
        for _ in acked:
            if not self._room.acquire(blocking=False):
                self._overdraft += 1
        for frame in (*acked, *kept):  # in the order they were first sent
            self._seq += 1
            self._queue.append(replace(frame, seq=self._seq))
        self._wakeup.set()
        log.info(
            "%s restarted (new incarnation): %d frames of iterations %d and on sent again",
            self.name,
            len(acked) + len(kept),
            before,
        )

    async def _resolve(self) -> list[str]:
        """The peer's addresses, on their own: inside the connect, a resolver that times out
        would read as a peer that does not answer. A lookup still hanging from an earlier
        attempt is waited for again rather than doubled (each one holds a resolver thread)."""
        lookup = self._lookup
        # A lookup that failed is asked again; one that answered after its attempt gave up
        # is used (a resolver that always takes longer than resolve_timeout still gets through).
        if lookup is None or (lookup.done() and (lookup.cancelled() or lookup.exception())):
            lookup = self._lookup = asyncio.ensure_future(
                self._loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            )
        try:
            infos = await self._unless_stopped(
                asyncio.shield(lookup), self._settings.resolve_timeout
            )
        except TimeoutError:
            raise  # still under way: the next attempt waits for this one
        except BaseException:  # the resolver's error, or this task cancelled
            lookup.cancel()
            self._lookup = None
            raise
        self._lookup = None
        # In the resolver's order (RFC 6724 preference), each address once.
        return list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in infos))

    async def _open(self, addresses: list[str], codec: Codec) -> FrameProtocol:
        """A connection to the first of ``addresses`` that takes one; else the last error."""
        error: OSError = OSError(f"no address for {self.host}")
        for address in addresses:
            try:
                _, proto = await self._loop.create_connection(
                    lambda: FrameProtocol(
                        codec,
                        self._on_message,
                        self._on_error,
                        self._on_lost,
                        timeout=self._settings.peer_timeout,
                    ),
                    address,
                    self.port,
                    **self._tls_options(),
                )
            except OSError as exc:  # ssl.SSLError included: a peer of another CA
                error = exc
                continue
            return proto
        raise error

    def _tls_options(self) -> dict[str, Any]:
        tls = self._settings.tls
        if tls is None:
            return {}
        return {
            "ssl": tls.client,
            "server_hostname": self.host,  # SNI only: host names are not checked (tls.py)
            "ssl_handshake_timeout": self._settings.connect_timeout,
        }

    async def _unless_stopped(self, aw: Awaitable[T], timeout: float | None = None) -> T:
        """``aw``'s result; TimeoutError after ``timeout`` (default ``connect_timeout``), or as
        soon as close() has given up draining (a dead peer must not hold a stopping daemon for
        the timeout)."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {task, stop},
                timeout=self._settings.connect_timeout if timeout is None else timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop.cancel()
        if task in done:
            return task.result()
        task.cancel()
        raise TimeoutError

    async def _pump(self) -> None:
        proto = self._proto
        assert proto is not None
        # The heartbeat lives as long as this connection, owned (cancelled, awaited) here.
        heartbeat = asyncio.ensure_future(self._heartbeat(proto))
        try:
            await self._send_frames(proto)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        self._proto = None
        # Gone since it last said something, whatever closed the connection (the heartbeat,
        # the kernel's TCP_USER_TIMEOUT, a bye): ≈ now after a clean close.
        self.disconnected_since = proto.heard_at

    async def _send_frames(self, proto: FrameProtocol) -> None:
        while not proto.closed.is_set():
            self._send_notes(proto)
            if not self._queue:
                self._wakeup.clear()
                if self._closing:
                    return
                waiter = asyncio.ensure_future(self._wakeup.wait())
                closed = asyncio.ensure_future(proto.closed.wait())
                await asyncio.wait({waiter, closed}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                closed.cancel()
                continue
            frame = self._queue.popleft()
            try:
                parts = proto.encode(frame, self._settings.part_bytes)
            except LocalProtocolError as exc:  # a frame we cannot encode: our bug, not theirs
                log.error("%s: cannot send %s: %s", self.name, tag_text(frame.tag), exc)
                self._stats.drop("unsendable")
                self._free_slot()
                continue
            # Unacked from its first byte: a connection lost mid-frame sends it again, whole.
            self._unacked.append(frame)
            n = proto.write(parts[0])
            self._parts.extend(parts[1:])
            while self._parts:
                await proto.drain()  # the heartbeat's Ping may go between two parts
                if proto.closed.is_set():
                    break
                self._send_notes(proto)
                if self._parts:  # (unless close() wrote them meanwhile)
                    n += proto.write(self._parts.popleft())
            self._parts.clear()
            self._stats.count("out", str(frame.tag[0]), self.name, n)
            await proto.drain()

    def _send_notes(self, proto: FrameProtocol) -> None:
        """Catch-up notes go before frames: what was lost, then the notes asked for."""
        lost = self.lost_upto
        if not self._noted or (lost is not None and lost != self._told):
            self._told, self._noted = lost, True
            proto.send(Missed(lost, self.start_note, self.resumed_note).control())
            self.resumed_note = None  # said once (Transport.announce_start)
        while self._controls:
            proto.send(self._controls.popleft())

    async def _heartbeat(self, proto: FrameProtocol) -> None:
        """Ask for a sign of life (a Ping, answered by a Pong; acks and the acceptor's own pongs
        count too) when nothing was heard for a quarter of ``peer_timeout``, and drop the
        connection when the peer has said nothing for that long:
        a stopped process or a cut route never closes a connection by itself, and frames would
        wait on it for good."""
        timeout = self._settings.peer_timeout
        interval = timeout / 4
        nonce = 0
        while not proto.closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proto.closed.wait(), interval)
            if proto.closed.is_set():
                return
            silent = time.monotonic() - proto.heard_at
            if silent > timeout:
                log.warning(
                    "%s: no sign of life for %.1fs (no ack, no pong): connection dropped",
                    self.name,
                    silent,
                )
                self._stats.error("peer_silent")
                proto.abort()
                return
            # Also when this side said nothing for as long: the acceptor's own pongs keep this
            # side hearing, but the acceptor judges this side by what it sends, and an idle
            # link (a finished run, a peer nobody posts to) sends nothing else.
            if silent >= interval or time.monotonic() - proto.sent_at >= interval:
                nonce += 1
                proto.send(Ping(nonce=nonce))

    async def _sleep(self, seconds: float) -> None:
        """Back off, but wake up at once on close(), or when the peer has just dialed this
        daemon (:meth:`retry_now`): it is up, and what this link tells it on connecting (what
        was dropped for it) is what it waits for to start."""
        self._retry.clear()
        stop = asyncio.ensure_future(self._stop.wait())
        retry = asyncio.ensure_future(self._retry.wait())
        try:
            await asyncio.wait({stop, retry}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            retry.cancel()

    def retry_now(self) -> None:
        """The peer is up (it dialed this daemon): end a back-off now (on the event loop)."""
        self._retry.set()

    @property
    def away(self) -> bool:
        """Not connected for longer than ``peer_timeout`` (read live, not at the next retry),
        or gone on purpose (a peer that said bye is not waited for), or plainly gone: it was
        connected, and the last attempt was refused — nothing listens at its address."""
        if self.state is LinkState.CONNECTED or self.state is LinkState.DRAINING:
            return False
        gone = time.monotonic() - self.disconnected_since > self._settings.peer_timeout
        return gone or self._peer_left or self._refused

    @property
    def away_seconds(self) -> float | None:
        """How long the peer has been gone (since it was last heard from), if it is away now;
        None if it is not."""
        return time.monotonic() - self.disconnected_since if self.away else None

    @property
    def given_up(self) -> bool:
        """Away longer than ``peer_give_up`` while this algorithm keeps its frames: whoever
        waits on the peer is blocked until it comes back (and is reported so). Frames that may
        drop never wait on an away peer, so nobody is blocked on it."""
        away = self.away_seconds
        return self._settings.keep and away is not None and away > self._settings.peer_give_up

    def check_give_up(self) -> None:
        """Log, once, that the peer is given up on (the daemon calls this periodically: the
        link's own task may be inside a connect attempt for seconds). Nothing else changes:
        its frames are still kept, the link keeps trying, and the run resumes if it is back."""
        if self._given_up_logged or not self.given_up:
            return
        self._given_up_logged = True
        log.error(
            "%s away for %.0fs (longer than peer_give_up, %gs): workers waiting on it are "
            "blocked until it is back; %d frames kept for it%s",
            self.name,
            self.away_seconds or 0.0,
            self._settings.peer_give_up,
            self.outstanding,
            f" ({self.last_error})" if self.last_error else "",
        )

    def peer_stopped(self) -> None:
        """The peer said bye on a connection of its own (it stops, its workers are gone): like a
        bye on this link, nothing more is waited for — also when this link is down right now,
        in which case the bye could never reach it."""
        self._peer_left = True
        self._acked.set()  # a draining close need not wait for it any longer

    def _check_away(self) -> None:
        if self.away and not self._away_logged:
            self._away_logged = True
            if self._refused:
                log.warning("%s away: nothing listens at its address any more", self.name)
                return
            log.warning(
                "%s away for more than %.1fs (%s%s)",
                self.name,
                self._settings.peer_timeout,
                self.state,
                f": {self.last_error}" if self.last_error else "",
            )

    def _failed(self, error: str, level: int, repeat: bool = False) -> None:
        """Record why this attempt failed; log it the first time and when it changes (and,
        with ``repeat``, again at doubling intervals: a refusal needs someone to act)."""
        self.last_error = error
        self.failed_attempts += 1
        if (count := self._error_log.due(error, repeat)) is not None:
            again = f" (still, {count} attempts so far)" if count > 1 else ""
            log.log(level, "%s: %s%s", self.name, error, again)

    def _resolve_error(self, exc: OSError | TimeoutError) -> str:
        if isinstance(exc, TimeoutError):
            reason = f"no answer from the resolver within {self._settings.resolve_timeout:g}s"
        else:
            reason = (exc.strerror if isinstance(exc, socket.gaierror) else None) or str(exc)
        return f"cannot resolve host {self.host!r}: {reason}"

    def _connect_error(self, exc: OSError | TimeoutError) -> str:
        if isinstance(exc, TimeoutError):
            return f"no connection within {self._settings.connect_timeout:g}s"
        if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's, not the system's
            why = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            return f"TLS handshake failed: {why} (are both certificates signed by the run's CA?)"
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
        return f"cannot connect: {reason[:1].lower()}{reason[1:]}"

    def _refusal(self, code: str, detail: str = "") -> str:
        """A refusal's reason code, worded from this daemon's side. The refusing side sends
        the code only — no setting, no digest of them, to a peer it has not authenticated;
        to a member (both proved the cluster secret) it names the settings that differ, with
        its values, in ``detail``."""
        hello = self._hello
        match code:
            case Reason.FINGERPRINT_MISMATCH if (
                detail
                and self._settings.secret is not None
                and (said := auth.explain_detail(detail, self._settings.run_settings))
            ):
                return f"its run settings differ from this daemon's: {said}"
            case Reason.FINGERPRINT_MISMATCH:
                return (
                    "its run settings differ from this daemon's (algorithm, problem, seed, "
                    "steps, lr, … or the daemon list): start every daemon with the same run. "
                    f"This daemon's run fingerprint is {self._join.fingerprint}; each daemon shows "
                    "its own as the fingerprint label of peerlearn_config_info"
                )
            case Reason.DIM_MISMATCH:
                return f"its model dimension differs from this daemon's ({self._join.dim})"
            case Reason.DTYPE_MISMATCH:
                return f"its model dtype differs from this daemon's ({self._join.dtype})"
            case Reason.UNSUPPORTED_VERSION:
                return (
                    "it speaks none of this daemon's protocol versions "
                    f"({hello.min_version}..{hello.max_version})"
                )
            case Reason.STALE_INCARNATION:
                return (
                    f"it has seen a later start of cluster {hello.cluster} than this one: is "
                    "another daemon running as this cluster, or did this host's clock go back?"
                )
            case "already_connected":
                return (
                    "its connection from this daemon is still open there (it closes it once "
                    "that connection is silent; this daemon retries)"
                )
            case "membership_mismatch":
                return (
                    "its daemon list differs from this daemon's (this daemon is cluster "
                    f"{hello.cluster} with processes {list(self._join.workers)})"
                )
            case "bad_handshake":
                return "it did not understand this daemon's handshake"
            case "bad_secret":
                return (
                    "it does not take this daemon's proof of the cluster secret: the secret "
                    "files differ, or one of the two daemons has none"
                )
        return f"{code[:200]!r}"  # a peer's free text: quoted, never trusted as a log line

    # --- protocol callbacks -------------------------------------------------------------------

    def _on_message(self, proto: FrameProtocol, msg: Message) -> None:
        match msg:
            case Ack(seq=seq):
                while self._unacked and self._unacked[0].seq <= seq:
                    frame = self._unacked.popleft()
                    self._free_slot()
                    if self._settings.replay:
                        self._keep_recent(frame)
                self._acked.set()  # a draining close waits on this
                self._answered(proto, msg)  # the answer to a Join, when one is awaited
            case Welcome() | Refuse():
                self._peer_left = False
                self._answered(proto, msg)
            case Pong():
                pass  # a sign of life: FrameProtocol.heard_at has it
            case Bye(reason=reason):
                log.info("%s said bye: %s", self.name, reason)
                self._peer_left = True
                self._acked.set()  # a draining close need not wait for it any longer
                proto.close()
            case _:
                self._stats.error("unexpected_message")
                proto.close()

    def _answered(self, proto: FrameProtocol, msg: Message | None) -> None:
        """``msg`` came on ``proto`` (None: ``proto`` was lost): the answer awaited, if it is
        that connection's handshake that awaits one."""
        if self._answer is None:
            return
        asked, future = self._answer
        if asked is proto and not future.done():
            future.set_result(msg)

    def _on_error(self, proto: FrameProtocol, exc: RemoteProtocolError) -> None:
        self._stats.error(str(exc.reason))

    def _on_lost(self, proto: FrameProtocol, exc: Exception | None) -> None:
        self._answered(proto, None)
        if self.state is LinkState.CONNECTED:
            log.info("%s: connection lost (%s)", self.name, exc or "closed")

    # --- shutdown -----------------------------------------------------------------------------

    async def close(self, drain_unconnected: bool = True) -> None:
        """Drain: give queued and unacked frames ``drain_timeout`` to be acked, then close.

        Also when the peer is not connected right now: it may be starting late or reconnecting,
        and what we queued for it may be exactly what it needs to finish (a daemon that
        finished first must not take its last iterations' messages with it). Unless
        ``drain_unconnected`` is False and the peer never connected: a run interrupted while
        waiting for its peers stops at once (the frames are dropped, counted
        ``never_connected``)."""
        if self.outstanding and not drain_unconnected and self.connected_since is None:
            log.info("%s: %d frames dropped: it never connected", self.name, self.outstanding)
            self._stats.drop("never_connected", self.outstanding)
        elif self.outstanding:
            if self.state is LinkState.CONNECTED:
                self.state = LinkState.DRAINING
            deadline = time.monotonic() + self._settings.drain_timeout
            while (
                self.outstanding
                and not self._peer_left
                and (left := deadline - time.monotonic()) > 0
            ):
                self._acked.clear()
                try:
                    await asyncio.wait_for(self._acked.wait(), left)
                except TimeoutError:
                    break
            if self.outstanding and self._peer_left:
                log.info("%s: %d frames not acked: it stopped first", self.name, self.outstanding)
            elif self.outstanding:
                log.warning("%s: %d frames not acked at shutdown", self.name, self.outstanding)
        self._closing = True
        self._stop.set()
        self._wakeup.set()
        if self._proto is not None:
            while self._parts:  # the frame being written, whole before the Bye
                self._proto.write(self._parts.popleft())
            self._proto.send(Bye(reason="shutdown"))
            self._proto.close()
