"""Tosi–Theobald's synthetic logistic regression (DASGD Section 5, Fig. 2b).

f(x) = (1/m) Σ_j log(1 + exp(−b_j a_jᵀx)) with a_j ~ N(0, I_d) and labels b_j uniform in
{−1, +1}, drawn from ``seed``; no intercept, no ridge. With m = 100 random labels in d = 20 the
data are not separable (with high probability; checked at construction), so the minimiser is
finite. Its curvature is small (L ≈ 0.5), which is why gradient descent at η = 0.002 needs
180k–230k iterations (by seed) to bring ‖∇f‖ under 1e-12.
"""

from __future__ import annotations

import numpy as np

from peerlearn.effects import Vector
from peerlearn.errors import ProblemError
from peerlearn.problems._checks import check_int
from peerlearn.problems.base import Constants, Problem
from peerlearn.problems.logistic import sigmoid

__all__ = ["GaussianLogistic"]


class GaussianLogistic(Problem):
    """Logistic loss on m Gaussian points with random ±1 labels, full-batch gradients by default.

    Parameters
    ----------
    dim, samples:
        d and m (20 and 100 in the paper).
    batch_size:
        Points per stochastic gradient, drawn with replacement; 0 (the default, the paper's
        setting) means the full gradient: σ = 0.
    seed:
        Draws the points and labels, common to every process.
    """

    name = "gaussian_logistic"

    def __init__(
        self, dim: int = 20, samples: int = 100, batch_size: int = 0, seed: int = 0
    ) -> None:
        self._dim = check_int(self.name, "dim", dim, minimum=1)
        self._m = check_int(self.name, "samples", samples, minimum=1)
        self._batch = check_int(self.name, "batch_size", batch_size, minimum=0)
        self._seed = check_int(self.name, "seed", seed, minimum=0)
        rng = np.random.default_rng(self._seed)
        a = rng.standard_normal((self._m, self._dim))
        b = rng.choice(np.array([-1.0, 1.0]), size=self._m)
        self._ba = b[:, None] * a  # the loss depends on a_j and b_j only through b_j·a_j
        if self._separable():
            raise ProblemError(
                f"{self.name}: the {self._m} points of seed {self._seed} are linearly "
                f"separable in {self._dim} dimensions (no finite minimiser); use more samples "
                "or another seed"
            )
        # ∇²f = (1/m) Σ σ'(·) a_j a_jᵀ with σ' ≤ ¼
        lipschitz = 0.25 * float(np.linalg.eigvalsh(self._ba.T @ self._ba / self._m)[-1])
        # full gradients have no noise; a mini-batch's variance is not known in closed form
        sigma2 = 0.0 if self._batch == 0 else None
        self._constants = Constants(L=lipschitz, sigma2=sigma2, q_star=0.0)

    def _separable(self) -> bool:
        """Whether some x has b_j a_jᵀx > 0 for every j (then the loss has no minimiser): the
        linear program "find x with b_j a_jᵀx ≥ 1 for all j" is feasible exactly then. (Data
        separable only weakly, some b_j a_jᵀx = 0, have probability 0 for Gaussian points.)"""
        from scipy.optimize import linprog  # only here: a second's import for one check

        found = linprog(
            np.zeros(self._dim),
            A_ub=-self._ba,
            b_ub=-np.ones(self._m),
            bounds=(None, None),
            method="highs",
        )
        if found.status not in (0, 2):  # neither feasible nor infeasible: no answer
            raise ProblemError(f"{self.name}: the separability check failed: {found.message}")
        return bool(found.status == 0)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def constants(self) -> Constants:
        return self._constants

    def x0(self) -> Vector:
        return np.zeros(self._dim, dtype=np.float64)

    def _grad_of(self, x: Vector, rows: Vector) -> Vector:
        # ∂/∂x log(1 + exp(−z)) = −σ(−z)·∂z/∂x with z = b_j a_jᵀx
        weights = sigmoid(-(rows @ x))
        g: Vector = -(weights @ rows) / rows.shape[0]
        return g

    def full_grad(self, x: Vector) -> Vector:
        return self._grad_of(x, self._ba)

    def grad(self, x: Vector, rng: np.random.Generator) -> Vector:
        if self._batch == 0:
            return self.full_grad(x)
        return self._grad_of(x, self._ba[rng.integers(0, self._m, size=self._batch)])

    def loss(self, x: Vector) -> float:
        return float(np.mean(np.logaddexp(0.0, -(self._ba @ x))))

    def __repr__(self) -> str:
        return (
            f"GaussianLogistic(dim={self._dim}, samples={self._m}, batch_size={self._batch}, "
            f"seed={self._seed})"
        )
