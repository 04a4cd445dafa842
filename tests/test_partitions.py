"""Network partitions between real daemons in network namespaces, and their healing.

Three ``peerlearn run`` daemons (one worker each, N = 2 of n = 3), one per namespace on a
bridge (tests/netns.py). One daemon is cut off from the bridge — by an nftables rule dropping
everything on its ``eth0``, or by taking the link down — while the other two keep their link.
The majority side (two daemons, N = 2) must go on; the minority side (one daemon, whose quorum
needs a second process) must say it is ``blocked``; after healing, everyone must step again
within ``peer_timeout + 2 s``, and the cut-off daemon must catch up from the others' state
(its peers dropped the frames of the iterations it missed).

Each daemon serves its API on every address of its namespace, and one *sampler* per namespace
— this file run as a script there — reads ``/status`` over the namespace's own loopback every
0.1 s, so the minority's status stays visible while its ``eth0`` is cut. The samplers print one
JSON line per sample, with ``time.monotonic()`` (one clock for all namespaces), which the test
compares with the times it cut and healed.

Skips, with the reason, where namespaces cannot be made or ``nft`` is missing (``make
system-deps`` installs Debian's ``nftables``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

if __name__ != "__main__":  # this file is also the sampler run in a namespace
    from tests.helpers import member_files
    from tests.netns import bridge, stop

SUBNET = "10.214.0"
PEER_PORT, API_PORT = 7001, 8001
PEER_TIMEOUT = 2.0
STALL_TIMEOUT = 2.0
PEERLEARN = str(Path(sys.executable).with_name("peerlearn"))


@dataclass
class Sample:
    at: float  # time.monotonic()
    step: int | None  # the worker's completed iterations; None: the API did not answer
    state: str | None  # the worker's state in /status (running, blocked, …)
    rejoins: int


@dataclass
class Run:
    """Three daemons, their samplers, and what the samplers saw (host index → samples)."""

    nodes: list[str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    samples: dict[int, list[Sample]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    changed: threading.Condition = field(init=False)
    logs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)
        self.samples = {i: [] for i in range(len(self.nodes))}

    def last_step(self, i: int) -> int:
        with self.lock:
            return next((s.step for s in reversed(self.samples[i]) if s.step is not None), -1)

    def wait(self, condition: Any, timeout: float) -> None:
        """Until ``condition()`` holds (checked whenever a sample arrives)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not condition():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; last steps {self.steps()}\n{self.log_text()}"
                self.changed.wait(left)

    def steps(self) -> list[int]:
        return [self.last_step(i) for i in range(len(self.nodes))]

    def between(self, i: int, start: float, end: float) -> list[Sample]:
        with self.lock:
            return [s for s in self.samples[i] if start <= s.at <= end]

    def log_text(self) -> str:
        return "\n".join(
            f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs
        )


def _read(run: Run, i: int, stream: IO[bytes]) -> None:
    for line in stream:
        got = json.loads(line)
        with run.changed:
            run.samples[i].append(Sample(got["at"], got["step"], got["state"], got["rejoins"]))
            run.changed.notify_all()


@pytest.fixture
def run(tmp_path: Path, algorithm: str) -> Iterator[Run]:
    if shutil.which("nft") is None:
        pytest.skip("nft missing (Debian package nftables; `make system-deps` installs it)")
    tag = f"plpt-{os.getpid()}-{secrets.token_hex(2)}"
    with bridge(tag, {f"n{i}": f"n{i}" for i in range(3)}, SUBNET) as br:
        nodes = list(br.ns.values())
        ips = list(br.ips.values())
        r = Run(nodes)
        r.logs = [tmp_path / f"daemon{i}.log" for i in range(3)]
        addrs = [f"{a}:{PEER_PORT}" for a in ips]
        try:
            for i, ns in enumerate(nodes):
                with r.logs[i].open("wb") as log:
                    cmd = [
                        *("ip", "netns", "exec", ns, PEERLEARN, "run"),
                        *("--listen", addrs[i], "--api", f"0.0.0.0:{API_PORT}"),
                        *("--peers", ",".join(a for a in addrs if a != addrs[i])),
                        *("--algorithm", algorithm, "--workers", "1", "--quorum", "2"),
                        *("--set", f"peer_timeout={PEER_TIMEOUT}"),
                        *("--set", f"stall_timeout={STALL_TIMEOUT}"),
                        *("--log-level", "info"),
                        *member_files(tmp_path / "members"),
                    ]
                    r.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            for i, ns in enumerate(nodes):
                sampler = subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        sys.executable,
                        __file__,
                        "--sample",
                        str(API_PORT),
                    ],
                    stdout=subprocess.PIPE,
                )
                r.procs.append(sampler)
                assert sampler.stdout is not None
                threading.Thread(target=_read, args=(r, i, sampler.stdout), daemon=True).start()
            yield r
        finally:
            for proc in r.procs:
                stop(proc)


def _cut(ns: str, how: str) -> None:
    if how == "nft":
        rules = (
            "add table inet plcut\n"
            "add chain inet plcut in { type filter hook input priority 0; }\n"
            "add chain inet plcut out { type filter hook output priority 0; }\n"
            'add rule inet plcut in iifname "eth0" drop\n'
            'add rule inet plcut out oifname "eth0" drop\n'
        )
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules.encode(), check=True
        )
    else:
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "down"], check=True)


def _heal(ns: str, how: str) -> None:
    if how == "nft":
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "plcut"], check=True
        )
    else:
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)


def _partition(run: Run, how: str, seconds: float) -> None:
    """Cut daemon 2 off for ``seconds``, heal, and check both sides as the module says."""
    run.wait(lambda: min(run.steps()) > 20, timeout=60)
    cut = time.monotonic()
    _cut(run.nodes[2], how)
    # The measurement window of the partition itself: the majority must step through it.
    time.sleep(seconds)
    healed = time.monotonic()
    at_heal = max(run.last_step(0), run.last_step(1))
    _heal(run.nodes[2], how)
    # Everyone steps again, and the cut-off daemon catches up with where the others were.
    run.wait(lambda: run.last_step(2) >= at_heal, timeout=30)
    context = f"\n{run.log_text()}"
    stuck = max((s.step for s in run.between(2, cut, healed) if s.step is not None), default=-1)
    after = [s for s in run.between(2, healed, time.monotonic()) if s.step is not None]
    resumed = next(s.at for s in after if s.step is not None and s.step > stuck)

    settled = cut + PEER_TIMEOUT + 1  # the majority has stopped waiting for the minority
    for i in (0, 1):
        during = [s.step for s in run.between(i, settled, healed) if s.step is not None]
        assert during and during[-1] - during[0] >= 10, f"daemon {i} stalled: {during}{context}"
    minority = run.between(2, cut + PEER_TIMEOUT + STALL_TIMEOUT + 1, healed)
    assert any(s.state == "blocked" for s in minority), (
        f"the cut-off daemon never said blocked: {[(s.step, s.state) for s in minority]}{context}"
    )
    assert resumed - healed <= PEER_TIMEOUT + 2, (resumed - healed, context)
    assert run.samples[2][-1].rejoins >= 1, context


@pytest.mark.parametrize("algorithm", ["alg1"])
def test_a_cut_off_daemon_blocks_the_majority_goes_on_and_it_catches_up(run: Run) -> None:
    _partition(run, "nft", 12.0)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["alg1", "alg2"])
@pytest.mark.parametrize("how", ["nft", "link"])
def test_thirty_second_partitions_heal(run: Run, how: str) -> None:
    _partition(run, how, 30.0)


if __name__ == "__main__":  # the sampler: python test_partitions.py --sample API_PORT
    import urllib.request

    assert sys.argv[1] == "--sample", sys.argv
    url = f"http://127.0.0.1:{sys.argv[2]}/status"
    while True:
        step = state = None
        rejoins = 0
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                status = json.load(resp)
            worker = status["workers"][0]
            step, state, rejoins = worker["step"], worker["state"], status["catchup"]["rejoins"]
        except (OSError, ValueError, KeyError, IndexError):
            pass  # not up yet, or going down: a sample without a step
        line = {"at": time.monotonic(), "step": step, "state": state, "rejoins": rejoins}
        print(json.dumps(line), flush=True)
        time.sleep(0.1)  # the sampling period
