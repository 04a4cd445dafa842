"""A run that diverges says so: a non-finite gradient or model stops its process before it
sends anything (status ``diverged``, exit code 1), and a non-finite value that arrives over the
network anyway is dropped and acked, never taken into a model."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import warnings
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from peerlearn.algorithms import alg1
from peerlearn.algorithms.schedules import Constant
from peerlearn.cli import app
from peerlearn.daemon.node import DaemonState
from peerlearn.effects import Divergence, Effect, Vector
from peerlearn.membership import Membership
from peerlearn.runtime.worker import Worker, WorkerState
from peerlearn.sim import Simulator, Status
from peerlearn.sim.core import DivergedProcess
from peerlearn.sim.runner import consensus_distance
from peerlearn.testing import local_cluster
from peerlearn.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Codec,
    Data,
    Hello,
    Join,
    Ping,
    Pong,
    Welcome,
)
from tests.helpers import oracle_fault, raises

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 10, "sigma": 1.0}
PEERLEARN = str(Path(sys.executable).with_name("peerlearn"))


def _runtime_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_simulate_with_a_huge_step_size_reports_diverged(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(
            app, ["simulate", "--lr", "1e6", "-T", "60", "-q", "--out", str(tmp_path)]
        )
    assert res.exit_code == 1, res.output
    assert "status: diverged" in res.output
    assert "diverged:" in res.output and "non-finite" in res.output
    assert _runtime_warnings(caught) == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diverged"], summary["diverged"]
    for d in summary["diverged"]:
        assert set(d) == {"process", "step", "quantity"}
        assert d["quantity"] in ("gradient", "model") and 1 < d["step"] <= 60
    diverged = {d["process"] for d in summary["diverged"]}
    assert {p["id"] for p in summary["processes"] if p["diverged"]} == diverged
    assert summary["crashed"] == []
    for p in summary["processes"]:  # the last finite model: no NaN in the JSON
        assert p["x"] is not None and all(math.isfinite(v) for v in p["x"])


def _nan_gradient_at(pid: int, call: int) -> Any:
    """x as the gradient (of ½‖x‖²), but NaN in ``pid``'s ``call``-th gradient."""
    calls = [0] * 16

    def grad(p: int, x: Vector) -> Vector:
        calls[p] += 1
        return np.full_like(x, np.nan) if p == pid and calls[p] == call else x

    return grad


def test_a_diverging_process_stops_before_sending_and_alg1_finishes_on_the_others() -> None:
    """Alg 1, n = 5, N = 4: process 2's 5th gradient is NaN. It stops there, before sending its
    step; the others' quorum of 4 is met without it and every model stays finite. (Unchecked,
    its NaN reaches the first four of some receiver's iteration-5 quorum, and then everyone.)"""
    n, steps = 5, 20
    rng = np.random.default_rng(1)
    programs: list[Generator[Effect, Any, Vector]] = [
        alg1(np.ones(3), steps, 4, Constant(0.1)) for _ in range(n)
    ]
    sim = Simulator(
        Membership(n, n),
        programs,
        grad=_nan_gradient_at(2, 5),
        rng=rng,
        delay_remote=lambda k: rng.exponential(1.0, k),
        delay_local=lambda k: rng.exponential(0.1, k),
        compute=lambda: 1.0,
        read=lambda: 0.01,
    )
    out = sim.run()
    assert out.status is Status.DIVERGED
    assert out.diverged == (DivergedProcess(2, "2.0", 5, "gradient"),)
    assert out.blocked == ()
    for proc in sim.procs:
        if proc.pid == 2:
            assert proc.crashed and not proc.finished and proc.step == 5
            assert proc.x is not None and np.isfinite(proc.x).all()
        else:
            assert proc.finished and proc.step == steps + 1
            assert proc.x is not None and np.isfinite(proc.x).all()


NaNGradient = oracle_fault(10, lambda g: np.full_like(g, np.nan))  # worker 0.0, iteration 10


async def test_a_diverged_worker_sends_nothing_and_the_other_daemons_finish() -> None:
    """3 daemons of one worker, Alg 1 with N = 2: worker 0.0 diverges at iteration 10 and stops
    like a crashed process; the others finish with finite models, and nothing non-finite ever
    reached them (no `non_finite` drop anywhere)."""
    async with local_cluster(
        3,
        workers=1,
        algorithm="alg1",
        steps=40,
        problem=QUAD,
        worker_factory=lambda i: NaNGradient if i == 0 else Worker,
    ) as cluster:
        await cluster.wait_until_finished()
        bad = cluster.daemons[0].workers[0]
        assert bad.state is WorkerState.DIVERGED
        assert bad.diverged == Divergence(10, "gradient")
        assert bad.x is not None and np.isfinite(bad.x).all()  # its last finite model
        for d in cluster.daemons[1:]:
            for w in d.workers:
                assert w.state is WorkerState.FINISHED
                assert w.x is not None and np.isfinite(w.x).all()
        assert all(d.stats.dropped["non_finite"] == 0 for d in cluster.daemons)
        status = (await cluster.client(0).get("/status")).json()
        (worker,) = status["workers"]
        assert worker["state"] == "diverged"
        assert worker["diverged"] == {"step": 10, "quantity": "gradient"}
        metrics = (await cluster.client(0).get("/metrics")).text
        assert 'peerlearn_workers{state="diverged"} 1.0' in metrics
        assert 'peerlearn_workers{state="running"} 0.0' in metrics
        other = (await cluster.client(1).get("/status")).json()
        assert other["workers"][0]["diverged"] is None


async def test_a_daemon_with_a_huge_step_size_reports_diverged() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with local_cluster(
            1, workers=2, algorithm="alg1", steps=None, problem=QUAD, lr={"eta": 1e6}
        ) as cluster:
            d = cluster.daemons[0]
            await cluster.wait_for(lambda: d.state is DaemonState.FINISHED)
            status = (await cluster.client(0).get("/status")).json()
            metrics = (await cluster.client(0).get("/metrics")).text
    assert [w["state"] for w in status["workers"]] == ["diverged", "diverged"]
    for w in status["workers"]:
        assert w["diverged"]["quantity"] in ("gradient", "model") and w["diverged"]["step"] > 1
    assert 'peerlearn_workers{state="diverged"} 2.0' in metrics
    assert _runtime_warnings(caught) == []


def test_run_exits_1_when_a_worker_diverged() -> None:
    res = subprocess.run(
        [
            PEERLEARN,
            "run",
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--steps",
            "300",
            "--lr",
            "1e6",
            "--exit-on-finish",
            "--log-level",
            "warning",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stderr
    assert "diverged: non-finite" in res.stderr  # the worker's line
    assert "exit code 1: worker(s) 0.0 (non-finite" in res.stderr  # and the reason to exit 1
    assert "RuntimeWarning" not in res.stderr + res.stdout


async def _next(reader: asyncio.StreamReader, codec: Codec) -> Any:
    """The next message on a raw peer connection."""
    while (event := codec.next_event()) is NEED_DATA:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, "the daemon closed the connection"
        codec.receive_data(chunk)
    return event


async def test_a_non_finite_frame_is_dropped_acked_and_counted() -> None:
    """A peer that sends NaN anyway (here: an impostor of daemon 2, which never started): the
    frame is acked — the sender will not resend it — and the link stays up, but no mailbox gets
    it. Unchecked, it would be the first of daemon 0's iteration-t0 quorum of N = 2, and its
    NaN would spread to every model."""
    async with local_cluster(
        3,
        workers=1,
        algorithm="alg1",
        steps=None,
        problem=QUAD,
        queue_size=4,
        peer_timeout=0.3,
        drain_timeout=0.2,
        start=False,
    ) as cluster:
        absent = cluster.daemons[2]._listen_socket
        assert absent is not None
        absent.close()  # daemon 2 never runs: its port refuses connections
        target = cluster.daemons[0]
        for d in cluster.daemons[:2]:
            await d.start()
        assert target.peer_port is not None
        live = [w for d in cluster.daemons[:2] for w in d.workers]
        await cluster.wait_for(lambda: min(w.step for w in live) > 3)
        t0 = target.workers[0].step + 100  # ahead of daemon 0: buffered until it gets there

        reader, writer = await asyncio.open_connection("127.0.0.1", target.peer_port)
        codec = Codec()
        hello = Hello(
            min_version=PROTOCOL_VERSION,
            max_version=PROTOCOL_VERSION,
            cluster=2,
            incarnation=1,
            nonce=1,
            name="impostor",
        )
        join = Join(
            workers=(2,), dim=target.dim, dtype="float64", fingerprint=target.cfg.fingerprint
        )
        nan = np.full(target.dim, np.nan)
        for msg in (hello, join):
            for chunk in codec.send(msg):
                writer.write(bytes(chunk))
        await writer.drain()
        assert isinstance(await _next(reader, codec), Welcome)
        assert await _next(reader, codec) == Ack(seq=0)  # the Join's answer: nothing yet
        # (only after it: until the Join is accepted, frames with a payload are refused)
        for chunk in codec.send(Data(seq=1, tag=("params", t0), sender=2, step=t0, value=nan)):
            writer.write(bytes(chunk))
        await writer.drain()
        assert await _next(reader, codec) == Ack(seq=1)
        for chunk in codec.send(Ping(nonce=7)):  # the link is still up
            writer.write(bytes(chunk))
        await writer.drain()
        assert await _next(reader, codec) == Pong(nonce=7)

        # (or until a worker stops: one that took the NaN in would diverge)
        await cluster.wait_for(
            lambda: (
                min(w.step for w in live) > t0 + 2
                or any(w.state is not WorkerState.RUNNING for w in live)
            )
        )
        assert target.stats.dropped["non_finite"] == 1
        assert target.stats.protocol_errors["bad_data"] == 0
        assert all(w.state is WorkerState.RUNNING for w in live)
        assert all(w.x is not None and np.isfinite(w.x).all() for w in live)
        metrics = (await cluster.client(0).get("/metrics")).text
        assert 'peerlearn_messages_dropped_total{reason="non_finite"} 1.0' in metrics
        writer.close()


CrashAt5 = oracle_fault(5, raises("the oracle broke"))  # worker 0.0, iteration 5


async def test_only_live_workers_count_in_host_consensus_mean_loss_and_min_step() -> None:
    """Worker 0.0 crashes at iteration 5 and keeps its model of then: the daemon's host
    consensus distance (/metrics), the mean loss of its summary line and the test kit's
    ``min_step`` are over the live workers 0.1 and 0.2 only. Counting the crashed one, the
    distance would take in a model 25 iterations behind, and ``min_step`` would stay at 4."""
    async with local_cluster(
        2,
        workers=3,
        algorithm="alg1",
        steps=30,
        problem=QUAD,
        worker_factory=lambda i: CrashAt5 if i == 0 else Worker,
    ) as cluster:
        await cluster.wait_for(lambda: cluster.min_step() >= 30, timeout=30)
        await cluster.wait_until_finished()
        d = cluster.daemons[0]
        crashed, *live = d.workers
        assert crashed.state is WorkerState.CRASHED and crashed.completed == 4
        assert all(w.state is WorkerState.FINISHED for w in live)
        metrics = (await cluster.client(0).get("/metrics")).text
        host = re.search(r'^peerlearn_consensus_distance\{scope="host"\} (\S+)$', metrics, re.M)
        assert host is not None
        models = [w.x for w in live if w.x is not None]
        assert len(models) == 2 and crashed.x is not None
        expected = consensus_distance(models)
        assert float(host.group(1)) == pytest.approx(expected, rel=1e-9)
        # the test's teeth: the crashed worker's model is far enough off to change the figure
        assert consensus_distance([crashed.x, *models]) > 2 * expected
        assert 'peerlearn_workers{state="crashed"} 1.0' in metrics
        losses = [loss for w in live if (loss := d.loss_of(w)) is not None]
        assert len(losses) == 2
        assert d.summary().endswith(f"mean loss {np.mean(losses):.6g}")


def test_the_mean_model_of_huge_models_is_served_without_a_runtime_warning() -> None:
    """GET /model's mean of finite models whose sum overflows: inf in the bytes, as the values
    say, and no numpy RuntimeWarning on the daemon's terminal."""
    from peerlearn.control.app import WorkerModel, _pick_model

    huge = np.full(3, 1e308)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would raise here
        x, name = _pick_model(
            [WorkerModel("0.0", huge, True), WorkerModel("0.1", huge, True)], None
        )
    assert name == "mean" and np.isinf(x).all()
