"""Learning-rate schedules η_t (t = 1, 2, …), the same for every process in iteration t."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = ["Constant", "InverseTime", "Schedule", "sqrt_n_over_t"]


@dataclass(frozen=True, slots=True)
class Constant:
    """η_t = eta (Thm 3/4 use η = √(N/T))."""

    eta: float
    kind: Literal["constant"] = "constant"

    def __call__(self, t: int) -> float:
        return self.eta


@dataclass(frozen=True, slots=True)
class InverseTime:
    """η_t = β/(γ + t) (Thm 1: needs β > 1/μ, γ > 0 and β/(γ+1) ≤ 1/L)."""

    beta: float
    gamma: float
    kind: Literal["inverse_time"] = "inverse_time"

    def __call__(self, t: int) -> float:
        return self.beta / (self.gamma + t)


Schedule: TypeAlias = Constant | InverseTime


def sqrt_n_over_t(quorum: int, steps: int) -> float:
    """The constant step size of Thm 3/4: η = √(N/T)."""
    return math.sqrt(quorum / steps)
