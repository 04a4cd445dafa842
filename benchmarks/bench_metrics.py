"""What the metrics cost: step rate and CPU per step of a daemon cluster, metrics on and off.

Three daemons × two workers in this process on 127.0.0.1 (``peerlearn.testing.local_cluster``,
uvloop) train for ``--seconds`` per run (after one second of warm-up). A run gives two figures:
the step rate — gradients computed per second over the six workers, which is the steps per
second of Alg 1 and Alg 2; for DASGD, whose local step also counts every gradient applied from
elsewhere, the gradients are the work done — and the process's CPU time (user + system, all
threads) per gradient.

``off``
    The reference: ``metrics = false`` — no histogram observations (staleness per delivered
    message, DASGD's staleness per applied gradient, agreement contraction), no loss
    evaluations, no model snapshots, and nobody scrapes.
``on``
    Everything a monitored run does: the defaults (loss on the evaluation batch every 10 steps,
    snapshots every 5 s where an algorithm needs them) **and** a scraper reading every daemon's
    ``/metrics`` every ``--scrape`` seconds (1 s: five times more often than the shipped
    Prometheus config), from another process — as Prometheus would.

Each pair is one ``on`` and one ``off`` run back to back, each a fresh cluster, in alternating
order (whatever the first run of a pair gains or loses cancels); a pair's ratios are on/off,
and each figure is the median [quartiles] over ``--repeat`` pairs. Six threads and three event
loops share two cores and one interpreter lock, so the step rate of single runs varies by
±15 % whatever the metrics do; CPU time per step — the work the metrics add to each step — is
the steadier figure. Target: the median CPU cost per step (on/off − 1) at most 5 % for every
algorithm (exit code 1 if not); the step-rate ratio is printed next to it.

Run ``.venv/bin/python benchmarks/bench_metrics.py`` on an idle machine (about 6 min; add
``--processes`` for one ``peerlearn run`` process per daemon, as deployed;
``--quick``: about 1 min).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import uvloop

from peerlearn.testing import LocalCluster, local_cluster

WORKLOADS: dict[str, dict[str, Any]] = {
    # (algorithm, node fields): Alg 1 on the digits softmax (the demo), Alg 2 (agreement
    # contraction is observed every round) and DASGD (every applied gradient is observed)
    "alg1": {"algorithm": "alg1", "problem": {"name": "softmax"}, "lr": {"eta": 0.1}},
    "alg2": {
        "algorithm": "alg2",
        "problem": {"name": "softmax"},
        "lr": {"eta": 0.1},
        "maa": {"rounds": 4, "inner_rounds": 3},
    },
    "dasgd": {"algorithm": "dasgd", "problem": {"name": "softmax"}, "lr": {"eta": 0.02}},
}


#: the scraper, in its own process so that its CPU time is not counted as the daemons'
SCRAPER = """
import sys, time, urllib.request
*urls, every = sys.argv[1:]
while True:
    for url in urls:
        urllib.request.urlopen(url + "/metrics", timeout=5).read()
    time.sleep(float(every))
"""


def _gradients(cluster: LocalCluster) -> int:
    """Gradients computed so far: the unit of work. It is the step count for Alg 1/Alg 2; a
    DASGD node's step counts every gradient it *applies* (n per gradient computed), and how
    many of its steps are cheap applies depends on timing, not on the metrics."""
    return sum(w.grads for d in cluster.daemons for w in d.workers)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


async def _run(
    fields: dict[str, Any], metrics: bool, seconds: float, scrape: float
) -> tuple[float, float]:
    """(gradients per second, CPU milliseconds per gradient) of one fresh cluster."""
    async with local_cluster(
        3, workers=2, steps=None, metrics=metrics, eval_every=10, **fields
    ) as cluster:
        scraper = (
            subprocess.Popen([sys.executable, "-c", SCRAPER, *cluster.urls, str(scrape)])
            if metrics
            else None
        )
        try:
            await asyncio.sleep(1.0)  # warm-up: connections, first evaluations
            steps0, cpu0, t0 = _gradients(cluster), _cpu(), time.perf_counter()
            await asyncio.sleep(seconds)
            steps = _gradients(cluster) - steps0
            cpu, elapsed = _cpu() - cpu0, time.perf_counter() - t0
        finally:
            if scraper is not None:
                scraper.kill()
                scraper.wait()
        return steps / elapsed, 1000 * cpu / max(steps, 1)


def _free_ports(k: int) -> list[int]:
    socks = [socket.socket() for _ in range(k)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _flags(fields: dict[str, Any], prefix: str = "") -> list[str]:
    """Node fields as ``--set`` flags (nested tables dotted)."""
    out = []
    for key, value in fields.items():
        if isinstance(value, dict):
            out += _flags(value, f"{prefix}{key}.")
        else:
            out += ["--set", f"{prefix}{key}={value}"]
    return out


def _proc_cpu(pids: list[int]) -> float:
    """User + system seconds of the processes ``pids`` so far (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _steps(api: str) -> int:
    with urllib.request.urlopen(f"{api}/status", timeout=10) as r:
        return sum(w["step"] for w in json.load(r)["workers"])


def _run_processes(
    fields: dict[str, Any], metrics: bool, seconds: float, scrape: float
) -> tuple[float, float]:
    """(steps per second, CPU ms per step) of three ``peerlearn run`` processes: one
    interpreter lock per daemon, as deployed."""
    peers, apis = _free_ports(3), _free_ports(3)
    addrs = ",".join(f"127.0.0.1:{p}" for p in peers)
    urls = [f"http://127.0.0.1:{a}" for a in apis]
    env = {**os.environ, "PEERLEARN_METRICS": "true" if metrics else "false"}
    daemons = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peerlearn.cli",
                "run",
                "--listen",
                f"127.0.0.1:{p}",
                "--api",
                f"127.0.0.1:{a}",
                "--peers",
                addrs,
                "--workers",
                "2",
                "--log-level",
                "error",
                *_flags(fields),
            ],
            env=env,
        )
        for p, a in zip(peers, apis, strict=True)
    ]
    scraper = None
    try:
        deadline = time.monotonic() + 60
        for url in urls:
            while True:
                try:
                    if _steps(url) > 0:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"daemon at {url} did not start")
                time.sleep(0.1)
        if metrics:
            scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, *urls, str(scrape)])
        time.sleep(1.0)
        pids = [d.pid for d in daemons]
        steps0, cpu0, t0 = sum(map(_steps, urls)), _proc_cpu(pids), time.perf_counter()
        time.sleep(seconds)
        steps = sum(map(_steps, urls)) - steps0
        cpu, elapsed = _proc_cpu(pids) - cpu0, time.perf_counter() - t0
    finally:
        for proc in (*daemons, *([scraper] if scraper else [])):
            proc.kill()
            proc.wait()
    return steps / elapsed, 1000 * cpu / max(steps, 1)


def _spread(values: list[float]) -> str:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"{median:8.3f} [{q1:.3f}–{q3:.3f}]".rjust(27)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per run")
    parser.add_argument("--repeat", type=int, default=10, help="on/off pairs per algorithm")
    parser.add_argument("--scrape", type=float, default=1.0, help="scrape interval (s)")
    parser.add_argument("--quick", action="store_true", help="2 s runs, 2 pairs")
    parser.add_argument("--algorithms", nargs="*", default=list(WORKLOADS))
    parser.add_argument(
        "--processes",
        action="store_true",
        help="one `peerlearn run` process per daemon instead of three daemons in this one",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.repeat = 2.0, 4
    logging.getLogger("peerlearn").setLevel(logging.ERROR)  # start-up warnings, per cluster
    print(
        f"metrics cost: 3 daemons × 2 workers, {args.seconds:g} s per run, {args.repeat} on/off "
        f"pairs, scrape every {args.scrape:g} s, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'algorithm':10s} {'steps/s on/off [quartiles]':>27s} {'CPU/step on/off':>27s}")
    worst = 0.0
    for name in args.algorithms:
        fields = WORKLOADS[name]
        rates, cpus = [], []
        for i in range(args.repeat):
            order = (True, False) if i % 2 == 0 else (False, True)
            got = {
                m: _run_processes(fields, m, args.seconds, args.scrape)
                if args.processes
                else uvloop.run(_run(fields, m, args.seconds, args.scrape))
                for m in order
            }
            rates.append(got[True][0] / got[False][0])
            cpus.append(got[True][1] / got[False][1])
        cpu = statistics.median(cpus)
        worst = max(worst, cpu - 1)
        print(f"{name:10s} {_spread(rates)} {_spread(cpus)}   ({cpu - 1:+.1%} CPU per step)")
    verdict = "PASS" if worst <= 0.05 else "FAIL"
    print(f"{verdict}: largest median CPU cost per step {worst:.1%} (target ≤ 5 %)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
