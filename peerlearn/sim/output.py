"""What ``peerlearn simulate --out DIR`` writes.

* ``summary.json`` — ``schema_version``, the resolved config, ``status``, blocked and crashed
  processes, totals, and ``processes``: id, cluster, crashed, steps done, final ``x``, final loss;
* ``metrics.csv``  — samples in virtual time: ``time,process,step,loss,consensus_distance``;
* ``plot.png``     — mean loss and consensus distance over virtual time;
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
from typing import Any

import numpy as np

from peerlearn.algorithms.staleness import apply_log, loose_staleness, summarize
from peerlearn.sim.runner import SimResult

__all__ = ["SCHEMA_VERSION", "staleness_figures", "summary", "write_outputs"]

SCHEMA_VERSION = 1


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def staleness_figures(result: SimResult) -> dict[str, Any] | None:
    """DASGD's Def. 2 figures: tight (S) always, loose (Ŝ) when the run kept the logs."""
    if not result.staleness:
        return None
    s_avg, s_max = summarize(result.staleness)
    out: dict[str, Any] = {"S_avg": s_avg, "S_max": s_max, "S_hat_avg": None, "S_hat_max": None}
    names = {rep.name for _, rep in result.reports}
    if {"staleness", "compute"} <= names:
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
            "agreement_rounds": rounds if cfg.algorithm in ("alg2", "maa") else None,
            "shared_memory_rounds": inner if cfg.algorithm in ("alg2", "maa") else None,
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
        "crashed": [p.name for p in result.processes if p.crashed],
        "processes": [
            {
                "id": p.name,
                "cluster": p.cluster,
                "crashed": p.crashed,
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
            data["evaluation_of_mean_model"] = {
                k: _num(v) for k, v in result.problem.evaluate(np.mean(live, axis=0)).items()
            }
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


def _write_plot(result: SimResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_at: dict[float, list[float]] = defaultdict(list)
    cd_at: dict[float, float] = {}
    for time, _, _, loss, cd in result.samples:
        if loss is not None:
            loss_at[time].append(loss)
        cd_at[time] = cd
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    cfg = result.config
    fig.suptitle(
        f"{cfg.algorithm} · {cfg.problem.name if cfg.algorithm != 'maa' else 'agreement'} · "
        f"n={cfg.processes} m={cfg.clusters} N={cfg.n_quorum} · {result.status}"
    )
    if loss_at:
        ts = sorted(loss_at)
        ax1.plot(ts, [float(np.mean(loss_at[t])) for t in ts], label="mean loss (live)")
        ax1.set_ylabel("loss")
        ax1.legend()
    else:
        ax1.text(0.5, 0.5, "no loss for standalone agreement", ha="center", transform=ax1.transAxes)
    ts = sorted(cd_at)
    ax2.plot(ts, [cd_at[t] for t in ts], color="tab:orange")
    if any(v > 0 for v in cd_at.values()):
        ax2.set_yscale("log")
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
    _write_plot(result, paths[2])
    if result.config.trace:
        paths.append(out / "trace.jsonl")
        _write_trace(result, paths[-1])
    return paths
