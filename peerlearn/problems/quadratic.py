"""The strongly convex quadratic of Attiya–Schiller Theorem 1 (experiment E1, docs/papers.md).

Q(x) = ½ Σ_k λ_k (x_k − x*_k)² with eigenvalues λ_k spread evenly over [μ, L] and the oracle
G(x, z) = ∇Q(x) + ξ, ξ ~ N(0, (σ²/d)·I). Everything a bound needs is known exactly: L, μ,
E‖ξ‖² = σ², x* and Q* = 0, so tests can compare measured errors with the theorem's right-hand
side instead of with a guess.
"""

from __future__ import annotations

import math

import numpy as np

from peerlearn.effects import Vector
from peerlearn.errors import ProblemError
from peerlearn.problems._checks import check_float, check_int
from peerlearn.problems.base import Constants, Problem

__all__ = ["NoisyQuadratic"]


class NoisyQuadratic(Problem):
    """Diagonal quadratic with additive isotropic Gaussian gradient noise.

    Parameters
    ----------
    dim:
        Number of coordinates d ≥ 1.
    mu, L:
        Smallest and largest eigenvalue, 0 < μ ≤ L. The eigenvalues are ``linspace(mu, L, dim)``;
        with ``dim == 1`` that is the single eigenvalue μ, for which μ and L are still valid
        strong-convexity and smoothness constants (L is then an upper bound, not tight).
    sigma:
        Noise standard deviation in total: E‖G − ∇Q‖² = σ² (per-coordinate std σ/√d).
    start_distance2:
        ‖x0 − x*‖², the initial squared distance that Theorem 1's first term scales with.
    seed:
        Problem seed: fixes x* and the direction of x0 − x*, common to every process.
    """

    name = "quadratic"

    def __init__(
        self,
        dim: int = 10,
        mu: float = 0.5,
        L: float = 2.0,
        sigma: float = 1.0,
        start_distance2: float = 10.0,
        seed: int = 0,
    ) -> None:
        self._dim = check_int(self.name, "dim", dim, minimum=1)
        self._mu = check_float(self.name, "mu", mu, positive=True)
        self._L = check_float(self.name, "L", L, positive=True)
        if self._mu > self._L:
            raise ProblemError(f"{self.name}: need mu ≤ L, got mu={self._mu}, L={self._L}")
        self._sigma = check_float(self.name, "sigma", sigma, nonnegative=True)
        self._start_distance2 = check_float(
            self.name, "start_distance2", start_distance2, nonnegative=True
        )
        self._seed = check_int(self.name, "seed", seed, minimum=0)

        self._lam: Vector = np.linspace(self._mu, self._L, self._dim, dtype=np.float64)
        rng = np.random.default_rng(self._seed)
        x_star = rng.standard_normal(self._dim)
        direction = rng.standard_normal(self._dim)
        direction /= np.linalg.norm(direction)
        self._x0: Vector = x_star + math.sqrt(self._start_distance2) * direction
        x_star.flags.writeable = False
        self._x_star: Vector = x_star
        # Per-coordinate std: the *total* variance over d coordinates is σ², as Theorem 1 uses.
        self._noise_std = self._sigma / math.sqrt(self._dim)
        self._constants = Constants(
            L=self._L, mu=self._mu, sigma2=self._sigma**2, x_star=self._x_star, q_star=0.0
        )

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def eigenvalues(self) -> Vector:
        """The Hessian's diagonal λ (a copy)."""
        return self._lam.copy()

    @property
    def constants(self) -> Constants:
        return self._constants

    def x0(self) -> Vector:
        return self._x0.copy()

    def grad(self, x: Vector, rng: np.random.Generator) -> Vector:
        # The simulator calls this millions of times: two temporaries, no Python-level loops.
        if self._noise_std == 0.0:
            return self.full_grad(x)
        g = rng.standard_normal(self._dim)
        g *= self._noise_std
        diff = x - self._x_star
        diff *= self._lam
        g += diff
        return g

    def full_grad(self, x: Vector) -> Vector:
        diff = x - self._x_star
        diff *= self._lam
        return diff

    def loss(self, x: Vector) -> float:
        diff = x - self._x_star
        return 0.5 * float(np.dot(self._lam * diff, diff))

    def evaluate(self, x: Vector) -> dict[str, float]:
        """Squared distance to x*, the quantity Theorem 1 bounds."""
        diff = x - self._x_star
        return {"dist2": float(np.dot(diff, diff))}

    def __repr__(self) -> str:
        return (
            f"NoisyQuadratic(dim={self._dim}, mu={self._mu}, L={self._L}, sigma={self._sigma}, "
            f"start_distance2={self._start_distance2}, seed={self._seed})"
        )
