"""What the metrics cost: step rate of a daemon cluster with metrics on and off.

Three daemons × two workers in this process on 127.0.0.1 (``peerlearn.testing.local_cluster``,
uvloop) train for ``--seconds`` per run; the figure of a run is steps per second summed over
the six workers (the first second is warm-up and not counted).

``off``
    The reference: ``metrics = false`` — no histogram observations (staleness per delivered
    message, DASGD's staleness per applied gradient, agreement contraction), no loss
    evaluations, no model snapshots, and nobody scrapes.
``on``
    Everything a monitored run does: the defaults (loss on the evaluation batch every 10 steps,
    snapshots every 5 s where an algorithm needs them) **and** a scraper reading every daemon's
    ``/metrics`` every ``--scrape`` seconds (1 s: five times more often than the shipped
    Prometheus config).

Each pair is one ``on`` and one ``off`` run back to back, each a fresh cluster, in alternating
order (on first, then off first: whatever the first run of a pair gains or loses cancels); the
ratio of a pair is on/off, and the figure is the median [quartiles] over ``--repeat`` pairs.
Six threads and three event loops share two cores and one interpreter lock here, so single runs
vary by ±15 %: only the median of many pairs means something, and the quartiles say how much.
Target: the median cost (1 − ratio) at most 5 % for every algorithm. Exit code 1 if not.

Run ``.venv/bin/python benchmarks/bench_metrics.py`` on an idle machine (about 6 min;
``--quick``: about 1 min).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
from typing import Any

import httpx
import uvloop

from peerlearn.testing import local_cluster

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


async def _run(fields: dict[str, Any], metrics: bool, seconds: float, scrape: float) -> float:
    async with local_cluster(
        3, workers=2, steps=None, metrics=metrics, eval_every=10, **fields
    ) as cluster:
        stop = asyncio.Event()

        async def scraper() -> int:
            n = 0
            async with httpx.AsyncClient(timeout=5.0) as client:
                while not stop.is_set():
                    for url in cluster.urls:
                        (await client.get(f"{url}/metrics")).raise_for_status()
                        n += 1
                    with contextlib.suppress(TimeoutError):  # the scrape interval passed
                        await asyncio.wait_for(stop.wait(), scrape)
            return n

        task = asyncio.create_task(scraper()) if metrics else None
        await asyncio.sleep(1.0)  # warm-up: connections, first evaluations
        start_steps, t0 = sum(cluster.steps()), time.perf_counter()
        await asyncio.sleep(seconds)
        steps, elapsed = sum(cluster.steps()) - start_steps, time.perf_counter() - t0
        stop.set()
        if task is not None:
            await task
        return steps / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per run")
    parser.add_argument("--repeat", type=int, default=10, help="on/off pairs per algorithm")
    parser.add_argument("--scrape", type=float, default=1.0, help="scrape interval (s)")
    parser.add_argument("--quick", action="store_true", help="2 s runs, 2 pairs")
    parser.add_argument("--algorithms", nargs="*", default=list(WORKLOADS))
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.repeat = 2.0, 4
    logging.getLogger("peerlearn").setLevel(logging.ERROR)  # start-up warnings, per cluster
    print(
        f"metrics cost: 3 daemons × 2 workers, {args.seconds:g} s per run, {args.repeat} on/off "
        f"pairs, scrape every {args.scrape:g} s, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'algorithm':10s} {'off steps/s':>14s} {'on steps/s':>14s} {'on/off [quartiles]':>24s}")
    worst = 0.0
    for name in args.algorithms:
        fields = WORKLOADS[name]
        offs, ons, ratios = [], [], []
        for i in range(args.repeat):
            order = (True, False) if i % 2 == 0 else (False, True)
            rate = {m: uvloop.run(_run(fields, m, args.seconds, args.scrape)) for m in order}
            offs.append(rate[False])
            ons.append(rate[True])
            ratios.append(rate[True] / rate[False])
        ratio = statistics.median(ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratio,) * 3
        worst = max(worst, 1 - ratio)
        print(
            f"{name:10s} {statistics.median(offs):14,.0f} {statistics.median(ons):14,.0f} "
            f"{ratio:8.3f} [{q1:.3f}–{q3:.3f}]"
        )
    verdict = "PASS" if worst <= 0.05 else "FAIL"
    print(f"{verdict}: largest median cost {worst:.1%} (target ≤ 5 %)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
