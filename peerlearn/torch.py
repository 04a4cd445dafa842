"""Train a PyTorch model with peerlearn: a :class:`~peerlearn.problems.Problem` built from a model
factory, a data factory and a loss.

Only this module imports torch (``pip install 'peerlearn[torch]'``); the core never does. The
algorithms carry one flat vector of parameters: every process builds its own model from
``model_fn`` (torch modules are not safe to share between worker threads) whose parameters are
views into one contiguous tensor, so loading a model is one copy in, and a gradient is one copy
out — into a vector of the model's dtype (float32 for most models: the run's dtype then is
float32, and the wire and the register store carry half the bytes of float64; a float16 model
travels as float32: the wire carries float32 and float64 only). A run
that sets ``dtype = "float64"`` gets its gradients cast once more.

- **Start point.** ``model_fn`` is called under ``torch.manual_seed(seed)``: every process, in
  every daemon, starts from the same x₁, as the algorithms assume.
- **Data.** ``data_fn()`` returns ``(train, test)``, each a pair of tensors ``(inputs,
  targets)``. With ``data="shard"`` (the default) process p of N reads examples p, p+N, p+2N, …
  of the training set, each epoch in an order drawn from its own gradient stream; with
  ``data="sample"`` every batch is drawn from the whole set. Either way the stream is the
  process's own (:func:`peerlearn.runs.grad_stream`): independent across processes, as
  Attiya–Schiller's Lemma 1 needs.
- **Buffers** (BatchNorm's running statistics): local. They are not parameters — no gradient
  moves them and the algorithms' averages would mean nothing for them — so each process keeps
  its own, updated by its own forward passes, and never sends them. Evaluating a model x (the
  loss the daemon exports, the final report) uses the buffers of this daemon's first process,
  and so does ``model.pt``; ``model.npz`` and checkpoints hold parameters only (a resumed
  daemon's statistics start afresh).
- **Randomness inside the model** (dropout) draws from torch's global generator, which the
  worker threads share: not reproducible per process, unlike the batches.
- **Threads.** ``torch.set_num_threads`` is set so that workers × threads ≤ the CPUs this
  process may use, unless ``OMP_NUM_THREADS`` says otherwise.
- **Evaluation.** :meth:`TorchProblem.loss` is the mean loss over the training set,
  :meth:`~TorchProblem.eval_loss` over a fixed prefix of it, :meth:`~TorchProblem.evaluate` the
  test loss and, where targets are class labels, the test accuracy — in chunks of EVAL_CHUNK
  examples.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from peerlearn.daemon.config import load_node_config
from peerlearn.daemon.node import Daemon
from peerlearn.daemon.output import write_atomic
from peerlearn.daemon.serve import run_daemon
from peerlearn.effects import Vector
from peerlearn.errors import ProblemError
from peerlearn.problems.base import Problem
from peerlearn.runtime.worker import WorkerState

__all__ = ["Batches", "Loss", "ModelFn", "TorchProblem", "data_split", "train"]

#: examples per forward pass when evaluating (and for full_grad)
EVAL_CHUNK = 1024
#: parameter dtypes the flat vector can carry (numpy has no bfloat16)
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16)

#: a model factory: a fresh module each call (the same architecture every time)
ModelFn = Callable[[], nn.Module]
#: inputs and targets, first dimension the examples
Tensors = tuple[torch.Tensor, torch.Tensor]
#: the data factory: ``(train, test)``
DataFn = Callable[[], tuple[Tensors, Tensors]]
#: ``loss(outputs, targets)`` → a scalar tensor (the mean over the batch)
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Flat:
    """One model whose parameters are views into one contiguous tensor, and whose gradients
    are too: loading x is one copy, reading a gradient one copy (into ``dtype``: the
    parameters', float32 for float16 ones)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ProblemError("the model has no trainable parameters")
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
            raise ProblemError(
                "the model has lazy parameters (nn.LazyLinear, …): give model_fn a forward pass "
                "on an example batch, or their sizes"
            )
        if params[0].dtype not in SUPPORTED_DTYPES:
            raise ProblemError(
                f"parameters of dtype {params[0].dtype} are not supported: float32 (or float64, "
                "float16) — convert the model with .float()"
            )
        self.dim = sum(p.numel() for p in params)
        dtype = params[0].dtype
        if any(p.dtype != dtype for p in params):
            raise ProblemError("the model's parameters must share one dtype")
        self.dtype: np.dtype[np.floating] = np.dtype(
            np.float64 if dtype == torch.float64 else np.float32
        )
        self.flat = torch.empty(self.dim, dtype=dtype)
        self.grad = torch.zeros(self.dim, dtype=dtype)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.flat[offset : offset + n].copy_(p.reshape(-1))
                p.data = self.flat[offset : offset + n].view_as(p)
                p.grad = self.grad[offset : offset + n].view_as(p)
                offset += n
        self.params = params
        self._slots = [p.grad.data_ptr() for p in params if p.grad is not None]

    def load(self, x: Vector) -> None:
        # numpy does the copy (and the cast): the store's arrays are read-only, which
        # torch.from_numpy warns about even for a read
        self.flat.numpy()[:] = x

    def read(self) -> Vector:
        return self.flat.detach().numpy().astype(self.dtype)  # a copy: flat is live

    def gradient(self, loss: torch.Tensor) -> Vector:
        self.grad.zero_()
        # backward() accumulates into the existing .grad views: the flat buffer fills in place
        loss.backward()  # type: ignore[no-untyped-call]
        return self.copy_grad()

    def copy_grad(self) -> Vector:
        slots = [p.grad.data_ptr() if p.grad is not None else 0 for p in self.params]
        if slots != self._slots:  # the flat buffer would miss that gradient
            raise ProblemError("autograd replaced a parameter's gradient buffer: unsupported")
        out = np.empty(self.dim, dtype=self.dtype)
        torch.from_numpy(out).copy_(self.grad)  # the one copy out
        return out


class Batches:
    """One process's stream of minibatch indices: its shard in epochs (shuffled each epoch by
    its own generator) or draws from the whole set."""

    def __init__(self, n: int, batch_size: int, pid: int, processes: int, mode: str) -> None:
        self.mode = mode
        self.batch_size = batch_size
        self.indices = np.arange(pid, n, processes) if mode == "shard" else np.arange(n)
        if len(self.indices) == 0:
            raise ProblemError(f"process {pid} gets no training examples ({n} for {processes})")
        self._order: np.ndarray = np.empty(0, dtype=np.int64)
        self._at = 0
        #: examples taken, over the shard's (or the set's) size: epochs, fractional
        self.seen = 0

    @property
    def epochs(self) -> float:
        return self.seen / len(self.indices)

    def next(self, rng: np.random.Generator) -> np.ndarray:
        m = min(self.batch_size, len(self.indices))
        self.seen += m
        if self.mode == "sample":
            return rng.choice(self.indices, size=m, replace=False)
        if self._at + m > len(self._order):  # a new epoch (a partial tail is left out)
            self._order = rng.permutation(self.indices)
            self._at = 0
        batch = self._order[self._at : self._at + m]
        self._at += m
        return batch


class _Process:
    """Process ``pid``'s oracle: its own model, its own batches."""

    def __init__(self, problem: TorchProblem, pid: int, processes: int) -> None:
        self._problem = problem
        self.model = problem._build()
        n = len(problem.train[0])
        self.batches = Batches(n, problem.batch_size, pid, processes, problem.data)

    @property
    def epochs(self) -> float:
        """Passes over its data so far (Worker.epochs reads it: /status, peerlearn_epochs)."""
        return self.batches.epochs

    def __call__(self, x: Vector, rng: np.random.Generator) -> Vector:
        p = self._problem
        idx = torch.from_numpy(self.batches.next(rng))
        inputs, targets = p.train[0][idx], p.train[1][idx]
        self.model.load(x)
        self.model.module.train()
        return self.model.gradient(p.loss_fn(self.model.module(inputs), targets))


class TorchProblem(Problem):
    """A torch model, its data and its loss as a peerlearn problem.

    :param model_fn: a fresh ``nn.Module`` each call, the same architecture every time.
    :param data_fn: ``(train, test)``, each ``(inputs, targets)`` tensors.
    :param loss_fn: ``loss(outputs, targets)``, the mean over the batch (e.g.
        ``nn.functional.cross_entropy``).
    :param batch_size: examples per stochastic gradient.
    :param data: ``"shard"`` (process p reads every N-th example from p) or ``"sample"``.
    :param seed: the seed ``model_fn`` is called under: the common start point.
    :param eval_examples: the training prefix :meth:`eval_loss` measures at most.
    """

    name = "torch"

    def __init__(
        self,
        model_fn: ModelFn,
        data_fn: DataFn,
        loss_fn: Loss,
        *,
        batch_size: int = 32,
        data: Literal["shard", "sample"] = "shard",
        seed: int = 0,
        eval_examples: int = 1024,
    ) -> None:
        if data not in ("shard", "sample"):
            raise ProblemError(f"data must be 'shard' or 'sample', not {data!r}")
        if batch_size < 1:
            raise ProblemError(f"batch_size must be at least 1, not {batch_size}")
        if eval_examples < 1:
            raise ProblemError(f"eval_examples must be at least 1, not {eval_examples}")
        self.model_fn, self.loss_fn = model_fn, loss_fn
        self.batch_size, self.data, self.seed = batch_size, data, seed
        self.eval_examples = eval_examples
        self.train, self.test = _checked(data_fn())
        self._eval = self._build()  # evaluation's own model (the monitor's thread)
        self._eval_lock = threading.Lock()
        self._x0 = self._eval.read()
        self._first: _Process | None = None  # whose buffers evaluation uses
        self._whole: _Process | None = None  # grad() without a process: the whole set

    def _build(self) -> _Flat:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return _Flat(self.model_fn())

    @property
    def dim(self) -> int:
        return self._eval.dim

    @property
    def dtype(self) -> np.dtype[np.floating]:
        return self._eval.dtype

    def x0(self) -> Vector:
        return self._x0.copy()

    def oracle(
        self, pid: int, processes: int, local: int
    ) -> Callable[[Vector, np.random.Generator], Vector]:
        proc = _Process(self, pid, processes)
        if self._first is None:
            self._first = proc
        if "OMP_NUM_THREADS" not in os.environ:  # the user's choice stands
            cores = len(os.sched_getaffinity(0))  # the CPUs this process may run on
            torch.set_num_threads(max(1, cores // max(local, 1)))
        return proc

    def grad(self, x: Vector, rng: np.random.Generator) -> Vector:
        """A gradient on a batch drawn from the whole training set (one caller at a time;
        processes use their own :meth:`oracle`)."""
        if self._whole is None:
            self._whole = _Process(self, 0, 1)
        return self._whole(x, rng)

    def _mean_loss(
        self, x: Vector, data: Tensors, limit: int | None = None
    ) -> tuple[float, float | None]:
        """The mean loss (and accuracy, for class labels) of the model ``x`` on ``data``, in
        chunks of EVAL_CHUNK examples: one forward pass over a whole data set would hold every
        activation of it at once."""
        inputs, targets = data
        if limit is not None:
            inputs, targets = inputs[:limit], targets[:limit]
        n = len(inputs)
        total, correct, labelled = 0.0, 0, True
        # One critical section from loading x to the last chunk: another thread's x loaded in
        # between would be evaluated instead.
        with self._eval_lock, torch.no_grad():
            self._eval.load(x)
            module = self._eval.module
            self._take_buffers(module)
            module.eval()
            for at in range(0, n, EVAL_CHUNK):
                out = module(inputs[at : at + EVAL_CHUNK])
                chunk = targets[at : at + EVAL_CHUNK]
                total += float(self.loss_fn(out, chunk)) * len(chunk)
                labelled = labelled and out.ndim == 2 and chunk.ndim == 1
                labelled = labelled and not chunk.is_floating_point()
                if labelled:
                    correct += int((out.argmax(dim=1) == chunk).sum())
        return total / n, (correct / n if labelled else None)

    def _take_buffers(self, module: nn.Module) -> None:
        """This daemon's first process's buffers into ``module`` (its running statistics)."""
        if self._first is not None:
            for mine, theirs in zip(
                module.buffers(), self._first.model.module.buffers(), strict=True
            ):
                mine.copy_(theirs)

    def loss(self, x: Vector) -> float:
        return self._mean_loss(x, self.train)[0]

    def eval_loss(self, x: Vector, batch: int) -> float:
        return self._mean_loss(x, self.train, min(batch, self.eval_examples))[0]

    def full_grad(self, x: Vector) -> Vector:
        inputs, targets = self.train
        n = len(inputs)
        with self._eval_lock:
            self._eval.load(x)
            module = self._eval.module
            module.train()
            self._eval.grad.zero_()
            for at in range(0, n, EVAL_CHUNK):  # Σ_chunks (n_c / n)·∇(chunk mean): the mean
                chunk = targets[at : at + EVAL_CHUNK]
                part = self.loss_fn(module(inputs[at : at + EVAL_CHUNK]), chunk) * (len(chunk) / n)
                part.backward()  # type: ignore[no-untyped-call]
            return self._eval.copy_grad()

    def evaluate(self, x: Vector) -> dict[str, float]:
        loss, accuracy = self._mean_loss(x, self.test)
        figures = {"test_loss": loss}
        if accuracy is not None:
            figures["test_accuracy"] = accuracy
        return figures

    def export(self, x: Vector, directory: Path) -> list[Path]:
        """``model.pt``: ``torch.save`` of the state dict of :meth:`model` (x) — replaced
        atomically, as ``--out``'s other files are."""
        path = directory / "model.pt"
        state = self.model(x).state_dict()
        write_atomic(path, lambda fh: torch.save(state, fh))
        return [path]

    def model(self, x: Vector) -> nn.Module:
        """A fresh module holding the parameters ``x`` (and this daemon's first process's
        buffers): the trained model to take home."""
        flat = self._build()
        flat.load(x)
        with torch.no_grad():
            self._take_buffers(flat.module)
        return flat.module


def _checked(data: object) -> tuple[Tensors, Tensors]:
    """``data_fn()``'s answer, or a ProblemError that says what was expected."""
    expected = "data_fn() must return ((train_inputs, train_targets), (test_inputs, test_targets))"
    try:
        train, test = cast(tuple[object, object], data)
        xtr, ytr = cast(tuple[object, object], train)
        xte, yte = cast(tuple[object, object], test)
    except (TypeError, ValueError):
        raise ProblemError(expected) from None
    parts: dict[str, object] = {
        "train inputs": xtr,
        "train targets": ytr,
        "test inputs": xte,
        "test targets": yte,
    }
    tensors: list[torch.Tensor] = []
    for name, t in parts.items():
        if not isinstance(t, torch.Tensor):
            raise ProblemError(f"{expected}: the {name} are a {type(t).__name__}, not a tensor")
        tensors.append(t)
    a, b, c, d = tensors
    if len(a) != len(b) or len(c) != len(d):
        raise ProblemError(f"{expected}: inputs and targets differ in length")
    if len(a) == 0 or len(c) == 0:
        raise ProblemError(f"the {'training' if len(a) == 0 else 'test'} set is empty")
    return (a, b), (c, d)


def data_split(
    inputs: torch.Tensor, targets: torch.Tensor, test_fraction: float = 0.25, seed: int = 0
) -> tuple[Tensors, Tensors]:
    """Split ``(inputs, targets)`` into train and test sets by a permutation from ``seed`` (the
    same split in every process)."""
    n = len(inputs)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    cut = n - round(n * test_fraction)
    train, test = order[:cut], order[cut:]
    return (inputs[train], targets[train]), (inputs[test], targets[test])


def train(
    model_fn: ModelFn,
    data_fn: DataFn,
    loss_fn: Loss,
    *,
    listen: str,
    peers: Sequence[str] | str,
    algorithm: str = "alg1",
    steps: int,
    lr: float,
    workers: int = 1,
    out: str | Path | None = None,
    batch_size: int = 32,
    data: Literal["shard", "sample"] = "shard",
    seed: int = 0,
    api: str = "127.0.0.1:0",
    **config: Any,
) -> nn.Module:
    """Run this machine's daemon of a peerlearn run in this process until the run ends, and
    return the trained model: the mean of this daemon's live workers' models (and its first
    process's buffers). Every machine runs the same script with its own ``listen`` and the
    others as ``peers``; ``config`` takes any other setting of ``peerlearn run`` (``secret_file``,
    ``max_failures``, ``state_dir``, …). With ``out``, ``--out``'s files, ``model.pt`` among them.

    The run's fingerprint names ``model_fn`` by module and name: every daemon must run the same
    one. Raises :class:`~peerlearn.errors.PeerlearnError` subclasses for bad settings,
    KeyboardInterrupt when interrupted (the daemon stops gracefully first), and RuntimeError
    when the run did not end here with every local worker finished — stopped, crashed or
    diverged — or its ``out`` files could not be written (the log says why)."""
    problem = TorchProblem(model_fn, data_fn, loss_fn, batch_size=batch_size, data=data, seed=seed)
    name = f"{getattr(model_fn, '__module__', '?')}:{getattr(model_fn, '__qualname__', '?')}"
    cfg = load_node_config(
        None,
        {
            "listen": listen,
            "peers": peers if isinstance(peers, str) else list(peers),  # the config splits
            "api": api,
            "algorithm": algorithm,
            "steps": steps,
            "lr": {"eta": lr},
            "workers": workers,
            "exit_on_finish": True,
            "problem": {"name": name, "batch_size": batch_size, "data": data, "seed": seed},
            **({"out": Path(out)} if out is not None else {}),
            **config,
        },
    )

    ran: list[Daemon] = []
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a script: the daemon's loop is this thread's (it takes SIGINT)
        code, daemon = run_daemon(cfg, problem, ran)
    else:  # a notebook's loop runs here: the daemon gets a thread of its own
        pool = ThreadPoolExecutor(1, thread_name_prefix="peerlearn")
        future = pool.submit(run_daemon, cfg, problem, ran)
        try:
            code, daemon = future.result()
        except BaseException:  # interrupted (KeyboardInterrupt): stop the daemon, then say so
            if ran:
                ran[-1].request_stop_threadsafe("interrupted")
            future.exception()  # its graceful stop
            raise
        finally:
            pool.shutdown(wait=True)
    unfinished = [w.name for w in daemon.workers if w.state is not WorkerState.FINISHED]
    if unfinished:  # stopped (Ctrl-C, SIGTERM, /stop), crashed or diverged: no trained model
        reason = daemon.stop_reason or "see the log"
        if reason.startswith("SIGINT"):
            raise KeyboardInterrupt(f"train() interrupted: workers {', '.join(unfinished)}")
        raise RuntimeError(
            f"the run did not end here: workers {', '.join(unfinished)} did not finish ({reason})"
        )
    if code != 0:  # finished, but the model to take home was not written (the log says why)
        raise RuntimeError(f"the run finished, but its --out files were not written (exit {code})")
    live = [w.x for w in daemon.workers if w.x is not None]
    return problem.model(np.mean(np.stack(live), axis=0))
