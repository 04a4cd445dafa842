"""The runtime's pieces at their edges: tests written for the survivors of a mutmut run over
``peerlearn/runtime/`` (docs/testing.md, "Surviving mutants").

Each test pins one contract a surviving mutant broke without any other test noticing: the
mailbox's and the register store's bookkeeping (what is buffered, late, reclaimed), what
:class:`Delivery` reports and counts, what a worker records about itself and how it ends,
and the in-process runtime's ``wait``/``stop``. Real threads; waits on events, never sleeps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.effects import (
    AtLeast,
    Await,
    Broadcast,
    Collect,
    Count,
    Divergence,
    Exchange,
    Grad,
    Letter,
    MajorityOfClusters,
    Msg,
    Post,
    Receive,
    Report,
    Send,
    Tag,
    Write,
)
from peerlearn.runtime.delivery import Delivery, share
from peerlearn.runtime.local import LocalRouter, ThreadRun
from peerlearn.runtime.mailbox import Mailbox, MailboxClosed, Put
from peerlearn.runtime.store import RegisterStore
from peerlearn.runtime.worker import LIVE_STATES, Worker, WorkerState

from .helpers import cfg

TIMEOUT = 30.0  # upper bound on waits for events, never a sleep


def v(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float64)


def wait_for_state(reached: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Until another thread reached a state no event announces (a waiter parked): look again
    every millisecond, fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not reached():
        if time.monotonic() > deadline:
            raise AssertionError(f"state not reached within {timeout} s")
        time.sleep(0.001)


# --- register store ---------------------------------------------------------------------------


def test_store_counts_writes_and_reads_by_position() -> None:
    store = RegisterStore([4, 7, 9])
    assert store.members == (4, 7, 9) and store.writes == 0 and len(store) == 0
    a, b = v(1.0), v(2.0)
    store.write(9, ("sm", 1, 1, 1), a)
    store.write(4, ("sm", 1, 1, 1), b)  # the second writer of a key joins the same array
    store.write(7, ("sm", 2, 1, 1), v(3.0))
    assert store.writes == 3 and len(store) == 2
    assert store.read(("sm", 1, 1, 1), 0) == Msg(4, b)
    assert store.read(("sm", 1, 1, 1), 1) is None
    got = store.read(("sm", 1, 1, 1), 2)
    assert got is not None and got.sender == 9 and got.value is a
    assert store.read(("sm", 3, 1, 1), 0) is None  # no array at all


def test_store_reclaims_strictly_earlier_instances_and_counts_them() -> None:
    store = RegisterStore([0, 1])
    for t in (0, 1, 2, 3):
        store.write(0, ("sm", t, 1, 1), v(float(t)))
    store.write(0, ("x",), v(9.0))  # no instance: never reclaimed
    store.write(0, ("y", "a"), v(9.0))  # a non-integer instance: never reclaimed
    store.write(0, ("r", 0), v(9.0))  # a short key still has its instance
    store.advance(0, 1)
    store.advance(1, 1)  # everyone at iteration 1: instance 0 goes
    assert len(store) == 5 and store.reclaimed == 2
    assert store.read(("sm", 0, 1, 1), 0) is None and store.read(("sm", 1, 1, 1), 0) is not None
    assert store.read(("r", 0), 0) is None
    store.advance(1, 3)
    store.advance(0, 3)
    assert store.reclaimed == 4 and store.read(("sm", 3, 1, 1), 0) is not None
    assert store.reclaim(4) == 1 and store.reclaimed == 5  # an explicit reclaim counts too
    store.retire(0)
    store.retire(1)  # every member gone: nothing to reclaim for, and no error
    assert len(store) == 2 and store.read(("x",), 0) is not None
    assert store.read(("y", "a"), 0) is not None


_STORE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 2), st.integers(0, 5)),
        st.tuples(st.just("advance"), st.integers(0, 2), st.integers(0, 2)),
        st.tuples(st.just("retire"), st.integers(0, 2), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(_STORE_OPS)
def test_store_keeps_exactly_the_instances_some_live_member_may_still_read(
    ops: list[tuple[str, int, int]],
) -> None:
    """Model: an array of instance t is dropped once every member not retired has reached an
    iteration > t (the lowest such iteration only rises); writes are once per key."""
    store = RegisterStore([10, 11, 12])
    steps = [0.0, 0.0, 0.0]
    low = 0.0
    arrays: dict[int, set[int]] = {}
    reclaimed = 0
    retired = [False, False, False]
    for op, who, arg in ops:
        if op == "write":
            if who not in arrays.get(arg, set()):  # a second write is refused (tested above)
                store.write(10 + who, ("sm", arg, 1, 1), v(float(arg)))
                arrays.setdefault(arg, set()).add(who)
        elif not retired[who]:
            if op == "advance":
                steps[who] += arg
                store.advance(10 + who, int(steps[who]))
            else:
                retired[who] = True
                steps[who] = float("inf")
                store.retire(10 + who)
            m = min(steps)
            if low < m < float("inf"):
                low = m
                dead = [t for t in arrays if t < low]
                reclaimed += len(dead)
                for t in dead:
                    del arrays[t]
        assert len(store) == len(arrays) and store.reclaimed == reclaimed
        for t in range(6):
            for who2 in range(3):
                got = store.read(("sm", t, 1, 1), who2)
                assert (got is not None) == (who2 in arrays.get(t, set()))


# --- mailboxes --------------------------------------------------------------------------------

CLUSTER_OF = (0, 1, 2, 0, 1, 2)


def test_the_default_buffer_cap_is_100_000_messages() -> None:
    box = Mailbox(CLUSTER_OF, 3)
    letter = Letter(("q",), 0, v(0.0))
    for _ in range(99_999):
        box.post(letter)
    assert box.put(("p", 1), Msg(0, letter.value)) is Put.STORED  # the 100,000th
    assert box.buffered == 100_000
    assert box.put(("p", 2), Msg(0, letter.value)) is Put.OVERFLOW
    assert box.post(letter) is Put.OVERFLOW


def test_inbox_letters_count_towards_the_cap_and_leave_it_when_received() -> None:
    box = Mailbox(CLUSTER_OF, 3, max_buffered=3)
    letters = [Letter(("req", i), i, v(float(i))) for i in range(4)]
    assert [box.post(letter) for letter in letters[:2]] == [Put.STORED, Put.STORED]
    assert box.buffered == 2
    assert box.put(("p", 1), Msg(0, v(0.0))) is Put.STORED
    assert box.post(letters[2]) is Put.OVERFLOW and box.buffered == 3
    assert box.receive(block=False) == tuple(letters[:2])  # arrival order, the whole inbox
    assert box.buffered == 1
    assert box.receive(block=False) == ()  # empty: no wait without ``block``
    assert box.post(letters[2]) is Put.STORED and box.post(letters[3]) is Put.STORED
    assert box.post(letters[0]) is Put.OVERFLOW
    assert box.buffered == 3


def test_a_blocking_receive_waits_for_a_letter_and_says_so() -> None:
    box = Mailbox(CLUSTER_OF, 3)
    got: list[tuple[Letter, ...]] = []
    before = time.monotonic()
    t = threading.Thread(target=lambda: got.append(box.receive(block=True)))
    t.start()
    wait_for_state(lambda: box.waiting() is not None)
    w = box.waiting()
    assert w is not None
    assert (w.tag, w.have, w.need, w.unit) == (("inbox",), 0, 1, "messages")
    assert before <= w.since <= time.monotonic()
    letter = Letter(("req", 1), 2, v(1.0))
    assert box.post(letter) is Put.STORED
    t.join(TIMEOUT)
    assert got == [(letter,)] and box.waiting() is None and box.buffered == 0


def test_close_wakes_a_blocking_receive() -> None:
    box = Mailbox(CLUSTER_OF, 3)
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            box.receive(block=True)
        except MailboxClosed as exc:
            errors.append(exc)

    t = threading.Thread(target=receive)
    t.start()
    wait_for_state(lambda: box.waiting() is not None)
    box.close()
    t.join(TIMEOUT)
    assert len(errors) == 1 and box.waiting() is None
    assert box.post(Letter(("q",), 0, v(0.0))) is Put.STORED  # later posts are still accepted


@pytest.mark.parametrize(
    ("quorum", "need"), [(Count(3), 3), (AtLeast(3), 3), (MajorityOfClusters(), 2)]
)
def test_waiting_reports_tag_have_need_and_since(quorum: Any, need: int) -> None:
    box = Mailbox(CLUSTER_OF, 3)
    tag = ("m", 1)
    box.put(tag, Msg(0, v(0.0)))
    box.put(tag, Msg(3, v(0.0)))  # cluster 0 again
    box.put(("m", 2), Msg(1, v(0.0)))  # another tag: not counted
    before = time.monotonic()
    done = threading.Event()

    def take() -> None:
        box.take(tag, quorum)
        done.set()

    t = threading.Thread(target=take)
    t.start()
    try:
        wait_for_state(lambda: box.waiting() is not None)
        w = box.waiting()
        assert w is not None
        clusters = isinstance(quorum, MajorityOfClusters)
        assert w.tag == tag and w.need == need
        assert w.have == (1 if clusters else 2)
        assert w.unit == ("clusters" if clusters else "processes")
        assert before <= w.since <= time.monotonic()
        assert not done.is_set()
    finally:
        box.put(tag, Msg(1, v(0.0)))
        box.put(tag, Msg(2, v(0.0)))
        t.join(TIMEOUT)
    assert done.is_set() and box.waiting() is None


def test_take_empties_its_tag_and_frees_what_it_held() -> None:
    box = Mailbox(CLUSTER_OF, 3, max_buffered=4)
    for s in (0, 1, 2):
        box.put(("p", 1), Msg(s, v(float(s))))
    box.put(("p", 2), Msg(0, v(0.0)))
    got = box.take(("p", 1), Count(2))
    assert [m.sender for m in got] == [0, 1]
    assert box.buffered == 1  # the third message of the finished tag went with it
    assert box.put(("p", 1), Msg(2, v(0.0))) is Put.LATE
    assert box.put(("p", 2), Msg(0, v(1.0))) is Put.DUPLICATE
    # room for three more, not one more (nor four)
    assert [box.put(("p", 3), Msg(s, v(0.0))) for s in range(4)] == [Put.STORED] * 3 + [
        Put.OVERFLOW
    ]


def test_advance_drops_earlier_iterations_only_and_frees_them() -> None:
    box = Mailbox(CLUSTER_OF, 3)
    assert box.put(("p", 0), Msg(0, v(0.0))) is Put.STORED  # nothing is late before advance
    assert box.advance(1) == 1 and box.buffered == 0
    box.put(("p", 1), Msg(0, v(0.0)))
    box.put(("p", 1), Msg(1, v(0.0)))
    box.put(("q", 1), Msg(0, v(0.0)))
    box.put(("p", 2), Msg(0, v(0.0)))
    box.put(("p", 3), Msg(0, v(0.0)))
    box.put(("x",), Msg(0, v(0.0)))  # no iteration: never late
    box.put(("y", "a"), Msg(0, v(0.0)))  # a non-integer second field: no iteration either
    assert box.advance(2) == 3 and box.buffered == 4  # two tags of iteration 1, all counted
    assert box.put(("p", 2), Msg(1, v(0.0))) is Put.STORED  # the current iteration is open
    assert box.put(("p", 1), Msg(2, v(0.0))) is Put.LATE
    assert box.put(("x",), Msg(1, v(0.0))) is Put.STORED
    assert box.put(("y", "a"), Msg(1, v(0.0))) is Put.STORED
    assert box.advance(3) == 2 and box.buffered == 5
    assert [m.sender for m in box.take(("x",), Count(2))] == [0, 1]


def test_a_finished_tag_stays_finished_while_its_iteration_is_current() -> None:
    box = Mailbox(CLUSTER_OF, 3)
    box.put(("p", 2), Msg(0, v(0.0)))
    box.take(("p", 2), Count(1))  # a tag of the next iteration, finished early
    box.advance(2)
    assert box.put(("p", 2), Msg(1, v(0.0))) is Put.LATE
    box.advance(3)
    assert box.put(("p", 2), Msg(1, v(0.0))) is Put.LATE  # now late by its iteration


def test_retire_refuses_everything_and_frees_the_buffer() -> None:
    box = Mailbox(CLUSTER_OF, 3)
    box.put(("p", 1), Msg(0, v(0.0)))
    box.post(Letter(("q",), 0, v(0.0)))
    box.retire()
    assert box.buffered == 0
    assert box.put(("p", 1), Msg(1, v(0.0))) is Put.RETIRED
    assert box.post(Letter(("q",), 1, v(0.0))) is Put.RETIRED
    assert box.receive(block=False) == ()
    with pytest.raises(MailboxClosed, match=r"^mailbox closed while waiting on \('p', 1\)$"):
        box.take(("p", 1), Count(1))
    with pytest.raises(MailboxClosed, match=r"^mailbox closed while waiting in receive$"):
        box.receive(block=True)


# --- delivery ---------------------------------------------------------------------------------


def test_share_freezes_the_value() -> None:
    value = v(1.0)
    share(value)
    assert not value.flags.writeable


def _boxes(n: int, max_buffered: int = 100) -> dict[int, Mailbox]:
    return {pid: Mailbox((0,) * n, 1, max_buffered) for pid in range(n)}


def test_fan_out_counts_every_outcome_and_reports_every_drop() -> None:
    boxes = _boxes(4, max_buffered=1)
    boxes[1].advance(5)  # iteration 1 is late there
    boxes[2].retire()
    boxes[3].put(("other", 9), Msg(0, v(0.0)))  # full
    dropped: list[str] = []
    stored: list[tuple[int, int]] = []
    delivery = Delivery(
        boxes, dropped=dropped.append, stored=lambda pid, step: stored.append((pid, step))
    )
    value = v(1.0)
    delivery.fan_out(("p", 1), Msg(7, value), 4)
    delivery.fan_out(("p", 1), Msg(7, value), 5)  # a duplicate at box 0: not a drop
    assert dropped == ["late", "receiver_exited", "overflow"] * 2
    assert stored == [(0, 4)]
    assert delivery.counts == {
        Put.STORED: 1,
        Put.DUPLICATE: 1,
        Put.LATE: 2,
        Put.OVERFLOW: 2,
        Put.RETIRED: 2,
    }
    assert boxes[0].take(("p", 1), Count(1)) == (Msg(7, value),)


def test_deliver_to_sends_or_posts_to_the_listed_boxes_only() -> None:
    boxes = _boxes(3, max_buffered=1)
    dropped: list[str] = []
    stored: list[tuple[int, int]] = []
    delivery = Delivery(
        boxes, dropped=dropped.append, stored=lambda pid, step: stored.append((pid, step))
    )
    value = v(2.0)
    delivery.deliver_to([0, 2], ("s", 1), 5, value, False)
    delivery.deliver_to([1], ("r", 1), 6, value, True)
    delivery.deliver_to([0], ("s", 1), 5, value, False)  # duplicate
    delivery.deliver_to([1], ("r", 2), 6, value, True)  # the inbox is full
    boxes[2].retire()
    delivery.deliver_to([2], ("s", 2), 5, value, False)
    assert dropped == ["overflow", "receiver_exited"]
    assert stored == []  # only broadcasts record their step
    assert delivery.counts == {
        Put.STORED: 3,
        Put.DUPLICATE: 1,
        Put.LATE: 0,
        Put.OVERFLOW: 1,
        Put.RETIRED: 1,
    }
    (msg,) = boxes[0].take(("s", 1), Count(1))
    assert msg.sender == 5 and msg.value is value
    assert boxes[1].receive(block=False) == (Letter(("r", 1), 6, value),)
    assert boxes[1].buffered == 0


def test_delivery_without_callbacks_counts_drops_silently() -> None:
    boxes = _boxes(2)
    boxes[1].retire()
    delivery = Delivery(boxes)
    delivery.fan_out(("p", 1), Msg(0, v(0.0)), 1)
    delivery.deliver_to([1], ("p", 1), 0, v(0.0), True)
    assert delivery.counts[Put.STORED] == 1 and delivery.counts[Put.RETIRED] == 2


def test_local_router_freezes_and_delivers_by_reference() -> None:
    router = LocalRouter()
    for pid in range(3):
        router.mailboxes[pid] = Mailbox((0, 0, 0), 1)
    value = v(1.0)
    router.broadcast(2, ("p", 1), value, 1)
    assert not value.flags.writeable
    for pid in range(3):
        (msg,) = router.mailboxes[pid].take(("p", 1), Count(1))
        assert msg.sender == 2 and msg.value is value
    sent = v(3.0)
    router.send(1, (0,), ("s", 1), sent, 1, False)
    posted = v(4.0)
    router.send(1, (2,), ("r", 1), posted, 1, True)
    assert not sent.flags.writeable and not posted.flags.writeable
    assert router.mailboxes[0].take(("s", 1), Count(1)) == (Msg(1, sent),)
    assert router.mailboxes[2].receive(block=False) == (Letter(("r", 1), 1, posted),)
    assert router.mailboxes[1].buffered == 0 and router.mailboxes[2].buffered == 0
    assert router.counts is router.delivery.counts and router.counts[Put.STORED] == 5


# --- the in-process runtime -------------------------------------------------------------------


def test_thread_run_names_its_workers_and_stops_only_the_ones_asked() -> None:
    c = cfg(algorithm="alg1", processes=4, clusters=2, quorum=4, steps=10_000)
    run = ThreadRun(c)
    assert run.cfg is c
    assert [w.name for w in run.workers] == [c.membership.name(p) for p in range(4)]
    assert [w.name for w in run.workers] == ["0.0", "1.0", "0.1", "1.1"]
    run.start()
    try:
        run.stop([1])
        assert run.workers[1].join(TIMEOUT)
        assert run.workers[1].state is WorkerState.STOPPED
        # the others need worker 1's messages (N = n): they wait for ever, so a bounded wait
        # must come back False rather than block
        assert not run.wait(0.05)
        assert [run.workers[p].state for p in (0, 2, 3)] == [WorkerState.RUNNING] * 3
    finally:
        run.stop()
    assert run.wait(TIMEOUT)
    assert run.states() == [WorkerState.STOPPED] * 4


# --- workers ----------------------------------------------------------------------------------


class Recorder:
    """A router that records what it is asked to route."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def broadcast(self, sender: int, tag: Tag, value: np.ndarray, step: int) -> None:
        self.calls.append(("broadcast", sender, tag, value, step))

    def send(
        self, sender: int, to: tuple[int, ...], tag: Tag, value: np.ndarray, step: int, post: bool
    ) -> None:
        self.calls.append(("send", sender, to, tag, value, step, post))


def _worker(
    program: Generator[Any, Any, Any],
    *,
    grad: Callable[[np.ndarray, np.random.Generator], np.ndarray] = lambda x, r: x,
    box: Mailbox | None = None,
    store: RegisterStore | None = None,
    router: Recorder | None = None,
    on_report: Callable[[Worker, Report], None] | None = None,
    worker_class: type[Worker] = Worker,
) -> Worker:
    return worker_class(
        3,
        "1.0",
        program,
        grad,
        np.random.default_rng(0),
        box if box is not None else Mailbox((0, 0, 0, 0), 1),
        store if store is not None else RegisterStore([3, 5]),
        router if router is not None else Recorder(),
        on_report,
    )


def _finish(worker: Worker) -> Worker:
    worker.start()
    assert worker.join(TIMEOUT) and worker.done.is_set()
    return worker


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_new_worker_has_done_nothing_yet() -> None:
    def program() -> Generator[Any, Any, Any]:
        yield Report("model", v(0.0), step=1)

    worker = _worker(program())
    assert worker.state is WorkerState.CREATED and worker.live
    assert (worker.step, worker.completed, worker.grads, worker.grad_seconds) == (0, 0, 0, 0.0)
    assert worker.x is None and worker.output is None
    assert worker.error is None and worker.diverged is None
    assert worker.thread_id is None and not worker.done.is_set()
    assert repr(worker) == "Worker(1.0, created, step=0)"
    _finish(worker)
    assert worker.thread_id is not None
    assert repr(worker) == "Worker(1.0, finished, step=1)"


def test_live_states_are_exactly_the_ones_whose_model_counts() -> None:
    live = {WorkerState.CREATED, WorkerState.RUNNING, WorkerState.FINISHED, WorkerState.STOPPED}
    assert frozenset(live) == LIVE_STATES
    worker = _worker(iter(()))  # type: ignore[arg-type]
    for state in WorkerState:
        worker.state = state
        assert worker.live is (state in LIVE_STATES)


@pytest.mark.parametrize(("step", "completed"), [(0, 0), (1, 0), (2, 1), (7, 6)])
def test_completed_is_one_less_than_the_iteration_reached(step: int, completed: int) -> None:
    worker = _worker(iter(()))  # type: ignore[arg-type]
    worker.step = step
    assert worker.completed == completed


def test_a_worker_runs_on_its_named_daemon_thread_and_times_its_oracle() -> None:
    seen: list[tuple[str, bool]] = []
    inner: list[float] = []

    def grad(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        started = time.perf_counter()
        seen.append((threading.current_thread().name, threading.current_thread().daemon))
        time.sleep(0.002)  # some work for the clock to measure, not a wait for another thread
        inner.append(time.perf_counter() - started)
        return x + 1.0

    def program() -> Generator[Any, Any, Any]:
        x = v(0.0)
        for t in (1, 2, 3):
            yield Report("model", x, step=t)
            x = x + (yield Grad(x))
        yield Report("model", x, step=4)
        return "done"

    started = time.perf_counter()
    worker = _finish(_worker(program(), grad=grad))
    total = time.perf_counter() - started
    assert worker.state is WorkerState.FINISHED and worker.output == "done"
    assert seen == [("worker-1.0", True)] * 3
    assert worker.grads == 3
    assert sum(inner) <= worker.grad_seconds <= total
    assert worker.step == 4 and worker.completed == 3
    assert worker.x is not None and worker.x.tolist() == [7.0]


def test_every_effect_reaches_its_resource_with_the_worker_s_step() -> None:
    box = Mailbox((0, 0, 0, 0), 1)
    store = RegisterStore([3, 5])
    router = Recorder()
    reads: list[tuple[Tag, int]] = []
    reports: list[tuple[int, str, int]] = []
    results: dict[str, Any] = {}
    a, b, c, d, e = v(1.0), v(2.0), v(3.0), v(4.0), v(5.0)
    other = v(6.0)
    store.write(5, ("sm", 2, 1, 1), other)
    box.put(("x", 2), Msg(1, v(0.0)))
    box.put(("w", 2), Msg(0, v(0.0)))
    box.post(Letter(("q",), 0, v(0.0)))

    class Reading(Worker):
        def between_reads(self, key: Tag, index: int) -> None:
            reads.append((key, index))

    def program() -> Generator[Any, Any, Any]:
        yield Report("model", v(0.0), step=2)
        yield Broadcast(("b", 2), a)
        yield Send((1, 2), ("s", 2), b)
        yield Post((0,), ("r", 2), c)
        results["exchange"] = yield Exchange(("x", 2), d, Count(1))
        results["await"] = yield Await(("w", 2), Count(1))
        results["receive"] = yield Receive(block=False)
        results["write"] = yield Write(("sm", 2, 1, 1), e)
        results["collect"] = yield Collect(("sm", 2, 1, 1))
        results["empty"] = yield Collect(("sm", 9, 1, 1))
        yield Report("agreement", v(0.0), step=7, key=(2, 1, None))

    worker = _finish(
        _worker(
            program(),
            box=box,
            store=store,
            router=router,
            on_report=lambda w, rep: reports.append((w.pid, rep.name, rep.step)),
            worker_class=Reading,
        )
    )
    assert worker.state is WorkerState.FINISHED
    assert router.calls == [
        ("broadcast", 3, ("b", 2), a, 2),
        ("send", 3, (1, 2), ("s", 2), b, 2, False),
        ("send", 3, (0,), ("r", 2), c, 2, True),
        ("broadcast", 3, ("x", 2), d, 2),
    ]
    assert results["exchange"][0].sender == 1 and results["await"][0].sender == 0
    assert len(results["receive"]) == 1 and results["receive"][0].tag == ("q",)
    assert results["write"] is None
    assert results["collect"] == (Msg(3, e), Msg(5, other))
    assert results["empty"] == ()
    assert reads == [(("sm", k, 1, 1), i) for k in (2, 9) for i in (0, 1)]
    assert reports == [(3, "model", 2), (3, "agreement", 7)]
    assert worker.step == 2  # an "agreement" report is not a model: no new iteration


def test_a_model_report_advances_the_mailbox_and_the_store() -> None:
    box = Mailbox((0, 0, 0, 0), 1)
    store = RegisterStore([3, 5])
    box.put(("p", 1), Msg(0, v(0.0)))
    box.put(("p", 3), Msg(0, v(0.0)))
    store.write(5, ("sm", 1, 1, 1), v(0.0))
    store.advance(5, 9)
    held = threading.Event()

    def program() -> Generator[Any, Any, Any]:
        yield Report("model", v(0.0), step=3)
        held.set()
        yield Await(("never", 3), Count(1))

    worker = _worker(program(), box=box, store=store)
    worker.start()
    try:
        assert held.wait(TIMEOUT)
        wait_for_state(lambda: box.waiting() is not None)
        assert box.buffered == 1  # iteration 1's message dropped, iteration 3's kept
        assert len(store) == 0  # both members past instance 1
    finally:
        worker.stop()
    assert worker.join(TIMEOUT) and worker.state is WorkerState.STOPPED


def test_however_a_worker_ends_it_retires_closes_its_program_and_says_so() -> None:
    closed: list[str] = []

    def program(how: str) -> Generator[Any, Any, Any]:
        try:
            yield Report("model", v(1.0), step=1)
            yield Report("model", v(2.0), step=2)
            if how == "crash":
                raise ValueError("boom")
            if how == "diverge":
                yield Grad(v(2.0))
            if how == "stop":
                yield Await(("p", 2), Count(1))
            if how == "bad":
                yield 42
            return how
        finally:
            closed.append(how)

    def nan_grad(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return x * np.nan

    for how, state in [
        ("finish", WorkerState.FINISHED),
        ("crash", WorkerState.CRASHED),
        ("diverge", WorkerState.DIVERGED),
        ("stop", WorkerState.STOPPED),
        ("bad", WorkerState.CRASHED),
    ]:
        box = Mailbox((0, 0, 0, 0), 1)
        store = RegisterStore([3, 5])
        store.write(5, ("sm", 5, 1, 1), v(0.0))  # held back by this worker (at iteration 2)
        store.advance(5, 9)
        exits: list[Worker] = []
        worker = _worker(program(how), grad=nan_grad, box=box, store=store)
        worker.on_exit = exits.append
        worker.start()
        if how == "stop":
            wait_for_state(lambda b=box: b.waiting() is not None)  # type: ignore[misc]
            worker.stop()
        assert worker.join(TIMEOUT)
        assert worker.state is state and worker.done.is_set() and exits == [worker]
        assert closed[-1] == how  # the program was closed (or returned)
        assert worker.output == ("finish" if how == "finish" else None)
        assert box.put(("p", 9), Msg(0, v(0.0))) is Put.RETIRED
        assert len(store) == 0  # retired: it holds nothing back any longer
        assert worker.step == 2 and worker.completed == 1
    assert closed == ["finish", "crash", "diverge", "stop", "bad"]


def test_a_crash_is_recorded_and_logged_with_the_completed_steps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def program(bad: bool) -> Generator[Any, Any, Any]:
        for t in (1, 2, 3):
            yield Report("model", v(float(t)), step=t)
        if bad:
            yield 42
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="peerlearn.runtime.worker"):
        worker = _finish(_worker(program(False)))
        assert worker.state is WorkerState.CRASHED and not worker.live
        assert worker.error == "ValueError: boom"
        bad = _finish(_worker(program(True)))
    assert bad.error == "ProgramError: worker 1.0 yielded 42, which is no effect"
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "worker 1.0 crashed after 2 completed steps: ValueError: boom",
        "worker 1.0 crashed after 2 completed steps: "
        "ProgramError: worker 1.0 yielded 42, which is no effect",
    ]
    assert caplog.records[0].exc_info is not None  # with its traceback


def test_divergence_names_the_iteration_that_produced_the_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nan = v(np.nan)

    def model_at(step: int) -> Generator[Any, Any, Any]:
        for t in range(1, step):
            yield Report("model", v(float(t)), step=t)
        yield Report("model", nan, step=step)

    def sends_before_any_report() -> Generator[Any, Any, Any]:
        yield Broadcast(("p", 0), nan)

    def sends_at(step: int, effect: Callable[[np.ndarray], Any]) -> Generator[Any, Any, Any]:
        for t in range(1, step + 1):
            yield Report("model", v(float(t)), step=t)
        yield effect(v(np.inf))

    def grad_at(step: int) -> Generator[Any, Any, Any]:
        for t in range(1, step + 1):
            yield Report("model", v(float(t)), step=t)
        yield Grad(v(0.0))

    cases: list[tuple[Generator[Any, Any, Any], Divergence]] = [
        (model_at(1), Divergence(0, "model")),  # x_1 itself: "iteration 0" produced it
        (model_at(4), Divergence(3, "model")),
        (sends_before_any_report(), Divergence(0, "model")),
        (sends_at(2, lambda x: Broadcast(("p", 2), x)), Divergence(2, "model")),
        (sends_at(3, lambda x: Exchange(("p", 3), x, Count(1))), Divergence(3, "model")),
        (sends_at(2, lambda x: Send((0,), ("p", 2), x)), Divergence(2, "model")),
        (sends_at(2, lambda x: Post((0,), ("p", 2), x)), Divergence(2, "model")),
        (sends_at(5, lambda x: Write(("sm", 5, 1, 1), x)), Divergence(5, "model")),
        (grad_at(3), Divergence(3, "gradient")),
    ]
    router = Recorder()
    store = RegisterStore([3, 5])
    with caplog.at_level(logging.ERROR, logger="peerlearn.runtime.worker"):
        for program, expected in cases:
            worker = _finish(
                _worker(program, router=router, store=store, grad=lambda x, r: x + np.nan)
            )
            assert worker.state is WorkerState.DIVERGED and not worker.live
            assert worker.diverged == expected
            assert worker.error is None
    assert router.calls == [] and store.writes == 0  # nothing non-finite left the worker
    assert caplog.records[0].getMessage() == (
        "worker 1.0 diverged: non-finite model at iteration 0; it stopped before sending it"
    )
    assert caplog.records[-1].getMessage() == (
        "worker 1.0 diverged: non-finite gradient at iteration 3; it stopped before sending it"
    )


def test_a_diverged_model_keeps_the_last_finite_one() -> None:
    def program() -> Generator[Any, Any, Any]:
        yield Report("model", v(1.0), step=1)
        yield Report("model", v(2.0), step=2)
        yield Report("model", v(np.inf), step=3)

    worker = _finish(_worker(program()))
    assert worker.diverged == Divergence(2, "model")
    assert worker.step == 2 and worker.x is not None and worker.x.tolist() == [2.0]


def test_a_blocking_receive_effect_waits_for_the_first_letter() -> None:
    box = Mailbox((0, 0, 0, 0), 1)
    got: list[Any] = []

    def program() -> Generator[Any, Any, Any]:
        yield Report("model", v(0.0), step=1)
        got.append((yield Receive(block=True)))

    worker = _worker(program(), box=box)
    worker.start()
    wait_for_state(lambda: box.waiting() is not None)  # parked in the inbox wait
    letter = Letter(("req", 1), 0, v(1.0))
    assert box.post(letter) is Put.STORED
    assert worker.join(TIMEOUT) and worker.state is WorkerState.FINISHED
    assert got == [(letter,)]
