"""Simulator at scale: time per delivered message and peak memory from n = 1,000 to 10,000.

The target (issue 17): the sparse protocols — async gossip, synchronous gossip on a ring, DASGD
on a random-regular graph — at n = 10,000 within 1 GB and within 1.5× of the n = 1,000 cost per
delivered message; memory O(processes + messages in flight), never O(n²).

Each run is a child process of its own (``python bench_sim_scale.py --one …``), which reports
its own peak resident memory (``VmHWM``), so that the figure is that run's alone. The
wall time is that of ``run_simulation`` (programs, problem and streams built inside it; loading
the config and importing not), and its cost per message is that time over the deliveries. The
reference in the same run is the n = 1,000 row of the same protocol. Metric sampling keeps its
default (one sample per unit of virtual time: its cost is O(n) a sample, O(n) per step of the
run like the messages). The end-of-run diameter (O(n²) pairs) is not part of ``run_simulation``
and not timed here.

Run ``python benchmarks/bench_sim_scale.py`` (about three minutes; ``--sizes 1000 2000`` for a
shorter curve, ``--protocols async_gossip`` for one protocol).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: issue 17: at the largest n, at most this many bytes of peak memory …
MEMORY_LIMIT = 1 << 30
#: … and at most this factor on the cost per delivered message of the smallest n
COST_RATIO_LIMIT = 1.5

PROTOCOLS: dict[str, dict[str, Any]] = {
    "async_gossip": {"algorithm": "async_gossip"},
    "sync_gossip ring": {"algorithm": "sync_gossip", "topology": "ring"},
    "dasgd random-regular:4": {"algorithm": "dasgd", "topology": "random-regular:4"},
}
#: DASGD applies every gradient at every process, relayed over the graph: about 3·n²·T
#: deliveries on a 4-regular graph (3·10⁹ at n = 10⁴, T = 10 — hours), and each gradient
#: carries its n-entry version vector, so its cost per message grows with n by the algorithm's
#: design. It is measured on its own curve, for information, not against the target.
FLOODING = {"dasgd random-regular:4"}
#: DASGD's curve: these n, T = 2
FLOODING_SIZES, FLOODING_STEPS = [100, 200, 400], 2


@dataclass(frozen=True)
class Run:
    protocol: str
    n: int
    steps: int
    status: str
    deliveries: int
    wall: float  # seconds in run_simulation
    rss: int  # peak resident bytes of the child

    @property
    def per_message(self) -> float:
        return self.wall / max(1, self.deliveries)


def one(protocol: str, n: int, steps: int) -> dict[str, Any]:
    """Run one simulation here and return its figures (the parent reads the memory)."""
    from peerlearn.config import load_config
    from peerlearn.sim import run_simulation

    overrides = {**PROTOCOLS[protocol], "processes": n, "clusters": n, "steps": steps}
    cfg = load_config(overrides=overrides)
    start = time.perf_counter()
    result = run_simulation(cfg)
    wall = time.perf_counter() - start
    out = result.outcome
    # its own peak (VmHWM): ru_maxrss of a child counts the peak of the process it was forked
    # from as well
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1])
    return {"status": out.status, "deliveries": out.deliveries, "wall": wall, "rss": peak_kb}


def measure(protocol: str, n: int, steps: int) -> Run:
    cmd = [sys.executable, __file__, "--one", protocol, str(n), str(steps)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{protocol} n={n} failed (exit {done.returncode})")
    got = json.loads(done.stdout)
    rss = got["rss"] * 1024
    return Run(protocol, n, steps, got["status"], got["deliveries"], got["wall"], rss)


def render(runs: list[Run]) -> tuple[str, bool | None]:
    """The table, and whether the target was met (None: no row could be judged — one size, or
    DASGD alone)."""
    head = ("protocol", "n", "deliveries", "wall s", "µs/message", "× n_min", "peak MB", "verdict")
    rows = []
    ok = True
    judged = 0
    largest = max((r.n for r in runs if r.protocol not in FLOODING), default=0)
    for r in runs:
        base = min((b for b in runs if b.protocol == r.protocol), key=lambda b: b.n)
        ratio = r.per_message / base.per_message
        verdict = "—"
        if r.status != "finished":
            verdict, ok = f"MISS ({r.status})", False
        elif r.protocol in FLOODING:
            verdict = "info"
        elif r.n == largest and r.n > base.n:
            met = ratio <= COST_RATIO_LIMIT and r.rss <= MEMORY_LIMIT
            verdict = "PASS" if met else "MISS"
            ok = ok and met
            judged += 1
        rows.append(
            (
                r.protocol,
                f"{r.n:,}",
                f"{r.deliveries:,}",
                f"{r.wall:.2f}",
                f"{r.per_message * 1e6:.1f}",
                f"{ratio:.2f}",
                f"{r.rss / 2**20:,.0f}",
                verdict,
            )
        )
    widths = [max(len(c) for c in col) for col in zip(head, *rows, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 7) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    table = "\n".join([line(head), rule, *(line(r) for r in rows)])
    return table, (ok if judged or not ok else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000], help="values of n"
    )
    parser.add_argument("--steps", type=int, default=20, help="iterations T per process")
    parser.add_argument(
        "--dasgd-sizes",
        type=int,
        nargs="+",
        default=FLOODING_SIZES,
        help=f"values of n for DASGD (T = {FLOODING_STEPS}: its messages grow as n²)",
    )
    parser.add_argument(
        "--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS), metavar="P"
    )
    parser.add_argument("--one", nargs=3, metavar=("PROTOCOL", "N", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        protocol, n, steps = args.one
        print(json.dumps(one(protocol, int(n), int(steps))))
        return 0
    runs = []
    for protocol in args.protocols:
        flooding = protocol in FLOODING
        sizes = args.dasgd_sizes if flooding else args.sizes
        steps = FLOODING_STEPS if flooding else args.steps
        for n in sorted(sizes):
            print(f"{protocol} n={n:,} T={steps} …", file=sys.stderr, flush=True)
            runs.append(measure(protocol, n, steps))
    table, ok = render(runs)
    print(table)
    said = {True: "met", False: "NOT met", None: "not checked (it needs two sizes or more)"}
    print(
        f"\ntarget at the largest n: ≤ {COST_RATIO_LIMIT}× the smallest n's time per message, "
        f"≤ {MEMORY_LIMIT / 2**20:,.0f} MB peak — {said[ok]}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
