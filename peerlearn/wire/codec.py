"""The sans-IO frame codec of the peer daemon: messages to bytes, bytes to messages.

Frame layout (integers in network byte order)::

    offset  size  field
    0       2     magic            MAGIC = b"PL"
    2       1     version          PROTOCOL_VERSION
    3       1     flags            MORE (0x01), PART (0x02); other bits reserved, 0
    4       4     header length H  u32, ≤ MAX_HEADER
    8       8     payload length P u64, ≤ the codec's max_payload
    16      H     header           one msgpack map (schema: header.py)
    16 + H  P     payload          a Data array's raw bytes, C order, little-endian (a packed
                                   Data: its packed bytes, header key "z"); P = 0 otherwise

Parts
-----
A Data whose array is larger than the sender's part size goes in several frames, so that the
small frames of the same connection (heartbeats, catch-up notes) never wait behind a whole
model: the first carries the header and the array's first P bytes, flagged ``MORE``; each next
one, flagged ``PART`` (and ``MORE`` unless it is the last), has no header (H = 0) and carries
the next P bytes. Whole frames other than Data may come between the parts (one Data at a time
per direction). The receiver checks the array's whole size against ``max_payload`` from the
first part's header, allocates the array once, reads every part straight into it, and returns
the Data once the last part is in. A part out of sequence (a ``PART`` with no Data in progress,
another Data while one is, a part past the array's end, a last part that leaves it short, a
first part as large as the array) is ``bad_part``. A connection that ends mid-Data loses it
(``truncated``); the sender sends it again, whole, on the next connection, as any
unacknowledged frame.

Contract of the reader (the receive half of :class:`Codec`)
-----------------------------------------------------------
Bytes come in through ``get_buffer``/``buffer_updated`` (the ``asyncio.BufferedProtocol``
pair) or ``receive_data``. Each call parses as far as the bytes allow: it checks the prefix
against the caps, validates the whole header, and only then asks the allocator for the
payload's array, into which the following bytes are read directly. ``next_event()`` then does
exactly one of three things: returns the next complete message, raises
:class:`RemoteProtocolError`, or returns ``NEED_DATA``; after ``receive_eof()`` at a frame
boundary it returns ``CLOSED``. Errors are detected eagerly but reported in order: the messages
completed before the bad bytes come out first, then ``next_event()`` raises, and from then on
every receive call raises the same error. The send half stays usable (to say ``Bye``).

Versions
--------
Every frame carries the protocol version in its prefix. A frame of another version is refused
as soon as its prefix is in (``unsupported_version``): its header layout is unknown, so there
is nothing safe to parse. ``Hello`` announces the range of versions its sender speaks and the
``Welcome`` names the one both will (:func:`negotiate`). The rule for a future version 4 that
changes the framing: send the Hello in the oldest framing both may share, announcing 3..4, and
switch framing only after a ``Welcome`` that names 4; a version-3 peer then answers with 3, or
refuses with a clear handshake reason instead of a framing error.

The codec frames; it does not know the conversation (which message may come when), which is
the link's business in ``transport/``.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any, Final, Literal, TypeAlias

import numpy as np

from peerlearn.compression import unpack
from peerlearn.wire.errors import (
    HandshakeError,
    LocalProtocolError,
    Reason,
    RemoteProtocolError,
)
from peerlearn.wire.header import DataHead, decode_header, encode_header
from peerlearn.wire.messages import MESSAGE_TYPES, Array, Data, Hello, Join, Message

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_PART_BYTES",
    "DEFAULT_READ_BUFFER",
    "MAGIC",
    "MAX_HEADER",
    "MIN_PROTOCOL_VERSION",
    "NEED_DATA",
    "PREFIX",
    "PROTOCOL_VERSION",
    "Allocator",
    "Codec",
    "Event",
    "Sentinel",
    "check_join",
    "default_allocator",
    "negotiate",
]

#: 2: Data carries recipients (to) and post; 3: the handshake says Hello/Welcome (versions,
#: incarnation, nonce, room for a MAC), then Join (the run), answered by an Ack; 4: the Join
#: carries the dialer's proof of the cluster secret (peerlearn/transport/auth.py); 5: the Join
#: carries keyed digests of the run settings and a Refuse a detail (members are told what
#: differs); 6: a large Data goes in parts (flags MORE and PART); 7: a Data's array may go
#: packed (header key "z": payload compression)
PROTOCOL_VERSION: Final = 7
#: the oldest version this side still speaks (a Hello announces the range)
MIN_PROTOCOL_VERSION: Final = 7
#: prefix flags: more parts of this Data follow; this frame is a part after the first
MORE: Final = 0x01
PART: Final = 0x02
#: a Data larger than this goes in parts of this size (LinkSettings.part_bytes): a small
#: frame waits behind one part at most (4 MiB: about 1 ms on loopback, 34 ms at 1 Gbit/s)
DEFAULT_PART_BYTES: Final = 4 * 1024 * 1024
MAGIC: Final = b"PL"
PREFIX: Final = struct.Struct("!2sBBIQ")  # magic, version, flags, header length, payload length

# The largest legitimate header is a Hello listing every process id its daemon hosts (≤ 9 bytes
# each) or a Control body; a Data header is about 60 bytes. 64 KiB holds thousands of ids, and
# it bounds what a peer can make us buffer before anything is validated — the read buffer must
# hold one whole header, so this is also the floor of each connection's read buffer. Same order
# as HTTP servers' caps on a request head (h11 16 KiB, nginx 4 × 8 KiB, Node.js 16 KiB).
MAX_HEADER: Final = 64 * 1024

# A payload is one model-sized vector. The largest runs planned are d ≈ 1e7 float64 (80 MB;
# peers/RESULTS.md measures up to 40 MB): 256 MiB leaves 3× headroom while bounding what one
# forged length can make a connection allocate. A daemon knows the exact bound once the run is
# known (dim × itemsize) and should pass that instead.
DEFAULT_MAX_PAYLOAD: Final = 256 * 1024 * 1024

# Scratch for prefixes and headers. Larger than one header so that a read takes in several
# small frames at once (a 40 KB vector: 6 frames per read); a large payload is read past it,
# straight into its array. At most 256 KiB of a payload is copied out of it.
DEFAULT_READ_BUFFER: Final = 256 * 1024
_MIN_READ: Final = 4096  # compact the scratch buffer before offering less than this

Allocator: TypeAlias = Callable[[np.dtype[Any], tuple[int, ...]], Array]


def default_allocator(dtype: np.dtype[Any], shape: tuple[int, ...]) -> Array:
    """A fresh ``np.empty`` array (the daemon injects a pool instead)."""
    return np.empty(shape, dtype)


class Sentinel(Enum):
    """Non-message results of :meth:`Codec.next_event`."""

    NEED_DATA = "NEED_DATA"  # no complete message yet: feed more bytes
    CLOSED = "CLOSED"  # end of stream at a frame boundary (not between a Data's parts)

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED
Event: TypeAlias = Message | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]

_MESSAGE_CLASSES: Final = tuple(MESSAGE_TYPES.values())


def _wire_array(value: Array) -> Array:
    """``value`` as it goes on the wire: C-contiguous and little-endian, copied only if not."""
    wire_dtype = value.dtype.newbyteorder("<")
    if value.dtype == wire_dtype and value.flags.c_contiguous:
        return value
    # One copy, of views and big-endian arrays only (the runtime sends its own contiguous,
    # native arrays). ``astype`` rather than ``ascontiguousarray``, which turns 0-d into 1-d.
    return value.astype(wire_dtype, order="C")


class Codec:
    """The framing state of one connection, both directions; does no I/O.

    Args:
        max_payload: the largest payload accepted or sent, in bytes; a prefix announcing
            more is refused before anything is allocated.
        allocator: ``allocator(dtype, shape)`` returns a writable, C-contiguous array of exactly
            that dtype and shape for a Data payload to be read into. It is called once per Data
            (at its first part), only after the frame's header validated. The received message's
            ``value`` is that very array, marked read-only.
        read_buffer_size: the scratch buffer for prefixes and headers (and the small payloads
            that come in the same read); at least ``PREFIX.size + max_header``.
        max_header: the largest header accepted (at most ``MAX_HEADER``): a connection not
            trusted yet takes small headers only, into a small buffer (:meth:`widen` later).
    """

    def __init__(
        self,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        allocator: Allocator = default_allocator,
        read_buffer_size: int = DEFAULT_READ_BUFFER,
        max_header: int = MAX_HEADER,
    ) -> None:
        if not 0 <= max_payload < 2**64:
            raise ValueError(f"max_payload {max_payload} not in [0, 2**64)")
        if not 0 < max_header <= MAX_HEADER:
            raise ValueError(f"max_header {max_header} not in (0, {MAX_HEADER}]")
        if read_buffer_size < PREFIX.size + max_header:
            raise ValueError(f"read_buffer_size {read_buffer_size} < {PREFIX.size + max_header}")
        self.max_payload = max_payload
        self.max_header = max_header
        self._grow_to = 0  # a larger scratch buffer asked for (widen), made at the next read
        self._allocator = allocator
        self._scratch = bytearray(read_buffer_size)
        self._view = memoryview(self._scratch)
        self._start = 0  # unparsed bytes are _scratch[_start:_end]
        self._end = 0
        self._header_len = -1  # of the frame whose prefix was parsed; -1 between frames
        self._payload_len = 0
        self._flags = 0  # of the frame whose prefix was parsed
        self._head: DataHead | None = None  # a Data whose payload is being read into ...
        self._array: Array | None = None  # ... this array,
        self._sink: memoryview | None = None  # through this byte view of it (all of it)
        self._filled = 0  # bytes of the array in
        self._part_end = 0  # where the payload of the frame being read ends in the array
        self._reading = False  # the frame's payload goes into the array (get_buffer's region)
        self._data_size = 0  # the frames of the Data in progress, on the wire
        self._lent = 0  # size of the region the last get_buffer handed out
        self._events: deque[tuple[Message, int]] = deque()  # with each frame's size on the wire
        self._frame_size = 0  # prefix + header + payload of the frame being parsed
        #: size on the wire of the message ``next_event`` returned last (for byte counters)
        self.last_size = 0
        self._error: RemoteProtocolError | None = None
        self._eof = False

    def __repr__(self) -> str:
        where = (
            "payload"
            if self._reading
            else "header"
            if self._header_len >= 0
            else "between parts"
            if self._head is not None
            else "idle"
        )
        return (
            f"Codec({where}, buffered={self._end - self._start}, events={len(self._events)}, "
            f"error={self._error.reason.value if self._error else None}, eof={self._eof})"
        )

    @property
    def error(self) -> RemoteProtocolError | None:
        """The receive side's error, once one was detected (``next_event`` raises it)."""
        return self._error

    # --- send ------------------------------------------------------------------------------------

    def send(self, msg: Message) -> list[bytes | memoryview]:
        """Encode ``msg`` as the chunks to write, in order.

        Write them one ``transport.write`` each (uvloop keeps a reference to a large buffer
        rather than copying it); CPython 3.11's ``writelines`` joins them into one ``bytes``,
        which is the very copy this layout avoids.

        Returns:
            ``[prefix + header]``, followed for a Data with a non-empty array by a byte
            ``memoryview`` of the array itself: the payload is not copied. The caller must not
            modify the array until the chunks are written. An array that is not C-contiguous
            or not little-endian is converted once, into a copy that the view then refers to.

        Raises:
            LocalProtocolError: ``payload_too_large`` (array over ``max_payload``),
                ``header_too_large`` (a header over ``MAX_HEADER``: too many workers in a Hello,
                a large Control body), ``unknown_type`` (not a message). Nothing was sent.
        """
        value: Array | None = None
        if isinstance(msg, Data):
            if (
                msg.value.nbytes > self.max_payload
            ):  # (the receiver checks the array, packed or not)
                raise LocalProtocolError(
                    Reason.PAYLOAD_TOO_LARGE,
                    f"data array of {msg.value.nbytes} bytes, max_payload is {self.max_payload}",
                )
            value = _wire_array(msg.value) if msg.packed is None else msg.packed.raw
        elif not isinstance(msg, _MESSAGE_CLASSES):
            raise LocalProtocolError(Reason.UNKNOWN_TYPE, f"not a message: {type(msg).__name__}")
        header = encode_header(msg, value)
        if len(header) > MAX_HEADER:
            raise LocalProtocolError(
                Reason.HEADER_TOO_LARGE, f"{msg.kind} header of {len(header)} bytes > {MAX_HEADER}"
            )
        payload_len = 0 if value is None else value.nbytes
        head = PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(header), payload_len) + header
        if value is None or payload_len == 0:
            return [head]
        return [head, value.data.cast("B")]

    def send_parts(
        self, msg: Message, part_bytes: int = DEFAULT_PART_BYTES
    ) -> list[list[bytes | memoryview]]:
        """Encode ``msg`` as frames, each a list of chunks to write as :meth:`send`'s: one
        frame, or — a Data of more than ``part_bytes`` bytes — its parts (see "Parts" above),
        which the caller may write with whole frames other than Data in between. The payload is
        not copied: each part is a view of the array.

        Raises:
            LocalProtocolError: as :meth:`send`; nothing was sent.
            ValueError: ``part_bytes`` < 1.
        """
        if part_bytes < 1:
            raise ValueError(f"part_bytes {part_bytes} < 1")
        chunks = self.send(msg)
        if len(chunks) == 1 or len(chunks[1]) <= part_bytes:
            return [chunks]
        head, payload = chunks
        assert isinstance(payload, memoryview)
        header = memoryview(head)[PREFIX.size :]
        frames: list[list[bytes | memoryview]] = [
            [
                PREFIX.pack(MAGIC, PROTOCOL_VERSION, MORE, len(header), part_bytes) + header,
                payload[:part_bytes],
            ]
        ]
        for at in range(part_bytes, len(payload), part_bytes):
            part = payload[at : at + part_bytes]
            flags = PART | (MORE if at + part_bytes < len(payload) else 0)
            frames.append([PREFIX.pack(MAGIC, PROTOCOL_VERSION, flags, 0, len(part)), part])
        return frames

    # --- receive ---------------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """The writable region the next bytes from the peer go into (``BufferedProtocol``).

        While a Data payload is being read this is the rest of the payload's own array, and a
        read never goes past the end of the frame; otherwise it is the free part of the
        scratch buffer. Never empty. ``sizehint`` is ignored: the region is what the frame
        needs. Write into it, then call :meth:`buffer_updated`.

        Raises:
            RemoteProtocolError: the receive side already failed (the same error again).
            RuntimeError: called after :meth:`receive_eof`.
        """
        self._check_usable()
        if self._reading:
            assert self._sink is not None
            region = self._sink[self._filled : self._part_end]
        else:
            self._make_room()
            region = self._view[self._end :]
        self._lent = len(region)
        return region

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` region; parse.

        Does not raise for bad bytes: a protocol error is recorded and raised by
        :meth:`next_event` once the messages before it have been taken.

        Raises:
            RemoteProtocolError: the receive side had already failed (the same error again).
            ValueError: ``nbytes`` is not within the region last handed out.
        """
        self._check_usable()
        if not 0 < nbytes <= self._lent:
            raise ValueError(f"buffer_updated({nbytes}) but get_buffer lent {self._lent} bytes")
        self._lent = 0
        try:
            if self._reading:
                self._filled += nbytes
                if self._filled == self._part_end:
                    self._end_part()
            else:
                self._end += nbytes
                self._parse()
        except LocalProtocolError as err:  # the single local -> remote conversion point
            self._error = RemoteProtocolError.from_local(err)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes that are already in memory (copied in through ``get_buffer``).

        ``data`` empty means end of stream, as in h11: same as :meth:`receive_eof`.
        """
        if not data:
            self.receive_eof()
            return
        self._check_usable()
        src = memoryview(data).cast("B")
        while src and self._error is None:
            region = self.get_buffer(len(src))
            n = min(len(region), len(src))
            region[:n] = src[:n]
            self.buffer_updated(n)
            src = src[n:]

    def receive_eof(self) -> None:
        """The peer closed its side. In the middle of a frame, that is a ``truncated`` error."""
        if self._eof or self._error is not None:
            return
        self._eof = True
        if self._head is not None:
            got = f"{self._filled} of {self._head.nbytes} payload bytes"
        elif self._header_len >= 0:
            got = f"{self._end - self._start} of {self._header_len} header bytes"
        elif self._end > self._start:
            got = f"{self._end - self._start} of {PREFIX.size} prefix bytes"
        else:
            return
        self._error = RemoteProtocolError(Reason.TRUNCATED, f"end of stream inside a frame: {got}")

    def next_event(self) -> Event:
        """The next complete message, ``NEED_DATA``, or ``CLOSED`` after a clean end of stream.

        Raises:
            RemoteProtocolError: the peer's bytes broke the protocol (``err.reason`` says how);
                raised again on every later call.
        """
        if self._events:
            msg, self.last_size = self._events.popleft()
            return msg
        if self._error is not None:
            raise self._error.with_traceback(None)
        return CLOSED if self._eof else NEED_DATA

    # --- receive internals -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._eof:
            raise RuntimeError("the codec received end of stream; no more data can follow")

    def widen(self, *, max_payload: int, max_header: int = MAX_HEADER) -> None:
        """Take frames up to these caps from now on (a connection that became trusted), with
        a scratch buffer of ``DEFAULT_READ_BUFFER`` — made at the next read, never while a
        region of the old one is lent out."""
        if not 0 <= max_payload < 2**64 or not 0 < max_header <= MAX_HEADER:
            raise ValueError(f"caps out of range: max_payload {max_payload}, {max_header}")
        self.max_payload, self.max_header = max_payload, max_header
        self._grow_to = max(DEFAULT_READ_BUFFER, PREFIX.size + max_header)

    def _make_room(self) -> None:
        # Unparsed bytes are always less than the unit being waited for (a prefix or a header,
        # ≤ PREFIX.size + max_header ≤ the buffer), so after compaction the unit fits and the
        # free region is never empty. Compaction moves less than one header.
        if self._grow_to > len(self._scratch):
            kept = self._end - self._start
            scratch = bytearray(self._grow_to)
            scratch[:kept] = self._view[self._start : self._end]
            self._scratch, self._view = scratch, memoryview(scratch)
            self._start, self._end, self._grow_to = 0, kept, 0
        if self._start == self._end:
            self._start = self._end = 0
            return
        unit = PREFIX.size if self._header_len < 0 else self._header_len
        size = len(self._scratch)
        if self._start > 0 and (self._start + unit > size or size - self._end < _MIN_READ):
            kept = self._end - self._start
            self._scratch[:kept] = self._view[self._start : self._end]
            self._start, self._end = 0, kept

    def _parse(self) -> None:
        """Parse complete prefixes and headers from the scratch buffer; start a payload."""
        view = self._view
        while True:
            avail = self._end - self._start
            if self._header_len < 0:
                # Refuse a foreign stream as soon as its first two bytes are in.
                if avail >= 2 and bytes(view[self._start : self._start + 2]) != MAGIC:
                    raise LocalProtocolError(
                        Reason.BAD_MAGIC,
                        f"bad magic {bytes(view[self._start : self._start + 2])!r} "
                        f"(expected {MAGIC!r}): not a peerlearn peer, or the stream lost sync",
                    )
                if avail < PREFIX.size:
                    return
                self._parse_prefix()
                if self._flags & PART:  # no header: the payload goes on into the array
                    self._header_len = -1
                    self._data_size += self._frame_size
                    self._read_part(self._filled + self._payload_len)
                    if self._reading:
                        return
                continue
            if avail < self._header_len:
                return
            end = self._start + self._header_len
            decoded = decode_header(
                view[self._start : end], self._payload_len, part=bool(self._flags & MORE)
            )
            self._start = end
            self._header_len = -1
            if isinstance(decoded, DataHead):
                self._start_data(decoded)
                if self._reading:
                    return  # the rest of the payload goes straight into the array
            elif self._flags & MORE:
                raise LocalProtocolError(Reason.BAD_PART, f"a {decoded.kind} frame in parts")
            else:
                self._events.append((decoded, self._frame_size))

    def _parse_prefix(self) -> None:
        _, version, flags, header_len, payload_len = PREFIX.unpack_from(self._view, self._start)
        if version != PROTOCOL_VERSION:
            raise LocalProtocolError(
                Reason.UNSUPPORTED_VERSION,
                f"unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})",
            )
        if flags & ~(MORE | PART):
            raise LocalProtocolError(Reason.BAD_FLAGS, f"reserved flags set: {flags:#04x}")
        if flags & PART:
            self._check_part(flags, header_len, payload_len)
        elif flags & MORE and self._head is not None:
            raise LocalProtocolError(
                Reason.BAD_PART, "a Data in parts began before the last one's parts were all in"
            )
        if header_len > self.max_header:
            raise LocalProtocolError(
                Reason.HEADER_TOO_LARGE, f"header of {header_len} bytes > {self.max_header}"
            )
        if payload_len > self.max_payload:
            raise LocalProtocolError(
                Reason.PAYLOAD_TOO_LARGE,
                f"payload of {payload_len} bytes > max_payload {self.max_payload}",
            )
        self._start += PREFIX.size
        self._header_len = header_len
        self._payload_len = payload_len
        self._flags = flags
        self._frame_size = PREFIX.size + header_len + payload_len

    def _check_part(self, flags: int, header_len: int, payload_len: int) -> None:
        """A part after the first: of the Data in progress, headerless, within its array."""
        if self._head is None:
            raise LocalProtocolError(Reason.BAD_PART, "a part with no Data in parts in progress")
        left = self._head.nbytes - self._filled
        if header_len:
            raise LocalProtocolError(Reason.BAD_PART, f"a part with a {header_len}-byte header")
        # a middle part leaves some of the array for the next, the last fills it
        if not (0 < payload_len < left if flags & MORE else payload_len == left):
            raise LocalProtocolError(
                Reason.BAD_PART,
                f"a {'middle' if flags & MORE else 'last'} part of {payload_len} bytes with "
                f"{left} of the array's {self._head.nbytes} left",
            )

    def _start_data(self, head: DataHead) -> None:
        """Allocate a validated Data's array; move in the payload bytes already buffered."""
        if self._head is not None:
            raise LocalProtocolError(Reason.BAD_PART, "a Data between the parts of another")
        # (a first part: its prefix announced that part; packed: the array it unpacks to)
        if head.array_bytes > self.max_payload:
            raise LocalProtocolError(
                Reason.PAYLOAD_TOO_LARGE,
                f"{'a packed array of' if head.packing else 'data in parts of'} "
                f"{head.array_bytes} bytes > max_payload {self.max_payload}",
            )
        # packed: the bytes first (the array they unpack to once they are all in)
        if head.packing is not None:
            array = self._allocate(np.dtype(np.uint8), (head.nbytes,))
        else:
            array = self._allocate(head.dtype, head.shape)
        self._head, self._array = head, array
        self._filled, self._data_size = 0, self._frame_size
        if head.nbytes == 0:
            self._finish_data()
            return
        self._sink = array.data.cast("B")
        self._read_part(self._payload_len)

    def _allocate(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Array:
        array = self._allocator(dtype, shape)
        # The allocator is ours (a pool): a wrong array is a bug here, not bad input.
        if not (
            isinstance(array, np.ndarray)
            and array.dtype == dtype
            and array.shape == shape
            and array.flags.c_contiguous
            and array.flags.writeable
        ):
            raise TypeError(
                f"allocator returned {type(array).__name__} "
                f"{getattr(array, 'dtype', '?')} {getattr(array, 'shape', '?')}: expected a "
                f"writable C-contiguous {dtype} array of shape {shape}"
            )
        return array

    def _read_part(self, end: int) -> None:
        """The frame's payload fills the array up to ``end``: move in what is buffered, then
        read the rest straight into the array."""
        assert self._sink is not None
        take = min(self._end - self._start, end - self._filled)
        self._sink[self._filled : self._filled + take] = self._view[
            self._start : self._start + take
        ]
        self._start += take
        self._filled += take
        self._part_end = end
        self._reading = True  # the scratch buffer is empty if the payload is not all in yet
        if self._filled == end:
            self._end_part()

    def _end_part(self) -> None:
        """The frame's payload is in: the Data is complete, or waits for its next part."""
        self._reading = False
        assert self._head is not None
        if self._filled == self._head.nbytes:
            self._finish_data()

    def _finish_data(self) -> None:
        head, array = self._head, self._array
        assert head is not None and array is not None, "no Data payload in progress"
        self._head = self._array = self._sink = None
        self._filled = 0
        if head.packing is not None:  # the bytes are in: unpack them into the array
            scheme, block = head.packing
            raw, array = array, self._allocate(head.dtype, head.shape)
            unpack(scheme, raw, head.dtype, array.size, block, out=array)
        array.flags.writeable = False
        self._events.append(
            (
                Data(head.seq, head.tag, head.sender, head.step, array, head.to, head.post),
                self._data_size,
            )
        )


def negotiate(hello: Hello) -> int:
    """The protocol version to speak with the peer that sent ``hello``: the highest both speak.

    Raises:
        HandshakeError: ``unsupported_version`` when the ranges do not overlap.
    """
    version = min(hello.max_version, PROTOCOL_VERSION)
    if version < max(hello.min_version, MIN_PROTOCOL_VERSION):
        raise HandshakeError(
            Reason.UNSUPPORTED_VERSION,
            f"peer speaks protocol versions {hello.min_version}..{hello.max_version}, this side "
            f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION} (peer {hello.name!r}, cluster "
            f"{hello.cluster})",
        )
    return version


def check_join(join: Join, *, expect_dim: int, expect_dtype: str, expect_fingerprint: str) -> None:
    """Accept the peer's run, or raise why not (for this side's log; the peer gets the code).

    Checked in this order, so the most specific reason wins: the model dimension, the dtype,
    then the run fingerprint (which covers the other two as well).

    Raises:
        HandshakeError: ``dim_mismatch``, ``dtype_mismatch`` or ``fingerprint_mismatch``.
    """
    if join.dim != expect_dim:
        raise HandshakeError(Reason.DIM_MISMATCH, f"dim {join.dim} != {expect_dim}")
    if join.dtype != expect_dtype:
        raise HandshakeError(Reason.DTYPE_MISMATCH, f"dtype {join.dtype} != {expect_dtype}")
    if join.fingerprint != expect_fingerprint:
        raise HandshakeError(
            Reason.FINGERPRINT_MISMATCH,
            f"fingerprint mismatch: peer runs {join.fingerprint!r}, "
            f"this run is {expect_fingerprint!r}",
        )
