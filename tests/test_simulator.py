"""The simulator's semantics: determinism, liveness statuses, crashes, partitions, quorums."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import pytest

from peerlearn.effects import AtLeast, Await, Broadcast, Count, Effect, Exchange, Report
from peerlearn.membership import Membership
from peerlearn.reproduce.attiya_schiller import alg1_across_cut, alg2_across_cut
from peerlearn.sim import Simulator, Status, run_simulation

from .helpers import cfg


def test_same_seed_gives_bit_identical_results() -> None:
    over: dict[str, Any] = {
        "algorithm": "alg2",
        "processes": 6,
        "clusters": 3,
        "steps": 4,
        "sim": {"crashes": ["process:1.1@t=3:mid-broadcast"], "stragglers": 1},
    }
    a, b = run_simulation(cfg(**over)), run_simulation(cfg(**over))
    assert a.outcome == b.outcome
    assert a.samples == b.samples
    for pa, pb in zip(a.processes, b.processes, strict=True):
        assert pa.x is not None and pb.x is not None
        assert pa.x.tobytes() == pb.x.tobytes()
    c = run_simulation(cfg(**{**over, "seed": 1}))
    assert c.outcome.time != a.outcome.time


def _broadcast_then_wait_for_all(n: int) -> Generator[Effect, Any, None]:
    x = np.zeros(1)
    yield Report("model", x, step=1)
    yield Broadcast(("b", 1), x)
    yield Await(("b", 1), Count(n))


def _sim(n: int, m: int, programs: list[Any], seed: int = 0) -> Simulator:
    rng = np.random.default_rng(seed)
    return Simulator(
        Membership(n, m),
        programs,
        grad=lambda pid, x: x,
        rng=rng,
        delay_remote=lambda k: rng.exponential(1.0, k),
        delay_local=lambda k: rng.exponential(0.1, k),
        compute=lambda: 1.0,
        read=lambda: 0.01,
    )


@pytest.mark.parametrize("seed", range(5))
def test_crash_mid_broadcast_reaches_some_recipients_only(seed: int) -> None:
    """Each process waits for a message from every process. The one that crashes in the middle
    of its broadcast reached a strict, non-empty subset: those finish, the rest block."""
    n = 6
    sim = _sim(n, 2, [_broadcast_then_wait_for_all(n) for _ in range(n)], seed)
    sim.crash_at_step(0, 1, mid_broadcast=True)
    out = sim.run()
    assert out.status is Status.BLOCKED
    assert sim.procs[0].crashed
    blocked = {b.pid for b in out.blocked}
    finished = {p.pid for p in sim.procs if p.finished}
    assert blocked and finished  # some got it, others not (the sender counts itself)
    assert blocked | finished == set(range(1, n))
    for b in out.blocked:
        assert (b.have, b.need, b.unit) == (n - 1, n, "processes")


def test_quiescence_is_detected_without_any_timeout() -> None:
    """A process waiting for more senders than exist blocks; the run still ends."""

    def greedy() -> Generator[Effect, Any, None]:
        yield Exchange(("x", 1), np.zeros(2), AtLeast(5))

    out = _sim(3, 1, [greedy() for _ in range(3)]).run()
    assert out.status is Status.BLOCKED
    assert [(b.have, b.need) for b in out.blocked] == [(3, 5)] * 3
    assert out.blocked[0].tag == ("x", 1)


def test_a_raising_program_fails_the_run() -> None:
    def broken() -> Generator[Effect, Any, None]:
        yield Report("model", np.zeros(1), step=1)
        raise RuntimeError("boom")

    out = _sim(2, 1, [broken(), broken()]).run()
    assert out.status is Status.FAILED
    assert out.error is not None and "boom" in out.error


def test_alg1_averages_exactly_the_first_n() -> None:
    """With σ = 0 and a common start, Alg 1 stays identical across processes; with noise and
    N < n the receive sets differ, so the models do too (docs/papers.md, per-receiver schedules)."""
    base: dict[str, Any] = {"algorithm": "alg1", "processes": 6, "clusters": 3, "steps": 30}
    exact = run_simulation(cfg(**base, problem={"name": "quadratic", "sigma": 0.0}))
    assert exact.max_pairwise_distance < 1e-24
    res = run_simulation(cfg(**base, quorum=3), record_receives=True)
    assert res.status is Status.FINISHED
    sizes = {len(s) for (_, tag), sets in res.receive_sets.items() for s in sets.values()}
    assert sizes == {3}
    assert any(len(set(sets.values())) > 1 for sets in res.receive_sets.values())
    assert max(cd for *_, cd in res.samples) > 0  # models differed along the way


def test_late_messages_are_dropped_and_counted() -> None:
    res = run_simulation(cfg(algorithm="alg1", processes=6, clusters=2, quorum=2, steps=5))
    # each of 6 processes receives 6 messages per step and uses 2: 4 per step arrive late
    # or are left in the mailbox of a finished tag
    assert res.outcome.dropped_late > 0
    assert res.outcome.deliveries == 6 * 6 * 5


@pytest.mark.parametrize(("dead", "status"), [(1, Status.FINISHED), (2, Status.BLOCKED)])
def test_alg2_needs_a_majority_of_clusters(dead: int, status: Status) -> None:
    """Alg 2 with ⌊m/2⌋ = 2 of 4 clusters alive blocks in agreement; with 3 it finishes."""
    crashes = [f"cluster:{c}@t=2" for c in range(4 - dead, 4)]
    res = run_simulation(
        cfg(
            algorithm="alg2",
            processes=8,
            clusters=4,
            steps=3,
            maa={"rounds": 3, "inner_rounds": 2},
            sim={"crashes": crashes},
        )
    )
    assert res.status is status
    assert {p.name for p in res.processes if p.crashed} == {
        f"{c}.{i}" for c in range(4 - dead, 4) for i in range(2)
    }
    if status is Status.BLOCKED:
        assert len(res.outcome.blocked) == 4
        for b in res.outcome.blocked:
            assert b.tag == ("maa", 2, 1) and (b.have, b.need, b.unit) == (2, 3, "clusters")
    else:
        assert all(p.steps_done == 3 for p in res.live())


def test_crash_at_step_stops_after_completed_iterations() -> None:
    res = run_simulation(
        cfg(
            algorithm="alg1",
            processes=4,
            clusters=2,
            steps=10,
            sim={"crashes": ["process:1.1@t=4"]},
        )
    )
    by_name = {p.name: p for p in res.processes}
    assert by_name["1.1"].crashed and by_name["1.1"].steps_done == 3
    assert all(p.steps_done == 10 for p in res.live())


def test_theorem5_partition_demo() -> None:
    """Thm 5 on the double well: with the clusters cut into two halves for good, Alg 1
    (N = a half's size) converges inside each half — to opposite wells in some runs, so there
    is no internal convergence — while Alg 2 reports `blocked` instead of diverging."""
    gaps = []
    for seed in range(8):
        res = run_simulation(alg1_across_cut(seed))
        assert res.status is Status.FINISHED
        halves = [[p.x for p in res.processes if p.cluster in g] for g in ([0, 1], [2, 3])]
        for half in halves:  # agreement inside each half, at a well
            assert max(abs(float(x[0]) - float(half[0][0])) for x in half) < 0.05
            assert abs(abs(float(half[0][0])) - 0.9575) < 0.1
        gaps.append((float(halves[0][0][0]) - float(halves[1][0][0])) ** 2)
    assert max(gaps) > 3.0  # some run ended in opposite wells: no internal convergence
    blocked = run_simulation(alg2_across_cut(0))
    assert blocked.status is Status.BLOCKED
    assert all(b.unit == "clusters" and b.have == 2 for b in blocked.outcome.blocked)


def test_partition_that_heals_delivers_held_messages() -> None:
    res = run_simulation(
        cfg(
            algorithm="alg2",
            processes=4,
            clusters=2,
            steps=2,
            maa={"rounds": 2, "inner_rounds": 1},
            sim={"partitions": [{"groups": [[0], [1]], "start": 0.0, "end": 20.0}]},
        )
    )
    assert res.status is Status.FINISHED
    assert res.outcome.time > 20.0  # nothing crossed before the heal


def test_samples_are_in_time_order_and_end_with_the_run() -> None:
    res = run_simulation(cfg(algorithm="alg1", processes=4, clusters=2, steps=12))
    times = [s[0] for s in res.samples]
    assert times == sorted(times)
    assert times[-1] == res.outcome.time
    assert max(times) <= res.outcome.time


def test_link_factors_are_the_matrix_the_schedule_stream_would_draw() -> None:
    """Per-link delay factors are derived a row or an entry at a time (O(n) memory at 10,000
    processes, not 800 MB), yet each is exactly the draw the n × n matrix held, and the stream
    goes on after the matrix: every other draw of a run is unchanged."""
    from peerlearn.sim.core import LinkFactors
    from peerlearn.streams import Purpose, stream

    n, spread = 9, 0.5
    matrix_stream = stream(3, Purpose.SCHEDULE)
    matrix = matrix_stream.uniform(1 - spread, 1 + spread, (n, n))
    factors_stream = stream(3, Purpose.SCHEDULE)
    link = LinkFactors(factors_stream, n, spread)
    assert factors_stream.random() == matrix_stream.random()  # past the matrix, both
    for sender in range(n):
        assert link.row(sender).tolist() == matrix[sender].tolist()
        assert [link(sender, r) for r in range(n)] == matrix[sender].tolist()
    # asked again (remembered, or derived again once the memory of 8·n links is full): the same
    again = [link(s, r) for s in reversed(range(n)) for r in range(n)]
    assert again == matrix[::-1].ravel().tolist()
    # a stream with half a 32-bit draw buffered goes on with the other half, as after the matrix
    matrix_stream, factors_stream = stream(4, Purpose.SCHEDULE), stream(4, Purpose.SCHEDULE)
    for s in (matrix_stream, factors_stream):
        s.integers(0, 2**32, dtype=np.uint32)
    matrix_stream.uniform(1 - spread, 1 + spread, (n, n))
    LinkFactors(factors_stream, n, spread)
    assert factors_stream.integers(0, 2**32, dtype=np.uint32) == matrix_stream.integers(
        0, 2**32, dtype=np.uint32
    )
    with pytest.raises(TypeError, match="PCG64"):
        LinkFactors(np.random.Generator(np.random.MT19937(1)), n, spread)


def test_reports_can_be_kept_for_some_processes_only() -> None:
    """``report_pids`` keeps those processes' reports, the same ones an unfiltered run keeps
    for them (a run of 10⁴ workers need not hold every worker's models)."""
    over = {"algorithm": "easgd", "processes": 5, "clusters": 1, "steps": 6}
    every = run_simulation(cfg(**over), record_reports=("model",))
    center = every.config.center
    some = run_simulation(cfg(**over), record_reports=("model",), report_pids=(center,))
    assert {pid for pid, _ in every.reports} == set(range(5))
    kept = [(pid, rep.step) for pid, rep in some.reports]
    assert kept and kept == [(pid, rep.step) for pid, rep in every.reports if pid == center]
