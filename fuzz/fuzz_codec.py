"""Atheris harness: arbitrary bytes into the sans-IO frame codec (peerlearn/wire/codec.py).

Run it by hand, never in CI (fuzz/README.md)::

    python fuzz/fuzz_codec.py -atheris_runs=1000000 fuzz/corpus/codec

Input layout: byte 0 picks the configuration, byte 1 the chunking, the rest is the stream.

* bit 0 of byte 0: 0 = the acceptor's pre-trust codec (``max_payload=0``, ``max_header=4096``,
  a read buffer of one such header), 1 = that codec widened as after an accepted Join
  (``widen(max_payload=WIDE_PAYLOAD)``), before any byte;
* bit 1: pre-trust, then widened right after the first message comes out — what the acceptor
  does on a Join, with the next frame's bytes possibly already buffered;
* bit 2: feed through ``receive_data`` instead of ``get_buffer``/``buffer_updated``;
* bit 3: end with ``receive_eof``;
* byte 1: chunk size, 1 + byte (1..256 bytes per read); 0 means sizes varying 1..64 by position.

Checked for every input (any other exception is a finding):

* the codec raises nothing but ``RemoteProtocolError``; once it did, every receive call raises
  the same reason again (the error sticks);
* nothing is allocated beyond the caps in force: each allocator request is at most
  ``max_payload`` bytes, every message that comes out is at most
  ``PREFIX.size + max_header + max_payload`` on the wire (a Data in parts: one more prefix per
  part), the read buffer stays within
  ``max(DEFAULT_READ_BUFFER, PREFIX.size + max_header)``;
* every message that comes out is one of the message types, can be sent again, and sending
  is idempotent: encode(decode(encode(msg))) == encode(msg).
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["peerlearn.wire"]):
    import numpy as np

    from peerlearn.wire import (
        DEFAULT_READ_BUFFER,
        NEED_DATA,
        PREFIX,
        Codec,
        Data,
        LocalProtocolError,
        Message,
        Reason,
        RemoteProtocolError,
        Sentinel,
    )
    from peerlearn.wire.messages import MESSAGE_TYPES

from peerlearn.transport.peers import PRE_TRUST_HEADER  # the acceptor's own figure

#: the widened codec's payload cap: small, so that a forged header cannot make the harness
#: allocate much (the daemon's is the run's frame size); the check is the same at any cap
WIDE_PAYLOAD = 1 << 16
_MESSAGE_CLASSES = tuple(MESSAGE_TYPES.values())


class CappedAllocator:
    """np.empty that checks each request against the codec's cap in force."""

    def __init__(self) -> None:
        self.codec: Codec | None = None

    def __call__(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        assert self.codec is not None
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        assert nbytes <= self.codec.max_payload, (nbytes, self.codec.max_payload, shape)
        return np.empty(shape, dtype)


def _pre_trust(allocator: CappedAllocator) -> Codec:
    codec = Codec(
        max_payload=0,
        allocator=allocator,
        max_header=PRE_TRUST_HEADER,
        read_buffer_size=PREFIX.size + PRE_TRUST_HEADER,
    )
    allocator.codec = codec
    return codec


def _reencode(msg: Message) -> bytes | None:
    """``msg`` as sent again; None if its header grew past the cap (a float32 in a Control
    body comes back a float64: a frame at the cap may not fit again, which is no bug)."""
    try:
        chunks = Codec(max_payload=WIDE_PAYLOAD).send(msg)
    except LocalProtocolError as exc:
        assert exc.reason is Reason.HEADER_TOO_LARGE, exc
        return None
    return b"".join(bytes(c) for c in chunks)


def _check_message(codec: Codec, msg: object) -> None:
    assert isinstance(msg, _MESSAGE_CLASSES), type(msg)
    payload = msg.value.nbytes if isinstance(msg, Data) else 0
    assert payload <= codec.max_payload, (payload, codec.max_payload)
    # (a Data in parts: one more prefix per part, each part at least one byte)
    assert codec.last_size <= PREFIX.size * (1 + payload) + codec.max_header + codec.max_payload
    once = _reencode(msg)
    if once is None:
        return
    again = Codec(max_payload=WIDE_PAYLOAD)
    again.receive_data(once)
    back = again.next_event()
    assert not isinstance(back, Sentinel) and again.next_event() is NEED_DATA
    assert _reencode(back) == once, (msg, back)


def _scratch_cap(codec: Codec) -> int:
    return max(DEFAULT_READ_BUFFER, PREFIX.size + codec.max_header)


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, chunking, stream = data[0], data[1], memoryview(data)[2:]
    allocator = CappedAllocator()
    codec = _pre_trust(allocator)
    if mode & 1:
        codec.widen(max_payload=WIDE_PAYLOAD)
    widen_after_first = bool(mode & 2) and not mode & 1
    use_receive_data = bool(mode & 4)
    error: RemoteProtocolError | None = None
    taken = 0
    pos = 0
    try:
        while pos < len(stream):
            size = chunking + 1 if chunking else 1 + (pos * 7 + 3) % 64
            if use_receive_data:
                n = min(size, len(stream) - pos)
                codec.receive_data(stream[pos : pos + n])
            else:
                region = codec.get_buffer(-1)
                assert len(region) > 0
                n = min(size, len(region), len(stream) - pos)
                region[:n] = stream[pos : pos + n]
                codec.buffer_updated(n)
            pos += n
            assert len(codec._scratch) <= _scratch_cap(codec)
            while not isinstance(event := codec.next_event(), Sentinel):
                _check_message(codec, event)
                taken += 1
                if widen_after_first and taken == 1:
                    codec.widen(max_payload=WIDE_PAYLOAD)
        if mode & 8:
            codec.receive_eof()
            while not isinstance(event := codec.next_event(), Sentinel):
                _check_message(codec, event)
    except RemoteProtocolError as exc:
        error = exc
    if error is None:
        return
    assert isinstance(error.reason, Reason)
    # The error sticks: every receive call raises it again.
    for call in (codec.next_event, lambda: codec.get_buffer(-1)):
        try:
            call()
        except RemoteProtocolError as again:
            assert again.reason is error.reason
        else:
            raise AssertionError(f"{call} did not raise {error.reason} again")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
