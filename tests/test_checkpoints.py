"""Checkpoints and resume (``--state-dir``): the file format and its refusals, a restart from
the checkpointed models bit for bit, whole-cluster restarts of Alg 1, Alg 2 and DASGD (real
daemons on 127.0.0.1), and SIGKILL in the middle of checkpoint writes (real processes)."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peerlearn.daemon.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    SavedWorker,
    StateDir,
    decode,
)
from peerlearn.daemon.config import load_node_config
from peerlearn.daemon.node import Daemon
from peerlearn.testing import local_cluster

from .test_processes import PEERLEARN, free_ports

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 6, "sigma": 0.5}


def _checkpoint(fingerprint: str = "f" * 64, version: int = FORMAT_VERSION) -> Checkpoint:
    rng = np.random.default_rng(3)
    workers = (
        SavedWorker(0, 12, rng.standard_normal(4), (1, 2, 3), dict(rng.bit_generator.state)),
        SavedWorker(2, 11, rng.standard_normal(4), (), None, (9, 13, rng.standard_normal(4))),
    )
    return Checkpoint(fingerprint, 0, 123, 1.5e9, workers, version)


def test_a_checkpoint_reads_back_as_written(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.open()
    ck = _checkpoint()
    sd.save(ck)
    got = sd.load("f" * 64, 0, [0, 2], 4)
    assert got is not None and got.step == 11 and got.incarnation == 123
    for a, b in zip(ck.workers, got.workers, strict=True):
        assert (a.pid, a.step, a.extra, a.rng) == (b.pid, b.step, b.extra, b.rng)
        assert a.model.tobytes() == b.model.tobytes()
    assert got.workers[1].ledger is not None and got.workers[1].ledger[:2] == (9, 13)
    # a plain .npz without pickles: numpy reads it anywhere
    with np.load(sd.checkpoint, allow_pickle=False) as z:
        assert {"meta", "model_0", "model_2", "ledger_2"} <= set(z.files)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"fingerprint": "e" * 64}, "another run's"),
        ({"version": FORMAT_VERSION + 1}, f"format {FORMAT_VERSION + 1}"),
        ({"cluster": 1}, "it is cluster 0's, this daemon is 1"),
        ({"pids": [0, 1]}, "its workers are not this daemon's"),
        ({"dim": 5}, "float64[5]"),
        (
            {"dtype": "float32"},
            'its models are float64, this run\'s float32 (set dtype = "float64"',
        ),
        ({"truncate": True}, "damaged"),
        ({"garbage": True}, "damaged"),
    ],
)
def test_a_checkpoint_this_run_cannot_resume_is_refused_and_left_as_it_is(
    tmp_path: Path, change: dict[str, Any], says: str
) -> None:
    sd = StateDir(tmp_path)
    sd.open()
    sd.save(_checkpoint(version=change.get("version", FORMAT_VERSION)))
    if change.get("truncate"):
        sd.checkpoint.write_bytes(sd.checkpoint.read_bytes()[:300])
    if change.get("garbage"):
        sd.checkpoint.write_bytes(b"PK\x03\x04" + os.urandom(500))
    before = sd.checkpoint.read_bytes()
    with pytest.raises(CheckpointError) as info:
        decode(
            sd.checkpoint,
            change.get("fingerprint", "f" * 64),
            change.get("cluster", 0),
            change.get("pids", [0, 2]),
            change.get("dim", 4),
            np.dtype(change.get("dtype", "float64")),
        )
    assert says in str(info.value) and "\n" not in str(info.value)
    assert str(sd.checkpoint) in str(info.value)
    assert sd.checkpoint.read_bytes() == before


def test_leftovers_of_a_cut_write_go_and_the_incarnation_always_grows(tmp_path: Path) -> None:
    (tmp_path / ".checkpoint.npz.abc.tmp").write_bytes(b"half a file")
    ahead = time.time_ns() + 10**15  # written under a clock far ahead of this one
    (tmp_path / "incarnation").write_text(f"{ahead}\n")
    sd = StateDir(tmp_path)
    sd.open()
    assert not list(tmp_path.glob(".*.tmp"))
    first = sd.next_incarnation(None)
    assert first == ahead + 1 and int((tmp_path / "incarnation").read_text()) == first
    assert sd.next_incarnation(_checkpoint()) == first + 1
    with pytest.raises(OSError, match="in use by another daemon"):
        StateDir(tmp_path).open()
    sd.close()


# --- real daemons, in process ----------------------------------------------------------------


def _config(**fields: Any) -> dict[str, Any]:
    return {"workers": 2, "problem": QUAD, "checkpoint_every": 0.05, **fields}


async def _run_then_stop(dirs: list[Path], until: int, first: int | None = None, **kw: Any) -> None:
    """Run a cluster until every worker completed ``until`` iterations and stop it — daemon
    ``first`` alone earlier (after ``until // 2``), so the checkpoints' iterations differ."""
    async with local_cluster(len(dirs), each=lambda i: {"state_dir": dirs[i]}, **kw) as c:
        if first is not None:
            await c.wait_for(lambda: c.min_step() >= until // 2, 60)
            await c.daemons[first].stop()
            rest = [w for i, d in enumerate(c.daemons) if i != first for w in d.workers]
            await c.wait_for(lambda: min(w.completed for w in rest) >= until, 60)
        else:
            await c.wait_for(lambda: c.min_step() >= until, 60)


def _saved(d: Path, cfg: dict[str, Any], i: int, n: int) -> Checkpoint:
    node = _node(cfg, i, n)
    dim, dtype = QUAD["dim"], np.dtype(cfg.get("dtype", "float64"))
    return decode(d / "checkpoint.npz", node.fingerprint, i, node.membership.members[i], dim, dtype)


def _node(cfg: dict[str, Any], i: int, n: int) -> Any:
    addrs = [f"127.0.0.1:{7000 + k}" for k in range(n)]  # the fingerprint ignores addresses
    return load_node_config(None, {**cfg, "listen": addrs[i], "peers": addrs})


@pytest.mark.parametrize("dtype", ["float64", "float32"])
async def test_a_restarted_daemon_starts_from_its_checkpointed_models_bit_for_bit(
    tmp_path: Path, dtype: str
) -> None:
    """Its workers hold the checkpoint's iteration, model and generator state before they
    start (it waits for a peer that never comes) — in the run's dtype."""
    dirs = [tmp_path / "d0", tmp_path / "d1"]
    cfg = _config(algorithm="alg1", steps=100_000, dtype=dtype)
    await _run_then_stop(dirs, 30, **cfg)
    saved = _saved(dirs[0], cfg, 0, 2)
    async with local_cluster(
        2, start=False, each=lambda i: {"state_dir": dirs[i]}, peer_timeout=30.0, **cfg
    ) as c:
        d = c.daemons[0]
        await d.start()
        assert d.restore is not None and d.restore.mode is None  # still waiting for daemon 1
        for w, s in zip(d.workers, saved.workers, strict=True):
            (step, model, key), rng, _ = w.saved
            assert model is not None and (w.pid, step, key) == (s.pid, s.step, s.extra)
            assert model.dtype == s.model.dtype == np.dtype(dtype)
            assert model.tobytes() == s.model.tobytes()
            assert rng == s.rng == w._rng.bit_generator.state
            assert w.state.value == "created"


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("alg1", {"steps": 400, "max_failures": 2}),
        ("allreduce", {"steps": 300}),
        ("async_gossip", {"steps": 300}),
        ("alg2", {"steps": 150, "max_failures": 2, "maa": {"rounds": 3}}),
        ("dasgd", {"steps": 600, "lr": {"eta": 0.01}}),
    ],
)
async def test_a_whole_cluster_restart_resumes_at_the_lowest_checkpoint_and_finishes(
    tmp_path: Path, algorithm: str, extra: dict[str, Any]
) -> None:
    """Three daemons, the last stopped first (its checkpoint is behind), then the others; all
    started again: every daemon resumes at the lowest checkpointed iteration and the run
    finishes — DASGD with equal models, having applied every node's gradients once."""
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    cfg = _config(algorithm=algorithm, **extra)
    until = extra["steps"] // 3
    # these wait for every peer (lockstep) or for the one they gossip with: all stop at once
    together = algorithm in ("allreduce", "async_gossip")
    await _run_then_stop(dirs, until, first=None if together else 2, **cfg)
    saved = [_saved(d, cfg, i, 3) for i, d in enumerate(dirs)]
    lowest = min(s.step for s in saved)
    if not together:
        assert saved[2].step == lowest < max(s.step for s in saved)  # work for the agreement
    async with local_cluster(3, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
        await c.wait_until_finished(120)
        for d, s in zip(c.daemons, saved, strict=True):
            # (a daemon that hears the others resumed before it decides joins them there)
            assert d.restore is not None and d.restore.mode in (
                "whole-cluster restart",
                "joined a whole-cluster restart",
            )
            assert d.restore.agreed == lowest and d.restore.step == s.step
        status = (await c.client(0).get("/status")).json()["checkpoint"]
        assert status["resumed"] == {
            "mode": c.daemons[0].restore.mode,  # type: ignore[union-attr]
            "checkpoint_iteration": saved[0].step,
            "agreed_iteration": lowest,
        }
        assert status["dir"] == str(dirs[0]) and status["failures"] == 0
        models = [w.x for d in c.daemons for w in d.workers if w.x is not None]
        assert all(w.state.value == "finished" for d in c.daemons for w in d.workers)
    if algorithm == "dasgd":
        for x in models:
            np.testing.assert_allclose(x, models[0], rtol=1e-9, atol=1e-12)
        # every node computed its `steps` gradients once, and every node applied all of them
        assert all(w.completed == 6 * extra["steps"] for d in c.daemons for w in d.workers)
    else:
        assert all(w.completed == extra["steps"] for d in c.daemons for w in d.workers)


def _listening_on(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [("alg1", {"max_failures": 2}), ("dasgd", {"lr": {"eta": 0.01}})],
)
async def test_a_daemon_restarted_while_its_peers_run_on_takes_their_newer_state(
    tmp_path: Path, algorithm: str, extra: dict[str, Any]
) -> None:
    """One daemon stopped and started again on its state dir while the others run on: it
    starts from its checkpoint and takes a peer's newer state (its mode: live peers); the run
    finishes — DASGD with equal models."""
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    cfg = _config(algorithm=algorithm, steps=600, **extra)
    async with local_cluster(3, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
        await c.wait_for(lambda: c.min_step() >= 60, 60)
        old = c.daemons[2]
        await old.stop()
        stopped_at = _saved(dirs[2], cfg, 2, 3).step
        rest = [w for d in c.daemons[:2] for w in d.workers]
        await c.wait_for(lambda: min(w.completed for w in rest) >= stopped_at + 30, 60)
        port = int(old.cfg.listen.rsplit(":", 1)[1])
        new = Daemon(old.cfg, listen_socket=_listening_on(port))
        c.daemons[2] = new
        await new.start()
        await c.wait_until_finished(120)
        assert new.restore is not None and new.restore.mode == "live peers"
        assert new.restore.step == stopped_at and new.rejoin.rejoins >= 1
        assert new.rejoin.last is not None and new.rejoin.last.resumed_at > stopped_at
        models = [w.x for d in c.daemons for w in d.workers if w.x is not None]
    if algorithm == "dasgd":
        for x in models:
            np.testing.assert_allclose(x, models[0], rtol=1e-9, atol=1e-12)
        assert all(w.completed == 6 * 600 for d in c.daemons for w in d.workers)


async def test_a_lockstep_daemon_up_after_the_others_resumed_joins_them_there(
    tmp_path: Path,
) -> None:
    """AllReduce (every process waits for everyone's value each iteration): two daemons
    resume without the third (it comes after peer_timeout) and wait for it at their agreed
    iteration; the third joins them there, whether its checkpoint is behind or ahead."""
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    cfg = _config(algorithm="allreduce", steps=240, peer_timeout=1.0)
    await _run_then_stop(dirs, 60, **cfg)
    saved = [_saved(d, cfg, i, 3) for i, d in enumerate(dirs)]
    async with local_cluster(3, start=False, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
        await c.daemons[0].start()
        await c.daemons[1].start()
        first = c.daemons[:2]
        await c.wait_for(lambda: all(d.restore and d.restore.agreed for d in first), 30)
        agreed = min(s.step for s in saved[:2])
        assert all(d.restore and d.restore.agreed == agreed for d in first)
        await c.daemons[2].start()
        await c.wait_until_finished(120)
        late = c.daemons[2].restore
        assert late is not None and late.mode == "joined a whole-cluster restart"
        assert late.agreed == agreed
        assert all(w.completed == 240 for d in c.daemons for w in d.workers)


def _elastic_books(c: Any, x1: np.ndarray) -> None:
    """The center's record of each worker's ledger is the worker's own, and the center's model
    is x̃_1 + Σ_i D_i: every difference counted once on each side, across the restart."""
    center = next(w for d in c.daemons for w in d.workers if w.pid == 0)
    assert center.ledger is not None and center.x is not None
    record = center.ledger[1]
    workers = [w for d in c.daemons for w in d.workers if w.pid != 0]
    assert sorted(record) == sorted(w.pid for w in workers)
    for w in workers:
        assert w.ledger is not None
        np.testing.assert_allclose(record[w.pid], w.ledger[1], rtol=1e-12, atol=1e-12)
    total = sum((record[w.pid] for w in workers), 0 * x1)
    np.testing.assert_allclose(center.x, x1 + total, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("algorithm", ["async_easgd", "eamsgd"])
async def test_a_whole_cluster_restart_of_the_elastic_family_resumes_every_worker(
    tmp_path: Path, algorithm: str
) -> None:
    """Three daemons (the center and a worker on daemon 0), daemon 2 stopped first: all
    started again, every worker resumes from its own checkpoint at its own iteration (it
    computes only the gradients left), the center is rebuilt from every worker's checkpointed
    ledger, and the run finishes with the center's books and the workers' agreeing."""
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    steps = 300
    cfg = _config(algorithm=algorithm, steps=steps, elastic={"tau": 3})
    await _run_then_stop(dirs, 90, first=2, **cfg)
    checkpoints = [_saved(d, cfg, i, 3) for i, d in enumerate(dirs)]
    saved = {w.pid: w for ck in checkpoints for w in ck.workers}
    assert all(w.ledger is not None and w.ledger[0] > 0 for w in checkpoints[1].workers)
    assert checkpoints[2].step < checkpoints[1].step  # daemon 2 stopped earlier
    async with local_cluster(3, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
        await c.wait_until_finished(120)
        assert all(d.restore and d.restore.mode == "whole-cluster restart" for d in c.daemons)
        rebuilt = c.daemons[0].rejoin.last
        assert rebuilt is not None and rebuilt.peer is None  # the center, from ledgers
        for w in (w for d in c.daemons for w in d.workers if w.pid != 0):
            assert w.state.value == "finished"
            assert w.grads == steps + 1 - saved[w.pid].step, w.name
        problem = c.daemons[0].problem
        assert problem is not None
        _elastic_books(c, problem.x0())


async def test_workers_start_over_with_a_center_whose_daemon_lost_its_checkpoint(
    tmp_path: Path,
) -> None:
    """A whole-cluster restart in which the center's daemon has no checkpoint (its state dir
    lost): its center starts afresh, so the workers elsewhere start over with it rather than
    resume from ledgers it does not hold — the run finishes with the books agreeing."""
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    steps = 200
    cfg = _config(algorithm="async_easgd", steps=steps)
    await _run_then_stop(dirs, 60, **cfg)
    (dirs[0] / "checkpoint.npz").unlink()
    async with local_cluster(3, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
        await c.wait_until_finished(120)
        assert c.daemons[0].restore is None
        for d in c.daemons[1:]:
            assert d.restore is not None and d.restore.mode == "center started afresh"
        for w in (w for d in c.daemons for w in d.workers if w.pid != 0):
            assert w.state.value == "finished" and w.grads == steps, w.name
        problem = c.daemons[0].problem
        assert problem is not None
        _elastic_books(c, problem.x0())


async def test_a_workers_daemon_up_after_the_center_was_rebuilt_resumes_its_checkpoint(
    tmp_path: Path,
) -> None:
    """A whole-cluster restart in which daemon 2 (workers only) comes up after the center's
    daemon has rebuilt the center without it (holding its workers' requests): its workers still
    resume from their checkpoints — the center's daemon says it resumed — and their checkpointed
    ledgers join the center; the books agree at the end. (Costs the rebuild's 10 s wait.)"""
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    steps = 200
    cfg = _config(algorithm="async_easgd", steps=steps, peer_timeout=1.0)
    await _run_then_stop(dirs, 60, **cfg)
    saved = {w.pid: w for i, d in enumerate(dirs) for w in _saved(d, cfg, i, 3).workers}
    async with local_cluster(3, start=False, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
        first = c.daemons[0]
        await first.start()
        await c.daemons[1].start()
        await c.wait_for(lambda: first.rejoin.rejoins > 0, 60)  # rebuilt, daemon 2 late
        assert first.rejoin.gathering() == [2]
        await c.daemons[2].start()
        await c.wait_until_finished(120)
        late = c.daemons[2]
        assert late.restore is not None and late.restore.mode == "whole-cluster restart"
        for w in late.workers:
            assert w.grads == steps + 1 - saved[w.pid].step, w.name
        assert first.rejoin.gathering() == []
        problem = first.problem
        assert problem is not None
        _elastic_books(c, problem.x0())


@pytest.mark.parametrize("algorithm", ["downpour", "mdownpour", "async_ps"])
async def test_a_whole_cluster_restart_of_downpour_resumes_the_center_and_its_record(
    tmp_path: Path, algorithm: str
) -> None:
    """DOWNPOUR's center cannot be rebuilt from its workers: it resumes from its own checkpoint
    (model, requests served, the last answered per worker) and every worker from its model and
    record — the run finishes, each request served once. A run restarted after it finished
    ends at once, with the center's checkpointed model bit for bit."""
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    steps = 200
    cfg = _config(algorithm=algorithm, steps=steps, elastic={"tau": 2}, lr={"eta": 0.02})
    await _run_then_stop(dirs, 60, first=2, **cfg)
    center = next(w for w in _saved(dirs[0], cfg, 0, 3).workers if w.pid == 0)
    async with local_cluster(3, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
        await c.wait_until_finished(120)
        assert all(d.restore and d.restore.mode == "whole-cluster restart" for d in c.daemons)
        for d in c.daemons[1:]:
            assert d.rejoin.last is not None and d.rejoin.last.peer == 0  # the center's state
        assert all(w.state.value == "finished" for d in c.daemons for w in d.workers)
        served = next(w for w in c.daemons[0].workers if w.pid == 0)
        assert served.grads == 0 and served.step > center.step  # it went on from its record
    finished = next(w for w in _saved(dirs[0], cfg, 0, 3).workers if w.pid == 0)
    async with local_cluster(3, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
        await c.wait_until_finished(60)
        again = next(w for w in c.daemons[0].workers if w.pid == 0)
        assert again.x is not None and again.x.tobytes() == finished.model.tobytes()
        assert all(w.grads == 0 for d in c.daemons for w in d.workers)


@pytest.mark.parametrize("restarted", [0, 2])
async def test_an_elastic_daemon_restarted_alone_resumes_through_the_live_ones(
    tmp_path: Path, restarted: int
) -> None:
    """Asynchronous EASGD, one daemon stopped and started again on its state dir while the
    others live. The center's daemon: its worker resumes from its checkpoint, the center is
    rebuilt from that checkpointed ledger and the live workers' ledgers. A workers' daemon:
    its workers take the center's model and record (the center served on meanwhile). Either
    way the run finishes with the books agreeing."""
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    steps = 400
    cfg = _config(algorithm="async_easgd", steps=steps, elastic={"tau": 2})
    async with local_cluster(3, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
        await c.wait_for(lambda: c.min_step() >= 60, 60)
        old = c.daemons[restarted]
        await old.stop()
        stopped = {w.pid: w for w in _saved(dirs[restarted], cfg, restarted, 3).workers}
        if restarted == 2:  # the others serve on meanwhile
            rest = [w for d in c.daemons[:2] for w in d.workers if w.pid != 0]
            ahead = max(w.step for w in stopped.values()) + 30
            await c.wait_for(lambda: min(w.completed for w in rest) >= ahead, 60)
        port = int(old.cfg.listen.rsplit(":", 1)[1])
        new = Daemon(old.cfg, listen_socket=_listening_on(port))
        c.daemons[restarted] = new
        await new.start()
        await c.wait_until_finished(120)
        assert new.restore is not None and new.restore.mode == "live peers"
        assert new.rejoin.last is not None
        if restarted == 0:
            assert new.rejoin.last.peer is None  # the center, rebuilt
            [w] = [w for w in new.workers if w.pid != 0]
            assert w.grads == steps + 1 - stopped[w.pid].step  # its own checkpoint
        else:
            assert new.rejoin.last.peer == 0  # the center's model and record, not its own
        assert all(w.state.value == "finished" for d in c.daemons for w in d.workers)
        problem = new.problem
        assert problem is not None
        _elastic_books(c, problem.x0())


@pytest.mark.parametrize(
    ("algorithm", "change", "says"),
    [
        ("alg1", {"step": 10**6}, "past the 400 iterations of this run"),
        ("dasgd", {"step": 10**6}, "iterations of this run"),
        ("dasgd", {"extra": (1, 2)}, "a DASGD state is n = 4 applied counts"),
        ("dasgd", {"extra": (-1,) * 18}, "a DASGD state is n = 4 applied counts"),
    ],
)
async def test_a_checkpoint_state_the_algorithm_cannot_resume_stops_the_start(
    tmp_path: Path, algorithm: str, change: dict[str, Any], says: str
) -> None:
    """Caught when the daemon starts (one line, the file as it was), not in a worker later."""
    dirs = [tmp_path / "d0", tmp_path / "d1"]
    cfg = _config(algorithm=algorithm, steps=400, lr={"eta": 0.01})
    await _run_then_stop(dirs, 20, **cfg)
    sd = StateDir(dirs[0])
    node = _node(cfg, 0, 2)
    ck = decode(sd.checkpoint, node.fingerprint, 0, node.membership.members[0], QUAD["dim"])
    workers = tuple(dataclasses.replace(w, **change) for w in ck.workers)
    sd.save(dataclasses.replace(ck, workers=workers))
    before = sd.checkpoint.read_bytes()
    async with local_cluster(2, start=False, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
        with pytest.raises(CheckpointError, match=re.escape(says)):
            await c.daemons[0].start()
    assert sd.checkpoint.read_bytes() == before


async def test_an_algorithm_that_cannot_resume_sets_a_checkpoint_aside_and_writes_none(
    tmp_path: Path,
) -> None:
    """Standalone agreement has no state to resume (each process's inputs are its own): an
    existing checkpoint is moved aside (kept, each time under a new name), none is written,
    and the run starts."""
    dirs = [tmp_path / "d0", tmp_path / "d1"]
    cfg = _config(algorithm="maa", steps=5)
    for d in dirs:
        d.mkdir()
        (d / "checkpoint.npz").write_bytes(b"an old checkpoint")
    for _ in range(2):
        async with local_cluster(2, each=lambda i: {"state_dir": dirs[i]}, **cfg) as c:
            await c.wait_until_finished(60)
            assert all(d.saver is None and d.restore is None for d in c.daemons)
        for d in dirs:
            assert not (d / "checkpoint.npz").exists()
            kept = sorted(p.name for p in d.glob("checkpoint.unused*.npz"))
            assert kept == ["checkpoint.unused.npz"]  # (round 2: nothing new to set aside)
            assert (d / kept[0]).read_bytes() == b"an old checkpoint"


# --- real processes: SIGKILL while checkpoints are written -----------------------------------


def _kill_during_writes(tmp_path: Path, kills: int) -> None:
    """One daemon alone (2 workers, a 100,000-dim model: ~1.6 MB a checkpoint) writing a
    checkpoint every 10 ms, SIGKILLed at a random moment ``kills`` times, each time started
    again on the same directory: the checkpoint left always loads, and the next start resumes
    from exactly that one."""
    listen, api = free_ports(2)
    state = tmp_path / "state"
    args = [
        PEERLEARN,
        "run",
        *("--listen", f"127.0.0.1:{listen}", "--api", f"127.0.0.1:{api}"),
        *("--peers", f"127.0.0.1:{listen}", "--workers", "2", "--algorithm", "alg1"),
        *("--steps", "1000000000", "--lr", "0.001", "--state-dir", str(state)),
        *("--checkpoint-every", "0.01", "--log-level", "info"),
        *("--set", "problem.name=quadratic", "--set", "problem.dim=100000"),
    ]
    node = load_node_config(
        None,
        {
            "listen": f"127.0.0.1:{listen}",
            "peers": [f"127.0.0.1:{listen}"],
            "workers": 2,
            "algorithm": "alg1",
            "steps": 1_000_000_000,
            "lr": {"eta": 0.001},
            "problem": {"name": "quadratic", "dim": 100_000},
        },
    )
    rng = random.Random(14)
    last: Checkpoint | None = None
    for k in range(kills):
        log = tmp_path / f"log{k}.txt"
        with log.open("w") as fh:
            proc = subprocess.Popen(args, stderr=fh, stdout=subprocess.DEVNULL)
        try:
            # until this incarnation has written a checkpoint of its own (its incarnation)
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                try:
                    now = decode(state / "checkpoint.npz", node.fingerprint, 0, [0, 1], 100_000)
                except (CheckpointError, FileNotFoundError):
                    now = None
                if now is not None and (last is None or now.incarnation > last.incarnation):
                    break
                time.sleep(0.01)  # a poll of a file another process writes: no event exists
            time.sleep(rng.uniform(0.0, 0.15))  # a random moment among the writes
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        text = log.read_text()
        if last is not None:  # it resumed from the checkpoint the last kill left
            said = re.search(r"resuming from the checkpoint of \S+ \(iteration (\d+)", text)
            assert said is not None, text[-2000:]
            assert int(said.group(1)) == last.step
        last = decode(state / "checkpoint.npz", node.fingerprint, 0, [0, 1], 100_000)
        assert last.step >= 1


def test_sigkill_during_checkpoint_writes_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    _kill_during_writes(tmp_path, 4)


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_50_times(tmp_path: Path) -> None:
    _kill_during_writes(tmp_path, 50)


def test_a_foreign_or_future_checkpoint_is_refused_with_exit_2_and_kept(tmp_path: Path) -> None:
    listen, api = free_ports(2)
    args = [
        PEERLEARN,
        "run",
        *("--listen", f"127.0.0.1:{listen}", "--api", f"127.0.0.1:{api}"),
        *("--peers", f"127.0.0.1:{listen}", "--workers", "2", "--algorithm", "alg1"),
        *("--state-dir", str(tmp_path)),
    ]
    sd = StateDir(tmp_path)
    for ck, says in [
        (_checkpoint(), "another run's"),
        (_checkpoint(version=FORMAT_VERSION + 1), "written by a newer peerlearn"),
    ]:
        sd.save(ck)
        before = sd.checkpoint.read_bytes()
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and "left as it is" in lines[0], lines
        assert sd.checkpoint.read_bytes() == before
