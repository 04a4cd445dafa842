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


def _int8_row_parts(grid: Array, codes: npt.NDArray[np.int8]) -> npt.NDArray[np.int16] | None:
    """The codes of whole rows, into ``codes`` (the rows' shape), and their exponents: row ≈
    code·2^e, e the exponent k of the row's largest magnitude m = f·2^k (f ∈ [½, 1)) less 7,
    so m/2^e ∈ [64, 128) — one more where that rounds to 128. Scales are powers of two, so
    every product here is exact (in the rows' own dtype); a row whose largest magnitude is
    below ``_FLUSH`` of its dtype (near the subnormals, where 2^−e would overflow) is all
    zeros. None: a row holds a NaN or an infinity (its largest magnitude is not finite)."""
    peak = np.maximum(grid.max(axis=1), -grid.min(axis=1))  # (no |grid| temporary)
    if not np.isfinite(peak).all():
        return None
    exp = np.frexp(peak)[1].astype(np.int64) - 7
    tiny = peak < _FLUSH[grid.dtype.type]
    exp[tiny] = 0
    scale = np.ldexp(1.0, -exp)  # one power of two per row: exact, and normal
    exp += np.rint(peak * scale) > _CODE_MAX
    scale = np.ldexp(1.0, -exp).astype(grid.dtype)  # (float32 rows stay float32)
    scale[tiny] = 0.0
    scaled = grid * scale[:, None]
    np.rint(scaled, out=scaled)
    np.copyto(codes, scaled, casting="unsafe")  # |code| ≤ 127: exact
    exps: npt.NDArray[np.int16] = exp.astype("<i2")
    return exps


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


def _int8_chunk(
    part: Array, block: int, codes: npt.NDArray[np.int8], exps: npt.NDArray[np.int16]
) -> bool:
    """Codes and exponents of ``part`` (whole blocks, but for a short last one) into
    ``codes`` and ``exps``; False if ``part`` is not finite."""
    whole = part.size // block * block
    if whole:
        exp = _int8_row_parts(part[:whole].reshape(-1, block), codes[:whole].reshape(-1, block))
        if exp is None:
            return False
        exps[: whole // block] = exp
    if whole < part.size:  # the short last block, padded with zeros
        padded = np.zeros((1, block), part.dtype)
        padded[0, : part.size - whole] = part[whole:]
        last = np.empty((1, block), np.int8)
        exp = _int8_row_parts(padded, last)
        if exp is None:
            return False
        codes[whole:] = last[0, : part.size - whole]
        exps[-1] = exp[0]
    return True


#: what a value beyond a scheme's range is beyond (a warning says it)
_LIMITS: Final = {
    Scheme.FP16: "beyond ±65504",
    Scheme.BF16: "beyond float32's range",
    Scheme.INT8: "within half a step of the largest float of its dtype",
}

#: values encoded per pass: the temporaries of a pass (a few MB) stay in the caches and need no
#: fresh pages — one pass over a 10⁷-value model in one go took 10× what ten passes of 10⁶ did
_CHUNK: Final = 1 << 18


def _encode_into(
    scheme: Scheme,
    flat: Array,
    block: int,
    out: Array,
    raw: npt.NDArray[np.uint8],
    residual: Array | None = None,
) -> tuple[int, int] | None:
    """Round the 1-D ``flat`` into ``out`` and pack it into ``raw``, a chunk at a time; with
    ``residual`` (error feedback), round ``flat`` + ``residual`` and leave in ``residual`` what
    rounding took off — all in one pass per chunk. None when done; else the chunk ``(at, end)``
    where some value did not fit the scheme or was not finite — ``residual`` then holds the
    new residuals before ``at``, what was meant in the chunk, and the old residuals after."""
    n = flat.size
    step = max(_CHUNK // block, 1) * block if scheme is Scheme.INT8 else _CHUNK
    with np.errstate(over="ignore", invalid="ignore"):
        for at in range(0, n, step):
            end = min(at + step, n)
            part, into = flat[at:end], out[at:end]
            if residual is not None:  # what is meant: the value and what is owed
                part = np.add(part, residual[at:end], out=residual[at:end])
            match scheme:
                case Scheme.FP16:
                    half = raw[2 * at : 2 * end].view("<f2")
                    np.copyto(half, part, casting="same_kind")
                    np.copyto(into, half)
                case Scheme.BF16:
                    bits = raw[2 * at : 2 * end].view("<u2")
                    bits[...] = _bf16_bits(part)
                    into[...] = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
                case Scheme.INT8:  # (a NaN or infinity would become finite codes: refused)
                    codes = raw[at:end].view(np.int8)
                    exps = raw[n + 2 * (at // block) : n + 2 * -(-end // block)].view("<i2")
                    if not _int8_chunk(part, block, codes, exps):
                        return at, end
                    _from_int8(codes, exps, block, flat.dtype, into)
                case _:
                    raise ValueError(f"scheme {scheme!r} has no packed form")
            # an input NaN or infinity stays one; an overflow becomes one (fp16 beyond ±65504,
            # bf16 beyond float32's range, int8 within half a step of the dtype's largest)
            if not np.isfinite(into).all():
                return at, end
            if residual is not None:
                # meant − rounded is exact (Sterbenz: rounded is 0 or within a factor 2 of it)
                np.subtract(part, into, out=part)
    return None


def encode(
    scheme: Scheme, value: Array, block: int = DEFAULT_BLOCK
) -> tuple[Array, npt.NDArray[np.uint8]] | None:
    """``value`` rounded to the scheme (a new array of its dtype and shape) and its packed
    bytes, which :func:`unpack` turns into exactly that rounded value; None where some element
    does not fit the scheme at all (fp16 beyond ±65504, bf16 beyond float32's range) or is
    not finite itself."""
    flat = np.ascontiguousarray(value).reshape(-1)
    out = np.empty(flat.size, value.dtype)
    raw = np.empty(packed_size(scheme, flat.size, block), np.uint8)
    if _encode_into(scheme, flat, block, out, raw) is not None:
        return None
    return out.reshape(value.shape), raw


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
        self._last.pop(stream, None)
        residual = self._residual.pop(stream, None) if self.feedback else None
        owed = residual is not None
        if self.feedback and residual is None:
            residual = np.zeros(value.size, value.dtype)
        flat = np.ascontiguousarray(value).reshape(-1)
        rounded = np.empty(flat.size, value.dtype)
        raw = np.empty(packed_size(self.scheme, flat.size, self.block), np.uint8)
        failed = _encode_into(self.scheme, flat, self.block, rounded, raw, residual)
        if failed is not None:
            if not np.isfinite(value).all():
                return value  # diverged: the runtime stops the process on it, unrounded
            self.exact += 1  # does not fit the scheme: sent exact, what was meant, nothing owed
            if self.exact == 1 or self.exact % 1000 == 0:
                log.warning(
                    "a value on stream %s does not fit %s (%s): sent exact, not rounded "
                    "(%d so far)",
                    stream,
                    self.scheme,
                    _LIMITS[self.scheme],
                    self.exact,
                )
            if residual is None or not owed:
                return value
            at, end = failed  # the buffer holds what was meant in the failed chunk: rebuild it
            residual[:at] += rounded[:at]  # exact: it was meant − rounded
            residual[end:] += flat[end:]
            return residual.reshape(value.shape)
        out = rounded.reshape(value.shape)
        self._last[stream] = (out, raw)
        if residual is not None:
            self._residual[stream] = residual
        return out

    def packed(self, value: Array) -> npt.NDArray[np.uint8] | None:
        """The packed bytes of ``value`` if it is the last value this compressor rounded on
        some stream (the very object), else None."""
        for rounded, raw in self._last.values():
            if rounded is value:
                return raw
        return None

    def owed(self) -> dict[Hashable, Array]:  # (copies: the buffers are reused)
        """Each stream's residual: what it meant to send and has not sent yet. (On a stream of
        whole models whose sender keeps its own unrounded model — a gossip request, an elastic
        snapshot — the residual only steers the next rounding, as in sigma-delta coding: the
        sender owes nobody that model.)"""
        return {stream: r.copy() for stream, r in self._residual.items()}

    def owed_total(self) -> Array | None:
        """The residuals of all streams summed (None: none), in stream order."""
        parts = list(self._residual.values())
        if not parts:
            return None
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        return total
