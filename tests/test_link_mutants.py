"""Small precise tests of the out-link (:class:`~peerlearn.transport.links.OutLink`), driven by
mutation testing: what ``tests/test_transport_mutants.py`` left alive in ``links.py``
(docs/testing.md, "Mutation testing", the transport run's unclassified mutants).

They pin the OutLink's connect path (the name lookup and a hung or failed one, the addresses
tried, the Hello with a fresh nonce and the Join, a Welcome it cannot take, a peer that
restarted, what a failed attempt records and logs and what a connection clears), the handshake's
questions (no answer, a lost connection, a refusal, a wrong answer), the heartbeat (pings, their
nonces and period, dropping a silent peer), the frames and notes it sends (an unsendable frame,
the counts), the reconnect loop's back-off, and the replay of the last three iterations to a
restarted peer and ``offer_within``. An ``OutLink`` either dials a fake acceptor on 127.0.0.1
port 0 that answers as each test tells it, or is driven by hand on a recorded connection
(:class:`_Wire`). Waits are on events; the one absence checked (no ping from a link that hears
and says something) waits on the heartbeat task not ending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

import numpy as np
import pytest

from peerlearn.transport.catchup import Missed
from peerlearn.transport.links import LinkSettings, LinkState, OutLink
from peerlearn.transport.protocol import FrameProtocol
from peerlearn.transport.stats import TransportStats
from peerlearn.wire import (
    MIN_PROTOCOL_VERSION,
    PREFIX,
    PROTOCOL_VERSION,
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

T = TypeVar("T")

DIM = 3
NAME = "0@127.0.0.1"
HELLO = Hello(
    min_version=MIN_PROTOCOL_VERSION,
    max_version=PROTOCOL_VERSION,
    cluster=1,
    incarnation=1,
    nonce=5,
    name="d1",
)
JOIN = Join(workers=(1, 4), dim=DIM, dtype="float64", fingerprint="fp-link-mutants")


def _welcome(incarnation: int = 7, cluster: int = 0) -> Welcome:
    return Welcome(version=PROTOCOL_VERSION, cluster=cluster, incarnation=incarnation, nonce=1)


def _link(port: int = 4001, host: str = "127.0.0.1", **settings: Any) -> OutLink:
    """Cluster 1's link to cluster 0 at ``host:port``, backing off briefly."""
    fields: dict[str, Any] = {
        "backoff_initial": 0.01,
        "backoff_max": 0.02,
        "drain_timeout": 2.0,
        "connect_timeout": 2.0,
    }
    fields.update(settings)
    return OutLink(
        0,
        host,
        port,
        HELLO,
        JOIN,
        LinkSettings(**fields),
        TransportStats(),
        asyncio.get_running_loop(),
    )


def _value(step: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.full(DIM, float(step))


# --- a fake acceptor ----------------------------------------------------------------------------


@dataclass
class _Conn:
    """One connection the fake acceptor took, and what came on it."""

    proto: FrameProtocol
    messages: list[Message] = field(default_factory=list)
    gone: bool = False

    def of(self, kind: type[Message]) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]


#: what the acceptor answers a handshake message with (None: nothing)
Answer = Callable[[Message], Message | None]


class _Peer:
    """A fake acceptor (cluster 0, incarnation 7) on 127.0.0.1: Welcome to a Hello, an Ack of
    nothing to a Join, an Ack to each frame, a Pong to each Ping — unless told otherwise."""

    def __init__(self) -> None:
        self.conns: list[_Conn] = []
        self.changed = asyncio.Event()  # a connection, a message or a loss
        self.on_hello: Answer = lambda msg: _welcome()
        self.on_join: Answer = lambda msg: Ack(0)
        self.acks = True
        self.pongs = True
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    def _make(self) -> FrameProtocol:
        conn: _Conn

        def on_message(proto: FrameProtocol, msg: Message) -> None:
            conn.messages.append(msg)
            self.changed.set()
            answer: Message | None = None
            if isinstance(msg, Hello):
                answer = self.on_hello(msg)
            elif isinstance(msg, Join):
                answer = self.on_join(msg)
            elif isinstance(msg, Data) and self.acks:
                answer = Ack(msg.seq)
            elif isinstance(msg, Ping) and self.pongs:
                answer = Pong(msg.nonce)
            if answer is not None:
                proto.send(answer)

        def on_error(proto: FrameProtocol, exc: RemoteProtocolError) -> None:
            raise AssertionError(f"the link sent something wrong: {exc}")

        def on_lost(proto: FrameProtocol, exc: Exception | None) -> None:
            conn.gone = True
            self.changed.set()

        conn = _Conn(FrameProtocol(Codec(), on_message, on_error, on_lost))
        self.conns.append(conn)
        self.changed.set()
        return conn.proto

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            conn.proto.abort()
        await self._server.wait_closed()

    async def until(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait for ``check`` to hold, re-checked whenever something happens."""
        deadline = time.monotonic() + timeout
        while not check():
            self.changed.clear()
            if check():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("condition not reached")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    def watch(self, link: OutLink) -> None:
        """Re-check conditions also when ``link`` records a failed attempt."""
        failed = link._failed

        def hooked(error: str, level: int, repeat: bool = False) -> None:
            failed(error, level, repeat)
            self.changed.set()

        link._failed = hooked  # type: ignore[method-assign]

    def notes(self, n: int) -> Callable[[], bool]:
        """A condition: the ``n``-th connection had its catch-up note (the link is connected)."""
        return lambda: len(self.conns) >= n and bool(self.conns[n - 1].of(Control))


@asynccontextmanager
async def _peer() -> AsyncIterator[_Peer]:
    peer = _Peer()
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


@asynccontextmanager
async def _running(link: OutLink, peer: _Peer | None = None) -> AsyncIterator[asyncio.Task[None]]:
    """``link``'s task, closed (without draining) at the end."""
    if peer is not None:
        peer.watch(link)
    task = asyncio.create_task(link.run())
    try:
        yield task
    finally:
        await link.close(drain_unconnected=False)
        await asyncio.wait_for(task, 5.0)


async def _within(aw: Awaitable[T], seconds: float = 1.0) -> T:
    """``aw``'s outcome; a failure (not a TimeoutError, which some tests expect) if it takes
    longer than ``seconds``."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        raise AssertionError(f"still waiting after {seconds}s")
    return task.result()


# --- connecting ---------------------------------------------------------------------------------


async def test_a_connection_takes_the_peer_and_clears_the_last_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _peer() as peer:
        refusals = [Refuse(Reason.DIM_MISMATCH)]
        peer.on_hello = lambda msg: refusals.pop() if refusals else _welcome()
        link = _link(peer.port)
        before = time.monotonic()
        async with _running(link, peer):
            await peer.until(peer.notes(2))
            assert link.state is LinkState.CONNECTED
            assert link.peer_incarnation == 7
            assert link.last_error is None and link.last_refusal is None
            assert link.failed_attempts == 0
            assert link._refused is False
            assert link._proto is not None and link._proto is not peer.conns[1].proto
            assert link.connected_since is not None
            assert before <= link.connected_since <= time.monotonic()
            assert link.away is False
            # The handshake: a Hello as this daemon's, with a fresh nonce, then its Join.
            hellos = [c.of(Hello)[0] for c in peer.conns]
            assert [type(m) for m in peer.conns[1].messages[:2]] == [Hello, Join]
            assert peer.conns[1].of(Join) == [JOIN]
            for hello in hellos:
                assert (hello.cluster, hello.incarnation, hello.name) == (1, 1, "d1")
                assert 0 <= hello.nonce < 2**63
            assert hellos[0].nonce != hellos[1].nonce
            # The error log was reset: the same refusal is logged again as a first one.
            caplog.clear()
            with caplog.at_level(logging.INFO, "peerlearn.transport.links"):
                link._failed("x", logging.ERROR)
                link._failed("x", logging.ERROR)
            assert [r.getMessage() for r in caplog.records] == [f"{NAME}:{peer.port}: x"]


async def test_a_link_back_from_away_or_given_up_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _peer() as peer:
        link = _link(peer.port)
        link._away_logged = True
        link._given_up_logged = True
        link.disconnected_since = time.monotonic() - 42.0
        with caplog.at_level(logging.INFO, "peerlearn.transport.links"):
            async with _running(link, peer):
                await peer.until(peer.notes(1))
                assert (link._away_logged, link._given_up_logged) == (False, False)
                back = [r for r in caplog.records if "back" in r.getMessage()]
                assert [(r.levelno, r.getMessage()) for r in back] == [
                    (
                        logging.WARNING,
                        f"{NAME}:{peer.port} is back after 42s away: the frames kept for it go "
                        "out, the run resumes",
                    )
                ]
                caplog.clear()
                link._away_logged = True
                peer.conns[0].proto.abort()
                await peer.until(peer.notes(2))
                back = [r for r in caplog.records if "back" in r.getMessage()]
                assert [(r.levelno, r.getMessage()) for r in back] == [
                    (logging.INFO, f"{NAME}:{peer.port} is back")
                ]
                assert link._away_logged is False
                caplog.clear()
                peer.conns[1].proto.abort()
                await peer.until(peer.notes(3))
                assert not [r for r in caplog.records if "back" in r.getMessage()]


async def test_unacked_frames_go_out_again_first_in_order_after_the_note() -> None:
    async with _peer() as peer:
        peer.acks = False
        link = _link(peer.port)
        async with _running(link, peer):
            await peer.until(peer.notes(1))
            for step in (1, 2, 3):
                assert link.offer(("params", step), 1, step, _value(step))
            await peer.until(lambda: len(peer.conns[0].of(Data)) == 3)
            peer.acks = True
            peer.on_join = lambda msg: Ack(1)  # frame 1 arrived before the connection broke
            link.lose(2)
            peer.conns[0].proto.abort()
            await peer.until(lambda: len(peer.conns) == 2 and len(peer.conns[1].of(Data)) == 2)
            again = peer.conns[1].messages
            assert [type(m) for m in again] == [Hello, Join, Control, Data, Data]
            assert again[2] == Missed(2).control()
            assert [(d.seq, d.step) for d in peer.conns[1].of(Data)] == [(2, 2), (3, 3)]
            await peer.until(lambda: link.outstanding == 0)
            assert link._stats.reconnects == 1


async def test_frames_in_parts_arrive_whole_and_in_order_on_a_real_connection() -> None:
    """Over TCP, frames of 3 float64 in 5-byte parts (5 parts each) come out of the peer's codec
    as the arrays sent, acked one by one, each counted once with all of its frames' bytes."""
    async with _peer() as peer:
        link = _link(peer.port, part_bytes=5)
        async with _running(link, peer):
            await peer.until(peer.notes(1))
            values = [np.array([step, -step, 0.5 * step]) for step in (1, 2, 3)]
            for step, value in enumerate(values, 1):
                assert link.offer(("params", step), 1, step, value)
            await peer.until(lambda: len(peer.conns[0].of(Data)) == 3)
            got = peer.conns[0].of(Data)
            assert [d.seq for d in got] == [1, 2, 3]
            for d, value in zip(got, values, strict=True):
                assert d.value.tobytes() == value.tobytes()
            await peer.until(lambda: link.outstanding == 0)
            whole = sum(len(bytes(c)) for c in Codec().send(got[0]))
            counted = link._stats.bytes[("out", "params", link.name)]
            assert counted == 3 * (whole + 4 * PREFIX.size)  # 4 more prefixes a frame


async def test_a_welcome_from_a_restarted_peer_drops_the_frames_once_it_accepts_the_run() -> None:
    async with _peer() as peer:
        peer.acks = False
        link = _link(peer.port)
        async with _running(link, peer):
            await peer.until(peer.notes(1))
            assert link.offer(("params", 5), 1, 5, _value(5))
            await peer.until(lambda: len(peer.conns[0].of(Data)) == 1)
            # Incarnation 8 answers, but refuses the run: nothing is taken from it.
            peer.on_hello = lambda msg: _welcome(8)
            peer.on_join = lambda msg: Refuse(Reason.FINGERPRINT_MISMATCH)
            peer.conns[0].proto.abort()
            await peer.until(lambda: link.failed_attempts >= 1)
            assert link.peer_incarnation == 7
            assert link.outstanding == 1 and link.lost_upto is None
            # Then it accepts the run: what was outstanding was for incarnation 7.
            peer.on_join = lambda msg: Ack(0)
            await peer.until(lambda: link.state is LinkState.CONNECTED)
            assert link.peer_incarnation == 8
            assert link.outstanding == 0 and link.lost_upto == 5
            assert link._stats.dropped == {"peer_restarted": 1}


async def test_a_welcome_that_cannot_be_taken_is_an_error_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _peer() as peer:
        peer.on_hello = lambda msg: _welcome(cluster=2)
        link = _link(peer.port)
        with caplog.at_level(logging.INFO, "peerlearn.transport.links"):
            async with _running(link, peer):
                await peer.until(lambda: link.failed_attempts >= 2 and peer.conns[0].gone)
                assert link.state is LinkState.CONNECTING
                assert link.peer_incarnation is None
                assert link._stats.protocol_errors["bad_welcome"] >= 2
                assert not peer.conns[0].of(Join)
                assert link.last_error is not None and "is cluster 2, not 0" in link.last_error
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and errors[0].getMessage() == f"{NAME}:{peer.port}: {link.last_error}"
        assert link._error_log._first == 10.0


async def test_a_failed_lookup_is_recorded_as_a_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = _link(host="peer.invalid")

    async def no_such_host(*args: Any, **kw: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(link._loop, "getaddrinfo", no_such_host)
    with caplog.at_level(logging.INFO, "peerlearn.transport.links"):
        assert await _within(link._connect(), 3.0) is False
    assert link.last_error == "cannot resolve host 'peer.invalid': Name or service not known"
    assert link.failed_attempts == 1
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, f"0@peer.invalid:4001: {link.last_error}")
    ]
    # While closing, a failure is not recorded.
    link._closing = True
    assert await _within(link._connect(), 3.0) is False
    assert link.failed_attempts == 1


async def test_a_refused_connect_is_logged_and_away_at_once_only_after_a_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        link = _link(unused.getsockname()[1])
        with caplog.at_level(logging.INFO, "peerlearn.transport.links"):
            assert await _within(link._connect(), 3.0) is False
        assert link._refused is False
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
            (logging.INFO, f"{link.name}: cannot connect: connection refused")
        ]
        link.connected_since = time.monotonic()
        link.state = LinkState.RECONNECTING
        assert await _within(link._connect(), 3.0) is False
        assert link._refused is True and link.away
        link._closing = True
        assert await _within(link._connect(), 3.0) is False
        assert link.failed_attempts == 2


async def test_a_connect_that_does_not_answer_in_time_is_no_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link = _link(connect_timeout=0.05)
    opened = asyncio.Event()

    async def hangs(addresses: list[str], codec: Codec) -> FrameProtocol:
        assert addresses == ["127.0.0.1"]
        assert codec.max_payload == link._settings.max_payload
        opened.set()
        await asyncio.Event().wait()
        raise AssertionError("never")

    monkeypatch.setattr(link, "_open", hangs)
    assert await _within(link._connect(), 3.0) is False
    assert opened.is_set()
    assert link.last_error == "no connection within 0.05s"
    assert link._refused is False


async def test_the_codec_of_a_connection_takes_max_payload_and_no_data() -> None:
    async with _peer() as peer:
        link = _link(peer.port, max_payload=12345)
        async with _running(link, peer):
            await peer.until(peer.notes(1))
            assert link._proto is not None
            codec = link._proto.codec
            assert codec.max_payload == 12345
            with pytest.raises(RemoteProtocolError):
                codec._allocator(np.dtype("float64"), (3,))


# --- the handshake's questions, on a recorded connection -----------------------------------------


class _Wire:
    """What an OutLink uses of its connection, recorded; ``answer`` is called with what is sent."""

    def __init__(self, closed: bool = False) -> None:
        self.sent: list[Message] = []
        self.sent_times: list[float] = []
        self.closes = 0
        self.aborts = 0
        self.drains = 0
        self.closed = asyncio.Event()
        if closed:
            self.closed.set()
        self.changed = asyncio.Event()
        self.heard_at = self.sent_at = time.monotonic()
        self.unsendable: set[int] = set()  # the seqs of frames that fail to encode
        self.parts: list[tuple[str, int, int]] = []  # parts after the first, in order written
        self.on_drain: Callable[[], None] = lambda: None
        self.hold: asyncio.Event | None = None
        self.answer: Callable[[Message], None] = lambda msg: None

    def send(self, msg: Message) -> int:
        if isinstance(msg, Data) and msg.seq in self.unsendable:
            raise LocalProtocolError(Reason.PAYLOAD_TOO_LARGE, "too big")
        self.sent.append(msg)
        self.sent_at = time.monotonic()
        self.sent_times.append(self.sent_at)
        self.changed.set()
        self.answer(msg)
        return 10 * len(self.sent)

    def encode(self, msg: Message, part_bytes: int) -> list[list[Any]]:
        """The frames of ``msg`` as the link writes them: the message, then for a Data larger
        than ``part_bytes`` one ``("part", seq, i)`` marker per further part."""
        if isinstance(msg, Data) and msg.seq in self.unsendable:
            raise LocalProtocolError(Reason.PAYLOAD_TOO_LARGE, "too big")
        n = -(-msg.value.nbytes // part_bytes) if isinstance(msg, Data) else 1
        return [[msg], *([("part", msg.seq, i)] for i in range(1, n))]

    def write(self, chunks: list[Any]) -> int:
        item = chunks[0]
        if isinstance(item, tuple):  # a part after the first
            self.parts.append(item)
            self.changed.set()
            return 1
        return self.send(item)

    async def drain(self) -> None:
        self.drains += 1
        self.on_drain()
        if self.hold is not None:  # the kernel's buffers are full: wait till told
            await self.hold.wait()

    def close(self) -> None:
        self.closes += 1

    def abort(self) -> None:
        self.aborts += 1
        self.closed.set()

    def of(self, kind: type[Message]) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)]

    @property
    def proto(self) -> FrameProtocol:
        """This, as the link takes it."""
        return cast(FrameProtocol, self)

    async def until(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            self.changed.clear()
            if check():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("condition not reached")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


def _failures(link: OutLink) -> list[tuple[str, int, bool]]:
    """Each failed attempt ``link`` records from now on: (error, level, repeat)."""
    calls: list[tuple[str, int, bool]] = []
    failed = link._failed

    def record(error: str, level: int, repeat: bool = False) -> None:
        calls.append((error, level, repeat))
        failed(error, level, repeat)

    link._failed = record  # type: ignore[method-assign]
    return calls


def _answers(link: OutLink, wire: _Wire, answer: Message | None) -> None:
    """``wire``'s peer answers the next question with ``answer`` (None: the connection is lost)."""

    def on_send(msg: Message) -> None:
        if answer is None:
            link._loop.call_soon(link._on_lost, wire.proto, None)
        else:
            link._loop.call_soon(link._on_message, wire.proto, answer)

    wire.answer = on_send


async def test_ask_returns_the_answer_expected() -> None:
    link = _link()
    wire = _Wire()
    _answers(link, wire, _welcome())
    failures = _failures(link)
    assert await link._ask(wire.proto, HELLO, Welcome) == _welcome()
    assert wire.sent == [HELLO] and wire.closes == 0 and failures == []


async def test_ask_on_a_connection_already_lost_fails_at_once() -> None:
    link = _link(connect_timeout=3.0)
    wire = _Wire(closed=True)
    failures = _failures(link)
    answer = await asyncio.wait_for(link._ask(wire.proto, JOIN, Ack), 1.0)
    assert answer is None
    assert failures == [("connection closed during the handshake", logging.INFO, False)]


async def test_ask_of_a_connection_lost_meanwhile_fails() -> None:
    link = _link()
    wire = _Wire()
    _answers(link, wire, None)
    failures = _failures(link)
    assert await link._ask(wire.proto, HELLO, Welcome) is None
    assert failures == [("connection closed during the handshake", logging.INFO, False)]
    assert link.failed_attempts == 1


async def test_ask_without_an_answer_closes_after_connect_timeout() -> None:
    link = _link(connect_timeout=0.05)
    wire = _Wire()
    failures = _failures(link)
    assert await link._ask(wire.proto, HELLO, Welcome) is None
    assert wire.closes == 1
    assert failures == [("no answer to the handshake within 0.05s", logging.INFO, False)]
    # While closing: closed, not recorded.
    link._closing = True
    assert await link._ask(wire.proto, HELLO, Welcome) is None
    assert wire.closes == 2 and len(failures) == 1


async def test_ask_answered_with_a_refusal_records_it_and_closes() -> None:
    link = _link()
    wire = _Wire()
    _answers(link, wire, Refuse(Reason.DIM_MISMATCH))
    failures = _failures(link)
    assert await link._ask(wire.proto, JOIN, Ack) is None
    refusal = "refused this daemon: its model dimension differs from this daemon's (3)"
    assert link.last_refusal == refusal
    assert failures == [(refusal, logging.ERROR, True)]
    assert link._stats.protocol_errors == {"handshake_refused": 1}
    assert wire.closes == 1


async def test_ask_answered_with_something_else_is_unexpected() -> None:
    link = _link()
    wire = _Wire()
    _answers(link, wire, Ack(0))
    failures = _failures(link)
    assert await link._ask(wire.proto, HELLO, Welcome) is None
    assert failures == [("answered the handshake with ack", logging.ERROR, False)]
    assert link._stats.protocol_errors == {"unexpected_message": 1}
    assert wire.closes == 1
    assert link.last_refusal is None


async def test_a_bad_welcome_is_an_error_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    link = _link()
    wire = _Wire()
    _answers(link, wire, _welcome(cluster=2))

    async def opened(addresses: list[str], codec: Codec) -> _Wire:
        return wire

    async def resolved() -> list[str]:
        return ["127.0.0.1"]

    monkeypatch.setattr(link, "_open", opened)
    monkeypatch.setattr(link, "_resolve", resolved)
    failures = _failures(link)
    assert await _within(link._connect(), 3.0) is False
    problem = "the daemon at 127.0.0.1:4001 is cluster 2, not 0: the daemon lists disagree"
    assert failures == [(problem, logging.ERROR, True)]
    assert link._stats.protocol_errors == {"bad_welcome": 1}
    assert wire.closes == 1
    [hello] = wire.sent
    assert hello == replace(HELLO, nonce=cast(Hello, hello).nonce)


# --- frames and notes ---------------------------------------------------------------------------


async def test_frames_go_out_after_the_notes_counted_and_an_unsendable_one_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = _link()
    wire = _Wire()
    wire.unsendable = {2}
    link.control(Control(name="state_request", body={"restart": False}))
    for step in (1, 2, 3):
        assert link.offer_nowait(("params", step), 1, step, _value(step))
    room = link._room._value
    with caplog.at_level(logging.INFO, "peerlearn.transport.links"):
        task = asyncio.create_task(link._send_frames(wire.proto))
        await wire.until(lambda: len(wire.of(Data)) == 2)
    assert [type(m) for m in wire.sent] == [Control, Control, Data, Data]
    assert wire.sent[0] == Missed(None).control()
    assert wire.sent[1] == Control(name="state_request", body={"restart": False})
    assert [d.seq for d in wire.of(Data)] == [1, 3]
    assert [d.seq for d in link._unacked] == [1, 3] and not link._queue
    assert link._stats.dropped == {"unsendable": 1}
    assert link._room._value == room + 1
    assert link._stats.messages == {("out", "params", link.name): 2}
    assert link._stats.bytes == {("out", "params", link.name): 30 + 40}
    assert wire.drains == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"{link.name}: cannot send params 2: too big"
    ]
    assert not task.done()  # waiting for more
    assert link.offer_nowait(("params", 4), 1, 4, _value(4))
    await wire.until(lambda: len(wire.of(Data)) == 3)
    wire.closed.set()
    await asyncio.wait_for(task, 1.0)


async def test_a_large_frame_goes_in_parts_with_notes_and_pings_between_them() -> None:
    """Each part waits for the connection to drain — where the heartbeat's Ping goes out — and
    the catch-up notes queued meanwhile go before the next part; it counts as one frame."""
    link = _link(part_bytes=8)  # a 3-float64 frame: 3 parts
    wire = _Wire()
    told = Control(name="state_request", body={"restart": False})

    def between() -> None:
        if len(wire.parts) == 0 and wire.of(Data) and not wire.of(Ping):
            wire.send(Ping(5))  # as the heartbeat does, while the link waits
            link.control(told)

    wire.on_drain = between
    assert link.offer_nowait(("params", 1), 1, 1, _value(1))
    task = asyncio.create_task(link._send_frames(wire.proto))
    await wire.until(lambda: len(wire.parts) == 2)
    assert [type(m) for m in wire.sent] == [Control, Data, Ping, Control]
    assert wire.sent[3] == told and wire.parts == [("part", 1, 1), ("part", 1, 2)]
    assert [d.seq for d in link._unacked] == [1]
    assert link._stats.messages == {("out", "params", link.name): 1}
    assert link._stats.bytes == {("out", "params", link.name): 20 + 1 + 1}
    wire.closed.set()
    await asyncio.wait_for(task, 1.0)


async def test_a_close_between_parts_writes_the_rest_of_the_frame_before_its_bye() -> None:
    """Shutting down while a frame waits between parts (its drain deadline passed): the rest of
    it goes out before the Bye, once — a frame cut there would be lost to the peer."""
    link = _link(part_bytes=8, drain_timeout=0.01)
    wire = _Wire()
    wire.hold = asyncio.Event()
    link._proto = wire.proto
    link.connected_since = time.monotonic()
    assert link.offer_nowait(("params", 1), 1, 1, _value(1))
    task = asyncio.create_task(link._send_frames(wire.proto))
    await wire.until(lambda: wire.drains == 1)  # its first part written, waiting to drain
    await link.close()
    assert wire.parts == [("part", 1, 1), ("part", 1, 2)]
    assert [type(m) for m in wire.sent] == [Control, Data, Bye] and wire.closes == 1
    wire.hold.set()
    wire.closed.set()
    await asyncio.wait_for(task, 1.0)
    assert len(wire.parts) == 2  # not twice


async def test_a_connection_lost_between_parts_leaves_the_frame_to_send_again() -> None:
    link = _link(part_bytes=8)
    wire = _Wire()
    wire.on_drain = wire.closed.set  # lost after the first part
    assert link.offer_nowait(("params", 1), 1, 1, _value(1))
    await asyncio.wait_for(link._send_frames(wire.proto), 1.0)
    assert len(wire.of(Data)) == 1 and wire.parts == []
    assert [d.seq for d in link._unacked] == [1]  # sent again, whole, on the next connection


async def test_sending_stops_when_closing_with_nothing_queued_or_the_connection_closes() -> None:
    link = _link()
    wire = _Wire()
    task = asyncio.create_task(link._send_frames(wire.proto))
    await wire.until(lambda: len(wire.sent) == 1)
    link._closing = True
    assert link.offer_nowait(("params", 1), 1, 1, _value(1)) is False
    link._wakeup.set()
    await asyncio.wait_for(task, 1.0)
    # A connection that closes while nothing is queued ends the sending too.
    link._closing = False
    link._noted = False  # a new connection
    wire = _Wire()
    task = asyncio.create_task(link._send_frames(wire.proto))
    await wire.until(lambda: len(wire.sent) == 1)
    wire.closed.set()
    await asyncio.wait_for(task, 1.0)
    assert link._wakeup.is_set() is False


async def test_pump_ends_with_the_connection_and_dates_the_loss_from_the_last_word() -> None:
    link = _link(peer_timeout=100.0)
    wire = _Wire()
    wire.heard_at = time.monotonic() - 3.0
    link._proto = wire.proto
    task = asyncio.create_task(link._pump())
    await wire.until(lambda: len(wire.sent) == 1)
    wire.closed.set()
    await asyncio.wait_for(task, 1.0)
    assert link._proto is None
    assert link.disconnected_since == wire.heard_at


# --- the heartbeat ------------------------------------------------------------------------------


class _Clockwork(_Wire):
    """A connection that hears and says something all the time, until told otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.hears = True
        self.says = True
        self._heard = self._said = time.monotonic()

    @property
    def heard_at(self) -> float:
        if self.hears:
            self._heard = time.monotonic()
        return self._heard

    @heard_at.setter
    def heard_at(self, value: float) -> None:
        self._heard = value

    @property
    def sent_at(self) -> float:
        if self.says:
            self._said = time.monotonic()
        return self._said

    @sent_at.setter
    def sent_at(self, value: float) -> None:
        self._said = value


async def test_an_idle_link_pings_every_quarter_timeout_with_a_new_nonce() -> None:
    link = _link(peer_timeout=0.8)
    wire = _Clockwork()
    wire.says = False  # it hears the other side's pongs, but says nothing itself
    start = time.monotonic()
    task = asyncio.create_task(link._heartbeat(wire.proto))
    await wire.until(lambda: len(wire.sent) == 3, timeout=2.0)
    assert wire.sent == [Ping(1), Ping(2), Ping(3)]
    assert wire.sent_times[0] - start >= 0.19  # a quarter of peer_timeout, not a fifth
    wire.closed.set()
    await asyncio.wait_for(task, 1.0)
    assert len(wire.sent) == 3 and wire.aborts == 0


async def test_a_link_that_hears_nothing_pings_then_drops_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = _link(peer_timeout=0.2)
    wire = _Clockwork()
    with caplog.at_level(logging.INFO, "peerlearn.transport.links"):
        task = asyncio.create_task(link._heartbeat(wire.proto))
        # Hearing and saying something: no ping, no drop, for two timeouts.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 0.4)
        assert not task.done() and wire.sent == []
        wire.hears = False  # it sends frames, but nothing comes back
        wire.heard_at = silent_from = time.monotonic()
        await asyncio.wait_for(task, 2.0)
    assert wire.aborts == 1
    assert time.monotonic() - silent_from >= 0.2
    assert wire.sent and all(isinstance(m, Ping) for m in wire.sent)
    assert link._stats.protocol_errors == {"peer_silent": 1}
    [line] = [r for r in caplog.records if "no sign of life" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert re.fullmatch(
        rf"{re.escape(link.name)}: no sign of life for \d+\.\ds \(no ack, no pong\): "
        "connection dropped",
        line.getMessage(),
    )


async def test_the_heartbeat_stops_with_the_connection_without_a_ping() -> None:
    link = _link(peer_timeout=0.2)
    wire = _Clockwork()
    wire.says = wire.hears = False
    wire.heard_at = wire.sent_at = time.monotonic() - 0.1  # a ping is due at the first look
    wire.closed.set()
    await asyncio.wait_for(link._heartbeat(wire.proto), 1.0)
    assert wire.sent == [] and wire.aborts == 0


# --- the reconnect loop -------------------------------------------------------------------------


async def test_reconnects_back_off_doubling_to_the_most_and_anew_after_a_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link = _link(backoff_initial=0.1, backoff_max=0.5, peer_timeout=100.0)
    # connect: fails 4 times, connects (and loses it), fails twice, connects (and loses it),
    # connects and closes.
    script = [False, False, False, False, True, False, False, True, True]
    sleeps: list[tuple[float, float, LinkState]] = []
    pumps: list[bool] = []

    async def connect() -> bool:
        ok = script.pop(0)
        if ok:
            link.connected_since = time.monotonic()
            link.state = LinkState.CONNECTED
        return ok

    async def pump() -> None:
        pumps.append(True)
        if not script:
            link._closing = True

    async def sleep(seconds: float) -> None:
        sleeps.append((seconds, bounds[-1][0], link.state))

    bounds: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return high

    monkeypatch.setattr(link, "_connect", connect)
    monkeypatch.setattr(link, "_pump", pump)
    monkeypatch.setattr(link, "_sleep", sleep)
    monkeypatch.setattr(random, "uniform", uniform)
    lookup: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    link._lookup = lookup
    await asyncio.wait_for(link.run(), 1.0)
    assert [s for s, _, _ in sleeps] == [0.1, 0.2, 0.4, 0.5, 0.1, 0.2, 0.4, 0.1]
    assert {low for low, _ in bounds} == {0.0}
    assert [state for _, _, state in sleeps] == [LinkState.CONNECTING] * 4 + [
        LinkState.RECONNECTING
    ] * 4
    assert len(pumps) == 3
    assert link._stats.reconnects == 2  # the close during the third one is none
    assert link.state is LinkState.CLOSED
    assert lookup.cancelled()


async def test_a_link_that_fails_long_enough_is_flagged_away_by_its_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        link = _link(unused.getsockname()[1], peer_timeout=0.5)
        link.disconnected_since = time.monotonic() - 1.0
        failed = asyncio.Event()
        record = link._failed

        def hooked(error: str, level: int, repeat: bool = False) -> None:
            record(error, level, repeat)
            if link.failed_attempts >= 2:
                failed.set()

        link._failed = hooked  # type: ignore[method-assign]
        with caplog.at_level(logging.INFO, "peerlearn.transport.links"):
            task = asyncio.create_task(link.run())
            await asyncio.wait_for(failed.wait(), 5.0)
            await link.close()
            await asyncio.wait_for(task, 5.0)
        assert link._away_logged is True
        assert [r.getMessage() for r in caplog.records if " away " in r.getMessage()] == [
            f"{link.name} away for more than 0.5s (connecting: cannot connect: connection refused)"
        ]


# --- the name lookup and the addresses tried -----------------------------------------------------


def _info(address: str) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return (family, socket.SOCK_STREAM, 6, "", (address, 4001))


class _Resolver:
    """loop.getaddrinfo, answered by hand: each call's future in ``lookups``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.lookups: list[asyncio.Future[Any]] = []

    async def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls.append((*args, kw))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.lookups.append(future)
        return await future


async def test_resolve_gives_each_address_once_in_the_resolvers_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link = _link(host="peer.example")
    resolver = _Resolver()
    monkeypatch.setattr(link._loop, "getaddrinfo", resolver)
    task = asyncio.create_task(link._resolve())
    while not resolver.lookups:
        await asyncio.sleep(0)
    resolver.lookups[0].set_result([_info("::1"), _info("127.0.0.1"), _info("::1")])
    assert await task == ["::1", "127.0.0.1"]
    assert resolver.calls == [("peer.example", 4001, {"type": socket.SOCK_STREAM})]
    assert link._lookup is None


async def test_a_hung_lookup_is_waited_for_again_and_its_late_answer_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link = _link(resolve_timeout=0.05, connect_timeout=10.0)
    resolver = _Resolver()
    monkeypatch.setattr(link._loop, "getaddrinfo", resolver)
    with pytest.raises(TimeoutError):
        await _within(link._resolve(), 2.0)  # resolve_timeout, not connect_timeout
    assert link._lookup is not None and not link._lookup.done()
    with pytest.raises(TimeoutError):
        await link._resolve()
    assert len(resolver.calls) == 1  # the same lookup, not a second one
    resolver.lookups[0].set_result([_info("127.0.0.1")])
    await asyncio.sleep(0)
    assert await link._resolve() == ["127.0.0.1"]
    assert len(resolver.calls) == 1 and link._lookup is None


async def test_a_failed_or_cancelled_lookup_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link = _link(resolve_timeout=0.05)
    resolver = _Resolver()
    monkeypatch.setattr(link._loop, "getaddrinfo", resolver)
    # It fails while its attempt waits: not kept.
    task = asyncio.create_task(link._resolve())
    while not resolver.lookups:
        await asyncio.sleep(0)
    resolver.lookups[0].set_exception(socket.gaierror(socket.EAI_AGAIN, "try again"))
    with pytest.raises(socket.gaierror):
        await task
    assert link._lookup is None
    # It fails after its attempt gave up: asked again.
    with pytest.raises(TimeoutError):
        await link._resolve()
    failed = link._lookup
    assert failed is not None
    resolver.lookups[1].set_exception(socket.gaierror(socket.EAI_AGAIN, "try again"))
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        await link._resolve()
    assert len(resolver.calls) == 3 and link._lookup is not failed
    # It is cancelled after its attempt gave up: asked again.
    assert link._lookup is not None
    link._lookup.cancel()
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        await link._resolve()
    assert len(resolver.calls) == 4
    # The attempt is cancelled: so is its lookup.
    task = asyncio.create_task(link._resolve())
    await asyncio.sleep(0)
    lookup = link._lookup
    assert lookup is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lookup.cancelled() and link._lookup is None


async def test_open_takes_the_first_address_that_answers() -> None:
    async with _peer() as peer:
        link = _link(peer.port, peer_timeout=7.5)
        codec = Codec()
        proto = await link._open(["127.0.0.2", "127.0.0.1", "127.0.0.3"], codec)
        try:
            await peer.until(lambda: len(peer.conns) == 1)
            assert proto.codec is codec
            assert proto._timeout == 7.5
            assert proto._on_message == link._on_message
            assert proto._on_error == link._on_error
            assert proto._on_lost == link._on_lost
            assert proto.peername[:2] == ("127.0.0.1", peer.port)
        finally:
            proto.abort()
        with pytest.raises(ConnectionRefusedError):
            await link._open(["127.0.0.2", "127.0.0.3"], codec)
        with pytest.raises(OSError, match=r"^no address for 127\.0\.0\.1$"):
            await link._open([], codec)


async def test_unless_stopped_times_out_after_connect_timeout_or_its_own_or_at_close() -> None:
    link = _link(connect_timeout=0.05)
    assert await link._unless_stopped(asyncio.sleep(0, "done")) == "done"
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await _within(link._unless_stopped(never))
    assert never.cancelled()
    link = _link(connect_timeout=10.0)
    with pytest.raises(TimeoutError):
        await _within(link._unless_stopped(asyncio.Event().wait(), 0.05))
    link._stop.set()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await _within(link._unless_stopped(asyncio.Event().wait(), 5.0))
    assert time.monotonic() - start < 0.5


# --- producers ----------------------------------------------------------------------------------


async def test_offer_queues_the_frame_with_its_fields_on_the_loop() -> None:
    link = _link()
    value = _value(4)
    assert link.offer(("params", 4), 3, 4, value, to=(1,), post=True) is True
    assert link.outstanding == 0  # handed to the loop
    await asyncio.sleep(0)
    [frame] = link._queue
    assert (frame.seq, frame.tag, frame.sender, frame.step, frame.to, frame.post) == (
        1,
        ("params", 4),
        3,
        4,
        (1,),
        True,
    )
    assert frame.value is value
    assert link.offer(("params", 5), 3, 5, value) is True
    await asyncio.sleep(0)
    assert (link._queue[1].to, link._queue[1].post) == ((), False)
    link._closing = True
    assert link.offer(("params", 6), 3, 6, value) is False
    assert link._stats.dropped == {"link_closed": 1}


# --- losses, log lines, shutdown ----------------------------------------------------------------


async def test_a_lost_connection_is_logged_only_when_it_was_connected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = _link()
    wire = _Wire()
    with caplog.at_level(logging.INFO, "peerlearn.transport.links"):
        link._on_lost(wire.proto, None)  # during the handshake: quiet
        link.state = LinkState.CONNECTED
        link._on_lost(wire.proto, None)
        link._on_lost(wire.proto, ConnectionResetError("reset by peer"))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, f"{link.name}: connection lost (closed)"),
        (logging.INFO, f"{link.name}: connection lost (reset by peer)"),
    ]


async def test_away_and_given_up_lines_without_an_error_say_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = _link(peer_timeout=5.0, peer_give_up=60.0, keep=True)
    link.disconnected_since = time.monotonic() - 61.0
    link.state = LinkState.CONNECTING
    assert link.last_error is None
    with caplog.at_level(logging.WARNING, "peerlearn.transport.links"):
        link._check_away()
        link.check_give_up()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == f"{link.name} away for more than 5.0s (connecting)"
    assert lines[1].endswith("blocked until it is back; 0 frames kept for it")


async def test_a_link_cancelled_while_connected_ends_cancelled() -> None:
    async with _peer() as peer:
        link = _link(peer.port)
        peer.watch(link)
        task = asyncio.create_task(link.run())
        await peer.until(peer.notes(1))
        task.cancel()
        [outcome] = await asyncio.gather(task, return_exceptions=True)
        assert isinstance(outcome, asyncio.CancelledError)


async def test_a_link_that_lost_its_peer_closes_cleanly() -> None:
    peer = _Peer()
    await peer.start()
    link = _link(peer.port)
    peer.watch(link)
    task = asyncio.create_task(link.run())
    await peer.until(peer.notes(1))
    await peer.stop()  # the port closes: it is refused from now on
    await peer.until(lambda: link.failed_attempts >= 1)
    assert link._proto is None
    assert link._refused and link.away
    assert link.disconnected_since <= time.monotonic()
    await link.close()
    await asyncio.wait_for(task, 5.0)
    assert link.state is LinkState.CLOSED


# --- a new link ---------------------------------------------------------------------------------


async def test_a_new_link_shows_no_error_and_is_not_away() -> None:
    # What /peers shows of it: "away": false, "refused": null, "last_error": null.
    link = _link()
    assert link.state is LinkState.CONNECTING
    assert link.away is False and link.away_seconds is None and link.given_up is False
    assert link.last_error is None and link.last_refusal is None
    assert (link.failed_attempts, link.outstanding, link.lost_upto) == (0, 0, None)
    assert link.connected_since is None and link.peer_incarnation is None


async def test_a_replaying_link_sends_a_restarted_peer_the_last_three_iterations_from_0() -> None:
    link = _link(replay=True)
    wire = _Wire()
    for step in (0, 2, 3):  # iterations 0, 2 and 3: the last three, 1 was not sent to it
        assert link.offer_nowait(("params", step), 1, step, _value(step))
    task = asyncio.create_task(link._send_frames(wire.proto))
    await wire.until(lambda: len(wire.of(Data)) == 3)
    wire.closed.set()
    await asyncio.wait_for(task, 1.0)
    link._on_message(wire.proto, Ack(3))
    assert link.outstanding == 0
    assert [f.step for f in link._recent] == [0, 2, 3]
    link._peer_restarted()
    assert [(f.seq, f.step) for f in link._queue] == [(1, 0), (2, 2), (3, 3)]


async def _sent_and_acked(link: OutLink, frames: list[tuple[Any, int]], ack: bool) -> None:
    """Offer ``frames`` (tag, step), send them on a recorded connection, and ack them all."""
    first = link._seq + 1
    for tag, step in frames:
        assert link.offer_nowait(tag, 1, step, _value(step))
    wire = _Wire()
    link._noted = True  # no catch-up note: frames only
    task = asyncio.create_task(link._send_frames(wire.proto))
    await wire.until(lambda: len(wire.of(Data)) == len(frames))
    wire.closed.set()
    await asyncio.wait_for(task, 1.0)
    if ack:
        link._on_message(wire.proto, Ack(first + len(frames) - 1))


async def test_a_restarted_peer_gets_the_last_three_iterations_again_renumbered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = _link(replay=True, max_queue=6)
    # Acked: iterations 3, 5 (twice), 6 — and a state answer, never sent again.
    acked = [(("params", 3), 3), (("params", 5), 5), (("grad", 5), 5)]
    acked += [(("state", 1), 6), (("params", 6), 6)]
    await _sent_and_acked(link, acked, ack=True)
    assert [f.step for f in link._recent] == [3, 5, 5, 6]
    # Outstanding: iteration 2 (older than the last three), a snapshot (asked anew), 3 and 7.
    await _sent_and_acked(link, [(("params", 2), 2), (("snapshot", 1), 7)], ack=False)
    assert link.offer_nowait(("params", 3), 2, 3, _value(3))
    assert link.offer_nowait(("params", 7), 1, 7, _value(7))
    assert link.outstanding == 4 and link._room._value == 2
    with caplog.at_level(logging.INFO, "peerlearn.transport.links"):
        link._peer_restarted()
    again = [(f.seq, f.tag, f.step) for f in link._queue]
    assert again == [
        (1, ("params", 3), 3),
        (2, ("params", 5), 5),
        (3, ("grad", 5), 5),
        (4, ("params", 6), 6),
        (5, ("params", 3), 3),
        (6, ("params", 7), 7),
    ]
    assert link._seq == 6 and not link._unacked and not link._recent
    # The two dropped give their slots back; the four acked take them: the window is full.
    assert link._stats.dropped == {"peer_restarted": 2}
    assert (link._room._value, link._overdraft) == (0, 0)
    assert link.lost_upto == 7
    assert link._wakeup.is_set()
    assert [r.getMessage() for r in caplog.records] == [
        f"{link.name} restarted (new incarnation): 6 frames of iterations 3 and on sent again"
    ]


async def test_a_restarted_peer_sent_nothing_is_no_loss_and_acked_frames_go_beyond_the_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = _link(replay=True, max_queue=1)
    link._peer_restarted()  # nothing ever sent to it: a stranger, nothing lost
    assert link.lost_upto is None and link._stats.dropped == {} and not link._queue
    acked = [(("params", 1), 1), (("grad", 1), 1), (("model", 1), 1)]
    await _sent_and_acked(link, acked, ack=True)
    link._peer_restarted()
    assert [(f.seq, f.tag) for f in link._queue] == [
        (n + 1, tag) for n, (tag, _) in enumerate(acked)
    ]
    assert link._stats.dropped == {}  # nothing dropped: no count at all
    assert link.lost_upto == 1
    assert (link._room._value, link._overdraft) == (0, 2)  # two frames beyond the window


async def test_a_back_off_ends_at_once_when_the_peer_dials_or_the_link_closes() -> None:
    link = _link()
    sleeping = asyncio.create_task(link._sleep(5.0))
    await asyncio.sleep(0)
    link.retry_now()
    await _within(sleeping)
    link._retry.set()  # an old wake-up does not end the next back-off
    sleeping = asyncio.create_task(link._sleep(5.0))
    await asyncio.sleep(0)
    assert not sleeping.done()
    link._stop.set()
    await _within(sleeping)
    await _within(link._sleep(0.01))  # the back-off itself


# --- a producer sending one frame to several links ----------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    new = asyncio.new_event_loop()
    yield new
    new.close()


def _full_link(loop: asyncio.AbstractEventLoop, **settings: Any) -> OutLink:
    """A connected link of a one-frame window, full; frames may drop after 10 s."""
    fields: dict[str, Any] = {"max_queue": 1, "queue_timeout": 10.0, "peer_timeout": 60.0}
    fields.update(settings)
    link = OutLink(
        0, "peer.example", 4001, HELLO, JOIN, LinkSettings(**fields), TransportStats(), loop
    )
    link.state = LinkState.CONNECTED
    assert link._room.acquire(blocking=False)
    return link


def _spy_wait(link: OutLink, free: bool = False) -> list[tuple[Any, ...]]:
    """Each wait for room: (the producers shown waiting, its arguments); ``free``: a slot is
    freed as it begins."""
    calls: list[tuple[Any, ...]] = []
    wait = link._wait

    def spy(tag: Any, deadline: float | None = None, until: float | None = None) -> bool | None:
        calls.append((dict(link.senders_waiting), tag, deadline, until))
        if free:
            link._room.release()
        return wait(tag, deadline, until)

    link._wait = spy  # type: ignore[method-assign]
    return calls


def test_offer_within_takes_room_at_once_without_waiting(loop: asyncio.AbstractEventLoop) -> None:
    link = _full_link(loop, max_queue=2)
    calls = _spy_wait(link)
    value = _value(2)
    assert link.offer_within(("params", 2), 3, 2, value, time.monotonic(), 0.0) is True
    assert calls == [] and link.senders_waiting == {}
    loop.run_until_complete(asyncio.sleep(0))
    [frame] = link._queue
    assert (frame.tag, frame.sender, frame.step, frame.to, frame.post) == (
        ("params", 2),
        3,
        2,
        (),
        False,
    )
    assert frame.value is value


def test_offer_within_says_none_when_its_time_is_up_and_counts_nothing(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _full_link(loop, queue_timeout=1.0)
    calls = _spy_wait(link)
    since = time.monotonic()
    until = since + 0.05
    assert link.offer_within(("params", 2), 3, 2, _value(2), until, since) is None
    me = threading.get_ident()
    assert calls == [({me: since}, ("params", 2), since + 1.0, until)]
    assert link.senders_waiting == {}
    assert link._stats.dropped == {} and link.lost_upto is None
    assert link._stats.queue_waits == 0  # note_wait counts it, once per frame
    link.note_wait()
    link.note_wait()
    assert link._stats.queue_waits == 2


def test_offer_within_takes_a_slot_freed_while_it_waits(loop: asyncio.AbstractEventLoop) -> None:
    link = _full_link(loop)
    _spy_wait(link, free=True)
    now = time.monotonic()
    assert link.offer_within(("params", 2), 3, 2, _value(2), now + 5.0, now) is True
    loop.run_until_complete(asyncio.sleep(0))
    assert [f.step for f in link._queue] == [2]
    assert link.senders_waiting == {} and link.lost_upto is None


def test_offer_within_drops_for_an_away_peer_or_after_queue_timeout_or_at_close(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _full_link(loop)
    now = time.monotonic()
    # queue_timeout since it began to wait is over
    assert link.offer_within(("params", 4), 3, 4, _value(4), now + 5.0, now - 11.0) is False
    assert link._stats.dropped == {"queue_full": 1} and link.lost_upto == 4
    link.state = LinkState.RECONNECTING
    link.disconnected_since = now - 61.0
    assert link.offer_within(("params", 5), 3, 5, _value(5), now + 5.0, now) is False
    assert link._stats.dropped == {"queue_full": 1, "peer_away": 1} and link.lost_upto == 5
    link._closing = True
    assert link.offer_within(("params", 6), 3, 6, _value(6), now + 5.0, now) is False
    assert link._stats.dropped == {"queue_full": 1, "peer_away": 1, "link_closed": 1}
    assert link.lost_upto == 5
    assert link.senders_waiting == {} and not link._queue
