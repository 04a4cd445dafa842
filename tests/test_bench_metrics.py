"""The metrics-cost benchmark's statistics, and one short round of it against real daemons (so
that the benchmark cannot rot unnoticed; the figures themselves are in benchmarks/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.helpers import load_benchmark

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_metrics.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_metrics")


def test_verdict_needs_the_whole_interval_on_one_side(bench: ModuleType) -> None:
    assert bench.verdict(0.95, 1.02) == "PASS"
    assert bench.verdict(0.96, 0.99) == "PASS"
    assert bench.verdict(0.94, 1.01) == "UNSETTLED"
    assert bench.verdict(0.90, 0.949) == "FAIL"


def test_geometric_mean_and_interval(bench: ModuleType) -> None:
    mean, lo, hi = bench.geometric_ci([0.5, 2.0])
    assert mean == pytest.approx(1.0)
    # t(1) = 12.706: log-spread ln 2 · √2 / √2 · 12.706
    assert np.log(hi) == pytest.approx(12.706 * np.log(2.0), rel=1e-3)
    assert lo == pytest.approx(1 / hi)
    mean, lo, hi = bench.geometric_ci([0.97] * 5)
    assert (mean, lo, hi) == pytest.approx((0.97, 0.97, 0.97))
    with pytest.raises(ValueError):
        bench.geometric_ci([0.97])


def test_a_round_is_one_unit_whatever_its_pairs(bench: ModuleType) -> None:
    """Rounds that disagree give a wide interval however many pairs each has: pairs of one
    round share their clusters and are not independent evidence."""
    rng = np.random.default_rng(1)
    offsets = [-0.05, 0.05, -0.05, 0.05]
    rounds = [np.exp(off + rng.normal(0, 0.01, size=30)) for off in offsets]
    _, lo, hi = bench.geometric_ci([bench.round_ratio(r) for r in rounds])
    _, lo_pairs, hi_pairs = bench.geometric_ci(np.concatenate(rounds))
    assert hi - lo > 3 * (hi_pairs - lo_pairs)
    assert lo < 0.95 < hi  # such a measurement settles nothing


def test_interval_covers_the_true_ratio_about_95_percent_of_the_time(bench: ModuleType) -> None:
    """Five rounds of 30 pairs, each round with an effect of its own (±3 %) on top of the
    pairs' noise (±8 %): the interval over rounds must cover the truth about 95 % of the time
    — neither much less (too narrow: a false PASS) nor always (too wide to settle anything)."""
    rng = np.random.default_rng(2)
    truth, hits, trials = 0.97, 0, 1000
    for _ in range(trials):
        effects = rng.normal(0, 0.03, size=(5, 1))
        pairs = truth * np.exp(effects + rng.normal(0, 0.08, size=(5, 30)))
        _, lo, hi = bench.geometric_ci([bench.round_ratio(r) for r in pairs])
        hits += lo <= truth <= hi
    assert 0.92 * trials <= hits <= 0.98 * trials


def test_verdict_of_a_report(bench: ModuleType) -> None:
    turn = bench.Turn
    on = [turn(990.0, 1.0)] * 3
    off = [turn(1000.0, 1.0)] * 3
    slightly = [(on, off), ([turn(985.0, 1.0)] * 3, off)]
    row, judged = bench.report("alg1", (True, False), slightly)
    assert judged == "PASS" and "PASS (step rate -1.3%)" in row, row
    slow = [([turn(900.0, 1.0)] * 3, off), ([turn(901.0, 1.0)] * 3, off)]
    assert bench.report("alg1", (True, False), slow)[1] == "FAIL"
    assert "covers 1.0" in bench.report("alg1", (False, False), slightly)[0]
    control_row, judged = bench.report("alg1", (False, False), slow)
    assert judged is None and "misses 1.0" in control_row


@pytest.mark.slow
def test_two_short_rounds_against_real_daemons() -> None:
    """Two real clusters take turns; the report has its verdict line whatever the verdict
    (two rounds of two 0.3 s pairs settle nothing). About 20 s: with the slow tests."""
    args = ["--rounds", "2", "--pairs", "2", "--window", "0.3", "--algorithms", "alg1"]
    run = subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode in (0, 1), run.stderr  # 2: the benchmark itself failed
    row = next((line for line in run.stdout.splitlines() if line.startswith("alg1")), None)
    assert row is not None, run.stdout + run.stderr
    assert "on/off" in row and ("PASS" in row or "UNSETTLED" in row or "FAIL" in row), row
    assert "round 2/2" in run.stderr
