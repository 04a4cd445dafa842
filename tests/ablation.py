"""Switch averaging off, to check that the learning-quality tests can fail (docs/testing.md).

A pytest plugin, never loaded by default::

    .venv/bin/python -m pytest -p tests.ablation tests/test_theorems.py tests/test_daemon.py \
        tests/test_demo.py

It replaces the Alg 1 and Alg 2 programs that every runtime builds (through their records in
``peerlearn.algorithms.records.attiya_schiller``: the simulator, the daemons, the demo) with
versions that keep each process's own value: Alg 1
still exchanges its parameters but keeps its own step instead of the mean; Alg 2 still
exchanges gradients but steps with its own and runs no agreement. The learning-quality tests
must then fail; every other behaviour (messages, quorums, steps) stays as it was.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from peerlearn.algorithms.aggregate import Aggregator
from peerlearn.algorithms.records import attiya_schiller
from peerlearn.algorithms.schedules import Schedule
from peerlearn.algorithms.sgd import _iterations
from peerlearn.effects import AtLeast, Count, Effect, Exchange, Grad, Report, Vector


def alg1_own_value(
    x1: Vector, steps: int | None, quorum: int, eta: Schedule
) -> Generator[Effect, Any, Vector]:
    x = x1
    t = 0
    for t in _iterations(steps):
        yield Report("model", x, step=t)
        g = yield Grad(x)
        y = x - eta(t) * g
        yield Exchange(("params", t), y, Count(quorum))
        x = y
    yield Report("model", x, step=t + 1)
    return x


def alg2_own_gradient(
    x1: Vector,
    steps: int | None,
    quorum: int,
    eta: Schedule,
    tau: int | None,
    rounds: int | None,
    inner_rounds: int,
    aggregator: Aggregator = Aggregator.MIDEXT,
) -> Generator[Effect, Any, Vector]:
    x = x_tau = x1
    t = 0
    for t in _iterations(steps):
        if t == tau:
            x_tau = x
        yield Report("model", x, step=t)
        g = yield Grad(x)
        yield Exchange(("grad", t), g, AtLeast(quorum))
        x = x - eta(t) * g
    yield Report("model", x, step=t + 1)
    return x_tau if tau is not None else x


def pytest_configure() -> None:
    # The names the records' program factories call: replacing a name nobody calls would
    # switch nothing off, and the ablation test would wrongly call the learning tests blind.
    for name, ablated in (("alg1", alg1_own_value), ("alg2", alg2_own_gradient)):
        assert callable(getattr(attiya_schiller, name, None)), f"records call no {name}"
        setattr(attiya_schiller, name, ablated)


def pytest_report_header() -> str:
    return "tests.ablation: Alg 1 and Alg 2 averaging switched OFF (learning tests must fail)"
