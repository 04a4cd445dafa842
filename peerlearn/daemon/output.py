"""What a daemon leaves in ``--out DIR`` (``peerlearn run --out``):

* ``model.npz``    — ``mean``: the mean of the live local workers' models (neither crashed nor
                     diverged), and ``worker_<id>`` for each local worker that has a model
                     (``worker_0.1``); written on finish and on stop. A problem with a
                     format of its own writes the mean in it too (``Problem.export``: a
                     torch model's ``model.pt``).
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

``model.npz`` and ``summary.json`` are replaced atomically (a temporary file of their own, fsync,
rename, fsync of the directory): a reader, or a crash in the middle, sees the last complete file
or the new one, never a torn one. One daemon owns the directory while it runs (a lock file): a
second daemon given the same ``--out`` is refused at start.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from peerlearn.effects import Vector, quiet_float_errors
from peerlearn.sim.runner import consensus_distance

if TYPE_CHECKING:
    from peerlearn.daemon.node import Daemon

__all__ = ["SCHEMA_VERSION", "RunOutput", "finite_json", "summary_of", "write_atomic", "write_npz"]

SCHEMA_VERSION = 1  # of summary.json
METRICS_HEADER = (
    "time",
    "process",
    "step",
    "loss",
    "consensus_distance",
    "global_consensus",
)
#: one row of metrics.csv: process, completed iterations, loss
Row = tuple[str, int, float | None]


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Replace ``path`` with what ``write`` writes, atomically and durably; on any failure the
    old file stays and the temporary one is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """``arrays`` to ``path`` as .npz, atomically (no pickles: numeric arrays only)."""

    def npz(fh: IO[bytes]) -> None:
        np.savez(fh, **arrays)

    write_atomic(path, npz)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float as a string ("inf", "-inf", "nan"): JSON has no
    such numbers, and a config may hold one (``--lr inf``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


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
        self._lock: int | None = None

    def prepare(self) -> None:
        """Create the directory, take its lock and start ``metrics.csv`` unless it is there
        already; OSError says what is wrong (not writable, in use by another daemon)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        fd = os.open(self.dir / ".peerlearn.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            # (no errno: the daemon's one line shows this text, not the errno's)
            raise OSError("in use by another daemon (give each daemon its own)") from None
        self._lock = fd
        if not self.metrics.exists() or self.metrics.stat().st_size == 0:
            with self.metrics.open("w", newline="") as fh:
                csv.writer(fh).writerow(METRICS_HEADER)

    def close(self) -> None:
        """Give the directory up (its lock)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def sample(
        self, now: float, rows: Sequence[Row], local: list[Vector], heard: list[Vector]
    ) -> None:
        """One row per local worker, with the consensus distance of the ``local`` models and,
        if any came, of those with the peers' (``heard``): appended, not held in memory."""
        with quiet_float_errors():
            host = consensus_distance(local) if local else None
            world = consensus_distance(local + heard) if heard else None
        with self.metrics.open("a", newline="") as fh:
            out = csv.writer(fh)
            for name, step, loss in rows:
                out.writerow([f"{now:.3f}", name, step, _cell(loss), _cell(host), _cell(world)])

    def write(
        self,
        summary: dict[str, Any],
        models: Sequence[tuple[str, Vector | None, bool]],
        export: Callable[[Vector, Path], list[Path]] | None = None,
    ) -> list[Path]:
        """``model.npz`` and ``summary.json`` (``models``: id, model or None, live). ``mean``
        is left out when no live worker has a model; ``export(mean, dir)`` writes it in the
        problem's own format too (``Problem.export``). The files written."""
        arrays: dict[str, Any] = {f"worker_{name}": x for name, x, _ in models if x is not None}
        live = [x for _, x, ok in models if ok and x is not None]
        if live:
            with quiet_float_errors():
                arrays["mean"] = np.mean(np.stack(live), axis=0)
        write_npz(self.model, arrays)
        written = [self.model, self.summary]
        if export is not None and "mean" in arrays:
            written += export(arrays["mean"], self.dir)
        text = json.dumps(finite_json(summary), indent=2, allow_nan=False) + "\n"

        def json_file(fh: IO[bytes]) -> None:
            fh.write(text.encode())

        write_atomic(self.summary, json_file)
        return written


def summary_of(daemon: Daemon, seconds: float) -> dict[str, Any]:
    """``summary.json`` of ``daemon`` now."""
    workers = daemon.workers
    losses = {w.pid: daemon.loss_of(w) for w in workers}
    live = [w for w in workers if w.live]
    final = [v for w in live if (v := losses[w.pid]) is not None]
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
        mean_loss = float(np.mean(final)) if final else None  # inf or nan: null, as simulate's
        spread = consensus_distance(models) if models else None
    cluster_of = daemon.membership.cluster_of
    evaluation: dict[str, Any] = {}
    if daemon.problem is not None and models:
        with quiet_float_errors():  # huge models near divergence: inf → null, no warning
            figures = daemon.problem.evaluate(np.mean(np.stack(models), axis=0))
        evaluation = {"evaluation_of_mean_model": {k: _num(v) for k, v in figures.items()}}
    return {
        "schema_version": SCHEMA_VERSION,
        "source": "peerlearn run",
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
                "crashed": w.error is not None,
                "diverged": w.diverged is not None,
                "steps_done": w.completed,
                "loss": _num(losses[w.pid]),
                "error": w.error,
                "rejoins": w.rejoins,
            }
            for w in workers
        ],
        **evaluation,
    }
