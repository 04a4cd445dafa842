"""The flags of ``simulate`` and ``run``: one table, from which both their signatures (what
``--help`` shows) and the config fields the flags set are computed.

Each :class:`Flag` names the config field it sets and, per command that takes it, how
``--help`` shows it. A flag with no config field (``--config``, ``--set``, ``--out``,
``--quiet``) is the command's own: the command function takes it by name. Adding a flag to a
command is one entry here; :func:`takes_flags` refuses a command function whose own
parameters do not match the table.
"""

from __future__ import annotations

import inspect
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from peerlearn.algorithms.registry import ALGORITHMS, REGISTRY, readers
from peerlearn.config import RunConfig, merge
from peerlearn.daemon.config import NodeConfig
from peerlearn.errors import ConfigError

__all__ = [
    "FLAGS",
    "Flag",
    "Use",
    "command_flags",
    "overrides",
    "parse_set",
    "takes_flags",
]

#: what a flag means when neither it nor the --config file (nor, for `run`, a PEERLEARN_*
#: variable) sets the field: the defaults --help shows
_RUN = RunConfig()
_NODE = {name: str(field.default) for name, field in NodeConfig.model_fields.items()}


def _by_algorithm(setting: str, default: Callable[[str], object]) -> str:
    """``2 for local_steps, 10 for reduced_frequency``: the default of ``setting`` per algorithm
    that reads it, from the algorithm records (algorithms sharing a default listed together)."""
    groups: dict[str, list[str]] = {}
    for name in readers(setting):
        groups.setdefault(str(default(name)), []).append(name)
    return ", ".join(f"{value} for {'/'.join(names)}" for value, names in groups.items())


@dataclass(frozen=True)
class Use:
    """How one command shows a flag in ``--help``."""

    help: str
    #: what applies when the flag is not given; None: typer's own rendering of the default
    default: str | None = None
    #: a one-letter alias, e.g. ``-n``
    short: str | None = None


@dataclass(frozen=True)
class Flag:
    """A flag: the parameter typer passes, the config field it sets, the commands taking it."""

    name: str  # the Python parameter; the option is --name with - for _ unless `option` says
    type: Any  # the annotation typer reads the value with, e.g. int | None
    #: the config field the flag sets; None: the command's own option, passed to it by name
    path: tuple[str, ...] | None
    uses: Mapping[str, Use]  # command name → how its --help shows the flag
    option: str | None = None  # the long option when it is not the name's
    #: flag value → config value, when it is not the value itself
    value: Callable[[Any], Any] | None = field(default=None, compare=False)

    @property
    def default(self) -> Any:
        # a boolean flag is a bare switch (False unless given); any other flag is unset (None)
        # so that it does not override the --config file
        return False if self.type is bool else None

    def declarations(self, command: str) -> tuple[str, ...]:
        long = f"--{self.option or self.name.replace('_', '-')}"
        short = self.uses[command].short
        return (long, short) if short else (long,)


def _constant_lr(eta: float) -> dict[str, Any]:
    return {"schedule": "constant", "eta": eta}


def _addresses(peers: str) -> list[str]:
    return [p.strip() for p in peers.split(",") if p.strip()]


_SIM = "simulate"
_DAEMON = "run"

# The order is the order of --help.
FLAGS: tuple[Flag, ...] = (
    Flag(
        "config",
        Path | None,
        None,
        {
            _SIM: Use(
                "Run description (TOML, e.g. configs/simulate.toml); flags override its fields.",
                short="-c",
            ),
            _DAEMON: Use("Node config (TOML), e.g. configs/node.toml.", short="-c"),
        },
    ),
    Flag(
        "listen",
        str | None,
        ("listen",),
        {_DAEMON: Use("Peer address to listen on (host:port).", _NODE["listen"])},
    ),
    Flag(
        "api",
        str | None,
        ("api",),
        {_DAEMON: Use("Control API and /metrics address (host:port).", _NODE["api"])},
    ),
    Flag(
        "peers",
        str | None,
        ("peers",),
        {
            _DAEMON: Use(
                "The other daemons, comma-separated host:port (short form).",
                "none: a run of one daemon",
            )
        },
        value=_addresses,
    ),
    Flag(
        "workers",
        int | None,
        ("workers",),
        {
            _DAEMON: Use(
                "Number of worker threads of this daemon (its processes).", _NODE["workers"]
            )
        },
    ),
    Flag(
        "algorithm",
        str | None,
        ("algorithm",),
        {
            _SIM: Use(
                f"{', '.join(ALGORITHMS)} (see the README's algorithm table).",
                _RUN.algorithm,
            ),
            _DAEMON: Use("Any algorithm of `simulate --help` (README table).", _NODE["algorithm"]),
        },
    ),
    Flag(
        "problem",
        str | None,
        ("problem", "name"),
        {
            _SIM: Use(
                "quadratic, logistic, softmax, mlp, double_well, nonconvex, gaussian_logistic "
                "or module:callable.",
                _RUN.problem.name,
            ),
            _DAEMON: Use("Problem name or module:callable.", _RUN.problem.name),
        },
    ),
    Flag(
        "processes",
        int | None,
        ("processes",),
        {
            _SIM: Use(
                "Number of processes n (process p runs in cluster p mod m, round-robin).",
                str(_RUN.processes),
                short="-n",
            )
        },
    ),
    Flag(
        "clusters",
        int | None,
        ("clusters",),
        {
            _SIM: Use(
                "Number of clusters m (the processes of a cluster share memory).",
                str(_RUN.clusters),
                short="-m",
            )
        },
    ),
    Flag(
        "steps",
        int | None,
        ("steps",),
        {
            _SIM: Use(
                "Number of iterations T per process (maa: agreement instances).",
                str(_RUN.steps),
                short="-T",
            ),
            _DAEMON: Use("Number of iterations per worker.", "until stopped"),
        },
    ),
    Flag(
        "lr",
        float | None,
        ("lr",),
        {
            _SIM: Use(
                "Constant learning rate η (schedules: --set lr.schedule=inverse_time).",
                f"{_RUN.lr.eta:g}",
            ),
            _DAEMON: Use("Constant learning rate η.", f"{_RUN.lr.eta:g}"),
        },
        value=_constant_lr,
    ),
    Flag(
        "compression",
        str | None,
        ("compression", "scheme"),
        {
            cmd: Use(
                "Round the payloads the algorithm may compress (models, gradients; never "
                "agreement values) to fp16, bf16 or int8, with error feedback "
                "(--set compression.block=…, compression.error_feedback=false).",
                "none",
            )
            for cmd in (_SIM, _DAEMON)
        },
    ),
    Flag(
        "quorum",
        int | None,
        ("quorum",),
        {
            _SIM: Use(
                f"Quorum N of {'/'.join(readers('quorum'))}: how many processes' messages an "
                "iteration waits for.",
                "n − f, f = processes the crash specs kill or restart",
                short="-N",
            ),
            _DAEMON: Use(
                f"Quorum N of {'/'.join(readers('quorum'))}: how many processes' messages an "
                "iteration waits for.",
                "n − f",
            ),
        },
    ),
    Flag(
        "max_failures",
        int | None,
        ("max_failures",),
        {
            _DAEMON: Use(
                "Number of processes f that may crash (sets the default quorum).", "⌊(n−1)/2⌋"
            )
        },
    ),
    Flag(
        "aggregator",
        str | None,
        ("maa", "aggregator"),
        {_SIM: Use("Agreement rule: midext or approachext.", str(_RUN.maa.aggregator))},
    ),
    Flag(
        "dim",
        int | None,
        ("dim",),
        {_SIM: Use("Input dimension for --algorithm maa.", str(_RUN.dim))},
    ),
    Flag(
        "crash",
        list[str] | None,
        ("sim", "crashes"),
        {
            _SIM: Use(
                "Crash spec, repeatable: cluster:C@t=K, process:C.I@t=K[:mid-broadcast], "
                "process:C.I@t=K:restart, …@time=X (0-based ids).",
                "no crashes",
            )
        },
    ),
    Flag(
        "stragglers",
        int | None,
        ("sim", "stragglers"),
        {_SIM: Use("Number of slow processes (see --slowdown).", str(_RUN.sim.stragglers))},
    ),
    Flag(
        "slowdown",
        float | None,
        ("sim", "slowdown"),
        {_SIM: Use("Compute-time factor of a straggler (≥ 1).", f"{_RUN.sim.slowdown:g}")},
    ),
    Flag(
        "sample_every",
        float | None,
        ("sim", "sample_every"),
        {_SIM: Use("Virtual time between metric samples.", f"{_RUN.sim.sample_every:g}")},
    ),
    Flag(
        "topology",
        str | None,
        ("topology",),
        {
            _SIM: Use(
                f"{'/'.join(readers('topology'))}: complete, ring, random-regular[:d] or a JSON "
                "edge file.",
                _by_algorithm("topology", lambda name: REGISTRY[name].topology),
            )
        },
    ),
    Flag(
        "center",
        str | None,
        ("elastic", "center"),
        {_SIM: Use("Elastic family: the center process (cluster.index).", _RUN.elastic.center)},
    ),
    Flag(
        "alpha",
        float | None,
        ("elastic", "alpha"),
        {_SIM: Use("Elastic moving rate α (0 < α < 1), instead of --beta.", "β/p")},
    ),
    Flag(
        "beta",
        float | None,
        ("elastic", "beta"),
        {_SIM: Use("Center moving rate β = pα (p workers).", f"{_RUN.elastic.beta:g}")},
    ),
    Flag(
        "tau",
        int | None,
        ("elastic", "tau"),
        {_SIM: Use("Elastic/DOWNPOUR communication period τ.", str(_RUN.elastic.tau))},
    ),
    Flag(
        "delta",
        float | None,
        ("elastic", "delta"),
        {
            _SIM: Use(
                f"Momentum δ ({', '.join(readers('elastic.delta'))}).", f"{_RUN.elastic.delta:g}"
            )
        },
    ),
    Flag(
        "period",
        int | None,
        ("mix", "period"),
        {
            _SIM: Use(
                f"{' / '.join(readers('mix.period'))}: average every m steps.",
                _by_algorithm("mix.period", lambda name: REGISTRY[name].period),
            )
        },
    ),
    Flag(
        "gamma",
        float | None,
        ("mix", "gamma"),
        {_SIM: Use("slack: the slack factor γ.", f"{_RUN.mix.gamma:g}")},
    ),
    Flag(
        "seed",
        int | None,
        ("seed",),
        {
            _SIM: Use("Run seed: same seed, same result.", str(_RUN.seed)),
            _DAEMON: Use("Run seed (same on every daemon).", _NODE["seed"]),
        },
    ),
    Flag(
        "cluster",
        int | None,
        ("cluster",),
        {_DAEMON: Use("This daemon's cluster id.", "found by its address")},
    ),
    Flag(
        "advertise",
        str | None,
        ("advertise",),
        {_DAEMON: Use("Address the peers know this daemon by.", "--listen")},
    ),
    Flag(
        "exit_on_finish",
        bool,
        ("exit_on_finish",),
        {_DAEMON: Use("Exit 0 once every worker is done.")},
    ),
    Flag(
        "out",
        Path | None,
        ("out",),
        {
            _DAEMON: Use(
                "Directory (one per daemon) for model.npz (local models and their mean) and "
                "summary.json, written on finish and on stop, and metrics.csv, every second.",
                "none",
            )
        },
    ),
    Flag(
        "secret_file",
        Path | None,
        ("secret_file",),
        {
            _DAEMON: Use(
                "File holding the cluster secret, the same on every daemon (chmod 600): peer "
                "links are authenticated; required to listen off loopback.",
                "none",
            )
        },
    ),
    Flag(
        "tls_cert",
        Path | None,
        ("tls_cert",),
        {
            _DAEMON: Use(
                "Mutual TLS on peer links (with --tls-key and --tls-ca): this daemon's "
                "certificate (PEM), signed by the run's CA.",
                "none",
            )
        },
    ),
    Flag(
        "tls_key",
        Path | None,
        ("tls_key",),
        {_DAEMON: Use("Mutual TLS: the certificate's private key (PEM, chmod 600).", "none")},
    ),
    Flag(
        "tls_ca",
        Path | None,
        ("tls_ca",),
        {_DAEMON: Use("Mutual TLS: the run's CA certificate (PEM).", "none")},
    ),
    Flag(
        "api_token_file",
        Path | None,
        ("api_token_file",),
        {
            _DAEMON: Use(
                "File holding the control API's bearer token (chmod 600): POST /stop needs it; "
                "required for an API off loopback.",
                "none",
            )
        },
    ),
    Flag(
        "insecure",
        bool,
        ("insecure",),
        {
            _DAEMON: Use(
                "Listen for peers off loopback without a secret, serve the API off loopback "
                "without a token (logged loudly, shown in /status)."
            )
        },
    ),
    Flag(
        "state_dir",
        Path | None,
        ("state_dir",),
        {
            _DAEMON: Use(
                "Directory (one per daemon) for checkpoints; a daemon started on it resumes "
                "from its last one.",
                "none",
            )
        },
    ),
    Flag(
        "checkpoint_every",
        float | None,
        ("checkpoint_every",),
        {_DAEMON: Use("Seconds between checkpoints into --state-dir.", _NODE["checkpoint_every"])},
    ),
    Flag(
        "log_level",
        str | None,
        ("log_level",),
        {_DAEMON: Use("debug, info, warning, error.", _NODE["log_level"])},
    ),
    Flag(
        "log_format",
        str | None,
        ("log_format",),
        {
            _DAEMON: Use(
                "text, or json: one JSON object a line (time, level, logger, message).",
                _NODE["log_format"],
            )
        },
    ),
    Flag(
        "set_",
        list[str] | None,
        None,
        {
            _SIM: Use("Any config field, FIELD=VALUE (repeatable): lr.eta=0.1."),
            _DAEMON: Use("Any config field, FIELD=VALUE (e.g. stall_timeout=5)."),
        },
        option="set",
    ),
    Flag(
        "out_dir",
        Path | None,
        None,
        {
            _SIM: Use(
                "Write summary.json, metrics.csv and plot.png into this directory.",
                "no files",
                short="-o",
            )
        },
        option="out",
    ),
    Flag(
        "trace",
        bool,
        ("trace",),
        {_SIM: Use("Also write trace.jsonl (agreement values).")},
    ),
    Flag("quiet", bool, None, {_SIM: Use("No progress bar.", short="-q")}),
)


def command_flags(command: str) -> tuple[Flag, ...]:
    """The flags ``command`` takes, in the order of its ``--help``."""
    return tuple(f for f in FLAGS if command in f.uses)


def overrides(command: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields that ``command``'s flag ``values`` set, nested as in the config;
    a flag left unset (None, an empty list, a switch not given) does not override the file."""
    data: dict[str, Any] = {}
    for flag in command_flags(command):
        value = values.get(flag.name)
        if flag.path is None or value is None or value is False or value == []:
            continue
        value = flag.value(value) if flag.value is not None else value
        for key in reversed(flag.path):
            value = {key: value}
        data = merge(data, value)
    return data


def _parameter(flag: Flag, command: str) -> inspect.Parameter:
    use = flag.uses[command]
    shown: dict[str, Any] = {} if use.default is None else {"show_default": use.default}
    option = typer.Option(*flag.declarations(command), help=use.help, **shown)
    return inspect.Parameter(
        flag.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=flag.default,
        annotation=Annotated[flag.type, option],
    )


def takes_flags(command: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command function the signature typer reads its options from: ``command``'s
    flags of the table. The function takes its own flags (those with no config field) by
    name and ``overrides``, the config fields the other flags set."""
    flags = command_flags(command)
    own = [f.name for f in flags if f.path is None]

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        params = set(inspect.signature(fn).parameters)
        if params != {*own, "overrides"}:  # the table and the function drifted apart
            raise TypeError(
                f"{fn.__name__} must take {sorted(own)} and overrides, not {sorted(params)}"
            )

        def command_function(**values: Any) -> None:
            fn(overrides=overrides(command, values), **{name: values[name] for name in own})

        command_function.__name__ = fn.__name__
        command_function.__qualname__ = fn.__qualname__
        command_function.__doc__ = fn.__doc__  # typer's command help
        command_function.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [_parameter(f, command) for f in flags]
        )
        return command_function

    return decorate


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set a.b=value`` (value in TOML syntax, or a bare string) → nested dict."""
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
