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
    algorithm: str,
    workers: int,
    steps: int,
    tau: int,
    points: list[Point],
    seed: int = 0,
    *,
    center: str = "0.0",
    crashes: tuple[str, ...] = (),
    partitions: tuple[dict[str, Any], ...] = (),
) -> Any:
    n = workers + 1
    members = Membership(n, n)
    specs = list(crashes)
    for pid, when, at in points:
        at_text = str(int(at)) if when == "t" else f"{at:.3f}"
        specs.append(f"process:{members.name(pid)}@{when}={at_text}:restart")
    return cfg(
        algorithm=algorithm,
        processes=n,
        clusters=n,
        steps=steps,
        lr={"eta": 0.1},
        elastic={"tau": tau, "center": center},
        problem=QUAD,
        seed=seed,
        sim={"crashes": specs, "partitions": list(partitions)},
    )


def _assert_center_is_the_sum_of_the_ledgers(res: SimResult) -> None:
    center = res.config.center
    x1 = res.problem.x0()  # type: ignore[union-attr]
    ledgers = _last(res, "ledger")
    workers = [p for p in range(res.config.processes) if p != center]
    sums = sum((ledgers[w].value for w in workers), np.zeros_like(x1))
    x = res.processes[center].x
    assert x is not None
    np.testing.assert_allclose(x, x1 + sums, rtol=0, atol=1e-9)


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


def test_an_answer_in_a_workers_mailbox_counts_in_its_ledger() -> None:
    """The center restarts while an answer of the last one sits in a worker's mailbox (the
    worker computes its gradient before it takes it): the rebuilt center counts it. Found by
    the property test about half the time; pinned here."""
    res = run_simulation(
        _config("async_easgd", 4, 10, 1, [(0, "time", 14.923)], seed=5195),
        record_reports=("ledger", "model"),
    )
    assert res.status is Status.FINISHED, res.outcome.blocked
    _assert_center_is_the_sum_of_the_ledgers(res)


def test_the_center_need_not_be_process_zero() -> None:
    """The center's model report lists the last answered request per worker in pid order,
    the center left out: a worker resumes after its own, whichever process is the center."""
    conf = _config("async_easgd", 3, 8, 2, [(0, "t", 6.0)], center="2.0")
    res = run_simulation(conf, record_reports=("ledger", "model"))
    assert res.status is Status.FINISHED, res.outcome.blocked
    (restart,) = res.outcome.restarts
    assert (restart.name, restart.source, restart.resumed_at) == ("0.0", "2.0", 6)
    _assert_center_is_the_sum_of_the_ledgers(res)


def test_a_restart_loses_what_a_partition_held_from_it() -> None:
    """Messages a partition held from a worker that then restarts are lost with it, as those
    on their way: delivered after the heal, they would count an exchange its new incarnation
    knows nothing of."""
    part = {"groups": [[1], [0, 2]], "start": 1.0, "end": 5.0}
    conf = _config("async_easgd", 2, 8, 1, [(1, "time", 2.0)], seed=1, partitions=(part,))
    res = run_simulation(conf, record_reports=("ledger", "model"))
    assert res.status is Status.FINISHED, res.outcome.blocked
    _assert_center_is_the_sum_of_the_ledgers(res)


def test_a_crashed_workers_ledger_counts_when_the_center_is_rebuilt() -> None:
    """Worker 1.0 crashes after its last request was answered; the center restarts later. The
    rebuilt center counts that worker's requests as served and its pulls in its model, so the
    run finishes as it does without the restart."""
    conf = _config("async_easgd", 2, 6, 2, [(0, "time", 6.0)], seed=2, crashes=("process:1.0@t=6",))
    res = run_simulation(conf, record_reports=("ledger", "model"))
    assert res.status is Status.FINISHED, res.outcome.blocked
    _assert_center_is_the_sum_of_the_ledgers(res)


def test_the_parameter_servers_center_refuses_a_restart() -> None:
    with pytest.raises(ConfigError, match="the center of async_ps cannot restart"):
        _config("async_ps", 2, 6, 1, [(0, "t", 3.0)])


def test_a_downpour_worker_restarted_after_its_flush_has_done_its_iterations() -> None:
    res = _run("downpour", 2, 6, 2, [(1, "t", 7.0)])
    assert res.status is Status.FINISHED, res.outcome.blocked
    assert res.processes[1].steps_done == 6
