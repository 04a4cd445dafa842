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
from typer.core import TyperCommand, TyperGroup, TyperOption

from peerlearn import __version__
from peerlearn.config import RunConfig, load_config
from peerlearn.console import err, escape, out, warn
from peerlearn.console import fail as _fail
from peerlearn.daemon.config import NodeConfig
from peerlearn.errors import ConfigError, PeerlearnError
from peerlearn.mixing_cli import mixing


def _bare_flags(params: list[Any]) -> list[Any]:
    """``--help`` shows a boolean flag as the bare flag: typer prints ``<bool>`` after each
    (``--help`` itself included), which reads as if the flag took a value."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))


app = typer.Typer(
    name="peerlearn",
    help="Asynchronous, fully decentralized SGD: simulate the algorithms, run peer daemons.",
    cls=_Group,
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


#: what a flag means when neither it nor the --config file (nor, for `run`, a PEERLEARN_*
#: variable) sets the field: the defaults --help shows
_RUN = RunConfig()
_NODE = {name: str(field.default) for name, field in NodeConfig.model_fields.items()}


@app.command(cls=_Command)
def simulate(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Run description (TOML, e.g. configs/simulate.toml); flags override its fields.",
        ),
    ] = None,
    algorithm: Annotated[
        str | None,
        typer.Option(
            help="alg1 (strongly convex), alg2 (non-convex), maa; dasgd; easgd, async_easgd, "
            "eamsgd, downpour, mdownpour, async_ps; allreduce, local_steps, reduced_frequency, "
            "slack, sync_gossip, async_gossip (see the README's algorithm table).",
            show_default=_RUN.algorithm,
        ),
    ] = None,
    problem: Annotated[
        str | None,
        typer.Option(
            help="quadratic, logistic, softmax, mlp, double_well, nonconvex or module:callable.",
            show_default=_RUN.problem.name,
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            "-n",
            help="Number of processes n (process p runs in cluster p mod m, round-robin).",
            show_default=str(_RUN.processes),
        ),
    ] = None,
    clusters: Annotated[
        int | None,
        typer.Option(
            "--clusters",
            "-m",
            help="Number of clusters m (the processes of a cluster share memory).",
            show_default=str(_RUN.clusters),
        ),
    ] = None,
    quorum: Annotated[
        int | None,
        typer.Option(
            "--quorum",
            "-N",
            help="Quorum N of alg1/alg2: how many processes' messages an iteration waits for.",
            show_default="n − f, f = processes the crash specs kill",
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            "-T",
            help="Number of iterations T per process (maa: agreement instances).",
            show_default=str(_RUN.steps),
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Constant learning rate η (schedules: --set lr.schedule=inverse_time).",
            show_default=f"{_RUN.lr.eta:g}",
        ),
    ] = None,
    aggregator: Annotated[
        str | None,
        typer.Option(
            help="Agreement rule: midext or approachext.", show_default=str(_RUN.maa.aggregator)
        ),
    ] = None,
    dim: Annotated[
        int | None,
        typer.Option(help="Input dimension for --algorithm maa.", show_default=str(_RUN.dim)),
    ] = None,
    crash: Annotated[
        list[str] | None,
        typer.Option(
            help="Crash spec, repeatable: cluster:C@t=K, process:C.I@t=K[:mid-broadcast], "
            "…@time=X (0-based ids).",
            show_default="no crashes",
        ),
    ] = None,
    stragglers: Annotated[
        int | None,
        typer.Option(
            help="Number of slow processes (see --slowdown).",
            show_default=str(_RUN.sim.stragglers),
        ),
    ] = None,
    slowdown: Annotated[
        float | None,
        typer.Option(
            help="Compute-time factor of a straggler (≥ 1).",
            show_default=f"{_RUN.sim.slowdown:g}",
        ),
    ] = None,
    sample_every: Annotated[
        float | None,
        typer.Option(
            help="Virtual time between metric samples.",
            show_default=f"{_RUN.sim.sample_every:g}",
        ),
    ] = None,
    topology: Annotated[
        str | None,
        typer.Option(
            help="dasgd/gossip: complete, ring, random-regular[:d] or a JSON edge file.",
            show_default="complete for dasgd, ring for gossip",
        ),
    ] = None,
    center: Annotated[
        str | None,
        typer.Option(
            help="Elastic family: the center process (cluster.index).",
            show_default=_RUN.elastic.center,
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="Elastic moving rate α (0 < α < 1), instead of --beta.", show_default="β/p"
        ),
    ] = None,
    beta: Annotated[
        float | None,
        typer.Option(
            help="Center moving rate β = pα (p workers).", show_default=f"{_RUN.elastic.beta:g}"
        ),
    ] = None,
    tau: Annotated[
        int | None,
        typer.Option(
            help="Elastic/DOWNPOUR communication period τ.", show_default=str(_RUN.elastic.tau)
        ),
    ] = None,
    delta: Annotated[
        float | None,
        typer.Option(
            help="Momentum δ (eamsgd, mdownpour).", show_default=f"{_RUN.elastic.delta:g}"
        ),
    ] = None,
    period: Annotated[
        int | None,
        typer.Option(
            help="local_steps / reduced_frequency: average every m steps.",
            show_default="2 for local_steps, 10 for reduced_frequency",
        ),
    ] = None,
    gamma: Annotated[
        float | None,
        typer.Option(help="slack: the slack factor γ.", show_default=f"{_RUN.mix.gamma:g}"),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any config field, FIELD=VALUE (repeatable): lr.eta=0.1."),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Run seed: same seed, same result.", show_default=str(_RUN.seed)),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write summary.json, metrics.csv and plot.png into this directory.",
            show_default="no files",
        ),
    ] = None,
    trace: Annotated[
        bool, typer.Option("--trace", help="Also write trace.jsonl (agreement values).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Run an algorithm in the deterministic simulator and report how it went.

    Flags override the --config file; the defaults shown apply when neither sets a field."""
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
        warn(warning)
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
    err.print(described, markup=False, highlight=False)

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
    diverged = result.outcome.diverged
    if diverged:
        table.add_column("diverged")
    loss = result.final_loss
    spread = result.live()  # distances between no models (all crashed or diverged): none
    table.add_row(
        "—" if loss is None else f"{loss:.6g}",
        f"{result.max_pairwise_distance:.3g}" if spread else "—",
        f"{result.stationary_distance:.3g}" if spread else "—",
        f"{result.outcome.deliveries:,}",
        f"{result.outcome.time:.2f}",
        ", ".join(p.name for p in result.processes if p.crashed) or "none",
        *([_names([d.name for d in diverged], cfg.processes)] if diverged else []),
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

        from peerlearn.effects import quiet_float_errors

        live = [p.x for p in result.live() if p.x is not None]
        if live:
            with quiet_float_errors():  # huge models near divergence evaluate to inf
                evaluation = prob.evaluate(np.mean(live, axis=0))
            for key, value in evaluation.items():
                out.print(f"{key} of the mean model: {value:.4f}")
    for b in result.outcome.blocked:
        out.print(
            f"[yellow]blocked[/] process {b.name} waits on {escape(str(b.tag))}: has {b.have} of "
            f"{b.need} {b.unit}",
            highlight=False,
        )
    if diverged:
        first = min(diverged, key=lambda d: (d.step, d.pid))
        more = f" ({len(diverged)} of {cfg.processes} processes diverged)" if diverged[1:] else ""
        out.print(
            f"[red]diverged:[/] process {first.name} computed a non-finite {first.quantity} at "
            f"iteration {first.step}{more}. A diverged process stops before sending the value, "
            "as if it crashed; a smaller learning rate may help.",
            highlight=False,
        )
    if result.outcome.error:
        out.print(f"[red]failed:[/] {escape(str(result.outcome.error))}", highlight=False)
    if out_dir is not None:
        for path in write_outputs(result, out_dir):
            out.print(f"wrote {path}", markup=False, highlight=False)
    if result.status in ("failed", "diverged"):
        raise typer.Exit(code=1)


_MAX_LOGGED = 2_000_000  # DASGD local steps whose logs simulate keeps for Ŝ


def _names(names: list[str], total: int, most: int = 4) -> str:
    """A table cell listing ``names``, or how many when there are too many to read."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{len(names)} of {total}"


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


@app.command(cls=_Command)
def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Node config (TOML), e.g. configs/node.toml."),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(help="Peer address to listen on (host:port).", show_default=_NODE["listen"]),
    ] = None,
    api: Annotated[
        str | None,
        typer.Option(
            help="Control API and /metrics address (host:port).", show_default=_NODE["api"]
        ),
    ] = None,
    peers: Annotated[
        str | None,
        typer.Option(
            help="The other daemons, comma-separated host:port (short form).",
            show_default="none: a run of one daemon",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Number of worker threads of this daemon (its processes).",
            show_default=_NODE["workers"],
        ),
    ] = None,
    algorithm: Annotated[
        str | None,
        typer.Option(
            help="Any algorithm of `simulate --help` (README table).",
            show_default=_NODE["algorithm"],
        ),
    ] = None,
    problem: Annotated[
        str | None,
        typer.Option(help="Problem name or module:callable.", show_default=_RUN.problem.name),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Number of iterations per worker.", show_default="until stopped"),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Constant learning rate η.", show_default=f"{_RUN.lr.eta:g}"),
    ] = None,
    quorum: Annotated[
        int | None,
        typer.Option(
            help="Quorum N of alg1/alg2: how many processes' messages an iteration waits for.",
            show_default="n − f",
        ),
    ] = None,
    max_failures: Annotated[
        int | None,
        typer.Option(
            help="Number of processes f that may crash (sets the default quorum).",
            show_default="⌊(n−1)/2⌋",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Run seed (same on every daemon).", show_default=_NODE["seed"]),
    ] = None,
    cluster: Annotated[
        int | None,
        typer.Option(help="This daemon's cluster id.", show_default="found by its address"),
    ] = None,
    advertise: Annotated[
        str | None,
        typer.Option(help="Address the peers know this daemon by.", show_default="--listen"),
    ] = None,
    exit_on_finish: Annotated[
        bool, typer.Option("--exit-on-finish", help="Exit 0 once every worker is done.")
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(help="debug, info, warning, error.", show_default=_NODE["log_level"]),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            help="text, or json: one JSON object a line (time, level, logger, message).",
            show_default=_NODE["log_format"],
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any config field, FIELD=VALUE (e.g. stall_timeout=5)."),
    ] = None,
) -> None:
    """Run one peer daemon on this machine (flags > PEERLEARN_* env > --config file)."""
    from peerlearn.daemon.config import load_node_config, unknown_environment
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
            "log_format": log_format,
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
        for warning in unknown_environment():
            warn(warning)
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


@app.command(cls=_Command)
def demo(
    algorithm: Annotated[
        str, typer.Option(help="Any algorithm of `simulate --help` (the README's table).")
    ] = "alg1",
    problem: Annotated[
        str, typer.Option(help="softmax (digits), mlp (digits, use with alg2), quadratic, …")
    ] = "softmax",
    daemons: Annotated[int, typer.Option(help="Number of daemons (clusters) in this process.")] = 3,
    workers: Annotated[int, typer.Option(help="Number of worker threads per daemon.")] = 2,
    duration: Annotated[float, typer.Option(help="Seconds of training.")] = 60.0,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Constant learning rate η.",
            show_default="per problem, within the algorithm's theory bounds",
        ),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where demo.png, summary.json and metrics.csv go.")
    ] = Path("runs/demo"),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any node config field, FIELD=VALUE: elastic.tau=4."),
    ] = None,
) -> None:
    """Several daemons in this process on 127.0.0.1, training live.

    Ends with the mean model's test accuracy next to sequential SGD with the same gradient
    budget, and writes a plot, summary.json and metrics.csv. Without a terminal (make demo >
    FILE) it prints a progress line every few seconds instead of the live table. Exits 1 when
    a worker crashed or diverged (summary.json's status: failed or diverged)."""
    from peerlearn.config import ALGORITHMS
    from peerlearn.demo import DemoSettings, run_demo

    if algorithm not in ALGORITHMS:
        raise _fail(f"unknown algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
    if daemons < 1 or workers < 1 or duration <= 0:
        raise _fail("--daemons and --workers must be ≥ 1 and --duration > 0")
    try:
        extra = _parse_set(set_ or [])
        result = run_demo(
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
    if result["status"] in ("failed", "diverged"):  # as `simulate`: said above, and exit 1
        raise typer.Exit(code=1)


app.command(name="mixing", cls=_Command)(mixing)


def main() -> None:
    try:
        app()
    except PeerlearnError as exc:  # last resort: a user error that escaped its command
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
