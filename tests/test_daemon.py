"""Daemons over real TCP on 127.0.0.1, built on peerlearn.testing (in-process peers)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peerlearn.algorithms import diam2
from peerlearn.daemon.node import DaemonState
from peerlearn.problems import make_problem
from peerlearn.runs import Purpose, stream
from peerlearn.runtime.worker import WorkerState
from peerlearn.testing import LocalCluster, local_cluster

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 10, "sigma": 1.0}


def sequential_sgd_loss(problem: dict[str, Any], eta: float, budget: int, seeds: int = 3) -> float:
    """Plain SGD with the same learning rate and the same number of gradient evaluations,
    averaged over a few seeds (measured in the same test run)."""
    params = {k: v for k, v in problem.items() if k != "name"}
    prob = make_problem(problem["name"], **params)
    losses = []
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        x = prob.x0()
        for _ in range(budget):
            x = x - eta * prob.grad(x, rng)
        losses.append(prob.loss(x))
    return float(np.mean(losses))


def final_models(cluster: LocalCluster) -> list[np.ndarray]:
    return [w.x for d in cluster.daemons for w in d.workers if w.x is not None]


def mean_final_loss(cluster: LocalCluster, problem: dict[str, Any]) -> float:
    params = {k: v for k, v in problem.items() if k != "name"}
    prob = make_problem(problem["name"], **params)
    return float(np.mean([prob.loss(x) for x in final_models(cluster)]))


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("alg1", {}),
        ("alg2", {"maa": {"rounds": 4, "inner_rounds": 3}}),
    ],
)
async def test_three_daemons_train_like_sequential_sgd(
    algorithm: str, extra: dict[str, Any]
) -> None:
    steps, eta = 300, 0.05  # long enough that both sit at their noise floor
    async with local_cluster(
        3, workers=2, algorithm=algorithm, steps=steps, problem=QUAD, lr={"eta": eta}, **extra
    ) as cluster:
        await cluster.wait_until_finished()
        assert all(d.state is DaemonState.FINISHED for d in cluster.daemons)
        assert all(w.state is WorkerState.FINISHED for d in cluster.daemons for w in d.workers)
        loss = mean_final_loss(cluster, QUAD)
    reference = sequential_sgd_loss(QUAD, eta, budget=6 * steps)
    assert loss <= 1.5 * reference, (loss, reference)


async def test_alg1_on_digits_matches_sequential_sgd() -> None:
    problem = {"name": "softmax", "batch_size": 16}
    steps, eta = 200, 0.5
    async with local_cluster(
        3, workers=2, algorithm="alg1", steps=steps, problem=problem, lr={"eta": eta}
    ) as cluster:
        await cluster.wait_until_finished()
        loss = mean_final_loss(cluster, problem)
    assert loss <= 1.5 * sequential_sgd_loss(problem, eta, budget=6 * steps)


async def test_alg1_with_full_quorum_ends_with_equal_models() -> None:
    async with local_cluster(
        3, workers=2, algorithm="alg1", steps=40, quorum=6, max_failures=0, problem=QUAD
    ) as c:
        await c.wait_until_finished()
        xs = final_models(c)
    assert len(xs) == 6 and diam2(xs) < 1e-20


async def test_agreement_contracts_across_threads_and_sockets() -> None:
    """Standalone MAA on 3 daemons: each instance's outputs are within q = 1/4 of the inputs'
    squared diameter (Lemma 19 / Thm 2), with inputs from the same seeded streams."""
    steps, dim = 3, 4
    async with local_cluster(3, workers=2, algorithm="maa", steps=steps, dim=dim) as cluster:
        await cluster.wait_until_finished()
        run = cluster.daemons[0].run_cfg
        m = run.membership
        inputs = [
            stream(run.seed, Purpose.INPUTS, m.cluster_of[p], m.index(p)).standard_normal(
                (steps, dim)
            )
            for p in range(run.processes)
        ]
        outputs = [w.output for d in cluster.daemons for w in d.workers]
    assert all(o is not None and len(o) == steps for o in outputs)
    for j in range(steps):
        before = diam2([x[j] for x in inputs])
        after = diam2([o[j] for o in outputs])
        assert after <= 0.25 * before


async def test_status_peers_metrics_model_and_stop() -> None:
    async with local_cluster(3, workers=2, algorithm="alg1", steps=None, problem=QUAD) as cluster:
        await cluster.wait_for(lambda: cluster.min_step() > 20)
        c = cluster.client(0)
        status = (await c.get("/status")).json()
        assert status["state"] == "running" and status["algorithm"] == "alg1"
        assert [w["id"] for w in status["workers"]] == ["0.0", "0.1"]
        assert all(w["step"] > 20 for w in status["workers"])
        assert all(w["gradients"] >= 20 for w in status["workers"])  # one per Alg 1 step
        peers = (await c.get("/peers")).json()
        assert [p["state"] for p in peers] == ["connected", "connected"]
        text = (await c.get("/metrics")).text
        for name in (
            "peerlearn_loss",
            "peerlearn_step",
            "peerlearn_staleness_steps_bucket",
            "peerlearn_consensus_distance",
            "peerlearn_messages_total",
            "peerlearn_bytes_total",
            "peerlearn_peers_connected 2.0",
        ):
            assert name in text, name
        assert 'scope="host"' in text and 'scope="global"' in text
        npy = await c.get("/model", params={"worker": 1})
        assert npy.status_code == 200 and npy.content[:6] == b"\x93NUMPY"
        assert (await c.get("/model", params={"worker": 7})).status_code == 404
        assert (await c.post("/stop")).json() == {"state": "stopping"}
        await cluster.daemons[0].wait()
        assert cluster.daemons[0].state is DaemonState.STOPPED
        assert all(w.state is WorkerState.STOPPED for w in cluster.daemons[0].workers)


async def test_async_tests_run_on_uvloop() -> None:
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_the_pytest_plugin_fixture(peerlearn_cluster: Any) -> None:
    """The fixture comes from the installed `pytest11` entry point, not from a conftest."""
    async with peerlearn_cluster(2, workers=1, algorithm="alg1", steps=10, problem=QUAD) as c:
        await c.wait_until_finished()
        assert c.min_step() == 11 and len(c.urls) == 2
