"""Cluster MAA (Alg 3) over SMMAA (Alg 4) in the simulator, checked against the paper's bounds.

Every bound here is deterministic (docs/papers.md): it holds in every execution, so each run is
asserted on its own, under random per-receiver schedules and crashes — including crashes in the
middle of a broadcast and whole clusters. Each test also checks that schedules really differed
between receivers (docs/papers.md, per-receiver schedules): otherwise contraction would
be trivially exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from peerlearn.algorithms import diam2
from peerlearn.reproduce.attiya_schiller import SCENARIOS
from peerlearn.reproduce.attiya_schiller import maa_run as run_maa
from peerlearn.sim import Status, run_simulation
from peerlearn.sim.trace import contraction_ratios, receive_sets_differ, rounds_by

from .helpers import barycentric, cfg

EPS = 1e-12

# SCENARIOS and run_maa are the reproduction report's (the same runs as its maa-contraction).


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize(
    ("aggregator", "factor"),
    # ApproachExt's many rounds take 8–11 s a case: `make test-slow`; `make test` checks its
    # factors through the quick reproduction (tests/test_reproduce.py, maa-contraction)
    [("midext", 7 / 8), pytest.param("approachext", 31 / 32, marks=pytest.mark.slow)],
)
def test_lemma16_each_smmaa_round_contracts(aggregator: str, factor: float, scenario: str) -> None:
    """Lemma 16: diam²(A_{k+1}) ≤ factor · diam²(A_k), per cluster, every round."""
    for seed in range(2):
        res = run_maa(aggregator, seed, scenario, steps=2)
        checked = 0
        for key, before, after in contraction_ratios(rounds_by(res, inner=True)):
            assert after <= factor * before + EPS, (key, before, after)
            checked += before > 0
        assert checked > 50
        assert receive_sets_differ(res, "collect", "sm")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize(
    ("aggregator", "factor"),
    [("midext", 23 / 24), pytest.param("approachext", 79 / 80, marks=pytest.mark.slow)],
)
def test_lemma19_each_cluster_round_contracts(
    aggregator: str, factor: float, scenario: str
) -> None:
    """Lemma 19 (Lemma 20 for ApproachExt): diam²(x_{r+1}) ≤ factor · diam²(x_r), and the
    output diameter is ≤ q = 1/4 of the input diameter."""
    for seed in range(2):
        res = run_maa(aggregator, seed, scenario, steps=2)
        groups = rounds_by(res, inner=False)
        ratios = contraction_ratios(groups)
        assert any(before > 0 for _, before, _ in ratios)
        for key, before, after in ratios:
            assert after <= factor * before + EPS, (key, before, after)
        rounds, _ = res.config.agreement_rounds()
        for instance in range(1, res.config.steps + 1):
            first = diam2(list(groups[(instance, 1)].values()))
            last = diam2(list(groups[(instance, rounds + 1)].values()))
            assert last <= 0.25 * first + EPS
        assert receive_sets_differ(res, "await", "maa")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_outputs_are_convex_combinations_of_all_started_inputs(scenario: str) -> None:
    """Validity (Section 4.1): every output — and every intermediate value — lies in the convex hull
    of the inputs of *all* processes that started the instance, crashed ones included
    (docs/papers.md, all started inputs). With d = 12 ≥ n the 9 inputs are affinely
    independent, so the barycentric weights are unique and must be non-negative."""
    res = run_maa("midext", 11, scenario, dim=12)
    groups = rounds_by(res, inner=False)
    rounds, _ = res.config.agreement_rounds()
    for instance in range(1, res.config.steps + 1):
        inputs = groups[(instance, 1)]
        pts = np.stack(list(inputs.values()))
        for rnd in (2, rounds // 2, rounds + 1):
            for pid, y in groups[(instance, rnd)].items():
                w, resid = barycentric(pts, y)
                assert resid < 1e-9, (instance, rnd, pid)
                assert w.min() >= -1e-9, (instance, rnd, pid, w)
    assert receive_sets_differ(res, "await", "maa")


def test_two_collects_of_one_round_return_different_subsets() -> None:
    """Register reads are separate events: collects interleave with other processes' writes,
    so two processes of one cluster can see different subsets of the same register array."""
    res = run_maa("midext", 0, "no-crash", steps=2)
    differing = [
        (tag, sets)
        for (kind, tag), sets in res.receive_sets.items()
        if kind == "collect" and len(set(sets.values())) > 1
    ]
    assert differing
    _, sets = differing[0]
    assert all(pid in seen for pid, seen in sets.items())  # own write is always seen (Lemma 16)


def test_only_a_minority_of_clusters_alive_blocks() -> None:
    """Liveness needs ⌊m/2⌋+1 clusters: with 2 of 4 alive, agreement blocks (and says so)."""
    res = run_simulation(
        cfg(
            algorithm="maa",
            processes=8,
            clusters=4,
            steps=2,
            sim={"crashes": ["cluster:2@t=1", "cluster:3@t=1"]},
        )
    )
    assert res.status is Status.BLOCKED
    assert {b.name for b in res.outcome.blocked} == {"0.0", "0.1", "1.0", "1.1"}
    for b in res.outcome.blocked:
        assert b.tag == ("maa", 1, 1)
        assert (b.have, b.need, b.unit) == (2, 3, "clusters")


def test_alg2_rounds_follow_q_t_for_a_decaying_schedule() -> None:
    """q_t = η_t/4 (erratum a): with η_t = β/(γ+t) later iterations need more rounds."""
    from peerlearn.algorithms import Aggregator, maa_rounds

    c = cfg(
        algorithm="alg2",
        processes=4,
        clusters=2,
        steps=6,
        trace=True,
        lr={"schedule": "inverse_time", "beta": 1.0, "gamma": 1.0},
        maa={"inner_rounds": 1},
    )
    res = run_simulation(c)
    assert res.status is Status.FINISHED
    rounds_at = {t: max(r for (i, r) in rounds_by(res, inner=False) if i == t) - 1 for t in (1, 6)}
    eta = c.schedule()
    assert rounds_at == {t: maa_rounds(eta(t) / 4, Aggregator.MIDEXT)[0] for t in (1, 6)}
    assert rounds_at[6] > rounds_at[1]


@pytest.mark.parametrize("aggregator", ["midext", "approachext"])
def test_each_cluster_round_reports_its_spread_and_output(aggregator: str) -> None:
    """`agreement_spread` (what the daemon's contraction histogram reads): one report per
    process, instance and cluster round r, keyed (instance, r), holding the diam² of the values
    received in that round and ‖x‖² of the round's output — the value the process starts round
    r + 1 with (its `agreement` report keyed (instance, r + 1, None))."""
    res = run_simulation(
        cfg(
            algorithm="maa",
            processes=6,
            clusters=3,
            steps=2,
            dim=3,
            maa={"aggregator": aggregator, "rounds": 3},
        ),
        record_reports=("agreement", "agreement_spread"),
    )
    assert res.status is Status.FINISHED, res.outcome
    outputs = {
        (pid, rep.key[0], rep.key[1]): rep.value
        for pid, rep in res.reports
        if rep.name == "agreement" and rep.key[2] is None
    }
    spreads = {
        (pid, *rep.key): rep.value for pid, rep in res.reports if rep.name == "agreement_spread"
    }
    assert set(spreads) == {(p, i, r) for p in range(6) for i in (1, 2) for r in (1, 2, 3)}
    for (pid, instance, r), (spread, norm2) in spreads.items():
        x = outputs[(pid, instance, r + 1)]
        assert spread >= 0.0 and norm2 == float(x @ x)
    assert any(spread > 0 for spread, _ in spreads.values())
