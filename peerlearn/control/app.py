"""The control API of one daemon: thin FastAPI handlers that read runtime state.

``GET /status``, ``GET /peers``, ``GET /metrics`` (Prometheus text), ``GET /model`` (.npy),
``POST /stop`` (guarded: :mod:`peerlearn.control.guard`); ``GET /``, the live status page
(docs/status-page.md), with its script and style sheet at ``GET /static/status.js`` and
``/static/status.css``. The daemon owns the process and its signals; this app only asks it to
stop. The OpenAPI document is at ``/openapi.json``, read
by Swagger UI at ``/docs``, whose script and style sheet are served from the ``fastapi-offline``
package: the page works on a machine with no way out.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from peerlearn import __version__
from peerlearn.control.guard import ApiGuard
from peerlearn.control.metrics import DaemonMetrics
from peerlearn.control.views import PeerView, StatusSource, StatusView, peers_view, status_view
from peerlearn.effects import Vector, quiet_float_errors

__all__ = ["NPY_MEDIA_TYPE", "ControlTarget", "WorkerModel", "build_app"]

_STATIC = Path(__file__).with_name("static")
_ASSETS = {"status.js": "text/javascript", "status.css": "text/css"}
#: No media type is registered for NumPy's .npy format; this is the one numpy-speaking HTTP
#: services use (SageMaker's NumPy serializer, for one), so clients can tell it from other bytes.
NPY_MEDIA_TYPE = "application/x-npy"


class WorkerModel(NamedTuple):
    """One local worker's model, for ``GET /model``."""

    id: str  # "cluster.index", as /status shows it
    x: Vector | None  # None: no model yet
    live: bool  # neither crashed nor otherwise failed: its model counts in the mean


class _NpyResponse(Response):
    media_type = NPY_MEDIA_TYPE


class ControlTarget(StatusSource, Protocol):
    """What the API needs from a daemon: what /status and /peers read, and more."""

    metrics: DaemonMetrics

    def models(self) -> list[WorkerModel]: ...

    def request_stop(self, reason: str) -> None: ...


def build_app(target: ControlTarget, guard: ApiGuard | None = None) -> FastAPI:
    """The API of ``target``; ``guard`` checks every request that changes it (default: no
    token, loopback names only)."""
    guard = guard if guard is not None else ApiGuard(None, ())
    # Handlers are ``async def``: they only read in-memory state, so they run on the daemon's
    # loop at once instead of hopping to a thread pool and back — under a flood of frames each
    # extra loop iteration costs (seen: /metrics in seconds with DASGD on a tiny problem).
    app = FastAPIOffline(
        title="peerlearn daemon",
        version=__version__,
        description="The control API of one peerlearn daemon (README, section Control API).",
        static_url="/static/docs",  # Swagger UI's script and style sheet, from fastapi-offline
        redoc_url=None,  # ReDoc loads its logo from a CDN: one request leaving the machine
        # Swagger UI would otherwise send the document to an online validator for a badge.
        swagger_ui_parameters={"validatorUrl": None},
    )

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        """The live status page: charts of this daemon's /metrics and /status, polled."""
        return HTMLResponse((_STATIC / "index.html").read_text("utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        """The status page's script and style sheet."""
        if name not in _ASSETS:
            raise HTTPException(404, f"no static file {name!r}")
        return Response((_STATIC / name).read_text("utf-8"), media_type=_ASSETS[name])

    # /status and /peers declare their models for the document but send the views as built
    # (views.py says why); the tests check the two agree.
    @app.get("/status", response_model=StatusView)
    async def status() -> JSONResponse:
        """State, algorithm, per-worker step / loss / what it waits for, peers."""
        return JSONResponse(jsonable_encoder(status_view(target)))

    @app.get("/peers", response_model=list[PeerView])
    async def peers() -> JSONResponse:
        """Every remote daemon of the membership and its link state."""
        return JSONResponse(jsonable_encoder(peers_view(target.links, target.held_from())))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(target.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/model",
        response_class=_NpyResponse,
        responses={
            200: {
                "description": "A NumPy .npy file (format version 1.0, no pickles) holding one "
                "float vector: read it with numpy.load.",
                "content": {NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            },
            404: {
                "description": "No such worker here, or no model yet; the detail says which "
                "ids exist"
            },
        },
    )
    def model(
        worker: str | None = Query(
            None,
            description='a worker of this daemon: its id as /status shows it ("0.1"), or its '
            "local index (0, 1, …); left out: the mean of the models of this daemon's live "
            "workers (not crashed, not diverged)",
            examples=["0.1"],
        ),
    ) -> Response:
        """The current parameters of one local worker, or the daemon's mean model."""
        x, name = _pick_model(target.models(), worker)
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        return _NpyResponse(
            buf.getvalue(),
            headers={"Content-Disposition": f'attachment; filename="model-{name}.npy"'},
        )

    @app.post("/stop", dependencies=[Depends(guard.mutating)])
    async def stop() -> dict[str, str]:
        """Graceful shutdown: workers finish their current step, links drain."""
        target.request_stop("POST /stop")
        return {"state": "stopping"}

    return app


def _pick_model(models: list[WorkerModel], worker: str | None) -> tuple[Vector, str]:
    """The model ``worker`` names (an id or a local index), or the mean of the live workers'
    models; HTTP 404 naming the valid ids when there is no such worker or no model yet."""
    ids = ", ".join(m.id for m in models) or "none"
    if worker is None:
        xs = [m.x for m in models if m.live and m.x is not None]
        if not xs:
            raise HTTPException(404, f"no live worker here has a model yet (workers: {ids})")
        # huge finite models may overflow to inf in the sum: the bytes say so, no warning
        with quiet_float_errors():
            return np.mean(np.stack(xs), axis=0), "mean"
    by_id = {m.id: m for m in models}
    by_index = {str(i): m for i, m in enumerate(models)}
    chosen = by_id.get(worker.strip()) or by_index.get(worker.strip())
    if chosen is None:
        raise HTTPException(
            404,
            f"no worker {worker!r} here: this daemon's workers are {ids} "
            f"(or their local indexes 0..{len(models) - 1}); leave worker out for their mean",
        )
    if chosen.x is None:
        raise HTTPException(404, f"worker {chosen.id} has no model yet")
    return chosen.x, chosen.id
