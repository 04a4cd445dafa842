"""The simulator's ``restart`` fault: a process loses everything and rejoins from the live
process furthest ahead through the algorithm's resume entry point (peerlearn/sim/core.py).

The property tests restart random processes at random iterations or times, under random
schedules, and assert what must hold in every execution: every process finishes its T
iterations (no deadlock), a restarted process never goes back, the run is a function of its
seed, and the paper's deterministic bounds hold across the rejoin — for Alg 1 with σ = 0 on the
quadratic, every model lies in the bounding box of the fault-free trajectory's last few iterates
(the rejoined model is one a live process held); for Alg 2, Lemma 19's per-round contraction and
the convexity of MAA's outputs (docs/papers.md), as the crash tests assert them.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from peerlearn.algorithms.registry import REGISTRY
from peerlearn.cli import app
from peerlearn.effects import (
    Await,
    Broadcast,
    Collect,
    Count,
    Effect,
    Grad,
    Program,
    Report,
    Vector,
    Write,
)
from peerlearn.errors import ConfigError, CrashSpecError
from peerlearn.faults import parse_crash
from peerlearn.membership import Membership
from peerlearn.sim import Restart, SimResult, Simulator, Status, run_simulation
from peerlearn.sim.core import Partition
from peerlearn.sim.output import summary
from peerlearn.sim.trace import contraction_ratios, rounds_by

from .helpers import cfg

EPS = 1e-12

#: a restart point: (process, "t" or "time", iteration or virtual time)
Point = tuple[int, str, float]


def _spec(members: Membership, point: Point) -> str:
    pid, when, at = point
    at_text = str(int(at)) if when == "t" else f"{at:.3f}"
    return f"process:{members.name(pid)}@{when}={at_text}:restart"


def _points(n: int, steps: int) -> st.SearchStrategy[list[Point]]:
    at_step = st.tuples(st.integers(0, n - 1), st.just("t"), st.integers(1, steps).map(float))
    at_time = st.tuples(st.integers(0, n - 1), st.just("time"), st.floats(0.0, 2.0 * steps))
    return st.lists(st.one_of(at_step, at_time), min_size=1, max_size=2)


def _run(over: dict[str, Any], points: list[Point]) -> SimResult:
    members = Membership(over["processes"], over["clusters"])
    crashes = [_spec(members, p) for p in points]
    return run_simulation(cfg(**over, sim={"crashes": crashes}), record_reports=("model",))


def _check_liveness(res: SimResult, points: list[Point]) -> list[Restart]:
    """Every process finished its T iterations, each restart resumed at or after the iteration
    it was in, and the restarts fired where the specs said."""
    steps = res.config.steps
    assert steps is not None
    assert res.status is Status.FINISHED, res.outcome
    assert [p.steps_done for p in res.processes] == [steps] * res.config.processes
    finals = {pid for pid, rep in res.reports if rep.step == steps + 1}
    assert finals == set(range(res.config.processes))  # T + 1 final reports: nobody is stuck
    restarts = list(res.outcome.restarts)
    for r in restarts:
        assert r.resumed_at is not None and r.source is not None and r.source_step is not None
        assert r.source != r.name
        assert r.resumed_at >= r.step  # it never goes back
        # s, or s + 1 when messages of iteration s were out; further only past its own messages
        assert r.source_step <= r.resumed_at <= max(r.source_step, r.step) + 1
    # A restart at t=K fires when the process reports K (or, had an earlier restart taken it
    # past K, the iteration it resumed at)
    for pid, when, at in points:
        if when == "t":
            assert any(r.pid == pid and r.step >= at for r in restarts), (pid, at, restarts)
    return restarts


ALG1: dict[str, Any] = {
    "algorithm": "alg1",
    "processes": 6,
    "clusters": 3,
    "steps": 14,
    "problem": {"name": "quadratic", "sigma": 0.0},
}


def _trajectory(steps: int) -> list[Vector]:
    """z_1..z_{T+1}: the fault-free Alg 1 iterates with σ = 0, which every process shares."""
    res = run_simulation(cfg(**{**ALG1, "steps": steps}), record_reports=("model",))
    return [rep.value for pid, rep in res.reports if pid == 0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), points=_points(6, 14))
def test_alg1_rejoins_inside_the_fault_free_trajectory(seed: int, points: list[Point]) -> None:
    """With σ = 0 the gradient step is an affine contraction F and every process's model is z_t
    until a restart. A process resuming at r with x_s of another holds a point of z's hull that
    lags by r − s; F maps conv{z_{t−L}..z_t} onto conv{z_{t−L+1}..z_{t+1}} and averaging stays
    in the hull, so with L = Σ (r − s) over the restarts every model of iteration t lies in
    conv{z_{t−L}..z_t} — asserted through its bounding box. A rejoin from x_1 or from a
    process far behind leaves it."""
    over = {**ALG1, "seed": seed}
    res = _run(over, points)
    lag = 0
    for r in _check_liveness(res, points):
        assert r.resumed_at is not None and r.source_step is not None
        lag += r.resumed_at - r.source_step
    z = np.stack(_trajectory(ALG1["steps"]))
    tol = 1e-9 * (1.0 + float(np.abs(z).max()))  # the means of equal vectors round
    for pid, rep in res.reports:
        t = rep.step
        window = z[max(t - 1 - lag, 0) : t]
        assert np.all(rep.value >= window.min(axis=0) - tol), (pid, t, lag)
        assert np.all(rep.value <= window.max(axis=0) + tol), (pid, t, lag)
    again = _run(over, points)
    assert again.outcome == res.outcome
    for a, b in zip(res.processes, again.processes, strict=True):
        assert a.x is not None and b.x is not None and a.x.tobytes() == b.x.tobytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), points=_points(6, 14))
def test_alg1_with_noise_finishes_after_restarts(seed: int, points: list[Point]) -> None:
    """With noise, models differ between processes (so does what each takes when it rejoins):
    the run still finishes, deterministically."""
    over = {**ALG1, "seed": seed, "problem": {"name": "quadratic"}}
    res = _run(over, points)
    _check_liveness(res, points)
    assert _run(over, points).outcome == res.outcome


ASYNC_GOSSIP: dict[str, Any] = {
    "algorithm": "async_gossip",
    "processes": 4,
    "clusters": 4,
    "steps": 12,
    "problem": {"name": "quadratic"},
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), points=_points(4, 12))
# restarted twice, the second time after a neighbour finished: blocked for good without Done
@example(seed=1547, points=[(2, "t", 9.0), (2, "t", 9.0)])
# restarts after the others finished: the source's answers after Done are of no iteration, so
# the restarted process resumes at T + 1, not T + 2 (it did one iteration too many)
@example(seed=7177, points=[(2, "time", 29.14), (1, "time", 28.31)])
def test_async_gossip_finishes_after_restarts(seed: int, points: list[Point]) -> None:
    """AD-PSGD: a restarted process tells its neighbours; one waiting for its answer to a
    request the last incarnation took with it gives that exchange up, and a bye it had from it
    is forgotten (said again at the end). Without the note, 24 of 60 such runs block. A
    process may restart after a neighbour finished: the finished one still answers it (Done),
    neutrally, and says its bye again. The run finishes, deterministically."""
    over = {**ASYNC_GOSSIP, "seed": seed}
    res = _run(over, points)
    _check_liveness(res, points)
    assert _run(over, points).outcome == res.outcome


ALG2: dict[str, Any] = {
    "algorithm": "alg2",
    "processes": 6,
    "clusters": 3,
    "steps": 4,
    "trace": True,
    "maa": {"rounds": 3, "inner_rounds": 14},
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), points=_points(6, 4))
def test_alg2_agreement_bounds_hold_across_restarts(seed: int, points: list[Point]) -> None:
    """Alg 2: Lemma 19 (diam² shrinks by 23/24 per cluster round, over every value computed in
    the round, those of a process that restarted in the middle included) and convexity (every
    output of MAA_t lies in the bounding box of the inputs of all processes that started it)
    hold in every instance, the ones a resumed process joined included."""
    res = _run({**ALG2, "seed": seed}, points)
    _check_liveness(res, points)
    groups = rounds_by(res, inner=False)
    for key, before, after in contraction_ratios(groups):
        assert after <= 23 / 24 * before + EPS, (key, before, after)
    rounds, _ = res.config.agreement_rounds()
    for instance in range(1, ALG2["steps"] + 1):
        inputs = np.stack(list(groups[(instance, 1)].values()))
        lo, hi = inputs.min(axis=0), inputs.max(axis=0)
        tol = 1e-12 * (1.0 + float(np.abs(inputs).max()))
        for pid, y in groups[(instance, rounds + 1)].items():
            assert np.all(y >= lo - tol) and np.all(y <= hi + tol), (instance, pid)
    final = groups[(ALG2["steps"], rounds + 1)]
    for p in res.processes:  # x_{T+1} is MAA_T's output for every process that ran it
        if p.pid in final:
            assert p.x is not None and np.array_equal(p.x, final[p.pid])
    again = _run({**ALG2, "seed": seed}, points)
    assert again.outcome == res.outcome
    for a, b in zip(res.processes, again.processes, strict=True):
        assert a.x is not None and b.x is not None and a.x.tobytes() == b.x.tobytes()


# --- the exact semantics, on hand-written programs -------------------------------------------


def _step_then_wait(x: Vector, start: int, need: int) -> Generator[Effect, Any, Vector]:
    """One iteration: report, compute, broadcast ("b", start), wait for ``need`` of them."""
    yield Report("model", x, step=start)
    yield Grad(x)
    yield Broadcast(("b", start), x)
    yield Await(("b", start), Count(need))
    yield Report("model", x, step=start + 1)
    return x


def _sim(
    programs: list[Any],
    resume: Any,
    scale: list[float] | None = None,
    clusters: int = 1,
    partitions: tuple[Partition, ...] = (),
) -> Simulator:
    """Constant times: compute 1, every delivery 0.1: a fixed schedule."""
    n = len(programs)
    return Simulator(
        Membership(n, clusters),
        programs,
        grad=lambda pid, x: x,
        rng=np.random.default_rng(0),
        delay_remote=lambda k: np.full(k, 0.1),
        delay_local=lambda k: np.full(k, 0.1),
        compute=lambda: 1.0,
        read=lambda: 0.01,
        compute_scale=scale,
        partitions=partitions,
        resume=resume,
    )


def test_messages_on_their_way_are_lost_and_a_sent_iteration_is_skipped() -> None:
    """Everyone broadcast ("b", 1) at time 1; process 2 restarts at 1.05, before any of it
    arrives. Its own message still reaches the others (it was sent), so they finish. It rejoins
    from process 0 (all at iteration 1: the lowest pid) at iteration 2 — it had sent its
    iteration-1 message — and, waiting for ("b", 1) once more, gets nothing: what was on its
    way to it is gone."""
    resumed: list[tuple[int, int, Vector]] = []

    def resume(
        pid: int, step: int, model: Vector, key: Any, _ledgers: Any
    ) -> Generator[Effect, Any, None]:
        resumed.append((pid, step, model))
        yield Report("model", model, step=step)
        yield Await(("b", 1), Count(1))

    sim = _sim([_step_then_wait(np.array([float(p)]), 1, 3) for p in range(3)], resume)
    sim.restart_at_time(2, 1.05)
    out = sim.run()
    assert out.restarts == (Restart(2, "0.2", 1.05, 1, 2, "0.0", 1),)
    assert [(pid, step, list(m)) for pid, step, m in resumed] == [(2, 2, [0.0])]
    assert sim.procs[0].finished and sim.procs[1].finished
    assert out.status is Status.BLOCKED
    (b,) = out.blocked
    assert (b.pid, b.tag, b.have) == (2, ("b", 1), 0)


def test_what_it_held_and_what_a_partition_held_for_it_are_lost() -> None:
    """Two clusters cut apart until 5, each process waiting for both ("b", 1): process 0's to
    process 1 is held by the partition, process 1's own reached its mailbox at 1.1. Process 1
    restarts at 2, resumes at 2 and waits for ("b", 1) once more: neither its mailbox nor the
    partition gives it anything, even after the heal — while its own message, held on its way
    to process 0, still arrives there."""

    def resume(
        pid: int, step: int, model: Vector, key: Any, _ledgers: Any
    ) -> Generator[Effect, Any, None]:
        yield Report("model", model, step=step)
        yield Await(("b", 1), Count(1))

    cut = Partition(group_of=(0, 1), start=0.0, end=5.0)
    sim = _sim([_step_then_wait(np.zeros(1), 1, 2) for _ in range(2)], resume, None, 2, (cut,))
    sim.restart_at_time(1, 2.0)
    out = sim.run()
    assert out.restarts == (Restart(1, "1.0", 2.0, 1, 2, "0.0", 1),)
    assert out.status is Status.BLOCKED and out.time >= 5.0
    assert sim.procs[0].finished
    (b,) = out.blocked
    assert (b.pid, b.tag, b.have) == (1, ("b", 1), 0)


def test_a_restart_before_anyone_sent_resumes_at_that_iteration() -> None:
    """At 0.5 everyone computes its first gradient and nothing is out: process 2 resumes at
    iteration 1 itself, its pending gradient is dropped (the old program never runs again), and
    everyone finishes with all three messages."""

    def resume(
        pid: int, step: int, model: Vector, key: Any, _ledgers: Any
    ) -> Generator[Effect, Any, Vector]:
        return (yield from _step_then_wait(model, step, 3))

    sim = _sim([_step_then_wait(np.array([float(p)]), 1, 3) for p in range(3)], resume)
    sim.restart_at_time(2, 0.5)
    out = sim.run()
    assert out.status is Status.FINISHED
    assert out.restarts == (Restart(2, "0.2", 0.5, 1, 1, "0.0", 1),)
    assert sim.procs[2].x is not None and list(sim.procs[2].x) == [0.0]  # process 0's x_1
    # it computed again from 0.5 (the old gradient, due at 1.0, would have fed the new program)
    assert out.time == pytest.approx(0.5 + 1.0 + 0.1)


def test_it_never_resumes_at_an_iteration_it_sent_a_message_of() -> None:
    """Process 2 computes twice as fast: it broadcast ("b", 1) at 0.5, the others are still
    computing at 0.7, when it restarts. Nobody else sent anything of iteration 1, but its own
    message is out — the others will count it — so it resumes at 2, not 1 (a second ("b", 1)
    under its name would be a duplicate sender)."""

    def resume(
        pid: int, step: int, model: Vector, key: Any, _ledgers: Any
    ) -> Generator[Effect, Any, Vector]:
        yield Report("model", model, step=step)
        return model

    sim = _sim(
        [_step_then_wait(np.array([float(p)]), 1, 3) for p in range(3)],
        resume,
        scale=[1.0, 1.0, 0.5],
    )
    sim.restart_at_time(2, 0.7)
    out = sim.run()
    assert out.restarts == (Restart(2, "0.2", 0.7, 1, 2, "0.0", 1),)
    assert out.status is Status.FINISHED  # its ("b", 1) reached the others: they had 3


def test_the_process_furthest_ahead_is_the_source() -> None:
    """Process 0 computes 10× slower than process 1: at time 3.5 process 1 is at iteration 4,
    process 0 still at 1, so the restarted process 2 takes process 1's state, not the lower
    pid's; with a restart at t=K it fires when it reports K."""

    def alone(x: Vector, start: int) -> Generator[Effect, Any, Vector]:
        for t in range(start, 7):
            yield Report("model", x + t, step=t)
            yield Grad(x)
            yield Broadcast(("b", t), x)
            yield Await(("b", t), Count(1))  # its own message: nobody waits for anybody
        yield Report("model", x, step=7)
        return x

    def resume(
        pid: int, step: int, model: Vector, key: Any, _ledgers: Any
    ) -> Generator[Effect, Any, Vector]:
        return (yield from alone(model, step))

    programs = [alone(np.zeros(1), 1) for _ in range(3)]
    sim = _sim(programs, resume, scale=[10.0, 1.0, 1.0])
    sim.restart_at_time(2, 3.5)
    sim.restart_at_step(2, 6)
    out = sim.run()
    assert out.status is Status.FINISHED
    first, second = out.restarts
    # process 1 sends ("b", 4) at 4.3: nothing of iteration 4 was out, so it resumes at 4
    assert (first.source, first.source_step, first.step, first.resumed_at) == ("0.1", 4, 4, 4)
    assert (second.step, second.source, second.resumed_at) == (6, "0.1", 6)


def test_registers_of_skipped_iterations_are_reclaimed() -> None:
    """Process 1 (3× slower) restarts at 3.5 and resumes from the finished process 0 at its end:
    it will never collect the registers of iterations 2 and 3, so they are dropped now rather
    than kept for a read that never comes."""

    def rounds(x: Vector, start: int) -> Generator[Effect, Any, Vector]:
        for t in range(start, 4):
            yield Report("model", x, step=t)
            yield Grad(x)
            yield Write(("k", t), x)
            yield Collect(("k", t))
        yield Report("model", x, step=4)
        return x

    def resume(
        pid: int, step: int, model: Vector, key: Any, _ledgers: Any
    ) -> Generator[Effect, Any, Vector]:
        return (yield from rounds(model, step))

    sim = _sim([rounds(np.zeros(1), 1) for _ in range(2)], resume, scale=[1.0, 3.0])
    sim.restart_at_time(1, 3.5)
    out = sim.run()
    assert out.status is Status.FINISHED
    assert out.restarts == (Restart(1, "0.1", 3.5, 2, 4, "0.0", 4),)
    assert sim._registers == {}


def test_with_nobody_left_it_stays_down() -> None:
    def resume(pid: int, step: int, model: Vector, key: Any, _ledgers: Any) -> Program:
        raise AssertionError("nobody to resume from")

    sim = _sim([_step_then_wait(np.zeros(1), 1, 1) for _ in range(2)], resume)
    sim.crash_at_time(0, 0.2)
    sim.restart_at_time(1, 0.5)
    out = sim.run()
    assert out.restarts == (Restart(1, "0.1", 0.5, 1, None, None, None),)
    assert sim.procs[1].crashed and out.status is Status.FINISHED


# --- specs, config and output ------------------------------------------------------------------


def test_restart_specs_parse() -> None:
    members = Membership(8, 4)
    c = parse_crash("process:3.1@t=5:restart", members)
    assert (c.pids, c.at_step, c.at_time, c.mode) == ((7,), 5, None, "restart")
    c = parse_crash("process:0.0@time=2.5:restart", members)
    assert (c.pids, c.at_step, c.at_time, c.mode) == ((0,), None, 2.5, "restart")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cluster:1@t=3:restart", "restart applies to one process"),
        ("process:1.0@t=3:restrat", "malformed"),
        ("process:1.0@t=3:restart:mid-broadcast", "malformed"),
        ("process:1.0@t=0:restart", "t must be"),
        ("process:1.9@t=2:restart", "no process 1.9"),
    ],
)
def test_bad_restart_specs(spec: str, message: str) -> None:
    with pytest.raises(CrashSpecError, match=message):
        parse_crash(spec, Membership(8, 4))


def test_a_restart_counts_among_the_failures() -> None:
    """A restarted process misses the iterations it skips: f counts it, N = n − f."""
    c = cfg(sim={"crashes": ["process:0.1@t=3:restart", "process:1.0@t=2"]})
    assert (c.failures, c.n_quorum) == (2, 6)
    with pytest.raises(ConfigError, match="kill or restart 1 processes, more than max_failures"):
        cfg(max_failures=0, sim={"crashes": ["process:0.1@t=3:restart"]})


#: algorithms whose record has no resume entry point (more get one over time: read the records)
NO_RESUME = [name for name, spec in REGISTRY.items() if spec.resume is None][:3]
#: lockstep protocols that resume in daemons only (their peers' links replay the last frames)
LOCKSTEP = [name for name, spec in REGISTRY.items() if spec.resume is not None and spec.lockstep]


@pytest.mark.parametrize("algorithm", NO_RESUME)
def test_an_algorithm_without_resume_cannot_take_a_restart(algorithm: str) -> None:
    crash = "process:0.1@t=3:restart"
    with pytest.raises(ConfigError, match=f"{algorithm} cannot rejoin in the simulator: restart"):
        cfg(algorithm=algorithm, sim={"crashes": [crash]})
    res = CliRunner().invoke(app, ["simulate", "-q", "--algorithm", algorithm, "--crash", crash])
    assert res.exit_code == 2, res.output
    assert "restart faults need a resume entry point" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("algorithm", LOCKSTEP)
def test_a_lockstep_protocol_restarts_in_daemons_only(algorithm: str) -> None:
    with pytest.raises(ConfigError, match="last iterations' frames again"):
        cfg(algorithm=algorithm, sim={"crashes": ["process:0.1@t=3:restart"]})


def test_summary_reports_restarts_per_process() -> None:
    res = run_simulation(
        cfg(processes=4, clusters=2, steps=6, sim={"crashes": ["process:1.0@t=3:restart"]})
    )
    data = summary(res)
    (r,) = res.outcome.restarts
    assert data["restarts"] == [
        {
            "process": "1.0",
            "time": r.time,
            "step": 3,
            "resumed_at": r.resumed_at,
            "from": r.source,
            "from_step": r.source_step,
        }
    ]
    rows = {p["id"]: p for p in data["processes"]}
    assert (rows["1.0"]["restarts"], rows["1.0"]["resumed_at"]) == (1, [r.resumed_at])
    assert all(rows[k]["restarts"] == 0 and rows[k]["resumed_at"] == [] for k in rows if k != "1.0")
    assert data["crashed"] == []


def test_simulate_prints_the_restarts() -> None:
    crash = "process:1.0@t=3:restart"
    args = ["simulate", "-q", "-n", "4", "-m", "2", "-T", "6", "--crash", crash]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "restart" in res.output and "1.0 3→" in res.output  # (the header may be cut)


#: algorithms whose runs report staleness (DASGD) and that can rejoin
STALENESS_RESUME = [n for n, spec in REGISTRY.items() if spec.staleness and spec.resume][:1]


@pytest.mark.parametrize("algorithm", STALENESS_RESUME)
def test_loose_staleness_is_not_replayed_across_a_restart(algorithm: str) -> None:
    """Ŝ replays every node's apply log from its first step; a restarted node's log starts
    again where it resumed, so the summary leaves Ŝ out instead of failing on it."""
    crash = "process:1.0@t=3:restart"
    args = ["simulate", "-q", "--algorithm", algorithm, "-n", "4", "-m", "4", "-T", "6"]
    res = CliRunner().invoke(app, [*args, "--crash", crash])
    assert res.exit_code == 0, res.output
    assert "none across a restart" in res.output
