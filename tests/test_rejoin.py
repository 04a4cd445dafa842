"""Catching up (peerlearn/daemon/rejoin.py): a daemon whose peers dropped messages it needs
takes a live peer's state and resumes there — real daemons on 127.0.0.1, and the pieces it is
built from (the catch-up notes, a worker switching programs mid-wait)."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from typing import Any

import numpy as np
import pytest

from peerlearn.algorithms.registry import lookup
from peerlearn.algorithms.schedules import Constant
from peerlearn.algorithms.sgd import alg1
from peerlearn.algorithms.spec import RejoinState
from peerlearn.config import load_config
from peerlearn.daemon.node import DaemonState
from peerlearn.daemon.rejoin import STUCK, Rejoin
from peerlearn.effects import Count, Effect, Exchange, Msg, Report, Vector
from peerlearn.runs import build_problem
from peerlearn.runtime.mailbox import Mailbox, Waiting
from peerlearn.runtime.store import RegisterStore
from peerlearn.runtime.worker import Worker, WorkerState
from peerlearn.testing import local_cluster
from peerlearn.transport import catchup
from peerlearn.wire import Control, Data

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 10, "sigma": 1.0}


# --- the notes -------------------------------------------------------------------------------


def test_catchup_notes_round_trip_and_bad_ones_are_named() -> None:
    assert catchup.parse(catchup.Missed(41).control()) == catchup.Missed(41)
    assert catchup.parse(catchup.StateRequest().control()) == catchup.StateRequest()
    for bad, words in [
        (Control(name="missed", body={}), "upto"),
        (Control(name="missed", body={"upto": -1}), "upto"),
        (Control(name="missed", body={"upto": True}), "upto"),
        (Control(name="missed", body={"upto": 1.5}), "upto"),
        (Control(name="takeover", body={}), "unknown control message 'takeover'"),
    ]:
        with pytest.raises(catchup.CatchupError, match=words):
            catchup.parse(bad)


# --- a worker switching programs -------------------------------------------------------------


class _Router:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def broadcast(self, sender: int, tag: Any, value: Vector, step: int) -> None:
        self.sent.append(tag)

    def send(self, *args: Any) -> None:
        raise AssertionError("not used")


def _waiter(marks: list[str]) -> Generator[Effect, Any, str]:
    yield Report("model", np.zeros(2), step=3)
    got = yield Exchange(("params", 3), np.zeros(2), Count(2))
    marks.append(f"old got {len(got)}")
    return "old"


def _resumed(step: int, marks: list[str]) -> Generator[Effect, Any, str]:
    yield Report("model", np.ones(2), step=step)
    marks.append("resumed")
    return "new"


def _worker(program: Generator[Effect, Any, str]) -> tuple[Worker, Mailbox, _Router]:
    mailbox = Mailbox((0, 1), 2)
    router = _Router()
    worker = Worker(
        0,
        "0.0",
        program,
        lambda x, rng: x,
        np.random.default_rng(0),
        mailbox,
        RegisterStore((0,)),
        router,
    )
    return worker, mailbox, router


def _wait_until_waiting(mailbox: Mailbox) -> None:
    ready = threading.Event()
    for _ in range(2000):
        if mailbox.waiting() is not None:
            return
        ready.wait(0.005)  # the worker thread reaches its wait: no event to wait on there
    raise AssertionError("the worker never waited")


def test_a_waiting_worker_takes_a_resumed_program_at_once() -> None:
    marks: list[str] = []
    worker, mailbox, _ = _worker(_waiter(marks))
    worker.start()
    _wait_until_waiting(mailbox)
    worker.rejoin(9, _resumed(9, marks))
    assert worker.join(10)
    assert worker.state is WorkerState.FINISHED
    assert worker.output == "new" and marks == ["resumed"]
    assert worker.step == 9 and worker.position[0] == 9 and worker.rejoins == 1
    assert worker.x is not None and worker.x.tolist() == [1.0, 1.0]


def test_a_resumed_program_not_ahead_is_declined_and_the_wait_goes_on() -> None:
    """A hand-over that is not ahead of the worker (it got there by itself) is closed unused;
    the interrupted wait resumes without sending its value again."""
    marks: list[str] = []
    worker, mailbox, router = _worker(_waiter(marks))
    worker.start()
    _wait_until_waiting(mailbox)
    worker.rejoin(3, _resumed(3, marks))
    _wait_until_waiting(mailbox)  # back in the same wait
    mailbox.put(("params", 3), Msg(0, np.zeros(2)))
    mailbox.put(("params", 3), Msg(1, np.zeros(2)))
    assert worker.join(10)
    assert worker.output == "old" and marks == ["old got 2"] and worker.rejoins == 0
    assert router.sent == [("params", 3)]  # broadcast once


def test_resume_entry_points_start_where_the_state_says() -> None:
    """Alg 1 and Alg 2 resumed at iteration r from a model report that model at r first."""
    for name in ("alg1", "alg2"):
        cfg = load_config(
            overrides={
                "algorithm": name,
                "clusters": 2,
                "processes": 2,
                "steps": 20,
                "problem": QUAD,
            }
        )
        resume = lookup(name).resume
        assert resume is not None
        model = np.full(10, 0.25)
        (program,) = resume(cfg, None, [0], RejoinState(7, model))
        first = next(program)
        assert isinstance(first, Report) and first.step == 7
        assert first.value is model
    # past the last iteration, a resumed program only reports its final model
    done = alg1(np.zeros(2), 5, 1, Constant(0.1), start=6)
    last = next(done)
    assert isinstance(last, Report) and last.step == 6
    with pytest.raises(StopIteration):
        next(done)


# --- daemons ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["alg1", "alg2"])
async def test_a_daemon_started_late_catches_up_from_a_peers_state(algorithm: str) -> None:
    """Three daemons, one worker each, N = 2: two start and run; the third starts once they
    have dropped frames for it (away past peer_timeout, their windows full). They tell it, it
    asks for state, and it resumes where they are instead of waiting at iteration 1 for frames
    that are gone (after the ones they had queued for it)."""
    async with local_cluster(
        3,
        workers=1,
        start=False,
        algorithm=algorithm,
        steps=None,
        quorum=2,
        problem=QUAD,
        peer_timeout=0.5,
    ) as cluster:
        early, late = cluster.daemons[:2], cluster.daemons[2]
        for d in early:
            await d.start()
        # Frames for it fill their windows (256 frames), then are dropped: remembered.
        await cluster.wait_for(lambda: all(d.links[-1].lost_upto is not None for d in early))
        await late.start()
        ahead = max(w.completed for d in early for w in d.workers)
        # (Under load Alg 2's iterations are slow — many agreement rounds each — and `ahead`
        # may be within what the queued frames cover: it gets there first, and catches up
        # when it reaches the dropped ones.)
        await cluster.wait_for(lambda: late.rejoin.rejoins >= 1, timeout=30)
        await cluster.wait_for(lambda: late.workers[0].completed >= ahead, timeout=30)
        last = late.rejoin.last
        assert last is not None and last.resumed_at > max(last.was, ahead - 5)
        status = (await cluster.client(2).get("/status")).json()
        assert status["catchup"]["rejoins"] >= 1
        assert status["catchup"]["last"]["resumed_at"] == last.resumed_at
        assert late.state is DaemonState.RUNNING


class _Waiter:
    """A worker as the catch-up sees it: at ``step``, waiting there on a peer's frame for a
    while (longer than STUCK); taking a resumed program moves it to the resume iteration."""

    def __init__(self) -> None:
        self.pid, self.name, self.step = 0, "0.0", 5
        self.state, self.done, self.live = WorkerState.RUNNING, threading.Event(), True
        self.mailbox = self

    def waiting(self) -> Waiting:
        return Waiting(("params", self.step), 1, 2, "processes", time.monotonic() - 10 * STUCK)

    def rejoin(self, step: int, program: Any) -> None:
        self.step = step


class _Asks:
    """The transport as the catch-up uses it: records the state requests."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def request_state(self, cluster: int, restart: bool) -> None:
        self.asked.append(cluster)

    def lose_all(self, step: int) -> None:
        pass

    def connected_clusters(self) -> set[int]:
        return {1}


async def test_a_drop_noted_while_the_answer_was_on_its_way_is_still_caught_up() -> None:
    # On a link, notes go before queued frames: a peer that dropped a later iteration while its
    # state answer was queued says so before the answer arrives. That drop is not covered by
    # the state: when the worker gets there, it asks again instead of waiting for good.
    cfg = load_config(
        overrides={
            "algorithm": "alg1",
            "clusters": 2,
            "processes": 2,
            "steps": None,
            "problem": {"name": "quadratic", "dim": 4},
        }
    )
    worker, transport = _Waiter(), _Asks()
    rejoin = Rejoin(cfg, build_problem(cfg), cfg.membership, [worker])  # type: ignore[list-item]
    rejoin.attach(transport)  # type: ignore[arg-type]
    rejoin.on_note(1, catchup.Missed(10))  # the worker at 5 needs what was dropped
    assert transport.asked == [1]
    rejoin.on_note(1, catchup.Missed(25))  # overtook the answer
    rejoin.on_state(Data(seq=1, tag=("state", 20), sender=1, step=20, value=np.zeros(4)))
    assert worker.step == 20 and rejoin.rejoins == 1
    worker.step = 25  # it got there: peer 1's frame of 25 never comes
    rejoin.consider()
    assert transport.asked == [1, 1]
