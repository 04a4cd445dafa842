"""When two computed floats count as equal: the one tie rule of the closed forms and thresholds.

Many quantities here land exactly on a boundary in exact arithmetic — a window norm of exactly ½
(slack γ = 1 − 2^{−1/k}, |λ₂(W)| = 2^{−1/k}, products of pair averages), φ = −1 at β = β_max,
T = 16L²N — and the last bits of the computed value then depend on the BLAS kernel numpy picks,
the libm and the order of a reduction, not on the mathematics: ``eigvalsh`` returns
0.5000000000000003 for a λ₂ of exactly ½ on one machine and 0.5 on another. So every such
comparison goes through :func:`compare`: two values within a relative ``TIE_RTOL`` of each other
are *equal*. A non-strict condition (``≤``) then holds at a tie and a strict one (``<``) fails
at a tie, on every machine.

``TIE_RTOL`` = 1e-9 is far above rounding (a few ulps, ~1e-16 relative; about 1e-12 after the
10⁵ matrix products of the slowest t_mix computed here) and far below any difference the
results care about.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["TIE_RTOL", "at_most", "below", "ceil", "compare"]

TIE_RTOL: Final = 1e-9


def compare(a: float, b: float) -> int:
    """−1, 0 or 1 as a < b, a = b or a > b, where a = b when |a − b| ≤ TIE_RTOL·max(|a|, |b|).

    For finite a and b only — the closed forms and thresholds give it nothing else: a NaN
    compares as greater either way round, and so does ∞ against itself."""
    if abs(a - b) <= TIE_RTOL * max(abs(a), abs(b)):
        return 0
    return -1 if a < b else 1


def at_most(a: float, b: float) -> bool:
    """a ≤ b, a tie counting as equal (so it holds)."""
    return compare(a, b) <= 0


def below(a: float, b: float) -> bool:
    """a < b, a tie counting as equal (so it fails)."""
    return compare(a, b) < 0


def ceil(x: float) -> int:
    """⌈x⌉, where x within TIE_RTOL of an integer k counts as k: ⌈log_{7/8}(7/8)³⌉ is 3 even
    when the division comes out 3.0000000000000004."""
    nearest = round(x)
    return int(nearest) if compare(x, nearest) == 0 else math.ceil(x)
