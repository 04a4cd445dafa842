"""A daemon's checkpoints in ``--state-dir DIR`` (``peerlearn run --state-dir``).

``checkpoint.npz`` holds the state of every local worker at one moment — its iteration, its
model, what else of its state the algorithm reports with the model (DASGD: its version vector),
its ledger with a center (the elastic family) and its gradient-noise generator's state — with
the checkpoint format version, the run fingerprint, this daemon's cluster and the incarnation
that wrote it. It is replaced atomically (temporary file, fsync, rename, fsync of the
directory, :func:`~peerlearn.daemon.output.write_atomic`) every ``checkpoint_every`` seconds
and at shutdown: a crash at any moment leaves the last complete checkpoint, never a torn one
(temporary files a crash left behind are removed at the next start).

``incarnation`` holds the last incarnation started on the directory, written before the daemon
connects to anyone: a restarted daemon takes a greater one even if the clock went back, so its
peers never mistake it for its last incarnation.

Loading is strict. A checkpoint of another run (its fingerprint differs), of a format version
this peerlearn does not know, or one that does not parse is refused with
:class:`CheckpointError` — one line naming the file and the reason — and left as it is: the
daemon does not start (``peerlearn run`` exits 2), rather than train afresh over it.

The file is a plain .npz without pickles: ``meta`` (UTF-8 JSON as uint8), ``model_<pid>`` and
``ledger_<pid>`` (in the run's dtype: float64 for the bundled problems, float32 for a torch
model) — ``numpy.load`` reads it anywhere.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from peerlearn.daemon.output import write_atomic
from peerlearn.effects import Vector
from peerlearn.errors import StartupError
from peerlearn.wire.messages import INT64_MAX

if TYPE_CHECKING:
    from peerlearn.runtime.worker import Worker

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "SavedWorker",
    "Saver",
    "StateDir",
    "iteration",
]

#: the checkpoint format this peerlearn writes and reads
FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.npz"
INCARNATION = "incarnation"
UNUSED = "checkpoint.unused.npz"
#: the models' dtype unless the run says otherwise
FLOAT64: np.dtype[Any] = np.dtype(np.float64)
#: a meta record larger than this is no checkpoint of ours (read before anything is parsed)
_META_CAP = 16 * 1024 * 1024


class CheckpointError(StartupError):
    """A checkpoint that cannot be resumed from: another run's, an unknown format version, or
    a damaged file. The message names the file and the reason; the file is left untouched."""


@dataclass(frozen=True)
class SavedWorker:
    """One local worker as checkpointed: it starts iteration ``step`` from ``model``."""

    pid: int
    step: int
    model: Vector
    #: what else of its state its program reported with the model (DASGD: the version vector)
    extra: tuple[int, ...] = ()
    #: its gradient-noise generator (``numpy.random.Generator.bit_generator.state``)
    rng: dict[str, Any] | None = None
    #: its ledger with the center (the elastic family), the one its model goes with: last
    #: answered request, the one it waits on (None: checkpoints are taken between requests),
    #: and the sum of the center's differences it applied
    ledger: tuple[int, int | None, Vector] | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A daemon's state at one moment (see the module docstring)."""

    fingerprint: str
    cluster: int
    incarnation: int
    saved_at: float  # Unix time
    workers: tuple[SavedWorker, ...]
    version: int = FORMAT_VERSION

    @property
    def step(self) -> int:
        """The iteration this daemon resumes at: its slowest worker's."""
        return min((w.step for w in self.workers), default=1)

    def encode(self, fh: IO[bytes]) -> None:
        meta = {
            "format": self.version,
            "fingerprint": self.fingerprint,
            "cluster": self.cluster,
            "incarnation": self.incarnation,
            "saved_at": self.saved_at,
            "workers": [
                {
                    "pid": w.pid,
                    "step": w.step,
                    "extra": list(w.extra),
                    "rng": w.rng,
                    "ledger": None if w.ledger is None else [w.ledger[0], w.ledger[1]],
                }
                for w in self.workers
            ],
        }
        arrays: dict[str, Any] = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        for w in self.workers:
            arrays[f"model_{w.pid}"] = w.model
            if w.ledger is not None:
                arrays[f"ledger_{w.pid}"] = w.ledger[2]
        np.savez(fh, **arrays)


def _fail(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"cannot resume from {path}: {why} (the file is left as it is)")


def decode(
    path: Path,
    fingerprint: str,
    cluster: int,
    pids: Sequence[int],
    dim: int,
    dtype: np.dtype[Any] = FLOAT64,
) -> Checkpoint:
    """The checkpoint in ``path``, checked against this daemon's run (models of ``dim``
    elements of ``dtype``); CheckpointError if it is not one this daemon can resume from."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "meta" not in npz.files:
                raise _fail(path, "no 'meta' record: not a peerlearn checkpoint")
            raw = npz["meta"]
            if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _META_CAP:
                raise _fail(path, "its 'meta' record is not a JSON text")
            meta = json.loads(raw.tobytes().decode())
            if not isinstance(meta, dict):
                raise _fail(path, "its 'meta' record is not a JSON object")
            version = meta.get("format")
            if version != FORMAT_VERSION:
                raise _fail(
                    path,
                    f"checkpoint format {version!r:.20}, this peerlearn reads format "
                    f"{FORMAT_VERSION} (written by "
                    f"{'a newer' if _newer(version) else 'another'} peerlearn)",
                )
            if meta.get("fingerprint") != fingerprint:
                raise _fail(
                    path,
                    f"it is another run's (fingerprint {str(meta.get('fingerprint'))[:12]!r}, "
                    f"this run's {fingerprint[:12]!r}): a setting differs, or the directory "
                    "belongs to another run",
                )
            if meta.get("cluster") != cluster:
                raise _fail(
                    path, f"it is cluster {meta.get('cluster')!r:.20}'s, this daemon is {cluster}"
                )
            workers = tuple(_worker(path, npz, w, dim, dtype) for w in meta.get("workers", []))
            if sorted(w.pid for w in workers) != sorted(pids):
                raise _fail(path, "its workers are not this daemon's")
            incarnation, saved_at = meta.get("incarnation"), meta.get("saved_at")
            if type(incarnation) is not int or not isinstance(saved_at, int | float):
                raise _fail(path, "no incarnation or time in its 'meta' record")
            return Checkpoint(fingerprint, cluster, incarnation, float(saved_at), workers)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        if "pickle" in why:  # np.load took it for a pickle: no .npz of any kind
            why = "not an .npz file"
        raise _fail(path, f"it is damaged ({why[:200]})") from None


def _newer(version: object) -> bool:
    return type(version) is int and version > FORMAT_VERSION


def _worker(path: Path, npz: Any, w: Any, dim: int, dtype: np.dtype[Any]) -> SavedWorker:
    if not isinstance(w, dict) or type(w.get("pid")) is not int or type(w.get("step")) is not int:
        raise _fail(path, "a worker record without pid or step")
    pid, step = w["pid"], w["step"]
    if not 1 <= step <= INT64_MAX:
        raise _fail(path, f"worker {pid} at iteration {step}")
    model = _vector(path, npz, f"model_{pid}", dim, dtype)
    extra = w.get("extra", [])
    if not isinstance(extra, list) or any(type(v) is not int for v in extra):
        raise _fail(path, f"worker {pid}'s state is not a list of integers")
    rng = w.get("rng")
    if rng is not None:
        try:  # a worker's stream is a PCG64 generator (peerlearn.streams)
            np.random.PCG64().state = rng
        except (TypeError, ValueError, KeyError):
            raise _fail(path, f"worker {pid}'s generator state is not a PCG64 state") from None
    ledger = None
    if (lg := w.get("ledger")) is not None:
        ok = isinstance(lg, list) and len(lg) == 2 and type(lg[0]) is int
        if not ok or not (lg[1] is None or type(lg[1]) is int):
            raise _fail(path, f"worker {pid}'s ledger is malformed")
        ledger = (lg[0], lg[1], _vector(path, npz, f"ledger_{pid}", dim, dtype))
    return SavedWorker(pid, step, model, tuple(extra), rng, ledger)


def _vector(path: Path, npz: Any, name: str, dim: int, dtype: np.dtype[Any]) -> Vector:
    if name not in npz.files:
        raise _fail(path, f"no {name!r} array")
    x: Vector = npz[name]
    if x.shape == (dim,) and x.dtype in (np.float32, np.float64) and x.dtype != dtype:
        raise _fail(
            path,
            f'its models are {x.dtype}, this run\'s {dtype} (set dtype = "{x.dtype}" to resume '
            "it: a torch run from before the dtype setting was float64)",
        )
    if x.dtype != dtype or x.shape != (dim,):
        raise _fail(path, f"{name!r} is {x.dtype}{list(x.shape)}, this run's models {dtype}[{dim}]")
    x.flags.writeable = False
    return x


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateDir:
    """The ``--state-dir`` of one daemon: owned (a lock file) while the daemon runs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.checkpoint = directory / CHECKPOINT
        self.incarnation_file = directory / INCARNATION
        self._lock: int | None = None

    def open(self) -> None:
        """Create the directory, take its lock and remove the temporary files a crash left;
        OSError says what is wrong (not writable, in use by another daemon)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        fd = os.open(self.dir / ".peerlearn.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError("in use by another daemon (give each daemon its own)") from None
        self._lock = fd
        for name in (CHECKPOINT, INCARNATION):
            for tmp in self.dir.glob(f".{name}.*.tmp"):  # a write a crash cut short
                tmp.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def load(
        self,
        fingerprint: str,
        cluster: int,
        pids: Sequence[int],
        dim: int,
        dtype: np.dtype[Any] = FLOAT64,
    ) -> Checkpoint | None:
        """The last checkpoint (None: there is none); CheckpointError if it cannot be resumed."""
        if not self.checkpoint.exists():
            return None
        return decode(self.checkpoint, fingerprint, cluster, pids, dim, dtype)

    def next_incarnation(self, saved: Checkpoint | None) -> int:
        """This start's incarnation — the clock's nanoseconds, but always greater than every
        incarnation started on this directory before — written down before it is used."""
        last = saved.incarnation if saved is not None else 0
        try:
            last = max(last, int(self.incarnation_file.read_text().strip() or 0))
        except FileNotFoundError:
            pass
        except ValueError:
            raise _fail(self.incarnation_file, "it holds no integer") from None
        incarnation = max(time.time_ns(), last + 1)
        text = f"{incarnation}\n".encode()

        def number(fh: IO[bytes]) -> None:
            fh.write(text)

        write_atomic(self.incarnation_file, number)
        return incarnation

    def set_aside(self) -> Path:
        """Move the checkpoint out of the way (it is not resumed from), keeping it — and any
        set aside before."""
        aside = self.dir / UNUSED
        k = 1
        while aside.exists():
            k += 1
            aside = self.dir / UNUSED.replace(".npz", f".{k}.npz")
        os.rename(self.checkpoint, aside)
        _fsync_dir(self.dir)
        return aside

    def save(self, checkpoint: Checkpoint) -> None:
        """Replace the checkpoint, atomically and durably (on a thread: it fsyncs)."""
        write_atomic(self.checkpoint, checkpoint.encode)


def iteration(checkpoint: Checkpoint, center: int | None = None) -> int:
    """The iteration ``checkpoint`` is at: its slowest worker's — leaving out an elastic
    ``center``, which counts requests, not iterations (unless it is all there is)."""
    steps = [w.step for w in checkpoint.workers if w.pid != center]
    return min(steps) if steps else checkpoint.step


class Saver:
    """Writes one daemon's checkpoints: snapshots are taken on the event loop (each worker's
    ``saved`` is one reference, so its model, iteration and generator state match) and written
    on a thread, newest last — a slower write of an older snapshot never replaces a newer one."""

    def __init__(
        self, state_dir: StateDir, fingerprint: str, cluster: int, center: int | None = None
    ) -> None:
        self.state_dir = state_dir
        self._fingerprint = fingerprint
        self._cluster = cluster
        #: an elastic center: it counts requests, not iterations
        self.center = center
        self._lock = threading.Lock()
        self._taken = 0  # snapshots numbered
        self._written = 0  # the newest snapshot written
        self._last: tuple[object, ...] | None = None  # the workers' states last snapshotted
        #: the last checkpoint written: (Unix time, iteration)
        self.last: tuple[float, int] | None = None
        self.failures = 0
        self.last_error: str | None = None

    def snapshot(
        self, workers: Sequence[Worker], incarnation: int, force: bool = False
    ) -> tuple[int, Checkpoint] | None:
        """The workers' states now, numbered; None if one has no model yet (not started, or
        waiting to resume) or — unless ``force`` — nothing changed since the last snapshot."""
        saved = [w.saved for w in workers]
        if any(position[1] is None or position[0] < 1 for position, _, _ in saved):
            return None
        if (
            not force
            and self._last is not None
            and all(a is b for a, b in zip(saved, self._last, strict=True))
        ):
            return None
        self._last = tuple(saved)
        states = []
        for w, ((step, model, key), rng, lg) in zip(workers, saved, strict=True):
            assert model is not None
            ledger = None
            if lg is not None:
                answered, total, lkey = lg
                waiting = lkey[0] if lkey and type(lkey[0]) is int else None
                if isinstance(total, np.ndarray):
                    ledger = (int(answered), waiting, total)
            extra = tuple(int(v) for v in key if type(v) is int)
            states.append(SavedWorker(w.pid, step, model, extra, rng, ledger))
        self._taken += 1
        checkpoint = Checkpoint(
            self._fingerprint, self._cluster, incarnation, time.time(), tuple(states)
        )
        return self._taken, checkpoint

    def forget(self) -> None:
        """The last snapshot was not written: take the next one even if nothing changed."""
        self._last = None

    def write(self, number: int, checkpoint: Checkpoint) -> bool:
        """Write snapshot ``number`` (on a thread) unless a newer one is written already;
        OSError as the file system gives it (the last checkpoint then stays as it was)."""
        with self._lock:
            if number <= self._written:
                return False
            self.state_dir.save(checkpoint)
            self._written = number
            self.last = (checkpoint.saved_at, iteration(checkpoint, self.center))
            return True
