"""The metrics-cost benchmark's statistics, and one short round of it against real daemons (so
that the benchmark cannot rot unnoticed; the figures themselves are in benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_metrics.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_metrics", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_metrics"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_verdict_needs_the_whole_interval_on_one_side(bench: ModuleType) -> None:
    assert bench.verdict(0.95, 1.02) == "PASS"
    assert bench.verdict(0.96, 0.99) == "PASS"
    assert bench.verdict(0.94, 1.01) == "UNSETTLED"
    assert bench.verdict(0.90, 0.949) == "FAIL"


def test_geometric_mean_and_interval_of_constant_ratios(bench: ModuleType) -> None:
    mean, lo, hi = bench.geometric_ci([[0.5, 2.0], [0.5, 2.0]])
    assert mean == pytest.approx(1.0)
    assert lo < 1.0 < hi
    mean, lo, hi = bench.geometric_ci([[0.97] * 5] * 3)
    assert mean == lo == pytest.approx(0.97) and hi == pytest.approx(0.97)


def test_interval_widens_when_rounds_disagree(bench: ModuleType) -> None:
    """Pairs of one round share their clusters: rounds that disagree must widen the interval
    beyond what the same ratios would give as independent pairs."""
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.01, size=(4, 30))
    offsets = np.array([[-0.05], [0.05], [-0.05], [0.05]])
    rounds = np.exp(noise + offsets)
    _, lo_rounds, hi_rounds = bench.geometric_ci(rounds.tolist())
    _, lo_flat, hi_flat = bench.geometric_ci([rounds.ravel().tolist()])
    assert hi_rounds - lo_rounds > 2 * (hi_flat - lo_flat)


def test_interval_covers_the_true_ratio_about_95_percent_of_the_time(bench: ModuleType) -> None:
    rng = np.random.default_rng(2)
    truth, hits, trials = 0.97, 0, 200
    for seed in range(trials):
        ratios = truth * np.exp(rng.normal(0, 0.08, size=(1, 40)))
        _, lo, hi = bench.geometric_ci(ratios.tolist(), seed=seed)
        hits += lo <= truth <= hi
    assert 0.88 * trials <= hits <= trials


def test_one_short_round_against_real_daemons() -> None:
    """Two real clusters take turns; the report has its verdict line whatever the verdict
    (one round of four 0.3 s pairs settles nothing)."""
    run = subprocess.run(
        [sys.executable, str(BENCH), "--rounds", "1", "--pairs", "4", "--window", "0.3"]
        + ["--algorithms", "alg1"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode in (0, 1), run.stderr
    row = next(line for line in run.stdout.splitlines() if line.startswith("alg1"))
    assert "on/off" in row and ("PASS" in row or "UNSETTLED" in row or "FAIL" in row), row
    assert "round 1/1" in run.stderr
