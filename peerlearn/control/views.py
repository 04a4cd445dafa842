"""The JSON the control API answers with, as pydantic models: they give ``/status`` and
``/peers`` their schemas in the OpenAPI document (``/openapi.json``, ``/docs``).

The daemon builds these views as plain dicts (``Daemon.status()``, ``Daemon.peers()``); the
handlers send them as built, so a field the models lack is never dropped from a response and a
mismatch can never turn ``/status`` into an error 500. The models forbid unknown fields instead,
and the tests validate a live daemon's answers against the served schemas: a field added to a
view without its model fails there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from peerlearn.config import Algorithm
from peerlearn.transport.links import LinkState

__all__ = ["DivergenceView", "PeerView", "StatusView", "WaitingView", "WorkerView"]


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
        "the connected daemons cannot meet"
    )
    step: int = Field(description="iterations the worker has completed")
    gradients: int = Field(description="stochastic gradients computed")
    loss: float | None = Field(
        description="the latest loss evaluation (null: none yet, or not finite)"
    )
    error: str | None = Field(description="why the worker crashed (null: it did not)")
    diverged: DivergenceView | None = Field(description="where it diverged (null: it did not)")
    waiting: WaitingView | None = Field(
        None, description="present only while the worker waits for messages"
    )


class PeerView(_View):
    """The link from this daemon to another daemon of the run."""

    cluster: int = Field(description="the other daemon's cluster id")
    address: str = Field(description="its peer address, host:port")
    state: LinkState = Field(description="the link's state")
    away: bool = Field(description="not connected for longer than peer_timeout")
    outstanding: int = Field(description="frames queued or sent but not acknowledged yet")
    refused: str | None = Field(
        description="why the peer refused the last handshake, in this daemon's words (null: it "
        "did not)"
    )
    last_error: str | None = Field(
        description="why the last attempt to reach it failed, e.g. a name that does not "
        "resolve or a refused connection (null: none since it was last connected)"
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
