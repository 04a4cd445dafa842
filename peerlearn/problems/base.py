"""The problem interface: an objective Q and its stochastic gradient oracle G.

A problem is deterministic once built: its data, its start point ``x0`` and its constants are
fixed by the problem parameters (and, for generated data, by the *problem* seed, common to every
process). Randomness of the oracle comes only from the ``rng`` a caller passes to :meth:`grad`,
one independent stream per process: Attiya–Schiller's Lemma 1 needs independent samples
across processes, and a shared seed would lose the 1/N variance gain.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peerlearn.effects import Vector

__all__ = ["Constants", "InDtype", "Problem", "in_dtype"]


@dataclass(frozen=True)
class Constants:
    """What the theorems need, where known: smoothness L, strong convexity μ, gradient-noise
    variance bound σ² (total over coordinates, for one oracle call), minimiser x*, and Q* (the
    minimum, or a lower bound on Q)."""

    L: float | None = None
    mu: float | None = None
    sigma2: float | None = None
    x_star: Vector | None = None
    q_star: float | None = None


class Problem(ABC):
    """An objective with a stochastic gradient oracle."""

    #: short name used in configs and outputs
    name: str = "problem"

    @property
    @abstractmethod
    def dim(self) -> int:
        """Number of parameters."""

    @property
    def dtype(self) -> np.dtype[np.floating]:
        """The dtype of its models and gradients: float64, or float32 (a torch model's); a
        run's ``dtype`` setting casts them otherwise (:func:`in_dtype`)."""
        return np.dtype(np.float64)

    @abstractmethod
    def x0(self) -> Vector:
        """The common start point x_1 (a fresh array each call)."""

    @abstractmethod
    def grad(self, x: Vector, rng: np.random.Generator) -> Vector:
        """A stochastic gradient G(x, z) with z drawn from ``rng``: unbiased, variance ≤ σ²."""

    @abstractmethod
    def loss(self, x: Vector) -> float:
        """The objective Q(x) (on the training data, for data problems)."""

    @abstractmethod
    def full_grad(self, x: Vector) -> Vector:
        """The exact gradient ∇Q(x)."""

    def oracle(
        self, pid: int, processes: int, local: int
    ) -> Callable[[Vector, np.random.Generator], Vector]:
        """Process ``pid``'s gradient oracle (of ``processes`` in the run; ``local`` of them
        compute at once in this daemon — 1 in the simulator): :meth:`grad`, unless the
        problem gives each process state of its own — a data shard, a model of its own where
        a framework's modules are not safe to share between worker threads
        (:mod:`peerlearn.torch`)."""
        return self.grad

    @property
    def constants(self) -> Constants:
        """Constants the bounds need; fields are ``None`` where unknown."""
        return Constants()

    def eval_loss(self, x: Vector, batch: int) -> float:
        """The loss on a fixed evaluation batch of at most ``batch`` examples — what a daemon
        exports as ``peerlearn_loss``: cheap, and comparable across workers and time because
        the batch never changes. Problems without data evaluate the exact loss."""
        return self.loss(x)

    def export(self, x: Vector, directory: Path) -> list[Path]:
        """Write the model ``x`` in the problem's own format into ``directory`` beside
        ``--out``'s model.npz (a torch model's ``model.pt``); the files written. None here."""
        return []

    def evaluate(self, x: Vector) -> dict[str, float]:
        """Extra quality figures for reports (e.g. test accuracy); empty by default."""
        return {}


class InDtype(Problem):
    """``problem`` with models and gradients in ``dtype`` instead of its own: the start point
    and every gradient are cast once (the one copy a gradient may cost); losses, evaluation
    and export take models of either dtype and compute in the problem's own."""

    def __init__(self, problem: Problem, dtype: np.dtype[np.floating]) -> None:
        self.inner = problem
        self.name = problem.name
        self._dtype = dtype

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def dtype(self) -> np.dtype[np.floating]:
        return self._dtype

    def x0(self) -> Vector:
        return self.inner.x0().astype(self._dtype)

    def grad(self, x: Vector, rng: np.random.Generator) -> Vector:
        return self.inner.grad(x, rng).astype(self._dtype, copy=False)

    def loss(self, x: Vector) -> float:
        return self.inner.loss(x)

    def full_grad(self, x: Vector) -> Vector:
        return self.inner.full_grad(x).astype(self._dtype, copy=False)

    def oracle(
        self, pid: int, processes: int, local: int
    ) -> Callable[[Vector, np.random.Generator], Vector]:
        return _CastOracle(self.inner.oracle(pid, processes, local), self._dtype)

    @property
    def constants(self) -> Constants:
        return self.inner.constants

    def eval_loss(self, x: Vector, batch: int) -> float:
        return self.inner.eval_loss(x, batch)

    def export(self, x: Vector, directory: Path) -> list[Path]:
        return self.inner.export(x, directory)

    def evaluate(self, x: Vector) -> dict[str, float]:
        return self.inner.evaluate(x)


class _CastOracle:
    """A process's oracle with its gradients cast to ``dtype``; what else the oracle tells
    (a torch process's ``epochs``) is the inner one's."""

    def __init__(
        self, inner: Callable[[Vector, np.random.Generator], Vector], dtype: np.dtype[np.floating]
    ) -> None:
        self.inner = inner
        self.dtype = dtype

    def __call__(self, x: Vector, rng: np.random.Generator) -> Vector:
        return self.inner(x, rng).astype(self.dtype, copy=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def in_dtype(problem: Problem, dtype: str | None) -> Problem:
    """``problem`` with its models in ``dtype`` ("float32", "float64"; None: its own)."""
    if dtype is None or np.dtype(dtype) == problem.dtype:
        return problem
    return InDtype(problem, np.dtype(dtype))
