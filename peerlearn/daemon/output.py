"""What a daemon leaves in ``--out DIR`` (``peerlearn run --out``):

* ``model.npz``    — ``mean``: the mean of the live local workers' models (neither crashed nor
                     diverged), and ``worker_<id>`` for each local worker that has a model
                     (``worker_0.1``); written on finish and on stop.
* ``summary.json`` — in the shape ``peerlearn simulate`` writes: ``schema_version``, the resolved
                     run ``config``, ``status`` (``finished``, ``stopped``, ``diverged`` or
                     ``failed``), ``crashed``, ``diverged``, ``final_loss`` (mean over the live
                     workers), ``consensus_distance`` (of the local models), ``seconds`` and
                     ``processes`` (id, cluster, state, steps_done, loss, error, diverged,
                     rejoins); written on finish and on stop.
* ``metrics.csv``  — one row per local worker every second while the daemon runs:
                     ``time`` (Unix seconds), ``process``, ``step`` (completed iterations),
                     ``loss``, ``consensus_distance`` (the local models'), ``global_consensus``
                     (with the peers' snapshots; empty where none came); appended, so a daemon
                     restarted on the same directory continues the series.

``model.npz`` and ``summary.json`` are replaced atomically (a temporary file, fsync, rename, fsync
of the directory): a reader, or a crash in the middle, sees the last complete file or the new
one, never a torn one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from peerlearn.effects import Vector, quiet_float_errors
from peerlearn.sim.runner import consensus_distance

if TYPE_CHECKING:
    from peerlearn.control.metrics import Snapshot
    from peerlearn.daemon.node import Daemon

__all__ = ["SCHEMA_VERSION", "RunOutput", "write_atomic"]

SCHEMA_VERSION = 1  # of summary.json
METRICS_HEADER = (
    "time",
    "process",
    "step",
    "loss",
    "consensus_distance",
    "global_consensus",
)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Replace ``path`` with what ``write`` writes, atomically and durably."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def _num(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _cell(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.10g}"


class RunOutput:
    """The ``--out`` directory of one daemon."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.metrics = directory / "metrics.csv"
        self.model = directory / "model.npz"
        self.summary = directory / "summary.json"

    def prepare(self) -> None:
        """Create the directory and check it is writable (OSError names the problem), and
        start ``metrics.csv`` unless it is there already."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {self.dir}: not writable")
        if not self.metrics.exists() or self.metrics.stat().st_size == 0:
            with self.metrics.open("w", newline="") as fh:
                csv.writer(fh).writerow(METRICS_HEADER)

    def sample(self, now: float, snapshot: Snapshot) -> None:
        """One row per local worker (a few rows a second: appended, not held in memory)."""
        host, world = snapshot.consensus_host, snapshot.consensus_global
        with self.metrics.open("a", newline="") as fh:
            out = csv.writer(fh)
            for w in snapshot.workers:
                out.writerow(
                    [f"{now:.3f}", w.worker, w.step, _cell(w.loss), _cell(host), _cell(world)]
                )

    def write(
        self, summary: dict[str, Any], models: Sequence[tuple[str, Vector | None, bool]]
    ) -> None:
        """``model.npz`` and ``summary.json`` (``models``: id, model or None, live)."""
        arrays = {f"worker_{name}": x for name, x, _ in models if x is not None}
        live = [x for _, x, ok in models if ok and x is not None]
        if live:
            with quiet_float_errors():
                arrays["mean"] = np.mean(np.stack(live), axis=0)

        def npz(fh: IO[bytes]) -> None:
            buf = io.BytesIO()  # np.savez seeks: write the zip in memory, then the file
            np.savez(buf, allow_pickle=False, **arrays)
            fh.write(buf.getbuffer())

        write_atomic(self.model, npz)
        text = json.dumps(summary, indent=2, allow_nan=False) + "\n"

        def json_file(fh: IO[bytes]) -> None:
            fh.write(text.encode())

        write_atomic(self.summary, json_file)


def summary_of(daemon: Daemon, seconds: float) -> dict[str, Any]:
    """``summary.json`` of ``daemon`` now."""
    workers = daemon.workers
    losses = {w.pid: daemon.loss_of(w) for w in workers}
    live = [w for w in workers if w.live]
    final = [v for w in live if (v := losses[w.pid]) is not None and math.isfinite(v)]
    diverged = [w for w in workers if w.diverged is not None]
    crashed = [w.name for w in workers if w.error is not None]
    if crashed:
        status = "failed"
    elif diverged:
        status = "diverged"
    elif workers and all(w.state.value == "finished" for w in workers):
        status = "finished"
    else:
        status = "stopped"
    models = [w.x for w in live if w.x is not None]
    with quiet_float_errors():
        mean_loss = float(np.mean(final)) if final else None
        spread = consensus_distance(models) if models else None
    cluster_of = daemon.membership.cluster_of
    return {
        "schema_version": SCHEMA_VERSION,
        "config": daemon.run_cfg.model_dump(mode="json"),
        "status": status,
        "crashed": crashed,
        "diverged": [
            {"process": w.name, "step": w.diverged.step, "quantity": w.diverged.quantity}
            for w in diverged
            if w.diverged is not None
        ],
        "final_loss": _num(mean_loss),
        "consensus_distance": _num(spread),
        "seconds": round(seconds, 3),
        "processes": [
            {
                "id": w.name,
                "cluster": cluster_of[w.pid],
                "state": w.state.value,
                "steps_done": w.completed,
                "loss": _num(losses[w.pid]),
                "error": w.error,
                "diverged": w.diverged is not None,
                "rejoins": w.rejoins,
            }
            for w in workers
        ],
    }
