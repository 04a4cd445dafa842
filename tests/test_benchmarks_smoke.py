"""Each benchmark script, run end to end at tiny sizes, so that none rots unnoticed: it must run
to its table without a traceback. The figures mean nothing at these sizes (they are in
benchmarks/RESULTS.md); a miss of a target is a verdict, not a failure here. The metrics
benchmark has its own (tests/test_bench_metrics.py); the checkpoint soak runs for minutes by
design and is run by hand."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BENCHMARKS = ROOT / "benchmarks"

#: script -> (tiny arguments, what its table prints when every row ran)
SMOKE: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "bench_codec.py": (["--sizes", "1000", "--reps", "2"], ("send+receive, pool",)),
    "bench_round.py": (
        [
            *("--cells", "2:1e4:float64", "--extra", "dasgd:2:1e4:float64"),
            *("--window", "1", "--reps", "3", "--skip", "hivemind"),
        ],
        ("alg1 K=2 d=1e4 float64", "dasgd K=2 d=1e4 float64"),
    ),
    "bench_sim.py": (
        ["--quick", "--repeat", "1", "--steps", "2", "--alg2-steps", "1", "--bare-events", "2000"],
        ("alg1 quadratic n=100 m=10 d=10", "alg2 quadratic n=9"),
    ),
    "bench_sim_scale.py": (
        ["--sizes", "30", "60", "--steps", "2", "--dasgd-sizes", "8", "16"],
        ("async_gossip", "sync_gossip ring", "dasgd random-regular:4"),
    ),
    "bench_transport.py": (["--sizes", "64k", "--quick"], ("receiver pool, 0.064 MB",)),
    # three daemons and three gloo ranks to a low bar (about 30 s: the slowest here)
    "bench_torch.py": (["--algorithms", "alg1", "--threshold", "0.2"], ("DDP (gloo)", "alg1")),
}


def test_every_benchmark_has_a_smoke_run() -> None:
    scripts = {p.name for p in BENCHMARKS.glob("bench_*.py")}
    # a benchmark without a smoke run, or a stale entry
    assert scripts - {"bench_metrics.py"} == set(SMOKE)


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_at_tiny_sizes(script: str) -> None:
    args, rows = SMOKE[script]
    if script == "bench_torch.py" and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (make test installs it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), done.stderr  # 1: a target missed, said in the table
    for row in rows:  # every row ran ...
        assert row in done.stdout, done.stdout + done.stderr
    assert "MISS (" not in done.stdout  # ... and finished (a blocked or diverged run says so)
