"""What ``peerlearn simulate --out DIR`` writes.

* ``summary.json`` — ``schema_version``, the resolved config, ``status``, blocked, diverged and
  crashed processes, restarts (who, when, the iteration it was in, where it resumed, whose state
  it took), totals, and ``processes``: id, cluster, crashed, diverged, restarts and the iterations
  it resumed at, steps done, final ``x`` (a diverged process's last finite model), final loss;
* ``metrics.csv``  — samples in virtual time: ``time,process,step,loss,consensus_distance``;
* ``plot.png``     — mean loss and consensus distance over virtual time, from time 0 (x_1), with
  sequential SGD of one process alone over the same virtual time as the baseline;
* ``trace.jsonl``  — with ``--trace``: one line per value a process holds at the start of every
  cluster-MAA round (``inner_round`` null) and shared-memory round (``inner_round`` k); the
  outputs appear as round R+1.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from peerlearn.algorithms.staleness import apply_log, loose_staleness, summarize
from peerlearn.effects import quiet_float_errors
from peerlearn.runs import grad_stream
from peerlearn.sim.runner import SimResult

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.axes import Axes

__all__ = [
    "SCHEMA_VERSION",
    "log_panel",
    "sequential_baseline",
    "staleness_figures",
    "summary",
    "write_outputs",
]

SCHEMA_VERSION = 1


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def staleness_figures(result: SimResult) -> dict[str, Any] | None:
    """DASGD's Def. 2 figures: tight (S) always, loose (Ŝ) when the run kept the logs and no
    node restarted (Ŝ replays every node's apply log from its first step; a restarted node's
    log starts again where it resumed)."""
    if not result.staleness:
        return None
    s_avg, s_max = summarize(result.staleness)
    out: dict[str, Any] = {"S_avg": s_avg, "S_max": s_max, "S_hat_avg": None, "S_hat_max": None}
    names = {rep.name for _, rep in result.reports}
    if {"staleness", "compute"} <= names and not result.outcome.restarts:
        loose = loose_staleness(apply_log(result.reports))
        out["S_hat_avg"], out["S_hat_max"] = loose.avg, loose.max
    return out


def summary(result: SimResult) -> dict[str, Any]:
    cfg, out = result.config, result.outcome
    members = cfg.membership
    rounds, inner = cfg.agreement_rounds()
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "config": cfg.model_dump(mode="json"),
        "status": str(out.status),
        "error": out.error,
        "derived": {
            "failures": cfg.failures,
            "quorum": cfg.n_quorum,
            "agreement_rounds": rounds if cfg.spec.agreement else None,
            "shared_memory_rounds": inner if cfg.spec.agreement else None,
        },
        "virtual_time": out.time,
        "events": out.events,
        "messages_delivered": out.deliveries,
        "messages_dropped_late": out.dropped_late,
        "messages_held_by_partition": out.held,
        "final_loss": _num(result.final_loss),
        "max_pairwise_sq_distance": _num(result.max_pairwise_distance),
        "stationary_distance": _num(result.stationary_distance),
        "staleness": staleness_figures(result),
        "blocked": [
            {
                "process": b.name,
                "tag": list(b.tag),
                "have": b.have,
                "need": b.need,
                "unit": b.unit,
            }
            for b in out.blocked
        ],
        "diverged": [
            {"process": d.name, "step": d.step, "quantity": d.quantity} for d in out.diverged
        ],
        "crashed": [p.name for p in result.processes if p.crashed],
        "restarts": [
            {
                "process": r.name,
                "time": r.time,
                "step": r.step,
                "resumed_at": r.resumed_at,
                "from": r.source,
                "from_step": r.source_step,
            }
            for r in out.restarts
        ],
        "processes": [
            {
                "id": p.name,
                "cluster": p.cluster,
                "crashed": p.crashed,
                "diverged": p.diverged,
                "restarts": len(p.restarts),
                "resumed_at": list(p.resumed_at),
                "steps_done": p.steps_done,
                "x": None if p.x is None else [float(v) for v in p.x],
                "loss": _num(p.loss),
                # Alg 2's output is x_τ (τ common, uniform in [1, T]); Alg 1's is x_{T+1}
                "output": [float(v) for v in p.output]
                if isinstance(p.output, np.ndarray)
                else None,
            }
            for p in result.processes
        ],
    }
    if result.problem is not None:
        live = [p.x for p in result.live() if p.x is not None]
        if live:
            with quiet_float_errors():  # huge models near divergence: inf → null, no warning
                evaluation = result.problem.evaluate(np.mean(live, axis=0))
            data["evaluation_of_mean_model"] = {k: _num(v) for k, v in evaluation.items()}
    del members
    return data


def _write_metrics(result: SimResult, path: Path) -> None:
    names = result.config.membership.name
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["time", "process", "step", "loss", "consensus_distance"])
        for time, pid, step, loss, cd in result.samples:
            w.writerow(
                [
                    f"{time:.6g}",
                    names(pid),
                    step,
                    "" if loss is None else f"{loss:.10g}",
                    f"{cd:.10g}",
                ]
            )


def _write_trace(result: SimResult, path: Path) -> None:
    members = result.config.membership
    with path.open("w") as fh:
        for instance, rnd, inner, pid, value in result.trace:
            fh.write(
                json.dumps(
                    {
                        "instance": instance,
                        "round": rnd,
                        "inner_round": inner,
                        "process": members.name(pid),
                        "cluster": members.cluster_of[pid],
                        "value": [float(v) for v in value],
                    }
                )
                + "\n"
            )


def log_panel(ax: Axes, xs: Sequence[float], ys: Sequence[float], color: str) -> None:
    """``ys`` over ``xs`` on a log axis that stays readable when values hit 0 or dip far below
    the rest (one 1e-30 among 1e-3…1; exact averages leaving 1e-32 of rounding): the axis
    starts two decades below the 10th percentile of the positive values within 15 decades of
    the largest (or at the smallest of those, when nothing lies below it), and values under
    that floor are drawn on it, marked ▼. No positive value at all: a linear axis."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    positive = sorted(y for _, y in pairs if y > 0)
    if not positive:
        ax.plot([x for x, _ in pairs], [y for _, y in pairs], color=color)
        return
    usable = [y for y in positive if y >= positive[-1] * 1e-15]
    lowest = usable[(len(usable) - 1) // 10] * 1e-2
    floor = max(usable[0], lowest)
    if any(y < floor for _, y in pairs):  # points drawn on the floor must not look like data
        floor = lowest
    ax.set_yscale("log")
    ax.plot([x for x, _ in pairs], [max(y, floor) for _, y in pairs], color=color)
    low = [x for x, y in pairs if y < floor]
    if low:
        ax.plot(
            low,
            [floor] * len(low),
            "v",
            color=color,
            markersize=4,
            label=f"below {floor:.1e} (0, rounding or a rare dip): drawn at it",
        )
        ax.legend(loc="best", fontsize="small")
    ax.set_ylim(bottom=floor / 2)


#: gradient steps the plot's sequential baseline may take (a long run is cut off there)
_BASELINE_STEPS = 200_000


def sequential_baseline(result: SimResult, times: Sequence[float]) -> list[tuple[float, float]]:
    """What one process alone makes of the same virtual time: sequential SGD from x_1 with the
    run's learning rate, one stochastic gradient per mean compute time (``sim.compute.mean``),
    its loss at each of ``times``. Empty where there is no such baseline (standalone agreement,
    zero compute time); it ends where its model stops being finite."""
    problem, cfg = result.problem, result.config
    step_time = cfg.sim.compute.mean
    if problem is None or step_time <= 0 or not times:
        return []
    eta = cfg.schedule()
    rng = grad_stream(cfg, 0)  # a fresh copy of process 0's noise stream
    x, t, out = problem.x0(), 0, []
    for time in times:
        while (t + 1) * step_time <= time and t < _BASELINE_STEPS:
            t += 1
            x = x - eta(t) * problem.grad(x, rng)
        loss = problem.loss(x)
        if not math.isfinite(loss):
            break
        out.append((time, loss))
    return out


def _write_plot(result: SimResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_at: dict[float, list[float]] = defaultdict(list)
    cd_at: dict[float, float] = {}
    for time, _, _, loss, cd in result.samples:
        # A diverging run's last samples overflow to inf: no place on a (log) axis.
        if loss is not None and math.isfinite(loss):
            loss_at[time].append(loss)
        if math.isfinite(cd):
            cd_at[time] = cd
    problem = result.problem
    if problem is not None and 0.0 not in loss_at:
        # Step 0: every process starts from the problem's x_1, so the curve starts at its loss
        # and at consensus 0 (standalone agreement starts from random inputs: no such point).
        loss_at[0.0] = [problem.loss(problem.x0())]
        cd_at.setdefault(0.0, 0.0)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    cfg = result.config
    fig.suptitle(
        f"{cfg.algorithm} · {cfg.problem.name if cfg.spec.needs_problem else 'agreement'} · "
        f"n={cfg.processes} m={cfg.clusters} N={cfg.n_quorum} · {result.status}"
    )
    if loss_at:
        ts = sorted(loss_at)
        ax1.plot(ts, [float(np.mean(loss_at[t])) for t in ts], label="mean loss (live)")
        baseline = sequential_baseline(result, ts)
        if baseline:
            bt, bl = zip(*baseline, strict=True)
            ax1.plot(
                bt, bl, color="tab:gray", linestyle="--", label="sequential SGD, one process alone"
            )
        low, high = min(map(min, loss_at.values())), max(map(max, loss_at.values()))
        if low > 0 and high < 1e12 * low:  # (no dip to rounding level squashing the panel)
            ax1.set_yscale("log")  # the noise floors apart: what averaging buys shows there
        ax1.set_ylabel("loss")
        ax1.legend()
    else:
        ax1.text(0.5, 0.5, "no loss for standalone agreement", ha="center", transform=ax1.transAxes)
    ts = sorted(cd_at)
    log_panel(ax2, ts, [cd_at[t] for t in ts], color="tab:orange")
    ax2.set_ylabel("consensus distance")
    ax2.set_xlabel("virtual time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: SimResult, out: Path) -> list[Path]:
    """Write every output file into ``out`` (created if needed); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.json", out / "metrics.csv", out / "plot.png"]
    paths[0].write_text(json.dumps(summary(result), indent=2) + "\n")
    _write_metrics(result, paths[1])
    with quiet_float_errors():  # means and log scales of huge values near divergence
        _write_plot(result, paths[2])
    if result.config.trace:
        paths.append(out / "trace.jsonl")
        _write_trace(result, paths[-1])
    return paths
