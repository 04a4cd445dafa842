"""``peerlearn demo``: several daemons in this process, training live on loopback.

Three daemons × two workers (by default) on 127.0.0.1 ephemeral ports train L2-regularised
softmax regression on the real digits train split with Alg 1 for about a minute, with a live
table; then the mean model's test accuracy is set next to sequential SGD with the same learning
rate and the same number of gradient evaluations, and a PNG plot is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from peerlearn.problems import make_problem
from peerlearn.sim.runner import consensus_distance
from peerlearn.testing import LocalCluster, local_cluster

__all__ = ["DemoSettings", "run_demo"]


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

    def node_fields(self) -> dict[str, Any]:
        lr = self.lr if self.lr is not None else (0.5 if self.problem == "softmax" else 0.1)
        if self.lr is None and self.algorithm == "mdownpour":
            lr *= 0.1  # the center's momentum δ = 0.9 makes the effective step η/(1 − δ)
        fields: dict[str, Any] = {
            "algorithm": self.algorithm,
            "problem": {"name": self.problem},
            "lr": {"schedule": "constant", "eta": lr},
            "seed": self.seed,
            "steps": None,
            **self.extra,
        }
        if self.algorithm == "maa":
            fields["steps"] = 10_000  # agreement instances need a count (seeded inputs)
        if self.algorithm in ("alg2", "maa") and "maa" not in self.extra:
            # A live demo keeps agreement short: the full round count of q = η/4 would make
            # each iteration hundreds of message rounds (see `peerlearn simulate` for those).
            fields["maa"] = {"rounds": 6, "inner_rounds": 4}
        return fields


@dataclass
class _Sample:
    t: float
    losses: list[float]
    consensus: float


def _table(cluster: LocalCluster, rates: dict[int, float], elapsed: float, total: float) -> Table:
    table = Table(title=f"peerlearn demo — {elapsed:4.0f}s / {total:.0f}s", title_justify="left")
    for col in ("worker", "step", "loss", "staleness", "consensus (host)", "msgs/s"):
        table.add_column(col, justify="right" if col != "worker" else "left")
    for i, d in enumerate(cluster.daemons):
        snap = d._snapshot()
        stale = d.staleness_sum / d.staleness_count if d.staleness_count else 0.0
        for w in d.workers:
            loss = d.loss_of(w)
            table.add_row(
                w.name,
                str(w.step),
                "—" if loss is None else f"{loss:.4f}",
                f"{stale:+.2f}",
                "—" if snap.consensus_host is None else f"{snap.consensus_host:.2e}",
                f"{rates.get(i, 0.0):,.0f}",
            )
    return table


def _messages(cluster: LocalCluster) -> list[int]:
    return [sum(d.stats.messages.values()) for d in cluster.daemons]


async def _run(s: DemoSettings, console: Console) -> tuple[list[_Sample], LocalCluster, float]:
    samples: list[_Sample] = []
    async with local_cluster(s.daemons, workers=s.workers, **s.node_fields()) as cluster:
        run, problem = cluster.daemons[0].run_cfg, cluster.daemons[0].problem
        warnings = run.unused_settings() + (
            run.theory_warnings(problem.constants) if problem is not None else []
        )
        for warning in warnings:
            console.print(f"[yellow]note:[/] {warning}", highlight=False)
        started = time.monotonic()
        urls = "\n".join(
            f"  daemon {i}: {u}/  (metrics: {u}/metrics)" for i, u in enumerate(cluster.urls)
        )
        console.print(f"status pages (live charts):\n{urls}")
        last, last_t = _messages(cluster), started
        rates: dict[int, float] = {}
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while (elapsed := time.monotonic() - started) < s.duration:
                await asyncio.sleep(0.5)
                now, counts = time.monotonic(), _messages(cluster)
                rates = {
                    i: (c - p) / (now - last_t)
                    for i, (c, p) in enumerate(zip(counts, last, strict=True))
                }
                last, last_t = counts, now
                losses = [
                    loss
                    for d in cluster.daemons
                    for w in d.workers
                    if (loss := d.loss_of(w)) is not None
                ]
                xs = [w.x for d in cluster.daemons for w in d.workers if w.x is not None]
                samples.append(_Sample(elapsed, losses, consensus_distance(xs)))
                live.update(Group(_table(cluster, rates, elapsed, s.duration)))
        for d in cluster.daemons:
            for w in d.workers:
                w.stop()
        await asyncio.to_thread(lambda: [w.join(30) for d in cluster.daemons for w in d.workers])
        return samples, cluster, time.monotonic() - started


def run_demo(s: DemoSettings, console: Console | None = None) -> dict[str, Any]:
    """Run the demo; returns the figures it printed (for tests and scripts)."""
    import uvloop

    console = console or Console()
    console.print(
        f"[bold]peerlearn demo[/]: {s.algorithm} on {s.problem}, {s.daemons} daemons × "
        f"{s.workers} workers on 127.0.0.1, {s.duration:.0f}s"
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
    if s.algorithm == "maa":
        return _agreement_result(cluster, seconds, console)
    problem = make_problem(s.problem)
    xs = [w.x for d in cluster.daemons for w in d.workers if w.x is not None]
    grads = sum(w.grads for d in cluster.daemons for w in d.workers)
    mean_model = np.mean(xs, axis=0)
    eta = s.node_fields()["lr"]["eta"]
    # Sequential SGD: same learning rate, same number of gradient evaluations.
    rng = np.random.default_rng(s.seed + 12345)
    x = problem.x0()
    for _ in range(grads):
        x = x - eta * problem.grad(x, rng)
    ours, seq = problem.evaluate(mean_model), problem.evaluate(x)
    result: dict[str, Any] = {
        "seconds": seconds,
        "gradient_evaluations": grads,
        "loss": problem.loss(mean_model),
        "sequential_loss": problem.loss(x),
        **{f"{k}": v for k, v in ours.items()},
        **{f"sequential_{k}": v for k, v in seq.items()},
    }
    console.print()
    table = Table(title="result (mean model of all workers)", title_justify="left")
    table.add_column("")
    table.add_column(f"{s.algorithm}, {s.daemons}×{s.workers} workers", justify="right")
    table.add_column("sequential SGD", justify="right")
    table.add_row("gradient evaluations", f"{grads:,}", f"{grads:,}")
    table.add_row("train loss", f"{result['loss']:.4f}", f"{result['sequential_loss']:.4f}")
    for key in ours:
        table.add_row(key.replace("_", " "), f"{ours[key]:.4f}", f"{seq[key]:.4f}")
    console.print(table)
    plot = _plot(samples, s)
    console.print(f"plot: {plot}")
    result["plot"] = str(plot)
    return result


def _agreement_result(cluster: LocalCluster, seconds: float, console: Console) -> dict[str, Any]:
    """Standalone agreement has no loss: report the instances completed (each one's
    contraction is what `peerlearn simulate --algorithm maa --trace` shows in detail)."""
    workers = [w for d in cluster.daemons for w in d.workers]
    done = min(max(w.step - 1, 0) for w in workers)
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


def _plot(samples: list[_Sample], s: DemoSettings) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s.out.mkdir(parents=True, exist_ok=True)
    path = s.out / "demo.png"
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ts = [p.t for p in samples if p.losses]
    a.plot(ts, [float(np.mean(p.losses)) for p in samples if p.losses], label="mean loss")
    a.set_ylabel("train loss")
    a.set_title(f"peerlearn demo: {s.algorithm} on {s.problem}, {s.daemons}×{s.workers} workers")
    a.legend()
    b.plot([p.t for p in samples], [p.consensus for p in samples], color="tab:orange")
    b.set_ylabel("consensus distance")
    if any(p.consensus > 0 for p in samples):
        b.set_yscale("log")
    b.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
