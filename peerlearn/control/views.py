"""The JSON ``/status`` and ``/peers`` answer with: how it is built, and its schemas.

:func:`status_view` and :func:`peers_view` build the answers as plain dicts from what a daemon
shows of itself (:class:`StatusSource`: its state, run, workers, out-links, and the monitor's
losses and blocked judgement — read-only, no private member), here rather than in the daemon,
which keeps only its lifecycle. The pydantic models give the answers their schemas in the
OpenAPI document (``/openapi.json``, ``/docs``). The handlers send the dicts as built, so a
field the models lack is never dropped from a response and a mismatch can never turn
``/status`` into an error 500. The models forbid unknown fields instead, and the tests validate
a live daemon's answers against the served schemas: a field added to a view without its model
fails there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from peerlearn.config import Algorithm, RunConfig
from peerlearn.membership import Membership
from peerlearn.problems import Problem
from peerlearn.runtime.mailbox import Waiting
from peerlearn.runtime.worker import Worker
from peerlearn.transport.links import LinkState, OutLink

if TYPE_CHECKING:
    from peerlearn.daemon.monitor import SendWait, WaitsOn
    from peerlearn.daemon.rejoin import Rejoin

__all__ = [
    "DivergenceView",
    "PeerView",
    "StatusSource",
    "StatusView",
    "WaitingView",
    "WorkerView",
    "peers_view",
    "status_view",
]


#: missing senders named in a wait, at most (a Count(1) wait on a run of 1000 processes would
#: otherwise list 999); ``missing_total`` counts them all
MISSING_SHOWN = 16


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WaitingView(_View):
    """What a worker is waiting for right now."""

    tag: list[str | int] = Field(
        description='the instance awaited: a kind and its iteration, round…, e.g. ["params", 12]'
    )
    have: int = Field(description="how many have arrived so far (in `unit`)")
    need: int = Field(description="how many the quorum needs (in `unit`)")
    unit: str = Field(description="what `have` and `need` count: processes, clusters or messages")
    seconds: float = Field(description="how long the worker has been waiting")
    missing: list[str] | None = Field(
        description="whose message for `tag` has not arrived (the worker itself left out): "
        'process names "cluster.index" when `unit` is processes, cluster ids when it is '
        f"clusters; at most {MISSING_SHOWN}, in order (see `missing_total`). Null for the "
        "inbox (`messages`), which any process may post to"
    )
    missing_total: int | None = Field(
        description="how many are missing in all (null for the inbox)"
    )
    peers: list[int] = Field(
        description="the cluster ids of the daemons away now (see /peers) that host a missing "
        "sender; for the inbox, every daemon away now: its letters could be the ones awaited"
    )


class SendingView(_View):
    """The peer whose full link a worker waits on to send a message."""

    peer: str = Field(description="the peer's link, cluster@host:port")
    cluster: int = Field(description="the peer's cluster id")
    seconds: float = Field(description="how long the worker has been waiting for room")


class DivergenceView(_View):
    """Where a worker diverged: it stopped there, before sending the value."""

    step: int = Field(
        description="the iteration that produced the non-finite value (1, 2, …); 0 when the "
        "value came before any iteration, e.g. a non-finite starting model x₁"
    )
    quantity: Literal["gradient", "model"] = Field(
        description="what held a NaN or an infinity: the gradient the worker computed, or its "
        "model (or a value derived from it that it was about to send)"
    )


class WorkerView(_View):
    """One worker thread (one process of the run) of this daemon."""

    id: str = Field(description='the process name "cluster.index", e.g. "0.1"; /model takes it')
    state: str = Field(
        description="created, running, finished, stopped, crashed, diverged (a gradient or "
        "model turned non-finite), or blocked: waiting longer than stall_timeout for a quorum "
        "the connected daemons cannot meet, or for room on a peer's link (see `sending`)"
    )
    step: int = Field(description="iterations the worker has completed")
    gradients: int = Field(description="stochastic gradients computed")
    epochs: float | None = Field(
        None,
        description="passes over its training data so far (its shard, or the whole set when "
        "it samples), where the problem counts them (a torch model's); absent otherwise",
    )
    loss: float | None = Field(
        description="the latest loss evaluation (null: none yet, or not finite)"
    )
    error: str | None = Field(description="why the worker crashed (null: it did not)")
    diverged: DivergenceView | None = Field(description="where it diverged (null: it did not)")
    waiting: WaitingView | None = Field(
        None, description="present only while the worker waits for messages"
    )
    sending: SendingView | None = Field(
        None,
        description="present only while the worker waits for room on a peer's link (the peer "
        "reads nothing, or is away and this algorithm keeps its frames)",
    )


class PeerView(_View):
    """The link from this daemon to another daemon of the run."""

    cluster: int = Field(description="the other daemon's cluster id")
    address: str = Field(description="its peer address, host:port")
    state: LinkState = Field(description="the link's state")
    away: bool = Field(description="not connected for longer than peer_timeout")
    away_seconds: float | None = Field(
        description="how long it has been gone (since it was last heard from) while it is away; "
        "null while it is not. Where frames are kept, beyond peer_give_up the workers waiting "
        "on it are reported blocked"
    )
    outstanding: int = Field(description="frames queued or sent but not acknowledged yet")
    held: int = Field(
        0,
        description="frames it sent that this daemon holds back, unacknowledged, because they "
        "are beyond the tag window (tag_window iterations, fewer for large models) ahead of the "
        "workers they are for",
    )
    refused: str | None = Field(
        description="why the peer refused the last handshake, in this daemon's words (null: it "
        "did not)"
    )
    last_error: str | None = Field(
        description="why the last attempt to reach it failed, e.g. a name that does not "
        "resolve or a refused connection (null: none since it was last connected)"
    )


class RejoinedView(_View):
    """The last time this daemon's workers caught up from a peer's state."""

    peer: int | None = Field(
        description="the cluster id of the daemon whose state they took (null: a restarted "
        "center, rebuilt from the ledgers of every daemon hosting workers)"
    )
    was: int = Field(description="the iteration the slowest of them was at")
    resumed_at: int = Field(description="the iteration they resumed at")
    seconds_ago: float


class CatchupView(_View):
    """Catching up: a peer dropped messages the workers here still needed (they were stopped,
    cut off or restarted), so they take a live peer's state instead of waiting for them."""

    rejoins: int = Field(description="how often the workers resumed from a peer's state")
    asking: int | None = Field(
        description="the cluster id of the daemon asked for its state now (null: none)"
    )
    asking_seconds: float | None = Field(description="how long ago it was asked")
    gathering: list[int] = Field(
        description="a restarted center's daemon: the cluster ids of the daemons whose workers' "
        "ledgers it still waits for (empty: none)"
    )
    last: RejoinedView | None = Field(description="the last catch-up (null: none yet)")


class ResumedView(_View):
    """How this daemon resumed from its checkpoint."""

    mode: str | None = Field(
        description="'live peers' (they ran on: their newer state wins), 'whole-cluster "
        "restart' (every daemon resumed at the agreed iteration; the asynchronous elastic "
        "family: each worker at its own, the center rebuilt), 'joined a whole-cluster "
        "restart' (up after the others resumed: it joined them there), 'center started "
        "afresh' (elastic workers whose center's daemon had no checkpoint: they start over), "
        "null: still deciding"
    )
    checkpoint_iteration: int = Field(description="the iteration of the checkpoint read")
    agreed_iteration: int | None = Field(
        description="a whole-cluster restart: the iteration every daemon resumed at (null "
        "for the asynchronous elastic family: no agreed iteration)"
    )


class CheckpointView(_View):
    """``--state-dir``: this daemon's checkpoints."""

    dir: str
    every_seconds: float
    last_seconds_ago: float | None = Field(description="since the last checkpoint written")
    last_iteration: int | None = Field(description="the iteration of the last checkpoint")
    failures: int = Field(description="checkpoint writes that failed (the last one stays)")
    last_error: str | None
    resumed: ResumedView | None = Field(description="null: started without a checkpoint")


class SecurityView(_View):
    """What guards this daemon (README, "Security")."""

    peer_links: str = Field(
        description="'authenticated (…)' with what authenticates them — mutual TLS, the "
        "cluster secret or both — or 'not authenticated'"
    )
    encrypted: bool = Field(
        description="the frames on peer links are encrypted and integrity-protected (mutual "
        "TLS); false: plain TCP after an authenticated handshake"
    )
    api: str = Field(description="'token for changes' (POST /stop needs it) or 'no token'")
    insecure: bool = Field(
        description="true: peers or the API are served off loopback without a secret or token "
        "(--insecure): anyone who reaches them can join the run or stop the daemon"
    )


class StatusView(_View):
    """This daemon, its run and its workers."""

    state: str = Field(
        description="the daemon's state: starting, running, finished (every local worker is "
        "done; still relaying and serving), stopping, stopped"
    )
    algorithm: Algorithm
    problem: str | None = Field(description="the problem's name (null for standalone agreement)")
    cluster: int = Field(description="this daemon's cluster id")
    clusters: int = Field(description="daemons (clusters) in the run, m")
    processes: int = Field(description="workers (processes) in the run, n")
    quorum: int = Field(description="N, the quorum of the Attiya–Schiller SGD")
    steps: int | None = Field(description="iterations per worker (null: until stopped)")
    uptime_seconds: float
    workers: list[WorkerView]
    peers: list[PeerView]
    catchup: CatchupView
    checkpoint: CheckpointView | None = Field(description="null: no --state-dir")
    security: SecurityView


class StatusSource(Protocol):
    """What ``/status`` and ``/peers`` read from a daemon
    (:class:`~peerlearn.daemon.node.Daemon`)."""

    @property
    def state(self) -> str: ...

    @property
    def run_cfg(self) -> RunConfig: ...

    @property
    def problem(self) -> Problem | None: ...

    @property
    def membership(self) -> Membership: ...

    @property
    def cluster(self) -> int: ...

    @property
    def started_at(self) -> float: ...  # time.monotonic() when the daemon was made

    @property
    def workers(self) -> Sequence[Worker]: ...

    @property
    def links(self) -> Sequence[OutLink]: ...

    def held_from(self) -> Mapping[int, int]: ...

    def loss_of(self, worker: Worker) -> float | None: ...

    def blocked(self, waiting: Waiting | None) -> bool: ...

    def sending(self, worker: Worker) -> SendWait | None: ...

    def waits_on(self, waiting: Waiting) -> WaitsOn: ...

    @property
    def rejoin(self) -> Rejoin: ...

    def checkpoint_status(self) -> dict[str, Any] | None: ...

    def security_status(self) -> dict[str, Any]: ...


def status_view(daemon: StatusSource) -> dict[str, Any]:
    """The answer of ``GET /status`` (schema: :class:`StatusView`)."""
    workers = []
    for w in daemon.workers:
        loss = daemon.loss_of(w)
        # A finished worker may still answer its inbox (Done): that is no wait of the run's.
        done = w.done.is_set()
        waiting = None if done else w.mailbox.waiting()
        entry: dict[str, Any] = {
            "id": w.name,
            "state": str(w.state),
            "step": w.completed,
            "gradients": w.grads,
            **({"epochs": round(e, 4)} if (e := w.epochs) is not None else {}),
            # JSON has no inf: a model near divergence may evaluate to it (metrics say +Inf)
            "loss": loss if loss is None or math.isfinite(loss) else None,
            "error": w.error,
            "diverged": None if w.diverged is None else w.diverged._asdict(),
        }
        if waiting is not None:
            waited = time.monotonic() - waiting.since
            entry["waiting"] = {
                "tag": list(waiting.tag),
                "have": waiting.have,
                "need": waiting.need,
                "unit": waiting.unit,
                "seconds": round(waited, 3),
                **_waits_on(daemon, w, waiting),
            }
            if daemon.blocked(waiting):
                entry["state"] = "blocked"
        send = None if done else daemon.sending(w)
        if send is not None:
            entry["sending"] = {
                "peer": send.peer,
                "cluster": send.cluster,
                "seconds": round(send.seconds, 3),
            }
            if send.blocked:
                entry["state"] = "blocked"
        workers.append(entry)
    run = daemon.run_cfg
    return {
        "state": str(daemon.state),
        "algorithm": run.algorithm,
        "problem": run.problem.name if daemon.problem is not None else None,
        "cluster": daemon.cluster,
        "clusters": daemon.membership.clusters,
        "processes": daemon.membership.processes,
        "quorum": run.n_quorum,
        "steps": run.steps,
        "uptime_seconds": round(time.monotonic() - daemon.started_at, 3),
        "workers": workers,
        "peers": peers_view(daemon.links, daemon.held_from()),
        "catchup": _catchup_view(daemon.rejoin),
        "checkpoint": daemon.checkpoint_status(),
        "security": daemon.security_status(),
    }


def _waits_on(daemon: StatusSource, worker: Worker, waiting: Waiting) -> dict[str, Any]:
    """The ``missing``, ``missing_total`` and ``peers`` of a worker's wait."""
    on = daemon.waits_on(waiting)
    if on.missing is None:
        return {"missing": None, "missing_total": None, "peers": list(on.peers)}
    if waiting.unit == "clusters":
        names = [str(c) for c in on.missing]
    else:
        name = daemon.membership.name
        names = [name(p) for p in on.missing if p != worker.pid]
    return {"missing": names[:MISSING_SHOWN], "missing_total": len(names), "peers": list(on.peers)}


def _catchup_view(rejoin: Rejoin) -> dict[str, Any]:
    now = time.monotonic()
    asking, last = rejoin.asking, rejoin.last
    return {
        "rejoins": rejoin.rejoins,
        "asking": None if asking is None else asking[0],
        "asking_seconds": None if asking is None else round(now - asking[1], 3),
        "gathering": rejoin.gathering(),
        "last": None
        if last is None
        else {
            "peer": last.peer,
            "was": last.was,
            "resumed_at": last.resumed_at,
            "seconds_ago": round(now - last.at, 3),
        },
    }


def peers_view(
    links: Iterable[OutLink], held: Mapping[int, int] | None = None
) -> list[dict[str, Any]]:
    """The answer of ``GET /peers`` (schema: a list of :class:`PeerView`); ``held``: frames
    held back per peer cluster."""
    return [
        {
            "cluster": link.cluster,
            "address": f"{link.host}:{link.port}",
            "state": str(link.state),
            "away": link.away,
            "away_seconds": None if (gone := link.away_seconds) is None else round(gone, 3),
            "outstanding": link.outstanding,
            "held": (held or {}).get(link.cluster, 0),
            "refused": link.last_refusal,
            "last_error": link.last_error,
        }
        for link in links
    ]
