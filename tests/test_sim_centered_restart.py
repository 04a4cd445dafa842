"""The simulator's ``restart`` fault for centered algorithms (the elastic family): a restarted
center is rebuilt from its workers' ledgers, a restarted worker resumes from the center's model
after its last answered request (peerlearn/sim/core.py, ``_rejoin_centered``).

The invariant the property tests assert in every execution, whatever restarts: the run
finishes (no worker waits for good on an answer lost with the center, and the rebuilt center
serves exactly the requests it counts), and once every exchange is done the center's model is
x̃_1 + Σ_i D_i, D_i the sum of the differences worker i applied (its last ledger report) — which
with the workers' own updates is asynchronous EASGD's conservation law. An exchange counted on
one side only (a lost answer applied, an answer applied twice, a request served twice) breaks
it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from peerlearn.errors import ConfigError
from peerlearn.membership import Membership
from peerlearn.sim import SimResult, Status, run_simulation

from .helpers import cfg

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 3, "sigma": 0.1}

#: a restart point: (process, "t" or "time", iteration or virtual time)
Point = tuple[int, str, float]


def _config(
    algorithm: str, workers: int, steps: int, tau: int, points: list[Point], seed: int = 0
) -> Any:
    n = workers + 1
    members = Membership(n, n)
    crashes = []
    for pid, when, at in points:
        at_text = str(int(at)) if when == "t" else f"{at:.3f}"
        crashes.append(f"process:{members.name(pid)}@{when}={at_text}:restart")
    return cfg(
        algorithm=algorithm,
        processes=n,
        clusters=n,
        steps=steps,
        lr={"eta": 0.1},
        elastic={"tau": tau},
        problem=QUAD,
        seed=seed,
        sim={"crashes": crashes},
    )


def _run(algorithm: str, workers: int, steps: int, tau: int, points: list[Point]) -> SimResult:
    return run_simulation(
        _config(algorithm, workers, steps, tau, points), record_reports=("ledger", "model")
    )


def _last(res: SimResult, name: str) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for pid, rep in res.reports:
        if rep.name == name:
            out[pid] = rep
    return out


def _points(workers: int, steps: int, tau: int) -> st.SearchStrategy[list[Point]]:
    # The center's iteration counts the requests it served: up to workers·⌈T/τ⌉ + 1.
    served = workers * -(-steps // tau) + 1
    at_center = st.tuples(st.just(0), st.just("t"), st.integers(1, served).map(float))
    worker = st.integers(1, workers)
    at_step = st.tuples(worker, st.just("t"), st.integers(1, steps).map(float))
    at_time = st.tuples(st.integers(0, workers), st.just("time"), st.floats(0.0, 1.5 * steps))
    return st.lists(st.one_of(at_center, at_step, at_time), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    algorithm=st.sampled_from(["async_easgd", "eamsgd"]),
    workers=st.integers(1, 3),
    steps=st.integers(2, 10),
    tau=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_elastic_runs_finish_with_the_center_the_sum_of_the_ledgers(
    algorithm: str, workers: int, steps: int, tau: int, seed: int, data: st.DataObject
) -> None:
    points = data.draw(_points(workers, steps, tau))
    assume(len({pid for pid, _, _ in points}) <= workers)  # someone stays up (the config's rule)
    res = run_simulation(
        _config(algorithm, workers, steps, tau, points, seed), record_reports=("ledger", "model")
    )
    assert res.status is Status.FINISHED, (res.outcome.blocked, res.outcome.error)
    assert all(r.resumed_at is not None for r in res.outcome.restarts)
    x1 = res.problem.x0()  # type: ignore[union-attr]
    ledgers = _last(res, "ledger")
    sums = sum((ledgers[w].value for w in range(1, workers + 1)), np.zeros_like(x1))
    center = res.processes[0].x
    assert center is not None
    np.testing.assert_allclose(center, x1 + sums, rtol=0, atol=1e-9)
    # the center's record of each worker's ledger is the worker's own
    for w in range(1, workers + 1):
        np.testing.assert_allclose(ledgers[0].value[w], ledgers[w].value, rtol=0, atol=1e-9)


def test_a_center_restarted_right_after_an_answer_is_rebuilt_without_it() -> None:
    """A restart at the center's iteration 12 fires as it has just sent its 11th answer, which
    is lost with it: the worker waiting on it gets a neutral one from the rebuilt center, which
    counts that request as served. (The whole conservation law, the workers' gradients included,
    is checked by tests/test_elastic_rejoin.py, which tracks every gradient.)"""
    res = _run("async_easgd", 3, 12, 2, [(0, "t", 12.0)])
    assert res.status is Status.FINISHED, res.outcome.blocked
    (restart,) = res.outcome.restarts
    assert (restart.name, restart.source, restart.step) == ("0.0", None, 12)
    assert restart.resumed_at is not None and restart.resumed_at >= 12
    x1 = res.problem.x0()  # type: ignore[union-attr]
    ledgers = _last(res, "ledger")
    center = res.processes[0].x
    assert center is not None
    np.testing.assert_allclose(
        center, x1 + sum(ledgers[w].value for w in (1, 2, 3)), rtol=0, atol=1e-9
    )


def test_a_restarted_worker_resumes_after_its_last_answered_request() -> None:
    res = _run("async_easgd", 2, 10, 2, [(1, "t", 6.0)])
    assert res.status is Status.FINISHED, res.outcome.blocked
    (restart,) = res.outcome.restarts
    assert (restart.name, restart.source, restart.step) == ("1.0", "0.0", 6)
    # its last answered request was of iteration 5 or earlier (1, 3, 5 with τ = 2): it resumes
    # on the iteration after one of them, never past where it was
    assert restart.resumed_at in (2, 4, 6)
    assert res.processes[1].steps_done >= 10


@pytest.mark.parametrize("algorithm", ["downpour", "mdownpour"])
def test_a_center_that_cannot_be_rebuilt_refuses_its_restart_and_its_workers_restart(
    algorithm: str,
) -> None:
    with pytest.raises(ConfigError, match=f"the center of {algorithm} cannot restart"):
        _config(algorithm, 2, 6, 2, [(0, "t", 3.0)])
    res = _run(algorithm, 2, 6, 2, [(1, "t", 4.0), (2, "time", 2.5)])
    assert res.status is Status.FINISHED, res.outcome.blocked
    assert {r.name for r in res.outcome.restarts} == {"1.0", "2.0"}
    assert all(r.source == "0.0" for r in res.outcome.restarts)


def test_a_worker_whose_center_crashed_stays_down() -> None:
    conf = _config("async_easgd", 2, 8, 1, [(1, "time", 6.0)])
    crashes = [*conf.sim.crashes, "process:0.0@time=3.0"]
    conf = cfg(**{**conf.model_dump(), "sim": {**conf.sim.model_dump(), "crashes": crashes}})
    res = run_simulation(conf)
    (restart,) = res.outcome.restarts
    assert restart.resumed_at is None and res.processes[1].crashed
