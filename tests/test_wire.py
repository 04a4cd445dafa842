"""The wire codec, h11 style: feed bytes in, assert on the exact events that come out.

Covers the round trip of every message type (hypothesis), any chunking of the stream (one byte
at a time included), zero-copy on both sides (the payload lands in the allocator's array, the
sent chunk is a view of the source array), every cap and malformed-input reason, and that
truncated, bit-flipped or random input never raises anything but ``RemoteProtocolError``.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import peerlearn.wire as wire
from peerlearn.compression import Scheme, nearest
from peerlearn.errors import PeerlearnError
from peerlearn.wire import (
    CLOSED,
    MAGIC,
    MAX_HEADER,
    MIN_PROTOCOL_VERSION,
    NEED_DATA,
    PREFIX,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Codec,
    Control,
    Data,
    HandshakeError,
    Hello,
    Join,
    LocalProtocolError,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Reason,
    Refuse,
    RemoteProtocolError,
    Welcome,
    check_join,
    negotiate,
)
from peerlearn.wire.messages import Packed

INT64 = st.integers(-(2**63), 2**63 - 1)
UINT63 = st.integers(0, 2**63 - 1)

# --- helpers ------------------------------------------------------------------------------------


def encode(*msgs: Message, codec: Codec | None = None) -> bytes:
    codec = codec or Codec()
    return b"".join(bytes(chunk) for msg in msgs for chunk in codec.send(msg))


def drain(codec: Codec) -> list[Message]:
    """Every complete event; stops at NEED_DATA or CLOSED."""
    out: list[Message] = []
    while (event := codec.next_event()) is not NEED_DATA and event is not CLOSED:
        out.append(event)
    return out


def feed(
    data: bytes, chunks: Iterable[int] | None = None, codec: Codec | None = None
) -> list[Message]:
    """Feed ``data`` through get_buffer/buffer_updated in the given chunk sizes; drain."""
    codec = codec or Codec()
    out: list[Message] = []
    pos = 0
    for size in chunks if chunks is not None else [len(data)]:
        while size > 0 and pos < len(data):
            region = codec.get_buffer(-1)
            n = min(size, len(region), len(data) - pos)
            region[:n] = data[pos : pos + n]
            codec.buffer_updated(n)
            pos, size = pos + n, size - n
            out += drain(codec)
    assert pos == len(data), "chunks must cover the data"
    return out


def frame(
    header: object,
    payload: bytes = b"",
    *,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    flags: int = 0,
    header_len: int | None = None,
    payload_len: int | None = None,
) -> bytes:
    """A hand-made frame; ``header`` is msgpack-packed unless it is already bytes."""
    raw = header if isinstance(header, bytes) else msgpack.packb(header)
    hlen = len(raw) if header_len is None else header_len
    plen = len(payload) if payload_len is None else payload_len
    return PREFIX.pack(magic, version, flags, hlen, plen) + raw + payload


def data_header(**over: Any) -> dict[str, Any]:
    return {
        "t": "data",
        "q": 1,
        "g": ("params", 1),
        "s": 0,
        "p": 1,
        "r": (),
        "b": False,
        "y": "f8",
        "h": (2,),
    } | over


class RecordingAllocator:
    """np.empty that remembers every array it handed out."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def __call__(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        array = np.empty(shape, dtype)
        self.calls.append(array)
        return array


def remote_error(data: bytes, codec: Codec | None = None) -> RemoteProtocolError:
    codec = codec or Codec()
    codec.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        drain(codec)
    return info.value


def assert_exact(got: list[Message], want: list[Message]) -> None:
    """Equal by value, and Data arrays bit for bit (NaN payloads, -0.0) with the right dtype."""
    assert got == want
    for g, w in zip(got, want, strict=True):
        if isinstance(w, Data):
            assert isinstance(g, Data)
            assert g.value.dtype == w.value.dtype.newbyteorder("<")
            assert g.value.tobytes() == w.value.astype(g.value.dtype).tobytes()


# --- strategies ---------------------------------------------------------------------------------

texts = st.text(max_size=12)
tags = st.lists(st.one_of(texts, INT64), max_size=4).map(tuple)
FLOAT_DTYPES: list[np.dtype[Any]] = [np.dtype("float32"), np.dtype("float64")]
float_arrays: st.SearchStrategy[np.ndarray] = arrays(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
)
scalars = st.one_of(
    st.none(), st.booleans(), INT64, st.floats(allow_nan=False), texts, st.binary(max_size=8)
)


def body_values(depth: int) -> st.SearchStrategy[Any]:
    if depth == 0:
        return scalars
    inner = body_values(depth - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(texts, inner, max_size=3),
    )


@st.composite
def packed_data(draw: st.DrawFn) -> Data:
    """A Data whose 1-D array was rounded to a scheme and goes packed."""
    scheme = draw(st.sampled_from([Scheme.FP16, Scheme.BF16, Scheme.INT8]))
    block = draw(st.sampled_from([8, 13, 256]))
    value = draw(
        arrays(
            dtype=st.sampled_from(FLOAT_DTYPES),
            shape=st.integers(1, 40).map(lambda n: (n,)),
            elements=st.floats(-1e4, 1e4, width=32),
        )
    )
    rounded = nearest(scheme, value, block)
    assert rounded is not None
    packed = Packed.of(scheme, rounded, block)
    assert packed is not None
    return Data(draw(UINT63), draw(tags), draw(UINT63), draw(UINT63), rounded, packed=packed)


messages: st.SearchStrategy[Message] = st.one_of(
    packed_data(),
    st.builds(
        Hello,
        min_version=st.integers(0, 3),
        max_version=st.integers(3, 255),
        cluster=UINT63,
        incarnation=UINT63,
        nonce=UINT63,
        name=texts,
        mac=st.binary(max_size=64),
    ),
    st.builds(
        Welcome,
        version=st.integers(0, 255),
        cluster=UINT63,
        incarnation=UINT63,
        nonce=UINT63,
        mac=st.binary(max_size=64),
    ),
    st.builds(
        Join,
        workers=st.lists(UINT63, max_size=6, unique=True).map(tuple),
        dim=UINT63,
        dtype=st.sampled_from(["float32", "float64"]),
        fingerprint=texts,
    ),
    st.builds(Refuse, reason=st.text(max_size=40)),
    st.builds(
        Data,
        seq=UINT63,
        tag=tags,
        sender=UINT63,
        step=UINT63,
        value=float_arrays,
        to=st.lists(UINT63, max_size=4, unique=True).map(tuple),
        post=st.booleans(),
    ),
    st.builds(Ack, seq=UINT63),
    st.builds(Ping, nonce=UINT63),
    st.builds(Pong, nonce=UINT63),
    st.builds(Bye, reason=st.text(max_size=40)),
    st.builds(Control, name=texts, body=st.dictionaries(texts, body_values(2), max_size=3)),
)


# --- round trips --------------------------------------------------------------------------------


@given(messages)
@settings(max_examples=300, deadline=None)
def test_round_trip_every_message_type(msg: Message) -> None:
    codec = Codec()
    codec.receive_data(encode(msg))
    assert_exact([codec.next_event()], [msg])  # type: ignore[list-item]
    assert codec.next_event() is NEED_DATA


@given(st.lists(messages, min_size=1, max_size=6), st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_chunking_gives_the_same_events(msgs: list[Message], data: st.DataObject) -> None:
    stream = encode(*msgs)
    assert_exact(feed(stream), msgs)  # many frames in one buffer
    assert_exact(feed(stream, [1] * len(stream)), msgs)  # one byte at a time
    rnd = data.draw(st.randoms(use_true_random=False))
    sizes = [rnd.randint(1, 64) for _ in stream]
    assert_exact(feed(stream, sizes), msgs)


@pytest.mark.parametrize("seed", range(4))
def test_long_streams_through_the_smallest_read_buffer(seed: int) -> None:
    # Headers up to ~60 KB in a read buffer that holds just one: the buffer must be compacted
    # again and again without losing or reordering a byte.
    rng = np.random.default_rng(seed)
    msgs: list[Message] = []
    for i in range(60):
        match i % 4:
            case 0:
                msgs.append(Control("blob", {"b": bytes(int(rng.integers(0, 60_000)))}))
            case 1:
                msgs.append(
                    Data(i, ("params", i), 3, i, rng.standard_normal(rng.integers(0, 9000)))
                )
            case 2:
                msgs.append(Ping(i))
            case _:
                value = rng.standard_normal((2, 3)).astype(np.float32)
                msgs.append(Data(i, (), 1, i, value, to=(i, 2 * i + 1), post=True))
    stream = encode(*msgs)
    sizes = [int(n) for n in rng.integers(1, 70_000, size=len(stream))]
    codec = Codec(read_buffer_size=PREFIX.size + MAX_HEADER)
    assert_exact(feed(stream, sizes, codec=codec), msgs)


def test_exact_events_from_known_bytes() -> None:
    stream = encode(Ping(7), Ack(3), Data(1, ("params", 2), 4, 2, np.array([1.5, -2.0])))
    ping = b"PL\x07\x00" + (11).to_bytes(4, "big") + bytes(8) + b"\x82\xa1t\xa4ping\xa1o\x07"
    assert stream.startswith(ping)  # the layout, spelled out once
    codec = Codec()
    codec.receive_data(stream)
    assert codec.next_event() == Ping(7)
    assert codec.next_event() == Ack(3)
    assert codec.next_event() == Data(1, ("params", 2), 4, 2, np.array([1.5, -2.0]))
    assert codec.next_event() is NEED_DATA
    codec.receive_eof()
    assert codec.next_event() is CLOSED
    assert codec.next_event() is CLOSED


def test_big_endian_and_strided_arrays_are_converted_once() -> None:
    big = np.arange(6, dtype=">f8").reshape(2, 3)
    strided = np.arange(12, dtype=np.float32)[::2]
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    msgs = [Data(i, (), 0, 0, v) for i, v in enumerate([big, strided, fortran])]
    got = feed(encode(*msgs))
    assert_exact(got, msgs)  # type: ignore[arg-type]
    for g in got:
        assert isinstance(g, Data) and g.value.flags.c_contiguous


# --- zero copy ----------------------------------------------------------------------------------


def test_send_is_header_then_a_view_of_the_array() -> None:
    array = np.arange(1000, dtype=np.float32)
    chunks = Codec().send(Data(9, ("params", 1), 2, 3, array))
    assert len(chunks) == 2 and isinstance(chunks[0], bytes)
    view = chunks[1]
    assert isinstance(view, memoryview) and view.format == "B" and view.nbytes == array.nbytes
    assert np.shares_memory(np.frombuffer(view, np.uint8), array)  # no copy of the payload
    (only,) = Codec().send(Data(9, (), 2, 3, np.empty((3, 0))))  # empty: the header alone
    assert isinstance(only, bytes)


def test_payload_lands_in_the_allocators_array() -> None:
    alloc = RecordingAllocator()
    codec = Codec(allocator=alloc)
    array = np.random.default_rng(0).standard_normal(200_000)  # 1.6 MB: past the read buffer
    head, payload = Codec().send(Data(5, ("params", 7), 1, 7, array))
    got = feed(bytes(head) + bytes(payload[:1000]), codec=codec)
    assert got == [] and len(alloc.calls) == 1
    region = codec.get_buffer(-1)  # reading the payload: the region IS the array's memory
    assert np.shares_memory(np.frombuffer(region, np.uint8), alloc.calls[0])
    assert region.nbytes == array.nbytes - 1000
    region[:] = payload[1000:]
    codec.buffer_updated(region.nbytes)
    (msg,) = drain(codec)
    assert isinstance(msg, Data) and msg.value is alloc.calls[0]
    assert not msg.value.flags.writeable
    np.testing.assert_array_equal(msg.value, array)
    with pytest.raises(ValueError):
        msg.value[0] = 1.0


def test_small_payloads_also_use_the_allocator() -> None:
    alloc = RecordingAllocator()
    msgs = [Data(i, (), 0, 0, np.full(i, float(i))) for i in range(5)]
    got = feed(encode(*msgs), codec=Codec(allocator=alloc))
    assert got == msgs and len(alloc.calls) == 5
    assert all(g.value is a for g, a in zip(got, alloc.calls, strict=True))  # type: ignore[union-attr]
    assert not any(a.flags.writeable for a in alloc.calls)


def test_a_broken_allocator_is_a_bug_not_a_protocol_error() -> None:
    codec = Codec(allocator=lambda dtype, shape: np.empty(shape, np.float16))
    with pytest.raises(TypeError, match="allocator returned"):
        codec.receive_data(encode(Data(0, (), 0, 0, np.ones(3))))


# --- caps: checked before anything is allocated -------------------------------------------------


def test_header_too_large_before_the_header_arrives() -> None:
    alloc = RecordingAllocator()
    codec = Codec(allocator=alloc)
    codec.receive_data(PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, MAX_HEADER + 1, 8))
    with pytest.raises(RemoteProtocolError) as info:
        codec.next_event()
    assert info.value.reason is Reason.HEADER_TOO_LARGE and alloc.calls == []


def test_payload_too_large_without_allocating() -> None:
    alloc = RecordingAllocator()
    stream = encode(Data(0, (), 0, 0, np.ones(13)))  # 104 bytes
    err = remote_error(stream, Codec(max_payload=100, allocator=alloc))
    assert err.reason is Reason.PAYLOAD_TOO_LARGE and alloc.calls == []
    # the prefix alone suffices, even for an absurd length
    err = remote_error(
        PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 10, 2**64 - 1), Codec(allocator=alloc)
    )
    assert err.reason is Reason.PAYLOAD_TOO_LARGE and alloc.calls == []
    with pytest.raises(LocalProtocolError) as info:
        Codec(max_payload=100).send(Data(0, (), 0, 0, np.ones(13)))
    assert info.value.reason is Reason.PAYLOAD_TOO_LARGE


@pytest.mark.parametrize(
    ("shape", "plen", "reason"),
    [
        ((3,), 16, Reason.SIZE_MISMATCH),  # 24 bytes announced by the shape
        ((2, 0), 8, Reason.SIZE_MISMATCH),
        ((2**61, 4), 0, Reason.BAD_SHAPE),  # 2**66 bytes: would wrap to 0 in int64 arithmetic
        ((2**40, 2**40, 2**40), 0, Reason.BAD_SHAPE),
        ((0, 2**62), 0, Reason.BAD_SHAPE),  # empty, yet numpy cannot allocate it
        ((2**63 - 1, 0, 1, 1), 0, Reason.BAD_SHAPE),
    ],
)
def test_shape_and_size_are_checked_before_allocating(
    shape: tuple[int, ...], plen: int, reason: Reason
) -> None:
    alloc = RecordingAllocator()
    err = remote_error(
        frame(data_header(h=shape), bytes(plen)), Codec(allocator=alloc, max_payload=2**40)
    )
    assert err.reason is reason and alloc.calls == []


def test_empty_arrays_with_large_dimensions_round_trip() -> None:
    msg = Data(0, (), 0, 0, np.empty((0, 2**40), np.float32))
    assert feed(encode(msg)) == [msg]


def test_payload_on_a_frame_without_one() -> None:
    assert remote_error(frame({"t": "ack", "q": 1}, b"x")).reason is Reason.SIZE_MISMATCH


# --- malformed input: one reason each -----------------------------------------------------------

GOOD = data_header()
PAY = bytes(16)


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", Reason.BAD_MAGIC),
        (b"GE", Reason.BAD_MAGIC),  # refused after two bytes
        (frame(GOOD, PAY, version=PROTOCOL_VERSION + 1), Reason.UNSUPPORTED_VERSION),
        (frame(GOOD, PAY, version=0), Reason.UNSUPPORTED_VERSION),
        (frame(GOOD, PAY, flags=4), Reason.BAD_FLAGS),
        (frame(b"\xc1", PAY), Reason.BAD_HEADER),  # 0xc1: never used in msgpack
        (frame(b"", PAY), Reason.BAD_HEADER),
        (frame(msgpack.packb(GOOD) + b"\x00", PAY), Reason.BAD_HEADER),  # trailing byte
        (frame(b"\x91" * 3000 + b"\xc0", PAY), Reason.BAD_HEADER),  # nested 3000 deep
        (frame([1, 2], PAY), Reason.BAD_HEADER),
        (frame({"q": 1}), Reason.BAD_HEADER),  # no type
        (frame({"t": 5}), Reason.BAD_HEADER),
        (frame({1: 2}), Reason.BAD_HEADER),  # int map key (strict_map_key)
        (frame({"t": "gossip"}), Reason.UNKNOWN_TYPE),
        (frame({"t": "ack"}), Reason.BAD_HEADER),  # missing key
        (frame({"t": "ack", "q": 1, "z": 0}), Reason.BAD_HEADER),  # unexpected key
        (frame({"t": "ack", "q": "1"}), Reason.BAD_FIELD),
        (frame({"t": "ack", "q": True}), Reason.BAD_FIELD),
        (frame({"t": "ack", "q": 1.0}), Reason.BAD_FIELD),
        (frame({"t": "ack", "q": -1}), Reason.BAD_FIELD),
        (frame({"t": "ack", "q": 2**64 - 1}), Reason.BAD_FIELD),  # uint64, not int64
        (
            frame({"t": "welcome", "v": 3, "c": None, "i": 1, "o": 1, "m": b""}),
            Reason.BAD_FIELD,
        ),
        (frame({"t": "bye", "r": b"bytes"}), Reason.BAD_FIELD),
        (frame({"t": "bye", "r": "x" * 2000}), Reason.BAD_FIELD),
        (frame({"t": "control", "k": "x", "b": [1]}), Reason.BAD_FIELD),
        (frame({"t": "control", "k": "x", "b": {"a": msgpack.ExtType(1, b"")}}), Reason.BAD_FIELD),
        (frame(data_header(g=("params", 1.5)), PAY), Reason.BAD_FIELD),
        (frame(data_header(g=("params", True)), PAY), Reason.BAD_FIELD),
        (frame(data_header(g="params"), PAY), Reason.BAD_FIELD),
        (frame(data_header(s=-3), PAY), Reason.BAD_FIELD),
        (frame(data_header(y="f2"), bytes(4)), Reason.BAD_DTYPE),
        (frame(data_header(y=8), PAY), Reason.BAD_DTYPE),
        (frame(data_header(h=(-2,)), PAY), Reason.BAD_SHAPE),
        (frame(data_header(h=(1, 1, 1, 1, 2)), PAY), Reason.BAD_SHAPE),
        (frame(data_header(h=(2.0,)), PAY), Reason.BAD_SHAPE),
        (frame(data_header(h=(True, 2)), PAY), Reason.BAD_SHAPE),
        (frame(data_header(h=2), PAY), Reason.BAD_SHAPE),
        (frame(data_header(h=(2**63,)), PAY), Reason.BAD_SHAPE),
        (
            frame({"t": "join", "w": (1, 1), "d": 3, "y": "", "f": "", "m": b"", "s": ()}),
            Reason.BAD_FIELD,  # duplicate worker ids
        ),
        # packed arrays: [scheme, block], one dimension, exactly the packed size
        (frame(data_header(z=("int4", 8)), bytes(10)), Reason.BAD_FIELD),
        (frame(data_header(z=("none", 0)), PAY), Reason.BAD_FIELD),
        (frame(data_header(z=("int8", 4)), bytes(4)), Reason.BAD_FIELD),
        (frame(data_header(z=("int8", 8.0)), bytes(4)), Reason.BAD_FIELD),
        (frame(data_header(z=("int8", 0.5)), bytes(4)), Reason.BAD_FIELD),
        (frame(data_header(z=("fp16", 8)), bytes(4)), Reason.BAD_FIELD),
        (frame(data_header(z=("fp16",)), bytes(4)), Reason.BAD_FIELD),
        (frame(data_header(z="fp16"), bytes(4)), Reason.BAD_FIELD),
        (frame(data_header(z=("fp16", 0), h=(1, 2)), bytes(4)), Reason.BAD_SHAPE),
        (frame(data_header(z=("fp16", 0), h=(0,))), Reason.BAD_SHAPE),
        (frame(data_header(z=("fp16", 0)), bytes(16)), Reason.SIZE_MISMATCH),  # the floats'
        (frame(data_header(z=("int8", 8)), bytes(3)), Reason.SIZE_MISMATCH),  # 2 + 2 expected
    ],
)
def test_malformed_input_reason(stream: bytes, reason: Reason) -> None:
    alloc = RecordingAllocator()
    err = remote_error(stream, Codec(allocator=alloc))
    assert err.reason is reason, err
    assert alloc.calls == []
    assert isinstance(err, ProtocolError) and isinstance(err, PeerlearnError)


def test_unsupported_version_message() -> None:
    err = remote_error(frame({"t": "ping", "o": 1}, version=PROTOCOL_VERSION + 1))
    assert str(err) == (
        f"unsupported protocol version {PROTOCOL_VERSION + 1} (this side speaks {PROTOCOL_VERSION})"
    )


def test_errors_come_after_the_good_frames_and_stick() -> None:
    codec = Codec()
    codec.receive_data(encode(Ping(1), Pong(1)) + b"XX" + encode(Ping(2)))
    assert codec.next_event() == Ping(1)
    assert codec.next_event() == Pong(1)
    with pytest.raises(RemoteProtocolError) as first:
        codec.next_event()
    assert first.value.reason is Reason.BAD_MAGIC and codec.error is first.value
    for call in (
        codec.next_event,
        lambda: codec.get_buffer(-1),
        lambda: codec.buffer_updated(1),
        lambda: codec.receive_data(b"x"),
    ):
        with pytest.raises(RemoteProtocolError) as again:
            call()
        assert again.value is first.value
    assert encode(Bye("protocol error: bad_magic"), codec=codec)  # sending still works


def test_end_of_stream() -> None:
    codec = Codec()
    codec.receive_data(encode(Ping(1)))
    codec.receive_data(b"")
    assert drain(codec) == [Ping(1)] and codec.next_event() is CLOSED
    with pytest.raises(RuntimeError):
        codec.receive_data(b"more")
    for cut in (1, PREFIX.size, PREFIX.size + 3, len(encode(Data(0, (), 0, 0, np.ones(4)))) - 1):
        codec = Codec()
        codec.receive_data(
            encode(Ping(1), Data(0, (), 0, 0, np.ones(4)))[: len(encode(Ping(1))) + cut]
        )
        codec.receive_eof()
        assert codec.next_event() == Ping(1)
        with pytest.raises(RemoteProtocolError) as info:
            codec.next_event()
        assert info.value.reason is Reason.TRUNCATED


def test_buffer_updated_must_stay_within_the_lent_region() -> None:
    codec = Codec()
    with pytest.raises(ValueError):
        codec.buffer_updated(1)  # nothing lent
    region = codec.get_buffer(-1)
    with pytest.raises(ValueError):
        codec.buffer_updated(len(region) + 1)


# --- hypothesis: hostile input raises nothing but RemoteProtocolError ----------------------------


def drain_until_error(codec: Codec, data: bytes, chunk: int) -> None:
    try:
        for i in range(0, len(data), chunk):
            codec.receive_data(data[i : i + chunk])
            drain(codec)
        codec.receive_eof()
        drain(codec)
    except RemoteProtocolError:
        pass


@given(st.lists(messages, min_size=1, max_size=3), st.data())
@settings(max_examples=150, deadline=None)
def test_truncated_frames_need_data(msgs: list[Message], data: st.DataObject) -> None:
    stream = encode(*msgs)
    last = encode(msgs[-1])
    cut = data.draw(st.integers(len(stream) - len(last), len(stream) - 1))
    codec = Codec()
    if cut:  # (empty bytes would mean end of stream)
        codec.receive_data(stream[:cut])
    assert drain(codec) == msgs[:-1]
    assert codec.next_event() is NEED_DATA


@given(st.lists(messages, min_size=1, max_size=3), st.data())
@settings(max_examples=300, deadline=None)
def test_bit_flips_raise_only_remote_protocol_errors(
    msgs: list[Message], data: st.DataObject
) -> None:
    stream = bytearray(encode(*msgs))
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, 8 * len(stream) - 1))
        stream[bit // 8] ^= 1 << (bit % 8)
    # flips inside a payload are undetectable (no checksum: TCP has one), so only the type of
    # any exception is asserted
    drain_until_error(Codec(max_payload=1 << 20), bytes(stream), data.draw(st.integers(1, 512)))


@given(st.binary(max_size=512), st.integers(1, 64))
@settings(max_examples=300, deadline=None)
def test_random_bytes_raise_only_remote_protocol_errors(junk: bytes, chunk: int) -> None:
    drain_until_error(Codec(max_payload=1 << 20), junk, chunk)
    drain_until_error(Codec(max_payload=1 << 20), MAGIC + bytes([1, 0]) + junk, chunk)


# --- sending illegal messages -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: Data(0, (), 0, 0, np.ones(3, np.float16)), Reason.BAD_DTYPE),
        (lambda: Data(0, (), 0, 0, np.ones(3, np.int64)), Reason.BAD_DTYPE),
        (lambda: Data(0, (), 0, 0, [1.0, 2.0]), Reason.BAD_DTYPE),  # type: ignore[arg-type]
        (lambda: Data(0, (), 0, 0, np.ones((1,) * 5)), Reason.BAD_SHAPE),
        (lambda: Data(-1, (), 0, 0, np.ones(1)), Reason.BAD_FIELD),
        (lambda: Data(0, ("x",) * 4097, 0, 0, np.ones(1)), Reason.BAD_FIELD),
        (lambda: Data(0, (), 0, 0, np.ones(1), to=(1, 1)), Reason.BAD_FIELD),
        (lambda: Data(0, (), 0, 0, np.ones(1), to=(-1,)), Reason.BAD_FIELD),
        (lambda: Data(0, (), 0, 0, np.ones(1), post=1), Reason.BAD_FIELD),  # type: ignore[arg-type]
        (lambda: Data(0, (1.0,), 0, 0, np.ones(1)), Reason.BAD_FIELD),  # type: ignore[arg-type]
        (lambda: Ack(True), Reason.BAD_FIELD),
        (lambda: Ping(2**63), Reason.BAD_FIELD),
        (lambda: Bye("x" * 1025), Reason.BAD_FIELD),
        (lambda: Hello(3, 256, 0, 1, 1, "n"), Reason.BAD_FIELD),
        (lambda: Hello(4, 3, 0, 1, 1, "n"), Reason.BAD_FIELD),  # an empty range
        (lambda: Hello(3, 3, 0, 1, 1, "n", mac=b"x" * 65), Reason.BAD_FIELD),
        (lambda: Hello(3, 3, 0, 1, 1, "n", mac="text"), Reason.BAD_FIELD),  # type: ignore[arg-type]
        (lambda: Join((1, 1), 1, "float64", "f"), Reason.BAD_FIELD),
        (lambda: Control("x", {"a": {1, 2}}), Reason.BAD_FIELD),
        (lambda: Control("x", {"a": ((((((((((1,),),),),),),),),),)}), Reason.BAD_FIELD),
    ],
)
def test_illegal_messages_are_refused_locally(build: Callable[[], Message], reason: Reason) -> None:
    with pytest.raises(LocalProtocolError) as info:
        build()
    assert info.value.reason is reason


def test_oversized_headers_are_refused_on_send() -> None:
    join = Join(tuple(range(2**40, 2**40 + 9000)), 1, "float64", "f")
    with pytest.raises(LocalProtocolError) as info:
        Codec().send(join)
    assert info.value.reason is Reason.HEADER_TOO_LARGE
    with pytest.raises(LocalProtocolError) as info:
        Codec().send("not a message")  # type: ignore[arg-type]
    assert info.value.reason is Reason.UNKNOWN_TYPE


def test_fields_are_normalized() -> None:
    msg = Data(np.int64(3), ["params", np.int32(2)], 1, 2, np.zeros(2))  # type: ignore[arg-type]
    assert msg.seq == 3 and type(msg.seq) is int and msg.tag == ("params", 2)
    assert Control("c", {"a": [1, [2]]}).body == {"a": (1, (2,))}
    with pytest.raises(TypeError):
        Ack(1, kind="ping")  # type: ignore[call-arg]  # the type is fixed


def test_error_classes() -> None:
    with pytest.raises(TypeError):
        ProtocolError(Reason.BAD_MAGIC, "abstract")
    assert issubclass(HandshakeError, RemoteProtocolError)
    assert issubclass(RemoteProtocolError, PeerlearnError)
    assert (
        f"{Reason.BAD_MAGIC}" == str(Reason.BAD_MAGIC) == "bad_magic"
    )  # usable as a Prometheus label as is


# --- handshake ----------------------------------------------------------------------------------

HELLO = Hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, 2, 10**18, 7, "b")
JOIN = Join((4, 5), 12, "float64", "run-abc")
EXPECT = {"expect_dim": 12, "expect_dtype": "float64", "expect_fingerprint": "run-abc"}


def test_the_highest_common_version_is_spoken() -> None:
    assert negotiate(HELLO) == PROTOCOL_VERSION
    assert negotiate(replace(HELLO, max_version=PROTOCOL_VERSION + 5)) == PROTOCOL_VERSION
    with pytest.raises(HandshakeError) as info:
        negotiate(replace(HELLO, min_version=PROTOCOL_VERSION + 1, max_version=255))
    assert info.value.reason is Reason.UNSUPPORTED_VERSION
    assert f"peer speaks protocol versions {PROTOCOL_VERSION + 1}..255" in str(info.value)
    assert "(peer 'b', cluster 2)" in str(info.value)
    with pytest.raises(HandshakeError):
        negotiate(replace(HELLO, min_version=0, max_version=MIN_PROTOCOL_VERSION - 1))


def test_check_join_accepts_a_matching_peer() -> None:
    check_join(JOIN, **EXPECT)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "reason", "text"),
    [
        ({"dim": 10}, Reason.DIM_MISMATCH, "dim 10 != 12"),
        ({"dtype": "float32"}, Reason.DTYPE_MISMATCH, "dtype float32 != float64"),
        (
            {"fingerprint": "run-xyz"},
            Reason.FINGERPRINT_MISMATCH,
            "fingerprint mismatch: peer runs 'run-xyz'",
        ),
    ],
)
def test_check_join_mismatches(change: dict[str, Any], reason: Reason, text: str) -> None:
    with pytest.raises(HandshakeError) as info:
        check_join(replace(JOIN, **change), **EXPECT)  # type: ignore[arg-type]
    assert info.value.reason is reason
    assert str(info.value).startswith(text)


def test_a_hello_of_other_versions_decodes_so_it_can_be_refused() -> None:
    (hello,) = feed(encode(Hello(8, 9, 1, 1, 1, "future")))
    assert isinstance(hello, Hello)
    with pytest.raises(HandshakeError, match=r"peer speaks protocol versions 8\.\.9"):
        negotiate(hello)


# --- layering -----------------------------------------------------------------------------------


def test_wire_does_no_io() -> None:
    banned = {"asyncio", "socket", "selectors", "uvloop", "ssl"}
    for path in pathlib.Path(wire.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & banned, (path.name, names)


# --- packed arrays ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [Scheme.FP16, Scheme.BF16, Scheme.INT8])
def test_a_packed_array_goes_as_its_packed_bytes_in_parts_and_comes_back_exact(
    scheme: Scheme,
) -> None:
    rounded = nearest(scheme, np.random.default_rng(1).standard_normal(10_001), 256)
    assert rounded is not None
    packed = Packed.of(scheme, rounded, 256)
    assert packed is not None
    msg = Data(3, ("params", 2), 1, 2, rounded, packed=packed)
    frames = Codec().send_parts(msg, part_bytes=4096)
    sent = sum(len(chunk) for f in frames for chunk in f)
    assert sent < rounded.nbytes / 3  # two bytes a value (int8: one), not eight
    alloc = RecordingAllocator()
    got = feed(b"".join(bytes(c) for f in frames for c in f), [777] * 200, Codec(allocator=alloc))
    assert_exact(got, [msg])
    assert alloc.calls[-1] is got[0].value  # unpacked into the allocator's array
    assert not got[0].value.flags.writeable


def test_a_value_that_does_not_pack_exactly_is_not_packed() -> None:
    assert Packed.of(Scheme.FP16, np.array([0.1, 0.2]), 0) is None  # nobody rounded it
    assert Packed.of(Scheme.INT8, np.zeros((2, 2)), 8) is None  # one dimension only


def test_a_packed_array_is_capped_by_the_array_it_unpacks_to() -> None:
    """int8 unpacks to 8 bytes a value from about one: the cap is on the unpacked array, checked
    before anything is allocated."""
    header = data_header(z=("int8", 256), h=(10_000,))
    alloc = RecordingAllocator()
    codec = Codec(max_payload=40_000, allocator=alloc)
    err = remote_error(frame(header, bytes(10_000 + 2 * 40)), codec)
    assert err.reason is Reason.PAYLOAD_TOO_LARGE and alloc.calls == []


def test_non_finite_packed_values_unpack_and_are_left_to_the_receiver() -> None:
    """An exponent past float64's range unpacks to an infinity: the codec reports what came
    (the transport drops non-finite frames, counted); it does not fail the stream."""
    raw = np.array([1, 0], np.int8).view(np.uint8).tobytes() + np.array([2000], "<i2").tobytes()
    (got,) = feed(frame(data_header(z=("int8", 8)), raw))
    assert isinstance(got, Data) and np.isinf(got.value[0]) and not np.isfinite(got.value[1])
