"""Daemons as real processes (`peerlearn run`): exit on finish, SIGKILL of a whole daemon."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from peerlearn.testing import poll_status

PEERLEARN = str(Path(sys.executable).with_name("peerlearn"))


def free_ports(k: int) -> list[int]:
    socks = []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextmanager
def daemons(k: int, *args: str) -> Iterator[tuple[list[subprocess.Popen[bytes]], list[str]]]:
    peer_ports, api_ports = free_ports(k), free_ports(k)
    addrs = [f"127.0.0.1:{p}" for p in peer_ports]
    procs = []
    for i in range(k):
        cmd = [
            PEERLEARN,
            "run",
            "--listen",
            addrs[i],
            "--api",
            f"127.0.0.1:{api_ports[i]}",
            "--peers",
            ",".join(a for a in addrs if a != addrs[i]),
            "--log-level",
            "warning",
            *args,
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    # Clusters are the positions of the addresses in sorted order: list the URLs that way.
    order = sorted(range(k), key=lambda i: peer_ports[i])
    urls = [f"http://127.0.0.1:{api_ports[i]}" for i in order]
    try:
        yield [procs[i] for i in order], urls
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)


def steps(status: dict[str, Any]) -> int:
    return min(w["step"] for w in status["workers"])


def test_run_exits_zero_when_every_worker_is_done() -> None:
    with daemons(3, "--workers", "2", "--steps", "100", "--exit-on-finish") as (procs, _):
        codes = [p.wait(120) for p in procs]
        outputs = [p.stdout.read().decode() if p.stdout else "" for p in procs]
    assert codes == [0, 0, 0], outputs


def test_run_reports_bad_flags_in_one_line() -> None:
    res = subprocess.run(
        [PEERLEARN, "run", "--peers", "nonsense"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "not host:port" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("algorithm", ["alg1", "alg2"])
async def test_sigkill_one_daemon_of_four(algorithm: str) -> None:
    """Alg 1 (N ≤ n − f) and Alg 2 (a majority of clusters alive) go on without the killed
    daemon; Alg 2 with a second daemon killed has only ⌊m/2⌋ clusters and reports blocked."""
    extra = ["--set", "maa.rounds=3", "--set", "maa.inner_rounds=2"] if algorithm == "alg2" else []
    with daemons(
        4, "--workers", "2", "--algorithm", algorithm, "--set", "stall_timeout=1.0", *extra
    ) as (procs, urls):
        await poll_status(urls[0], lambda s: steps(s) > 10)
        os.kill(procs[3].pid, signal.SIGKILL)
        procs[3].wait(30)
        before = steps(await poll_status(urls[0], lambda s: True))
        for url in urls[:3]:
            await poll_status(url, lambda s: steps(s) > before + 20)
        if algorithm == "alg2":
            os.kill(procs[2].pid, signal.SIGKILL)
            procs[2].wait(30)
            status = await poll_status(
                urls[0], lambda s: all(w["state"] == "blocked" for w in s["workers"])
            )
            for w in status["workers"]:
                # Blocked in agreement (2 of 3 clusters) or already in the gradient exchange
                # (N = n − f = 5 processes, only 4 alive): both are what the model predicts.
                waiting = w["waiting"]
                if waiting["unit"] == "clusters":
                    assert (waiting["have"], waiting["need"]) == (2, 3)
                else:
                    assert waiting["need"] == 5 and waiting["have"] <= 4
        peers = (await poll_status(urls[0], lambda s: True))["peers"]
        assert [p["state"] for p in peers][2] != "connected"  # cluster 3 is gone
        assert procs[0].poll() is None  # the survivors keep running
