"""Small precise tests for what the mutation run over ``peerlearn/transport/`` left alive.

The daemon tests drive the transport end to end; they cannot tell a counter that counts
wrong, a boundary off by one, a socket option set to the wrong value or a catch-up note that
accepts a bad field. Each test here pins one such detail (docs/testing.md, "Mutation testing",
the fifth run). Networking goes over real sockets on 127.0.0.1 port 0, waited on with events.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from peerlearn.membership import Membership
from peerlearn.transport import catchup, peers, pool
from peerlearn.transport.catchup import Catchup, CatchupError, Missed, StateRequest
from peerlearn.transport.links import LinkSettings, LinkState, OutLink, Throttle, _tiny_only
from peerlearn.transport.peers import Beyond, FaultAction, PeerAddress, Transport, _Inbound
from peerlearn.transport.pool import _ONLY_THE_POOL, BufferPool, _only_the_pool
from peerlearn.transport.protocol import FrameProtocol, keep_alive
from peerlearn.transport.stats import TransportStats
from peerlearn.wire import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Codec,
    Control,
    Data,
    Hello,
    Join,
    Message,
    Ping,
    Pong,
    Reason,
    Refuse,
    RemoteProtocolError,
    Welcome,
)
from peerlearn.wire.messages import INT64_MAX

# --- catch-up notes ---------------------------------------------------------------------------


@given(st.one_of(st.none(), st.integers(0, INT64_MAX)))
@example(0)
@example(INT64_MAX)
def test_missed_round_trips_every_iteration_and_none(upto: int | None) -> None:
    control = Missed(upto).control()
    assert control.name == "missed"
    assert dict(control.body) == {"upto": upto}
    assert catchup.parse(control) == Missed(upto)


@pytest.mark.parametrize("restart", [False, True])
def test_state_request_round_trips(restart: bool) -> None:
    control = StateRequest(restart).control()
    assert control.name == "state_request"
    assert dict(control.body) == {"restart": restart}
    note = catchup.parse(control)
    assert isinstance(note, StateRequest)
    assert note.restart is restart


def test_a_state_request_without_restart_means_no_restart() -> None:
    note = catchup.parse(Control(name="state_request", body={}))
    assert note == StateRequest(False)


def test_the_kinds_are_the_control_names() -> None:
    assert Missed(None).kind == "missed"
    assert StateRequest().kind == "state_request"
    assert StateRequest().restart is False


@pytest.mark.parametrize("upto", [-1, -INT64_MAX - 1, True, False, 1.0, "3", [1]], ids=repr)
def test_missed_refuses_what_is_no_iteration(upto: object) -> None:
    with pytest.raises(CatchupError, match=r"^missed: upto must be an iteration ≥ 0 or null, got "):
        catchup.parse(Control(name="missed", body={"upto": upto}))


def test_missed_without_upto_is_refused_and_names_it() -> None:
    with pytest.raises(CatchupError) as info:
        catchup.parse(Control(name="missed", body={}))
    assert str(info.value) == "missed: upto must be an iteration ≥ 0 or null, got False"


def test_a_refused_upto_is_named_cut_at_40_characters() -> None:
    with pytest.raises(CatchupError) as info:
        catchup.parse(Control(name="missed", body={"upto": "x" * 100}))
    assert str(info.value).endswith("got '" + "x" * 39)


@pytest.mark.parametrize("restart", [0, 1, None, "true"], ids=repr)
def test_state_request_refuses_a_restart_that_is_no_bool(restart: object) -> None:
    with pytest.raises(CatchupError) as info:
        catchup.parse(Control(name="state_request", body={"restart": restart}))
    assert str(info.value) == f"state_request: restart must be a bool, got {restart!r:.40}"


def test_an_unknown_control_name_is_refused_and_named() -> None:
    with pytest.raises(CatchupError) as info:
        catchup.parse(Control(name="hurry", body={}))
    assert str(info.value) == "unknown control message 'hurry'"


# --- counters ---------------------------------------------------------------------------------


def test_transport_stats_count_messages_bytes_errors_and_drops() -> None:
    stats = TransportStats()
    stats.count("out", "params", "1@h:1", 100)
    stats.count("out", "params", "1@h:1", 20)
    stats.count("in", "params", "1@h:1", 7)
    stats.error("bad_data")
    stats.error("bad_data")
    stats.drop("duplicate")
    stats.drop("peer_restarted", 5)
    assert stats.messages == {("out", "params", "1@h:1"): 2, ("in", "params", "1@h:1"): 1}
    assert stats.bytes == {("out", "params", "1@h:1"): 120, ("in", "params", "1@h:1"): 7}
    assert stats.protocol_errors == {"bad_data": 2}
    assert stats.dropped == {"duplicate": 1, "peer_restarted": 5}
    assert stats.queue_waits == 0
    assert stats.reconnects == 0


# --- the receive-buffer pool ------------------------------------------------------------------

F64 = np.dtype("float64")


def test_only_the_pool_is_the_count_of_an_unreferenced_array() -> None:
    # list slot + loop variable + getrefcount's argument
    if sys.version_info < (3, 14):
        assert _ONLY_THE_POOL == 3
    arrays = [np.empty(1)]
    for arr in arrays:
        assert sys.getrefcount(arr) == _ONLY_THE_POOL
    assert _only_the_pool() == _ONLY_THE_POOL  # measured again, as at import


def test_pool_defaults() -> None:
    pool = BufferPool()
    assert pool.min_bytes == 1 << 20
    assert pool.max_bytes == 1 << 30
    assert (pool.reused, pool.allocated) == (0, 0)


def test_arrays_under_min_bytes_are_fresh_and_from_min_bytes_on_pooled() -> None:
    pool = BufferPool(min_bytes=80, max_bytes=10_000)
    small = pool(F64, (9,))  # 72 bytes
    assert small.shape == (9,) and small.dtype == F64
    assert (pool.reused, pool.allocated) == (0, 0)
    a = pool(F64, (10,))  # exactly min_bytes
    assert a.shape == (10,) and a.dtype == F64 and a.flags.c_contiguous and a.flags.writeable
    assert (pool.reused, pool.allocated) == (0, 1)
    del a
    b = pool(F64, (10,))
    assert (pool.reused, pool.allocated) == (1, 1)
    assert b.shape == (10,)


def test_the_size_is_the_product_of_the_shape_times_the_itemsize() -> None:
    pool = BufferPool(min_bytes=96, max_bytes=10_000)
    pooled = pool(np.dtype("float32"), (4, 6))  # 96 bytes: pooled
    assert pool.allocated == 1
    assert pooled.dtype == np.dtype("float32") and pooled.shape == (4, 6)
    pool(np.dtype("float32"), (23,))  # 92 bytes: fresh
    assert pool.allocated == 1


def test_a_pooled_array_is_reused_only_once_nothing_references_it() -> None:
    pool = BufferPool(min_bytes=8, max_bytes=10_000)
    first = pool(F64, (4,))
    view = first[1:]
    del first
    second = pool(F64, (4,))  # the view keeps the first alive: a new one
    assert second.base is not view.base or second is not view.base
    assert (pool.reused, pool.allocated) == (0, 2)
    del view
    third = pool(F64, (4,))  # the first one is free again
    assert (pool.reused, pool.allocated) == (1, 2)
    assert third is not second


def test_a_reused_array_is_writeable_again() -> None:
    pool = BufferPool(min_bytes=8, max_bytes=10_000)
    a = pool(F64, (4,))
    a.flags.writeable = False
    del a
    b = pool(F64, (4,))
    assert pool.reused == 1
    assert b.flags.writeable


def test_arrays_of_another_dtype_or_shape_are_not_reused() -> None:
    pool = BufferPool(min_bytes=8, max_bytes=10_000)
    del_me = pool(F64, (4,))
    del del_me
    pool(np.dtype("int64"), (4,))
    pool(F64, (2, 2))
    assert (pool.reused, pool.allocated) == (0, 3)


def test_the_pool_keeps_arrays_up_to_exactly_max_bytes() -> None:
    pool = BufferPool(min_bytes=8, max_bytes=64)
    a = pool(F64, (4,))  # 32 held
    b = pool(F64, (4,))  # 64 held: exactly the cap, kept
    c = pool(F64, (4,))  # 96 would be over: not kept
    assert pool.allocated == 3
    del a, b, c
    d = pool(F64, (4,))
    e = pool(F64, (4,))
    assert pool.reused == 2
    f = pool(F64, (4,))  # the third was never kept: a fresh one, not kept either
    assert (pool.reused, pool.allocated) == (2, 4)
    assert len({id(d), id(e), id(f)}) == 3


# --- socket options ---------------------------------------------------------------------------


class _SockTransport:
    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default


def _opt(sock: socket.socket, level: int, name: str) -> int:
    return sock.getsockopt(level, getattr(socket, name))


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options")
@pytest.mark.parametrize(
    ("timeout", "idle", "interval", "user_timeout"),
    [(9.6, 5, 2, 9600), (5.0, 2, 1, 5000), (0.3, 1, 1, 300), (17.0, 8, 4, 17000)],
)
def test_keep_alive_sets_the_kernels_probes_from_the_timeout(
    timeout: float, idle: int, interval: int, user_timeout: int
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        keep_alive(_SockTransport(sock), timeout)  # type: ignore[arg-type]
        assert _opt(sock, socket.SOL_SOCKET, "SO_KEEPALIVE") == 1
        assert _opt(sock, socket.IPPROTO_TCP, "TCP_KEEPIDLE") == idle
        assert _opt(sock, socket.IPPROTO_TCP, "TCP_KEEPINTVL") == interval
        assert _opt(sock, socket.IPPROTO_TCP, "TCP_KEEPCNT") == 3
        assert _opt(sock, socket.IPPROTO_TCP, "TCP_USER_TIMEOUT") == user_timeout


def test_keep_alive_without_a_socket_does_nothing() -> None:
    keep_alive(_SockTransport(None), 5.0)  # type: ignore[arg-type]


def test_keep_alive_skips_the_options_a_socket_refuses() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # no TCP options here
        keep_alive(_SockTransport(sock), 5.0)  # type: ignore[arg-type]
        assert _opt(sock, socket.SOL_SOCKET, "SO_KEEPALIVE") == 1  # the one it takes


# --- FrameProtocol over a real connection -----------------------------------------------------


@dataclass
class _End:
    """One side of a connection: what its FrameProtocol reported."""

    messages: list[Message] = field(default_factory=list)
    errors: list[RemoteProtocolError] = field(default_factory=list)
    #: the protocol each error was reported with
    error_protos: list[FrameProtocol] = field(default_factory=list)
    lost: list[Exception | None] = field(default_factory=list)
    got: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    proto: FrameProtocol | None = None
    #: called with each message after it is recorded
    then: Callable[[FrameProtocol, Message], None] | None = None

    def make(self, timeout: float | None = None) -> FrameProtocol:
        def on_message(proto: FrameProtocol, msg: Message) -> None:
            self.messages.append(msg)
            self.got.set()
            if self.then is not None:
                self.then(proto, msg)

        def on_error(proto: FrameProtocol, exc: RemoteProtocolError) -> None:
            self.errors.append(exc)
            self.error_protos.append(proto)

        def on_lost(proto: FrameProtocol, exc: Exception | None) -> None:
            self.lost.append(exc)
            self.gone.set()

        self.proto = FrameProtocol(Codec(), on_message, on_error, on_lost, timeout=timeout)
        return self.proto


@asynccontextmanager
async def _pair(
    server_timeout: float | None = None,
) -> AsyncIterator[tuple[_End, _End, FrameProtocol, FrameProtocol]]:
    """A connected (server end, client end) over 127.0.0.1, and their protocols."""
    loop = asyncio.get_running_loop()
    server_end, client_end = _End(), _End()
    accepted = asyncio.Event()

    def factory() -> FrameProtocol:
        proto = server_end.make(server_timeout)
        loop.call_soon(accepted.set)
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(client_end.make, "127.0.0.1", port)
    await accepted.wait()
    assert server_end.proto is not None
    try:
        yield server_end, client_end, server_end.proto, client
    finally:
        client.abort()
        server_end.proto.abort()
        server.close()
        await server.wait_closed()


def _frame_size(msg: Message) -> int:
    return sum(len(c) if isinstance(c, bytes) else c.nbytes for c in Codec().send(msg))


async def test_a_fresh_protocol_has_no_transport_and_counts_nothing() -> None:
    proto = _End().make()
    assert proto.transport is None
    assert (proto.sent_bytes, proto.received_bytes) == (0, 0)
    assert proto.sent_at == proto.heard_at
    assert not proto.closed.is_set()
    assert proto.peername is None
    assert proto.remote == "an unknown address"
    assert proto.send(Ping(nonce=1)) == 0  # not connected: nothing written
    await asyncio.wait_for(proto.drain(), 1.0)  # writable from the start
    proto.close()
    proto.abort()  # no transport: both are no-ops


async def test_bytes_are_counted_on_both_sides_and_times_taken() -> None:
    async with _pair() as (server_end, _client_end, server, client):
        assert client.sent_bytes == 0 and server.received_bytes == 0
        before = client.sent_at
        n = client.send(Ping(nonce=7))
        assert n == _frame_size(Ping(nonce=7)) > 0
        assert client.sent_bytes == n
        assert client.sent_at >= before
        heard_before = server.heard_at
        await asyncio.wait_for(server_end.got.wait(), 5.0)
        assert server_end.messages == [Ping(nonce=7)]
        assert server.received_bytes == n
        assert server.heard_at >= heard_before
        m = client.send(Pong(nonce=70_000))
        assert client.sent_bytes == n + m
        server_end.got.clear()
        await asyncio.wait_for(server_end.got.wait(), 5.0)
        deadline = time.monotonic() + 5.0  # the second frame may come in two reads
        while server.received_bytes < n + m and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # (no event marks a partial read: polled, bounded)
        assert server.received_bytes == n + m
        assert server_end.messages == [Ping(nonce=7), Pong(nonce=70_000)]
        data = _data(1)
        k = client.send(data)  # a header and a payload: two writes, both counted
        assert k == _frame_size(data) > data.value.nbytes
        assert client.sent_bytes == n + m + k


async def test_remote_names_the_peer_address() -> None:
    async with _pair() as (_s, _c, server, client):
        host, port = client.transport.get_extra_info("sockname")  # type: ignore[union-attr]
        assert server.peername == (host, port)
        assert server.remote == f"127.0.0.1:{port}"
        assert client.remote == f"127.0.0.1:{server.transport.get_extra_info('sockname')[1]}"  # type: ignore[union-attr]
    proto = _End().make()
    proto.peername = ("::1", 4000, 0, 0)
    assert proto.remote == "[::1]:4000"
    proto.peername = "/tmp/sock"
    assert proto.remote == "/tmp/sock"
    proto.peername = ("h",)
    assert proto.remote == "('h',)"


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options")
async def test_keep_alive_is_set_only_with_a_timeout() -> None:
    async with _pair(server_timeout=9.6) as (_s, _c, server, client):
        sock = server.transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 9600
        plain = client.transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0


async def test_messages_after_the_one_that_closed_the_connection_are_not_handed_on() -> None:
    async with _pair() as (server_end, _c, _server, client):
        server_end.then = lambda proto, msg: proto.close()
        # Both frames in one write: one read hands the codec both.
        frames = b"".join(bytes(c) for m in (Ping(nonce=1), Ping(nonce=2)) for c in Codec().send(m))
        assert client.transport is not None
        client.transport.write(frames)
        await asyncio.wait_for(server_end.gone.wait(), 5.0)
        assert server_end.messages == [Ping(nonce=1)]


async def test_a_protocol_error_is_reported_once_logged_and_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _pair() as (server_end, client_end, server, client):
        assert client.transport is not None
        with caplog.at_level(logging.WARNING, logger="peerlearn.transport.protocol"):
            client.transport.write(b"\x00" * 64)  # no frame prefix
            await asyncio.wait_for(server_end.gone.wait(), 5.0)
            await asyncio.wait_for(client_end.gone.wait(), 5.0)
        assert len(server_end.errors) == 1
        assert server_end.error_protos == [server]
        assert server_end.messages == []
        port = client.transport.get_extra_info("sockname")[1]
        lines = [r.getMessage() for r in caplog.records]
        reason = server_end.errors[0].reason
        assert lines == [
            f"closing connection from 127.0.0.1:{port}: {server_end.errors[0]} ({reason})"
        ]
        assert server_end.lost == [None]


async def test_end_of_stream_mid_frame_is_an_error_and_at_a_boundary_is_not() -> None:
    async with _pair() as (server_end, _c, _server, client):
        assert client.transport is not None
        whole = b"".join(bytes(c) for c in Codec().send(Ping(nonce=3)))
        client.transport.write(whole + whole[:5])
        client.transport.write_eof()
        await asyncio.wait_for(server_end.gone.wait(), 5.0)
        assert server_end.messages == [Ping(nonce=3)]
        assert len(server_end.errors) == 1
    async with _pair() as (server_end, client_end, _server, client):
        assert client.transport is not None
        client.transport.write(whole)
        client.transport.write_eof()
        # The server closes its side too (eof_received returns False): the client sees it.
        await asyncio.wait_for(client_end.gone.wait(), 5.0)
        await asyncio.wait_for(server_end.gone.wait(), 5.0)
        assert server_end.messages == [Ping(nonce=3)]
        assert server_end.errors == []


async def test_connection_lost_is_reported_once_and_wakes_a_writer() -> None:
    async with _pair() as (server_end, client_end, _server, client):
        client.pause_writing()
        drain = asyncio.ensure_future(client.drain())
        await asyncio.sleep(0)
        assert not drain.done()
        client.close()
        await asyncio.wait_for(client_end.gone.wait(), 5.0)
        await asyncio.wait_for(drain, 1.0)
        assert client.closed.is_set()
        assert client_end.lost == [None]
        client.connection_lost(None)  # a second report changes nothing
        assert client_end.lost == [None]
        assert client.send(Ping(nonce=1)) == 0  # closing: nothing written
        await asyncio.wait_for(server_end.gone.wait(), 5.0)


async def test_resume_writing_ends_a_drain() -> None:
    async with _pair() as (_s, _c, _server, client):
        client.pause_writing()
        drain = asyncio.ensure_future(client.drain())
        await asyncio.sleep(0)
        assert not drain.done()
        client.resume_writing()
        await asyncio.wait_for(drain, 1.0)


async def test_abort_drops_the_connection() -> None:
    async with _pair() as (server_end, client_end, _server, client):
        client.abort()
        await asyncio.wait_for(client_end.gone.wait(), 5.0)
        await asyncio.wait_for(server_end.gone.wait(), 5.0)
        assert client.transport is not None and client.transport.is_closing()


# --- the acceptor's side: a Transport and a hand-driven dialer ---------------------------------

#: cluster 0 hosts processes 0 and 3, cluster 1 hosts 1 and 4, cluster 2 hosts 2 and 5
MEMBERS = Membership(processes=6, clusters=3)
DIM = 3
FINGERPRINT = "fp-transport-mutants"
JOIN = Join(workers=(0, 3), dim=DIM, dtype="float64", fingerprint=FINGERPRINT)


def _hello(cluster: int, incarnation: int = 1, name: str = "d1", **kw: Any) -> Hello:
    versions: dict[str, Any] = {
        "min_version": MIN_PROTOCOL_VERSION,
        "max_version": PROTOCOL_VERSION,
    }
    versions.update(kw)
    return Hello(cluster=cluster, incarnation=incarnation, nonce=5, name=name, **versions)


def _join(cluster: int = 1, **kw: Any) -> Join:
    fields: dict[str, Any] = {
        "workers": MEMBERS.members[cluster],
        "dim": DIM,
        "dtype": "float64",
        "fingerprint": FINGERPRINT,
    }
    fields.update(kw)
    return Join(**fields)


def _data(seq: int, value: Any = None, **kw: Any) -> Data:
    fields: dict[str, Any] = {"tag": ("params", seq), "sender": 1, "step": seq, "to": ()}
    fields.update(kw)
    arr = np.full(DIM, float(seq)) if value is None else np.asarray(value, dtype=np.float64)
    return Data(seq=seq, value=arr, **fields)


@dataclass
class _Dialer:
    """A connection to the transport, driven message by message."""

    end: _End
    proto: FrameProtocol
    taken: int = 0

    async def answer(self) -> Message:
        """The next message the transport sent on this connection."""
        while len(self.end.messages) <= self.taken:
            self.end.got.clear()
            if len(self.end.messages) > self.taken:
                break
            got = asyncio.ensure_future(self.end.got.wait())
            gone = asyncio.ensure_future(self.end.gone.wait())
            await asyncio.wait({got, gone}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
            got.cancel()
            gone.cancel()
            if len(self.end.messages) <= self.taken:
                raise AssertionError(f"no answer; connection lost: {self.end.gone.is_set()}")
        self.taken += 1
        return self.end.messages[self.taken - 1]

    async def ask(self, msg: Message) -> Message:
        self.proto.send(msg)
        return await self.answer()

    async def closed(self) -> None:
        await asyncio.wait_for(self.end.gone.wait(), 5.0)

    async def joined(self, cluster: int = 1, incarnation: int = 1) -> Message:
        welcome = await self.ask(_hello(cluster, incarnation))
        assert isinstance(welcome, Welcome)
        return await self.ask(_join(cluster))


@dataclass
class _Acceptor:
    transport: Transport
    delivered: list[Data]
    notes: list[tuple[int, Catchup]]
    arrived: asyncio.Event

    async def dial(self) -> _Dialer:
        end = _End()
        loop = asyncio.get_running_loop()
        assert self.transport.port is not None
        _, proto = await loop.create_connection(end.make, "127.0.0.1", self.transport.port)
        return _Dialer(end, proto)

    async def delivered_n(self, n: int) -> None:
        while len(self.delivered) < n:
            self.arrived.clear()
            if len(self.delivered) >= n:
                break
            await asyncio.wait_for(self.arrived.wait(), 5.0)


@asynccontextmanager
async def _acceptor(
    peers: list[PeerAddress] | None = None,
    cluster: int = 0,
    beyond: Callable[[Data], Beyond] | None = None,
    ahead: Callable[[int, int], None] | None = None,
    **settings: Any,
) -> AsyncIterator[_Acceptor]:
    delivered: list[Data] = []
    notes: list[tuple[int, Catchup]] = []
    arrived = asyncio.Event()

    def deliver(data: Data) -> None:
        delivered.append(data)
        arrived.set()

    hello = _hello(cluster, incarnation=7, name=f"d{cluster}")
    transport = Transport(
        hello,
        JOIN if cluster == 0 else _join(cluster),
        MEMBERS,
        ("127.0.0.1", 0),
        peers or [],
        deliver,
        LinkSettings(**settings),
        catchup=lambda cluster, note: notes.append((cluster, note)),
        beyond=beyond,
        ahead=ahead,
    )
    async with asyncio.TaskGroup() as tasks:
        await transport.start(tasks)
        try:
            yield _Acceptor(transport, delivered, notes, arrived)
        finally:
            await transport.close()


async def test_the_handshake_answers_welcome_then_ack_of_nothing_delivered() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        welcome = await d.ask(_hello(1, incarnation=3))
        assert isinstance(welcome, Welcome)
        assert (welcome.version, welcome.cluster, welcome.incarnation) == (
            PROTOCOL_VERSION,
            0,
            7,
        )
        assert 0 <= welcome.nonce < 2**63
        assert acc.transport.connected_clusters() == set()
        assert await d.ask(_join()) == Ack(seq=0)
        assert acc.transport.connected_clusters() == {1}
        assert acc.transport.connected() == 0  # no out-links here
        assert acc.transport.stats.protocol_errors == {}


async def test_the_last_cluster_is_a_peer_and_one_past_it_is_not() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        assert await d.joined(cluster=2) == Ack(seq=0)
        for cluster in (3, 0):  # past the membership; this daemon itself
            d = await acc.dial()
            assert await d.ask(_hello(cluster)) == Refuse(reason="membership_mismatch")
            await d.closed()
        assert acc.transport.stats.protocol_errors == {"membership_mismatch": 2}


@pytest.mark.parametrize(
    ("first", "msg", "reason"),
    [
        (None, Ping(nonce=1), "bad_handshake"),
        (
            None,
            _hello(1, min_version=PROTOCOL_VERSION + 1, max_version=PROTOCOL_VERSION + 2),
            "unsupported_version",
        ),
        (_hello(1), Ping(nonce=1), "bad_handshake"),
        (_hello(1), _join(dim=DIM + 1), "dim_mismatch"),
        (_hello(1), _join(dtype="float32"), "dtype_mismatch"),
        (_hello(1), _join(fingerprint="other"), "fingerprint_mismatch"),
        (_hello(1), _join(workers=(1,)), "membership_mismatch"),
        (_hello(1), _join(workers=(3, 1)), "membership_mismatch"),
    ],
    ids=["not-hello", "version", "not-join", "dim", "dtype", "fingerprint", "fewer", "order"],
)
async def test_a_handshake_that_fails_is_refused_with_its_reason_counted_and_closed(
    first: Message | None, msg: Message, reason: str
) -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        if first is not None:
            assert isinstance(await d.ask(first), Welcome)
        assert await d.ask(msg) == Refuse(reason=reason)
        await d.closed()
        assert acc.transport.stats.protocol_errors == {reason: 1}
        assert acc.transport.connected_clusters() == set()


async def test_refusals_are_logged_once_then_throttled_per_host_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _acceptor() as acc:
        with caplog.at_level(logging.ERROR, logger="peerlearn.transport.peers"):
            for _ in range(3):
                d = await acc.dial()
                assert await d.ask(_hello(0)) == Refuse(reason="membership_mismatch")
                await d.closed()
            d = await acc.dial()
            assert await d.ask(Ping(nonce=1)) == Refuse(reason="bad_handshake")
            await d.closed()
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2, lines
        assert lines[0].startswith("refusing daemon 'd1' (cluster 0) at 127.0.0.1:")
        assert lines[0].endswith(": cluster 0 is not a peer of cluster 0")
        assert lines[1].startswith("refusing 127.0.0.1 at 127.0.0.1:")
        assert lines[1].endswith(": expected hello, got ping")
        assert acc.transport.stats.protocol_errors == {"membership_mismatch": 3, "bad_handshake": 1}


async def test_an_older_incarnation_is_refused_and_an_equal_one_resumes_alone() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        assert await d.joined(incarnation=5) == Ack(seq=0)
        d.proto.send(_data(1))
        d.proto.send(_data(2))
        await acc.delivered_n(2)
        old = await acc.dial()
        assert await old.ask(_hello(1, incarnation=4)) == Refuse(reason="stale_incarnation")
        await old.closed()
        # One connection per member: the same start again, while the first is alive, is
        # refused — nobody but the sender of that link moves its sequence numbers.
        busy = await acc.dial()
        assert await busy.joined(incarnation=5) == Refuse(reason="already_connected")
        await busy.closed()
        assert not d.end.gone.is_set()
        # Once the first is gone (a reconnect), the same start resumes: what was delivered
        # stays. Asked again until the acceptor has seen it close, as a dialer's link does.
        d.proto.close()
        await d.closed()
        for _ in range(100):
            same = await acc.dial()
            answer = await same.joined(incarnation=5)
            if answer != Refuse(reason="already_connected"):
                break
        assert answer == Ack(seq=2)
        newer = await acc.dial()
        assert await newer.joined(incarnation=6) == Ack(seq=0)  # numbered anew
        await same.closed()  # the old incarnation's connections are closed
        errors = acc.transport.stats.protocol_errors
        assert errors["stale_incarnation"] == 1 and errors["already_connected"] >= 1


async def test_a_newer_incarnation_closes_one_that_only_said_hello() -> None:
    async with _acceptor() as acc:
        slow = await acc.dial()
        assert isinstance(await slow.ask(_hello(1, incarnation=2)), Welcome)
        other = await acc.dial()
        assert isinstance(await other.ask(_hello(2, incarnation=2)), Welcome)
        fast = await acc.dial()
        assert await fast.joined(incarnation=3) == Ack(seq=0)
        await slow.closed()
        assert await other.ask(_join(cluster=2)) == Ack(seq=0)  # another cluster's stays


async def test_frames_are_delivered_in_order_acked_and_counted() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        d.proto.send(_data(1))
        await acc.delivered_n(1)
        assert await d.answer() == Ack(seq=1)
        d.proto.send(_data(2, tag=("grad", 2), sender=4, to=(0,), post=True))
        await acc.delivered_n(2)
        assert await d.answer() == Ack(seq=2)
        assert [x.seq for x in acc.delivered] == [1, 2]
        assert acc.delivered[1].tag == ("grad", 2) and acc.delivered[1].post
        stats = acc.transport.stats
        size = _frame_size(_data(1))
        assert stats.messages == {("in", "params", "1"): 1, ("in", "grad", "1"): 1}
        assert stats.bytes[("in", "params", "1")] == size
        assert stats.dropped == {}


async def test_a_duplicate_is_dropped_counted_and_acked() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        d.proto.send(_data(1))
        await acc.delivered_n(1)
        assert await d.answer() == Ack(seq=1)
        d.proto.send(_data(1))  # resent after a reconnect, say
        assert await d.answer() == Ack(seq=1)
        assert acc.transport.stats.dropped == {"duplicate": 1}
        assert len(acc.delivered) == 1
        d.proto.send(_data(2))
        await acc.delivered_n(2)


async def test_a_gap_in_the_sequence_closes_the_link(caplog: pytest.LogCaptureFixture) -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        with caplog.at_level(logging.ERROR, logger="peerlearn.transport.peers"):
            d.proto.send(_data(2))
            await d.closed()
        assert acc.delivered == []
        assert acc.transport.stats.protocol_errors == {"sequence_gap": 1}
        assert [r.getMessage() for r in caplog.records] == ["daemon 0: frame 2 after 0 from 1"]


async def test_a_non_finite_frame_is_acked_dropped_and_logged_once_per_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        with caplog.at_level(logging.WARNING, logger="peerlearn.transport.peers"):
            d.proto.send(_data(1, value=[0.0, np.nan, 1.0]))
            assert await d.answer() == Ack(seq=1)
            d.proto.send(_data(2, value=[np.inf, 0.0, 1.0]))
            assert await d.answer() == Ack(seq=2)
            d.proto.send(_data(3))
            await acc.delivered_n(1)
        assert [x.seq for x in acc.delivered] == [3]
        assert acc.transport.stats.dropped == {"non_finite": 2}
        lines = [r.getMessage() for r in caplog.records]
        assert lines == [
            "dropping a message with non-finite values from daemon 1 (process 1.0, tag "
            "params 1); further ones are only counted"
        ]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_data(1, sender=0), "sender 0 is not a process of cluster 1"),
        (_data(1, sender=2), "sender 2 is not a process of cluster 1"),
        (
            _data(1, value=[1.0, 2.0]),
            "value of shape (2,) and dtype float64, expected (3,) float64",
        ),
        (
            Data(seq=1, tag=("params", 1), sender=1, step=1, value=np.zeros(DIM, np.float32)),
            "value of shape (3,) and dtype float32, expected (3,) float64",
        ),
        (_data(1, to=(0, 1)), "recipients (0, 1) are not all processes of this daemon"),
        (_data(1, to=(2,)), "recipients (2,) are not all processes of this daemon"),
        (_data(1, tag=("params",)), "tag ('params',) is not (kind, iteration, …)"),
        (_data(1, tag=(1, 1)), "tag (1, 1) is not (kind, iteration, …)"),
        (_data(1, tag=("params", "x")), "tag ('params', 'x') is not (kind, iteration, …)"),
    ],
    ids=["sender", "sender-other", "shape", "dtype", "to", "to-other", "short", "kind", "iter"],
)
async def test_a_frame_not_of_this_run_closes_the_link(
    data: Data, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        with caplog.at_level(logging.ERROR, logger="peerlearn.transport.peers"):
            d.proto.send(data)
            await d.closed()
        assert acc.delivered == []
        assert acc.transport.stats.protocol_errors == {"bad_data": 1}
        assert [r.getMessage() for r in caplog.records] == [
            f"daemon 0: closing link from 1: {problem}"
        ]


async def test_frames_for_this_daemons_processes_pass() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        d.proto.send(_data(1, to=(0, 3), sender=4, tag=("params", 1, "x")))
        await acc.delivered_n(1)
        assert acc.delivered[0].to == (0, 3)


async def test_a_ping_is_answered_with_its_nonce() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        assert await d.ask(Ping(nonce=12345)) == Pong(nonce=12345)


async def test_anything_else_after_the_join_is_unexpected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        with caplog.at_level(logging.WARNING, logger="peerlearn.transport.peers"):
            d.proto.send(Ack(seq=1))
            await d.closed()
        assert acc.transport.stats.protocol_errors == {"unexpected_message": 1}
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) == 1 and msgs[0].startswith("daemon 0: unexpected ack from 127.0.0.1:")


async def test_bye_closes_the_connection() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        d.proto.send(Bye(reason="shutdown"))
        await d.closed()
        assert acc.transport.stats.protocol_errors == {}


async def test_catch_up_notes_go_to_the_callback_with_the_peers_cluster() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined(cluster=2)
        d.proto.send(Missed(4).control())
        d.proto.send(StateRequest(True).control())
        d.proto.send(Ping(nonce=1))
        assert await d.answer() == Pong(nonce=1)  # in order: the notes came before
        assert acc.notes == [(2, Missed(4)), (2, StateRequest(True))]


async def test_a_bad_control_is_counted_and_logged_throttled_and_the_link_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        with caplog.at_level(logging.WARNING, logger="peerlearn.transport.peers"):
            for _ in range(3):
                d.proto.send(Control(name="hurry", body={}))
            assert await d.ask(Ping(nonce=2)) == Pong(nonce=2)
        assert acc.notes == []
        assert acc.transport.stats.protocol_errors == {"bad_control": 3}
        assert [r.getMessage() for r in caplog.records] == [
            "daemon 0: ignoring a control message from 1: unknown control message 'hurry' "
            "(1 so far)"
        ]


async def test_a_connection_of_an_old_incarnation_is_ignored_until_closed() -> None:
    async with _acceptor() as acc:
        old = await acc.dial()
        await old.joined(incarnation=1)
        new = await acc.dial()
        assert isinstance(await new.ask(_hello(1, incarnation=2)), Welcome)
        # The Hello alone changes nothing: the old connection still delivers.
        old.proto.send(_data(1))
        await acc.delivered_n(1)
        assert await old.answer() == Ack(seq=1)
        assert await new.ask(_join()) == Ack(seq=0)
        await old.closed()


async def test_send_to_a_cluster_without_a_link_is_counted_and_lookups_say_none() -> None:
    async with _acceptor() as acc:
        t = acc.transport
        t.send(1, ("params", 1), 0, 1, np.zeros(DIM), (1,), False)
        assert t.stats.dropped == {"no_link": 1}
        assert t.lost_upto(1) is None
        assert t.send_state(1, ("state", 1), 0, 1, np.zeros(DIM)) is False
        t.request_state(1, True)  # nothing to ask it on: no error
        assert repr(t) == f"Transport(cluster=0, port={t.port}, peers=0)"
        assert str(t) == "daemon 0"


# --- the dialer's side: one OutLink, driven by hand --------------------------------------------


def _link(loop: asyncio.AbstractEventLoop, **settings: Any) -> OutLink:
    return OutLink(
        1,
        "peer.example",
        4001,
        _hello(0, incarnation=7, name="d0"),
        JOIN,
        LinkSettings(**settings),
        TransportStats(),
        loop,
    )


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    new = asyncio.new_event_loop()
    yield new
    new.close()


def test_a_refusal_is_worded_from_this_side(loop: asyncio.AbstractEventLoop) -> None:
    link = _link(loop)
    fp = FINGERPRINT
    assert link._refusal(Reason.FINGERPRINT_MISMATCH) == (
        "its run settings differ from this daemon's (algorithm, problem, seed, steps, lr, … or "
        f"the daemon list): start every daemon with the same run. This daemon's run fingerprint "
        f"is {fp}; each daemon shows its own as the fingerprint label of peerlearn_config_info"
    )
    assert link._refusal(Reason.DIM_MISMATCH) == (
        "its model dimension differs from this daemon's (3)"
    )
    assert link._refusal(Reason.DTYPE_MISMATCH) == (
        "its model dtype differs from this daemon's (float64)"
    )
    assert link._refusal(Reason.UNSUPPORTED_VERSION) == (
        "it speaks none of this daemon's protocol versions "
        f"({MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION})"
    )
    assert link._refusal(Reason.STALE_INCARNATION) == (
        "it has seen a later start of cluster 0 than this one: is another daemon running as "
        "this cluster, or did this host's clock go back?"
    )
    assert link._refusal("membership_mismatch") == (
        "its daemon list differs from this daemon's (this daemon is cluster 0 with processes "
        "[0, 3])"
    )
    assert link._refusal("bad_handshake") == "it did not understand this daemon's handshake"
    assert link._refusal("x" * 300) == repr("x" * 200)
    assert link._refusal("\nforged line") == "'\\nforged line'"


def test_connect_and_resolve_errors_are_worded(loop: asyncio.AbstractEventLoop) -> None:
    link = _link(loop, connect_timeout=2.5, resolve_timeout=0.5)
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert link._connect_error(refused) == "cannot connect: connection refused"
    assert link._connect_error(TimeoutError()) == "no connection within 2.5s"
    assert link._connect_error(OSError("No address for x")) == "cannot connect: no address for x"
    assert link._connect_error(OSError(-3, "Weird")) == "cannot connect: [Errno -3] Weird"
    eperm = OSError(errno.EPERM, "ignored: the errno's own text is used")
    assert link._connect_error(eperm) == "cannot connect: operation not permitted"
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert link._resolve_error(gai) == (
        "cannot resolve host 'peer.example': Name or service not known"
    )
    assert link._resolve_error(TimeoutError()) == (
        "cannot resolve host 'peer.example': no answer from the resolver within 0.5s"
    )
    assert link._resolve_error(OSError("boom")) == "cannot resolve host 'peer.example': boom"


def test_a_failed_attempt_is_recorded_and_logged_once_then_at_doubling_intervals(
    loop: asyncio.AbstractEventLoop,
    caplog: pytest.LogCaptureFixture,
    clock: Callable[[float], None],
) -> None:
    link = _link(loop)
    with caplog.at_level(logging.INFO, logger="peerlearn.transport.links"):
        link._failed("cannot connect: x", logging.INFO)
        link._failed("cannot connect: x", logging.INFO)
        clock(10.0)
        link._failed("cannot connect: x", logging.INFO)  # not repeated
        link._failed("refused", logging.ERROR, repeat=True)
        clock(10.0)
        link._failed("refused", logging.ERROR, repeat=True)
    assert link.last_error == "refused"
    assert link.failed_attempts == 5
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "1@peer.example:4001: cannot connect: x"),
        (logging.ERROR, "1@peer.example:4001: refused"),
        (logging.ERROR, "1@peer.example:4001: refused (still, 2 attempts so far)"),
    ]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """links' clock, moved by hand (only for tests that run no event loop)."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # the module links reads it from

    def advance(seconds: float) -> None:
        now[0] += seconds

    return advance


def test_throttle_logs_the_first_the_changed_and_doubling_repeats(
    clock: Callable[[float], None],
) -> None:
    t = Throttle(first=10.0, longest=30.0)
    assert t.due("a") == 1
    assert t.due("a") is None  # 2
    clock(9.999)
    assert t.due("a") is None  # 3
    clock(0.001)
    assert t.due("a") == 4  # exactly `first` later; next in 20
    clock(19.5)
    assert t.due("a") is None  # 5
    clock(0.5)
    assert t.due("a") == 6  # next in min(40, 30) = 30
    clock(29.0)
    assert t.due("a") is None  # 7
    clock(1.0)
    assert t.due("a") == 8  # and again 30 later: capped
    clock(30.0)
    assert t.due("a") == 9
    assert t.due("b") == 1  # another text: logged, counted anew
    clock(100.0)
    assert t.due("b", repeat=False) is None
    t.reset()
    assert t.due("b") == 1


def test_throttle_defaults_are_ten_seconds_doubling_to_ten_minutes(
    clock: Callable[[float], None],
) -> None:
    t = Throttle()
    assert t.due("a") == 1
    clock(9.9)
    assert t.due("a") is None
    clock(0.1)
    assert t.due("a") == 3
    for _ in range(5):  # 20, 40, 80, 160, 320
        clock(320.0)
        t.due("a")
    clock(599.0)
    assert t.due("a") is None
    clock(1.0)
    assert t.due("a") is not None


def test_offer_nowait_goes_beyond_a_full_window_and_gives_the_slot_back_first(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop, max_queue=2)
    v = np.zeros(DIM)
    assert all(link.offer_nowait(("state", 1), 0, 1, v) for _ in range(4))
    assert link._overdraft == 2
    link._queue.pop()  # as if the fourth had been acked: its overdraft is settled
    link._free_slot()
    assert link.outstanding == 3
    assert [f.seq for f in link._queue] == [1, 2, 3]
    assert link._overdraft == 1
    assert not link._room.acquire(blocking=False)  # the window is full
    link._unacked.extend(link._queue)
    link._queue.clear()
    link._on_message(None, Ack(seq=1))  # type: ignore[arg-type]
    assert link._overdraft == 0 and link.outstanding == 2
    assert not link._room.acquire(blocking=False)  # the overdraft went first
    link._on_message(None, Ack(seq=3))  # type: ignore[arg-type]
    assert link.outstanding == 0
    assert link._room.acquire(blocking=False) and link._room.acquire(blocking=False)
    assert not link._room.acquire(blocking=False)
    link._closing = True
    assert link.offer_nowait(("state", 1), 0, 1, v) is False
    assert link._stats.dropped == {"link_closed": 1}


def test_offer_nowait_numbers_frames_and_keeps_their_fields(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop)
    v = np.arange(DIM, dtype=np.float64)
    link.offer_nowait(("state", 4), 3, 9, v, (1,))
    link.offer_nowait(("state", 2), 0, 5, v)
    a, b = link._queue
    assert (a.seq, a.tag, a.sender, a.step, a.to, a.post) == (1, ("state", 4), 3, 9, (1,), False)
    assert (b.seq, b.to) == (2, ())
    assert link._sent_upto == 9
    assert link._wakeup.is_set()


def test_a_frame_over_max_payload_is_dropped_unnumbered(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    link = _link(loop, max_payload=DIM * 8, max_queue=1)
    with caplog.at_level(logging.ERROR, logger="peerlearn.transport.links"):
        assert link.offer_nowait(("params", 1), 0, 1, np.zeros(DIM + 1))  # taken, then dropped
    assert link.outstanding == 0
    assert link._stats.dropped == {"unsendable": 1}
    assert link._room.acquire(blocking=False)  # its slot is free again
    assert [r.getMessage() for r in caplog.records] == [
        "1@peer.example:4001: cannot send params 1: 32 bytes > max_payload 24"
    ]
    link.offer_nowait(("params", 2), 0, 2, np.zeros(DIM))  # exactly max_payload
    assert [f.seq for f in link._queue] == [1]


def test_lose_remembers_the_highest_iteration(loop: asyncio.AbstractEventLoop) -> None:
    link = _link(loop)
    assert link.lost_upto is None
    link.lose(0)
    assert link.lost_upto == 0
    assert link._wakeup.is_set()
    link._wakeup.clear()
    link.lose(5)
    link.lose(3)
    assert link.lost_upto == 5
    link._wakeup.clear()
    link.lose(5)
    assert not link._wakeup.is_set()  # nothing new to tell


def test_a_restarted_peer_drops_what_was_outstanding_and_numbers_anew(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    link = _link(loop, max_queue=4)
    for step in (1, 2, 3):
        assert link._room.acquire(blocking=False)
        link._enqueue(("params", step), 0, step, np.zeros(DIM), (), False)
    link._unacked.append(link._queue.popleft())
    with caplog.at_level(logging.INFO, logger="peerlearn.transport.links"):
        link.peer_restarted(2)  # first seen: nothing to drop
        assert link.outstanding == 3 and link.peer_incarnation == 2
        link.peer_restarted(2)  # the same: nothing
        link.peer_restarted(1)  # older: nothing
        assert link.outstanding == 3 and link.peer_incarnation == 2
        link.peer_restarted(3)
    assert link.outstanding == 0
    assert link.peer_incarnation == 3
    assert link._seq == 0
    assert link.lost_upto == 3
    assert link._stats.dropped == {"peer_restarted": 3}
    assert sum(link._room.acquire(blocking=False) for _ in range(5)) == 4
    assert [r.getMessage() for r in caplog.records] == [
        "1@peer.example:4001 restarted (new incarnation): 3 frames for its last incarnation dropped"
    ]
    link._enqueue(("params", 4), 0, 4, np.zeros(DIM), (), False)
    assert link._queue[0].seq == 1


def test_a_peer_restarted_with_nothing_outstanding_still_learns_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop)
    link.peer_incarnation = 1
    link._peer_restarted()
    assert link.lost_upto == 0
    assert link._stats.dropped == {}


def test_welcome_problems(loop: asyncio.AbstractEventLoop) -> None:
    link = _link(loop)

    def welcome(version: int = PROTOCOL_VERSION, cluster: int = 1, inc: int = 4) -> Welcome:
        return Welcome(version=version, cluster=cluster, incarnation=inc, nonce=1)

    assert link._welcome_problem(welcome()) is None
    assert link._welcome_problem(welcome(version=MIN_PROTOCOL_VERSION)) is None
    for bad in (MIN_PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1):
        assert link._welcome_problem(welcome(version=bad)) == (
            f"answered with protocol version {bad}, which this daemon does not speak "
            f"({MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION})"
        )
    assert link._welcome_problem(welcome(cluster=2)) == (
        "the daemon at peer.example:4001 is cluster 2, not 1: the daemon lists disagree"
    )
    link.peer_incarnation = 4
    assert link._welcome_problem(welcome(inc=4)) is None
    assert link._welcome_problem(welcome(inc=3)) == (
        "answered as incarnation 3, older than 4 seen before: is a stale daemon still running "
        "there?"
    )


class _Away:
    """Makes ``link`` away (gone longer than peer_timeout)."""

    @staticmethod
    def set(link: OutLink) -> None:
        link.state = LinkState.RECONNECTING
        link.disconnected_since = time.monotonic() - link._settings.peer_timeout - 1.0


def test_a_dropping_producer_is_not_held_by_an_away_peer(loop: asyncio.AbstractEventLoop) -> None:
    link = _link(loop, max_queue=1, queue_timeout=30.0)
    assert link._room.acquire(blocking=False)
    _Away.set(link)
    assert link.offer(("params", 3), 0, 3, np.zeros(DIM)) is False
    assert link._stats.dropped == {"peer_away": 1}
    assert link._stats.queue_waits == 1
    assert link.lost_upto == 3
    assert link.senders_waiting == {}


def test_a_producer_waits_at_most_queue_timeout_then_drops(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    link = _link(loop, max_queue=1, queue_timeout=0.2, peer_timeout=60.0)
    link.state = LinkState.CONNECTED
    assert link._room.acquire(blocking=False)
    with caplog.at_level(logging.WARNING, logger="peerlearn.transport.links"):
        start = time.monotonic()
        assert link.offer(("params", 2), 0, 2, np.zeros(DIM)) is False
        waited = time.monotonic() - start
        assert link.offer(("params", 3), 0, 3, np.zeros(DIM)) is False
    assert 0.2 <= waited < 5.0
    assert link._stats.dropped == {"queue_full": 2}
    assert link._stats.queue_waits == 2
    assert link.lost_upto == 3
    assert [r.getMessage() for r in caplog.records] == [
        "1@peer.example:4001: queue full for 0.2s, frame params 2 dropped (1 so far; counted "
        "in peerlearn_messages_dropped_total)"
    ]


def test_a_waiting_producer_takes_a_slot_freed_meanwhile_and_is_shown_waiting(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # queue_timeout bounds only frames that may drop: kept ones wait past it
    link = _link(loop, max_queue=1, queue_timeout=0.05, keep=True, peer_timeout=0.2)
    assert link._room.acquire(blocking=False)
    _Away.set(link)  # kept frames wait however long the peer is away
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(link._wait_for_room(("p", 1), 1)))
    worker.start()
    deadline = time.monotonic() + 5.0
    while not link.senders_waiting and time.monotonic() < deadline:
        time.sleep(0.001)
    assert worker.ident is not None
    assert list(link.senders_waiting) == [worker.ident]
    assert 0.0 < link.senders_waiting[worker.ident] <= time.monotonic()  # since when
    time.sleep(0.15)  # past a slice (peer_timeout / 4 = 0.05 s): still waiting
    assert worker.is_alive()
    link._room.release()
    worker.join(5.0)
    assert result == [True]
    assert link.senders_waiting == {}
    assert link._stats.dropped == {}
    assert link.lost_upto is None


def test_release_producers_wakes_a_waiting_producer_which_drops(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop, max_queue=1, keep=True)
    assert link._room.acquire(blocking=False)
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(link._wait_for_room(("p", 1), 1)))
    worker.start()
    deadline = time.monotonic() + 5.0
    while not link.senders_waiting and time.monotonic() < deadline:
        time.sleep(0.001)
    link.release_producers()
    worker.join(5.0)
    assert result == [False]
    assert link._stats.dropped == {"queue_full": 1}
    assert link.lost_upto == 1


# --- the transport's own bookkeeping, without the network ---------------------------------------


def _transport(clusters: tuple[int, ...] = (1, 2)) -> Transport:
    """A transport of cluster 0 with links to ``clusters``, built but not started (so its
    links never dial): what its methods queue stays in the links' queues."""
    return Transport(
        _hello(0, incarnation=7, name="d0"),
        JOIN,
        MEMBERS,
        ("127.0.0.1", 0),
        [PeerAddress(c, "127.0.0.1", 9) for c in clusters],
        lambda data: None,
        LinkSettings(),
    )


async def _settle() -> None:
    """Let the callbacks that offer() scheduled on the loop run."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_send_queues_one_frame_on_that_clusters_link_only() -> None:
    t = _transport()
    v = np.zeros(DIM)
    t.send(2, ("grad", 3), 0, 3, v, (2, 5), True)
    await _settle()
    one, two = t.links
    assert one.outstanding == 0
    (frame,) = two._queue
    assert (frame.seq, frame.tag, frame.sender, frame.step, frame.to, frame.post) == (
        1,
        ("grad", 3),
        0,
        3,
        (2, 5),
        True,
    )
    t.broadcast(("params", 4), 3, 4, v)
    await _settle()
    assert [(f.tag, f.to, f.post) for f in one._queue] == [(("params", 4), (), False)]
    assert [f.tag for f in two._queue] == [("grad", 3), ("params", 4)]
    assert t.stats.dropped == {}


async def test_state_requests_state_frames_and_losses_go_to_the_right_links() -> None:
    t = _transport()
    one, two = t.links
    t.request_state(2, True)
    t.request_state(1, False)
    assert [dict(c.body) for c in two._controls] == [{"restart": True}]
    assert [(c.name, dict(c.body)) for c in one._controls] == [
        ("state_request", {"restart": False})
    ]
    assert t.send_state(2, ("state", 5), 0, 5, np.zeros(DIM)) is True
    assert [(f.tag, f.step) for f in two._queue] == [(("state", 5), 5)]
    assert one.outstanding == 0
    assert (t.lost_upto(1), t.lost_upto(2)) == (None, None)
    t.lose_all(6)
    assert (t.lost_upto(1), t.lost_upto(2)) == (6, 6)
    two.lose(9)
    assert (t.lost_upto(1), t.lost_upto(2)) == (6, 9)
    two._closing = True
    assert t.send_state(2, ("state", 6), 0, 6, np.zeros(DIM)) is False


async def test_connected_counts_connected_links_and_joined_inbound_peers() -> None:
    t = _transport()
    one, two = t.links
    assert t.connected() == 0 and t.connected_clusters() == set()
    two.state = LinkState.CONNECTED
    one.state = LinkState.DRAINING
    assert t.connected() == 1
    assert t.connected_clusters() == {2}
    t.links.append(_link(asyncio.get_running_loop()))
    t.links[-1].state = LinkState.CONNECTED
    assert t.connected() == 2


async def test_release_producers_releases_every_link() -> None:
    t = _transport()
    t.release_producers()
    assert all(link._releasing for link in t.links)


async def test_bye_on_an_inbound_connection_tells_this_daemons_link_the_peer_stopped() -> None:
    # The link to cluster 1 points at a port nobody listens on: it never connects.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        async with _acceptor([PeerAddress(1, "127.0.0.1", port)], drain_timeout=0.1) as acc:
            link = acc.transport.links[0]
            d = await acc.dial()
            await d.joined(incarnation=2)
            assert link.peer_incarnation == 2  # the dialer's Join told the link
            assert not link._peer_left
            d.proto.send(Bye(reason="shutdown"))
            await d.closed()
            assert link._peer_left
            assert acc.transport.connected_clusters() == set()


class _FakeProto:
    """What ``Transport._refuse`` uses of a connection."""

    def __init__(self, host: str) -> None:
        self.peername = (host, 5000)
        self.remote = f"{host}:5000"
        self.sent: list[Message] = []
        self.closed = False

    def send(self, msg: Message) -> int:
        self.sent.append(msg)
        return 1

    def close(self) -> None:
        self.closed = True


def test_refusals_are_throttled_per_host_and_at_most_256_hosts_are_remembered(
    loop: asyncio.AbstractEventLoop,
    caplog: pytest.LogCaptureFixture,
    clock: Callable[[float], None],
) -> None:
    async def build() -> Transport:
        return _transport(())

    t = loop.run_until_complete(build())

    def refuse(host: str) -> _FakeProto:
        proto = _FakeProto(host)
        t._refuse(proto, None, "bad_handshake", "expected hello, got ping")  # type: ignore[arg-type]
        return proto

    with caplog.at_level(logging.ERROR, logger="peerlearn.transport.peers"):
        proto = refuse("10.0.0.1")
        assert proto.sent == [Refuse(reason="bad_handshake")] and proto.closed
        refuse("10.0.0.1")
        clock(10.0)
        refuse("10.0.0.1")
        lines = [r.getMessage() for r in caplog.records]
        assert lines == [
            "refusing 10.0.0.1 at 10.0.0.1:5000: expected hello, got ping",
            "refusing 10.0.0.1 at 10.0.0.1:5000: expected hello, got ping (refused 3 times so far)",
        ]
        caplog.clear()
        for i in range(255):  # 256 hosts tracked: the first still is
            refuse(f"10.1.0.{i}")
        assert len(t._refusals) == 256
        caplog.clear()
        refuse("10.0.0.1")
        assert caplog.records == []  # still tracked: throttled, and now the most recent
        refuse("10.2.0.0")  # 257th: the least recently refused (10.1.0.0) is forgotten
        assert len(t._refusals) == 256
        assert ("10.1.0.0", "bad_handshake") not in t._refusals
        assert ("10.0.0.1", "bad_handshake") in t._refusals
        caplog.clear()
        refuse("10.1.0.0")
        assert len(caplog.records) == 1  # forgotten: logged anew
    assert t.stats.protocol_errors == {"bad_handshake": 261}  # 3 + 255 + 3


async def test_the_fault_hook_loses_a_frame_or_takes_it_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _acceptor() as acc:
        seen: list[tuple[int, int]] = []
        actions = {1: FaultAction.DUPLICATE, 2: FaultAction.LOSE}

        def fault(peer: int, data: Data) -> FaultAction:
            seen.append((peer, data.seq))
            return actions.pop(data.seq, FaultAction.DELIVER)

        acc.transport.fault = fault
        d = await acc.dial()
        await d.joined(cluster=2)
        with caplog.at_level(logging.INFO, logger="peerlearn.transport.peers"):
            d.proto.send(_data(1, sender=2))
            await acc.delivered_n(1)
            assert await d.answer() == Ack(seq=1)
            assert acc.transport.stats.dropped == {"duplicate": 1}  # the copy
            assert acc.transport.fault is fault  # restored after the copy
            d.proto.send(_data(2, sender=2))
            await d.closed()  # lost: the connection is aborted
        assert [x.seq for x in acc.delivered] == [1]
        assert seen == [(2, 1), (2, 2)]
        assert [r.getMessage() for r in caplog.records if "fault" in r.getMessage()] == [
            "daemon 0: fault hook: frame 2 from 2 lost"
        ]
        again = await acc.dial()
        assert await again.joined(cluster=2) == Ack(seq=1)  # frame 2 was not acked
        again.proto.send(_data(2, sender=2))
        await acc.delivered_n(2)
        assert seen[-1] == (2, 2)


async def test_a_duplicated_frame_that_closes_the_link_stops_there() -> None:
    async with _acceptor() as acc:
        acc.transport.fault = lambda peer, data: FaultAction.DUPLICATE
        d = await acc.dial()
        await d.joined()
        d.proto.send(_data(2))  # a gap: the original closes the link, the copy is not taken
        await d.closed()
        assert acc.transport.stats.protocol_errors == {"sequence_gap": 1}
        assert acc.transport.stats.dropped == {}


def test_a_refusal_on_a_connection_without_an_ip_address_is_keyed_by_its_name(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    async def build() -> Transport:
        return _transport(())

    t = loop.run_until_complete(build())
    proto = _FakeProto("x")
    proto.peername = "/run/peerlearn.sock"  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="peerlearn.transport.peers"):
        t._refuse(proto, None, "bad_handshake", "expected hello, got ping")  # type: ignore[arg-type]
    assert list(t._refusals) == [("/run/peerlearn.sock", "bad_handshake")]
    assert caplog.records[0].getMessage().startswith("refusing /run/peerlearn.sock at x:5000: ")


def test_the_out_links_receive_side_takes_no_data_frame() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        _tiny_only(F64, (3,))
    assert info.value.reason is Reason.BAD_FIELD
    assert str(info.value) == "data frame on an outbound link"


def test_protocol_errors_are_counted_by_reason_on_both_sides(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop)
    link._on_error(None, RemoteProtocolError(Reason.BAD_MAGIC, "x"))  # type: ignore[arg-type]
    assert link._stats.protocol_errors == {"bad_magic": 1}

    async def build() -> Transport:
        return _transport(())

    t = loop.run_until_complete(build())
    t._on_error(None, RemoteProtocolError(Reason.TRUNCATED, "x"))  # type: ignore[arg-type]
    assert t.stats.protocol_errors == {"truncated": 1}


def test_an_out_link_shows_its_state_and_queues(loop: asyncio.AbstractEventLoop) -> None:
    link = _link(loop)
    assert repr(link) == "OutLink(1@peer.example:4001, connecting, queued=0, unacked=0)"
    link.offer_nowait(("state", 1), 0, 1, np.zeros(DIM))
    link.offer_nowait(("state", 1), 0, 1, np.zeros(DIM))
    link._unacked.append(link._queue.popleft())
    assert repr(link) == "OutLink(1@peer.example:4001, connecting, queued=1, unacked=1)"


def test_resolver_errors_without_a_resolver_text_fall_back_to_the_exception(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop)
    assert link._resolve_error(OSError(errno.EIO, "Input/output error")) == (
        "cannot resolve host 'peer.example': [Errno 5] Input/output error"
    )
    assert link._resolve_error(socket.gaierror("no text")) == (
        "cannot resolve host 'peer.example': no text"
    )


class _Wire:
    """What an OutLink uses of its connection, recorded."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.closes = 0
        self.aborts = 0

    def send(self, msg: Message) -> int:
        self.sent.append(msg)
        return 1

    def close(self) -> None:
        self.closes += 1

    def abort(self) -> None:
        self.aborts += 1


def test_catch_up_notes_go_out_once_per_connection_and_when_they_change(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop)
    wire = _Wire()
    link._send_notes(wire)  # type: ignore[arg-type]
    assert wire.sent == [Missed(None).control()]  # the first note, even "none lost"
    link._send_notes(wire)  # type: ignore[arg-type]
    assert len(wire.sent) == 1
    link.lose(4)
    link.control(StateRequest(True).control())
    link.control(StateRequest(False).control())
    link._send_notes(wire)  # type: ignore[arg-type]
    assert wire.sent[1:] == [
        Missed(4).control(),
        StateRequest(True).control(),
        StateRequest(False).control(),
    ]
    link._send_notes(wire)  # type: ignore[arg-type]
    assert len(wire.sent) == 4
    link._noted = False  # a new connection: told again
    link._send_notes(wire)  # type: ignore[arg-type]
    assert wire.sent[4:] == [Missed(4).control()]


def test_an_ack_frees_the_frames_up_to_it_and_wakes_a_draining_close(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop, max_queue=3)
    for step in (1, 2, 3):
        assert link._room.acquire(blocking=False)
        link._enqueue(("params", step), 0, step, np.zeros(DIM), (), False)
    link._unacked.extend(link._queue)
    link._queue.clear()
    wire = _Wire()
    link._on_message(wire, Ack(seq=0))  # type: ignore[arg-type]
    assert link.outstanding == 3
    assert link._acked.is_set()
    link._on_message(wire, Ack(seq=2))  # type: ignore[arg-type]
    assert [f.seq for f in link._unacked] == [3]
    assert link._room.acquire(blocking=False) and link._room.acquire(blocking=False)
    assert not link._room.acquire(blocking=False)
    assert wire.closes == 0


def test_handshake_answers_go_to_the_connection_that_asked_only(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop)
    asked, other = _Wire(), _Wire()
    future: asyncio.Future[Message | None] = loop.create_future()
    link._answer = (asked, future)  # type: ignore[assignment]
    welcome = Welcome(version=PROTOCOL_VERSION, cluster=1, incarnation=1, nonce=1)
    link._peer_left = True
    link._on_message(other, welcome)  # type: ignore[arg-type]
    assert not future.done()
    assert link._peer_left is False  # a Welcome or Refuse: the peer is there
    link._on_message(asked, Refuse(reason="bad_handshake"))  # type: ignore[arg-type]
    assert future.result() == Refuse(reason="bad_handshake")
    link._on_message(asked, welcome)  # type: ignore[arg-type]
    assert future.result() == Refuse(reason="bad_handshake")  # the first answer stays
    lost: asyncio.Future[Message | None] = loop.create_future()
    link._answer = (asked, lost)  # type: ignore[assignment]
    link._on_lost(other, None)  # type: ignore[arg-type]
    assert not lost.done()
    link._on_lost(asked, None)  # type: ignore[arg-type]
    assert lost.result() is None
    link._answer = None
    link._on_message(asked, Ack(seq=0))  # type: ignore[arg-type]  # nothing awaited: fine


def test_a_bye_on_the_link_means_the_peer_left_and_anything_else_is_unexpected(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    link = _link(loop)
    wire = _Wire()
    link._on_message(wire, Pong(nonce=3))  # type: ignore[arg-type]
    assert wire.closes == 0 and link._stats.protocol_errors == {}
    with caplog.at_level(logging.INFO, logger="peerlearn.transport.links"):
        link._on_message(wire, Bye(reason="shutdown"))  # type: ignore[arg-type]
    assert link._peer_left and link._acked.is_set()
    assert wire.closes == 1
    assert [r.getMessage() for r in caplog.records] == ["1@peer.example:4001 said bye: shutdown"]
    link._on_message(wire, Ping(nonce=1))  # type: ignore[arg-type]
    assert wire.closes == 2
    assert link._stats.protocol_errors == {"unexpected_message": 1}


def test_away_given_up_and_their_log_lines(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    link = _link(loop, peer_timeout=5.0, peer_give_up=60.0, keep=True)
    now = time.monotonic()
    link.disconnected_since = now
    assert not link.away and link.away_seconds is None and not link.given_up
    link.disconnected_since = now - 6.0
    assert link.away
    assert 6.0 <= (link.away_seconds or 0.0) < 60.0
    assert not link.given_up
    for state in (LinkState.CONNECTED, LinkState.DRAINING):
        link.state = state
        assert not link.away
    link.state = LinkState.RECONNECTING
    link.last_error = "cannot connect: connection refused"
    with caplog.at_level(logging.WARNING, logger="peerlearn.transport.links"):
        link._check_away()
        link._check_away()  # once
        link.check_give_up()  # not yet
        link.disconnected_since = now - 61.0
        assert link.given_up
        link.check_give_up()
        link.check_give_up()  # once
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "1@peer.example:4001 away for more than 5.0s (reconnecting: cannot connect: connection "
        "refused)"
    )
    assert lines[1].startswith("1@peer.example:4001 away for 61s (longer than peer_give_up, 60s)")
    assert lines[1].endswith(
        "workers waiting on it are blocked until it is back; 0 frames kept for it (cannot "
        "connect: connection refused)"
    )
    assert len(lines) == 2


def test_a_peer_away_is_never_given_up_on_when_frames_may_drop(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop, peer_timeout=5.0, peer_give_up=60.0, keep=False)
    link.disconnected_since = time.monotonic() - 1000.0
    assert link.away and not link.given_up


def test_a_peer_that_left_or_refuses_after_being_connected_is_away_at_once(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    link = _link(loop, peer_timeout=5.0)
    link.disconnected_since = time.monotonic()
    link.peer_stopped()
    assert link.away and link._acked.is_set()
    link._peer_left = False
    link._refused = True
    assert link.away
    with caplog.at_level(logging.WARNING, logger="peerlearn.transport.links"):
        link._check_away()
    assert [r.getMessage() for r in caplog.records] == [
        "1@peer.example:4001 away: nothing listens at its address any more"
    ]


def test_release_producers_gives_room_for_the_waiting_and_a_window_more(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop, max_queue=2)
    assert link._room.acquire(blocking=False) and link._room.acquire(blocking=False)
    link.senders_waiting[1] = 0.0
    link.release_producers()
    assert sum(link._room.acquire(blocking=False) for _ in range(10)) == 3


async def test_close_drops_frames_for_a_peer_that_never_connected_when_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = _link(asyncio.get_running_loop())
    link.offer_nowait(("params", 1), 0, 1, np.zeros(DIM))
    link.offer_nowait(("params", 2), 0, 2, np.zeros(DIM))
    with caplog.at_level(logging.INFO, logger="peerlearn.transport.links"):
        await asyncio.wait_for(link.close(drain_unconnected=False), 1.0)
    assert link._stats.dropped == {"never_connected": 2}
    assert [r.getMessage() for r in caplog.records] == [
        "1@peer.example:4001: 2 frames dropped: it never connected"
    ]
    assert link._closing and link._stop.is_set()


async def test_close_waits_drain_timeout_for_acks_then_says_what_was_not_acked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = _link(asyncio.get_running_loop(), drain_timeout=0.2)
    link.offer_nowait(("params", 1), 0, 1, np.zeros(DIM))
    wire = _Wire()
    link._proto = wire  # type: ignore[assignment]
    link.state = LinkState.CONNECTED
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="peerlearn.transport.links"):
        await asyncio.wait_for(link.close(), 5.0)
    assert 0.15 <= time.monotonic() - start < 4.0  # the loop times in whole milliseconds
    assert link.state is LinkState.DRAINING
    assert [r.getMessage() for r in caplog.records] == [
        "1@peer.example:4001: 1 frames not acked at shutdown"
    ]
    assert wire.sent == [Bye(reason="shutdown")] and wire.closes == 1


async def test_close_ends_its_drain_when_the_peer_stops_or_acks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    link = _link(loop, drain_timeout=30.0)
    link.offer_nowait(("params", 1), 0, 1, np.zeros(DIM))
    link.connected_since = 1.0
    loop.call_later(0.05, link.peer_stopped)
    with caplog.at_level(logging.INFO, logger="peerlearn.transport.links"):
        await asyncio.wait_for(link.close(drain_unconnected=False), 5.0)
    assert [r.getMessage() for r in caplog.records] == [
        "1@peer.example:4001: 1 frames not acked: it stopped first"
    ]
    caplog.clear()
    acked = _link(loop, drain_timeout=30.0)
    acked.offer_nowait(("params", 1), 0, 1, np.zeros(DIM))
    acked._unacked.extend(acked._queue)
    acked._queue.clear()
    loop.call_later(0.05, acked._on_message, _Wire(), Ack(seq=1))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="peerlearn.transport.links"):
        await asyncio.wait_for(acked.close(), 5.0)
    assert caplog.records == []
    assert acked.state is LinkState.CONNECTING  # never connected: not draining


# --- an OutLink dialing a real Transport --------------------------------------------------------


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` on the loop (link state has no event of its own to wait on)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def _state(link: OutLink) -> LinkState:
    """The link's state now (read through a call: mypy keeps no narrowing across it)."""
    return link.state


def _dialer_link(port: int, **kw: Any) -> OutLink:
    """Cluster 1's link to the acceptor (cluster 0) on ``port``."""
    join = _join(1, **kw)
    return OutLink(
        0,
        "127.0.0.1",
        port,
        _hello(1, incarnation=1, name="d1"),
        join,
        LinkSettings(backoff_initial=0.01, backoff_max=0.05, drain_timeout=2.0),
        TransportStats(),
        asyncio.get_running_loop(),
    )


async def test_an_out_link_connects_sends_in_order_and_drains_on_close() -> None:
    async with _acceptor() as acc:
        assert acc.transport.port is not None
        link = _dialer_link(acc.transport.port)
        task = asyncio.create_task(link.run())
        await _until(lambda: link.state is LinkState.CONNECTED)
        assert link.peer_incarnation == 7
        assert (link.failed_attempts, link.last_error, link.last_refusal) == (0, None, None)
        assert link.connected_since is not None
        for step in (1, 2, 3):
            assert link.offer(("params", step), 1, step, np.full(DIM, float(step)))
        await acc.delivered_n(3)
        assert [(x.seq, x.step) for x in acc.delivered] == [(1, 1), (2, 2), (3, 3)]
        await _until(lambda: link.outstanding == 0)
        assert link._stats.messages == {("out", "params", "0@127.0.0.1:" + str(link.port)): 3}
        assert acc.notes == [(1, Missed(None))]  # told at connecting: nothing lost
        await link.close()
        await asyncio.wait_for(task, 5.0)
        assert link.state is LinkState.CLOSED
        assert link._stats.reconnects == 0


async def test_an_out_link_that_is_refused_says_why_and_keeps_trying() -> None:
    async with _acceptor() as acc:
        assert acc.transport.port is not None
        link = _dialer_link(acc.transport.port, fingerprint="another run")
        task = asyncio.create_task(link.run())
        await _until(lambda: link.failed_attempts >= 2)
        assert link.state is LinkState.CONNECTING
        assert link.last_refusal == (
            "refused this daemon: its run settings differ from this daemon's (algorithm, "
            "problem, seed, steps, lr, … or the daemon list): start every daemon with the same "
            "run. This daemon's run fingerprint is another run; each daemon shows its own as "
            "the fingerprint label of peerlearn_config_info"
        )
        assert link.last_error == link.last_refusal
        assert link._stats.protocol_errors["handshake_refused"] >= 2
        assert link.connected_since is None
        await link.close()
        await asyncio.wait_for(task, 5.0)
        assert _state(link) is LinkState.CLOSED


async def test_an_out_link_to_a_closed_port_records_the_connect_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        link = _dialer_link(port)
        task = asyncio.create_task(link.run())
        await _until(lambda: link.failed_attempts >= 2)
        assert link.last_error == "cannot connect: connection refused"
        assert link._refused is False  # never connected: may still be starting
        assert not link.away  # and gets peer_timeout
        await link.close()
        await asyncio.wait_for(task, 5.0)


async def test_a_silent_inbound_connection_is_dropped_and_a_live_one_hears_pongs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _acceptor(peer_timeout=0.4) as acc:
        d = await acc.dial()
        await d.joined()
        quiet = await acc.dial()  # never says hello
        with caplog.at_level(logging.WARNING, logger="peerlearn.transport.peers"):
            assert await d.answer() == Pong(nonce=0)  # unasked: this side is alive
            await d.closed()
            await quiet.closed()
        assert acc.transport.stats.protocol_errors == {"peer_silent": 2}
        lines = sorted(r.getMessage() for r in caplog.records)
        assert len(lines) == 2
        assert lines[0].startswith("daemon 0: no sign of life from 1 (127.0.0.1:")
        assert lines[1].startswith("daemon 0: no sign of life from a dialer (127.0.0.1:")
        for line in lines:
            seconds = float(line.split(" for ")[1].split("s:")[0])
            assert 0.4 <= seconds < 2.0  # printed to 0.1 s
            assert line.endswith("s: connection dropped")
        assert quiet.end.messages == []  # no pong for a connection that never joined


async def test_closing_the_transport_says_bye_on_inbound_connections() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        await acc.transport.close()
        assert await d.answer() == Bye(reason="shutdown")
        await d.closed()


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options")
async def test_inbound_connections_take_peer_timeout_and_max_payload() -> None:
    async with _acceptor(peer_timeout=3.0, max_payload=DIM * 8) as acc:
        d = await acc.dial()
        await d.joined()
        (server,) = acc.transport._inbound
        sock = server.transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3000
        assert server.codec.max_payload == DIM * 8
        d.proto.send(_data(1))  # exactly max_payload: taken
        await acc.delivered_n(1)
        assert acc.transport.pool is server.codec._allocator


async def test_frames_are_counted_under_the_links_name_when_there_is_one() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        async with _acceptor([PeerAddress(1, "127.0.0.1", port)], drain_timeout=0.1) as acc:
            d = await acc.dial()
            await d.joined()
            d.proto.send(_data(1))
            await acc.delivered_n(1)
            assert list(acc.transport.stats.messages) == [("in", "params", f"1@127.0.0.1:{port}")]


def _waiting(link: OutLink, worker: threading.Thread) -> None:
    deadline = time.monotonic() + 5.0
    while worker.ident not in link.senders_waiting and time.monotonic() < deadline:
        time.sleep(0.001)
    assert worker.ident in link.senders_waiting


def test_a_dropping_producer_notices_within_a_slice_that_the_peer_went_away(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # slices of peer_timeout / 4 = 0.05 s; queue_timeout far away
    link = _link(loop, max_queue=1, queue_timeout=30.0, peer_timeout=0.2)
    link.state = LinkState.CONNECTED
    assert link._room.acquire(blocking=False)
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(link._wait_for_room(("p", 1), 1)))
    worker.start()
    _waiting(link, worker)
    time.sleep(0.1)
    _Away.set(link)
    away_at = time.monotonic()
    worker.join(5.0)
    assert result == [False]
    assert time.monotonic() - away_at < 0.5  # a slice, not a second
    assert link._stats.dropped == {"peer_away": 1}


def test_a_producer_waiting_when_the_link_closes_drops_its_frame(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = _link(loop, max_queue=1, queue_timeout=30.0, peer_timeout=0.2)
    link.state = LinkState.CONNECTED
    assert link._room.acquire(blocking=False)
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(link._wait_for_room(("p", 1), 1)))
    worker.start()
    _waiting(link, worker)
    link._closing = True  # close() has begun: no more frames
    worker.join(5.0)
    assert result == [False]
    assert link._stats.dropped == {"queue_full": 1}


async def test_a_loss_noted_on_a_worker_thread_wakes_the_links_task() -> None:
    link = _link(asyncio.get_running_loop())
    worker = threading.Thread(target=link.lose, args=(3,))
    worker.start()
    await asyncio.wait_for(link._wakeup.wait(), 5.0)
    worker.join(5.0)
    assert link.lost_upto == 3


def test_a_second_refusal_when_due_says_it_is_the_second(
    loop: asyncio.AbstractEventLoop,
    caplog: pytest.LogCaptureFixture,
    clock: Callable[[float], None],
) -> None:
    async def build() -> Transport:
        return _transport(())

    t = loop.run_until_complete(build())
    with caplog.at_level(logging.ERROR, logger="peerlearn.transport.peers"):
        for _ in range(2):
            t._refuse(_FakeProto("10.9.0.1"), "d9", "bad_handshake", "no")  # type: ignore[arg-type]
            clock(10.0)
    assert [r.getMessage() for r in caplog.records] == [
        "refusing d9 at 10.9.0.1:5000: no",
        "refusing d9 at 10.9.0.1:5000: no (refused 2 times so far)",
    ]


# --- the acceptor: where it listens, what it logs, and the rest of its handshake ----------------


async def test_cluster_0_is_a_peer_of_another_daemon() -> None:
    async with _acceptor(cluster=2) as acc:
        d = await acc.dial()
        assert await d.joined(cluster=0) == Ack(seq=0)
        assert acc.transport.connected_clusters() == {0}
        itself = await acc.dial()
        assert await itself.ask(_hello(2)) == Refuse(reason="membership_mismatch")


@pytest.mark.parametrize(
    ("before", "first", "msg", "text"),
    [
        (
            None,
            None,
            _hello(1, min_version=PROTOCOL_VERSION + 1, max_version=PROTOCOL_VERSION + 2),
            f"peer speaks protocol versions {PROTOCOL_VERSION + 1}..{PROTOCOL_VERSION + 2}, "
            f"this side {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION} (peer 'd1', cluster 1)",
        ),
        (5, None, _hello(1, incarnation=4), "incarnation 4 is older than 5, already seen"),
        (None, _hello(1), Ping(nonce=1), "expected join, got ping"),
        (None, _hello(1), _join(dim=DIM + 1), f"dim {DIM + 1} != {DIM}"),
        (
            None,
            _hello(1),
            _join(workers=(1,)),
            "cluster 1 hosts processes [1, 4] here, but says [1]",
        ),
    ],
    ids=["version", "stale", "not-join", "dim", "workers"],
)
async def test_a_refusal_is_logged_with_who_the_dialer_says_it_is_and_why(
    before: int | None,
    first: Message | None,
    msg: Message,
    text: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _acceptor() as acc:
        if before is not None:
            await (await acc.dial()).joined(incarnation=before)
        d = await acc.dial()
        with caplog.at_level(logging.ERROR, logger="peerlearn.transport.peers"):
            if first is not None:
                assert isinstance(await d.ask(first), Welcome)
            assert isinstance(await d.ask(msg), Refuse)
            await d.closed()
        (line,) = [r.getMessage() for r in caplog.records if r.name == "peerlearn.transport.peers"]
        assert line.startswith("refusing daemon 'd1' (cluster 1) at 127.0.0.1:")
        assert line.endswith(f": {text}")


def test_a_join_overtaken_by_a_newer_incarnation_since_its_hello_is_refused(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    async def build() -> Transport:
        return _transport(())

    t = loop.run_until_complete(build())
    t._incarnations[1] = 3
    state = _Inbound(cluster=1, incarnation=2, name="d1")
    proto = _FakeProto("10.0.0.1")
    with caplog.at_level(logging.ERROR, logger="peerlearn.transport.peers"):
        t._join(proto, state, _join())  # type: ignore[arg-type]
    assert proto.sent == [Refuse(reason="stale_incarnation")] and proto.closed
    assert not state.joined
    assert t._incarnations == {1: 3}
    assert t.stats.protocol_errors == {"stale_incarnation": 1}
    assert [r.getMessage() for r in caplog.records] == [
        "refusing daemon 'd1' (cluster 1) at 10.0.0.1:5000: incarnation 2 is older than 3, "
        "already seen"
    ]


async def test_a_join_is_logged_and_a_restart_says_so(caplog: pytest.LogCaptureFixture) -> None:
    def established(d: _Dialer) -> str:
        assert d.proto.transport is not None
        port = d.proto.transport.get_extra_info("sockname")[1]
        return f"daemon 0: inbound link from daemon 'd1' (cluster 1) (127.0.0.1:{port}) established"

    async with _acceptor() as acc:
        with caplog.at_level(logging.INFO, logger="peerlearn.transport.peers"):
            first = await acc.dial()
            await first.joined(incarnation=1)
            first.proto.close()
            await first.closed()
            for _ in range(100):  # until the acceptor has seen it close, as a link retries
                same = await acc.dial()
                if await same.joined(incarnation=1) == Ack(seq=0):  # a reconnect: no restart
                    break
            newer = await acc.dial()
            await newer.joined(incarnation=2)
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == "peerlearn.transport.peers" and r.levelno == logging.INFO
        ]
        assert lines == [
            established(first),
            established(same),
            "daemon 0: daemon d1 restarted (new incarnation): its frames are numbered anew",
            established(newer),
        ]


async def test_frames_read_together_are_acked_once_after_them() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        for seq in (1, 2, 3):  # written at once: the acceptor reads them in one batch
            d.proto.send(_data(seq))
        d.proto.send(Ping(nonce=1))
        await acc.delivered_n(3)
        assert await d.answer() == Pong(nonce=1)  # answered while the batch is read
        assert await d.answer() == Ack(seq=3)  # the ack comes after the batch
        assert await d.ask(Ping(nonce=2)) == Pong(nonce=2)  # and only one


async def test_a_first_frame_numbered_0_is_a_duplicate_and_acks_nothing() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        await d.joined()
        d.proto.send(_data(0))  # the wire allows seq 0; a link numbers its frames from 1
        assert await d.answer() == Ack(seq=0)  # not 1: frame 1 has not come
        assert acc.transport.stats.dropped == {"duplicate": 1}
        assert acc.delivered == []


async def test_bad_controls_are_logged_per_peer(caplog: pytest.LogCaptureFixture) -> None:
    async with _acceptor() as acc:
        one = await acc.dial()
        await one.joined(cluster=1)
        two = await acc.dial()
        await two.joined(cluster=2)
        with caplog.at_level(logging.WARNING, logger="peerlearn.transport.peers"):
            for d in (one, two):
                d.proto.send(Control(name="hurry", body={}))
                assert await d.ask(Ping(nonce=1)) == Pong(nonce=1)
        assert [r.getMessage() for r in caplog.records] == [
            f"daemon 0: ignoring a control message from {peer}: unknown control message "
            "'hurry' (1 so far)"
            for peer in (1, 2)
        ]
        assert acc.transport.stats.protocol_errors == {"bad_control": 2}


async def test_bytes_that_are_no_frame_are_counted_by_their_reason() -> None:
    async with _acceptor() as acc:
        d = await acc.dial()
        assert d.proto.transport is not None
        d.proto.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
        await d.closed()
        assert acc.transport.stats.protocol_errors == {"bad_magic": 1}


async def test_a_bye_is_taken_from_the_current_incarnation_of_a_linked_peer_only() -> None:
    t = _transport((2,))
    (link,) = t.links
    unlinked, old = _FakeProto("10.0.0.1"), _FakeProto("10.0.0.2")
    t._inbound[unlinked] = _Inbound(cluster=1, incarnation=1, name="d1", joined=True)  # type: ignore[index]
    t._inbound[old] = _Inbound(cluster=2, incarnation=1, name="d2", joined=True)  # type: ignore[index]
    t._incarnations.update({1: 1, 2: 2})
    for proto in (unlinked, old):
        t._on_message(proto, Bye(reason="shutdown"))  # type: ignore[arg-type]
        assert proto.closed
    assert not link._peer_left  # the old incarnation's bye says nothing of the new one


async def test_close_drains_a_peer_that_never_connected_unless_told_not_to() -> None:
    for drain, dropped in ((None, {}), (False, {"never_connected": 1})):
        t = Transport(
            _hello(0, incarnation=7, name="d0"),
            JOIN,
            MEMBERS,
            ("127.0.0.1", 0),
            [PeerAddress(1, "127.0.0.1", 9)],
            lambda data: None,
            LinkSettings(drain_timeout=0.05),
        )
        assert repr(t) == "Transport(cluster=0, port=None, peers=1)"  # not started
        t.send(1, ("params", 1), 0, 1, np.zeros(DIM), (), False)
        await _settle()
        assert t.links[0].outstanding == 1
        # never started: there is no server to close
        await (t.close() if drain is None else t.close(drain_unconnected=drain))
        assert t.stats.dropped == dropped


async def test_a_transport_on_a_bound_socket_accepts_there_and_dials_its_peers() -> None:
    async with _acceptor() as acc:
        assert acc.transport.port is not None
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        b = Transport(
            _hello(1, incarnation=2, name="d1"),
            _join(1),
            MEMBERS,
            ("127.0.0.1", 1),  # not used: the socket is
            [PeerAddress(0, "127.0.0.1", acc.transport.port)],
            lambda data: None,
            LinkSettings(backoff_initial=0.01, backoff_max=0.05, drain_timeout=2.0),
        )
        async with asyncio.TaskGroup() as tasks:
            await b.start(tasks, sock)
            try:
                assert b.port == sock.getsockname()[1]
                names = {task.get_name() for task in asyncio.all_tasks()}
                assert {f"link-{b.links[0].name}", "inbound-liveness"} <= names
                await _until(lambda: b.connected() == 1)
                assert acc.transport.connected_clusters() == {1}
                b.broadcast(("params", 1), 1, 1, np.ones(DIM))
                await acc.delivered_n(1)
                assert acc.delivered[0].sender == 1
                d = await _Acceptor(b, [], [], asyncio.Event()).dial()
                assert await d.joined(cluster=2) == Ack(seq=0)
            finally:
                await b.close()


async def test_a_transport_listens_on_the_configured_host_and_port() -> None:
    async with _acceptor() as acc:  # ("127.0.0.1", 0)
        assert acc.transport._server is not None
        assert [s.getsockname()[0] for s in acc.transport._server.sockets] == ["127.0.0.1"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t = Transport(
            _hello(0, incarnation=7, name="d0"),
            JOIN,
            MEMBERS,
            ("127.0.0.1", port),
            [],
            lambda data: None,
            LinkSettings(),
        )
        err: int | None = None
        async with asyncio.TaskGroup() as tasks:
            try:
                await t.start(tasks)
            except OSError as exc:
                err = exc.errno
            else:  # listening elsewhere: stop it
                await t.close()
        assert err == errno.EADDRINUSE


async def test_the_liveness_pass_runs_four_times_per_peer_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    real = asyncio.wait_for

    async def wait_for(aw: Any, timeout: float) -> Any:
        waits.append(timeout)
        return await real(aw, timeout)

    monkeypatch.setattr(asyncio, "wait_for", wait_for)
    async with _acceptor(peer_timeout=2.0):
        await _until(lambda: bool(waits))
    assert waits[0] == 0.5


# --- the tag window (Transport: beyond / held / early / ahead) ---------------------------------


def _window(limit: list[int], verdict: Beyond = Beyond.HOLD) -> Callable[[Data], Beyond]:
    """Frames of iterations ``>= limit[0]`` are beyond the window (``verdict``)."""
    return lambda data: verdict if int(data.tag[1]) >= limit[0] else Beyond.DELIVER


async def test_a_held_frame_waits_unacked_frames_behind_it_go_in_and_it_follows() -> None:
    limit = [100]
    async with _acceptor(beyond=_window(limit)) as acc:
        d = await acc.dial()
        await d.joined()
        d.proto.send(_data(1))
        await acc.delivered_n(1)
        assert await d.answer() == Ack(seq=1)
        d.proto.send(_data(2, tag=("params", 200)))  # far ahead: held
        d.proto.send(_data(3))  # behind it: delivered at once (a state answer may be one)
        await acc.delivered_n(2)
        assert [x.seq for x in acc.delivered] == [1, 3]
        assert await d.answer() == Ack(seq=1)  # the ack stays before the held frame
        assert acc.transport.holding == 1 and acc.transport.held_from() == {1: 1}
        assert acc.transport.held_bytes == _data(2).value.nbytes
        assert acc.transport.due_at == 200
        acc.transport.release()  # nothing due yet
        assert acc.transport.holding == 1
        limit[0] = 1000  # the workers came near
        acc.transport.release()
        await acc.delivered_n(3)
        assert [x.seq for x in acc.delivered] == [1, 3, 2]
        assert await d.answer() == Ack(seq=3)  # past both: in order now
        assert acc.transport.holding == 0 and acc.transport.due_at is None
        assert acc.transport.held_bytes == 0


async def test_held_frames_are_resent_after_a_reconnect_and_early_ones_are_not_taken_twice() -> (
    None
):
    limit = [100]
    async with _acceptor(beyond=_window(limit)) as acc:
        d = await acc.dial()
        await d.joined()
        d.proto.send(_data(1))
        d.proto.send(_data(2, tag=("params", 200)))  # held
        d.proto.send(_data(3))  # early
        await acc.delivered_n(2)
        d.proto.close()
        await d.closed()
        for _ in range(100):  # until the acceptor saw it close (the dialer's link retries)
            again = await acc.dial()
            answer = await again.joined()
            if answer != Refuse(reason="already_connected"):
                break
        assert answer == Ack(seq=1)  # the held frame was never acked: it comes again
        assert acc.transport.holding == 0  # what was held went with its connection
        assert acc.transport.held_bytes == 0
        limit[0] = 1000
        for seq, tag in ((2, ("params", 200)), (3, ("params", 3)), (4, ("params", 4))):
            again.proto.send(_data(seq, tag=tag))
        await acc.delivered_n(4)
        assert [x.seq for x in acc.delivered] == [1, 3, 2, 4]  # 3 once
        assert acc.transport.stats.dropped["duplicate"] == 1
        await acc.delivered_n(4)
        while (msg := await again.answer()) != Ack(seq=4):
            assert isinstance(msg, Ack)


async def test_a_frame_beyond_the_window_where_frames_may_drop_is_acked_and_told() -> None:
    told: list[tuple[int, int]] = []
    async with _acceptor(
        beyond=_window([100], Beyond.DROP), ahead=lambda peer, t: told.append((peer, t))
    ) as acc:
        d = await acc.dial()
        await d.joined()
        d.proto.send(_data(1, tag=("params", 500)))
        d.proto.send(_data(2))
        await acc.delivered_n(1)
        assert [x.seq for x in acc.delivered] == [2]
        while (msg := await d.answer()) != Ack(seq=2):
            assert isinstance(msg, Ack)
        assert told == [(1, 500)]
        assert acc.transport.stats.dropped["ahead"] == 1 and acc.transport.holding == 0


async def test_a_sender_ignoring_its_window_is_not_read_from_until_the_workers_catch_up() -> None:
    limit = [100]
    async with _acceptor(beyond=_window(limit), max_queue=2) as acc:  # window 2: pause at 8
        d = await acc.dial()
        await d.joined()
        for seq in range(1, 41):
            d.proto.send(_data(seq, tag=("params", 100 + seq)))
        d.proto.send(_data(41, tag=("params", 1)))  # in the window, but behind the flood
        deadline = asyncio.get_running_loop().time() + 5
        while acc.transport.holding < 8:  # (nothing signals a frame held: looked at each turn)
            assert asyncio.get_running_loop().time() < deadline, acc.transport.holding
            await asyncio.sleep(0.001)
        for _ in range(50):  # more turns of the loop: still nothing more is taken
            await asyncio.sleep(0.001)
        assert acc.transport.holding == 8  # not one more: nothing is read while paused
        assert acc.transport.stats.protocol_errors["window_exceeded"] == 1
        assert acc.delivered == []
        limit[0] = 10_000
        acc.transport.release()  # resumes reading: the rest comes in, in order
        await acc.delivered_n(41)
        assert [x.seq for x in acc.delivered][-1] == 41
        assert acc.transport.holding == 0


async def test_the_heap_is_given_back_after_a_backlog_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hold that peaked at TRIM_AFTER bytes and emptied has the C heap trimmed (on a
    # thread, TRIM_DELAY later); a smaller one does not; a second backlog right after waits
    # for TRIM_INTERVAL (a member filling and emptying the hold cannot make it trim often).
    if pool._TRIM is None:
        pytest.skip("the C library has no malloc_trim")
    nbytes = _data(1).value.nbytes
    monkeypatch.setattr(peers, "TRIM_AFTER", 3 * nbytes)
    monkeypatch.setattr(peers, "TRIM_DELAY", 0.01)
    limit = [100]
    async with _acceptor(beyond=_window(limit)) as acc:
        t = acc.transport
        d = await acc.dial()
        await d.joined()

        async def backlog(seqs: range) -> None:
            limit[0] = 100
            for seq in seqs:
                d.proto.send(_data(seq, tag=("params", 200 + seq)))
            await _until(lambda: t.holding == len(seqs))
            limit[0] = 10_000
            t.release()
            await acc.delivered_n(seqs[-1])
            assert t.holding == 0 and t.held_bytes == 0

        await backlog(range(1, 3))  # 2 frames: under TRIM_AFTER
        assert t._trim is None and t._trimming is None
        await backlog(range(3, 6))  # 3 frames: a trim, 10 ms later
        await _until(lambda: t.trims == 1)
        await backlog(range(6, 9))
        assert t._trim is not None
        assert t._trim.when() - asyncio.get_running_loop().time() > peers.TRIM_INTERVAL - 5
        assert t.trims == 1
