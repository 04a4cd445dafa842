"""What the metrics cost: step rate of a daemon cluster with metrics on and off.

Two clusters of three ``peerlearn run`` processes × two workers on 127.0.0.1 (one process per
daemon, as deployed) are started one after the other and then take turns: one runs while
every process of the other is paused with SIGSTOP. A turn is a ``--window`` of training (after a
quarter second for the resumed processes to settle) and gives the step rate — stochastic
gradients computed per second over the six workers, from ``/status``: for Alg 1 and Alg 2 the
same as steps, while a DASGD worker's step also counts the gradients it applied from elsewhere
— and the daemons' CPU time per gradient (from /proc).

``off``
    The reference: ``metrics = false`` (``PEERLEARN_METRICS=0``) — no histogram observations
    (staleness per delivered message, DASGD's staleness per applied gradient, agreement
    contraction), no loss evaluations, no model snapshots, and nobody scrapes.
``on``
    Everything a monitored run does: the defaults (loss on the evaluation batch every 10 steps,
    at most once a second; DASGD's model snapshots every 5 s) **and** a scraper reading every
    daemon's ``/metrics`` every ``--scrape`` seconds (5 s, as ``configs/prometheus.yml``; a
    status page open in a browser reads it every second), from its own process — as Prometheus
    would — paused and resumed with its cluster. Timers run on wall time: one that fell due
    during a pause fires on resume, in the unmeasured quarter second.

Why turns: on these shared two-core machines the step rate of one unchanged cluster moves by
±10 % from one second to the next, and two fresh clusters of the same code differ by up to
±10 % for as long as they live — more than the effect being measured. Turns of a second cost no
start-up, so hundreds fit in a few minutes, and adjacent turns see the same machine; a pair is
one turn of each cluster, alternating which goes first (a linear drift cancels over two
pairs). The two clusters of a round share a memory layout (see ``PREFIX``), and each of
``--rounds`` rounds starts two fresh clusters with another layout. Pairs of one round are not
independent (they share two instances); rounds are. So a round's ratio on/off is the geometric
mean of its pairs', and the estimate is the geometric mean of the rounds' ratios with a 95 %
Student-t interval over rounds. Verdict per algorithm, for the target (step rate with metrics
at most 5 % lower):

* ``PASS`` — the whole interval lies at or above 0.95: the cost is ≤ 5 % with 95 % confidence;
* ``FAIL`` — the whole interval lies below 0.95;
* ``UNSETTLED`` — the interval straddles 0.95: run more rounds (``--layout-seed`` gives new
  rounds layouts of their own).

Exit code 0 if every algorithm passes, 1 if not, 2 if the benchmark itself failed.
``--control`` adds the same measurement with both clusters ``off``: its interval should cover
1.0, a check that the interval is honest about the noise and that taking turns favours
neither cluster (reported, not part of the exit code: one in twenty misses by chance).

Run ``make bench-metrics`` (``.venv/bin/python benchmarks/bench_metrics.py``) on an idle
machine: about 9 min per algorithm with the defaults, twice that with ``--control``;
``--quick`` (2 rounds of 10 pairs) takes a minute per algorithm and settles nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository

from benchmarks._common import free_ports, gradients

WORKLOADS: dict[str, dict[str, Any]] = {
    # node fields: Alg 1 on the digits softmax (the demo), Alg 2 (agreement contraction is
    # observed every round) and DASGD (every applied gradient is observed)
    "alg1": {"algorithm": "alg1", "problem": {"name": "softmax"}, "lr": {"eta": 0.1}},
    "alg2": {
        "algorithm": "alg2",
        "problem": {"name": "softmax"},
        "lr": {"eta": 0.1},
        "maa": {"rounds": 4, "inner_rounds": 3},
    },
    "dasgd": {"algorithm": "dasgd", "problem": {"name": "softmax"}, "lr": {"eta": 0.02}},
}

DAEMONS, WORKERS, TARGET, SETTLE = 3, 2, 0.05, 0.25


#: Two fresh clusters of the same code can differ by up to ±10 % in step rate for as long as
#: they live (off/off controls measured 0.93 and 1.10), enough to hide or fake the cost: where
#: things land in memory (address-space randomization, hash seed, environment size) is part of
#: it. So the two clusters of a round get the same layout: no address-space randomization
#: (``setarch -R``), the same hash seed and an environment of the same size (metrics "1"/"0"),
#: and each round a different seed and environment size — the layout varies between rounds,
#: whose spread the interval then includes, not between the arms being compared.
def _no_aslr_prefix() -> list[str]:
    """``setarch -R`` where it works (a container may forbid changing the personality)."""
    if shutil.which("setarch") is None:
        return []
    works = subprocess.run(["setarch", "-R", "true"], capture_output=True).returncode == 0
    return ["setarch", "-R"] if works else []


PREFIX = _no_aslr_prefix()


def layout(round_: int) -> dict[str, str]:
    """The environment that sets round ``round_``'s memory layout."""
    return {"PYTHONHASHSEED": str(round_), "PEERLEARN_BENCH_LAYOUT": "x" * (24 * round_)}


#: the scraper, in its own process so that its CPU time is not counted as the daemons'
SCRAPER = """
import sys, time, urllib.request

*urls, every = sys.argv[1:]
while True:
    for url in urls:
        urllib.request.urlopen(url + "/metrics", timeout=30).read()
    time.sleep(float(every))
"""


@dataclass(frozen=True)
class Turn:
    rate: float  # gradients per second, all workers
    cpu_ms: float  # daemon CPU milliseconds per gradient


def _flags(fields: dict[str, Any], prefix: str = "") -> list[str]:
    """Node fields as ``--set`` flags (nested tables dotted)."""
    out = []
    for key, value in fields.items():
        if isinstance(value, dict):
            out += _flags(value, f"{prefix}{key}.")
        else:
            out += ["--set", f"{prefix}{key}={value}"]
    return out


def _proc_cpu(pids: Sequence[int]) -> float:
    """User + system seconds of the processes ``pids`` so far (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


@dataclass
class Cluster:
    """Three daemon processes (and, with metrics, their scraper) that can be paused."""

    label: str
    daemons: list[subprocess.Popen[bytes]]
    urls: list[str]
    scraper: subprocess.Popen[bytes] | None = None

    def _processes(self) -> list[subprocess.Popen[bytes]]:
        return [*([self.scraper] if self.scraper else []), *self.daemons]

    def check(self) -> None:
        for proc in self._processes():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label}: process {proc.pid} exited with {proc.returncode}"
                )

    def pause(self) -> None:
        for proc in self._processes():
            proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for proc in reversed(self._processes()):  # daemons first: the scraper finds them up
            proc.send_signal(signal.SIGCONT)

    def gradients(self) -> int:
        return sum(map(gradients, self.urls))

    def cpu(self) -> float:
        return _proc_cpu([d.pid for d in self.daemons])

    def turn(self, seconds: float) -> Turn:
        """Resume, let the processes settle, train ``seconds``, pause; what the turn did."""
        self.check()
        self.resume()
        try:
            time.sleep(SETTLE)
            grads0, cpu0, t0 = self.gradients(), self.cpu(), time.perf_counter()
            time.sleep(seconds)
            grads, cpu = self.gradients() - grads0, self.cpu() - cpu0
            elapsed = time.perf_counter() - t0
        finally:
            self.pause()
        if grads <= 0:
            raise RuntimeError(f"{self.label}: no gradient computed in {seconds:g} s")
        return Turn(grads / elapsed, 1000 * cpu / grads)


@contextmanager
def started(
    label: str, fields: dict[str, Any], metrics: bool, scrape: float, env: dict[str, str]
) -> Iterator[Cluster]:
    """A fresh cluster, trained until every daemon has computed a gradient, then paused;
    killed (paused or not) on exit."""
    ports = free_ports(2 * DAEMONS)  # one call: no port handed out twice
    peers, apis = ports[:DAEMONS], ports[DAEMONS:]
    addrs = ",".join(f"127.0.0.1:{p}" for p in peers)
    env = {**os.environ, **env, "PEERLEARN_METRICS": "1" if metrics else "0"}
    command = [*PREFIX, sys.executable, "-m", "peerlearn.cli", "run", "--peers", addrs]
    command += ["--workers", str(WORKERS), "--log-level", "error", *_flags(fields)]
    cluster = Cluster(label, [], [f"http://127.0.0.1:{a}" for a in apis])
    try:
        for p, a in zip(peers, apis, strict=True):
            listen = ["--listen", f"127.0.0.1:{p}", "--api", f"127.0.0.1:{a}"]
            # own process group: a Ctrl-C in the terminal reaches only this benchmark, which
            # kills every cluster itself (a paused daemon would not act on the signal). Killed
            # with SIGKILL, it leaves paused daemons behind: pkill -9 -f "peerlearn.cli run"
            cluster.daemons.append(subprocess.Popen([*command, *listen], env=env, process_group=0))
        deadline = time.monotonic() + 60
        for url in cluster.urls:
            while True:
                cluster.check()
                try:
                    if gradients(url) > 0:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: {url} computed no gradient within 60 s")
                time.sleep(0.1)
        if metrics:
            scraper = [sys.executable, "-c", SCRAPER, *cluster.urls, str(scrape)]
            cluster.scraper = subprocess.Popen(scraper, process_group=0)
        cluster.pause()
        yield cluster
    finally:
        for proc in cluster._processes():
            proc.kill()  # SIGKILL ends a stopped process too
            proc.wait()


#: two-sided 95 % quantiles of Student's t by degrees of freedom (beyond 30: the value at 30,
#: slightly wider than the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def geometric_ci(units: Sequence[float]) -> tuple[float, float, float]:
    """Geometric mean of ``units`` (independent ratios, at least two) and its 95 % Student-t
    interval, computed on their logarithms."""
    logs = np.log(np.asarray(units, dtype=float))
    k = len(logs)
    if k < 2:
        raise ValueError("an interval needs at least two independent ratios")
    half = _T975[min(k - 1, len(_T975)) - 1] * logs.std(ddof=1) / np.sqrt(k)
    mean = logs.mean()
    return float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half))


def round_ratio(pair_ratios: Sequence[float]) -> float:
    """A round's ratio: the geometric mean of its pairs'. Pairs of one round share their two
    clusters — whatever makes those instances faster or slower included — so they are not
    independent; rounds are, and the interval is taken over rounds."""
    return float(np.exp(np.mean(np.log(pair_ratios))))


def ratios(first: Sequence[Turn], second: Sequence[Turn], field: str) -> list[float]:
    """Per-pair ratios first/second of a :class:`Turn` field."""
    return [getattr(a, field) / getattr(b, field) for a, b in zip(first, second, strict=True)]


def _interval(mean: float, lo: float, hi: float) -> str:
    return f"{mean:.3f} [{lo:.3f}–{hi:.3f}]"


def verdict(lo: float, hi: float, target: float = TARGET) -> str:
    """Whether the on/off step-rate interval [lo, hi] settles 'at most ``target`` slower'."""
    if lo >= 1 - target:
        return "PASS"
    if hi < 1 - target:
        return "FAIL"
    return "UNSETTLED"


def measure_round(
    name: str, arms: tuple[bool, bool], round_: int, pairs: int, window: float, scrape: float
) -> tuple[list[Turn], list[Turn]]:
    """``pairs`` pairs of turns of two fresh clusters with metrics ``arms`` and the memory
    layout of ``round_``; each arm's turns."""
    fields = WORKLOADS[name]
    turns: tuple[list[Turn], list[Turn]] = ([], [])
    # which cluster starts (and so gets its ports and start-up CPU) first alternates by round
    starts = (0, 1) if round_ % 2 == 0 else (1, 0)
    clusters: dict[int, Cluster] = {}
    with ExitStack() as stack:
        for i in starts:
            label = f"{name} {'on' if arms[i] else 'off'} #{i}"
            clusters[i] = stack.enter_context(
                started(label, fields, arms[i], scrape, layout(round_))
            )
        for cluster in clusters.values():  # warm-up: connections, first evaluations, first scrape
            cluster.turn(1.0)
        for i in range(pairs):
            for arm in (0, 1) if i % 2 == 0 else (1, 0):
                turns[arm].append(clusters[arm].turn(window))
    return turns


def _on_sigterm(*_: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    sys.exit(143)


def report(
    name: str, arms: tuple[bool, bool], rounds: list[tuple[list[Turn], list[Turn]]]
) -> tuple[str, str | None]:
    """One algorithm's row, and its verdict (``None`` for a control)."""
    rate, rate_lo, rate_hi = geometric_ci([round_ratio(ratios(*t, "rate")) for t in rounds])
    cpu = geometric_ci([round_ratio(ratios(*t, "cpu_ms")) for t in rounds])
    judged = verdict(rate_lo, rate_hi) if arms[0] != arms[1] else None
    if judged is not None:
        outcome = f"{judged} (step rate {rate - 1:+.1%})"
    else:
        outcome = "covers 1.0" if rate_lo <= 1 <= rate_hi else "misses 1.0"
    medians = [
        f"{np.median([t.rate for first_second in rounds for t in first_second[arm]]):.0f}"
        for arm in (0, 1)
    ]
    per_round = " ".join(f"{round_ratio(ratios(*t, 'rate')):.3f}" for t in rounds)
    arms_label = "/".join("on" if m else "off" for m in arms)
    row = (
        f"{name:9s} {arms_label:7s} {' / '.join(medians):>21s}"
        f" {_interval(rate, rate_lo, rate_hi):>23s} {_interval(*cpu):>23s}  {outcome};"
        f" rounds {per_round}"
    )
    return row, judged


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=1.0, help="seconds timed per turn")
    parser.add_argument("--rounds", type=int, default=6, help="fresh pairs of clusters")
    parser.add_argument("--pairs", type=int, default=30, help="on/off turn pairs per round")
    parser.add_argument(
        "--scrape", type=float, default=5.0, help="scrape interval (s); 5: configs/prometheus.yml"
    )
    parser.add_argument(
        "--layout-seed", type=int, default=0, help="round r gets memory layout seed + r"
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 10 pairs")
    parser.add_argument("--control", action="store_true", help="also off/off, as a check")
    parser.add_argument("--algorithms", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    args = parser.parse_args()
    # Paused daemons ignore SIGTERM until resumed: on SIGTERM, unwind so that every cluster is
    # killed with SIGKILL on the way out (as on Ctrl-C) instead of being left paused.
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.quick:
        args.rounds, args.pairs = 2, 10
    if args.rounds < 2 or args.pairs < 2 or args.window <= 0 or args.scrape <= 0:
        parser.error("--rounds and --pairs must be at least 2, --window and --scrape positive")
    print(
        f"metrics cost: pairs of clusters of {DAEMONS} daemon processes × {WORKERS} workers"
        f" taking turns of {args.window:g} s; {args.rounds} rounds × {args.pairs} pairs; scrape"
        f" every {args.scrape:g} s; ASLR {'off' if PREFIX else 'ON (no working setarch -R)'};"
        f" layout seed {args.layout_seed}; load average {os.getloadavg()[0]:.2f}"
    )
    print("ratios first/second arm: geometric mean of the rounds' [95 % t interval over rounds]")
    print(
        f"{'algorithm':9s} {'arms':7s} {'gradients/s (median)':>21s} {'step rate ratio':>23s}"
        f" {'CPU/gradient ratio':>23s}  verdict"
    )
    plans = [(name, (True, False)) for name in args.algorithms]
    if args.control:
        plans += [(name, (False, False)) for name in args.algorithms]
    passed = True
    for name, arms in plans:
        rounds = []
        for r in range(args.rounds):
            try:
                turns = measure_round(
                    name, arms, args.layout_seed + r, args.pairs, args.window, args.scrape
                )
            except (RuntimeError, OSError) as exc:
                print(f"bench_metrics: {name}: {exc}", file=sys.stderr)
                return 2
            rounds.append(turns)
            print(
                f"  {name} {'/'.join('on' if m else 'off' for m in arms)} round"
                f" {r + 1}/{args.rounds}: step rate ratio"
                f" {_interval(*geometric_ci(ratios(*turns, 'rate')))} (interval over its pairs)",
                file=sys.stderr,
                flush=True,
            )
        row, judged = report(name, arms, rounds)
        passed &= judged in (None, "PASS")
        print(row, flush=True)
    print(f"{'PASS' if passed else 'NOT PASSED'}: target step rate with metrics ≥ 95 % of without")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
