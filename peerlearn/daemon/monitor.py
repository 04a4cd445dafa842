"""What a daemon measures: losses, staleness, agreement, consensus, and which waits are blocked.

The numbers behind ``/metrics``, ``/status`` and the daemon's summary line, gathered off the
workers' hot path:

- **Loss evaluation.** A worker's ``Report("model")`` every ``eval_every`` steps marks its model
  due; the monitor's tick (:meth:`Monitor.evaluate_every_tick`, once a second) evaluates what is
  due on the fixed evaluation batch, on a thread, never on the worker's.
- **Reports.** Agreement rounds, DASGD's gradient staleness, the measured contraction of
  cluster-agreement rounds (:meth:`Monitor.on_report`, on the worker's thread: counters only).
- **Staleness** of delivered messages (:class:`Staleness`, fed by the local delivery).
- **Snapshots.** For algorithms whose messages carry no models, each local model to every peer
  daemon every ``snapshot_every`` seconds, so that peers can compute the global consensus
  distance (:meth:`Monitor.send_snapshots`).
- **Scrape-time figures** (:meth:`Monitor.snapshot`): per-worker step, loss and lag, the host's
  and the global consensus distance, transport counters, workers by state — counting as
  *blocked* a worker that waits longer than ``stall_timeout`` for a quorum the daemons
  connected now cannot meet (:meth:`Monitor.blocked`, :meth:`Monitor.reachable`; the shutdown
  uses the latter too), or — where frames are kept — on a peer given up on (away longer than
  ``peer_give_up``, :meth:`Monitor.waits_on`).

Kept apart from the lifecycle (:mod:`peerlearn.daemon.node`): it owns no task and no socket,
only figures; the daemon runs its loops in its task group and cancels them at shutdown.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from peerlearn.control.metrics import Buckets, DaemonMetrics, Snapshot, WorkerSample
from peerlearn.daemon.config import NodeConfig
from peerlearn.daemon.routing import Heard
from peerlearn.effects import Report, Vector, quiet_float_errors
from peerlearn.problems import Problem
from peerlearn.runtime.mailbox import Waiting
from peerlearn.runtime.worker import Worker, WorkerState
from peerlearn.sim.runner import consensus_distance
from peerlearn.transport.peers import Transport
from peerlearn.transport.stats import TransportStats

__all__ = ["Monitor", "SendWait", "Staleness", "WaitsOn"]

#: seconds between the monitor's evaluation ticks: at most one loss evaluation per worker and
#: tick. An evaluation costs about two gradients' CPU; a dashboard scraped every 5 s and a
#: status page polling every second need no more than one a second (what five a second cost
#: Alg 1 was within the noise of benchmarks/bench_metrics.py, see benchmarks/RESULTS.md).
_EVAL_TICK = 1.0


class Staleness:
    """The staleness of every broadcast message stored for a local worker: the receiver's step
    minus the step the message was computed at.

    :param receivers: the local workers by pid (the daemon fills it once they exist, before any
        message is delivered: the workers need the router, whose delivery calls :meth:`record`).
    :param histogram: ``peerlearn_staleness_steps``'s counts; None when metrics are off.

    ``total`` and ``count`` are plain mirrors of the histogram, kept with metrics off too (the
    demo's live table).
    """

    def __init__(self, receivers: Mapping[int, Worker], histogram: Buckets | None) -> None:
        self._receivers = receivers
        self._histogram = histogram
        self.total = 0
        self.count = 0

    def record(self, pid: int, step: int) -> None:
        """A message computed at ``step`` was stored for ``pid``; called under the delivery's
        lock (:class:`~peerlearn.runtime.delivery.Delivery`), from any producer's thread."""
        lag = self._receivers[pid].step - step
        self.total += lag
        self.count += 1
        if self._histogram is not None:
            self._histogram.observe(lag)


class Monitor:
    """The figures of one daemon (see the module docstring).

    :param workers: the daemon's local workers, in pid order.
    :param metrics: the registry whose histograms the reports feed.
    :param heard: what the router heard from remote workers.
    :param stats: the transport's counters.

    Until :meth:`attach` gives it the transport, no peer counts as connected.
    """

    def __init__(
        self,
        cfg: NodeConfig,
        problem: Problem | None,
        workers: Sequence[Worker],
        metrics: DaemonMetrics,
        heard: Heard,
        stats: TransportStats,
    ) -> None:
        self._cfg = cfg
        self._problem = problem
        self._workers = workers
        self._metrics = metrics
        self._heard = heard
        self._stats = stats
        self._cluster = cfg.me.cluster
        self._members = cfg.membership.members
        self._cluster_of = cfg.membership.cluster_of
        self._peers_total = len(cfg.all_daemons) - 1
        self._transport: Transport | None = None
        self._losses: dict[int, tuple[int, float]] = {}  # pid -> (step, loss at that step)
        self._gradient_buckets = {w.pid: metrics.gradient_buckets(w.name) for w in workers}
        self._eval_due: dict[int, tuple[int, Vector]] = {}  # pid -> (step, model) to evaluate
        self._eval_step: dict[int, int] = {}  # pid -> step of its last evaluation request
        self._spread: dict[int, tuple[Any, int, float]] = {}  # pid -> (instance, round, diam²)
        self._agreement_rounds = 0
        self._rounds = cfg.run.agreement_rounds()[0]
        self._counters = threading.Lock()  # reports come from every worker's thread

    def attach(self, transport: Transport) -> None:
        """The daemon's transport: which peers are connected, where snapshots go."""
        self._transport = transport

    # --- from the workers' threads ------------------------------------------------------------

    def on_report(self, worker: Worker, rep: Report) -> None:  # on the worker's thread
        name = rep.name
        if name == "model":
            if self._cfg.metrics and rep.step - self._eval_step.get(worker.pid, -(2**62)) >= (
                self._cfg.eval_every
            ):
                self._eval_step[worker.pid] = rep.step
                with self._counters:
                    self._eval_due[worker.pid] = (rep.step, rep.value)
        elif name == "agreement" and rep.key[2] is None and rep.key[1] <= self._rounds:
            with self._counters:  # a cluster round begins (round R + 1 is the output)
                self._agreement_rounds += 1
        elif not self._cfg.metrics:
            return
        elif name == "staleness":
            self._gradient_buckets[worker.pid].observe(rep.value)
        elif name == "agreement_spread":
            self._contraction(worker.pid, rep)

    def _contraction(self, pid: int, rep: Report) -> None:
        """Per worker: diam² of the values it received in cluster round r + 1 over that of
        round r of the same agreement instance (Lemma 19's factor, measured)."""
        instance, r = rep.key
        spread, norm2 = rep.value  # diam² received, ‖output‖²
        # Values that agree to rounding carry no contraction to measure (0/0 or noise/noise)
        floor = 1e-20 * norm2
        last = self._spread.get(pid)
        self._spread[pid] = (instance, r, spread if spread > floor else 0.0)
        if last is not None and last[0] == instance and last[1] == r - 1 and last[2] > 0:
            self._metrics.contraction.observe(spread / last[2])

    # --- loops the daemon runs in its task group ----------------------------------------------

    async def evaluate_every_tick(self) -> None:
        """Loss evaluation, off the workers' threads: whenever a worker went ``eval_every``
        steps since its last evaluation, its model at that step is kept, and evaluated on the
        fixed evaluation batch at the next of these ticks — one wake-up a second whatever the
        step rate (one per evaluation measurably slowed fast runs)."""
        while True:
            await asyncio.sleep(_EVAL_TICK)
            await self.evaluate()

    @property
    def sends_snapshots(self) -> bool:
        """Whether this daemon sends snapshots (:meth:`send_snapshots`)."""
        return (
            self._cfg.metrics
            and self._cfg.snapshot_every > 0
            # messages that carry no worker models: daemons send snapshots instead
            and not self._cfg.run.spec.sends_models
        )

    async def send_snapshots(self) -> None:
        """Every ``snapshot_every`` seconds, each local worker's model to every peer daemon —
        for algorithms whose messages carry no models, so that peers can compute the global
        consensus distance. The frames are counted like any other (kind ``snapshot``)."""
        transport = self._transport
        assert transport is not None
        while True:
            await asyncio.sleep(self._cfg.snapshot_every)
            models = [(w.pid, w.step, w.x) for w in self._workers if w.x is not None]
            # offer() may wait (bounded) for room on a full link: not on the event loop
            await asyncio.to_thread(_send_snapshots, transport, models)

    async def watch_peers(self) -> None:
        """Log the peers given up on (away longer than peer_give_up, where frames are kept),
        once each, soon after it happens: a link's own task may sit in a connect attempt for
        seconds, and /status judges it live anyway."""
        transport = self._transport
        assert transport is not None
        period = min(1.0, self._cfg.peer_timeout / 4)
        while True:
            await asyncio.sleep(period)
            for link in transport.links:
                link.check_give_up()

    async def evaluate(self, final: bool = False) -> None:
        """Evaluate the models that are due (``final``: every worker's current model)."""
        problem = self._problem
        if problem is None or not self._cfg.metrics:
            return
        with self._counters:
            due = dict(self._eval_due)
            self._eval_due.clear()
        if final:
            due |= {w.pid: (w.step, w.x) for w in self._workers if w.x is not None}
        todo = [
            (pid, step, x)
            for pid, (step, x) in due.items()
            if self._losses.get(pid, (-1, 0.0))[0] != step
        ]
        if todo:
            batch = self._cfg.eval_batch

            def losses() -> list[float]:
                with quiet_float_errors():  # a model near divergence evaluates to inf, quietly
                    return [problem.eval_loss(x, batch) for _, _, x in todo]

            values = await asyncio.to_thread(losses)
            for (pid, step, _), value in zip(todo, values, strict=True):
                self._losses[pid] = (step, value)

    # --- figures ------------------------------------------------------------------------------

    @property
    def losses(self) -> Mapping[int, tuple[int, float]]:
        """pid → (step, the loss of its model at that step), of the evaluations so far."""
        return self._losses

    def loss_of(self, worker: Worker) -> float | None:
        """The latest loss evaluation of ``worker``'s model; None: none yet."""
        entry = self._losses.get(worker.pid)
        return entry[1] if entry is not None else None

    def _worker_samples(self) -> Iterator[tuple[Worker, float | None]]:
        for w in self._workers:
            entry = self._losses.get(w.pid)
            yield w, entry[1] if entry is not None else None

    def snapshot(self) -> Snapshot:
        """What ``/metrics`` reports, at scrape time."""
        fastest = max([w.step for w in self._workers] + [self._heard.fastest_step])
        # live workers only (Worker.live): a crashed worker's model is frozen, a diverged one's
        # may be astronomically far away (a remote worker stops before it sends such a model)
        local = [w.x for w in self._workers if w.live and w.x is not None]
        now = time.monotonic()
        heard = dict(self._heard.models)
        models = local + [v for _, v in heard.values()]
        transport = self._transport
        return Snapshot(
            workers=[
                WorkerSample(w.name, w.completed, loss, fastest - w.step, w.epochs)
                for w, loss in self._worker_samples()
            ],
            consensus_host=consensus_distance(local) if local else None,
            consensus_global=consensus_distance(models) if heard else None,
            consensus_global_age=max((now - t for t, _ in heard.values()), default=None),
            messages=dict(self._stats.messages),
            bytes=dict(self._stats.bytes),
            dropped=dict(self._stats.dropped),
            protocol_errors=dict(self._stats.protocol_errors),
            peers_connected=transport.connected() if transport else 0,
            peers_away=sum(1 for link in transport.links if link.away) if transport else 0,
            peers_total=self._peers_total,
            agreement_rounds=self._agreement_rounds,
            states=self._states(),
            frames_held=transport.holding if transport else 0,
        )

    def _states(self) -> dict[str, int]:
        """Local workers by state for ``peerlearn_workers``: every state, 0 included, with a
        blocked worker (see :meth:`worker_blocked`) counted as blocked instead of running."""
        states = {s.value: 0 for s in WorkerState} | {"blocked": 0}
        for w in self._workers:
            states["blocked" if self.worker_blocked(w) else w.state.value] += 1
        return states

    def worker_blocked(self, worker: Worker) -> bool:
        """Blocked on a quorum (:meth:`blocked`) or on a peer's full link (:meth:`sending`);
        a finished worker never is (one that still answers its inbox, ``Done``, waits on it)."""
        if worker.done.is_set():
            return False
        send = self.sending(worker)
        return self.blocked(worker.mailbox.waiting()) or (send is not None and send.blocked)

    def sending(self, worker: Worker) -> SendWait | None:
        """The peer whose full link ``worker`` waits on to send, if it waits on one: blocked
        after stall_timeout (a peer that reads nothing, or is away while its frames are kept)."""
        ident = worker.thread_id
        if self._transport is None or ident is None:
            return None
        for link in self._transport.links:
            since = link.senders_waiting.get(ident)
            if since is not None:
                waited = time.monotonic() - since
                return SendWait(link.name, link.cluster, waited, waited > self._cfg.stall_timeout)
        return None

    def blocked(self, waiting: Waiting | None) -> bool:
        """Waiting longer than stall_timeout on a quorum the daemons connected now cannot meet,
        or on a peer given up on (:meth:`waits_on`): what ``/status`` and
        ``peerlearn_workers{state="blocked"}`` call blocked."""
        if waiting is None or time.monotonic() - waiting.since <= self._cfg.stall_timeout:
            return False
        return not self.reachable(waiting) or self.waits_on(waiting).given_up

    def waits_on(self, waiting: Waiting) -> WaitsOn:
        """Whom a wait waits on: the processes (or clusters) whose message has not arrived, and
        which of the peer daemons hosting them are away now. An inbox takes anyone's letters, so
        every peer away now could be the one it waits for."""
        away = self._away()
        if waiting.unit == "messages":  # the inbox (Receive): senders unknown
            return WaitsOn(None, tuple(sorted(away)), any(away.values()))
        arrived = set(waiting.senders)
        if waiting.unit == "clusters":
            have = {self._cluster_of[p] for p in arrived}
            missing = tuple(c for c in range(len(self._members)) if c not in have)
            hosts = set(missing)
        else:
            missing = tuple(p for p in range(len(self._cluster_of)) if p not in arrived)
            hosts = {self._cluster_of[p] for p in missing}
        peers = tuple(sorted(c for c in hosts if c in away))
        return WaitsOn(missing, peers, any(away[c] for c in peers))

    def _away(self) -> dict[int, bool]:
        """The peer daemons away now, each with whether it is given up on."""
        if self._transport is None:
            return {}
        return {link.cluster: link.given_up for link in self._transport.links if link.away}

    def reachable(self, waiting: Waiting) -> bool:
        """Could the quorum still be met by this daemon and the daemons connected now?"""
        live = {self._cluster}
        if self._transport is not None:
            live |= self._transport.connected_clusters()
        if waiting.unit == "clusters":
            return len(live) >= waiting.need
        return sum(len(self._members[c]) for c in live) >= waiting.need


class WaitsOn(NamedTuple):
    """Whom a worker's wait for messages waits on (:meth:`Monitor.waits_on`)."""

    #: pids (a count of processes) or cluster ids (a majority of clusters) whose message has
    #: not arrived; None for an inbox, which anyone may post to
    missing: tuple[int, ...] | None
    peers: tuple[int, ...]  # the cluster ids of the daemons hosting them that are away now
    given_up: bool  # one of those peers is given up on (away longer than peer_give_up)


class SendWait(NamedTuple):
    """A worker waiting for room on the link to a peer."""

    peer: str  # the link's name, cluster@host:port
    cluster: int
    seconds: float
    blocked: bool  # longer than stall_timeout


def _send_snapshots(transport: Transport, models: list[tuple[int, int, Vector]]) -> None:
    for pid, step, x in models:
        transport.broadcast(("snapshot", step), pid, step, x)
