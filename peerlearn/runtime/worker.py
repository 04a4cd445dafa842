"""Worker threads: one algorithm program each, its effects mapped onto real resources.

=================  ========================================================================
effect             on a worker thread
=================  ========================================================================
``Grad(x)``        the problem's oracle on this thread, with the worker's own RNG stream (then
                   a sleep of ``compute_delay`` seconds, if set: an emulated slower host)
``Broadcast``      the router: local mailboxes by reference, each remote daemon once
``Send``/``Post``  the router, to the listed processes only (``Post``: into their inboxes)
``Await``          :meth:`Mailbox.take` — a condition wait, no polling
``Receive``        :meth:`Mailbox.receive` — the whole inbox; a condition wait if ``block``
``Write``          :meth:`RegisterStore.write` — one reference store, no lock
``Collect``        :meth:`RegisterStore.read` register by register (:meth:`Worker.between_reads`
                   runs between two reads: the fault kit's hook)
``Report``         progress (``"model"``) and metric samples, through ``on_report``
``Quantize``       the worker's :class:`~peerlearn.compression.Compressor` (its streams'
                   residuals live as long as the worker)
=================  ========================================================================

A worker that raises counts as a crashed process (crash-stop): its thread ends, the daemon goes
on serving and relaying for the others. A worker whose gradient (as the oracle returns it), model
(as it is reported) or any value it is about to send or write is not finite has *diverged*: it
stops the same way, before the value reaches anybody, in state ``diverged``. The program and the
oracle run with numpy's floating-point warnings off: those checks report the problem instead.
:meth:`Worker.stop` lets the current iteration finish.

A daemon that catches up hands a worker a *resumed* program (:meth:`Worker.rejoin`, built by
the algorithm's resume entry point from a peer's state): the worker drops its current program
before its next effect — at once if it waits for messages — and goes on with the resumed one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from peerlearn.compression import Compressor
from peerlearn.effects import (
    Await,
    Broadcast,
    Collect,
    Divergence,
    Done,
    Exchange,
    Grad,
    Msg,
    Post,
    Program,
    Quantity,
    Quantize,
    Receive,
    Report,
    Send,
    Tag,
    Vector,
    Write,
    finite,
    quiet_float_errors,
)
from peerlearn.errors import ProgramError
from peerlearn.runtime.mailbox import Mailbox, MailboxClosed, MailboxRedirected
from peerlearn.runtime.store import RegisterStore

__all__ = ["LIVE_STATES", "Router", "Worker", "WorkerState"]

log = logging.getLogger(__name__)


class WorkerState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    FINISHED = "finished"  # the program returned
    STOPPED = "stopped"  # asked to stop, at an iteration boundary or while waiting
    CRASHED = "crashed"  # the program or the oracle raised
    DIVERGED = "diverged"  # a gradient or model turned non-finite: stopped before sending it


#: The states of a *live* worker: one whose model counts wherever workers' models are
#: combined (a daemon's mean model and consensus distances, the demo's mean model) and whose
#: step counts in progress waits. A whitelist, so that a failed state added later is left out
#: too: a crashed worker's model is frozen and a diverged one's last finite model may be
#: astronomically far from the others.
LIVE_STATES = frozenset(
    {WorkerState.CREATED, WorkerState.RUNNING, WorkerState.FINISHED, WorkerState.STOPPED}
)


class Router(Protocol):
    """Where messages go: a broadcast to every process of the run, the sender included; a
    send or post to the listed processes."""

    def broadcast(self, sender: int, tag: Tag, value: Vector, step: int) -> None: ...

    def send(
        self, sender: int, to: tuple[int, ...], tag: Tag, value: Vector, step: int, post: bool
    ) -> None: ...


class _Stop(Exception):
    """Raised inside the worker loop to leave at an iteration boundary."""


class _Diverged(Exception):
    """Raised inside the worker loop when a value turned out non-finite."""

    def __init__(self, step: int, quantity: Quantity) -> None:
        super().__init__(step, quantity)
        self.divergence = Divergence(max(step, 0), quantity)


class Worker:
    """One process of the run: a program on its own OS thread.

    :param pid: global process id.
    :param name: ``cluster.index``.
    :param grad: the stochastic oracle ``grad(x, rng)``.
    :param on_report: called on the worker thread for every ``Report`` (keep it cheap).
    """

    def __init__(
        self,
        pid: int,
        name: str,
        program: Program,
        grad: Callable[[Vector, np.random.Generator], Vector],
        rng: np.random.Generator,
        mailbox: Mailbox,
        store: RegisterStore,
        router: Router,
        on_report: Callable[[Worker, Report], None] | None = None,
        compressor: Compressor | None = None,
    ) -> None:
        self.pid = pid
        self.name = name
        self.mailbox = mailbox
        self.state = WorkerState.CREATED
        self.step = 0
        self.x: Vector | None = None
        #: (step, x, key of its report) as one reference, for readers on other threads (a
        #: state answer) that need them to match; the key is what else of the state the
        #: program reports with its model (DASGD: the version vector)
        self.position: tuple[int, Vector | None, Tag] = (0, None, ())
        #: ``position`` with its gradient-noise generator's state and its ``ledger`` then, as
        #: one reference: what a checkpoint keeps of the worker (read on the event loop). The
        #: ledger is the one reported before the model: every exchange it sums is applied to
        #: that model, and no request is out (a worker asks after reporting its model).
        self.saved: tuple[
            tuple[int, Vector | None, Tag], dict[str, Any] | None, tuple[int, Any, Tag] | None
        ] = (self.position, None, None)
        #: keep the generator's state in ``saved`` (a checkpointing daemon: about 1 µs a step)
        self.keeps_rng = False
        #: the program's last ``Report("ledger", …)`` as (step, value, key): what it holds of
        #: its exchanges with a center (a worker's sum of differences; the center's, per worker)
        self.ledger: tuple[int, Any, Tag] | None = None
        self.output: Any = None
        self.error: str | None = None
        self.diverged: Divergence | None = None
        self.grads = 0
        self.grad_seconds = 0.0
        self.rejoins = 0  # resumed programs taken (catch-ups)
        self._program = program
        self._grad = grad
        self._rng = rng
        self._store = store
        self._router = router
        self._on_report = on_report
        #: seconds added to every gradient (the daemon's ``compute_delay``)
        self.compute_delay = 0.0
        #: rounds what the program sends (``Quantize``): the run's payload compression
        self.compressor = compressor if compressor is not None else Compressor()
        self._stop = threading.Event()
        self.done = threading.Event()
        #: called on the worker thread when it ends, however it ends
        self.on_exit: Callable[[Worker], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"worker-{name}", daemon=True)

    def __repr__(self) -> str:
        return f"Worker({self.name}, {self.state}, step={self.step})"

    @property
    def live(self) -> bool:
        """Neither crashed nor diverged (nor in any other failed state): see :data:`LIVE_STATES`."""
        return self.state in LIVE_STATES

    @property
    def epochs(self) -> float | None:
        """Passes over its data its gradient oracle has made, where the oracle counts them (a
        problem whose processes read data of their own: :mod:`peerlearn.torch`); else None."""
        epochs = getattr(self._grad, "epochs", None)
        return float(epochs) if isinstance(epochs, int | float) else None

    @property
    def thread_id(self) -> int | None:
        """Its thread's ident (None before it starts): who is waiting, to a link's producer."""
        return self._thread.ident

    @property
    def completed(self) -> int:
        """Iterations this worker has completed: what logs, ``/status`` and ``peerlearn_step``
        call its step. (``step`` is the iteration it is in, as its program reported at the
        iteration's start — T + 1 once T are done — and what its messages are stamped with.)"""
        return max(self.step - 1, 0)

    def start(self) -> None:
        self.state = WorkerState.RUNNING
        self._thread.start()

    def request_stop(self) -> None:
        """Stop at the next iteration boundary: the current iteration is finished first."""
        self._stop.set()

    def stop(self) -> None:
        """Stop now: at the next iteration boundary, or at once if it waits for messages."""
        self._stop.set()
        self.mailbox.close()

    def rejoin(self, step: int, program: Program) -> None:
        """Go on with ``program``, resumed at iteration ``step``, instead of the current one —
        unless the worker has reached ``step`` by itself when it takes it over."""
        self.mailbox.redirect(step, program)

    def hold(
        self,
        step: int,
        model: Vector,
        key: Tag,
        rng: dict[str, Any] | None,
        ledger: tuple[int, Vector, Tag] | None = None,
    ) -> None:
        """Before it starts: the state it would resume from (a checkpoint's, with its ``ledger``
        with a center), shown to a peer that asks for state and kept by the next checkpoint,
        while it waits to learn whether it takes a live peer's state instead (its own step
        stays 0: any state is newer)."""
        if self.state is not WorkerState.CREATED:
            raise RuntimeError(f"worker {self.name} has started: it holds its own state")
        # (the generator's state is kept whichever state it goes on from: its noise goes on)
        self._take_state(step, model, key, rng, ledger)

    def forget_ledger(self) -> None:
        """Before it starts: it starts over after all, holding no ledger with a center."""
        if self.state is not WorkerState.CREATED:
            raise RuntimeError(f"worker {self.name} has started: its ledger is its own")
        self.ledger = None

    def restore(
        self,
        step: int,
        program: Program,
        model: Vector,
        key: Tag,
        rng: dict[str, Any] | None,
        ledger: tuple[int, Vector, Tag] | None = None,
    ) -> None:
        """Before it starts: begin with ``program`` at iteration ``step`` from a checkpoint
        (its ``model``, the ``key`` it was reported with, its generator's state ``rng``, its
        ``ledger`` with a center); replaces the program it was made with."""
        if self.state is not WorkerState.CREATED:
            raise RuntimeError(f"worker {self.name} has started: it cannot be restored")
        self._program.close()
        self._program = program
        self.step = step
        self._take_state(step, model, key, rng, ledger)

    def _take_state(
        self,
        step: int,
        model: Vector,
        key: Tag,
        rng: dict[str, Any] | None,
        ledger: tuple[int, Vector, Tag] | None,
    ) -> None:
        """Model, position, generator and ledger from a checkpoint, saved as they are."""
        if rng is not None:
            self._rng.bit_generator.state = rng
        self.x = model
        self.position = (step, model, key)
        if ledger is not None:
            self.ledger = ledger
        self.saved = (self.position, rng, self.ledger)

    def abandon(self) -> None:
        """A worker never started (the daemon stopped while it waited to start): ends as
        stopped, and its mailbox and registers are freed."""
        if self.state is WorkerState.CREATED:
            self.state = WorkerState.STOPPED
            self._program.close()
            self._store.retire(self.pid)
            self.mailbox.retire()
            self.done.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is None:  # never started: nothing to wait for
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- hooks (the fault kit overrides these) ------------------------------------------------

    def between_reads(self, key: Tag, index: int) -> None:
        """Runs between two register reads of a collect; a no-op."""

    # --- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        with quiet_float_errors():  # numpy's error state is per thread: set it on this one
            self._loop()

    def _loop(self) -> None:
        send = self._program.send
        value: Any = None
        mailbox = self.mailbox
        interrupted: Any = None  # a wait a hand-over interrupted, to go on with if declined
        try:
            while True:
                if (redirect := mailbox.take_redirect()) is not None:
                    step, program = redirect
                    if step > self.step:  # behind it still: the old program ends here
                        self._program.close()
                        self._program = program
                        send = program.send
                        value = interrupted = None
                        self.rejoins += 1
                    else:
                        program.close()
                eff = interrupted if interrupted is not None else send(value)
                interrupted = None
                if isinstance(eff, Done):  # finished; it goes on answering its inbox
                    self.output = eff.value
                    self.state = WorkerState.FINISHED
                    self._exited()
                    value = None
                    continue
                try:
                    value = self._effect(eff)
                except MailboxRedirected:
                    # Waiting, so nothing of the effect is left but the wait (an Exchange
                    # has broadcast already).
                    interrupted = Await(eff.tag, eff.quorum) if isinstance(eff, Exchange) else eff
        except StopIteration as stop:
            self.output = stop.value
            self.state = WorkerState.FINISHED
        except (_Stop, MailboxClosed):
            if self.state is not WorkerState.FINISHED:  # (a finished one answered till now)
                self.state = WorkerState.STOPPED
            self._program.close()
        except _Diverged as exc:
            self.diverged = exc.divergence
            self.state = WorkerState.DIVERGED
            step, quantity = exc.divergence
            log.error(
                "worker %s diverged: non-finite %s at iteration %d; it stopped before sending it",
                self.name,
                quantity,
                step,
            )
            self._program.close()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = WorkerState.CRASHED
            # With its traceback: a problem or program that raises is a bug to find.
            log.exception(
                "worker %s crashed after %d completed steps: %s",
                self.name,
                self.completed,
                self.error,
            )
            self._program.close()
        finally:
            self._store.retire(self.pid)
            self.mailbox.retire()
            self._exited()

    def _exited(self) -> None:
        """Done: said once, when the program finished (``Done``) or its thread ends."""
        if self.done.is_set():
            return
        self.done.set()
        if self.on_exit is not None:
            self.on_exit(self)

    def _effect(self, eff: Any) -> Any:
        """Carry out one effect; its result for the program."""
        value: Any = None
        match eff:
            case Grad(x=x):
                started = time.perf_counter()
                value = self._grad(x, self._rng)
                if self.compute_delay > 0.0:
                    self._stop.wait(self.compute_delay)  # an emulated slower host; stop cuts it
                self.grad_seconds += time.perf_counter() - started
                self.grads += 1
                if not finite(value):
                    raise _Diverged(self.step, "gradient")
            case Exchange(tag=tag, value=v, quorum=quorum):
                self._outgoing(v)
                self._router.broadcast(self.pid, tag, v, self.step)
                value = self.mailbox.take(tag, quorum)
            case Await(tag=tag, quorum=quorum):
                value = self.mailbox.take(tag, quorum)
            case Broadcast(tag=tag, value=v):
                self._outgoing(v)
                self._router.broadcast(self.pid, tag, v, self.step)
            case Send(to=to, tag=tag, value=v):
                self._outgoing(v)
                self._router.send(self.pid, to, tag, v, self.step, False)
            case Post(to=to, tag=tag, value=v):
                self._outgoing(v)
                self._router.send(self.pid, to, tag, v, self.step, True)
            case Receive(block=block):
                value = self.mailbox.receive(block)
            case Quantize(stream=stream, value=v):
                value = self.compressor(stream, v)
            case Write(key=key, value=v):
                self._outgoing(v)  # the cluster's other workers read it
                self._store.write(self.pid, key, v)
            case Collect(key=key):
                value = self._collect(key)
            case Report() as rep:
                if rep.name == "model":
                    self._model(rep)
                elif rep.name == "state":  # what else of the state changed, at this step
                    self.position = (self.step, self.x, rep.key)
                    # (the generator's state and the ledger as they were at the model)
                    self.saved = (self.position, self.saved[1], self.saved[2])
                elif rep.name == "ledger":
                    self.ledger = (rep.step, rep.value, rep.key)
                if self._on_report is not None:
                    self._on_report(self, rep)
            case _:
                raise ProgramError(f"worker {self.name} yielded {eff!r}, which is no effect")
        return value

    def _model(self, rep: Report) -> None:
        if self._stop.is_set():  # the previous iteration is complete: leave here
            raise _Stop
        if not finite(rep.value):  # x_t is what iteration t − 1 produced; x keeps x_{t−1}
            raise _Diverged(rep.step - 1, "model")
        self.step, self.x = rep.step, rep.value
        self.position = (rep.step, rep.value, rep.key)
        rng = dict(self._rng.bit_generator.state) if self.keeps_rng else None
        self.saved = (self.position, rng, self.ledger)
        self.mailbox.advance(rep.step)
        self._store.advance(self.pid, rep.step)

    def _outgoing(self, value: Vector) -> None:
        if not finite(value):  # derived from the model (a gradient was checked as computed)
            raise _Diverged(self.step, "model")

    def _collect(self, key: Tag) -> tuple[Msg, ...]:
        got = []
        for index in range(len(self._store.members)):
            self.between_reads(key, index)
            msg = self._store.read(key, index)
            if msg is not None:
                got.append(msg)
        return tuple(got)
