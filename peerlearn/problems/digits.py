"""Ten-class problems on scikit-learn's 8×8 digits: a convex and a non-convex model.

:class:`SoftmaxRegression` is strongly convex (ridge on every parameter) with a computable L, a
real-data companion to the quadratic for Algorithm 1. :class:`MLP` is a smooth (tanh) one-hidden-
layer network, a real-data non-convex problem for Algorithm 2. Both train on a stratified 75/25
split chosen by ``seed`` and report test accuracy from :meth:`evaluate`. Gradients are manual,
vectorised backprop: no autograd dependency, and exact enough to check by finite differences.
"""

from __future__ import annotations

import numpy as np

from peerlearn.effects import Vector
from peerlearn.problems._checks import check_int
from peerlearn.problems._data import (
    DataProblem,
    IntArray,
    digits_split,
    max_gram_eigenvalue,
    softmax_xent,
)
from peerlearn.problems.base import Constants

__all__ = ["MLP", "SoftmaxRegression"]

N_CLASSES = 10
#: second SeedSequence word for the MLP initialisation, so it never reuses the split's stream
_INIT_STREAM = 1


class SoftmaxRegression(DataProblem):
    """Multinomial logistic regression, θ = (vec W ∈ ℝ^{64×10} row-major, b ∈ ℝ¹⁰).

    Q(θ) = mean cross-entropy + (l2/2)‖θ‖²; start θ = 0. Constants: μ = l2 and
    L = ½·λ_max(X̃ᵀX̃/n) + l2, because the softmax Hessian diag(p) − ppᵀ has eigenvalues ≤ ½
    (Gershgorin: 2p_i(1−p_i) ≤ ½), so the data Hessian is ≼ ½·I ⊗ X̃ᵀX̃/n. Q* ≥ 0 is given as
    the lower bound 0.
    """

    name = "softmax"

    def __init__(self, batch_size: int = 16, l2: float = 1e-3, seed: int = 0) -> None:
        self._seed = check_int(self.name, "seed", seed, minimum=0)
        super().__init__(digits_split(self._seed), batch_size, l2)
        self._n_features = int(self._split.x_train.shape[1])
        self._w_size = self._n_features * N_CLASSES
        lipschitz = 0.5 * max_gram_eigenvalue(self._split.x_train) + self._l2
        self._constants = Constants(L=lipschitz, mu=self._l2 or None, q_star=0.0)

    @property
    def dim(self) -> int:
        return self._w_size + N_CLASSES

    @property
    def constants(self) -> Constants:
        return self._constants

    def x0(self) -> Vector:
        return np.zeros(self.dim, dtype=np.float64)

    def _logits(self, theta: Vector, features: Vector) -> Vector:
        weights = theta[: self._w_size].reshape(self._n_features, N_CLASSES)
        result: Vector = features @ weights + theta[self._w_size :]
        return result

    def _data_loss(self, theta: Vector, features: Vector, labels: IntArray) -> float:
        return softmax_xent(self._logits(theta, features), labels)[0]

    def _data_grad(self, theta: Vector, features: Vector, labels: IntArray) -> Vector:
        _, dlogits = softmax_xent(self._logits(theta, features), labels)
        g = np.empty(self.dim, dtype=np.float64)
        g[: self._w_size].reshape(self._n_features, N_CLASSES)[...] = features.T @ dlogits
        g[self._w_size :] = dlogits.sum(axis=0)
        return g

    def _predict(self, theta: Vector, features: Vector) -> IntArray:
        predicted: IntArray = np.argmax(self._logits(theta, features), axis=1).astype(np.int64)
        return predicted

    def __repr__(self) -> str:
        return f"SoftmaxRegression(batch_size={self._batch_size}, l2={self._l2}, seed={self._seed})"


class MLP(DataProblem):
    """One-hidden-layer tanh network, θ = (vec W1 ∈ ℝ^{64×h}, b1, vec W2 ∈ ℝ^{h×10}, b2).

    tanh rather than ReLU keeps Q smooth, as the non-convex theorems assume (no global L is
    known, so ``constants.L`` is None; Q* ≥ 0 is given as the lower bound 0). The start point is
    a small deterministic random init from ``seed`` (weights N(0, 1/fan_in), biases 0): θ = 0
    would be a stationary point where every hidden unit stays identical forever.
    """

    name = "mlp"

    def __init__(
        self, hidden: int = 32, batch_size: int = 16, l2: float = 1e-4, seed: int = 0
    ) -> None:
        self._seed = check_int(self.name, "seed", seed, minimum=0)
        self._hidden = check_int(self.name, "hidden", hidden, minimum=1)
        super().__init__(digits_split(self._seed), batch_size, l2)
        n_in, h = int(self._split.x_train.shape[1]), self._hidden
        self._n_features = n_in
        # Offsets of W1 | b1 | W2 | b2 in the flat parameter vector.
        self._o1 = n_in * h
        self._o2 = self._o1 + h
        self._o3 = self._o2 + h * N_CLASSES
        self._dim = self._o3 + N_CLASSES
        rng = np.random.default_rng([self._seed, _INIT_STREAM])
        x0 = np.zeros(self._dim, dtype=np.float64)
        x0[: self._o1] = rng.standard_normal(self._o1) / np.sqrt(n_in)
        x0[self._o2 : self._o3] = rng.standard_normal(self._o3 - self._o2) / np.sqrt(h)
        self._x0: Vector = x0
        self._constants = Constants(q_star=0.0)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def constants(self) -> Constants:
        return self._constants

    def x0(self) -> Vector:
        return self._x0.copy()

    def _forward(self, theta: Vector, features: Vector) -> tuple[Vector, Vector]:
        """(hidden activations, logits) for a batch."""
        w1 = theta[: self._o1].reshape(self._n_features, self._hidden)
        w2 = theta[self._o2 : self._o3].reshape(self._hidden, N_CLASSES)
        hidden = np.tanh(features @ w1 + theta[self._o1 : self._o2])
        logits: Vector = hidden @ w2 + theta[self._o3 :]
        return hidden, logits

    def _data_loss(self, theta: Vector, features: Vector, labels: IntArray) -> float:
        return softmax_xent(self._forward(theta, features)[1], labels)[0]

    def _data_grad(self, theta: Vector, features: Vector, labels: IntArray) -> Vector:
        hidden, logits = self._forward(theta, features)
        _, dlogits = softmax_xent(logits, labels)
        w2 = theta[self._o2 : self._o3].reshape(self._hidden, N_CLASSES)
        dpre = dlogits @ w2.T
        dpre *= 1.0 - hidden * hidden  # tanh' = 1 − tanh²
        g = np.empty(self._dim, dtype=np.float64)
        g[: self._o1].reshape(self._n_features, self._hidden)[...] = features.T @ dpre
        g[self._o1 : self._o2] = dpre.sum(axis=0)
        g[self._o2 : self._o3].reshape(self._hidden, N_CLASSES)[...] = hidden.T @ dlogits
        g[self._o3 :] = dlogits.sum(axis=0)
        return g

    def _predict(self, theta: Vector, features: Vector) -> IntArray:
        predicted: IntArray = np.argmax(self._forward(theta, features)[1], axis=1).astype(np.int64)
        return predicted

    def __repr__(self) -> str:
        return (
            f"MLP(hidden={self._hidden}, batch_size={self._batch_size}, l2={self._l2}, "
            f"seed={self._seed})"
        )
