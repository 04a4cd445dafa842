"""``peerlearn mixing``: MixML's t_mix of a communication protocol.

:mod:`peerlearn.analysis.mixing` computes it; this module reads the flags and prints the result.
Registered on the main app by :mod:`peerlearn.cli`. Like every command there, errors a
user can cause print one line on stderr and exit with code 2; ``--json`` keeps stdout to exactly
one JSON object (notes and "wrote …" go to stderr).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from peerlearn.algorithms.registry import REGISTRY
from peerlearn.config import MixConfig
from peerlearn.console import err, out, warn
from peerlearn.console import fail as _fail
from peerlearn.errors import PeerlearnError

if TYPE_CHECKING:
    from peerlearn.analysis.mixing import MixingProtocol

__all__ = ["PLOT_NS", "mixing"]

PLOT_NS = (2, 4, 8, 16, 32)
DEFAULT_RUNS = 1000


def _label(proto: MixingProtocol) -> str:
    shown = {k: v for k, v in proto.params.items() if k != "weights" or v != "metropolis"}
    inner = ", ".join(
        f"{'γ' if k == 'gamma' else 'm' if k == 'period' else k}={v}" for k, v in shown.items()
    )
    return f"{proto.name} ({inner})" if inner else proto.name


def _fig3(path: Path, chosen: str, params: dict[str, Any], runs: int, seed: int) -> Path:
    """Fig. 3 of the paper: t_mix against n for every protocol (exact, or the mean of ``runs``).

    The chosen protocol's line uses the command's options; every other line its defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peerlearn.analysis.mixing import PROTOCOLS, SCHEDULINGS, build_protocol

    lines: list[tuple[str, dict[str, Any]]] = []
    for name in PROTOCOLS:
        if name == chosen:
            lines.append((name, params))
        if "scheduling" in PROTOCOLS[name][0]:  # no fixed order: one line per scheduling
            for sched in SCHEDULINGS:
                if name != chosen or params.get("scheduling", SCHEDULINGS[0]) != sched:
                    lines.append((name, {"scheduling": sched}))
        elif name != chosen:
            lines.append((name, {}))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "osD^vPX*"  # lines can coincide (allreduce and round-robin PS are both n)
    for k, (name, kwargs) in enumerate(lines):
        xs, ys, label, random = [], [], name, False
        for n in PLOT_NS:
            try:
                proto = build_protocol(name, n, seed=seed, **kwargs)
                label, random = _label(proto), proto.random
                ys.append(
                    proto.sample_tmix(runs, seed).mean if random else float(proto.exact_tmix())
                )
                xs.append(n)
            except PeerlearnError as exc:
                warn(f"{name} at n={n} skipped: {exc}", label="plot")
        if xs:
            style = "--" if random else "-"
            ax.plot(
                xs,
                ys,
                style,
                marker=markers[k % len(markers)],
                markersize=9 - k % 4,
                label=label + (f", mean of {runs}" if random else ""),
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(PLOT_NS), [str(n) for n in PLOT_NS])
    ax.set_xlabel("workers n")
    ax.set_ylabel("t_mix (computation events, ½-halving in ‖·‖₂)")
    ax.set_title("MixML Fig. 3: mixing time against n (solid exact, dashed sampled from t = 0)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mixing(
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            "-p",
            help="allreduce, local_steps, reduced_frequency, slack, sync_gossip, async_gossip "
            "or async_ps.",
        ),
    ],
    n: Annotated[int, typer.Option("--workers", "-n", help="Number of workers n (≥ 2).")] = 8,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact", help="Compute t_mix exactly (the default for deterministic protocols)."
        ),
    ] = False,
    runs: Annotated[
        int | None,
        typer.Option(
            help="Sample R schedules, window from t = 0.",
            show_default=f"{DEFAULT_RUNS} for random protocols",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of random schedules and topologies.")] = 0,
    period: Annotated[
        int | None,
        typer.Option(
            "--period",
            help="m: local steps between averagings.",
            show_default=", ".join(
                f"{spec.period} for {name}"
                for name, spec in REGISTRY.items()
                if spec.reads("mix.period")
            ),
        ),
    ] = None,
    gamma: Annotated[
        float | None,
        typer.Option(help="Slack γ, 0 < γ ≤ 1.", show_default=f"{MixConfig().gamma:g}"),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="sync_gossip W: 'metropolis' or a JSON n×n matrix file.",
            show_default="metropolis",
        ),
    ] = None,
    topology: Annotated[
        str | None,
        typer.Option(
            help="Gossip graph: complete, ring, random-regular[:d] or FILE.", show_default="ring"
        ),
    ] = None,
    scheduling: Annotated[
        str | None,
        typer.Option(help="async_ps: round_robin or random.", show_default="round_robin"),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Also write Fig. 3 (t_mix against n, all protocols).")
    ] = None,
) -> None:
    """MixML mixing time t_mix: computation events until every start halves ‖X − M_∞X‖₂."""
    from peerlearn.analysis.mixing import build_protocol

    params: dict[str, Any] = {
        k: v
        for k, v in {
            "period": period,
            "gamma": gamma,
            "weights": weights,
            "topology": topology,
            "scheduling": scheduling,
        }.items()
        if v is not None
    }
    try:
        if exact and runs is not None:
            raise _fail("--exact and --runs exclude each other")
        proto = build_protocol(protocol, n, seed=seed, **params)
        result: dict[str, Any] = {"protocol": proto.name, "n": n}
        resolved = dict(proto.params)
        if exact or (runs is None and not proto.random):
            result |= {"method": "exact", "t_mix": proto.exact_tmix()}
        else:
            dist = proto.sample_tmix(runs or DEFAULT_RUNS, seed)
            resolved["seed"] = seed
            result |= {"method": "sampled", "t_mix": dist.mean, "distribution": dist.summary()}
        result |= {"params": resolved, "closed_form": proto.closed_form}
        if proto.derived:
            result["derived"] = proto.derived
        written = _fig3(plot, protocol, params, runs or DEFAULT_RUNS, seed) if plot else None
    except PeerlearnError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:  # the plot's directory or file
        raise _fail(f"cannot write the plot {plot}: {exc.strerror or exc}") from None
    if json_out:
        typer.echo(json.dumps(result))
    else:
        _print_table(result, proto)
    if written is not None:
        err.print(f"wrote {written}", markup=False, highlight=False)


def _print_table(result: dict[str, Any], proto: MixingProtocol) -> None:
    table = Table(title=f"t_mix of {_label(proto)}, n = {proto.n}", title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    if result["method"] == "exact":
        table.add_row("t_mix (exact, max over start offsets)", str(result["t_mix"]))
    else:
        dist = result["distribution"]
        table.add_row(
            f"t_mix mean over {dist['runs']} runs (window from t = 0)", f"{dist['mean']:.2f}"
        )
        for key in ("median", "p90", "min", "max"):
            table.add_row(key, f"{dist[key]:g}")
    form = result["closed_form"]
    if form is not None:
        what = "closed form" + (" (mean)" if proto.random else "")
        table.add_row(what, f"{form:g}")
    for key, value in result.get("derived", {}).items():
        table.add_row("|λ₂(W)|" if key == "lambda2" else key, f"{value:.6f}")
    out.print(table)
