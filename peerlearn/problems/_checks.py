"""Parameter checks shared by the problem constructors.

Problem parameters come from user configs (TOML/JSON/CLI), so type hints alone do not protect
us: a ``batch_size`` of ``0`` or ``"8"`` must fail at construction with a :class:`ProblemError`
that names the parameter, not deep inside a simulation with a numpy error.
"""

from __future__ import annotations

import math
import numbers

from peerlearn.errors import ProblemError

__all__ = ["check_float", "check_int"]


def check_int(problem: str, name: str, value: object, *, minimum: int) -> int:
    """``value`` as an ``int`` ≥ ``minimum``; bools are rejected (``True`` is not a size)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ProblemError(f"{problem}: {name} must be an integer, got {value!r}")
    result = int(value)
    if result < minimum:
        raise ProblemError(f"{problem}: {name} must be ≥ {minimum}, got {result}")
    return result


def check_float(
    problem: str, name: str, value: object, *, positive: bool = False, nonnegative: bool = False
) -> float:
    """``value`` as a finite ``float``, optionally required > 0 or ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProblemError(f"{problem}: {name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ProblemError(f"{problem}: {name} must be finite, got {result}")
    if positive and result <= 0.0:
        raise ProblemError(f"{problem}: {name} must be > 0, got {result}")
    if nonnegative and result < 0.0:
        raise ProblemError(f"{problem}: {name} must be ≥ 0, got {result}")
    return result
