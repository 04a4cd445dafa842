"""The run description: one typed, frozen config object, built once and passed down.

A run is fully described by one TOML file (see ``configs/``); CLI flags override its fields
(:func:`load_config`). Validation has two levels:

* :class:`~peerlearn.errors.ConfigError` for what cannot run (unknown algorithm, N > n − f,
  malformed crash spec, more clusters than processes, …);
* :meth:`RunConfig.theory_warnings` for runs that can run but fall outside a theorem's
  conditions (β ≤ 1/μ, T < 16L²N, …): those are warnings, not refusals — breaking them
  deliberately is how one sees a bound stop holding.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from peerlearn.algorithms import Aggregator, Constant, InverseTime, Schedule, maa_rounds
from peerlearn.algorithms.registry import ALGORITHMS, REGISTRY, conditions, lookup, readers
from peerlearn.algorithms.spec import OPTIONAL_SETTINGS, AlgorithmSpec
from peerlearn.compression import DEFAULT_BLOCK, Compressor, Scheme
from peerlearn.errors import ConfigError
from peerlearn.faults import CrashSpec, parse_crash
from peerlearn.membership import Membership
from peerlearn.problems.base import Constants
from peerlearn.topology import Topology, make_topology

__all__ = [
    "ALGORITHMS",
    "THEORY_CONDITIONS",
    "Distribution",
    "ElasticConfig",
    "LRConfig",
    "MAAConfig",
    "MixConfig",
    "PartitionConfig",
    "ProblemConfig",
    "RunConfig",
    "RunSettings",
    "SimConfig",
    "TomlFile",
    "explain",
    "load_config",
    "load_toml",
    "merge",
    "read_toml",
]


def _known_algorithm(name: str) -> str:
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(name, ALGORITHMS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown algorithm {name!r}{hint}: one of {', '.join(ALGORITHMS)}")
    return name


#: an algorithm's name: a key of :data:`peerlearn.algorithms.registry.REGISTRY` (its JSON schema,
#: e.g. of /status in /openapi.json, lists them)
Algorithm = Annotated[
    str,
    AfterValidator(_known_algorithm),
    WithJsonSchema({"type": "string", "enum": list(ALGORITHMS)}),
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Distribution(_Frozen):
    """A non-negative random duration: ``constant``, ``exponential`` (mean), ``uniform`` on
    [mean − spread, mean + spread], or ``lognormal`` with the given mean and log-std ``spread``."""

    dist: Literal["constant", "exponential", "uniform", "lognormal"] = "exponential"
    mean: float = Field(1.0, ge=0.0)
    spread: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> Distribution:
        if self.dist == "uniform" and self.spread > self.mean:
            raise ValueError("uniform spread must be ≤ mean (durations are non-negative)")
        return self


class PartitionConfig(_Frozen):
    """Clusters in different groups cannot reach each other during [start, end); messages sent
    across are held and delivered when the partition heals (never, if ``end`` is omitted)."""

    groups: list[list[int]]
    start: float = Field(0.0, ge=0.0)
    end: float | None = None


class SimConfig(_Frozen):
    """Simulator knobs: virtual-time distributions, faults, sampling."""

    delay_remote: Distribution = Distribution(dist="exponential", mean=0.5)
    delay_local: Distribution = Distribution(dist="exponential", mean=0.05)
    compute: Distribution = Distribution(dist="exponential", mean=1.0)
    read: Distribution = Distribution(dist="exponential", mean=0.01)
    stragglers: int = Field(0, ge=0, description="how many processes compute slowly")
    slowdown: float = Field(5.0, ge=1.0, description="compute-time factor of a straggler")
    crashes: list[str] = Field(default_factory=list)
    partitions: list[PartitionConfig] = Field(default_factory=list)
    link_spread: float = Field(
        0.5, ge=0.0, lt=1.0, description="per-link mean delay factors are uniform in 1 ± spread"
    )
    sample_every: float = Field(1.0, gt=0.0, description="virtual time between metric samples")


class LRConfig(_Frozen):
    """η_t: ``constant`` (eta), ``inverse_time`` (β/(γ+t)) or ``sqrt_n_over_t`` (√(N/T))."""

    schedule: Literal["constant", "inverse_time", "sqrt_n_over_t"] = "constant"
    eta: float = Field(0.05, gt=0.0)
    beta: float = Field(4.0, gt=0.0)
    gamma: float = Field(7.0, gt=0.0)


class MAAConfig(_Frozen):
    """Agreement parameters. ``q`` defaults to η/4 for Alg 2 (erratum a in docs/papers.md) and
    1/4 for standalone agreement; ``rounds``/``inner_rounds`` override the counts derived from q
    (0 turns MAA off, ``inner_rounds = 1`` nearly switches SMMAA off — ablations)."""

    aggregator: Aggregator = Aggregator.MIDEXT
    q: float | None = Field(None, gt=0.0, le=1.0)
    rounds: int | None = Field(None, ge=0)
    inner_rounds: int | None = Field(None, ge=0)


class ElasticConfig(_Frozen):
    """The EASGD family, DOWNPOUR and the asynchronous parameter server: one process (named
    ``cluster.index``) runs the center, the other p = n − 1 processes are workers.

    ``beta`` is the center's moving rate β = pα (the "elastic symmetry"); ``alpha`` overrides
    it. ``tau`` is the communication period, ``delta`` the momentum of EAMSGD and MDOWNPOUR."""

    center: str = "0.0"
    alpha: float | None = Field(None, gt=0.0, lt=1.0)

    @field_validator("center", mode="before")
    @classmethod
    def _name_not_number(cls, value: Any) -> Any:
        # `--set elastic.center=1.10` parses as the float 1.1: say so rather than guess
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(
                f'a process name is a string like "1.0", got the number {value!r} '
                "(quote it: --set 'elastic.center=\"1.0\"')"
            )
        return value

    beta: float = Field(0.9, gt=0.0)
    tau: int = Field(1, ge=1)
    delta: float = Field(0.9, ge=0.0, lt=1.0)


class MixConfig(_Frozen):
    """MixML protocols: ``period`` m (local_steps: 2, reduced_frequency: 10 by default) and the
    slack matrix's ``gamma``."""

    period: int | None = Field(None, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)


class CompressionConfig(_Frozen):
    """Payload compression (docs/compression.md): ``scheme`` rounds the values the algorithm
    may compress (its record's ``compressible`` tag kinds: models, gradients, elastic
    differences — never agreement values) to ``fp16``, ``bf16`` or ``int8`` (``block`` values
    per power-of-two scale), with ``error_feedback`` (what rounding took off a value is added
    to the stream's next one); the wire then carries them packed."""

    scheme: Scheme = Scheme.NONE
    block: int = Field(DEFAULT_BLOCK, ge=8, le=65536, description="int8: values per scale")
    error_feedback: bool = True


class ProblemConfig(BaseModel):
    """``name`` (a registered problem or ``module:callable``) plus its keyword parameters."""

    model_config = ConfigDict(frozen=True, extra="allow")
    name: str = "quadratic"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunSettings(_Frozen):
    """The learning run: the settings every runtime shares — the simulator (:class:`RunConfig`)
    and every daemon of a deployment (:class:`peerlearn.daemon.config.NodeConfig`, where they
    form the run fingerprint). Declared once, here."""

    algorithm: Algorithm = "alg1"
    seed: int = Field(0, ge=0)
    steps: int | None = Field(
        None, ge=1, description="T (SGD iterations, or MAA instances); None: until stopped"
    )
    quorum: int | None = Field(None, ge=1, description="N; defaults to n − f")
    max_failures: int | None = Field(
        None,
        ge=0,
        description="f, the crashes the run is built to survive; default: the processes the "
        "crash specs kill or restart (simulator), ⌊(n−1)/2⌋ (daemons)",
    )
    dim: int = Field(4, ge=1, description="input dimension of standalone MAA")
    topology: str | None = Field(
        None,
        description="complete, ring, random-regular[:d] or an edge file (DASGD: complete, "
        "gossip: ring)",
    )
    problem: ProblemConfig = ProblemConfig()
    dtype: Literal["float32", "float64"] | None = Field(
        None,
        description="the dtype of models, gradients, the register store and the wire; "
        "default: the problem's own (float64; a torch model's float32)",
    )
    lr: LRConfig = LRConfig()
    maa: MAAConfig = MAAConfig()
    elastic: ElasticConfig = ElasticConfig()
    mix: MixConfig = MixConfig()
    compression: CompressionConfig = CompressionConfig()


class RunConfig(RunSettings):
    """Everything a run needs: the run's settings and its layout in processes and clusters,
    plus the simulator's knobs. Processes are ``cluster.index``, round-robin."""

    # The one default that differs: a simulation needs a finite T, a daemon runs until stopped.
    steps: int | None = Field(
        100, ge=1, description="T (SGD iterations, or MAA instances); None: until stopped"
    )
    processes: int = Field(8, ge=1)
    clusters: int = Field(4, ge=1)
    cluster_sizes: list[int] | None = Field(
        None, description="processes per cluster (daemons); default: even, round-robin"
    )
    trace: bool = False
    sim: SimConfig = SimConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        # Touch the derived views so that every inconsistency surfaces at load time.
        _ = self.membership
        crashes = self.crash_specs
        restarts = [c.spec for c in crashes if c.mode == "restart"]
        if restarts and (self.spec.resume is None or self.spec.lockstep):
            able = ", ".join(
                name
                for name, spec in REGISTRY.items()
                if spec.resume is not None and not spec.lockstep
            )
            if self.spec.resume is None:
                why = "restart faults need a resume entry point"
            else:
                why = (
                    "its peers send a restarted process their last iterations' frames again, "
                    "which daemons' links do and the simulator does not model"
                )
            raise ValueError(
                f"{self.algorithm} cannot rejoin in the simulator: {why} "
                f"({', '.join(restarts)}; algorithms that can: {able})"
            )
        if self.spec.center and not self.spec.center_rebuilt:
            at_center = [c.spec for c in crashes if c.mode == "restart" and self.center in c.pids]
            if at_center:
                raise ValueError(
                    f"the center of {self.algorithm} cannot restart ({', '.join(at_center)}): "
                    "its model is not a sum of what the workers hold, so it cannot be rebuilt "
                    "from them; its workers can restart"
                )
        # A restarted process misses the iterations it skips, as a crashed one would: it counts
        # among the f processes the quorum must do without.
        kill = "kill or restart" if restarts else "kill"
        f = self.failures
        why = (
            f"max_failures f = {f}"
            if self.max_failures is not None
            else f"the crash specs {[c.spec for c in crashes]} {kill} {f}"
        )
        if self.quorum is not None and self.quorum > self.processes - f:
            raise ValueError(
                f"quorum N = {self.quorum} > n − f = {self.processes} − {f}: processes would "
                f"wait forever ({why})"
            )
        killed = len({p for c in crashes for p in c.pids})
        if self.max_failures is not None and killed > self.max_failures:
            raise ValueError(
                f"the crash specs {kill} {killed} processes, more than max_failures f = "
                f"{self.max_failures}"
            )
        if self.processes - f < 1:
            if self.max_failures is not None:
                raise ValueError(f"max_failures f = {f} must be < n = {self.processes}")
            raise ValueError(f"the crash specs {kill} every process")
        for part in self.sim.partitions:
            seen = [c for g in part.groups for c in g]
            if len(seen) != len(set(seen)) or any(not 0 <= c < self.clusters for c in seen):
                raise ValueError(
                    f"partition groups {part.groups} must name distinct clusters "
                    f"0..{self.clusters - 1}"
                )
        if self.sim.stragglers > self.processes:
            raise ValueError("more stragglers than processes")
        spec = self.spec
        if spec.fixed_eta and self.lr.schedule != "constant":
            raise ValueError(
                f"{self.algorithm} is analysed with a fixed η: use lr.schedule = constant (DASGD "
                "needs it: every node must apply every gradient with the same η)"
            )
        if self.elastic.alpha is not None and "beta" in self.elastic.model_fields_set:
            raise ValueError("set elastic.alpha or elastic.beta (β = pα), not both")
        if spec.center:
            if self.processes < 2:
                raise ValueError(f"{self.algorithm} needs a center and at least one worker")
            _ = self.center
        if self.compression.scheme is not Scheme.NONE and not spec.compressible:
            raise ValueError(
                f"{self.algorithm} sends only agreement values, which compression would break "
                f"(their validity and contraction are stated for exact values): set "
                f'compression.scheme = "none" (algorithms that compress: '
                f"{', '.join(n for n, r in REGISTRY.items() if r.compressible)})"
            )
        spec.check(self)
        if spec.topology is not None:
            _ = self.graph
        return self

    def compressor(self) -> Compressor:
        """A new process's rounding (``Quantize``), as ``[compression]`` says."""
        c = self.compression
        return Compressor(c.scheme, c.block, c.error_feedback)

    @property
    def spec(self) -> AlgorithmSpec:
        """The record of this run's algorithm: everything peerlearn knows about it."""
        return lookup(self.algorithm)

    @cached_property
    def center(self) -> int:
        """The process id of the elastic center."""
        name = self.elastic.center
        cluster, _, index = name.partition(".")
        if not (cluster.isdigit() and index.isdigit()):
            raise ValueError(f"elastic.center {name!r} is not a process name cluster.index")
        try:
            return self.membership.pid(int(cluster), int(index))
        except ConfigError as exc:
            raise ValueError(f"elastic.center {name!r}: {exc}") from None

    @property
    def elastic_alpha(self) -> float:
        """α: given, or β/p."""
        if self.elastic.alpha is not None:
            return self.elastic.alpha
        return self.elastic.beta / max(1, self.processes - 1)

    @property
    def mix_period(self) -> int:
        """m: ``mix.period`` where the algorithm reads it, else the algorithm's own."""
        if self.mix.period is not None and self.spec.reads("mix.period"):
            return self.mix.period
        return self.spec.period

    @cached_property
    def graph(self) -> Topology:
        """The communication graph of a topology algorithm."""
        spec = self.topology or self.spec.topology or "ring"
        try:
            return make_topology(spec, self.processes, self.seed)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @cached_property
    def membership(self) -> Membership:
        try:
            sizes = tuple(self.cluster_sizes) if self.cluster_sizes else None
            return Membership(self.processes, self.clusters, sizes)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc

    @cached_property
    def crash_specs(self) -> tuple[CrashSpec, ...]:
        try:
            return tuple(parse_crash(s, self.membership) for s in self.sim.crashes)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc

    @property
    def failures(self) -> int:
        """f: ``max_failures``, or the number of distinct processes the crash specs kill or
        restart."""
        if self.max_failures is not None:
            return self.max_failures
        return len({p for c in self.crash_specs for p in c.pids})

    @property
    def n_quorum(self) -> int:
        """N: the configured quorum, or n − f."""
        return self.quorum if self.quorum is not None else self.processes - self.failures

    def schedule(self) -> Schedule:
        lr = self.lr
        if lr.schedule == "inverse_time":
            return InverseTime(lr.beta, lr.gamma)
        if lr.schedule == "sqrt_n_over_t":
            if self.steps is None:
                raise ConfigError("lr.schedule = sqrt_n_over_t needs a finite number of steps")
            return Constant(math.sqrt(self.n_quorum / self.steps))
        return Constant(lr.eta)

    def agreement_q(self) -> float:
        if self.maa.q is not None:
            return self.maa.q
        return self.spec.agreement_q(self)

    def agreement_rounds(self) -> tuple[int, int]:
        """(cluster rounds R, shared-memory rounds) per agreement instance."""
        outer, inner = maa_rounds(self.agreement_q(), self.maa.aggregator)
        return (
            outer if self.maa.rounds is None else self.maa.rounds,
            inner if self.maa.inner_rounds is None else self.maa.inner_rounds,
        )

    def theory_warnings(self, constants: Constants) -> list[str]:
        """The results' conditions this run breaks, one sentence each: the result's whole
        condition as :data:`THEORY_CONDITIONS` quotes it, then the parts this run breaks.

        Each algorithm's record holds its results and checks them. Thresholds follow the tie
        rule of :mod:`peerlearn.ties`: a value equal to its bound up to rounding meets a "≤"
        (T = 16L²N computed as 16.000000000000004 does not warn) and fails a strict "<" or
        ">" (β = β_max is unstable, as :func:`easgd_theory.stable` says)."""
        return self.spec.warnings(self, constants)

    def unused_settings(self) -> list[str]:
        """Settings that differ from their defaults but mean nothing to this algorithm (a
        config shared between algorithms): warned about, not refused."""
        out = []
        for setting in OPTIONAL_SETTINGS:
            if self._changed(setting) and not self.spec.reads(setting):
                applies = ", ".join(readers(setting))
                out.append(f"{setting} is ignored by {self.algorithm} (it applies to {applies})")
        if self.dtype is not None and not self.spec.needs_problem:
            out.append(
                f"dtype is ignored by {self.algorithm}: its inputs are drawn in float64 "
                "(it applies to algorithms with a problem)"
            )
        return out

    def _changed(self, setting: str) -> bool:
        """Does this config set ``setting`` (dotted) to other than its default?"""
        if setting in ("topology", "quorum"):  # None: the algorithm's own
            return getattr(self, setting) is not None
        section_name, name = setting.split(".")
        section: BaseModel = getattr(self, section_name)
        default = type(section).model_fields[name].default
        return bool(getattr(section, name) != default)


#: The whole hypothesis of each result a theory warning names, worded as the papers state it,
#: from the algorithm records. tests/test_theory_warnings.py holds the papers' wording and
#: checks these against it, and each warning's check against its condition.
THEORY_CONDITIONS: dict[str, str] = conditions()


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, recursively (``over`` wins)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def explain(
    exc: ValidationError,
    model: type[BaseModel] | None = None,
    file: TomlFile | None = None,
    overrides: dict[str, Any] | None = None,
    env_prefix: str | None = None,
) -> str:
    """One line naming each invalid field and why (for a ConfigError).

    With ``model``, an unknown key says which known one it probably is (a typo); with the
    ``file`` it came from, an error about a value written there names the file and line
    (unless ``overrides`` replaced that value); with ``env_prefix``, one that came from an
    environment variable names the variable."""
    parts = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = _dotted(loc) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            text = f"unknown setting `{where}`"
            if model is not None and (guess := _did_you_mean(model, loc)) is not None:
                text += f" (did you mean `{guess}`?)"
        else:
            text = f"{where}: {msg}"
        if file is not None and loc and _holds(file.data, loc) and not _holds(overrides, loc):
            line = file.line_of(loc)
            text = f"{file.path}{f', line {line}' if line else ''}: {text}"
        elif env_prefix is not None and loc and not _holds(overrides, loc):
            name = (env_prefix + "__".join(str(p) for p in loc)).upper()
            if any(key.upper() == name for key in os.environ):
                text = f"environment variable {name}: {text}"
        parts.append(text)
    return "; ".join(parts)


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``("daemons", 1, "adress")`` → ``daemons[1].adress``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out


def _holds(data: Any, loc: tuple[int | str, ...]) -> bool:
    """Does the nested dict/list ``data`` have an entry at ``loc``?"""
    for part in loc:
        in_dict = isinstance(data, dict) and isinstance(part, str) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if not (in_dict or in_list):
            return False
        data = data[part]
    return True


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (directly, in a list, or optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := _submodel(arg)) is not None:
            return found
    return None


def _did_you_mean(model: type[BaseModel], loc: tuple[int | str, ...]) -> str | None:
    """The known setting closest to the unknown key at ``loc``, as a dotted path (a typo's
    likely intent), or None when nothing is close."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int):  # a list index ([[daemons]]): same model
            continue
        field = current.model_fields.get(part) if current is not None else None
        current = _submodel(field.annotation) if field is not None else None
        if current is None:
            return None
    if current is None:
        return None
    close = difflib.get_close_matches(str(loc[-1]), list(current.model_fields), n=1)
    return _dotted((*loc[:-1], close[0])) if close else None


@dataclass(frozen=True)
class TomlFile:
    """A config file as read: its path, text and parsed tables."""

    path: Path
    text: str
    data: dict[str, Any]

    def line_of(self, loc: tuple[int | str, ...]) -> int | None:
        """The 1-based line where the key at ``loc`` is written, or None if not found.

        A line scan, enough for configs as people write them: ``[table]`` and
        ``[[array]]`` headers, ``key = …`` and dotted ``a.b = …`` keys, and keys inside a
        one-line inline table (``lr = { eat = 1 }``)."""
        table: tuple[int | str, ...] = ()
        arrays: dict[tuple[int | str, ...], int] = {}
        for number, raw in enumerate(self.text.splitlines(), 1):
            line = raw.strip()
            if header := _HEADER.match(line):
                path = _key_path(header.group(2))
                if header.group(1) == "[[":
                    arrays[path] = arrays.get(path, -1) + 1
                    table = (*path, arrays[path])
                else:
                    table = path
                continue
            if key := _KEY.match(line):
                full = (*table, *_key_path(key.group(1)))
                if full == loc:
                    return number
                if loc[: len(full)] == full and re.search(
                    rf"[{{,]\s*[\"']?{re.escape(str(loc[-1]))}[\"']?\s*=", line
                ):
                    return number
        return None


_HEADER = re.compile(r"^(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^({_PART}(?:\s*\.\s*{_PART})*)\s*=")


def _key_path(text: str) -> tuple[str, ...]:
    return tuple(p.strip().strip("\"'") for p in text.split("."))


def load_toml(path: Path | None) -> TomlFile | None:
    """The TOML file at ``path`` (None for None); ConfigError if missing or invalid."""
    if path is None:
        return None
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        return TomlFile(Path(path), text, tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def read_toml(path: Path | None) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict ({} for None); ConfigError if missing or invalid."""
    file = load_toml(path)
    return file.data if file is not None else {}


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (TOML), apply nested ``overrides`` (CLI flags win) and validate."""
    file = load_toml(path)
    data = merge(file.data if file is not None else {}, overrides or {})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(explain(exc, RunConfig, file, overrides)) from None
