"""The control API of one daemon: thin FastAPI handlers that read runtime state.

``GET /status``, ``GET /peers``, ``GET /metrics`` (Prometheus text), ``GET /model?worker=i``
(.npy), ``POST /stop``; ``GET /``, the live status page (docs/status-page.md), with its script
and style sheet at ``GET /static/status.js`` and ``/static/status.css``. The daemon owns the
process and its signals; this app only asks it to stop. The OpenAPI document is at
``/openapi.json``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from peerlearn import __version__
from peerlearn.control.metrics import DaemonMetrics
from peerlearn.effects import Vector

__all__ = ["ControlTarget", "build_app"]

_STATIC = Path(__file__).with_name("static")
_ASSETS = {"status.js": "text/javascript", "status.css": "text/css"}


class ControlTarget(Protocol):
    """What the API needs from a daemon."""

    metrics: DaemonMetrics

    def status(self) -> dict[str, Any]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def model(self, worker: int) -> Vector | None: ...

    def request_stop(self, reason: str) -> None: ...


def build_app(target: ControlTarget) -> FastAPI:
    # Handlers are ``async def``: they only read in-memory state, so they run on the daemon's
    # loop at once instead of hopping to a thread pool and back — under a flood of frames each
    # extra loop iteration costs (seen: /metrics in seconds with DASGD on a tiny problem).
    app = FastAPI(title="peerlearn daemon", version=__version__)

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

    @app.get("/status")
    async def status() -> dict[str, Any]:
        """State, algorithm, per-worker step / loss / what it waits for, peers."""
        return target.status()

    @app.get("/peers")
    async def peers() -> list[dict[str, Any]]:
        """Every remote daemon of the membership and its link state."""
        return target.peers()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(target.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/model")
    def model(worker: int = Query(..., ge=0, description="local worker index")) -> Response:
        """The worker's current parameters as a .npy file."""
        x = target.model(worker)
        if x is None:
            raise HTTPException(404, f"worker {worker} does not exist here or has no model yet")
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        return Response(buf.getvalue(), media_type="application/octet-stream")

    @app.post("/stop")
    async def stop() -> dict[str, str]:
        """Graceful shutdown: workers finish their current step, links drain."""
        target.request_stop("POST /stop")
        return {"state": "stopping"}

    return app
