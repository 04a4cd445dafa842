"""Smooth non-convex objectives for Algorithm 2 (E3) and the partition demo of Theorem 5 (E4).

Both have closed-form derivatives and additive Gaussian oracle noise, so L, σ² and Q* are known
and the Lemma 21/22 bounds can be evaluated exactly.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from peerlearn.effects import Vector
from peerlearn.problems._checks import check_float, check_int
from peerlearn.problems.base import Constants, Problem

__all__ = ["DoubleWell", "SmoothNonConvex"]


def _dw_loss(x: float | Vector) -> float | Vector:
    return -np.exp(-((x - 1.0) ** 2)) - np.exp(-((x + 1.0) ** 2))


def _dw_grad(x: float | Vector) -> float | Vector:
    return 2.0 * (x - 1.0) * np.exp(-((x - 1.0) ** 2)) + 2.0 * (x + 1.0) * np.exp(-((x + 1.0) ** 2))


def _dw_hess(x: float | Vector) -> float | Vector:
    a, b = (x - 1.0) ** 2, (x + 1.0) ** 2
    return 2.0 * np.exp(-a) * (1.0 - 2.0 * a) + 2.0 * np.exp(-b) * (1.0 - 2.0 * b)


@functools.cache
def _double_well_facts() -> tuple[float, float, float]:
    """(L, x_min, Q*) of the double well, computed once.

    L is max |Q''| over a fine grid on [−8, 8] (outside it |Q''| < 1e−20) plus a margin that
    covers the grid error: near a maximum that error is at most h²·max|Q''''|/8 ≈ 1e−7 for
    h = 1e−4, so 1e−6 keeps L a valid upper bound. The minimiser is refined by Newton's method
    from the grid minimum, because the wells sit slightly inside ±1 (each pulls on the other)
    and a grid value would overestimate Q*, which must be a lower bound.
    """
    grid = np.linspace(-8.0, 8.0, 160_001)
    lipschitz = float(np.max(np.abs(_dw_hess(grid)))) + 1e-6
    x = float(grid[np.argmin(_dw_loss(grid))])
    for _ in range(50):
        step = float(_dw_grad(x)) / float(_dw_hess(x))
        x -= step
        if abs(step) < 1e-15:
            break
    x_min = abs(x)
    return lipschitz, x_min, float(_dw_loss(x_min))


class DoubleWell(Problem):
    """Q(x) = −exp(−(x−1)²) − exp(−(x+1)²) on ℝ, started at the local maximum x = 0.

    The two minima at ≈ ±0.958 are symmetric, so from x0 = 0 sequential SGD ends in either well
    with probability ½ each: the (γ, p)-split objective of Theorem 5. The oracle adds
    N(0, σ²) noise; without noise SGD would stay at the stationary point 0 forever.
    """

    name = "double_well"

    def __init__(self, sigma: float = 0.5) -> None:
        self._sigma = check_float(self.name, "sigma", sigma, nonnegative=True)
        lipschitz, x_min, q_star = _double_well_facts()
        self._minimizers = (-x_min, x_min)
        # Two minimisers, so Constants.x_star stays None; see :attr:`minimizers`.
        self._constants = Constants(L=lipschitz, sigma2=self._sigma**2, q_star=q_star)

    @property
    def dim(self) -> int:
        return 1

    @property
    def minimizers(self) -> tuple[float, float]:
        """The two global minimisers (−a, a), a ≈ 0.9575."""
        return self._minimizers

    @property
    def constants(self) -> Constants:
        return self._constants

    def x0(self) -> Vector:
        return np.zeros(1, dtype=np.float64)

    def grad(self, x: Vector, rng: np.random.Generator) -> Vector:
        noise = self._sigma * float(rng.standard_normal()) if self._sigma > 0.0 else 0.0
        return np.array([self._scalar_grad(float(x[0])) + noise], dtype=np.float64)

    def full_grad(self, x: Vector) -> Vector:
        return np.array([self._scalar_grad(float(x[0]))], dtype=np.float64)

    @staticmethod
    def _scalar_grad(v: float) -> float:
        # Scalar math: ~5x faster than numpy ufuncs on a length-1 array, and grad is hot.
        a, b = v - 1.0, v + 1.0
        return 2.0 * a * math.exp(-a * a) + 2.0 * b * math.exp(-b * b)

    def loss(self, x: Vector) -> float:
        return float(np.sum(_dw_loss(np.asarray(x, dtype=np.float64))))

    def evaluate(self, x: Vector) -> dict[str, float]:
        """Which well x is in (sign) and how far from its minimiser, for the partition demo."""
        value = float(x[0])
        nearest = self._minimizers[1] if value >= 0.0 else self._minimizers[0]
        return {"well": math.copysign(1.0, value), "dist_to_min": abs(value - nearest)}

    def __repr__(self) -> str:
        return f"DoubleWell(sigma={self._sigma})"


class SmoothNonConvex(Problem):
    """Q(x) = Σ_k φ(x_k − c_k) with φ(u) = u²/(1+u²): smooth, bounded, non-convex for |u| > 1/√3.

    φ''(u) = (2 − 6u²)/(1+u²)³ has max |φ''| = 2 at u = 0, so L = 2; Q* = 0 at x = c. The centre
    c ~ N(0, I) and the start x0 = c ± ``start`` (random signs) come from ``seed``: at the
    default |u| = 2 every coordinate starts in the non-convex region, which is what Algorithm 2
    is for; at |u| = 1/√3 the gradient is steepest (|φ'| = 3√3/8). The oracle adds
    N(0, (σ²/d)·I) noise, total variance σ².
    """

    name = "nonconvex"

    def __init__(
        self, dim: int = 10, sigma: float = 1.0, seed: int = 0, start: float = 2.0
    ) -> None:
        self._dim = check_int(self.name, "dim", dim, minimum=1)
        self._sigma = check_float(self.name, "sigma", sigma, nonnegative=True)
        self._seed = check_int(self.name, "seed", seed, minimum=0)
        self._start = check_float(self.name, "start", start, nonnegative=True)
        rng = np.random.default_rng(self._seed)
        centre = rng.standard_normal(self._dim)
        signs = rng.choice(np.array([-1.0, 1.0]), size=self._dim)
        self._x0: Vector = centre + self._start * signs
        centre.flags.writeable = False
        self._centre: Vector = centre
        self._noise_std = self._sigma / math.sqrt(self._dim)
        self._constants = Constants(L=2.0, sigma2=self._sigma**2, x_star=self._centre, q_star=0.0)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def constants(self) -> Constants:
        return self._constants

    def x0(self) -> Vector:
        return self._x0.copy()

    def grad(self, x: Vector, rng: np.random.Generator) -> Vector:
        g = self.full_grad(x)
        if self._noise_std > 0.0:
            noise = rng.standard_normal(self._dim)
            noise *= self._noise_std
            g += noise
        return g

    def full_grad(self, x: Vector) -> Vector:
        u = x - self._centre
        denom = 1.0 + u * u
        denom *= denom
        u *= 2.0
        u /= denom
        return u

    def loss(self, x: Vector) -> float:
        u2 = (x - self._centre) ** 2
        return float(np.sum(u2 / (1.0 + u2)))

    def evaluate(self, x: Vector) -> dict[str, float]:
        """‖∇Q(x)‖², the stationarity measure Theorems 3 and 4 bound."""
        g = self.full_grad(x)
        return {"grad_norm2": float(np.dot(g, g))}

    def __repr__(self) -> str:
        return (
            f"SmoothNonConvex(dim={self._dim}, sigma={self._sigma}, seed={self._seed}, "
            f"start={self._start})"
        )
