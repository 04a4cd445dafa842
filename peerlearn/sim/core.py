"""The deterministic discrete-event core: interprets effect programs in virtual time.

Theory of operation
-------------------
One heap of ``(time, seq, kind, pid, payload)`` entries; ``seq`` (an ``itertools.count``) breaks
ties, so a run is a pure function of its inputs and seeds (SimPy's ``core.py`` ordering). No wall
clock is read anywhere in ``sim/``.

A broadcast's deliveries are not pushed one by one: they are sorted into a *run* (:class:`_Run`)
and only the run's earliest pending delivery sits in the heap; handling it puts the run's next
delivery in its place. The heap is then a k-way merge of runs and holds O(broadcasts in flight)
entries instead of O(n × broadcasts in flight): ~10³ instead of ~10⁵ with n = 1000, and a heap
operation slows down a lot as the heap grows (see ``benchmarks/RESULTS.md``). Events are handled
in exactly the order of pushing every delivery on its own (see :meth:`Simulator._send`), so runs
are bit-identical to that simpler scheme.

A process runs its program synchronously until it yields an effect that takes virtual time:

* ``Grad``     — the gradient is computed now and handed back after a compute time drawn from
                 the process's compute distribution (stragglers scale it);
* ``Broadcast``— one DELIVER event per receiver, each with its own random delay: per-link mean
                 factors × per-message draws, so every receiver sees its own arrival order
                 (with one order for all, every process would average the same messages and
                 stay identical: contraction tests would be vacuous). A partition holds the
                 messages *sent* across it while it lasts (messages already in flight when it
                 starts are on the wire and arrive) and delivers them when it heals;
* ``Send``     — a ``Broadcast`` to the listed processes only;
* ``Await``    — satisfied from the mailbox at once, or the process waits; each DELIVER checks
                 only the awaited tag;
* ``Post``     — like ``Send``, into the receivers' inboxes; ``Receive`` takes the whole inbox
                 at once (instantaneous), or waits for the next delivery when ``block`` and empty;
* ``Collect``  — one READ event per register of the cluster, each after its own read delay, so
                 collects interleave with other processes' writes (no snapshot, Alg 4 line 3);
* ``Write``, ``Report`` — instantaneous.

Liveness is explicit: when the heap is empty, every live process has either finished or waits
in an ``Await`` that can never complete — the run is ``blocked``, and each waiting process is
listed with its tag and how many messages (or clusters) it has and needs. No step cap, no
timeout. Crashes are crash-stop: a crashed process's pending events are ignored.

A restart is a crash followed at once by a rejoin, as a daemon killed and started again does it.
The process loses its program, its mailbox and inbox, the messages on their way to it (every
delivery and held message sent before the restart) and its pending gradient or read. It takes the
state of the live process furthest ahead — the highest reported iteration s, the lowest pid on a
tie — and resumes through the algorithm's resume entry point at iteration r: s, or s + 1 if some
live process had already sent a message of iteration s (lost to it: it would wait for it for
good), and never at an iteration it had sent or written anything of before (the others hold
that message; a second one under its name would be counted twice, a register written twice).
So every message of iteration r and later reaches it, and it misses the iterations in between as
a crashed process would.

A centered algorithm (the elastic family, ``center`` given) rejoins through its center instead,
as daemons do: a restart also loses the messages still on their way *from* the restarted process
(a killed daemon's unsent frames), a restarted worker resumes from the center's model after the
last request the center answered for it, with the center's record of its ledger, and a restarted
center is rebuilt from the live workers' ledgers — each worker's last ledger report, plus the
last center's answer if that sits in its mailbox already (the worker will apply it); a crashed
worker's last ledger counts too. A restarted worker whose center has crashed stays down.

Divergence is checked where a value leaves the process that computed it: a gradient as ``Grad``
returns it, a model as it is reported, and every value a process sends or writes. A non-finite
one stops the process there, crash-stop, before anybody receives it, and the run ends
``diverged``. Received values need no check of their own: every sender was checked.
"""

from __future__ import annotations

import heapq
import itertools
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from peerlearn.algorithms.spec import Ledger
from peerlearn.compression import Compressor
from peerlearn.effects import (
    AtLeast,
    Await,
    Broadcast,
    Collect,
    Count,
    Divergence,
    Done,
    Exchange,
    Grad,
    Letter,
    MajorityOfClusters,
    Msg,
    Post,
    Program,
    Quantity,
    Quantize,
    Quorum,
    Receive,
    Report,
    Send,
    Tag,
    Vector,
    Write,
    finite,
    quiet_float_errors,
    quorum_have,
    quorum_need,
    quorum_take,
)
from peerlearn.errors import ProgramError
from peerlearn.membership import Membership

__all__ = [
    "BlockedProcess",
    "DivergedProcess",
    "Outcome",
    "Proc",
    "Restart",
    "Resumer",
    "Simulator",
    "Status",
]

_RESUME, _DELIVER, _READ, _CRASH, _SAMPLE, _HEAL, _RESTART = range(7)

Sampler = Callable[[], float]
#: ``resume(pid, r, model, key, ledgers)``: the program of process ``pid`` resuming at iteration
#: ``r`` from ``model`` and the ``key`` it was reported with (the rest of the state: DASGD's
#: version vector, a center's last answered request per worker), with the ledgers of a centered
#: algorithm's workers by pid (empty otherwise), through the algorithm's resume entry point
Resumer = Callable[[int, int, Vector, Tag, Mapping[int, Ledger]], Program]

#: the tag of the center's answer to a worker's request of iteration t is ``(ANSWER, t)``
#: (:mod:`peerlearn.algorithms.elastic`)
ANSWER = "rep"


class Status(StrEnum):
    FINISHED = "finished"  # every non-crashed process completed its program
    BLOCKED = "blocked"  # quiescent event queue while a live process waits
    FAILED = "failed"  # a program or a gradient raised
    DIVERGED = "diverged"  # a process's gradient or model turned non-finite (NaN or ±inf)


@dataclass(frozen=True)
class BlockedProcess:
    pid: int
    name: str
    tag: Tag
    have: int
    need: int
    unit: str  # "processes" or "clusters"


@dataclass(frozen=True)
class DivergedProcess:
    pid: int
    name: str
    step: int  # the iteration that produced the non-finite value
    quantity: Quantity  # "gradient" or "model"


@dataclass(frozen=True)
class Restart:
    """One restart: who, when, at which iteration it was, where it resumed and from whom."""

    pid: int
    name: str
    time: float
    step: int  # the iteration it was in (its last "model" report)
    #: the iteration it resumed at; None: no live process was left to take state from, so it
    #: stayed down (counted as crashed)
    resumed_at: int | None
    #: the process whose state it took; None: it stayed down, or (a center) was rebuilt from its
    #: workers' ledgers
    source: str | None
    source_step: int | None  # that process's iteration s (its model is x_s)


@dataclass(eq=False)
class Proc:
    """Runtime state of one simulated process."""

    pid: int
    cluster: int
    program: Program
    compute_scale: float = 1.0
    crashed: bool = False
    finished: bool = False
    step: int = 0  # iteration of the last "model" report
    x: Vector | None = None  # model at the start of iteration ``step``
    key: Tag = ()  # the key ``x`` was reported with
    ledger: Report | None = None  # its last "ledger" report (centered algorithms)
    output: Any = None
    waiting: tuple[Tag, Quorum] | None = None
    #: while waiting: the mailbox size below which the quorum cannot hold (a quorum needs at
    #: least this many messages), so a delivery checks the quorum only once it might hold
    need: int = 0
    mailbox: dict[Tag, list[Msg]] = field(default_factory=dict)
    inbox: list[Letter] = field(default_factory=list)
    receiving: bool = False  # blocked in Receive
    done: set[Tag] = field(default_factory=set)
    crash_step: int | None = None
    crash_mid_broadcast: bool = False
    armed: bool = False  # crash during the next broadcast
    collect: tuple[Tag, list[Msg], int] | None = None  # key, read so far, next member index
    diverged: Divergence | None = None  # set with ``crashed``: the process stopped there
    restart_steps: list[int] = field(default_factory=list)  # restart on reaching these, in order
    down: bool = False  # restarting: its program stopped, it rejoins at its _RESTART event
    #: the last iteration it sent a message or wrote a register in (any incarnation)
    sent_step: int = 0
    #: events and deliveries for it (and, centered algorithms, from it) with a sequence number
    #: below this were sent before its last restart: they are lost
    lost_before: int = 0
    #: the iteration it last resumed at: it never collects a register of an earlier one
    floor: int = 0
    #: rounds what it sends (``Quantize``), with its streams' residuals; a restart forgets them
    compressor: Compressor = field(default_factory=Compressor)


@dataclass(frozen=True)
class Outcome:
    status: Status
    time: float
    events: int
    deliveries: int
    dropped_late: int
    held: int
    blocked: tuple[BlockedProcess, ...]
    error: str | None
    diverged: tuple[DivergedProcess, ...] = ()
    restarts: tuple[Restart, ...] = ()


class _Run:
    """The deliveries of one broadcast (or one healed message), in the order they happen.

    ``rest`` yields the heap entries ``(time, seq, _DELIVER, receiver, run)`` still to come, by
    time; the heap holds only the entry before them. The entries point back at their run, so
    run → ``rest`` → run is a reference cycle: it is broken when the run is spent.
    """

    __slots__ = ("msg", "post", "rest", "tag")

    def __init__(self, tag: Tag, msg: Msg, post: bool) -> None:
        self.tag = tag
        self.msg = msg
        self.post = post
        self.rest: Iterator[tuple[float, int, int, int, _Run]] | None = None


@dataclass(frozen=True)
class Partition:
    group_of: tuple[int, ...]  # cluster -> group (−1: not in any group, reaches everybody)
    start: float
    end: float | None


class LinkFactors:
    """The per-link mean delay factors, uniform in 1 ± spread: the n × n matrix the schedule
    stream would draw next (link i → j is its draw i·n + j), derived a row or an entry at a
    time, when needed, by jumping a copy of the stream there — O(n) memory, not O(n²), and the
    very numbers the matrix held. The stream itself is moved past the matrix, so every later
    draw of the run is the one it was."""

    def __init__(self, sched: np.random.Generator, n: int, spread: float) -> None:
        bits = sched.bit_generator
        if not isinstance(bits, np.random.PCG64):  # advance() counts its 64-bit outputs
            raise TypeError(f"link factors need a PCG64 stream, not {type(bits).__name__}")
        self._state = bits.state
        self._n = n
        self._low, self._high = 1.0 - spread, 1.0 + spread
        bits.advance(n * n)  # one 64-bit output per double
        # advance() drops a buffered half of a 32-bit draw, which drawing the matrix kept
        after = bits.state
        after["has_uint32"], after["uinteger"] = self._state["has_uint32"], self._state["uinteger"]
        bits.state = after
        self._bits = np.random.PCG64(0)  # (reused: a fresh one would read OS entropy)
        self._gen = np.random.Generator(self._bits)
        #: the links taken one by one so far (a sparse protocol sends on the same few again and
        #: again; a jump costs about 3 µs): at most a few per process, then it starts over
        self._known: dict[int, float] = {}
        self._room = 8 * n

    def _at(self, draw: int) -> np.random.Generator:
        self._bits.state = self._state
        self._bits.advance(draw)
        return self._gen

    def row(self, sender: int) -> Vector:
        """The factors of every link from ``sender``."""
        return self._at(sender * self._n).uniform(self._low, self._high, self._n)

    def __call__(self, sender: int, receiver: int) -> float:
        """The factor of the link ``sender`` → ``receiver``."""
        draw = sender * self._n + receiver
        factor = self._known.get(draw)
        if factor is None:
            if len(self._known) >= self._room:
                self._known.clear()
            factor = float(self._at(draw).uniform(self._low, self._high))
            self._known[draw] = factor
        return factor


class Simulator:
    """Runs one program per process to completion, blocking or failure.

    :param membership: n processes in m clusters.
    :param programs: one program per process id.
    :param grad: ``grad(pid, x)`` — the process's stochastic gradient (its own RNG stream).
    :param rng: the schedule's random stream (delays, orders, partial broadcasts).
    :param resume: the algorithm's resume entry point; restarts need it.
    :param center: a centered algorithm's center: restarts rejoin through it (module docstring).
    """

    def __init__(
        self,
        membership: Membership,
        programs: Sequence[Program],
        grad: Callable[[int, Vector], Vector],
        rng: np.random.Generator,
        *,
        delay_remote: Callable[[int], Vector],
        delay_local: Callable[[int], Vector],
        compute: Sampler,
        read: Sampler,
        link_factor: LinkFactors | None = None,
        compute_scale: Sequence[float] | None = None,
        partitions: Sequence[Partition] = (),
        sample_every: float | None = None,
        on_sample: Callable[[float], None] | None = None,
        on_report: Callable[[Proc, Report], None] | None = None,
        on_receive: Callable[[Proc, str, Tag, tuple[Msg, ...]], None] | None = None,
        resume: Resumer | None = None,
        center: int | None = None,
        compression: Callable[[], Compressor] = Compressor,
    ) -> None:
        self.membership = membership
        n = membership.processes
        if len(programs) != n:
            raise ProgramError(f"{len(programs)} programs for {n} processes")
        scale = compute_scale or [1.0] * n
        self.procs = [
            Proc(pid, membership.cluster_of[pid], prog, scale[pid], compressor=compression())
            for pid, prog in enumerate(programs)
        ]
        self._compression = compression
        self._grad = grad
        self._rng = rng
        self._delay_remote = delay_remote
        self._delay_local = delay_local
        self._compute = compute
        self._read = read
        self._link = link_factor
        self._cluster_of = np.asarray(membership.cluster_of)
        self._everyone = np.arange(n)
        self._partitions = list(partitions)
        self._held: list[tuple[int, Tag, Msg, bool]] = []
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = itertools.count()
        self._registers: dict[Tag, list[Vector | None]] = {}
        self._register_step: dict[Tag, int] = {}  # the iteration a register array was made in
        self._collected: dict[Tag, set[int]] = {}
        self._resume = resume
        self._center = center
        self.restarts: list[Restart] = []
        self._sample_every = sample_every
        self._on_sample = on_sample
        self._on_report = on_report
        self._on_receive = on_receive
        self.failure_traceback: str | None = None
        self.now = 0.0
        self.events = 0
        self.deliveries = 0
        self.dropped_late = 0
        self.steps_total = 0

    # --- set-up ---------------------------------------------------------------------------------

    def crash_at_step(self, pid: int, step: int, mid_broadcast: bool) -> None:
        proc = self.procs[pid]
        proc.crash_step, proc.crash_mid_broadcast = step, mid_broadcast

    def crash_at_time(self, pid: int, time: float) -> None:
        self._push(time, _CRASH, pid, None)

    def restart_at_step(self, pid: int, step: int) -> None:
        """Restart ``pid`` when it reaches iteration ``step`` (once per call)."""
        self._can_restart(pid)
        steps = self.procs[pid].restart_steps
        steps.append(step)
        steps.sort()

    def restart_at_time(self, pid: int, time: float) -> None:
        self._can_restart(pid)
        self._push(time, _RESTART, pid, None)

    def _can_restart(self, pid: int) -> None:
        if self._resume is None:
            raise ProgramError(f"process {pid} cannot restart: no resume entry point was given")

    def _push(self, time: float, kind: int, pid: int, payload: Any) -> None:
        heapq.heappush(self._heap, (time, next(self._seq), kind, pid, payload))

    # --- the loop -------------------------------------------------------------------------------

    def run(
        self, progress: Callable[[Simulator], None] | None = None, every: int = 20000
    ) -> Outcome:
        """Run to the end: every process finished, crashed, diverged or blocked."""
        # Programs, oracles and samples compute in here: a diverging value is reported by the
        # checks (status ``diverged``), not by a RuntimeWarning per operation.
        with quiet_float_errors():
            try:
                return self._run(progress, every)
            finally:
                # Programs left suspended (blocked, or answering after Done) are closed here,
                # not by the garbage collector at some later point: closing runs their code,
                # and from inside an unrelated allocation (CPython 3.11's ast.parse checks its
                # recursion depth around one) that code fails the caller.
                for proc in self.procs:
                    proc.program.close()

    def _run(self, progress: Callable[[Simulator], None] | None, every: int) -> Outcome:
        for part in self._partitions:
            if part.end is not None:
                self._push(part.end, _HEAL, -1, part)
        if self._sample_every is not None and self._on_sample is not None:
            self._push(0.0, _SAMPLE, -1, None)
        error: str | None = None
        heap, procs, pop, replace = self._heap, self.procs, heapq.heappop, heapq.heapreplace
        centered = self._center is not None  # a restart also loses what it sent
        try:
            for proc in procs:
                self._advance(proc, None)
            while heap:
                time, seq, kind, pid, payload = heap[0]
                if kind == _DELIVER:  # the hot path: most events are deliveries
                    # Put the run's next delivery in this one's place: one sift, not two.
                    following = next(payload.rest, None)
                    if following is None:
                        pop(heap)
                        payload.rest = None  # the run is spent: break its reference cycle
                    else:
                        replace(heap, following)
                    self.now = time
                    self.events += 1
                    proc = procs[pid]
                    if (
                        proc.crashed
                        or seq < proc.lost_before
                        or (centered and seq < procs[payload.msg.sender].lost_before)
                    ):
                        pass  # it is gone, or one end was down when this was on its way
                    elif payload.post:
                        self._deliver_post(proc, payload.tag, payload.msg)
                    else:
                        self._deliver(proc, payload.tag, payload.msg)
                    if progress is not None and self.events % every == 0:
                        progress(self)
                    continue
                pop(heap)
                if kind != _SAMPLE:
                    self.now = time  # a sample is not activity: the run ends at its last event
                self.events += 1
                if kind == _RESUME:
                    proc = procs[pid]
                    if not proc.crashed and seq >= proc.lost_before:
                        self._advance(proc, payload)
                elif kind == _READ:
                    proc = procs[pid]
                    if not proc.crashed and seq >= proc.lost_before:
                        self._read_next(proc)
                elif kind == _CRASH:
                    self._crash(procs[pid])
                elif kind == _RESTART:
                    self._restart(procs[pid])
                elif kind == _SAMPLE:
                    assert self._on_sample is not None and self._sample_every is not None
                    # Sample only while something else is pending: a sample past the last
                    # event would be stamped after the run ended (the final one is at `now`).
                    if heap:
                        self._on_sample(time)
                        self._push(time + self._sample_every, _SAMPLE, -1, None)
                else:  # _HEAL
                    self._heal(payload)
                if progress is not None and self.events % every == 0:
                    progress(self)
            blocked = tuple(self._blocked())
        except Exception as exc:  # a program or oracle failed: stop the run loudly
            error = "".join(traceback.format_exception_only(exc)).strip()
            self.failure_traceback = traceback.format_exc()
            blocked = ()
        if self._on_sample is not None:
            self._on_sample(self.now)
        diverged = tuple(
            DivergedProcess(p.pid, self.membership.name(p.pid), *p.diverged)
            for p in procs
            if p.diverged is not None
        )
        if error is not None:
            status = Status.FAILED
        elif diverged:
            status = Status.DIVERGED
        elif blocked:
            status = Status.BLOCKED
        else:
            status = Status.FINISHED
        return Outcome(
            status=status,
            time=self.now,
            events=self.events,
            deliveries=self.deliveries,
            dropped_late=self.dropped_late,
            held=len(self._held),
            blocked=blocked,
            error=error,
            diverged=diverged,
            restarts=tuple(self.restarts),
        )

    # --- interpreting effects -------------------------------------------------------------------

    def _advance(self, proc: Proc, value: Any) -> None:
        """Run ``proc``'s program until it yields an effect that takes virtual time."""
        send = proc.program.send
        while True:
            try:
                eff = send(value)
            except StopIteration as stop:
                if not proc.finished:  # (after Done, its output is Done's)
                    proc.output = stop.value
                proc.finished = True
                return
            value = None
            match eff:
                case Exchange(tag=tag, value=v, quorum=quorum):
                    self._broadcast(proc, tag, v)
                    if proc.crashed:
                        return
                    value = self._await(proc, tag, quorum)
                    if value is None:
                        return
                case Grad(x=x):
                    g = self._grad(proc.pid, x)
                    if not finite(g):
                        self._diverge(proc, proc.step, "gradient")
                        return
                    self._push(
                        self.now + self._compute() * proc.compute_scale, _RESUME, proc.pid, g
                    )
                    return
                case Report() as rep:
                    if rep.name == "model":
                        self._model(proc, rep)
                        if proc.crashed or proc.down:
                            return
                    elif rep.name == "ledger":
                        proc.ledger = rep
                    if self._on_report is not None:
                        self._on_report(proc, rep)
                case Write(key=key, value=v):
                    if not finite(v):  # registers are read by the whole cluster
                        self._diverge(proc, proc.step, "model")
                        return
                    self._write(proc, key, v)
                case Collect(key=key):
                    proc.collect = (key, [], 0)
                    self._push(self.now + self._read(), _READ, proc.pid, None)
                    return
                case Broadcast(tag=tag, value=v):
                    self._broadcast(proc, tag, v)
                    if proc.crashed:
                        return
                case Send(to=to, tag=tag, value=v):
                    self._broadcast(proc, tag, v, to)
                    if proc.crashed:
                        return
                case Post(to=to, tag=tag, value=v):
                    self._broadcast(proc, tag, v, to, post=True)
                    if proc.crashed:
                        return
                case Receive(block=block):
                    if proc.inbox or not block:
                        value = tuple(proc.inbox)
                        proc.inbox.clear()
                    else:
                        proc.receiving = True
                        return
                case Await(tag=tag, quorum=quorum):
                    value = self._await(proc, tag, quorum)
                    if value is None:
                        return
                case Quantize(stream=stream, value=v):
                    value = proc.compressor(stream, v)
                case Done(value=v):  # finished; it goes on answering its inbox
                    proc.finished = True
                    proc.output = v
                case _:
                    raise ProgramError(f"process {proc.pid} yielded {eff!r}, which is no effect")

    def _model(self, proc: Proc, rep: Report) -> None:
        if not finite(rep.value):  # x_t is what iteration t − 1 produced
            self._diverge(proc, rep.step - 1, "model")
            return
        if proc.step and rep.step > proc.step:  # iterations completed since the last report
            self.steps_total += rep.step - proc.step
        proc.step, proc.x, proc.key = rep.step, rep.value, rep.key
        if proc.crash_step is not None and rep.step >= proc.crash_step:
            if proc.crash_mid_broadcast:
                proc.armed = True
            else:
                self._crash(proc)
        if proc.crashed or proc.armed:
            return  # a crash is for good: no restart after it
        if proc.restart_steps and rep.step >= proc.restart_steps[0]:
            proc.restart_steps.pop(0)
            # The rejoin is an event of its own, not a call from inside this program's step: the
            # processes not started yet (t=1 at time 0) report first, so there is state to take.
            proc.down = True
            self._push(self.now, _RESTART, proc.pid, None)

    def _broadcast(
        self,
        proc: Proc,
        tag: Tag,
        value: Vector,
        to: Sequence[int] | None = None,
        post: bool = False,
    ) -> None:
        if not finite(value):  # nobody receives it: the sender stops here
            self._diverge(proc, proc.step, "model")
            return
        if not proc.finished:  # (answers after Done are of no iteration)
            proc.sent_step = proc.step
        n = self.membership.processes
        sender = proc.pid
        home = self._cluster_of[sender]
        if to is None:
            receivers = self._everyone
            delays = np.where(self._cluster_of == home, self._delay_local(n), self._delay_remote(n))
        else:
            receivers = np.asarray(to, dtype=np.intp)
            if len(receivers) and not (receivers.min() >= 0 and receivers.max() < n):
                raise ProgramError(f"process {sender} sent {tag} to {list(to)}: no such process")
            n = len(receivers)
            # a delay for each addressee only, not for every process: a send to k costs O(k)
            same = self._cluster_of[receivers] == home
            delays = np.empty(n)
            delays[same] = self._delay_local(int(same.sum()))
            delays[~same] = self._delay_remote(n - int(same.sum()))
        if proc.armed:  # crash in the middle of this broadcast: only some recipients get it
            order = self._rng.permutation(n)
            order = order[: int(self._rng.integers(1, n))] if n > 1 else order[:0]
            receivers, delays = receivers[order], delays[order]
        msg = Msg(sender, value)
        parts = self._active_partitions() if self._partitions else []
        if parts:
            cluster_of = self.membership.cluster_of
            reached = np.ones(len(receivers), dtype=bool)
            for i, r in enumerate(receivers.tolist()):
                if self._cut(parts, proc.cluster, cluster_of[r]):
                    self._held.append((r, tag, msg, post))
                    reached[i] = False
            receivers, delays = receivers[reached], delays[reached]
        if self._link is not None and len(receivers):
            # the sender's row (about 6 ns a link) unless the recipients are few enough that
            # taking their links one by one (about 4 µs each) costs less
            if len(receivers) > 1 + self.membership.processes // 512:
                delays *= self._link.row(sender)[receivers]
            else:
                delays *= np.array([self._link(sender, r) for r in receivers.tolist()])
        self._send(tag, msg, self.now + delays, receivers, post)
        if proc.armed:
            self._crash(proc)

    def _send(
        self,
        tag: Tag,
        msg: Msg,
        times: Vector,
        receivers: npt.NDArray[np.intp],
        post: bool = False,
    ) -> None:
        """Deliver ``msg`` to ``receivers[i]`` at ``times[i]``, as one run of deliveries.

        Same order as pushing ``(times[i], next(seq), _DELIVER, receivers[i], …)`` for each ``i``
        in turn: the stable sort orders the run's own ties by ``i``, as consecutive sequence
        numbers would. Against every other heap entry, one sequence number for the whole run
        compares as each of those consecutive numbers would — none of them lies between them —
        and two entries of one run are never in the heap together, so a run needs just one.
        """
        if len(receivers) == 0:
            return
        order = np.argsort(times, kind="stable")
        run = _Run(tag, msg, post)
        run.rest = zip(
            times[order].tolist(),
            itertools.repeat(next(self._seq)),
            itertools.repeat(_DELIVER),
            receivers[order].tolist(),
            itertools.repeat(run),
            strict=False,  # the repeats are endless
        )
        heapq.heappush(self._heap, next(run.rest))

    def _await(self, proc: Proc, tag: Tag, quorum: Quorum) -> tuple[Msg, ...] | None:
        box = proc.mailbox.get(tag)
        if box is not None:
            got = self._satisfied(box, quorum)
            if got is not None:
                del proc.mailbox[tag]
                proc.done.add(tag)
                if self._on_receive is not None:
                    self._on_receive(proc, "await", tag, got)
                return got
        proc.waiting = (tag, quorum)
        # Every quorum needs at least this many messages (a cluster majority, at least one per
        # cluster); an unknown quorum gets 0, so the first delivery reports it as before.
        if isinstance(quorum, Count | AtLeast):
            proc.need = quorum.n
        elif isinstance(quorum, MajorityOfClusters):
            proc.need = self.membership.majority
        else:
            proc.need = 0
        return None

    def _satisfied(self, box: list[Msg], quorum: Quorum) -> tuple[Msg, ...] | None:
        # The simulator's links never duplicate, so the box holds one message per sender.
        return quorum_take(quorum, box, self.membership.cluster_of, self.membership.clusters)

    def _deliver(self, proc: Proc, tag: Tag, msg: Msg) -> None:
        self.deliveries += 1
        if tag in proc.done:
            self.dropped_late += 1
            return
        box = proc.mailbox.get(tag)
        if box is None:
            proc.mailbox[tag] = box = []
        box.append(msg)
        waiting = proc.waiting
        if waiting is not None and len(box) >= proc.need and waiting[0] == tag:
            got = self._satisfied(box, waiting[1])
            if got is not None:
                proc.waiting = None
                del proc.mailbox[tag]
                proc.done.add(tag)
                if self._on_receive is not None:
                    self._on_receive(proc, "await", tag, got)
                self._advance(proc, got)

    def _deliver_post(self, proc: Proc, tag: Tag, msg: Msg) -> None:
        self.deliveries += 1
        proc.inbox.append(Letter(tag, msg.sender, msg.value))
        if proc.receiving:
            proc.receiving = False
            got = tuple(proc.inbox)
            proc.inbox.clear()
            self._advance(proc, got)

    # --- registers ------------------------------------------------------------------------------

    def _write(self, proc: Proc, key: Tag, value: Vector) -> None:
        regs_key = (proc.cluster, key)
        regs = self._registers.get(regs_key)
        if regs is None:
            size = len(self.membership.members[proc.cluster])
            self._registers[regs_key] = regs = [None] * size
            self._register_step[regs_key] = proc.step
        slot = self.membership.index(proc.pid)
        if regs[slot] is not None:
            raise ProgramError(f"process {proc.pid} wrote register {key} twice")
        regs[slot] = value
        proc.sent_step = proc.step

    def _read_next(self, proc: Proc) -> None:
        assert proc.collect is not None
        key, got, idx = proc.collect
        members = self.membership.members[proc.cluster]
        regs = self._registers.get((proc.cluster, key))
        if regs is not None and regs[idx] is not None:
            got.append(Msg(members[idx], regs[idx]))  # type: ignore[arg-type]
        idx += 1
        if idx < len(members):
            proc.collect = (key, got, idx)
            self._push(self.now + self._read(), _READ, proc.pid, None)
            return
        proc.collect = None
        self._collected_by(proc.cluster, key, proc.pid)
        result = tuple(got)
        if self._on_receive is not None:
            self._on_receive(proc, "collect", key, result)
        self._advance(proc, result)

    def _collected_by(self, cluster: int, key: Tag, pid: int) -> None:
        """Reclaim a register array once every live member of the cluster has collected it."""
        regs_key = (cluster, key)
        self._collected.setdefault(regs_key, set()).add(pid)
        self._reclaim(regs_key)

    def _reclaim(self, regs_key: Tag) -> None:
        """Drop a register array nobody will read again: every member of its cluster has
        collected it, crashed, or resumed past its iteration."""
        readers = self._collected[regs_key]
        made_in = self._register_step.get(regs_key)
        procs = self.procs
        if all(
            p in readers or procs[p].crashed or (made_in is not None and procs[p].floor > made_in)
            for p in self.membership.members[regs_key[0]]
        ):
            self._registers.pop(regs_key, None)
            self._register_step.pop(regs_key, None)
            del self._collected[regs_key]

    # --- faults ---------------------------------------------------------------------------------

    def _diverge(self, proc: Proc, step: int, quantity: Quantity) -> None:
        """``proc`` computed a non-finite value: it stops as if it crashed (so that quorum
        algorithms go on without it), and the run will end ``diverged``."""
        proc.diverged = Divergence(max(step, 0), quantity)
        self._crash(proc)

    def _crash(self, proc: Proc) -> None:
        if proc.crashed or proc.finished:
            return
        proc.crashed = True
        proc.waiting = None
        proc.receiving = False
        proc.mailbox.clear()
        proc.inbox.clear()
        proc.program.close()
        self._reclaim_cluster(proc.cluster)

    def _reclaim_cluster(self, cluster: int) -> None:
        for regs_key in [k for k in self._collected if k[0] == cluster]:
            self._reclaim(regs_key)

    def _restart(self, proc: Proc) -> None:
        """``proc`` goes down and rejoins at once (see the module docstring)."""
        proc.down = False
        if proc.crashed or proc.finished:
            return  # a crash is for good; a finished process has nothing left to lose
        was = proc.step
        proc.lost_before = next(self._seq)  # what was on its way to it until now is lost
        proc.program.close()
        proc.compressor = self._compression()  # what it owed its streams went down with it
        proc.waiting = None
        proc.need = 0
        proc.receiving = False
        proc.mailbox.clear()
        proc.inbox.clear()
        proc.done.clear()
        proc.collect = None
        if self._held:
            self._held = [
                h
                for h in self._held
                if h[0] != proc.pid and (self._center is None or h[2].sender != proc.pid)
            ]
        if self._center is not None:
            self._rejoin_centered(proc, was)
            return
        others = [p for p in self.procs if p is not proc and not p.crashed]
        live = [p for p in others if not p.down and p.x is not None]
        name = self.membership.name(proc.pid)
        if not live:  # nobody to take state from: it stays down
            self.restarts.append(Restart(proc.pid, name, self.now, was, None, None, None))
            self._crash(proc)
            return
        source = max(live, key=lambda p: (p.step, -p.pid))
        s = source.step
        # Someone sent a message of iteration s already: resuming at s, it would wait for good
        # for what it lost. Its own last iteration with a message out is behind it for good.
        lost = any(p.sent_step >= s for p in others)
        resumed_at = max(s + 1 if lost else s, proc.sent_step + 1)
        assert self._resume is not None and source.x is not None
        proc.program = self._resume(proc.pid, resumed_at, source.x.copy(), source.key, {})
        proc.floor = resumed_at
        self.restarts.append(
            Restart(
                proc.pid,
                name,
                self.now,
                was,
                resumed_at,
                self.membership.name(source.pid),
                s,
            )
        )
        self._reclaim_cluster(proc.cluster)
        self._advance(proc, None)

    def _rejoin_centered(self, proc: Proc, was: int) -> None:
        """``proc`` of a centered algorithm rejoins through the center (module docstring)."""
        assert self._resume is not None and self._center is not None
        center = self.procs[self._center]
        name = self.membership.name(proc.pid)
        if proc is center:
            # A crashed worker's last ledger counts too: what it applied and the requests it
            # had served stay in the center's model and count (its daemon, alive, would answer).
            ledgers = {
                p.pid: self._ledger_of(p, center.pid)
                for p in self.procs
                if p is not center and p.ledger is not None
            }
            assert proc.x is not None
            proc.program = self._resume(proc.pid, 1, proc.x, (), ledgers)
            self._advance(proc, None)
            self.restarts.append(Restart(proc.pid, name, self.now, was, proc.step, None, None))
            return
        if center.crashed or center.x is None:  # nobody to take state from: it stays down
            self.restarts.append(Restart(proc.pid, name, self.now, was, None, None, None))
            self._crash(proc)
            return
        # The center's model report's key is its last answered request per worker, in pid order;
        # its ledger report, the sum of the differences it sent each (elastic variants).
        workers = [p for p in range(self.membership.processes) if p != center.pid]
        answered = dict(zip(workers, center.key, strict=False)).get(proc.pid, 0)
        sums = center.ledger.value if center.ledger is not None else {}
        total = sums.get(proc.pid, 0 * center.x)
        resumed_at = int(answered) + 1
        proc.program = self._resume(
            proc.pid,
            resumed_at,
            center.x.copy(),
            center.key,
            {proc.pid: Ledger(int(answered), None, total)},
        )
        proc.floor = resumed_at
        self.restarts.append(
            Restart(
                proc.pid,
                name,
                self.now,
                was,
                resumed_at,
                self.membership.name(center.pid),
                center.step,
            )
        )
        self._advance(proc, None)

    @staticmethod
    def _ledger_of(worker: Proc, center: int) -> Ledger:
        """``worker``'s ledger as a restarted center must count it: its last ledger report, or
        the one after the last center's answer it waits on if that answer is in its mailbox
        already (it computes a gradient before it takes the answer, and will apply it)."""
        rep = worker.ledger
        assert rep is not None
        waiting = rep.key[0] if rep.key else None
        if waiting is None:
            return Ledger(rep.step, None, rep.value)
        held = next(
            (m for m in worker.mailbox.get((ANSWER, waiting), ()) if m.sender == center), None
        )
        if held is not None:
            return Ledger(waiting, None, rep.value + held.value)
        return Ledger(rep.step, waiting, rep.value)

    def _active_partitions(self) -> list[Partition]:
        now = self.now
        return [p for p in self._partitions if p.start <= now and (p.end is None or now < p.end)]

    @staticmethod
    def _cut(parts: list[Partition], a: int, b: int) -> bool:
        for p in parts:
            ga, gb = p.group_of[a], p.group_of[b]
            if ga != gb and ga >= 0 and gb >= 0:
                return True
        return False

    def _heal(self, part: Partition) -> None:
        self._partitions.remove(part)
        parts = self._active_partitions()
        keep: list[tuple[int, Tag, Msg, bool]] = []
        for receiver, tag, msg, post in self._held:
            src = self.membership.cluster_of[msg.sender]
            if parts and self._cut(parts, src, self.membership.cluster_of[receiver]):
                keep.append((receiver, tag, msg, post))
                continue
            same = self._cluster_of[msg.sender] == self._cluster_of[receiver]
            delay = float((self._delay_local if same else self._delay_remote)(1)[0])
            if self._link is not None:
                delay *= self._link(msg.sender, receiver)
            self._send(tag, msg, np.array([self.now + delay]), np.array([receiver]), post)
        self._held = keep

    # --- liveness -------------------------------------------------------------------------------

    def _blocked(self) -> list[BlockedProcess]:
        out = []
        cluster_of = self.membership.cluster_of
        for proc in self.procs:
            if proc.crashed or proc.finished:
                continue
            if proc.receiving:
                name = self.membership.name(proc.pid)
                out.append(BlockedProcess(proc.pid, name, ("inbox",), 0, 1, "messages"))
                continue
            if proc.waiting is None:
                raise ProgramError(f"process {proc.pid} is neither done nor waiting at quiescence")
            tag, quorum = proc.waiting
            box = proc.mailbox.get(tag, [])
            have = quorum_have(quorum, box, cluster_of)
            unit = "clusters" if isinstance(quorum, MajorityOfClusters) else "processes"
            need = quorum_need(quorum, self.membership.clusters)
            out.append(
                BlockedProcess(proc.pid, self.membership.name(proc.pid), tag, have, need, unit)
            )
        return out
