"""The msgpack header of a frame: its schema, the encoder and the strict decoder.

A header is one msgpack map with one-letter ``str`` keys: ``"t"`` is the message type (the
message's ``kind``), the other keys are per type and listed in :data:`HEADER_KEYS` — the schema
is this table, not branches. A ``data`` header also carries the array's dtype code (``"y"``:
``"f4"`` or ``"f8"``, little-endian) and shape (``"h"``); its payload follows the header raw.
A *packed* data header adds ``"z"``: ``[scheme, block]`` (``"fp16"``/``"bf16"`` with block 0,
``"int8"`` with 8 ≤ block ≤ 65536, see :mod:`peerlearn.compression`); its payload is then the
packed bytes of a one-dimensional array of that dtype and shape, exactly
``packed_size(scheme, n, block)`` of them.

Decoding is strict: exactly the keys of the type (a new field is a new protocol version),
every field validated by the message's own constructor, the array's dtype, shape and size
validated here, before the codec allocates anything. Nothing in this module raises anything
but :class:`~peerlearn.wire.errors.LocalProtocolError`; the codec converts it to the remote
kind on the receive path. msgpack never leaves the ``wire`` package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import msgpack
import numpy as np

from peerlearn.compression import Scheme, packed_size
from peerlearn.wire.errors import LocalProtocolError, Reason
from peerlearn.wire.messages import (
    DTYPE_CODES,
    INT64_MAX,
    MAX_DIMS,
    MESSAGE_TYPES,
    Array,
    Data,
    Message,
    check_data_fields,
    excerpt,
)

__all__ = ["HEADER_KEYS", "DataHead", "decode_header", "encode_header"]

# wire key -> field name, per message type ("t" is common to all).
HEADER_KEYS: Final[Mapping[str, tuple[tuple[str, str], ...]]] = {
    "hello": (
        ("v", "min_version"),
        ("x", "max_version"),
        ("c", "cluster"),
        ("i", "incarnation"),
        ("o", "nonce"),
        ("n", "name"),
        ("m", "mac"),
    ),
    "welcome": (
        ("v", "version"),
        ("c", "cluster"),
        ("i", "incarnation"),
        ("o", "nonce"),
        ("m", "mac"),
    ),
    "join": (
        ("w", "workers"),
        ("d", "dim"),
        ("y", "dtype"),
        ("f", "fingerprint"),
        ("m", "mac"),
        ("s", "settings"),
    ),
    "refuse": (("r", "reason"), ("d", "detail")),
    # plus "y" (dtype code) and "h" (shape), which describe the payload: _PAYLOAD_KEYS
    "data": (
        ("q", "seq"),
        ("g", "tag"),
        ("s", "sender"),
        ("p", "step"),
        ("r", "to"),
        ("b", "post"),
    ),
    "ack": (("q", "seq"),),
    "ping": (("o", "nonce"),),
    "pong": (("o", "nonce"),),
    "bye": (("r", "reason"),),
    "control": (("k", "name"), ("b", "body")),
}
_INTP_MAX: Final = int(np.iinfo(np.intp).max)
_PAYLOAD_KEYS: Final = {"data": ("y", "h")}
_KEY_SETS: Final = {
    kind: frozenset({"t", *(k for k, _ in keys), *_PAYLOAD_KEYS.get(kind, ())})
    for kind, keys in HEADER_KEYS.items()
}
#: a packed Data's header: a data header and "z"
_PACKED_KEYS: Final = _KEY_SETS["data"] | {"z"}
_PACKINGS: Final = {s.value: s for s in Scheme if s is not Scheme.NONE}
_BLOCKS: Final = range(8, 65536 + 1)
_WIRE_DTYPES: Final = {code: np.dtype(t).newbyteorder("<") for t, code in DTYPE_CODES.items()}


class DataHead(NamedTuple):
    """A validated ``data`` header: everything but the payload, which is still to be read."""

    seq: int
    tag: tuple[str | int, ...]
    sender: int
    step: int
    to: tuple[int, ...]
    post: bool
    dtype: np.dtype[Any]  # little-endian float32 / float64
    shape: tuple[int, ...]
    nbytes: int  # == the frame's payload length
    #: (scheme, block) of a packed payload; None: the array's raw bytes
    packing: tuple[Scheme, int] | None = None

    @property
    def array_bytes(self) -> int:
        """The bytes of the array itself (unpacked)."""
        return math.prod(self.shape) * self.dtype.itemsize


def encode_header(msg: Message, value: Array | None = None) -> bytes:
    """The msgpack header of ``msg``; for a Data, ``value`` is the array as it goes on the wire.

    Raises:
        LocalProtocolError: ``bad_field`` if msgpack cannot pack a field (the constructors'
            validation makes this unreachable for well-typed messages).
    """
    fields: dict[str, Any]
    if isinstance(msg, Data):
        if value is None:
            raise ValueError("encode_header needs the wire array of a Data")
        fields = {
            "t": "data",
            "q": msg.seq,
            "g": msg.tag,
            "s": msg.sender,
            "p": msg.step,
            "r": msg.to,
            "b": msg.post,
            # (packed: the array the payload's bytes unpack to, which is msg.value)
            "y": DTYPE_CODES[(value if msg.packed is None else msg.value).dtype.type],
            "h": msg.value.shape,
        }
        if msg.packed is not None:
            fields["z"] = (msg.packed.scheme.value, msg.packed.block)
    else:
        fields = {"t": msg.kind}
        for key, name in HEADER_KEYS[msg.kind]:
            fields[key] = getattr(msg, name)
    try:
        packed: bytes = msgpack.packb(fields, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(Reason.BAD_FIELD, f"{msg.kind}: cannot pack ({exc})") from exc
    return packed


def decode_header(
    raw: bytes | memoryview, payload_len: int, part: bool = False
) -> Message | DataHead:
    """Decode and validate one header; ``payload_len`` is the length the prefix announced —
    with ``part``, that of a Data's first part, which must be shorter than its array.

    Returns the message itself, or a :class:`DataHead` for a data frame (its payload has not
    been read yet: the codec allocates the array once this returned).

    Raises:
        LocalProtocolError: ``bad_header``, ``unknown_type``, ``bad_field``, ``bad_dtype``,
            ``bad_shape`` or ``size_mismatch``.
    """
    size = len(raw)
    try:
        # The caller capped ``size`` (MAX_HEADER); every msgpack length is bounded by it too, and
        # the C unpacker bounds nesting (StackError), so a hostile header cannot make msgpack
        # allocate much more than itself.
        obj = msgpack.unpackb(
            raw,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,
            max_map_len=size,
            max_ext_len=size,
        )
    except Exception as exc:  # untrusted bytes: whatever the unpacker raises means "bad header"
        raise LocalProtocolError(
            Reason.BAD_HEADER, f"header is not valid msgpack ({type(exc).__name__})"
        ) from exc
    if not isinstance(obj, dict):
        raise LocalProtocolError(
            Reason.BAD_HEADER, f"header is a msgpack {type(obj).__name__}, expected a map"
        )
    kind = obj.get("t")
    if not isinstance(kind, str):
        raise LocalProtocolError(
            Reason.BAD_HEADER, f"header type 't' missing or not a str: {excerpt(kind)}"
        )
    expected = _KEY_SETS.get(kind)
    if expected is None:
        raise LocalProtocolError(Reason.UNKNOWN_TYPE, f"unknown message type {excerpt(kind)}")
    if obj.keys() != expected and not (kind == "data" and obj.keys() == _PACKED_KEYS):
        missing = sorted(expected - obj.keys())
        extra = sorted(repr(k) for k in obj.keys() - expected)
        raise LocalProtocolError(
            Reason.BAD_HEADER,
            f"{kind} header: missing keys {missing}, unexpected keys {excerpt(extra)}",
        )
    if kind == "data":
        return _data_head(obj, payload_len, part)
    if payload_len:
        raise LocalProtocolError(
            Reason.SIZE_MISMATCH,
            f"{kind} frame with a {payload_len}-byte payload (only data has one)",
        )
    return MESSAGE_TYPES[kind](**{name: obj[key] for key, name in HEADER_KEYS[kind]})


def _data_head(obj: dict[str, Any], payload_len: int, part: bool) -> DataHead:
    seq, tag, sender, step, to, post = check_data_fields(
        obj["q"], obj["g"], obj["s"], obj["p"], obj["r"], obj["b"]
    )
    code = obj["y"]
    dtype = _WIRE_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise LocalProtocolError(
            Reason.BAD_DTYPE,
            f"data dtype {excerpt(code)} not supported (one of {sorted(_WIRE_DTYPES)})",
        )
    shape = obj["h"]
    if type(shape) is not tuple or len(shape) > MAX_DIMS:  # (an ExtType is a tuple subclass)
        raise LocalProtocolError(
            Reason.BAD_SHAPE, f"data shape {excerpt(shape)}: expected at most {MAX_DIMS} dimensions"
        )
    for n in shape:
        if type(n) is not int or not 0 <= n <= INT64_MAX:  # (bool is not int here)
            raise LocalProtocolError(
                Reason.BAD_SHAPE, f"data shape {excerpt(shape)}: dimensions must be int64 ≥ 0"
            )
    # Python ints: a product that would wrap around in int64 cannot fake a small size.
    nbytes = math.prod(shape) * dtype.itemsize
    packing = _packing(obj["z"], shape) if "z" in obj else None
    # numpy refuses a shape whose non-zero dimensions multiply past intp, even for an empty
    # array ((0, 2**62) cannot be allocated): refuse it here rather than let the allocator raise.
    extent = nbytes if nbytes else math.prod(n for n in shape if n) * dtype.itemsize
    if extent > _INTP_MAX:
        raise LocalProtocolError(
            Reason.BAD_SHAPE, f"data shape {excerpt(shape)}: too large for an array"
        )
    array_bytes = nbytes
    if packing is not None:
        nbytes = packed_size(packing[0], shape[0], packing[1])
    if part:
        if not 0 < payload_len < nbytes:
            raise LocalProtocolError(
                Reason.BAD_PART,
                f"data {code} {excerpt(shape)} is {nbytes} bytes, its first part {payload_len}",
            )
    elif nbytes != payload_len:
        raise LocalProtocolError(
            Reason.SIZE_MISMATCH,
            f"data {code} {excerpt(shape)} is {nbytes} bytes, the frame carries {payload_len}",
        )
    if packing is not None and array_bytes == 0:
        raise LocalProtocolError(Reason.BAD_SHAPE, "a packed data array must not be empty")
    return DataHead(seq, tag, sender, step, to, post, dtype, shape, nbytes, packing)


def _packing(value: object, shape: tuple[int, ...]) -> tuple[Scheme, int]:
    """A packed Data's ``"z"``: a known scheme and its block, for a one-dimensional array."""
    if not (type(value) is tuple and len(value) == 2):
        raise LocalProtocolError(
            Reason.BAD_FIELD, f"data packing {excerpt(value)}: expected [scheme, block]"
        )
    name, block = value
    scheme = _PACKINGS.get(name) if isinstance(name, str) else None
    if scheme is None:
        raise LocalProtocolError(
            Reason.BAD_FIELD,
            f"data packing scheme {excerpt(name)} unknown (one of {sorted(_PACKINGS)})",
        )
    # (the type first: `in range` scans the whole range for a float)
    fits = type(block) is int and (block in _BLOCKS if scheme is Scheme.INT8 else block == 0)
    if not fits:
        want = "8 ≤ block ≤ 65536" if scheme is Scheme.INT8 else "block 0"
        raise LocalProtocolError(
            Reason.BAD_FIELD, f"data packing {scheme} with block {excerpt(block)}: {want}"
        )
    if len(shape) != 1:
        raise LocalProtocolError(
            Reason.BAD_SHAPE, f"a packed data array has one dimension, not {excerpt(shape)}"
        )
    return scheme, block
