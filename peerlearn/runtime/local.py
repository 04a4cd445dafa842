"""Every process of a run as a worker thread of this one Python process.

The in-process runtime: one :class:`RegisterStore` per cluster, one :class:`Mailbox` per
worker, and a router that delivers every broadcast to every mailbox by reference. It runs the
same programs as the simulator and the daemon, on real threads, so tests can check the runtime
pieces (store, mailboxes, workers) without sockets; the daemon swaps the router for one that
also sends frames to remote daemons. Both routers deliver locally through the one
:class:`~peerlearn.runtime.delivery.Delivery`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from peerlearn.config import RunConfig
from peerlearn.effects import Msg, Report, Tag, Vector
from peerlearn.membership import Membership
from peerlearn.runs import build_problem, grad_stream, make_programs
from peerlearn.runtime.delivery import Delivery, share
from peerlearn.runtime.mailbox import Mailbox, Put
from peerlearn.runtime.store import RegisterStore
from peerlearn.runtime.worker import Worker, WorkerState

__all__ = ["LocalRouter", "ThreadRun"]


class LocalRouter:
    """Delivers each broadcast to every registered mailbox, the sender's included."""

    def __init__(self) -> None:
        self.mailboxes: dict[int, Mailbox] = {}
        self.delivery = Delivery(self.mailboxes)

    @property
    def counts(self) -> dict[Put, int]:
        """Messages by what their mailbox did with them."""
        return self.delivery.counts

    def broadcast(self, sender: int, tag: Tag, value: Vector, step: int) -> None:
        share(value)
        self.delivery.fan_out(tag, Msg(sender, value), step)

    def send(
        self, sender: int, to: tuple[int, ...], tag: Tag, value: Vector, step: int, post: bool
    ) -> None:
        share(value)
        self.delivery.deliver_to(to, tag, sender, value, post)


class ThreadRun:
    """All processes of ``cfg`` as threads; ``worker_factory`` lets tests inject faults."""

    def __init__(
        self,
        cfg: RunConfig,
        worker_factory: Callable[..., Worker] = Worker,
        on_report: Callable[[Worker, Report], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.membership: Membership = cfg.membership
        self.problem = build_problem(cfg)
        self.router = LocalRouter()
        members = self.membership
        self.stores = [RegisterStore(ms) for ms in members.members]
        programs = make_programs(cfg, self.problem, range(cfg.processes))
        self.workers: list[Worker] = []
        for pid, program in enumerate(programs):
            grad = (
                self.problem.oracle(pid, cfg.processes, cfg.processes)
                if self.problem is not None
                else _no_grad
            )
            box = Mailbox(members.cluster_of, members.clusters)
            self.router.mailboxes[pid] = box
            self.workers.append(
                worker_factory(
                    pid,
                    members.name(pid),
                    program,
                    grad,
                    grad_stream(cfg, pid),
                    box,
                    self.stores[members.cluster_of[pid]],
                    self.router,
                    on_report,
                )
            )
            self.workers[-1].compressor = cfg.compressor()

    def start(self) -> ThreadRun:
        for w in self.workers:
            w.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every worker is done; False if ``timeout`` passed first. Workers that
        finished but go on answering their inbox (``Done``) are stopped then: nobody is left
        to ask them anything."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if not all(w.done.wait(left()) for w in self.workers):
            return False
        for w in self.workers:
            w.stop()
        return all(w.join(left()) for w in self.workers)

    def stop(self, pids: Iterable[int] | None = None) -> None:
        for w in self.workers if pids is None else (self.workers[p] for p in pids):
            w.stop()

    def states(self) -> list[WorkerState]:
        return [w.state for w in self.workers]


def _no_grad(x: Vector, rng: object) -> Vector:
    raise AssertionError("standalone agreement computes no gradient")
