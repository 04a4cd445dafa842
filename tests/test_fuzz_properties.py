"""Hostile input, as properties (issue 15): the suite's short version of fuzz/.

The codec in the acceptor's own configurations — pre-trust (``max_payload=0``, small headers,
a small buffer) and widened right after the first message, as on an accepted Join — takes any
bytes in any chunks with nothing but ``RemoteProtocolError``, within its caps, and valid streams
come through the widening whole (tests/test_wire.py has the default codec's properties).

The handshake, over real sockets: one acceptor (a Transport with a cluster secret, on
127.0.0.1 port 0, its event loop in a thread) for the module. Random bytes, and well-formed
but wrong Hello/Join sequences (no proof, a random one, a replayed one), always end in a
Refuse or a closed connection — never an Ack — and the acceptor answers an honest peer after
every example. fuzz/ runs the same checks over a million inputs (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.membership import Membership
from peerlearn.transport import auth
from peerlearn.transport.links import LinkSettings
from peerlearn.transport.peers import PRE_TRUST_HEADER, Transport
from peerlearn.wire import (
    CLOSED,
    MAGIC,
    MIN_PROTOCOL_VERSION,
    NEED_DATA,
    PREFIX,
    PROTOCOL_VERSION,
    Ack,
    Codec,
    Control,
    Data,
    Hello,
    Join,
    Message,
    Ping,
    Refuse,
    RemoteProtocolError,
    Welcome,
)
from peerlearn.wire.messages import MESSAGE_TYPES

from .test_wire import assert_exact, encode, messages

MESSAGE_CLASSES = tuple(MESSAGE_TYPES.values())

# --- the codec in the acceptor's configurations -------------------------------------------------


class CappedAllocator:
    """np.empty that checks every request against its codec's payload cap in force."""

    def __init__(self) -> None:
        self.codec: Codec | None = None
        self.requests: list[int] = []

    def __call__(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        assert self.codec is not None
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=object))
        assert nbytes <= self.codec.max_payload, (nbytes, self.codec.max_payload)
        self.requests.append(nbytes)
        return np.empty(shape, dtype)


def pre_trust() -> tuple[Codec, CappedAllocator]:
    """A codec as Transport._accept makes one."""
    allocator = CappedAllocator()
    codec = Codec(
        max_payload=0,
        allocator=allocator,
        max_header=PRE_TRUST_HEADER,
        read_buffer_size=PREFIX.size + PRE_TRUST_HEADER,
    )
    allocator.codec = codec
    return codec, allocator


def flipped(data: bytes, bits: list[int]) -> bytes:
    out = bytearray(data)
    for bit in bits:
        if out:
            out[(bit // 8) % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


#: bytes that get past the magic, the prefix or the header more often than random ones do
hostile = st.one_of(
    st.binary(max_size=600),
    st.builds(
        lambda version, flags, hlen, plen, tail: (
            PREFIX.pack(MAGIC, version, flags, hlen, plen) + tail
        ),
        st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION - 1, 255]),
        st.sampled_from([0, 0, 1, 2, 3, 4]),  # MORE, PART, both, a reserved bit
        st.integers(0, 2 * PRE_TRUST_HEADER),
        st.sampled_from([0, 0, 1, 24, 2**63]),
        st.binary(max_size=300),
    ),
    st.builds(
        flipped,
        st.lists(messages, min_size=1, max_size=3).map(lambda ms: encode(*ms)),
        st.lists(st.integers(0, 2**16), max_size=3),
    ),
)


def feed_hostile(
    codec: Codec, stream: bytes, sizes: list[int], widen: bool, end: bool = True
) -> list[Message]:
    """Feed ``stream`` in chunks of ``sizes`` (cycled), then end it (if ``end``); widen after
    the first message if asked. The messages that came out; raises RemoteProtocolError."""
    out: list[Message] = []
    pos, i = 0, 0
    while pos < len(stream):
        region = codec.get_buffer(-1)
        n = min(sizes[i % len(sizes)], len(region), len(stream) - pos)
        region[:n] = stream[pos : pos + n]
        codec.buffer_updated(n)
        pos, i = pos + n, i + 1
        while (event := codec.next_event()) is not NEED_DATA:
            assert isinstance(event, MESSAGE_CLASSES), event
            out.append(event)
            if widen and len(out) == 1:
                codec.widen(max_payload=1 << 16)
    if end:
        codec.receive_eof()
        while (event := codec.next_event()) is not CLOSED:
            out.append(event)  # type: ignore[arg-type]
    return out


@given(hostile, st.lists(st.integers(1, 80), min_size=1, max_size=8), st.booleans())
@settings(max_examples=300, deadline=None)
def test_the_acceptors_codec_takes_any_bytes_in_any_chunks(
    stream: bytes, sizes: list[int], widen: bool
) -> None:
    codec, allocator = pre_trust()
    try:
        out = feed_hostile(codec, stream, sizes, widen)
    except RemoteProtocolError as exc:
        error = exc
        for call in (codec.next_event, lambda: codec.get_buffer(-1)):  # the error sticks
            with pytest.raises(RemoteProtocolError) as again:
                call()
            assert again.value.reason is error.reason
    else:
        assert codec.error is None and all(isinstance(m, MESSAGE_CLASSES) for m in out)
    if not widen:  # pre-trust: no payload, ever — refused from the prefix alone
        assert all(n == 0 for n in allocator.requests)


big_controls = st.builds(
    lambda n: Control("blob", {"b": bytes(n)}), st.integers(PRE_TRUST_HEADER, 3 * PRE_TRUST_HEADER)
)
handshake_messages = messages.filter(lambda m: not isinstance(m, Data) or m.value.nbytes == 0)


@given(
    handshake_messages,
    st.lists(st.one_of(messages, big_controls), max_size=5),
    st.lists(st.integers(1, 5000), min_size=1, max_size=8),
)
@settings(max_examples=100, deadline=None)
def test_a_stream_comes_through_the_widening_after_the_first_message_whole(
    first: Message, rest: list[Message], sizes: list[int]
) -> None:
    """What the acceptor does on a Join: widen when the Join comes out, before the dialer's
    next frames (headers over the pre-trust cap, payloads) — none lost, reordered or refused.
    The dialer sends them only after the Ack, so they come in later reads."""
    codec, _ = pre_trust()
    out = feed_hostile(codec, encode(first), sizes, widen=True, end=False)
    assert codec.max_payload > 0
    out += feed_hostile(codec, encode(*rest), sizes, widen=False)
    assert_exact(out, [first, *rest])


@pytest.mark.xfail(
    strict=True,
    raises=RemoteProtocolError,
    reason="a frame pipelined behind the first message, in the same read, is judged by the "
    "pre-trust caps: Codec.buffer_updated parses every prefix in the read before next_event "
    "hands out the Join the acceptor widens on; the same bytes in two reads pass. Benign for "
    "the protocol (the dialer waits for the Ack before any Data) but the outcome depends on "
    "TCP segmentation; reported with the fuzzing results (benchmarks/RESULTS.md)",
)
def test_a_frame_pipelined_behind_the_join_in_the_same_read_is_judged_after_the_widening() -> None:
    first = Join((1, 4), DIM, "float64", FINGERPRINT)
    then = Data(1, ("params", 1), 1, 1, np.arange(3.0))
    codec, _ = pre_trust()
    assert feed_hostile(codec, encode(first) + encode(then), [1 << 16], widen=True) == [
        first,
        then,
    ]


# --- the handshake, over real sockets ----------------------------------------------------------

MEMBERS = Membership(processes=6, clusters=3)  # cluster c hosts processes c and c + 3
DIM = 3
FINGERPRINT = "fp-fuzz-properties"
SECRET = b"the-cluster-secret-of-this-test-module"
SETTINGS = LinkSettings(secret=SECRET, handshake_timeout=0.5, peer_timeout=1.0)
#: an unfinished handshake is closed by then: its deadline, plus the period of the check
#: (peer_timeout / 4), plus room for a loaded machine
DEADLINE = SETTINGS.handshake_timeout + SETTINGS.peer_timeout / 4 + 2.0
#: the codes a peer that has not proved the secret may get
BEFORE_PROOF = {"bad_handshake", "bad_secret", "unsupported_version"}


@dataclass
class Acceptor:
    transport: Transport
    port: int
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def acceptor() -> Iterator[Acceptor]:
    """Cluster 0's Transport, with the secret, listening on 127.0.0.1 port 0 (no outbound
    links), on uvloop in a thread of its own: the tests below talk to it with blocking sockets."""
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        hello = Hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, 0, time.time_ns(), 0, "d0")
        join = Join(MEMBERS.members[0], DIM, "float64", FINGERPRINT)
        stop = asyncio.Event()
        t = Transport(hello, join, MEMBERS, ("127.0.0.1", 0), [], lambda d: None, SETTINGS)
        async with asyncio.TaskGroup() as tasks:
            await t.start(tasks)
            assert t.port is not None
            box["acceptor"] = Acceptor(t, t.port, asyncio.get_running_loop())
            box["stop"] = stop
            started.set()
            await stop.wait()
            await t.close()

    def run() -> None:
        try:
            uvloop.run(serve())
        except BaseException as exc:
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=run, name="acceptor", daemon=True)
    thread.start()
    assert started.wait(30), "the acceptor did not start"
    if "error" in box:
        raise box["error"]
    acc: Acceptor = box["acceptor"]
    yield acc
    acc.loop.call_soon_threadsafe(box["stop"].set)
    thread.join(30)
    assert not thread.is_alive() and "error" not in box, box.get("error")


class Peer:
    """A raw connection to the acceptor: send bytes or messages, read every answer until the
    acceptor closes (blocking, each read waits at most until the deadline)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.codec = Codec()
        self.answers: list[Message] = []
        self.reset = False  # closed with unread bytes on the acceptor's side (RST)

    def send(self, data: bytes | Message) -> None:
        raw = data if isinstance(data, bytes) else encode(data)
        try:
            self.sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            self.reset = True  # closed already: reading tells the rest

    def end(self) -> None:
        """Say this side is done (EOF): the acceptor ends the connection at once."""
        if not self.reset:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.reset = True

    def until_closed(self, limit: float = DEADLINE) -> float:
        """Read and decode answers until the acceptor closes; seconds it took. Fails if the
        connection is still open after ``limit`` seconds."""
        started = time.monotonic()
        self.sock.settimeout(limit)
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                self.reset = True
                data = b""
            except TimeoutError:
                raise AssertionError(f"still open after {limit}s: {self.answers}") from None
            if not data:
                break
            self.codec.receive_data(data)
            while (event := self.codec.next_event()) is not NEED_DATA:
                self.answers.append(event)  # type: ignore[arg-type]
        return time.monotonic() - started

    def receive(self) -> Message:
        while (event := self.codec.next_event()) is NEED_DATA:
            data = self.sock.recv(65536)
            assert data, f"closed; answers so far {self.answers}"
            self.codec.receive_data(data)
        assert event is not CLOSED
        self.answers.append(event)  # type: ignore[arg-type]
        return event  # type: ignore[return-value]

    def close(self) -> None:
        self.sock.close()


def hello(cluster: int = 1, nonce: int | None = None, **kw: Any) -> Hello:
    fields: dict[str, Any] = {
        "min_version": MIN_PROTOCOL_VERSION,
        "max_version": PROTOCOL_VERSION,
        "cluster": cluster,
        "incarnation": time.time_ns(),
        "nonce": secrets.randbits(63) if nonce is None else nonce,
        "name": "d1",
    }
    return Hello(**(fields | kw))


def join(cluster: int = 1, mac: bytes = b"", **kw: Any) -> Join:
    fields: dict[str, Any] = {
        "workers": MEMBERS.members[cluster] if cluster < MEMBERS.clusters else (1, 4),
        "dim": DIM,
        "dtype": "float64",
        "fingerprint": FINGERPRINT,
        "mac": mac,
    }
    return Join(**(fields | kw))


def honest_handshake(acc: Acceptor) -> None:
    """A member's handshake: Welcome with the acceptor's proof, then Ack to its own."""
    peer = Peer(acc.port)
    try:
        h = hello(1)
        peer.send(h)
        welcome = peer.receive()
        assert isinstance(welcome, Welcome), peer.answers
        assert welcome.mac == auth.proof(SECRET, "acceptor", h, welcome)
        peer.send(join(1, auth.proof(SECRET, "dialer", h, welcome)))
        assert peer.receive() == Ack(seq=0)
    finally:
        peer.close()


def assert_no_entry(peer: Peer) -> None:
    """At most a Welcome, then at most a Refuse with a code a stranger may get; never an Ack."""
    answers = list(peer.answers)
    if answers and isinstance(answers[0], Welcome):
        assert len(answers[0].mac) == auth.MAC_SIZE
        answers.pop(0)
    assert len(answers) <= 1, peer.answers
    if answers:
        assert isinstance(answers[0], Refuse), peer.answers
        assert answers[0].reason in BEFORE_PROOF, peer.answers


@given(hostile)
@settings(max_examples=60, deadline=None)
def test_random_bytes_end_in_a_refusal_or_a_close(acceptor: Acceptor, stream: bytes) -> None:
    peer = Peer(acceptor.port)
    try:
        if stream:
            peer.send(stream)
        peer.end()
        peer.until_closed()
        assert_no_entry(peer)
    finally:
        peer.close()
    honest_handshake(acceptor)


def test_an_unfinished_handshake_is_closed_at_its_deadline(acceptor: Acceptor) -> None:
    """No end of stream this time: a valid Hello then part of a frame, and only the prefix of
    a frame — the acceptor closes them after handshake_timeout, not at their leisure."""
    for stream in (
        encode(hello(1)) + encode(join(1))[:20],
        PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 100, 0),
    ):
        peer = Peer(acceptor.port)
        try:
            peer.send(stream)
            took = peer.until_closed()
            assert took >= SETTINGS.handshake_timeout - 0.1, took
            assert_no_entry(peer)
        finally:
            peer.close()
    honest_handshake(acceptor)


#: a Join whose proof is missing, random, of the wrong role, or a member's, replayed
proofs = st.sampled_from(["none", "random", "acceptor-role", "replayed", "other-secret"])
hellos = st.builds(
    lambda versions, **kw: hello(min_version=versions[0], max_version=versions[1], **kw),
    st.sampled_from(
        [
            (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 2),
            (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2),  # none in common
        ]
    ),
    cluster=st.integers(0, 4),
    incarnation=st.sampled_from([0, 1, time.time_ns() * 2]),
    mac=st.sampled_from([b"", b"\x00" * auth.MAC_SIZE]),
)
steps = st.lists(
    st.one_of(
        hellos,
        st.tuples(
            st.integers(0, 4),
            proofs,
            st.sampled_from([DIM, DIM + 1]),
            st.sampled_from([FINGERPRINT, "other"]),
        ),
        st.sampled_from([Ping(1), Ack(0), Data(1, ("params", 1), 1, 1, np.empty(0))]),
    ),
    min_size=1,
    max_size=4,
)
#: a member's handshake, recorded once: its Join proves nothing on another connection
_RECORDED: dict[str, Any] = {}


def _recorded(acc: Acceptor) -> Join:
    if "join" not in _RECORDED:
        peer = Peer(acc.port)
        try:
            h = hello(1)
            peer.send(h)
            welcome = peer.receive()
            assert isinstance(welcome, Welcome)
            _RECORDED["join"] = join(1, auth.proof(SECRET, "dialer", h, welcome))
        finally:
            peer.close()
    return _RECORDED["join"]  # type: ignore[no-any-return]


@given(steps, st.booleans())
@settings(max_examples=60, deadline=None)
def test_wrong_hello_join_sequences_get_no_entry(
    acceptor: Acceptor, script: list[Any], one_by_one: bool
) -> None:
    """Well-formed messages in a wrong order or with a wrong proof: at most a Welcome, then a
    Refuse with a code that says nothing about the run, or a close — never an Ack."""
    peer = Peer(acceptor.port)
    sent: Hello | None = None
    welcome: Welcome | None = None
    try:
        for step in script:
            if isinstance(step, tuple):
                cluster, proof, dim, fingerprint = step
                mac = b""
                if proof == "random":
                    mac = secrets.token_bytes(auth.MAC_SIZE)
                elif proof == "replayed":
                    mac = _recorded(acceptor).mac
                elif proof == "acceptor-role" and sent is not None and welcome is not None:
                    mac = auth.proof(SECRET, "acceptor", sent, welcome)
                elif proof == "other-secret" and sent is not None and welcome is not None:
                    mac = auth.proof(b"another-secret-entirely", "dialer", sent, welcome)
                step = join(cluster, mac, dim=dim, fingerprint=fingerprint)
            elif isinstance(step, Hello) and sent is None:
                sent = step
            peer.send(step)
            if one_by_one and isinstance(step, Hello) and len(peer.answers) == 0:
                # wait for the answer to the first Hello, so that a Join can carry a proof
                # over the acceptor's nonce (a wrong one: another role, another secret)
                answer = peer.receive()
                if not isinstance(answer, Welcome):
                    break
                welcome = answer
        peer.end()
        peer.until_closed()
        assert_no_entry(peer)
    finally:
        peer.close()
    honest_handshake(acceptor)


def test_the_acceptor_counted_what_it_refused(acceptor: Acceptor) -> None:
    """Run after the properties: the refusals went into the acceptor's counters, none with a
    code that judges a claim about the run, and its handshake is still open to members."""
    honest_handshake(acceptor)
    errors = acceptor.transport.stats.protocol_errors
    judged = {
        "membership_mismatch",
        "stale_incarnation",
        "dim_mismatch",
        "dtype_mismatch",
        "fingerprint_mismatch",
    }
    assert not judged & set(errors), errors
