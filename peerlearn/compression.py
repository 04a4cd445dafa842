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
``bf16``   bfloat16: float32's range, 8 significant bits                          2
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

from collections.abc import Hashable
from enum import StrEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_BLOCK",
    "Compressor",
    "Scheme",
    "nearest",
    "pack",
    "packed_size",
    "unpack",
]

#: int8 values per exponent by default: 2 bytes of exponent per 256 values (0.8 %)
DEFAULT_BLOCK: Final = 256
#: the widest codes int8 uses: ±127 (−128 is never produced, so the range is symmetric)
_CODE_MAX: Final = 127

Array = npt.NDArray[Any]


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
    """The bfloat16 nearest (ties to even) to each value as float32: its upper 16 bits."""
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _from_bf16(bits: npt.NDArray[np.uint16], dtype: np.dtype[Any]) -> Array:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(dtype)


def _int8_parts(value: Array, block: int) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int16]]:
    """Codes and per-block exponents: value ≈ code·2^e. e is the exponent k of the block's
    largest magnitude m = f·2^k (f ∈ [½, 1)) less 7, so m/2^e ∈ [64, 128) — one more where that
    rounds to 128 — all in exact power-of-two arithmetic."""
    n = value.size
    blocks = -(-n // block)
    padded = np.zeros(blocks * block, dtype=value.dtype)
    padded[:n] = value
    grid = padded.reshape(blocks, block)
    peak = np.abs(grid).max(axis=1)
    exp = np.frexp(peak)[1].astype(np.int64) - 7
    exp += np.rint(np.ldexp(peak, -exp)) > _CODE_MAX
    codes = np.rint(np.ldexp(grid, -exp[:, None]))
    return codes.astype(np.int8).ravel()[:n], exp.astype(np.int16)


def _from_int8(
    codes: npt.NDArray[np.int8], exp: npt.NDArray[np.int16], block: int, dtype: np.dtype[Any]
) -> Array:
    n = codes.size
    blocks = exp.size
    padded = np.zeros(blocks * block, dtype=dtype)
    padded[:n] = codes
    out = np.ldexp(padded.reshape(blocks, block), exp.astype(np.int64)[:, None]).ravel()
    return out[:n].astype(dtype, copy=False)


def nearest(scheme: Scheme, value: Array, block: int = DEFAULT_BLOCK) -> Array | None:
    """``value`` rounded to the scheme (a new array of its dtype), or None where some element
    does not fit it at all (fp16 beyond ±65504, bf16 beyond float32's range)."""
    dtype = value.dtype
    match scheme:
        case Scheme.NONE:
            return value
        case Scheme.FP16:
            with np.errstate(over="ignore"):
                out = value.astype(np.float16).astype(dtype)
        case Scheme.BF16:
            with np.errstate(over="ignore"):
                out = _from_bf16(_bf16_bits(value), dtype)
        case Scheme.INT8:
            codes, exp = _int8_parts(value, block)
            out = _from_int8(codes, exp, block, dtype)
    return out if np.isfinite(out).all() else None


def pack(scheme: Scheme, value: Array, block: int = DEFAULT_BLOCK) -> npt.NDArray[np.uint8] | None:
    """The packed bytes of ``value`` (little-endian), or None unless they unpack to exactly
    ``value`` — the wire never changes a value."""
    match scheme:
        case Scheme.FP16:
            with np.errstate(over="ignore"):
                half = value.astype("<f2")
            raw = half.view(np.uint8)
        case Scheme.BF16:
            raw = _bf16_bits(value).astype("<u2").view(np.uint8)
        case Scheme.INT8:
            if not np.isfinite(value).all():
                return None
            codes, exp = _int8_parts(value, block)
            raw = np.concatenate((codes.view(np.uint8), exp.astype("<i2").view(np.uint8)))
        case _:
            raise ValueError(f"scheme {scheme!r} has no packed form")
    back = unpack(scheme, raw, value.dtype, value.size, block)
    return raw if np.array_equal(back, value.ravel()) else None


def unpack(
    scheme: Scheme, raw: npt.NDArray[np.uint8], dtype: np.dtype[Any], n: int, block: int
) -> Array:
    """The ``n`` values of ``dtype`` packed in ``raw`` (whose size must be
    :func:`packed_size`; the wire checks it before reading the bytes)."""
    if raw.size != packed_size(scheme, n, block):
        raise ValueError(f"{raw.size} bytes do not pack {n} values in {scheme} (block {block})")
    match scheme:
        case Scheme.FP16:
            return raw.view("<f2").astype(dtype)
        case Scheme.BF16:
            return _from_bf16(raw.view("<u2").astype(np.uint16), dtype)
        case Scheme.INT8:
            codes = raw[:n].view(np.int8)
            exp = raw[n:].view("<i2").astype(np.int16)
            return _from_int8(codes, exp, block, dtype)
    raise ValueError(f"scheme {scheme!r} has no packed form")


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
        #: values sent exact because they did not fit the scheme (fp16 overflow)
        self.exact = 0

    def __call__(self, stream: Hashable, value: Array) -> Array:
        if self.scheme is Scheme.NONE:
            return value
        residual = self._residual.get(stream) if self.feedback else None
        meant = value if residual is None else value + residual
        rounded = nearest(self.scheme, meant, self.block)
        if rounded is None:  # does not fit: exact, and nothing owed
            self.exact += 1
            self._residual.pop(stream, None)
            return meant
        if self.feedback:
            # meant − rounded is exact (Sterbenz: rounded is 0 or within a factor 2 of meant)
            self._residual[stream] = meant - rounded
        return rounded

    def owed(self) -> dict[Hashable, Array]:
        """Each stream's residual: what it meant to send and has not sent yet."""
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
