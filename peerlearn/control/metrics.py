"""Prometheus metrics of one daemon (the names are part of the interface, DESIGN "Metrics").

Each daemon has its own registry (several daemons may share a process: ``peerlearn demo``,
tests). Hot-path figures live in plain counters (:class:`TransportStats`, the router's
counters) and worker fields; a custom collector turns them into samples at scrape time, so a
message costs a counter increment, not a Prometheus call. The two histograms of the hot path
(staleness per delivered message, DASGD's staleness per applied gradient) are plain bucket
counts (:class:`Buckets`) turned into histogram samples at scrape time too: a client
``Histogram.observe`` takes two locks and scans its buckets in Python, which cost a cheap DASGD
step about a fifth of its CPU (``benchmarks/bench_metrics.py``).
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from peerlearn import __version__

__all__ = ["DaemonMetrics", "Snapshot", "WorkerSample"]


@dataclass(frozen=True)
class WorkerSample:
    worker: str
    step: int  # iterations completed (Worker.completed), as /status reports it
    loss: float | None
    lag: int
    epochs: float | None = None  # passes over its data, where the problem counts them


@dataclass(frozen=True)
class Snapshot:
    """What the collector reads at scrape time."""

    workers: list[WorkerSample]
    consensus_host: float | None
    consensus_global: float | None
    consensus_global_age: float | None
    messages: dict[tuple[str, str, str], int]
    bytes: dict[tuple[str, str, str], int]
    dropped: dict[str, int]
    protocol_errors: dict[str, int]
    peers_connected: int
    peers_away: int
    peers_total: int
    agreement_rounds: int
    #: local workers by state (every state, 0 included, so that an alert can test for > 0)
    states: dict[str, int] = field(default_factory=dict)
    #: peers' frames held back now, beyond the tag window (unacknowledged)
    frames_held: int = 0


class DaemonMetrics:
    """The registry of one daemon; ``snapshot`` is called at every scrape. ``config`` labels
    ``peerlearn_config_info`` (what runs here: algorithm, problem, cluster, …)."""

    def __init__(
        self, snapshot: Callable[[], Snapshot], config: Mapping[str, str] | None = None
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = CollectorRegistry(auto_describe=True)
        build = {
            "version": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
        }
        Gauge(
            "peerlearn_build_info",
            "Always 1; the labels say which peerlearn (and Python, numpy) this daemon runs.",
            labelnames=list(build),
            registry=self.registry,
        ).labels(**build).set(1)
        config = dict(config or {})
        info = Gauge(
            "peerlearn_config_info",
            "Always 1; the labels say what this daemon runs (the run is the same on every "
            "daemon: compare fingerprints).",
            labelnames=list(config),
            registry=self.registry,
        )
        (info.labels(**config) if config else info).set(1)
        self.contraction = Histogram(
            "peerlearn_agreement_contraction",
            "Per worker and cluster-agreement round: diam² of the values received in round r+1 "
            "over diam² of those received in round r of the same instance (Lemma 19 bounds the "
            "system-wide ratio by 23/24 with MidExt, 79/80 with ApproachExt).",
            buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.875, 23 / 24, 1.0, 1.5, 2.0),
            registry=self.registry,
        )
        self.api_refused = Counter(
            "peerlearn_api_refused",
            "Control API requests refused, by reason: token (missing or wrong bearer token), "
            "origin (a cross-site request), host (a Host header that does not name this "
            "daemon) — for requests that change the daemon — and header_timeout (a "
            "connection that sent no whole request head in time, closed).",
            labelnames=["reason"],
            registry=self.registry,
        )
        # every reason at 0 from the start, for rate() and alerts
        for reason in ("token", "origin", "host", "header_timeout"):
            self.api_refused.labels(reason)
        #: per delivered message (the daemon updates it under its counters' lock)
        self.staleness = Buckets(STALENESS_BOUNDS)
        #: per applied DASGD gradient, one per worker (each written by its worker thread only)
        self.gradient_staleness: dict[str, Buckets] = {}
        self.registry.register(_Collector(snapshot, self))

    def gradient_buckets(self, worker: str) -> Buckets:
        """The gradient-staleness counts of ``worker`` (made on first use)."""
        buckets = self.gradient_staleness.get(worker)
        if buckets is None:
            buckets = self.gradient_staleness[worker] = Buckets(GRADIENT_STALENESS_BOUNDS)
        return buckets


STALENESS_BOUNDS = (-8, -4, -2, -1, 0, 1, 2, 4, 8, 16, 32, 64)
# unpaced DASGD on a small problem reaches thousands of gradients of staleness
GRADIENT_STALENESS_BOUNDS = (0, *(2**k for k in range(15)))


class Buckets:
    """Counts per histogram bucket, its sum and count, for one writer (or under the writer's
    own lock): ``observe`` is a bisection and three increments, no lock of its own. A scrape
    reads the counts while they may move — a sample may be one observation behind another,
    which Prometheus tolerates as it does any concurrent scrape."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def family(
        self, name: str, documentation: str, parts: list[Buckets], with_sum: bool
    ) -> HistogramMetricFamily:
        """``parts`` summed into one histogram family (cumulative buckets)."""
        counts = [sum(c) for c in zip(*(p.counts for p in parts), strict=True)]
        running, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        if with_sum:
            total = sum(p.total for p in parts)
            return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)
        # With negative buckets the client library exports no _sum (OpenMetrics); the _count
        # it keeps, and so does this.
        family = HistogramMetricFamily(name, documentation, buckets=buckets)
        family.samples.append(Sample(f"{name}_count", {}, running))
        return family


class _Collector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot], metrics: DaemonMetrics) -> None:
        self._snapshot = snapshot
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are dynamic per scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        loss = GaugeMetricFamily(
            "peerlearn_loss", "Loss of the worker's current model.", labels=["worker"]
        )
        step = GaugeMetricFamily(
            "peerlearn_step", "Iterations the worker has completed.", labels=["worker"]
        )
        steps = CounterMetricFamily(
            "peerlearn_steps",
            "Iterations the worker has completed (its step as a counter, for rate()).",
            labels=["worker"],
        )
        lag = GaugeMetricFamily(
            "peerlearn_step_lag",
            "Steps behind the fastest worker this daemon has heard from.",
            labels=["worker"],
        )
        epochs = GaugeMetricFamily(
            "peerlearn_epochs",
            "Passes the worker has made over its training data (its shard, or the whole set "
            "when it samples): only for problems that count them (a torch model's).",
            labels=["worker"],
        )
        for w in s.workers:
            if w.epochs is not None:
                epochs.add_metric([w.worker], w.epochs)
            step.add_metric([w.worker], w.step)
            steps.add_metric([w.worker], w.step)
            lag.add_metric([w.worker], w.lag)
            if w.loss is not None:
                loss.add_metric([w.worker], w.loss)
        yield from (loss, step, steps, lag, epochs)
        workers = GaugeMetricFamily(
            "peerlearn_workers",
            "Local workers by state: created, running, blocked (running, but waiting longer than "
            "stall_timeout on a quorum the connected daemons cannot meet, on a peer given up on "
            "or for room on a peer's link; not counted as running), finished, stopped, crashed "
            "(raised), diverged (a gradient or model turned non-finite; it stopped before "
            "sending it).",
            labels=["state"],
        )
        for state, count in s.states.items():
            workers.add_metric([state], count)
        yield workers
        m = self._metrics
        yield m.staleness.family(
            "peerlearn_staleness_steps",
            "Receiver's step minus the step a message was computed at, per delivered message "
            "(negative: it arrived early and was buffered).",
            [m.staleness],
            with_sum=False,
        )
        grads = list(m.gradient_staleness.values()) or [Buckets(GRADIENT_STALENESS_BOUNDS)]
        yield grads[0].family(
            "peerlearn_gradient_staleness",
            "DASGD: tight staleness |S| (Tosi–Theobald Def. 1, the symmetric difference of the "
            "applied gradient sets) of each gradient a worker applied; 0 for its own.",
            grads,
            with_sum=True,
        )
        cd = GaugeMetricFamily(
            "peerlearn_consensus_distance",
            "(1/n) Σ‖x_i − x̄‖²: host = this daemon's live workers (exact; crashed and diverged "
            "ones left out); global = with the latest models heard from peers.",
            labels=["scope"],
        )
        if s.consensus_host is not None:
            cd.add_metric(["host"], s.consensus_host)
        if s.consensus_global is not None:
            cd.add_metric(["global"], s.consensus_global)
        yield cd
        if s.consensus_global_age is not None:
            yield GaugeMetricFamily(
                "peerlearn_consensus_global_age_seconds",
                "Age of the oldest peer model used for the global consensus distance.",
                value=s.consensus_global_age,
            )
        msgs = CounterMetricFamily(
            "peerlearn_messages",
            "Messages by direction, kind and peer.",
            labels=["direction", "kind", "peer"],
        )
        nbytes = CounterMetricFamily(
            "peerlearn_bytes",
            "Bytes by direction, kind and peer.",
            labels=["direction", "kind", "peer"],
        )
        for key, v in s.messages.items():
            msgs.add_metric(list(key), v)
        for key, v in s.bytes.items():
            nbytes.add_metric(list(key), v)
        yield from (msgs, nbytes)
        dropped = CounterMetricFamily(
            "peerlearn_messages_dropped", "Messages dropped, by reason.", labels=["reason"]
        )
        for reason, v in s.dropped.items():
            dropped.add_metric([reason], v)
        errors = CounterMetricFamily(
            "peerlearn_protocol_errors", "Protocol errors from peers, by reason.", labels=["reason"]
        )
        for reason, v in s.protocol_errors.items():
            errors.add_metric([reason], v)
        yield from (dropped, errors)
        yield GaugeMetricFamily(
            "peerlearn_peers_connected",
            "Outbound links in state connected.",
            value=s.peers_connected,
        )
        yield GaugeMetricFamily(
            "peerlearn_peers_away",
            "Remote daemons unreachable for longer than peer_timeout.",
            value=s.peers_away,
        )
        yield GaugeMetricFamily(
            "peerlearn_peers", "Remote daemons in the static membership.", value=s.peers_total
        )
        yield GaugeMetricFamily(
            "peerlearn_frames_held",
            "Frames from peers held back unacknowledged: beyond the tag window (tag_window "
            "iterations, fewer for large models: tag_window_bytes) ahead "
            "of the workers they are for.",
            value=s.frames_held,
        )
        yield CounterMetricFamily(
            "peerlearn_agreement_rounds",
            "Cluster-agreement rounds completed by local workers.",
            value=s.agreement_rounds,
        )
