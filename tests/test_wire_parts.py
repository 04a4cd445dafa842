"""A large Data in parts (protocol 6): the sender's parts reassemble into the very array, with
whole frames between them; every part out of sequence is one ``bad_part`` error, found before
anything is allocated for it."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.wire import (
    PREFIX,
    Ack,
    Codec,
    Control,
    Data,
    Message,
    Ping,
    Reason,
    RemoteProtocolError,
)
from peerlearn.wire.codec import MORE, PART
from tests.test_wire import RecordingAllocator, data_header, drain, feed, frame, remote_error

#: a header of a 10-float64 Data (80 bytes of array)
HEAD = data_header(h=(10,))
ARRAY = np.arange(10, dtype="<f8").tobytes()


def part(payload: bytes, flags: int) -> bytes:
    """A part after the first: no header."""
    return frame(b"", payload, flags=flags)


def joined(frames: list[list[bytes | memoryview]]) -> bytes:
    return b"".join(bytes(chunk) for f in frames for chunk in f)


small = st.one_of(
    st.builds(Ping, st.integers(0, 2**32)),
    st.builds(Ack, st.integers(0, 2**32)),
    st.builds(Control, st.just("note"), st.just({"k": 1})),
)


@given(
    size=st.integers(1, 3000),
    part_bytes=st.integers(1, 4000),
    between=st.lists(st.lists(small, max_size=2), max_size=40),
    reads=st.lists(st.integers(1, 997), min_size=1, max_size=8),
)
@settings(max_examples=200, deadline=None)
def test_parts_reassemble_with_whole_frames_between_them(
    size: int, part_bytes: int, between: list[list[Message]], reads: list[int]
) -> None:
    """Whatever the part size and the reads' sizes, the Data comes out once, after the small
    frames sent before its last part, equal to the array sent; its size on the wire is all of
    its frames'."""
    value = np.random.default_rng(size).standard_normal(size)
    msg = Data(7, ("params", 3), 1, 3, value, (2,), True)
    sender = Codec()
    frames = sender.send_parts(msg, part_bytes)
    assert len(frames) == -(-value.nbytes // part_bytes)
    stream, want = b"", []
    for i, f in enumerate(frames):
        stream += joined([f])
        if i < len(frames) - 1:  # between two parts
            extra = between[i] if i < len(between) else []
            stream += b"".join(bytes(c) for m in extra for c in sender.send(m))
            want += extra
    want.append(msg)
    receiver = Codec()
    cycle = (reads * (len(stream) // sum(reads) + 1))[: len(stream)]
    chunks, total = [], 0
    for n in cycle:
        if total >= len(stream):
            break
        chunks.append(min(n, len(stream) - total))
        total += chunks[-1]
    got = feed(stream, chunks, receiver)
    assert got[:-1] == want[:-1]
    data = got[-1]
    assert isinstance(data, Data)
    assert (data.seq, data.tag, data.sender, data.step, data.to, data.post) == (
        7,
        ("params", 3),
        1,
        3,
        (2,),
        True,
    )
    assert data.value.tobytes() == value.tobytes() and not data.value.flags.writeable
    assert receiver.last_size == sum(len(bytes(c)) for f in frames for c in f)


def test_a_data_within_one_part_is_one_frame_as_before() -> None:
    codec = Codec()
    msg = Data(1, ("params", 1), 0, 1, np.ones(512))  # 4096 bytes
    assert codec.send_parts(msg, 4096) == [codec.send(msg)]
    assert [len(f) for f in codec.send_parts(msg, 4095)] == [2, 2]
    with pytest.raises(ValueError, match="part_bytes 0"):
        codec.send_parts(msg, 0)


def test_parts_are_views_of_the_array_not_copies() -> None:
    value = np.arange(1000.0)
    frames = Codec().send_parts(Data(1, ("x",), 0, 1, value), 3000)
    payloads = [f[1] for f in frames]
    assert [len(p) for p in payloads] == [3000, 3000, 2000]
    for p in payloads:
        assert isinstance(p, memoryview)
        assert np.shares_memory(np.frombuffer(p, np.uint8), value)


def test_the_array_is_allocated_once_and_checked_against_max_payload_first() -> None:
    """The first part announces 8 bytes; its header says 80: over a 79-byte cap, refused
    before the allocator is asked."""
    alloc = RecordingAllocator()
    first = frame(HEAD, ARRAY[:8], flags=MORE)
    err = remote_error(first, Codec(max_payload=79, allocator=alloc))
    assert err.reason is Reason.PAYLOAD_TOO_LARGE and "in parts of 80 bytes" in str(err)
    assert alloc.calls == []
    codec = Codec(max_payload=80, allocator=alloc)
    codec.receive_data(first + part(ARRAY[8:40], MORE | PART))
    assert drain(codec) == [] and len(alloc.calls) == 1
    codec.receive_data(part(ARRAY[40:], PART))
    [data] = drain(codec)
    assert isinstance(data, Data) and data.value is alloc.calls[0]
    assert data.value.tobytes() == ARRAY


def _ping() -> bytes:
    return b"".join(bytes(c) for c in Codec().send(Ping(1)))


@pytest.mark.parametrize(
    ("stream", "says"),
    [
        (part(ARRAY, PART), "a part with no Data in parts in progress"),
        (frame(HEAD, ARRAY, flags=MORE), "is 80 bytes, its first part 80"),
        (frame(data_header(h=(0,)), b"", flags=MORE), "is 0 bytes, its first part 0"),
        (frame({"t": "ping", "o": 1}, flags=MORE), "a ping frame in parts"),
        (
            frame(HEAD, ARRAY[:8], flags=MORE) + frame(HEAD, ARRAY[:8], flags=MORE),
            "began before the last one's parts were all in",
        ),
        (
            frame(HEAD, ARRAY[:8], flags=MORE) + frame(HEAD, ARRAY),
            "a Data between the parts of another",
        ),
        (
            frame(HEAD, ARRAY[:8], flags=MORE) + frame(b"\x80", ARRAY[8:], flags=PART),
            "a part with a 1-byte header",
        ),
        (
            frame(HEAD, ARRAY[:8], flags=MORE) + part(ARRAY[8:] + b"x" * 8, PART | MORE),
            "a middle part of 80 bytes with 72 of the array's 80 left",
        ),
        (
            frame(HEAD, ARRAY[:8], flags=MORE) + part(ARRAY[8:16], PART),
            "a last part of 8 bytes with 72 of the array's 80 left",
        ),
        (
            frame(HEAD, ARRAY[:8], flags=MORE) + part(b"", PART | MORE),
            "a middle part of 0 bytes",
        ),
        (
            frame(HEAD, ARRAY[:8], flags=MORE) + part(ARRAY[8:], PART | MORE),
            "a middle part of 72 bytes with 72 of the array's 80 left",  # fills it: the last
        ),
    ],
)
def test_a_part_out_of_sequence_is_bad_part(stream: bytes, says: str) -> None:
    err = remote_error(_ping() + stream)
    assert err.reason is Reason.BAD_PART and says in str(err), str(err)


def test_a_stream_that_ends_between_parts_is_truncated() -> None:
    codec = Codec()
    codec.receive_data(frame(HEAD, ARRAY[:8], flags=MORE) + _ping())
    codec.receive_eof()
    with pytest.raises(RemoteProtocolError) as info:
        drain(codec)
    assert info.value.reason is Reason.TRUNCATED and "8 of 80 payload bytes" in str(info.value)
    assert repr(codec).startswith("Codec(between parts,")


def test_other_flags_stay_reserved() -> None:
    err = remote_error(frame(HEAD, ARRAY, flags=0x04))
    assert err.reason is Reason.BAD_FLAGS


def test_a_part_header_is_never_decoded() -> None:
    """A part's header length must be 0: what would be its header is refused unread (a
    packed map there is still a part with a header)."""
    packed = msgpack.packb({"t": "ping", "o": 1})
    stream = frame(HEAD, ARRAY[:8], flags=MORE) + frame(packed, ARRAY[8:], flags=PART)
    err = remote_error(stream)
    assert err.reason is Reason.BAD_PART and f"a {len(packed)}-byte header" in str(err)
    assert PREFIX.size == 16
