"""Framing edge cases of the wire codec that tests/test_wire.py leaves open (mutation-tested).

The exact boundaries of every cap (``max_payload``, ``MAX_HEADER``, the read buffer), the byte
count of each received frame (``last_size``), the compaction of the scratch buffer (the region
``get_buffer`` offers), what an error says and keeps (its cause, its text, ``repr``), and the
defensive paths of the header encoder and decoder.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from peerlearn.wire import (
    MAGIC,
    MAX_HEADER,
    PREFIX,
    PROTOCOL_VERSION,
    Ack,
    Codec,
    Control,
    Data,
    Join,
    LocalProtocolError,
    Message,
    Ping,
    ProtocolError,
    Reason,
    RemoteProtocolError,
)
from peerlearn.wire.header import encode_header
from tests.test_wire import data_header, drain, encode, frame, remote_error

SMALLEST = PREFIX.size + MAX_HEADER  # the smallest read buffer a codec accepts

# --- helpers ------------------------------------------------------------------------------------


def put(codec: Codec, data: bytes) -> None:
    """Write ``data`` into one get_buffer region (it must fit) and report it."""
    region = codec.get_buffer(-1)
    assert len(data) <= len(region)
    region[: len(data)] = data
    codec.buffer_updated(len(data))


def control_frame(header_len: int) -> bytes:
    """An encoded Control frame whose msgpack header is exactly ``header_len`` bytes."""
    overhead = len(encode(Control("x", {"b": bytes(1000)}))) - PREFIX.size - 1000
    out = encode(Control("x", {"b": bytes(header_len - overhead)}))
    assert len(out) == PREFIX.size + header_len
    return out


# --- constructor bounds -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 2**64, 2**64 + 1])
def test_max_payload_must_fit_a_u64(bad: int) -> None:
    with pytest.raises(ValueError, match=rf"max_payload {bad} not in \[0, 2\*\*64\)"):
        Codec(max_payload=bad)
    Codec(max_payload=2**64 - 1)  # the largest a prefix can announce


def test_max_payload_zero_still_carries_every_message_without_a_payload() -> None:
    codec = Codec(max_payload=0)
    empty = Data(0, (), 0, 0, np.empty((2, 0)))
    codec.receive_data(encode(Ping(1), empty, codec=codec))
    assert drain(codec) == [Ping(1), empty]
    with pytest.raises(LocalProtocolError) as info:
        codec.send(Data(0, (), 0, 0, np.ones(1)))
    assert info.value.reason is Reason.PAYLOAD_TOO_LARGE


def test_read_buffer_must_hold_a_prefix_and_the_largest_header() -> None:
    with pytest.raises(ValueError, match=rf"read_buffer_size {SMALLEST - 1} < {SMALLEST}"):
        Codec(read_buffer_size=SMALLEST - 1)
    assert len(Codec(read_buffer_size=SMALLEST).get_buffer(-1)) == SMALLEST


def test_a_codec_not_trusted_yet_takes_small_frames_into_a_small_buffer_then_widens() -> None:
    """An inbound connection before its handshake: headers up to max_header, no payload, a
    buffer of a prefix and one such header; widen() lifts both caps, and the buffer grows at
    the next read keeping the bytes not parsed yet."""
    small = Codec(max_payload=0, max_header=1000, read_buffer_size=PREFIX.size + 1000)
    assert len(small.get_buffer(-1)) == PREFIX.size + 1000
    err = remote_error(control_frame(1001), Codec(max_header=1000, read_buffer_size=SMALLEST))
    assert err.reason is Reason.HEADER_TOO_LARGE and "> 1000" in str(err)
    with pytest.raises(ValueError, match="max_header"):
        Codec(max_header=MAX_HEADER + 1)
    with pytest.raises(ValueError, match="read_buffer_size"):
        Codec(max_header=1000, read_buffer_size=PREFIX.size + 999)
    big = control_frame(5000)
    small.receive_data(big[:10])  # a prefix in part: not parsed yet
    small.widen(max_payload=64)
    small.receive_data(big[10:])
    (msg,) = drain(small)
    assert isinstance(msg, Control) and encode(msg) == big
    assert len(small.get_buffer(-1)) >= 256 * 1024 - len(big)
    value = Data(0, ("params", 1), 0, 1, np.ones(8))
    small.receive_data(encode(value))
    assert drain(small) == [value]


# --- caps are inclusive -------------------------------------------------------------------------


@given(arrays(st.sampled_from(["<f4", "<f8"]), array_shapes(min_dims=0, max_dims=3, max_side=5)))
@settings(max_examples=40, deadline=None)
def test_a_payload_of_exactly_max_payload_passes_both_ways(value: np.ndarray) -> None:
    msg = Data(3, ("params", 1), 2, 1, value)
    codec = Codec(max_payload=value.nbytes)
    codec.receive_data(encode(msg, codec=codec))
    assert drain(codec) == [msg]
    if value.nbytes:
        with pytest.raises(LocalProtocolError):
            Codec(max_payload=value.nbytes - 1).send(msg)
        err = remote_error(encode(msg), Codec(max_payload=value.nbytes - 1))
        assert err.reason is Reason.PAYLOAD_TOO_LARGE


def test_a_header_of_exactly_max_header_passes_both_ways() -> None:
    stream = control_frame(MAX_HEADER)
    codec = Codec(read_buffer_size=SMALLEST)
    codec.receive_data(stream)
    (msg,) = drain(codec)
    assert isinstance(msg, Control) and encode(msg) == stream


# --- the byte count of each frame ---------------------------------------------------------------


small_messages = st.one_of(
    st.builds(Ping, st.integers(0, 2**63 - 1)),
    st.builds(Ack, st.integers(0, 2**63 - 1)),
    st.builds(
        Data,
        st.integers(0, 9),
        st.just(("params", 1)),
        st.integers(0, 9),
        st.integers(0, 9),
        arrays(st.sampled_from(["<f4", "<f8"]), array_shapes(min_dims=0, max_dims=2, max_side=40)),
    ),
)


@given(st.lists(small_messages, min_size=1, max_size=5))
@settings(max_examples=60, deadline=None)
def test_last_size_is_the_frame_on_the_wire(msgs: list[Message]) -> None:
    codec = Codec()
    assert codec.last_size == 0  # nothing returned yet
    codec.receive_data(encode(*msgs))
    for msg in msgs:
        assert codec.next_event() == msg
        assert codec.last_size == len(encode(msg))


# --- feeding ------------------------------------------------------------------------------------


def test_receive_data_takes_more_than_one_region() -> None:
    msg = Data(1, (), 0, 0, np.arange(100_000.0))  # 800 kB: several regions
    codec = Codec()
    codec.receive_data(encode(msg, Ping(2)))
    assert drain(codec) == [msg, Ping(2)]


def test_buffer_updated_needs_a_fresh_nonempty_region() -> None:
    codec = Codec()
    codec.get_buffer(-1)
    with pytest.raises(ValueError, match=r"buffer_updated\(0\) but get_buffer lent \d+ bytes"):
        codec.buffer_updated(0)
    put(codec, encode(Ping(1))[:5])
    with pytest.raises(ValueError, match=r"buffer_updated\(1\) but get_buffer lent 0 bytes"):
        codec.buffer_updated(1)  # the region was used up
    put(codec, encode(Ping(1))[5:])
    assert drain(codec) == [Ping(1)]


# --- compaction of the read buffer --------------------------------------------------------------

PING = encode(Ping(1))


def test_an_idle_codec_offers_the_whole_read_buffer() -> None:
    codec = Codec(read_buffer_size=SMALLEST)
    assert len(codec.get_buffer(-1)) == SMALLEST
    put(codec, PING * 3)
    assert drain(codec) == [Ping(1)] * 3
    assert len(codec.get_buffer(-1)) == SMALLEST


@pytest.mark.parametrize(
    ("header_len", "compacted"),
    [
        (MAX_HEADER, True),  # would run past the end of the buffer: moved to the front
        (MAX_HEADER - len(PING), False),  # ends exactly at the end of the buffer: left in place
    ],
)
def test_a_pending_header_is_compacted_only_if_it_would_not_fit(
    header_len: int, compacted: bool
) -> None:
    codec = Codec(read_buffer_size=SMALLEST)
    stream = PING + control_frame(header_len)
    fed = len(PING) + PREFIX.size + 100
    put(codec, stream[:fed])
    assert drain(codec) == [Ping(1)]
    assert len(codec.get_buffer(-1)) == (SMALLEST - 100 if compacted else SMALLEST - fed)
    codec.buffer_updated(1)  # (the region must be reported before the next one is asked for)
    codec.receive_data(stream[fed + 1 :])
    (msg,) = drain(codec)
    assert isinstance(msg, Control)


@pytest.mark.parametrize(("free", "compacted"), [(4095, True), (4096, False)])
def test_the_buffer_is_compacted_when_under_4096_bytes_are_free(free: int, compacted: bool) -> None:
    codec = Codec(read_buffer_size=SMALLEST)
    first = control_frame(SMALLEST - free - 5 - PREFIX.size)
    put(codec, first + PING[:5])  # a whole frame, then 5 bytes of the next prefix
    assert len(drain(codec)) == 1
    assert len(codec.get_buffer(-1)) == (SMALLEST - 5 if compacted else free)
    codec.buffer_updated(1)
    codec.receive_data(PING[6:])
    assert drain(codec) == [Ping(1)]


# --- errors: what they keep and what they say -----------------------------------------------------


def test_end_of_stream_after_an_error_keeps_the_error() -> None:
    codec = Codec()
    codec.receive_data(PING + b"XX" + PING[2:7])
    codec.receive_eof()
    assert codec.next_event() == Ping(1)
    with pytest.raises(RemoteProtocolError) as info:
        codec.next_event()
    assert info.value.reason is Reason.BAD_MAGIC
    assert repr(codec) == "Codec(idle, buffered=7, events=0, error=bad_magic, eof=False)"


def test_a_remote_error_is_caused_by_its_local_twin() -> None:
    err = remote_error(frame({"t": "gossip"}))
    assert isinstance(err.__cause__, LocalProtocolError)
    assert err.__cause__.reason is err.reason and str(err.__cause__) == str(err)
    assert repr(err) == "RemoteProtocolError('unknown_type', \"unknown message type 'gossip'\")"


def test_after_end_of_stream_no_data_can_follow() -> None:
    codec = Codec()
    codec.receive_eof()
    with pytest.raises(RuntimeError, match="received end of stream"):
        codec.get_buffer(-1)


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError, match="ProtocolError is abstract"):
        ProtocolError(Reason.BAD_MAGIC, "x")


def truncated(cut: int, *msgs: Message) -> Callable[[Codec], None]:
    def run(codec: Codec) -> None:
        codec.receive_data(encode(*msgs)[:cut])
        codec.receive_eof()

    return run


def fed(data: bytes) -> Callable[[Codec], None]:
    return lambda codec: codec.receive_data(data)


def sent(msg: object) -> Callable[[Codec], object]:
    return lambda codec: codec.send(msg)  # type: ignore[arg-type]


# Each error names what was wrong, with the offending value (an excerpt of it).
@pytest.mark.parametrize(
    ("run", "reason", "texts"),
    [
        (fed(b"GET /"), Reason.BAD_MAGIC, ["bad magic b'GE'", "b'PL'"]),
        (fed(frame({"t": "ack", "q": 1}, flags=4)), Reason.BAD_FLAGS, ["flags set: 0x04"]),
        (
            fed(PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, MAX_HEADER + 1, 0)),
            Reason.HEADER_TOO_LARGE,
            [f"header of {MAX_HEADER + 1} bytes > {MAX_HEADER}"],
        ),
        (
            fed(PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 9, 2**64 - 1)),
            Reason.PAYLOAD_TOO_LARGE,
            [f"payload of {2**64 - 1} bytes > max_payload"],
        ),
        (fed(frame(b"\xc1")), Reason.BAD_HEADER, ["not valid msgpack (FormatError)"]),
        (fed(frame([1, 2])), Reason.BAD_HEADER, ["msgpack tuple, expected a map"]),
        (fed(frame({"q": 1})), Reason.BAD_HEADER, ["'t' missing", "None"]),
        (fed(frame({"t": "gossip"})), Reason.UNKNOWN_TYPE, ["unknown message type 'gossip'"]),
        (
            fed(frame({"t": "ack", "z": 0})),
            Reason.BAD_HEADER,
            ["ack header: missing keys ['q'], unexpected keys [\"'z'\"]"],
        ),
        (fed(frame({"t": "ack", "q": 1}, b"xy")), Reason.SIZE_MISMATCH, ["2-byte payload"]),
        (fed(frame(data_header(y="f2"), bytes(16))), Reason.BAD_DTYPE, ["dtype 'f2'", "'f4'"]),
        (fed(frame(data_header(h=(1,) * 5), bytes(8))), Reason.BAD_SHAPE, ["(1, 1, 1, 1, 1)"]),
        (fed(frame(data_header(h=(-2,)))), Reason.BAD_SHAPE, ["(-2,)", "int64 ≥ 0"]),
        (fed(frame(data_header(h=(2**61, 4)))), Reason.BAD_SHAPE, ["too large for an array"]),
        (fed(frame(data_header(h=(2**63 - 1, 0)))), Reason.BAD_SHAPE, ["too large for an array"]),
        (
            fed(frame(data_header(h=(3,)), bytes(16))),
            Reason.SIZE_MISMATCH,
            ["f8 (3,) is 24 bytes, the frame carries 16"],
        ),
        (truncated(3, Ping(1)), Reason.TRUNCATED, ["inside a frame: 3 of 16 prefix bytes"]),
        (truncated(18, Ping(1)), Reason.TRUNCATED, ["2 of 11 header bytes"]),
        (
            truncated(len(PING) + 100, Ping(1), Data(0, (), 0, 0, np.ones(40_000))),
            Reason.TRUNCATED,
            ["payload bytes"],
        ),
    ],
)
def test_remote_errors_say_what_was_wrong(
    run: Callable[[Codec], None], reason: Reason, texts: list[str]
) -> None:
    codec = Codec()
    run(codec)
    with pytest.raises(RemoteProtocolError) as info:
        drain(codec)
    assert info.value.reason is reason
    for text in texts:
        assert text in str(info.value)


@pytest.mark.parametrize(
    ("run", "reason", "texts"),
    [
        (sent(Data(0, (), 0, 0, np.ones(2))), Reason.PAYLOAD_TOO_LARGE, ["16 bytes", "is 8"]),
        (sent("ping"), Reason.UNKNOWN_TYPE, ["not a message: str"]),
        (
            sent(Join(tuple(range(2**40, 2**40 + 9000)), 1, "float64", "f")),
            Reason.HEADER_TOO_LARGE,
            ["join header of 81", f"> {MAX_HEADER}"],
        ),
    ],
)
def test_local_errors_say_what_was_wrong(
    run: Callable[[Codec], object], reason: Reason, texts: list[str]
) -> None:
    with pytest.raises(LocalProtocolError) as info:
        run(Codec(max_payload=8))
    assert info.value.reason is reason
    for text in texts:
        assert text in str(info.value)


def test_repr_shows_the_state() -> None:
    codec = Codec()
    assert repr(codec) == "Codec(idle, buffered=0, events=0, error=None, eof=False)"
    codec.receive_data(PING + PING[:20])
    assert repr(codec) == "Codec(header, buffered=4, events=1, error=None, eof=False)"
    codec.receive_data(PING[20:] + encode(Data(0, (), 0, 0, np.ones(40_000)))[:1000])
    assert repr(codec) == "Codec(payload, buffered=0, events=2, error=None, eof=False)"
    codec.receive_eof()
    assert repr(codec) == "Codec(payload, buffered=0, events=2, error=truncated, eof=True)"
    failed = Codec()  # a failed codec stays where the frame broke: here, its empty header
    failed.receive_data(frame(b""))
    assert repr(failed) == "Codec(header, buffered=0, events=0, error=bad_header, eof=False)"


# --- defensive paths of the header codec ----------------------------------------------------------


def test_encode_header_of_data_needs_the_wire_array() -> None:
    with pytest.raises(ValueError, match="needs the wire array"):
        encode_header(Data(0, (), 0, 0, np.ones(1)))


def test_an_unpackable_field_is_a_local_bad_field() -> None:
    ping = Ping(1)
    object.__setattr__(ping, "nonce", 2**70)  # past the constructor's validation
    with pytest.raises(LocalProtocolError) as info:
        Codec().send(ping)
    assert info.value.reason is Reason.BAD_FIELD
    assert str(info.value).startswith("ping: cannot pack (")
    assert isinstance(info.value.__cause__, OverflowError)


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        # non-str map keys are refused by the unpacker, nested ones too (strict_map_key)
        (frame({"t": "control", "k": "x", "b": {1: 2}}), Reason.BAD_HEADER),
        (frame({"t": "control", "k": "x", "b": {"a": {None: 2}}}), Reason.BAD_HEADER),
        # an unhashable dtype code is a bad dtype, not a crash
        (frame(data_header(y={"a": 1}), bytes(16)), Reason.BAD_DTYPE),
        (frame(data_header(y=["f8"]), bytes(16)), Reason.BAD_DTYPE),
    ],
)
def test_header_edge_cases(stream: bytes, reason: Reason) -> None:
    assert remote_error(stream).reason is reason
