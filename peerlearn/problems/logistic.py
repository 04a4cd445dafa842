"""L2-regularised logistic regression on scikit-learn's breast-cancer data.

A real-data, strongly convex problem for Algorithm 1 whose μ and L are known (μ = l2 from the
ridge term; L from the Hessian bound σ'(z) ≤ ¼) but whose x* is not.
"""

from __future__ import annotations

import numpy as np

from peerlearn.effects import Vector
from peerlearn.problems._checks import check_int
from peerlearn.problems._data import (
    DataProblem,
    IntArray,
    breast_cancer_split,
    max_gram_eigenvalue,
)
from peerlearn.problems.base import Constants

__all__ = ["LogisticRegression", "sigmoid"]


def sigmoid(z: Vector) -> Vector:
    """σ(z) = 1/(1 + e^−z)."""
    # tanh form: no overflow for large |z|, unlike 1 / (1 + exp(−z)).
    result: Vector = 0.5 * (1.0 + np.tanh(0.5 * z))
    return result


class LogisticRegression(DataProblem):
    """Binary logistic regression, θ = (w ∈ ℝ³⁰, b): Q(θ) = mean log-loss + (l2/2)‖θ‖².

    Features are standardised with training statistics; ``seed`` picks the stratified 75/25
    train/test split (the loss is on the training part, ``evaluate`` reports both). The start
    point is θ = 0, the usual choice for a convex problem. Constants: μ = l2 and
    L = ¼·λ_max(X̃ᵀX̃/n) + l2 (X̃ the training features with a column of ones); Q* ≥ 0 is given
    as the lower bound 0, σ² and x* are unknown.
    """

    name = "logistic"

    def __init__(self, batch_size: int = 8, l2: float = 1e-3, seed: int = 0) -> None:
        self._seed = check_int(self.name, "seed", seed, minimum=0)
        super().__init__(breast_cancer_split(self._seed), batch_size, l2)
        self._n_features = int(self._split.x_train.shape[1])
        lipschitz = 0.25 * max_gram_eigenvalue(self._split.x_train) + self._l2
        self._constants = Constants(L=lipschitz, mu=self._l2 or None, q_star=0.0)

    @property
    def dim(self) -> int:
        return self._n_features + 1

    @property
    def constants(self) -> Constants:
        return self._constants

    def x0(self) -> Vector:
        return np.zeros(self.dim, dtype=np.float64)

    def _logits(self, theta: Vector, features: Vector) -> Vector:
        result: Vector = features @ theta[:-1] + theta[-1]
        return result

    def _data_loss(self, theta: Vector, features: Vector, labels: IntArray) -> float:
        z = self._logits(theta, features)
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))

    def _data_grad(self, theta: Vector, features: Vector, labels: IntArray) -> Vector:
        residual = sigmoid(self._logits(theta, features)) - labels
        residual /= labels.size
        g = np.empty(self.dim, dtype=np.float64)
        g[:-1] = features.T @ residual
        g[-1] = residual.sum()
        return g

    def _predict(self, theta: Vector, features: Vector) -> IntArray:
        return (self._logits(theta, features) > 0.0).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"LogisticRegression(batch_size={self._batch_size}, l2={self._l2}, seed={self._seed})"
        )
