"""What a run leaves behind: ``peerlearn run --out DIR`` (model.npz, summary.json, metrics.csv,
on finish and on stop) and ``peerlearn collect`` (every daemon's models and their mean) —
real daemons on 127.0.0.1, real files, the CLI as a user runs it."""

from __future__ import annotations

import asyncio
import csv
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from peerlearn.cli import app
from peerlearn.daemon.output import write_atomic
from peerlearn.testing import local_cluster, poll_status

from .test_processes import PEERLEARN, free_ports

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 6, "sigma": 0.5}


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


async def test_out_after_finish_has_the_models_their_mean_the_summary_and_metrics(
    tmp_path: Path,
) -> None:
    outs = [tmp_path / f"d{i}" for i in range(2)]
    async with local_cluster(
        2, workers=2, algorithm="alg1", steps=60, problem=QUAD, each=lambda i: {"out": outs[i]}
    ) as cluster:
        await asyncio.wait_for(
            asyncio.gather(
                *(asyncio.to_thread(w.done.wait) for d in cluster.daemons for w in d.workers)
            ),
            60,
        )
        for d in cluster.daemons:
            while not d.output or not d.output.summary.exists():
                await asyncio.sleep(0.05)
        models = {w.name: w.x for d in cluster.daemons for w in d.workers}
    for i, out in enumerate(outs):
        arrays = _npz(out / "model.npz")
        mine = {k.removeprefix("worker_"): v for k, v in arrays.items() if k != "mean"}
        assert set(mine) == {f"{i}.0", f"{i}.1"}
        for name, x in mine.items():
            np.testing.assert_array_equal(x, models[name])
        np.testing.assert_allclose(arrays["mean"], np.mean(list(mine.values()), axis=0))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["config"]["algorithm"] == "alg1"
        assert [p["steps_done"] for p in summary["processes"]] == [60, 60]
        assert summary["final_loss"] is not None and summary["crashed"] == []
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        assert rows and {r["process"] for r in rows} == {f"{i}.0", f"{i}.1"}
        assert rows[-1]["step"] == "60" and float(rows[-1]["loss"]) >= 0


def test_out_after_sigterm_says_stopped_and_keeps_the_model(tmp_path: Path) -> None:
    """A daemon stopped mid-run (its peer never came: its workers wait for it) writes what it
    has, and says it stopped."""
    listen, api, peer = free_ports(3)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            PEERLEARN,
            "run",
            *("--listen", f"127.0.0.1:{listen}", "--api", f"127.0.0.1:{api}"),
            *("--peers", f"127.0.0.1:{peer}", "--workers", "2", "--algorithm", "alg1"),
            *("--steps", "100000", "--out", str(out), "--log-level", "warning"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        asyncio.run(
            poll_status(
                f"http://127.0.0.1:{api}",
                lambda s: all(w["state"] in ("running", "blocked") for w in s["workers"]),
            )
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped"
    ids = {p["id"] for p in summary["processes"]}  # (its cluster id: its address's rank)
    assert len(ids) == 2
    assert set(_npz(out / "model.npz")) == {"mean", *(f"worker_{i}" for i in ids)}


def test_an_out_directory_that_cannot_be_written_is_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    listen, api = free_ports(2)
    res = subprocess.run(
        [
            PEERLEARN,
            "run",
            *("--listen", f"127.0.0.1:{listen}", "--api", f"127.0.0.1:{api}"),
            *("--out", str(blocker / "out"), "--steps", "10"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert f"cannot use --out {blocker / 'out'}" in res.stderr
    assert "Traceback" not in res.stderr


def test_write_atomic_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_atomic(path, lambda fh: fh.write(b"old") and None)

    def broken(fh: Any) -> None:
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert path.read_bytes() == b"old"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
async def test_collect_writes_the_mean_of_every_daemons_models(tmp_path: Path, dtype: str) -> None:
    async with local_cluster(
        3, workers=1, algorithm="dasgd", steps=40, problem=QUAD, dtype=dtype
    ) as cluster:
        await asyncio.wait_for(
            asyncio.gather(
                *(asyncio.to_thread(w.done.wait) for d in cluster.daemons for w in d.workers)
            ),
            60,
        )
        apis = ",".join(f"127.0.0.1:{d.api_port}" for d in cluster.daemons)
        out = tmp_path / "take-home" / "model.npz"
        res = await asyncio.to_thread(
            CliRunner().invoke, app, ["collect", "--api", apis, "--out", str(out)]
        )
        models = {w.name: w.x for d in cluster.daemons for w in d.workers}
    assert res.exit_code == 0, res.output
    arrays = _npz(out)
    assert set(arrays) == {"mean", "consensus_distance", "worker_0.0", "worker_1.0", "worker_2.0"}
    xs = [models[k] for k in ("0.0", "1.0", "2.0")]
    assert all(arrays[f"worker_{k}"].dtype == dtype for k in ("0.0", "1.0", "2.0"))
    assert arrays["mean"].dtype == dtype  # in the models' dtype, averaged in float64
    want = np.mean(np.array(xs, dtype=np.float64), axis=0)
    np.testing.assert_allclose(arrays["mean"], want, rtol=np.finfo(dtype).eps, atol=1e-12)
    spread = np.mean([np.sum((x - np.mean(xs, axis=0)) ** 2) for x in xs])
    np.testing.assert_allclose(arrays["consensus_distance"], spread, rtol=1e-9, atol=1e-15)
    assert "the mean of 3 models from 3 daemon(s)" in res.output
    assert "consensus distance" in res.output


def test_collect_names_a_daemon_it_cannot_reach_and_exits_2(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    res = CliRunner().invoke(
        app, ["collect", "--api", f"127.0.0.1:{port}", "--out", str(tmp_path / "m.npz")]
    )
    assert res.exit_code == 2
    assert f"daemon 127.0.0.1:{port}" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m.npz").exists()
    bad = CliRunner().invoke(app, ["collect", "--api", "a:1 b:2"])
    assert bad.exit_code == 2 and "separate addresses with commas" in bad.output


def test_collect_help_says_what_it_writes() -> None:
    res = CliRunner().invoke(app, ["collect", "--help"], env={"COLUMNS": "120"})
    assert res.exit_code == 0 and "--api" in res.output and "mean" in res.output


def _run_daemon(out: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """A daemon whose only peer never comes (Alg 1: its workers wait for it)."""
    listen, api, peer = free_ports(3)
    proc = subprocess.Popen(
        [
            PEERLEARN,
            "run",
            *("--listen", f"127.0.0.1:{listen}", "--api", f"127.0.0.1:{api}"),
            *("--peers", f"127.0.0.1:{peer}", "--workers", "2", "--algorithm", "alg1"),
            *("--out", str(out), "--log-level", "warning", *extra),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, api


def test_a_second_daemon_on_the_same_out_is_refused_and_a_failed_final_write_exits_1(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    proc, api = _run_daemon(out, "--steps", "100000")
    try:
        asyncio.run(
            poll_status(
                f"http://127.0.0.1:{api}",
                lambda s: all(w["state"] in ("running", "blocked") for w in s["workers"]),
            )
        )
        second, _ = _run_daemon(out, "--steps", "10")
        assert second.wait(60) == 2
        assert second.stderr is not None
        assert "in use by another daemon" in second.stderr.read()
        # the directory goes away under the running daemon: its final write fails at stop
        for f in out.iterdir():
            f.unlink()
        out.rmdir()
        out.write_text("now a file")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 1
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "cannot write model.npz and summary.json" in err
        assert "exit code 1: the final model was not written to --out" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_a_diverged_run_writes_its_summary_with_a_non_finite_setting(tmp_path: Path) -> None:
    """--lr 1e300: the models turn non-finite at once, the workers diverge (exit 1); the summary
    still comes, status diverged (a non-finite number in it would not be JSON)."""
    listen, api = free_ports(2)
    out = tmp_path / "out"
    res = subprocess.run(
        [
            PEERLEARN,
            "run",
            *("--listen", f"127.0.0.1:{listen}", "--api", f"127.0.0.1:{api}"),
            *("--workers", "2", "--steps", "50", "--lr", "1e300", "--exit-on-finish"),
            *("--out", str(out), "--log-level", "error"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["source"] == "peerlearn run"
    assert all(p["diverged"] and not p["crashed"] for p in summary["processes"])
    assert {d["process"] for d in summary["diverged"]} == {"0.0", "0.1"}
