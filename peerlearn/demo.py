"""``peerlearn demo``: several daemons in this process, training live on loopback.

Three daemons × two workers (by default) on 127.0.0.1 ephemeral ports train L2-regularised
softmax regression on the real digits train split with Alg 1 for about a minute, with a live
table (or, when stdout is not a terminal, a plain progress line every few seconds); then the
mean model's test accuracy is set next to sequential SGD with the same learning rate and the
same number of gradient evaluations, and ``demo.png``, ``summary.json`` and ``metrics.csv`` are
written.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from peerlearn.algorithms.registry import lookup
from peerlearn.algorithms.spec import AlgorithmSpec
from peerlearn.effects import quiet_float_errors
from peerlearn.problems import make_problem
from peerlearn.runtime.worker import WorkerState
from peerlearn.sim.runner import consensus_distance
from peerlearn.testing import LocalCluster, local_cluster

if TYPE_CHECKING:
    from peerlearn.config import RunConfig
    from peerlearn.effects import Vector
    from peerlearn.problems.base import Problem

__all__ = ["SCHEMA_VERSION", "DemoSettings", "run_demo"]

SCHEMA_VERSION = 1  # of summary.json

#: the demo's agreement per iteration for alg2 and maa (see DemoSettings.node_fields)
SHORT_AGREEMENT = {"rounds": 6, "inner_rounds": 4}


@dataclass
class DemoSettings:
    algorithm: str = "alg1"
    problem: str = "softmax"
    daemons: int = 3
    workers: int = 2
    duration: float = 60.0
    lr: float | None = None
    seed: int = 0
    out: Path = Path("runs/demo")
    extra: dict[str, Any] = field(default_factory=dict)
    progress_every: float = 5.0  # seconds between progress lines when stdout is no terminal

    def eta(self) -> float:
        """``lr``, or the problem's usual step shrunk until it meets every step-size condition
        the run's own theory warnings check (:func:`_default_eta`)."""
        if self.lr is not None:
            return self.lr
        given = self.extra.get("lr")
        if isinstance(given, dict) and isinstance(given.get("eta"), int | float):
            return float(given["eta"])  # --set lr.eta=…, which node_fields lets win
        return _default_eta(
            self.algorithm,
            self.problem,
            self.daemons,
            self.workers,
            self.seed,
            json.dumps(self.extra, sort_keys=True, default=str),
        )

    def node_fields(self, eta: float | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "algorithm": self.algorithm,
            "problem": {"name": self.problem},
            "lr": {"schedule": "constant", "eta": self.eta() if eta is None else eta},
            "seed": self.seed,
            "steps": None,
            **self.extra,
        }
        if not self.spec.needs_problem:
            fields["steps"] = 10_000  # agreement instances need a count (seeded inputs)
        if self.shortens_agreement():
            # A live demo keeps agreement short: the full round count of q = η/4 would make
            # each iteration hundreds of message rounds (see `peerlearn simulate` for those).
            fields["maa"] = dict(SHORT_AGREEMENT)
        return fields

    @property
    def spec(self) -> AlgorithmSpec:
        return lookup(self.algorithm)

    def shortens_agreement(self) -> bool:
        return self.spec.agreement and "maa" not in self.extra

    def run_config(self, eta: float | None = None) -> RunConfig:
        """The run every daemon of this demo builds (stand-in addresses for the real ports)."""
        from peerlearn.daemon.config import load_node_config

        # five-digit ports sort like their numbers, so daemon i is cluster i
        addrs = [f"127.0.0.1:{10_000 + i}" for i in range(self.daemons)]
        return load_node_config(
            None,
            {
                "listen": addrs[0],
                "peers": addrs[1:],
                "api": "127.0.0.1:0",
                "workers": self.workers,
                **self.node_fields(eta),
            },
        ).run

    def warnings(self, eta: float | None = None) -> list[str]:
        """What ``peerlearn run`` would warn about for this demo's run."""
        run = self.run_config(eta)
        if not run.spec.needs_problem:  # no problem, no step size
            return run.unused_settings()
        problem = _problem(run.problem.name, json.dumps(run.problem.params, sort_keys=True))
        return run.unused_settings() + run.theory_warnings(problem.constants)


@functools.lru_cache(maxsize=8)
def _problem(name: str, params: str) -> Problem:
    return make_problem(name, **json.loads(params))


@functools.lru_cache(maxsize=64)
def _default_eta(
    algorithm: str, problem: str, daemons: int, workers: int, seed: int, extra: str
) -> float:
    """The demo's default step: 0.5 for softmax, 0.1 otherwise (a tenth with MDOWNPOUR, whose
    center momentum δ = 0.9 makes the effective step η/(1 − δ)), then × 0.8 (two significant
    digits) while it breaks more of the theory's conditions than a tiny step does — those a
    step size cannot mend (μ unknown) stay and are printed. Judged with the full agreement
    (the demo's short one is a warning of its own, which a result's one sentence would merge
    with the step's)."""
    given = json.loads(extra)
    given.setdefault("maa", {})
    s = DemoSettings(algorithm, problem, daemons, workers, seed=seed, extra=given)
    base = (0.5 if problem == "softmax" else 0.1) * s.spec.demo_step
    floor = len(s.warnings(base * 1e-6))
    eta = base
    while eta > base * 1e-6 and len(s.warnings(eta)) > floor:
        eta = float(f"{eta * 0.8:.2g}")
    return eta


@dataclass
class _Sample:
    t: float
    grads: int  # gradient evaluations of every worker so far
    workers: list[tuple[str, int, float | None]]  # name, completed steps, eval-batch loss
    mean_loss: float | None  # training loss of the mean model
    consensus: float


#: the live table's columns that can stay 0 for a whole run (staleness under synchronous
#: exchanges, host consensus under exact averaging): shown once a value is not 0
_SOMETIMES_ZERO = ("staleness", "consensus (host)")
_STALENESS_NOTE = (
    "staleness: per daemon, the mean over received messages of (receiver's step − the step "
    "the message was computed at); negative: the message came from an iteration ahead and "
    "waited in the buffer"
)


@dataclass
class _Row:
    worker: str
    step: int
    loss: float | None
    staleness: float
    consensus_host: float | None
    rate: float


def _rows(cluster: LocalCluster, rates: dict[int, float]) -> list[_Row]:
    rows = []
    for i, d in enumerate(cluster.daemons):
        snap = d.monitor.snapshot()
        stale = d.staleness.total / d.staleness.count if d.staleness.count else 0.0
        for w in d.workers:
            rows.append(
                _Row(w.name, w.completed, d.loss_of(w), stale, snap.consensus_host, rates.get(i, 0))
            )
    return rows


def _table(rows: list[_Row], shown: set[str], elapsed: float, total: float) -> Table:
    stale = "staleness" in shown
    table = Table(
        title=f"peerlearn demo — {elapsed:4.0f}s / {total:.0f}s",
        title_justify="left",
        caption=_STALENESS_NOTE if stale else None,
        caption_justify="left",
    )
    columns = ["worker", "step", "loss", *(c for c in _SOMETIMES_ZERO if c in shown), "msgs/s"]
    for col in columns:
        table.add_column(col, justify="right" if col != "worker" else "left")
    for r in rows:
        cells = {
            "worker": r.worker,
            "step": str(r.step),
            "loss": "—" if r.loss is None else f"{r.loss:.4f}",
            "staleness": f"{r.staleness:+.2f}",
            "consensus (host)": "—" if r.consensus_host is None else f"{r.consensus_host:.2e}",
            "msgs/s": f"{r.rate:,.0f}",
        }
        table.add_row(*(cells[c] for c in columns))
    return table


def _progress_line(rows: list[_Row], sample: _Sample, elapsed: float, total: float) -> str:
    """One plain line for a log file: no escape codes, figures over all workers."""
    steps = [r.step for r in rows]
    line = f"{elapsed:5.1f}s/{total:.0f}s  steps {min(steps)}–{max(steps)}"
    line += f"  gradients {sample.grads:,}"
    if sample.mean_loss is not None:
        line += f"  loss (mean model) {sample.mean_loss:.4f}"
    rates = {r.worker.partition(".")[0]: r.rate for r in rows}  # one rate per daemon
    line += f"  consensus {sample.consensus:.2e}  msgs/s {sum(rates.values()):,.0f}"
    return line


def _messages(cluster: LocalCluster) -> list[int]:
    return [sum(d.stats.messages.values()) for d in cluster.daemons]


def _live_models(cluster: LocalCluster) -> list[Vector]:
    """The models of the live workers (``Worker.live``): a crashed worker's is frozen where it
    stopped and a diverged one's last finite model may be astronomically far away, so neither
    enters the mean model or the consensus distance."""
    return [w.x for d in cluster.daemons for w in d.workers if w.live and w.x is not None]


def _sample(cluster: LocalCluster, problem: Problem | None, elapsed: float) -> _Sample:
    workers = [w for d in cluster.daemons for w in d.workers]
    xs = _live_models(cluster)
    mean_loss = None
    if problem is not None and xs:
        with quiet_float_errors():  # a diverging model's loss is inf, not a warning
            mean_loss = float(problem.loss(np.mean(xs, axis=0)))
    return _Sample(
        elapsed,
        sum(w.grads for w in workers),
        [(w.name, w.completed, d.loss_of(w)) for d in cluster.daemons for w in d.workers],
        mean_loss,
        consensus_distance(xs) if xs else 0.0,
    )


async def _run(s: DemoSettings, console: Console) -> tuple[list[_Sample], LocalCluster, float]:
    samples: list[_Sample] = []
    async with local_cluster(s.daemons, workers=s.workers, **s.node_fields()) as cluster:
        run, problem = cluster.daemons[0].run_cfg, cluster.daemons[0].problem
        warnings = run.unused_settings() + (
            run.theory_warnings(problem.constants) if problem is not None else []
        )
        for warning in warnings:
            console.print(f"[yellow]note:[/] {escape(warning)}", highlight=False)
        if warnings and s.shortens_agreement() and run.spec.needs_problem:
            console.print(
                f"      (the demo shortens agreement to {SHORT_AGREEMENT['rounds']}×"
                f"{SHORT_AGREEMENT['inner_rounds']} rounds per iteration to stay live; `peerlearn "
                "simulate --algorithm alg2` runs the full count)",
                markup=False,
                highlight=False,
            )
        started = time.monotonic()
        urls = "\n".join(
            f"  daemon {i}: {u}/  (metrics: {u}/metrics)" for i, u in enumerate(cluster.urls)
        )
        console.print(f"status pages (live charts):\n{urls}", markup=False, highlight=False)
        if problem is not None:  # step 0: every worker starts from the problem's x_1
            x1_loss = float(problem.loss(problem.x0()))
            samples.append(_Sample(0.0, 0, [], x1_loss, 0.0))
        last, last_t = _messages(cluster), started
        rates: dict[int, float] = {}
        shown: set[str] = set()
        # A terminal gets the live table; a file or pipe (make demo > FILE) a plain line every
        # few seconds, since a live display there writes nothing until it stops.
        live = Live(console=console, refresh_per_second=4) if console.is_terminal else None
        next_line = s.progress_every
        with live if live is not None else contextlib.nullcontext():
            while (elapsed := time.monotonic() - started) < s.duration:
                await asyncio.sleep(min(0.5, max(s.duration - elapsed, 0.01)))
                now, counts = time.monotonic(), _messages(cluster)
                rates = {
                    i: (c - p) / (now - last_t)
                    for i, (c, p) in enumerate(zip(counts, last, strict=True))
                }
                last, last_t = counts, now
                elapsed = now - started
                samples.append(_sample(cluster, problem, elapsed))
                rows = _rows(cluster, rates)
                shown |= {c for r in rows for c, v in _values(r) if v}
                if live is not None:
                    live.update(Group(_table(rows, shown, elapsed, s.duration)))
                elif elapsed >= next_line:
                    line = _progress_line(rows, samples[-1], elapsed, s.duration)
                    console.print(line, markup=False, highlight=False, soft_wrap=True)
                    next_line += s.progress_every
        if live is None:  # the table once, for the record
            console.print(_table(_rows(cluster, rates), shown, elapsed, s.duration))
        for d in cluster.daemons:
            for w in d.workers:
                w.stop()
        await asyncio.to_thread(lambda: [w.join(30) for d in cluster.daemons for w in d.workers])
        return samples, cluster, time.monotonic() - started


def _values(r: _Row) -> tuple[tuple[str, float], ...]:
    return (("staleness", r.staleness), ("consensus (host)", r.consensus_host or 0.0))


def run_demo(s: DemoSettings, console: Console | None = None) -> dict[str, Any]:
    """Run the demo; returns the figures it printed (for tests and scripts)."""
    import uvloop

    console = console or Console(emoji=False)  # user strings literally, as peerlearn.console
    eta = s.eta()
    console.print(
        f"[bold]peerlearn demo[/]: {escape(s.algorithm)} on {escape(s.problem)}, {s.daemons} "
        f"daemons × {s.workers} workers on 127.0.0.1, {s.duration:.0f}s"
        + (f", η = {eta:g}" if s.spec.needs_problem else ""),
        soft_wrap=True,
    )
    # The live table is the interface: the daemons' own start-up warnings (one per daemon)
    # would tear it, so they are said once here and the daemons log errors only.
    logger = logging.getLogger("peerlearn")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        samples, cluster, seconds = uvloop.run(_run(s, console))
    finally:
        logger.setLevel(level)
    if not s.spec.needs_problem:
        agreement = _agreement_result(cluster, seconds, console)
        _write_files(s, samples, _summary(s, cluster, seconds, agreement, None), console)
        _say_failures(cluster, console)
        return {**agreement, "status": _status(cluster)}
    problem = cluster.daemons[0].problem
    assert problem is not None
    xs = _live_models(cluster)
    grads = sum(w.grads for d in cluster.daemons for w in d.workers)
    with quiet_float_errors():  # a model near divergence may sum to inf: evaluated as such
        mean_model = np.mean(xs, axis=0) if xs else None  # None: no live worker has a model
    # Sequential SGD: same learning rate, same number of gradient evaluations; its loss is
    # recorded at the gradient counts the demo sampled, for the plot.
    rng = np.random.default_rng(s.seed + 12345)
    x = problem.x0()
    marks = sorted({p.grads for p in samples if p.grads <= grads})
    curve: list[tuple[int, float]] = []
    seq_started = time.perf_counter()
    with quiet_float_errors():
        for i in range(grads + 1):
            if marks and marks[0] == i:
                marks.pop(0)
                curve.append((i, float(problem.loss(x))))
            if i < grads:
                x = x - eta * problem.grad(x, rng)
        seq_seconds = time.perf_counter() - seq_started
        seq = problem.evaluate(x)
        ours: dict[str, float | None] = (
            dict.fromkeys(seq) if mean_model is None else dict(problem.evaluate(mean_model))
        )
        result: dict[str, Any] = {
            "seconds": seconds,
            "gradient_evaluations": grads,
            "gradients_per_second": grads / seconds,
            "loss": None if mean_model is None else problem.loss(mean_model),
            "sequential_seconds": seq_seconds,
            "sequential_gradients_per_second": grads / seq_seconds if seq_seconds > 0 else None,
            "sequential_loss": problem.loss(x),
            **{f"{k}": v for k, v in ours.items()},
            **{f"sequential_{k}": v for k, v in seq.items()},
        }
    console.print()
    table = Table(title="result (mean model of the live workers)", title_justify="left")
    table.add_column("")
    table.add_column(f"{s.algorithm}, {s.daemons}×{s.workers} workers", justify="right")
    table.add_column("sequential SGD", justify="right")
    table.add_row("gradient evaluations", f"{grads:,}", f"{grads:,}")
    table.add_row("wall time", f"{seconds:.1f} s", f"{seq_seconds:.1f} s")
    seq_rate = result["sequential_gradients_per_second"]
    table.add_row(
        "gradients/s",
        f"{result['gradients_per_second']:,.0f}",
        "—" if seq_rate is None else f"{seq_rate:,.0f}",
    )
    table.add_row("train loss", _cell(result["loss"]), _cell(result["sequential_loss"]))
    for key in ours:
        table.add_row(key.replace("_", " "), _cell(ours[key]), _cell(seq[key]))
    console.print(table)
    console.print(
        f"Same gradient budget: sequential SGD takes the same {grads:,} stochastic gradient steps "
        f"(η = {eta:g}) one after another, so the loss and accuracy rows compare what each learned "
        "from equal work. The wall times are not a speed-up: these daemons share one Python "
        "process and this machine's cores, and sequential SGD sends no messages.",
        markup=False,
        highlight=False,
    )
    summary = _summary(s, cluster, seconds, result, problem)
    _write_files(s, samples, summary, console, sequential=curve)
    _say_failures(cluster, console)
    result["plot"] = str(s.out / "demo.png")
    result["status"] = summary["status"]
    return result


def _cell(v: float | None) -> str:
    """A result cell: "—" when no live worker is left to evaluate."""
    return "—" if v is None else f"{v:.4f}"


def _status(cluster: LocalCluster) -> str:
    """The run's status in `peerlearn simulate`'s words: a worker that raised fails the run,
    a non-finite value diverges it."""
    states = {w.state for d in cluster.daemons for w in d.workers}
    if WorkerState.CRASHED in states:
        return "failed"
    return "diverged" if WorkerState.DIVERGED in states else "finished"


def _say_failures(cluster: LocalCluster, console: Console) -> None:
    """A line for the crashed workers and one for the diverged, as `peerlearn simulate` says
    them (the exit code is the command's: 1 for either)."""
    workers = [w for d in cluster.daemons for w in d.workers]
    crashed = [w for w in workers if w.state is WorkerState.CRASHED]
    diverged = [w for w in workers if w.diverged is not None]
    if crashed:
        more = f" ({len(crashed)} of {len(workers)} workers crashed)" if crashed[1:] else ""
        console.print(
            f"[red]failed:[/] worker {crashed[0].name} crashed: {escape(crashed[0].error or '')}"
            f"{more}. Its model is left out of the mean model.",
            highlight=False,
            soft_wrap=True,
        )
    if diverged:
        first = min(diverged, key=lambda w: (w.diverged or (0, ""), w.pid))
        assert first.diverged is not None
        more = f" ({len(diverged)} of {len(workers)} workers diverged)" if diverged[1:] else ""
        console.print(
            f"[red]diverged:[/] worker {first.name} computed a non-finite "
            f"{first.diverged.quantity} at iteration {first.diverged.step}{more}. A diverged "
            "worker stops before sending the value, as if it crashed, and its model is left "
            "out of the mean model; a smaller learning rate may help.",
            highlight=False,
            soft_wrap=True,
        )


def _agreement_result(cluster: LocalCluster, seconds: float, console: Console) -> dict[str, Any]:
    """Standalone agreement has no loss: report the instances completed (each one's
    contraction is what `peerlearn simulate --algorithm maa --trace` shows in detail)."""
    workers = [w for d in cluster.daemons for w in d.workers]
    done = min(w.completed for w in workers)
    table = Table(title="result (standalone agreement)", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("instances completed by every worker", f"{done:,}")
    table.add_row(
        "agreement rounds per instance", str(cluster.daemons[0].run_cfg.agreement_rounds()[0])
    )
    console.print()
    console.print(table)
    return {"seconds": seconds, "instances": done}


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or np.isfinite(v) else None


def _summary(
    s: DemoSettings,
    cluster: LocalCluster,
    seconds: float,
    result: dict[str, Any],
    problem: Problem | None,
) -> dict[str, Any]:
    """summary.json: like `peerlearn simulate`'s — status, config, per-worker figures, the
    mean model's evaluation and the sequential baseline."""
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "status": _status(cluster),
        "config": {
            "daemons": s.daemons,
            "workers_per_daemon": s.workers,
            "duration": s.duration,
            "node": cluster.daemons[0].run_cfg.model_dump(mode="json", exclude={"sim"}),
        },
        "seconds": seconds,
        "workers": [
            {
                "id": w.name,
                "daemon": i,
                "state": str(w.state),
                "error": w.error,
                # where it diverged ({step, quantity}, as in /status), or null
                "diverged": None if w.diverged is None else w.diverged._asdict(),
                "steps": w.completed,
                "gradients": w.grads,
                "loss": _finite(d.loss_of(w)),
            }
            for i, d in enumerate(cluster.daemons)
            for w in d.workers
        ],
    }
    if problem is None:
        data["instances_completed"] = result["instances"]
        return data
    evaluation = {k: _finite(v) for k, v in result.items() if not k.startswith("sequential_")}
    data["gradient_evaluations"] = evaluation.pop("gradient_evaluations")
    data["gradients_per_second"] = evaluation.pop("gradients_per_second")
    evaluation.pop("seconds")
    data["mean_model"] = evaluation
    data["sequential"] = {
        "what": "sequential SGD, same η and the same number of gradient evaluations",
        "gradient_evaluations": data["gradient_evaluations"],
        **{
            k.removeprefix("sequential_"): _finite(v)
            for k, v in result.items()
            if k.startswith("sequential_")
        },
    }
    return data


def _write_files(
    s: DemoSettings,
    samples: list[_Sample],
    summary: dict[str, Any],
    console: Console,
    *,
    sequential: list[tuple[int, float]] | None = None,
) -> None:
    """summary.json and metrics.csv, and demo.png unless ``sequential`` is None (agreement)."""
    s.out.mkdir(parents=True, exist_ok=True)
    paths = [s.out / "summary.json", s.out / "metrics.csv"]
    paths[0].write_text(json.dumps(summary, indent=2) + "\n")
    with paths[1].open("w", newline="") as fh:
        # the columns of `peerlearn simulate`'s metrics.csv, in seconds; plus the gradient
        # evaluations of all workers so far and the mean model's training loss
        out = csv.writer(fh)
        out.writerow(
            ["time", "process", "step", "loss", "consensus_distance", "gradients", "mean_loss"]
        )
        for p in samples:
            mean = "" if p.mean_loss is None else f"{p.mean_loss:.10g}"
            for name, step, loss in p.workers:
                cells = [f"{p.t:.3f}", name, step, "" if loss is None else f"{loss:.10g}"]
                out.writerow([*cells, f"{p.consensus:.10g}", p.grads, mean])
    if sequential is not None:
        paths.append(_plot(samples, s, sequential))
    for path in paths:
        console.print(f"wrote {path}", markup=False, highlight=False)


def _plot(samples: list[_Sample], s: DemoSettings, sequential: list[tuple[int, float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peerlearn.sim.output import log_panel

    path = s.out / "demo.png"
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    pts = [(p.grads, p.mean_loss) for p in samples if p.mean_loss is not None]
    a.plot([g for g, _ in pts], [v for _, v in pts], label=f"{s.algorithm}: mean model")
    if sequential:
        a.plot(
            [g for g, _ in sequential],
            [v for _, v in sequential],
            "--",
            color="tab:gray",
            label="sequential SGD, same η",
        )
    a.set_ylabel("train loss")
    a.set_title(f"peerlearn demo: {s.algorithm} on {s.problem}, {s.daemons}×{s.workers} workers")
    a.legend(loc="upper right")
    log_panel(b, [p.grads for p in samples], [p.consensus for p in samples], color="tab:orange")
    b.set_ylabel("consensus distance")
    b.set_xlabel("gradient evaluations (all workers)")
    with quiet_float_errors():
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
