"""Shared machinery of the dataset problems: loading, splitting, mini-batch oracle.

Datasets are the small ones bundled with scikit-learn (no download, so runs work offline). A
loaded split is cached per seed at module level: the simulator builds one problem per run and
sweeps build hundreds of runs, and re-reading the CSVs each time would dominate small runs.
Cached arrays are read-only so that no instance can corrupt another's data.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from peerlearn.effects import Vector
from peerlearn.errors import ProblemError
from peerlearn.problems._checks import check_float, check_int
from peerlearn.problems.base import Problem

__all__ = ["DataProblem", "Split", "breast_cancer_split", "digits_split", "stratified_split"]

IntArray = npt.NDArray[np.int64]

#: fraction of each class held out for ``evaluate``
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Split:
    """A train/test split: float64 features, int64 class labels 0..k−1."""

    x_train: Vector
    y_train: IntArray
    x_test: Vector
    y_test: IntArray


def stratified_split(
    labels: IntArray, test_fraction: float, seed: int
) -> tuple[IntArray, IntArray]:
    """Deterministic stratified split: (train indices, test indices), both sorted.

    Written out rather than taken from ``sklearn.model_selection`` so the split is a function of
    (labels, fraction, seed) alone and cannot change with the scikit-learn version.
    """
    rng = np.random.default_rng(seed)
    test: list[IntArray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = round(test_fraction * members.size)
        test.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask).astype(np.int64), test_idx


def _freeze(split: Split) -> Split:
    for array in (split.x_train, split.y_train, split.x_test, split.y_test):
        array.flags.writeable = False
    return split


def _load(loader: str) -> tuple[Vector, IntArray]:
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - scikit-learn is a hard dependency
        raise ProblemError(f"scikit-learn is needed for the {loader} data: {exc}") from exc
    bunch = getattr(datasets, loader)()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


@functools.cache
def breast_cancer_split(seed: int) -> Split:
    """Breast cancer (569 × 30, 2 classes), standardised with the *training* mean and std."""
    features, labels = _load("load_breast_cancer")
    train, test = stratified_split(labels, TEST_FRACTION, seed)
    mean = features[train].mean(axis=0)
    std = features[train].std(axis=0)
    std[std == 0.0] = 1.0
    scaled = (features - mean) / std
    return _freeze(Split(scaled[train], labels[train], scaled[test], labels[test]))


@functools.cache
def digits_split(seed: int) -> Split:
    """Digits (1797 × 64, 10 classes), pixel values 0..16 scaled to [0, 1]."""
    features, labels = _load("load_digits")
    train, test = stratified_split(labels, TEST_FRACTION, seed)
    scaled = features / 16.0
    return _freeze(Split(scaled[train], labels[train], scaled[test], labels[test]))


def max_gram_eigenvalue(features: Vector) -> float:
    """λ_max(X̃ᵀX̃/n) with X̃ = [X, 1]: the curvature scale of linear models with a bias."""
    n = features.shape[0]
    augmented = np.hstack([features, np.ones((n, 1))])
    return float(np.linalg.eigvalsh(augmented.T @ augmented / n)[-1])


class DataProblem(Problem):
    """Empirical risk on a training split plus (l2/2)‖θ‖², with a mini-batch oracle.

    The oracle draws ``batch_size`` indices uniformly *with replacement* from the caller's rng,
    so E[G] = ∇Q exactly (sampling without replacement would be unbiased too, but independence
    of the draws keeps the variance a clean σ²_1/B). The ridge term covers every parameter,
    biases included, so Q is l2-strongly convex whenever the data term is convex.

    Subclasses supply the data term through :meth:`_data_loss`, :meth:`_data_grad` and
    :meth:`_predict`, each vectorised over a batch.
    """

    def __init__(self, split: Split, batch_size: int, l2: float) -> None:
        self._split = split
        self._batch_size = check_int(self.name, "batch_size", batch_size, minimum=1)
        self._l2 = check_float(self.name, "l2", l2, nonnegative=True)
        self._n_train = int(split.y_train.size)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def split(self) -> Split:
        """The (read-only) data this problem trains and evaluates on."""
        return self._split

    @abstractmethod
    def _data_loss(self, theta: Vector, features: Vector, labels: IntArray) -> float:
        """Mean loss over the rows of ``features``."""

    @abstractmethod
    def _data_grad(self, theta: Vector, features: Vector, labels: IntArray) -> Vector:
        """Gradient of :meth:`_data_loss` with respect to θ (a fresh array)."""

    @abstractmethod
    def _predict(self, theta: Vector, features: Vector) -> IntArray:
        """Predicted class per row."""

    def grad(self, x: Vector, rng: np.random.Generator) -> Vector:
        idx = rng.integers(0, self._n_train, size=self._batch_size)
        g = self._data_grad(x, self._split.x_train[idx], self._split.y_train[idx])
        if self._l2 > 0.0:
            g += self._l2 * x
        return g

    def full_grad(self, x: Vector) -> Vector:
        g = self._data_grad(x, self._split.x_train, self._split.y_train)
        if self._l2 > 0.0:
            g += self._l2 * x
        return g

    def loss(self, x: Vector) -> float:
        data = self._data_loss(x, self._split.x_train, self._split.y_train)
        return data + 0.5 * self._l2 * float(np.dot(x, x))

    def eval_loss(self, x: Vector, batch: int) -> float:
        """The regularised loss on the first ``batch`` examples of a fixed permutation of the
        training split (seed 0: the same rows on every daemon and at every evaluation)."""
        if batch >= self._n_train:
            return self.loss(x)
        inputs, labels = self._eval_batch(batch)
        data = self._data_loss(x, inputs, labels)
        return data + 0.5 * self._l2 * float(np.dot(x, x))

    @functools.cache  # noqa: B019 — one small batch per batch size, for the problem's life
    def _eval_batch(self, batch: int) -> tuple[Vector, IntArray]:
        rows = np.random.default_rng(0).permutation(self._n_train)[:batch]
        return self._split.x_train[rows], self._split.y_train[rows]

    def evaluate(self, x: Vector) -> dict[str, float]:
        """Train/test accuracy and the test data loss (without the ridge term)."""
        s = self._split
        return {
            "train_accuracy": float(np.mean(self._predict(x, s.x_train) == s.y_train)),
            "test_accuracy": float(np.mean(self._predict(x, s.x_test) == s.y_test)),
            "test_loss": self._data_loss(x, s.x_test, s.y_test),
        }


def softmax_xent(logits: Vector, labels: IntArray) -> tuple[float, Vector]:
    """Mean cross-entropy of ``logits`` (n × k) and its gradient with respect to the logits.

    Uses the max-shifted log-sum-exp so large logits cannot overflow.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(labels.size)
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, labels]))
    probs = exp / total
    probs[rows, labels] -= 1.0
    probs /= labels.size
    return loss, probs
