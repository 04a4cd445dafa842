"""Restarts of the elastic family (asynchronous EASGD, EAMSGD): the center rebuilt from its
workers' ledgers, a worker resumed from the center — the programs and the records' resume entry
point, driven by a small seeded scheduler that loses what a real restart loses (the center's
program and inbox, every message on its way to or from the restarted process).

The invariant: once every exchange is done, the center's model is x̃_1 + Σ_i D_i, where D_i is
the sum of the differences worker i applied — and for asynchronous EASGD the conservation law
x̃ + Σ_i x^i = (p + 1)·x_1 − η·Σ g over every gradient the workers applied. A restart that
double-counted or lost an exchange on one side only would break both."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.algorithms.elastic import Variant, answered_requests, elastic_center
from peerlearn.algorithms.registry import lookup
from peerlearn.algorithms.spec import Ledger, RejoinState
from peerlearn.config import RunConfig, load_config
from peerlearn.daemon.rejoin import Rejoin
from peerlearn.effects import Await, Grad, Letter, Msg, Post, Receive, Report, Send, Vector
from peerlearn.membership import Membership
from peerlearn.runs import build_problem
from peerlearn.runtime.mailbox import Mailbox, Waiting
from peerlearn.runtime.worker import WorkerState
from peerlearn.transport.catchup import Missed, StateRequest
from peerlearn.wire import Data
from tests.helpers import exact

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 4, "sigma": 0.0}
CENTER = 0


def config(algorithm: str, workers: int, steps: int, tau: int) -> RunConfig:
    return load_config(
        overrides={
            "algorithm": algorithm,
            "clusters": workers + 1,
            "processes": workers + 1,
            "steps": steps,
            "lr": {"eta": 0.1},
            "elastic": {"tau": tau},
            "problem": QUAD,
        }
    )


@dataclass
class Run:
    """The programs of one run, a seeded schedule, and what a restart loses."""

    cfg: RunConfig
    rng: random.Random
    programs: dict[int, Any] = field(default_factory=dict)
    effect: dict[int, Any] = field(default_factory=dict)
    inbox: list[Letter] = field(default_factory=list)  # the center's
    boxes: dict[int, dict[Any, list[Msg]]] = field(default_factory=dict)  # workers'
    wire: list[tuple[int, Any, int, Vector, bool]] = field(default_factory=list)
    ledgers: dict[int, Report] = field(default_factory=dict)
    center_ledger: Report | None = None
    center_model: Report | None = None
    models: dict[int, Vector] = field(default_factory=dict)
    applied: Vector | None = None  # η·Σ g over the gradients computed
    done: set[int] = field(default_factory=set)

    def start(self, pid: int, program: Any) -> None:
        program = self.programs[pid] = exact(program)
        self.done.discard(pid)
        self.effect[pid] = next(program)
        self.settle(pid)

    def settle(self, pid: int) -> None:
        """Run ``pid`` through effects that need nobody else (reports, gradients, sends)."""
        eta = self.cfg.schedule()(1)
        while pid in self.effect:
            eff = self.effect[pid]
            match eff:
                case Report(name="ledger"):
                    if pid == CENTER:
                        self.center_ledger = eff
                    else:
                        self.ledgers[pid] = eff
                    answer: Any = None
                case Report(name="model"):
                    if pid == CENTER:
                        self.center_model = eff
                    self.models[pid] = eff.value
                    answer = None
                case Grad(x=x):
                    answer = 0.5 * x + 0.01 * pid  # a fixed quadratic, distinct per worker
                    step = eta * answer
                    self.applied = step if self.applied is None else self.applied + step
                case Post(to=to, tag=tag, value=v) | Send(to=to, tag=tag, value=v):
                    for r in to:
                        self.wire.append((r, tag, pid, v, isinstance(eff, Post)))
                    answer = None
                case Await(tag=tag):
                    box = self.boxes.setdefault(pid, {}).get(tag)
                    if not box:
                        return
                    answer = (box.pop(0),)
                case Receive():
                    if not self.inbox:
                        return
                    answer, self.inbox = tuple(self.inbox), []
                case _:
                    raise AssertionError(eff)
            try:
                self.effect[pid] = self.programs[pid].send(answer)
            except StopIteration as stop:
                del self.effect[pid]
                self.done.add(pid)
                self.models[pid] = stop.value

    def step(self) -> bool:
        """Deliver one message on the wire, chosen at random; False once none is left."""
        if not self.wire:
            return False
        r, tag, sender, value, post = self.wire.pop(self.rng.randrange(len(self.wire)))
        if post:
            self.inbox.append(Letter(tag, sender, value))
        else:
            self.boxes.setdefault(r, {}).setdefault(tag, []).append(Msg(sender, value))
        self.settle(r)
        return True

    def lose(self, pid: int) -> None:
        """``pid`` goes down: its program, its inbox and mailbox, and everything on its way to
        or from it are lost."""
        self.programs.pop(pid).close()
        self.effect.pop(pid, None)
        self.wire = [w for w in self.wire if pid not in (w[0], w[2])]
        if pid == CENTER:
            self.inbox = []
            self.center_ledger = self.center_model = None
        else:
            self.boxes.pop(pid, None)
            self.ledgers.pop(pid, None)


def run_with_restart(
    algorithm: str, workers: int, steps: int, tau: int, who: int, after: int, seed: int
) -> Run:
    cfg = config(algorithm, workers, steps, tau)
    problem = build_problem(cfg)
    assert problem is not None
    run = Run(cfg, random.Random(seed))
    pids = list(range(workers + 1))
    for pid, program in zip(pids, cfg.spec.programs(cfg, problem, pids), strict=True):
        run.start(pid, program)
    for _ in range(after):
        run.step()
    resume = cfg.spec.resume
    assert resume is not None
    run.lose(who)
    if who == CENTER:
        # What the workers' daemons answer: each worker's last ledger report.
        ledgers = {
            pid: Ledger(rep.step, int(rep.key[0]) if rep.key else None, rep.value)
            for pid, rep in run.ledgers.items()
        }
        (program,) = resume(cfg, problem, [CENTER], RejoinState(1, problem.x0(), (), ledgers))
    else:
        # What the center's daemon answers: its model, last answered per worker, its sums.
        assert run.center_model is not None and run.center_ledger is not None
        last = dict(zip(pids[1:], run.center_model.key, strict=True))
        total = run.center_ledger.value.get(who, np.zeros(QUAD["dim"]))
        state = RejoinState(
            run.center_model.step,
            run.center_model.value,
            run.center_model.key,
            {who: Ledger(last[who], None, total)},
        )
        (program,) = resume(cfg, problem, [who], state)
    run.start(who, program)
    while run.step():
        pass
    return run


@settings(max_examples=60, deadline=None)
@given(
    variant=st.sampled_from(["async_easgd", "eamsgd"]),
    workers=st.integers(1, 3),
    steps=st.integers(1, 8),
    tau=st.integers(1, 3),
    after=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_a_restarted_center_is_rebuilt_and_the_run_ends_with_the_law_intact(
    variant: str, workers: int, steps: int, tau: int, after: int, seed: int
) -> None:
    run = run_with_restart(variant, workers, steps, tau, CENTER, after, seed)
    # every program ended: no worker waits for an answer the restart lost, the center served
    # exactly the requests it counts
    assert run.done == set(range(workers + 1)), run.effect
    x1 = build_problem(run.cfg).x0()  # type: ignore[union-attr]
    sums = sum((rep.value for rep in run.ledgers.values()), np.zeros_like(x1))
    np.testing.assert_allclose(run.models[CENTER], x1 + sums, rtol=0, atol=1e-9)
    if variant == "async_easgd":
        total = run.models[CENTER] + sum(run.models[p] for p in range(1, workers + 1))
        assert run.applied is not None
        np.testing.assert_allclose(total, (workers + 1) * x1 - run.applied, rtol=0, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    variant=st.sampled_from(["async_easgd", "eamsgd"]),
    workers=st.integers(1, 3),
    steps=st.integers(2, 8),
    tau=st.integers(1, 3),
    after=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_a_restarted_worker_resumes_from_the_center_after_its_last_answer(
    variant: str, workers: int, steps: int, tau: int, after: int, seed: int
) -> None:
    run = run_with_restart(variant, workers, steps, tau, 1, after, seed)
    assert run.done == set(range(workers + 1)), run.effect
    x1 = build_problem(run.cfg).x0()  # type: ignore[union-attr]
    # the resumed worker took over the center's record of its ledger: the law holds
    sums = sum((rep.value for rep in run.ledgers.values()), np.zeros_like(x1))
    np.testing.assert_allclose(run.models[CENTER], x1 + sums, rtol=0, atol=1e-9)


def test_a_resumed_center_answers_lost_requests_neutrally_then_serves_once() -> None:
    """Pending requests get d = 0 first; a request already answered gets d = 0 again and
    changes nothing; new ones are served and counted."""
    x1 = np.zeros(2)
    program = elastic_center(
        Variant.ASYNC,
        x1 + 1.0,
        3,
        0.1,
        0.5,
        0.0,
        workers=(1, 2),
        served=2,
        answered={1: 1, 2: 0},
        given={1: np.ones(2)},
        pending={2: 1},
    )
    program = exact(program)
    ledger = next(program)  # the ledger first, then the model whose key it covers
    assert isinstance(ledger, Report) and ledger.name == "ledger" and set(ledger.value) == {1}
    first = program.send(None)
    assert isinstance(first, Report) and first.step == 3 and first.key == (1, 0)
    pending = program.send(None)
    assert isinstance(pending, Send) and pending.to == (2,) and pending.tag == ("rep", 1)
    assert not pending.value.any()
    assert isinstance(program.send(None), Receive)
    again = program.send((Letter(("req", 1), 2, np.full(2, 9.0)),))
    assert isinstance(again, Send) and not again.value.any()  # answered already: neutral
    assert isinstance(program.send(None), Receive)
    served = program.send((Letter(("req", 2), 2, np.full(2, 3.0)),))
    assert isinstance(served, Send)
    np.testing.assert_array_equal(served.value, [1.0, 1.0])  # α(x − x̃) = 0.5·(3 − 1)
    ledger = program.send(None)
    assert isinstance(ledger, Report) and ledger.name == "ledger"
    np.testing.assert_array_equal(ledger.value[2], [1.0, 1.0])
    model = program.send(None)
    assert isinstance(model, Report) and model.key == (1, 2) and model.step == 4
    with pytest.raises(StopIteration):
        program.send(None)


@pytest.mark.parametrize("algorithm", ["downpour", "mdownpour"])
def test_a_center_without_ledgers_cannot_be_rebuilt(algorithm: str) -> None:
    cfg = config(algorithm, 2, 4, 1)
    resume = cfg.spec.resume
    assert resume is not None
    with pytest.raises(ValueError, match="cannot be rebuilt from its workers"):
        resume(cfg, build_problem(cfg), [CENTER], RejoinState(1, np.zeros(4)))


@pytest.mark.parametrize(
    ("algorithm", "tau", "last", "served"),
    [
        ("downpour", 2, (3, 7), 2 + 4),  # requests at 1, 3, 5, 7: up to 3 two, up to 7 four
        ("downpour", 3, (11, 0), 4 + 1 + 0),  # T = 10: 1, 4, 7, 10 and the flush at 11
        ("mdownpour", 3, (5, 10), 5 + 10),  # every iteration (τ does not apply)
    ],
)
def test_a_center_resumed_from_its_checkpoint_counts_what_its_record_answered(
    algorithm: str, tau: int, last: tuple[int, int], served: int
) -> None:
    """DOWNPOUR's and MDOWNPOUR's center from its own checkpoint: its model, and as served the
    requests its record (the last answered per worker) covers — not the count it saved, which
    falls short once it resumed while its workers ran on; a record no worker can hold (past
    the flush) is refused."""
    cfg = config(algorithm, 2, 10, tau)
    resume = cfg.spec.resume
    assert resume is not None
    model = np.full(4, 3.0)
    state = RejoinState(1, model, last, own=True)  # a count of 0 saved: not what is used
    [center] = resume(cfg, build_problem(cfg), [CENTER], state)
    report = next(center)
    assert (report.name, report.step, report.key) == ("model", served + 1, last)
    assert np.array_equal(report.value, model)
    with pytest.raises(ValueError, match="ledger"):
        resume(cfg, build_problem(cfg), [CENTER], RejoinState(1, model, (12, 0), own=True))


def test_answered_requests_counts_one_per_tau_from_iteration_one() -> None:
    assert [answered_requests(t, 3) for t in range(0, 9)] == [0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert lookup("async_easgd").resume is not None and lookup("maa").resume is None


def test_synchronous_easgd_resumes_at_the_exchange_its_peers_wait_in() -> None:
    """Lockstep: a worker resumed at iteration 5 (τ = 2) sends its value of that exchange and
    waits for the center's; a center resumed at 5 serves exchanges 5, 7, … — tagged with the
    workers' iteration, so both sides name the same exchange — and a center resumed between
    exchanges starts at the next one."""
    cfg = config("easgd", 2, 8, 2)
    resume = cfg.spec.resume
    assert resume is not None and cfg.spec.lockstep
    model = np.full(4, 2.0)
    worker, center = map(exact, resume(cfg, build_problem(cfg), [1, 0], RejoinState(5, model)))
    report, send, wait = next(worker), worker.send(None), worker.send(None)
    assert (report.name, report.step) == ("model", 5)
    assert isinstance(send, Send) and send.tag == ("x", 5) and send.to == (CENTER,)
    np.testing.assert_array_equal(send.value, model)
    assert isinstance(wait, Await) and wait.tag == ("center", 5)
    report, send, wait = next(center), center.send(None), center.send(None)
    assert report.step == 5 and send.tag == ("center", 5) and send.to == (1, 2)
    np.testing.assert_array_equal(send.value, model)  # the peer's model, not x̃_1
    assert isinstance(wait, Await) and wait.tag == ("x", 5)
    (between,) = resume(cfg, build_problem(cfg), [0], RejoinState(6, model))
    assert next(between).step == 7


# --- the daemon's side: the ledgers a restarted center is rebuilt from --------------------------


class _Worker(SimpleNamespace):
    """The parts of a runtime Worker that Rejoin reads (state, ledger, mailbox) and calls."""

    def rejoin(self, step: int, program: Any) -> None:
        self.taken = (step, program)


class _Transport:
    def __init__(self) -> None:
        self.asked: list[int] = []
        self.sent: list[tuple[Any, ...]] = []
        self.lost: list[tuple[int, int]] = []

    def lose_to(self, cluster: int, step: int) -> None:
        self.lost.append((cluster, step))

    def request_state(self, cluster: int, restart: bool) -> None:
        self.asked.append(cluster)

    def send_state(self, cluster: int, tag: Any, sender: int, step: int, value: Vector) -> bool:
        self.sent.append((cluster, tag, sender, value))
        return True

    def connected_clusters(self) -> set[int]:
        return {1, 2}


def _frame(sender: int, tag: tuple[Any, ...], value: Vector) -> Data:
    return Data(seq=1, tag=tag, sender=sender, step=0, value=value, to=())


async def test_a_restarted_centers_daemon_gathers_every_ledger_then_rebuilds_it() -> None:
    cfg = config("async_easgd", 2, 40, 1)  # center 0, workers 1 and 2: one daemon each
    center = _Worker(pid=0, name="0.0", state=WorkerState.CREATED, done=threading.Event())
    rejoin = Rejoin(cfg, build_problem(cfg), Membership.of_sizes([1, 1, 1]), [center])  # type: ignore[list-item]
    transport = _Transport()
    rejoin.attach(transport)  # type: ignore[arg-type]
    rejoin.on_note(1, Missed(3))
    rejoin.on_note(2, Missed(3))
    assert sorted(transport.asked) == [1, 2] and rejoin.gathering() == [1, 2]
    rejoin.on_state(_frame(1, ("ledger", 1, 10, 11), np.full(4, 0.5)))
    assert rejoin.gathering() == [2] and not hasattr(center, "taken")
    rejoin.on_state(_frame(2, ("ledger", 2, 7, 0), np.full(4, 0.25)))
    assert rejoin.gathering() == [] and rejoin.rejoins == 1
    program = exact(center.taken[1])
    ledger, model = next(program), program.send(None)
    assert set(ledger.value) == {1, 2}
    x1 = build_problem(cfg).x0()  # type: ignore[union-attr]
    np.testing.assert_array_equal(model.value, x1 + 0.75)
    assert model.key == (11, 7) and model.step == 11 + 7 + 1  # served: 11 and 7 requests
    pending = program.send(None)
    assert isinstance(pending, Send) and pending.tag == ("rep", 11) and not pending.value.any()


def test_a_worker_daemon_with_no_ledger_yet_answers_a_zero_one_in_the_runs_dtype() -> None:
    # Its worker has reported no ledger yet (it is starting too): the answer is the empty
    # ledger — in the run's dtype, or the center's daemon refuses the frame (bad_data).
    cfg = config("async_easgd", 1, 40, 1).model_copy(update={"dtype": "float32"})
    worker = _Worker(
        pid=1, name="1.0", state=WorkerState.CREATED, done=threading.Event(), live=True, ledger=None
    )
    rejoin = Rejoin(cfg, build_problem(cfg), Membership.of_sizes([1, 1]), [worker])  # type: ignore[list-item]
    transport = _Transport()
    rejoin.attach(transport)  # type: ignore[arg-type]
    rejoin.on_note(0, StateRequest(restart=True))  # the center's daemon restarted and asks
    ((cluster, tag, _, value),) = transport.sent
    assert cluster == 0 and tag[:2] == ("ledger", 1)
    assert value.dtype == np.float32 and not value.any()


@pytest.mark.parametrize(
    "tag",
    [
        ("ledger", 2, 10**9, 0),  # answered past the run's last request
        ("ledger", 2, 5, 5),  # waiting on what was answered
        ("ledger", 2, 5, 9),  # waiting on a request that is not its next
    ],
)
async def test_a_ledger_no_worker_of_the_run_can_hold_is_refused(tag: tuple[Any, ...]) -> None:
    """A hostile or broken peer cannot make the rebuilt center count requests nobody sent
    (it would end early, and every worker would wait for good): the center is not rebuilt,
    and the daemon says why."""
    cfg = config("async_easgd", 2, 40, 1)
    center = _Worker(pid=0, name="0.0", state=WorkerState.CREATED, done=threading.Event())
    rejoin = Rejoin(cfg, build_problem(cfg), Membership.of_sizes([1, 1, 1]), [center])  # type: ignore[list-item]
    rejoin.attach(_Transport())  # type: ignore[arg-type]
    rejoin.on_note(1, Missed(3))
    rejoin.on_note(2, Missed(3))
    rejoin.on_state(_frame(1, ("ledger", 1, 10, 11), np.full(4, 0.5)))
    rejoin.on_state(_frame(2, tag, np.full(4, 0.25)))
    assert not hasattr(center, "taken") and rejoin.rejoins == 0


def test_a_worker_answer_already_in_its_mailbox_counts_in_its_ledger() -> None:
    """The old center's answer to the request a worker waits on may have arrived while the
    worker computes its gradient: the worker will apply it, so its ledger must include it."""
    cfg = config("async_easgd", 1, 40, 1)  # center 0 on daemon 0, worker 1 on daemon 1
    mailbox = Mailbox((0, 1), 2)
    d = np.full(4, 0.125)
    worker = _Worker(
        pid=1,
        name="1.0",
        state=WorkerState.RUNNING,
        done=threading.Event(),
        live=True,
        mailbox=mailbox,
        ledger=(4, np.full(4, 1.0), (5,)),  # answered 4, about to wait on 5
    )
    rejoin = Rejoin(cfg, build_problem(cfg), Membership.of_sizes([1, 1]), [worker])  # type: ignore[list-item]
    assert rejoin._ledger_of(worker) == Ledger(4, 5, worker.ledger[1])  # type: ignore[arg-type]
    mailbox.put(("rep", 5), Msg(0, d))
    got = rejoin._ledger_of(worker)  # type: ignore[arg-type]
    assert got is not None and (got.answered, got.waiting) == (5, None)
    np.testing.assert_array_equal(got.total, np.full(4, 1.125))


def test_a_downpour_worker_resumed_after_its_flush_ends_without_posting() -> None:
    cfg = config("downpour", 1, 4, 1)
    resume = cfg.spec.resume
    assert resume is not None
    state = RejoinState(9, np.ones(4), (5,), {1: Ledger(5, None, np.zeros(4))})
    (program,) = resume(cfg, build_problem(cfg), [1], state)
    final = next(program)
    assert isinstance(final, Report) and final.name == "model"
    with pytest.raises(StopIteration):
        program.send(None)


# --- late ledgers: a worker's daemon away while the center was rebuilt ---------------------------


def run_with_late_ledgers(
    variant: str, workers: int, steps: int, tau: int, after: int, late: int, delay: int, seed: int
) -> Run:
    """The center restarts after ``after`` deliveries and is rebuilt without the ledgers of
    workers ``1..late``; ``delay`` deliveries later each of them arrives, as the daemon joins
    it: a ``("ledger", w, answered, waiting)`` letter in the center's inbox with the worker's
    ledger as it is then."""
    cfg = config(variant, workers, steps, tau)
    problem = build_problem(cfg)
    assert problem is not None
    run = Run(cfg, random.Random(seed))
    pids = list(range(workers + 1))
    for pid, program in zip(pids, cfg.spec.programs(cfg, problem, pids), strict=True):
        run.start(pid, program)
    for _ in range(after):
        run.step()
    resume = cfg.spec.resume
    assert resume is not None
    run.lose(CENTER)

    def ledger_of(pid: int) -> Ledger:
        rep = run.ledgers[pid]
        return Ledger(rep.step, int(rep.key[0]) if rep.key else None, rep.value)

    on_time = {pid: ledger_of(pid) for pid in run.ledgers if pid > late}
    (program,) = resume(cfg, problem, [CENTER], RejoinState(1, problem.x0(), (), on_time))
    run.start(CENTER, program)
    for _ in range(delay):
        run.step()
    for pid in range(1, late + 1):
        lg = ledger_of(pid)
        run.inbox.append(Letter(("ledger", pid, lg.answered, lg.waiting or 0), pid, lg.total))
        run.settle(CENTER)
    while run.step():
        pass
    return run


@settings(max_examples=60, deadline=None)
@given(
    variant=st.sampled_from(["async_easgd", "eamsgd"]),
    workers=st.integers(1, 3),
    steps=st.integers(1, 8),
    tau=st.integers(1, 3),
    after=st.integers(0, 40),
    late=st.integers(1, 3),
    delay=st.integers(0, 20),
    seed=st.integers(0, 2**16),
)
def test_a_late_ledger_joins_the_rebuilt_center_and_the_run_ends_with_the_law_intact(
    variant: str,
    workers: int,
    steps: int,
    tau: int,
    after: int,
    late: int,
    delay: int,
    seed: int,
) -> None:
    """Whatever the late workers sent meanwhile (held by the center until their ledger
    came), every program ends and the center is x̃_1 + Σ_i D_i."""
    late = min(late, workers)
    run = run_with_late_ledgers(variant, workers, steps, tau, after, late, delay, seed)
    assert run.done == set(range(workers + 1)), run.effect
    x1 = build_problem(run.cfg).x0()  # type: ignore[union-attr]
    sums = sum((rep.value for rep in run.ledgers.values()), np.zeros_like(x1))
    np.testing.assert_allclose(run.models[CENTER], x1 + sums, rtol=0, atol=1e-9)
    if variant == "async_easgd":
        total = run.models[CENTER] + sum(run.models[p] for p in range(1, workers + 1))
        assert run.applied is not None
        np.testing.assert_allclose(total, (workers + 1) * x1 - run.applied, rtol=0, atol=1e-9)


def test_a_rebuilt_center_holds_a_late_workers_request_until_its_ledger_comes() -> None:
    x1 = np.zeros(2)
    program = elastic_center(
        Variant.ASYNC,
        x1 + 1.0,  # x̃_1 + D_1, worker 2's ledger missing
        6,
        0.1,
        0.5,
        0.0,
        workers=(1, 2),
        served=1,
        answered={1: 1},
        given={1: np.ones(2)},
        tau=1,
    )
    program = exact(program)
    next(program), program.send(None)  # its ledger and model reports
    assert isinstance(program.send(None), Receive)
    # worker 2 asks before its ledger came: held, nothing answered
    assert isinstance(program.send((Letter(("req", 3), 2, np.full(2, 5.0)),)), Receive)
    # its ledger: answered 2 requests (D = 2), waiting on 3 — the held one, served for real
    ledger = program.send((Letter(("ledger", 2, 2, 3), 2, np.full(2, 2.0)),))
    assert isinstance(ledger, Report) and ledger.name == "ledger"
    np.testing.assert_array_equal(ledger.value[2], [2.0, 2.0])
    model = program.send(None)
    assert model.step == 1 + 2 + 1 and model.key == (1, 2)
    np.testing.assert_array_equal(model.value, [3.0, 3.0])  # x̃_1 + D_1 + D_2
    served = program.send(None)
    assert isinstance(served, Send) and served.tag == ("rep", 3)
    np.testing.assert_array_equal(served.value, [1.0, 1.0])  # α(x − x̃) = 0.5·(5 − 3)
    # a second ledger of worker 2 (a duplicate) adds nothing
    assert isinstance(program.send(None), Report)  # the ledger after serving 3
    assert isinstance(program.send(None), Report)  # the model
    assert isinstance(program.send(None), Receive)
    assert isinstance(program.send((Letter(("ledger", 2, 2, 0), 2, np.full(2, 9.0)),)), Receive)
    served = program.send((Letter(("req", 5), 1, np.full(2, 4.0)),))
    assert isinstance(served, Send)  # x̃ is still 4 after serving 3: nothing of the 9s was added
    np.testing.assert_array_equal(served.value, [0.0, 0.0])


def test_a_worker_restarted_with_the_center_is_no_ledger_it_waits_for() -> None:
    """On the center's own daemon a worker restarts with the center and starts over: the
    rebuilt center must serve its requests at once, not hold them for a ledger nobody sends."""
    cfg = config("async_easgd", 2, 8, 1)  # center 0, workers 1 (another daemon) and 2 (local)
    problem = build_problem(cfg)
    resume = cfg.spec.resume
    assert resume is not None and problem is not None
    state = RejoinState(1, problem.x0(), (), {1: Ledger(3, None, np.full(4, 0.5))})
    center = exact(resume(cfg, problem, [0, 2], state)[0])
    next(center), center.send(None)  # ledger, model
    assert isinstance(center.send(None), Receive)
    served = center.send((Letter(("req", 1), 2, problem.x0() + 1.0),))
    assert isinstance(served, Send) and served.to == (2,) and served.tag == ("rep", 1)
    assert served.value.any()  # a real pull, not held, not neutral


class _Delivery:
    def __init__(self) -> None:
        self.letters: list[tuple[Any, ...]] = []

    def deliver_to(self, pids: Any, tag: Any, sender: int, value: Vector, post: bool) -> None:
        self.letters.append((tuple(pids), tag, sender, post))


async def test_a_centers_daemon_joins_a_ledger_that_comes_after_the_rebuild() -> None:
    """Daemon 2 does not answer in time: the center is rebuilt without it, /status keeps
    naming it, and its ledger — once checked — goes into the center's inbox when it comes."""
    cfg = config("async_easgd", 2, 40, 1)
    center = _Worker(pid=0, name="0.0", state=WorkerState.CREATED, done=threading.Event())
    rejoin = Rejoin(cfg, build_problem(cfg), Membership.of_sizes([1, 1, 1]), [center])  # type: ignore[list-item]
    transport = _Transport()
    rejoin.attach(transport)  # type: ignore[arg-type]
    delivery = _Delivery()
    rejoin.deliver_with(delivery)  # type: ignore[arg-type]
    rejoin.on_note(1, Missed(3))
    rejoin.on_note(2, Missed(3))
    rejoin.on_state(_frame(1, ("ledger", 1, 10, 11), np.full(4, 0.5)))
    rejoin._gather_since = -1e9  # the gathering timed out
    rejoin.consider()
    assert rejoin.rejoins == 1 and rejoin.gathering() == [2]
    rejoin.on_state(_frame(2, ("ledger", 2, 5, 9), np.full(4, 0.25)))  # no worker can hold it
    assert delivery.letters == [] and rejoin.gathering() == [2]
    rejoin.on_state(_frame(2, ("ledger", 2, 7, 8), np.full(4, 0.25)))
    assert delivery.letters == [((0,), ("ledger", 2, 7, 8), 2, True)]
    assert rejoin.gathering() == []
    # an answer to a request made again: counted once, quietly
    rejoin.on_state(_frame(2, ("ledger", 2, 7, 8), np.full(4, 0.25)))
    rejoin.on_state(_frame(1, ("ledger", 1, 10, 11), np.full(4, 0.5)))
    assert len(delivery.letters) == 1 and rejoin._ignored == 1  # the refused one only


async def test_a_centers_daemon_asks_a_late_daemon_again_while_it_is_connected() -> None:
    cfg = config("async_easgd", 3, 40, 1)  # center 0; workers 1, 2, 3 on daemons 1, 2, 3
    center = _Worker(pid=0, name="0.0", state=WorkerState.CREATED, done=threading.Event())
    rejoin = Rejoin(cfg, build_problem(cfg), Membership.of_sizes([1, 1, 1, 1]), [center])  # type: ignore[list-item]
    transport = _Transport()  # connected: daemons 1 and 2
    rejoin.attach(transport)  # type: ignore[arg-type]
    rejoin.deliver_with(_Delivery())  # type: ignore[arg-type]
    for peer in (1, 2, 3):
        rejoin.on_note(peer, Missed(3))
    rejoin.on_state(_frame(1, ("ledger", 1, 10, 11), np.full(4, 0.5)))
    rejoin._gather_since = -1e9  # the gathering timed out: 2 and 3 are late
    rejoin.consider()
    assert rejoin.rejoins == 1 and rejoin.gathering() == [2, 3]
    transport.asked.clear()
    rejoin.consider()
    assert transport.asked == []  # not again before REQUEST_TIMEOUT
    rejoin._late_asked = -1e9
    rejoin.consider()
    assert transport.asked == [2]  # the connected one of the late: 3 is not connected


# --- synchronous EASGD: lockstep rejoin with a peer away ------------------------------------------


class _Waits:
    """A mailbox whose worker has waited on ``tag`` since ``since``."""

    def __init__(self, tag: Any, since: float) -> None:
        self._wait = Waiting(tag, 0, 1, "processes", since)

    def waiting(self) -> Waiting:
        return self._wait


async def test_a_lockstep_daemon_takes_the_state_of_a_peer_that_noted_after_its_start() -> None:
    """Daemon 2 (worker 2.0) restarted while the center's daemon was away: its worker started
    over at iteration 1 and waits on the center's frame of it, which will never come. When the
    center's daemon is back and says it dropped frames up to 477 for it, daemon 2 asks it for
    its state (it used to wait for good, silently)."""
    cfg = config("easgd", 2, 4000, 3)
    worker = _Worker(
        pid=2,
        name="2.0",
        state=WorkerState.RUNNING,
        done=threading.Event(),
        step=1,
        mailbox=_Waits(("center", 1), time.monotonic() - 5.0),
    )
    rejoin = Rejoin(cfg, build_problem(cfg), Membership.of_sizes([1, 1, 1]), [worker])  # type: ignore[list-item]
    transport = _Transport()
    rejoin.attach(transport)  # type: ignore[arg-type]
    rejoin.on_note(0, Missed(477))
    assert transport.asked == [0]


async def test_a_restarted_lockstep_center_tells_a_late_worker_daemon_what_never_comes() -> None:
    """The center's daemon restarted while daemon 2 was cut off: it resumes at 415 from daemon
    1's state. Daemon 2's worker may wait for a frame of an earlier exchange the last
    incarnation owed it: it is told that frames up to 415 are lost (it asks for a state when it
    is back, and the answer resumes it at 415, the first iteration this incarnation sends it —
    not 414, which with τ = 1 it would wait for in vain); daemon 1, which noted in time, is
    told nothing."""
    cfg = config("easgd", 2, 4000, 3)
    center = _Worker(pid=0, name="0.0", state=WorkerState.CREATED, done=threading.Event(), step=0)
    rejoin = Rejoin(cfg, build_problem(cfg), Membership.of_sizes([1, 1, 1]), [center])  # type: ignore[list-item]
    transport = _Transport()
    rejoin.attach(transport)  # type: ignore[arg-type]
    rejoin.on_note(1, Missed(415))
    assert transport.asked == [1]
    rejoin.on_state(_frame(1, ("state", 415), np.full(4, 0.5)))
    assert rejoin.rejoins == 1 and center.taken[0] == 415
    assert transport.lost == [(2, 415)]
