"""The ``peerlearn`` command line.

Errors a user can cause (bad flags, bad config, bad problem) print one line and exit with
code 2; they never show a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from peerlearn import __version__
from peerlearn.config import RunConfig, load_config
from peerlearn.console import err, out
from peerlearn.console import fail as _fail
from peerlearn.errors import ConfigError, PeerlearnError
from peerlearn.mixing_cli import mixing

app = typer.Typer(
    name="peerlearn",
    help="Asynchronous, fully decentralized SGD: simulate the algorithms, run peer daemons.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"peerlearn {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """peerlearn: asynchronous, fully decentralized SGD across machines."""


def _overrides(**flags: Any) -> dict[str, Any]:
    """Map CLI flags onto the nested config; flags left unset do not override the file."""
    data: dict[str, Any] = {}
    mapping = {
        "algorithm": ("algorithm",),
        "processes": ("processes",),
        "clusters": ("clusters",),
        "quorum": ("quorum",),
        "steps": ("steps",),
        "seed": ("seed",),
        "dim": ("dim",),
        "problem": ("problem", "name"),
        "aggregator": ("maa", "aggregator"),
        "crash": ("sim", "crashes"),
        "stragglers": ("sim", "stragglers"),
        "sample_every": ("sim", "sample_every"),
        "slowdown": ("sim", "slowdown"),
        "topology": ("topology",),
        "center": ("elastic", "center"),
        "alpha": ("elastic", "alpha"),
        "beta": ("elastic", "beta"),
        "tau": ("elastic", "tau"),
        "delta": ("elastic", "delta"),
        "period": ("mix", "period"),
        "gamma": ("mix", "gamma"),
    }
    for flag, path in mapping.items():
        value = flags.get(flag)
        if value is None or value == []:
            continue
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    if flags.get("lr") is not None:
        data["lr"] = {"schedule": "constant", "eta": flags["lr"]}
    if flags.get("trace"):
        data["trace"] = True
    return data


@app.command()
def simulate(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Run description (TOML).")
    ] = None,
    algorithm: Annotated[
        str | None,
        typer.Option(
            help="alg1 (strongly convex), alg2 (non-convex), maa; dasgd; easgd, async_easgd, "
            "eamsgd, downpour, mdownpour, async_ps; allreduce, local_steps, reduced_frequency, "
            "slack, sync_gossip, async_gossip (see the README's algorithm table)."
        ),
    ] = None,
    problem: Annotated[
        str | None,
        typer.Option(
            help="quadratic, logistic, softmax, mlp, double_well, nonconvex or module:callable."
        ),
    ] = None,
    processes: Annotated[int | None, typer.Option("--processes", "-n", help="n.")] = None,
    clusters: Annotated[int | None, typer.Option("--clusters", "-m", help="m.")] = None,
    quorum: Annotated[
        int | None, typer.Option("--quorum", "-N", help="N; defaults to n − f.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", "-T", help="T: iterations (or MAA instances).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Constant learning rate η.")] = None,
    aggregator: Annotated[
        str | None, typer.Option(help="Agreement rule: midext or approachext.")
    ] = None,
    dim: Annotated[int | None, typer.Option(help="Input dimension for --algorithm maa.")] = None,
    crash: Annotated[
        list[str] | None,
        typer.Option(
            help="Crash spec, repeatable: cluster:C@t=K, process:C.I@t=K[:mid-broadcast], "
            "…@time=X (0-based ids)."
        ),
    ] = None,
    stragglers: Annotated[
        int | None, typer.Option(help="Number of slow processes (see sim.slowdown).")
    ] = None,
    slowdown: Annotated[
        float | None, typer.Option(help="Compute-time factor of a straggler (≥ 1).")
    ] = None,
    sample_every: Annotated[
        float | None, typer.Option(help="Virtual time between metric samples.")
    ] = None,
    topology: Annotated[
        str | None,
        typer.Option(help="dasgd/gossip: complete, ring, random-regular[:d] or a JSON edge file."),
    ] = None,
    center: Annotated[
        str | None, typer.Option(help="Elastic family: the center process (cluster.index).")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="Elastic moving rate α (0 < α < 1).")] = None,
    beta: Annotated[float | None, typer.Option(help="Center moving rate β = pα.")] = None,
    tau: Annotated[int | None, typer.Option(help="Elastic/DOWNPOUR period τ.")] = None,
    delta: Annotated[float | None, typer.Option(help="Momentum δ (eamsgd, mdownpour).")] = None,
    period: Annotated[
        int | None, typer.Option(help="local_steps / reduced_frequency: average every m steps.")
    ] = None,
    gamma: Annotated[float | None, typer.Option(help="slack: the slack factor γ.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any config field, FIELD=VALUE (repeatable): lr.eta=0.1."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed: same seed, same result.")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write summary.json, metrics.csv, plot.png.")
    ] = None,
    trace: Annotated[
        bool, typer.Option("--trace", help="Also write trace.jsonl (agreement values).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Run an algorithm in the deterministic simulator and report how it went."""
    from peerlearn.config import merge
    from peerlearn.runs import build_problem, planned_iterations
    from peerlearn.sim.output import write_outputs
    from peerlearn.sim.runner import run_simulation

    try:
        cfg = load_config(
            config,
            merge(
                _overrides(
                    algorithm=algorithm,
                    problem=problem,
                    processes=processes,
                    clusters=clusters,
                    quorum=quorum,
                    steps=steps,
                    lr=lr,
                    aggregator=aggregator,
                    dim=dim,
                    crash=crash,
                    stragglers=stragglers,
                    slowdown=slowdown,
                    sample_every=sample_every,
                    topology=topology,
                    center=center,
                    alpha=alpha,
                    beta=beta,
                    tau=tau,
                    delta=delta,
                    period=period,
                    gamma=gamma,
                    seed=seed,
                    trace=trace,
                ),
                _parse_set(set_ or []),
            ),
        )
        if cfg.steps is None:
            raise ConfigError("the simulator needs a finite number of steps (--steps)")
        prob = build_problem(cfg)
    except PeerlearnError as exc:
        raise _fail(str(exc)) from None
    warnings = cfg.unused_settings()
    if prob is not None:
        warnings += cfg.theory_warnings(prob.constants)
    for warning in warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    rounds, inner = cfg.agreement_rounds()
    described = (
        f"{cfg.algorithm} on {cfg.problem.name if prob else f'random inputs (d={cfg.dim})'}: "
        f"n={cfg.processes}, m={cfg.clusters}, "
        + (f"N={cfg.n_quorum}, " if cfg.algorithm in ("alg1", "alg2") else "")
        + f"f={cfg.failures}, T={cfg.steps}"
    )
    if cfg.algorithm in ("alg2", "maa"):
        described += f", agreement R={rounds}×{inner} ({cfg.maa.aggregator})"
    described += describe_params(cfg)
    err.print(described, highlight=False)

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task("iterations", total=planned_iterations(cfg))
        # DASGD's apply and compute logs give the loose staleness Ŝ offline; they grow with
        # n²T, so very long runs report the tight S only.
        logs = ("staleness", "compute") if planned_iterations(cfg) <= _MAX_LOGGED else ()
        result = run_simulation(
            cfg,
            record_reports=logs if cfg.algorithm == "dasgd" else (),
            progress=lambda done, total: bar.update(task, completed=done),
        )

    table = Table(title=f"status: {result.status}", title_justify="left")
    table.add_column("final loss (mean, live)")
    table.add_column("max pairwise ‖xi−xj‖²")
    table.add_column("stationary distance")
    table.add_column("messages")
    table.add_column("virtual time")
    table.add_column("crashed")
    loss = result.final_loss
    table.add_row(
        "—" if loss is None else f"{loss:.6g}",
        f"{result.max_pairwise_distance:.3g}",
        f"{result.stationary_distance:.3g}",
        f"{result.outcome.deliveries:,}",
        f"{result.outcome.time:.2f}",
        ", ".join(p.name for p in result.processes if p.crashed) or "none",
    )
    out.print(table)
    if result.staleness:
        from peerlearn.sim.output import staleness_figures

        fig = staleness_figures(result)
        assert fig is not None
        line = f"staleness (Def. 2): S_avg = {fig['S_avg']:.3g}, S_max = {fig['S_max']}"
        if fig["S_hat_avg"] is not None:
            line += f"; loose: Ŝ_avg = {fig['S_hat_avg']:.3g}, Ŝ_max = {fig['S_hat_max']}"
        else:
            line += f" (Ŝ needs the apply logs: runs of at most {_MAX_LOGGED:,} steps)"
        out.print(line, highlight=False)
    if prob is not None:
        import numpy as np

        live = [p.x for p in result.live() if p.x is not None]
        if live:
            for key, value in prob.evaluate(np.mean(live, axis=0)).items():
                out.print(f"{key} of the mean model: {value:.4f}")
    for b in result.outcome.blocked:
        out.print(
            f"[yellow]blocked[/] process {b.name} waits on {b.tag}: has {b.have} of {b.need} "
            f"{b.unit}",
            highlight=False,
        )
    if result.outcome.error:
        out.print(f"[red]failed:[/] {result.outcome.error}", highlight=False)
    if out_dir is not None:
        for path in write_outputs(result, out_dir):
            out.print(f"wrote {path}", highlight=False)
    if result.status == "failed":
        raise typer.Exit(code=1)


_MAX_LOGGED = 2_000_000  # DASGD local steps whose logs simulate keeps for Ŝ


def describe_params(cfg: RunConfig) -> str:
    """The parameters of ``cfg``'s algorithm family, for a one-line description."""
    from peerlearn.config import ELASTIC, TOPOLOGY_ALGORITHMS

    eta = cfg.schedule()(1) if cfg.steps or cfg.lr.schedule != "sqrt_n_over_t" else None
    parts = [f"η={eta:g}"] if eta is not None and cfg.algorithm not in ("alg1", "alg2") else []
    if cfg.algorithm in TOPOLOGY_ALGORITHMS:
        parts.append(f"topology {cfg.graph.name}")
    if cfg.algorithm in ELASTIC:
        el = cfg.elastic
        parts.append(f"center {el.center}, α={cfg.elastic_alpha:g}, τ={el.tau}")
        if cfg.algorithm in ("eamsgd", "mdownpour"):
            parts.append(f"δ={el.delta:g}")
    if cfg.algorithm in ("local_steps", "reduced_frequency"):
        parts.append(f"m={cfg.mix_period}")
    if cfg.algorithm == "slack":
        parts.append(f"γ={cfg.mix.gamma:g}")
    return "".join(f", {p}" for p in parts)


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``--set a.b=value`` (value in TOML syntax, or a bare string) → nested dict."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. lr.eta=0.1")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} was set to a value, not a table")
        node[leaf] = value
    return out


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Node config (TOML), e.g. configs/node.toml."),
    ] = None,
    listen: Annotated[
        str | None, typer.Option(help="Peer address to listen on (host:port).")
    ] = None,
    api: Annotated[str | None, typer.Option(help="Control API address (host:port).")] = None,
    peers: Annotated[
        str | None, typer.Option(help="Other daemons, comma-separated host:port (short form).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker threads of this daemon.")] = None,
    algorithm: Annotated[
        str | None, typer.Option(help="Any algorithm of `simulate --help` (README table).")
    ] = None,
    problem: Annotated[str | None, typer.Option(help="Problem name or module:callable.")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Iterations per worker (default: until stopped).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Constant learning rate η.")] = None,
    quorum: Annotated[int | None, typer.Option(help="N (default n − max-failures).")] = None,
    max_failures: Annotated[
        int | None, typer.Option(help="f processes (default ⌊(n−1)/2⌋).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed (same on every daemon).")] = None,
    cluster: Annotated[int | None, typer.Option(help="This daemon's cluster id.")] = None,
    advertise: Annotated[
        str | None, typer.Option(help="Address the peers know us by (default --listen).")
    ] = None,
    exit_on_finish: Annotated[
        bool, typer.Option("--exit-on-finish", help="Exit 0 once every worker is done.")
    ] = False,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any config field, FIELD=VALUE (e.g. stall_timeout=5)."),
    ] = None,
) -> None:
    """Run one peer daemon on this machine (flags > PEERLEARN_* env > --config file)."""
    from peerlearn.daemon.config import load_node_config
    from peerlearn.daemon.serve import serve

    try:
        flags: dict[str, Any] = _parse_set(set_ or [])
        given = {
            "listen": listen,
            "api": api,
            "workers": workers,
            "algorithm": algorithm,
            "steps": steps,
            "quorum": quorum,
            "max_failures": max_failures,
            "seed": seed,
            "cluster": cluster,
            "advertise": advertise,
            "log_level": log_level,
        }
        flags.update({k: v for k, v in given.items() if v is not None})
        if peers is not None:
            flags["peers"] = [p.strip() for p in peers.split(",") if p.strip()]
        if problem is not None:
            flags["problem"] = {**flags.get("problem", {}), "name": problem}
        if lr is not None:
            flags["lr"] = {**flags.get("lr", {}), "schedule": "constant", "eta": lr}
        if exit_on_finish:
            flags["exit_on_finish"] = True
        cfg = load_node_config(config, flags)
    except PeerlearnError as exc:
        raise _fail(str(exc)) from None
    try:
        code = serve(cfg)
    except OSError as exc:  # e.g. an address in use
        raise _fail(f"cannot start the daemon: {exc}") from None
    except PeerlearnError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def demo(
    algorithm: Annotated[
        str, typer.Option(help="Any algorithm of `simulate --help` (the README's table).")
    ] = "alg1",
    problem: Annotated[
        str, typer.Option(help="softmax (digits), mlp (digits, use with alg2), quadratic, …")
    ] = "softmax",
    daemons: Annotated[int, typer.Option(help="Daemons (clusters) in this process.")] = 3,
    workers: Annotated[int, typer.Option(help="Worker threads per daemon.")] = 2,
    duration: Annotated[float, typer.Option(help="Seconds of training.")] = 60.0,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default per problem).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the plot goes.")] = Path(
        "runs/demo"
    ),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any node config field, FIELD=VALUE: elastic.tau=4."),
    ] = None,
) -> None:
    """Several daemons in this process on 127.0.0.1, training live; ends with test accuracy
    next to sequential SGD with the same gradient budget, and a plot."""
    from peerlearn.config import ALGORITHMS
    from peerlearn.demo import DemoSettings, run_demo

    if algorithm not in ALGORITHMS:
        raise _fail(f"unknown algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
    if daemons < 1 or workers < 1 or duration <= 0:
        raise _fail("--daemons and --workers must be ≥ 1 and --duration > 0")
    try:
        extra = _parse_set(set_ or [])
        run_demo(
            DemoSettings(
                algorithm=algorithm,
                problem=problem,
                daemons=daemons,
                workers=workers,
                duration=duration,
                lr=lr,
                out=out_dir,
                extra=extra,
            ),
            out,
        )
    except PeerlearnError as exc:
        raise _fail(str(exc)) from None


app.command(name="mixing")(mixing)


def main() -> None:
    try:
        app()
    except PeerlearnError as exc:  # last resort: a user error that escaped its command
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
