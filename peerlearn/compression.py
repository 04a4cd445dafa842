"""Payload compression: the lossy rounding a program applies, and the lossless wire form.

Compression has two halves, kept apart on purpose:

1. **Rounding** (lossy, in the algorithm's view). A program asks for the value it is about to
   send to be rounded — the ``Quantize`` effect — and goes on with the rounded value wherever
   it uses what it sent. :class:`Compressor` does the rounding, one per process, with *error
   feedback*: what rounding took off a stream's value is added to that stream's next value, so
   nothing is lost for good, only delayed. Both runtimes (simulator and daemon) use this class,
   so a simulated run rounds exactly as a real one.
2. **Packing** (lossless, on the wire). A rounded value is exactly representable in its
   scheme's compact form: :func:`pack` writes that form, :func:`unpack` reads it back to the
   very same floats. :func:`pack` checks the value round-trips and returns None if it does not
   (a value nobody rounded: it then goes as plain floats) — so the wire never changes a value,
   and a value forwarded as received (a relay, a neutral answer) packs again as it was.

Schemes (``[compression] scheme``):

=========  ====================================================================  ============
scheme     representable values                                                   bytes/value
=========  ====================================================================  ============
``none``   everything: no rounding, no packing                                    8 (4)
``fp16``   IEEE half precision (11 significant bits, |x| ≤ 65504)                 2
``bf16``   bfloat16: float32's range, 8 significant bits (float64 values are          2
           rounded to float32 first, then to bfloat16)
``int8``   per block of ``block`` values, c·2^e with an integer |c| ≤ 127 and     1 + 2/block
           one exponent e per block (the smallest that fits the block's largest
           value: 64 ≤ max|c| ≤ 127)
=========  ====================================================================  ============

int8's scale is a power of two so that rounding is *idempotent*: a rounded block rounds to
itself (its exponent and codes come out the same), which is what lets a relayed value pack
again exactly. A value that does not fit a scheme at all (fp16 beyond ±65504) is sent exact
instead, and counted (:attr:`Compressor.exact`).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from enum import StrEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_BLOCK",
    "Compressor",
    "Scheme",
    "encode",
    "nearest",
    "pack",
    "packed_size",
    "unpack",
]

#: int8 values per exponent by default: 2 bytes of exponent per 256 values (0.8 %)
DEFAULT_BLOCK: Final = 256
#: the widest codes int8 uses: ±127 (−128 is never produced, so the range is symmetric)
_CODE_MAX: Final = 127
#: int8: a block whose largest magnitude is below this rounds to zeros (2^−1000 for float64,
#: 2^−100 for float32: far below any model's values, and every code·2^e above it is normal)
_FLUSH: Final = {np.float64: 2.0**-1000, np.float32: 2.0**-100}

Array = npt.NDArray[Any]

log = logging.getLogger(__name__)


class Scheme(StrEnum):
    NONE = "none"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


def packed_size(scheme: Scheme, n: int, block: int) -> int:
    """Bytes of the packed form of ``n`` values."""
    match scheme:
        case Scheme.FP16 | Scheme.BF16:
            return 2 * n
        case Scheme.INT8:
            return n + 2 * -(-n // block)
    raise ValueError(f"scheme {scheme!r} has no packed form")


# --- the schemes, value by value --------------------------------------------------------------


def _bf16_bits(value: Array) -> npt.NDArray[np.uint16]:
    """The bfloat16 nearest (ties to even) to each value rounded to float32 — its upper 16
    bits (a float64 value is rounded twice: to float32, then to bfloat16)."""
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype("<u2")


def _from_bf16(bits: npt.NDArray[np.uint16], dtype: np.dtype[Any]) -> Array:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(dtype)


def _blocks(value: Array, block: int) -> list[Array]:
    """``value`` as rows of ``block``: a view of its whole blocks and, if any, its last short
    block padded with zeros (a copy of under ``block`` values, not of the whole vector)."""
    flat = value.reshape(-1)
    whole = flat.size // block * block
    rows = [flat[:whole].reshape(-1, block)] if whole else []
    if whole < flat.size:
        last = np.zeros((1, block), value.dtype)
        last[0, : flat.size - whole] = flat[whole:]
        rows.append(last)
    return rows


def _int8_row_parts(grid: Array) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int16]]:
    """Codes and exponents of whole rows: row ≈ code·2^e, e the exponent k of the row's largest
    magnitude m = f·2^k (f ∈ [½, 1)) less 7, so m/2^e ∈ [64, 128) — one more where that rounds
    to 128. Scales are powers of two, so every product here is exact; a row whose largest
    magnitude is below ``_FLUSH`` of its dtype (near the subnormals, where 2^−e would
    overflow) is all zeros."""
    peak = np.abs(grid).max(axis=1)
    exp = np.frexp(peak)[1].astype(np.int64) - 7
    tiny = peak < _FLUSH[grid.dtype.type]
    exp[tiny] = 0
    scale = np.ldexp(1.0, -exp)  # one power of two per row: exact, and normal
    exp += np.rint(peak * scale) > _CODE_MAX
    scale = np.ldexp(1.0, -exp)
    scale[tiny] = 0.0
    codes = grid * scale[:, None]
    np.rint(codes, out=codes)
    return codes.astype(np.int8), exp.astype("<i2")


def _int8_encode(value: Array, block: int) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int16]]:
    parts = [_int8_row_parts(rows) for rows in _blocks(value, block)]
    codes = np.concatenate([c.reshape(-1) for c, _ in parts])[: value.size]
    return codes, np.concatenate([e for _, e in parts])


def _from_int8(
    codes: npt.NDArray[np.int8],
    exp: npt.NDArray[np.int16],
    block: int,
    dtype: np.dtype[Any],
    out: Array | None = None,
) -> Array:
    """c·2^e, one power of two per block, into ``out`` (1-D, n values of ``dtype``) if given;
    exponents a legitimate encoder never produces (a hostile peer's) give infinities or NaN,
    which a receiver drops as non-finite."""
    if out is None:
        out = np.empty(codes.size, dtype)
    whole = codes.size // block * block
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.ldexp(1.0, exp.astype(np.int64)).astype(dtype)
        if whole:
            grid = out[:whole].reshape(-1, block)
            np.multiply(codes[:whole].reshape(-1, block), scale[: whole // block, None], out=grid)
        if whole < codes.size:
            np.multiply(codes[whole:], scale[-1], out=out[whole:])
    return out


def encode(
    scheme: Scheme, value: Array, block: int = DEFAULT_BLOCK
) -> tuple[Array, npt.NDArray[np.uint8]] | None:
    """``value`` rounded to the scheme (a new array of its dtype and shape) and its packed
    bytes, which :func:`unpack` turns into exactly that rounded value; None where some element
    does not fit the scheme at all (fp16 beyond ±65504, bf16 beyond float32's range) or is
    not finite itself."""
    dtype = value.dtype
    if value.size == 0:
        return value.copy(), np.empty(0, np.uint8)
    if not np.isfinite(value).all():  # int8 would turn it into finite garbage
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        match scheme:
            case Scheme.FP16:
                half = value.astype("<f2")
                out, raw = half.astype(dtype), half.reshape(-1).view(np.uint8)
            case Scheme.BF16:
                bits = _bf16_bits(value)
                out, raw = _from_bf16(bits, dtype), bits.reshape(-1).view(np.uint8)
            case Scheme.INT8:
                codes, exp = _int8_encode(value, block)
                out = _from_int8(codes, exp, block, dtype).reshape(value.shape)
                raw = np.concatenate((codes.view(np.uint8), exp.view(np.uint8)))
            case _:
                raise ValueError(f"scheme {scheme!r} has no packed form")
    return (out, raw) if np.isfinite(out).all() else None


def nearest(scheme: Scheme, value: Array, block: int = DEFAULT_BLOCK) -> Array | None:
    """``value`` rounded to the scheme (``value`` itself for ``none``), or None where it does
    not fit (see :func:`encode`)."""
    if scheme is Scheme.NONE:
        return value
    got = encode(scheme, value, block)
    return None if got is None else got[0]


def pack(scheme: Scheme, value: Array, block: int = DEFAULT_BLOCK) -> npt.NDArray[np.uint8] | None:
    """The packed bytes of ``value``, or None unless they unpack to exactly ``value``, bit for
    bit (−0.0 included: int8 has no negative zero) — the wire never changes a value."""
    got = encode(scheme, value, block)
    if got is None or not _same_bits(got[0], value):
        return None
    return got[1]


def _same_bits(a: Array, b: Array) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    unsigned = np.dtype(f"u{a.dtype.itemsize}")
    return np.array_equal(
        np.ascontiguousarray(a).view(unsigned), np.ascontiguousarray(b).view(unsigned)
    )


def unpack(
    scheme: Scheme,
    raw: npt.NDArray[np.uint8],
    dtype: np.dtype[Any],
    n: int,
    block: int,
    out: Array | None = None,
) -> Array:
    """The ``n`` values of ``dtype`` packed in ``raw`` (whose size must be
    :func:`packed_size`; the wire checks it before reading the bytes), into ``out`` if given (a
    contiguous array of n values of ``dtype``: a receive buffer, no temporary)."""
    if raw.size != packed_size(scheme, n, block):
        raise ValueError(f"{raw.size} bytes do not pack {n} values in {scheme} (block {block})")
    if out is None:
        out = np.empty(n, dtype)
    flat = out.reshape(-1)
    match scheme:
        case Scheme.FP16:
            flat[...] = raw.view("<f2")
        case Scheme.BF16:
            flat[...] = (raw.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
        case Scheme.INT8:
            _from_int8(raw[:n].view(np.int8), raw[n:].view("<i2"), block, dtype, flat)
        case _:
            raise ValueError(f"scheme {scheme!r} has no packed form")
    return out


# --- rounding with error feedback, per process ------------------------------------------------


class Compressor:
    """One process's rounding: ``compressor(stream, value)`` is ``value`` as it is to be sent.

    With error feedback, each stream (a program names it: the tag kind of its messages, or that
    and an addressee) keeps what rounding took off its last value — its *residual* — and adds
    it to the next value before rounding, so over a run every stream sends what it meant to,
    less its last residual (:meth:`owed`). ``Scheme.NONE`` returns the value itself.
    """

    def __init__(
        self, scheme: Scheme = Scheme.NONE, block: int = DEFAULT_BLOCK, feedback: bool = True
    ) -> None:
        self.scheme = scheme
        self.block = block
        self.feedback = feedback
        self._residual: dict[Hashable, Array] = {}
        #: each stream's last rounded value with its packed bytes: what the daemon's router
        #: sends for it without packing it again (:meth:`packed`)
        self._last: dict[Hashable, tuple[Array, npt.NDArray[np.uint8]]] = {}
        #: values sent exact because they did not fit the scheme (fp16 overflow)
        self.exact = 0

    def __call__(self, stream: Hashable, value: Array) -> Array:
        if self.scheme is Scheme.NONE:
            return value
        if not np.isfinite(value).all():
            return value  # diverged: the runtime stops the process on it, as without rounding
        residual = self._residual.get(stream) if self.feedback else None
        meant = value if residual is None else value + residual
        got = encode(self.scheme, meant, self.block)
        if got is None:  # does not fit: exact, and nothing owed
            self.exact += 1
            if self.exact == 1 or self.exact % 1000 == 0:
                log.warning(
                    "a value on stream %s does not fit %s (|x| > 65504?): sent exact, not "
                    "rounded (%d so far)",
                    stream,
                    self.scheme,
                    self.exact,
                )
            self._residual.pop(stream, None)
            self._last.pop(stream, None)
            return meant
        rounded = got[0]
        self._last[stream] = got
        if self.feedback:
            # meant − rounded is exact (Sterbenz: rounded is 0 or within a factor 2 of meant)
            self._residual[stream] = meant - rounded
        return rounded

    def packed(self, value: Array) -> npt.NDArray[np.uint8] | None:
        """The packed bytes of ``value`` if it is the last value this compressor rounded on
        some stream (the very object), else None."""
        for rounded, raw in self._last.values():
            if rounded is value:
                return raw
        return None

    def owed(self) -> dict[Hashable, Array]:
        """Each stream's residual: what it meant to send and has not sent yet. (On a stream of
        whole models whose sender keeps its own unrounded model — a gossip request, an elastic
        snapshot — the residual only steers the next rounding, as in sigma-delta coding: the
        sender owes nobody that model.)"""
        return dict(self._residual)

    def owed_total(self) -> Array | None:
        """The residuals of all streams summed (None: none), in stream order."""
        parts = list(self._residual.values())
        if not parts:
            return None
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        return total
