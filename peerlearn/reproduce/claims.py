"""What an experiment of ``peerlearn reproduce`` hands to the report: the paper's claims, the
measured intervals over seeds, and their verdicts.

A claim passes when the 95 % interval of the measured quantity over seeds lies within the bound
(at or below an upper bound, at or above a lower one), or overlaps the exact value of a closed
form. A comparison where the paper states no bound carries no verdict and says so. Every check
also gives measured/bound, so a bound that sits far above what it bounds shows as such.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from peerlearn.ties import at_most

__all__ = ["Check", "Claim", "Interval", "Outcome", "Relation", "Verdict"]

#: how the measured quantity must stand to the bound: ≤, ≥, = (a closed form), or no bound
Relation = Literal["at_most", "at_least", "equals", "none"]
Verdict = Literal["PASS", "FAIL", "no verdict"]

_SYMBOL = {"at_most": "≤", "at_least": "≥", "equals": "=", "none": "vs"}


@dataclass(frozen=True)
class Claim:
    """What a paper states: its short name, where (section, lemma), and the statement."""

    paper: str
    where: str
    statement: str


@dataclass(frozen=True)
class Interval:
    """The mean of one quantity over ``n`` seeds and its 95 % t-interval [low, high]; with one
    value (a deterministic quantity) the interval is that value."""

    mean: float
    low: float
    high: float
    n: int
    unit: str = "seeds"  # what the n values are

    @classmethod
    def over(cls, values: Sequence[float], level: float = 0.95, unit: str = "seeds") -> Interval:
        """The interval of ``values`` (one per seed, or per ``unit``), Student's t with n − 1
        degrees of freedom."""
        xs = np.asarray(values, dtype=np.float64)
        if xs.size == 0:
            raise ValueError("an interval needs at least one value")
        mean = float(xs.mean())
        if xs.size == 1:
            return cls(mean, mean, mean, 1, unit)
        half = float(
            stats.t.ppf(0.5 + level / 2, xs.size - 1) * xs.std(ddof=1) / math.sqrt(xs.size)
        )
        return cls(mean, mean - half, mean + half, int(xs.size), unit)

    @classmethod
    def exact(cls, value: float) -> Interval:
        """A quantity computed, not sampled (a closed form, an exact recursion)."""
        return cls(value, value, value, 1)

    def text(self) -> str:
        if self.n == 1:
            return _num(self.mean)
        return f"{_num(self.mean)} [{_num(self.low)}, {_num(self.high)}] ({self.n} {self.unit})"


@dataclass(frozen=True)
class Check:
    """One measured quantity against one claim."""

    quantity: str
    measured: Interval
    claim: Claim
    relation: Relation
    bound: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if (self.bound is None) != (self.relation == "none"):
            raise ValueError(f"{self.quantity}: a bound goes with a relation, and only then")

    @property
    def verdict(self) -> Verdict:
        m, b = self.measured, self.bound
        if b is None:
            return "no verdict"
        match self.relation:
            case "at_most":
                ok = at_most(m.high, b)
            case "at_least":
                ok = at_most(b, m.low)
            case _:  # equals: the interval overlaps the exact value (a tie counts)
                ok = at_most(m.low, b) and at_most(b, m.high)
        return "PASS" if ok else "FAIL"

    @property
    def ratio(self) -> float | None:
        """measured / bound (None without a bound, or for a bound of 0)."""
        if self.bound is None or self.bound == 0:
            return None
        return self.measured.mean / self.bound

    def bound_text(self) -> str:
        if self.bound is None:
            return "— (no bound stated)"
        return f"{_SYMBOL[self.relation]} {_num(self.bound)}"


@dataclass(frozen=True)
class Outcome:
    """One experiment's result, as the report shows it."""

    name: str
    title: str
    paper: str
    setup: str
    checks: tuple[Check, ...]
    figures: tuple[str, ...] = ()
    findings: str = ""
    seconds: float = 0.0
    quick: bool = False

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == "FAIL"]


def _num(x: float) -> str:
    """A whole number as it is; else four significant digits, in exponent notation outside
    [1e-3, 1e5)."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    if x == int(x) and abs(x) < 1e9:  # a count
        return str(int(x))
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"
