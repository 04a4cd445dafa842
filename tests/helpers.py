"""Shared helpers for tests: build configs, read the agreement trace, inject oracle faults."""

from __future__ import annotations

import importlib.util
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from peerlearn.config import RunConfig, load_config
from peerlearn.effects import Program, Quantize, Vector
from peerlearn.problems import Problem
from peerlearn.runs import grad_stream
from peerlearn.runtime.worker import Worker


def cfg(**over: Any) -> RunConfig:
    """A RunConfig from keyword overrides (nested tables as dicts)."""
    return load_config(overrides=over)


def barycentric(points: Vector, y: Vector) -> tuple[Vector, float]:
    """Affine weights w (Σw = 1) with pointsᵀw ≈ y, and the residual norm.

    With affinely independent points (random inputs in dimension d ≥ k − 1) the weights are
    unique, so y lies in the convex hull iff they are all ≥ 0 and the residual vanishes.
    """
    a = np.vstack([points.T, np.ones(points.shape[0])])
    b = np.concatenate([y, [1.0]])
    w, *_ = np.linalg.lstsq(a, b, rcond=None)
    return w, float(np.linalg.norm(a @ w - b))


class PureNoise(Problem):
    """A gradient that ignores x: ``grad(x, rng) = rng.standard_normal(dim)``.

    Process p's k-th gradient is then the k-th draw of its own stream whatever the schedule,
    so the sum of all gradients is known in advance and conservation laws (the average of the
    models under doubly stochastic mixing, the elastic symmetry) can be checked exactly."""

    name = "pure_noise"

    def __init__(self, dim: int = 3) -> None:
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def x0(self) -> Vector:
        return np.arange(1.0, self._dim + 1)

    def grad(self, x: Vector, rng: np.random.Generator) -> Vector:
        return rng.standard_normal(self._dim)

    def loss(self, x: Vector) -> float:
        return 0.5 * float(x @ x)

    def full_grad(self, x: Vector) -> Vector:
        return np.zeros(self._dim)


def noise_sum(config: RunConfig, counts: dict[int, int]) -> Vector:
    """Σ over processes p of the first ``counts[p]`` PureNoise gradients of p."""
    total = np.zeros(config.problem.params.get("dim", 3))
    for pid, k in counts.items():
        rng = grad_stream(config, pid)
        for _ in range(k):
            total += rng.standard_normal(len(total))
    return total


def oracle_fault(step: int, fault: Callable[[Vector], Vector], pid: int = 0) -> type[Worker]:
    """A Worker class whose process ``pid`` gets ``fault(gradient)`` instead of its gradient at
    iteration ``step`` (``fault`` may raise: an oracle that crashes). Every other process of a
    daemon built with it, and every other iteration, computes as usual."""

    class Faulty(Worker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            grad = self._grad

            def faulty(x: Vector, rng: np.random.Generator) -> Vector:
                g = grad(x, rng)
                return fault(g) if self.step == step and self.pid == pid else g

            self._grad = faulty

    return Faulty


def raises(message: str) -> Callable[[Vector], Vector]:
    """A fault for :func:`oracle_fault`: the oracle raises RuntimeError(message)."""

    def fault(_: Vector) -> Vector:
        raise RuntimeError(message)

    return fault


def member_files(directory: Path) -> list[str]:
    """``--secret-file`` and ``--api-token-file`` arguments with fresh files in ``directory``
    (owner-only, as a daemon requires): what daemons serving off loopback need."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for flag, name in (("--secret-file", "cluster.secret"), ("--api-token-file", "api.token")):
        path = directory / name
        if not path.exists():
            path.write_text(secrets.token_hex(24) + "\n")
            path.chmod(0o600)
        out += [flag, str(path)]
    return out


def exact(program: Program) -> Program:
    """``program`` as a runtime that compresses nothing runs it: each ``Quantize`` answered with
    its own value, and not shown — for tests that drive a program by hand, effect by effect."""
    value: Any = None
    try:
        while True:
            try:
                effect = program.send(value)
            except StopIteration as stop:
                return stop.value
            if isinstance(effect, Quantize):
                value = effect.value
                continue
            value = yield effect
    finally:
        program.close()  # closing the wrapper closes the program (its finally blocks run)


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module named ``name`` (registered in ``sys.modules``:
    dataclasses look their module up by name), for tests of a benchmark's own logic."""
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
