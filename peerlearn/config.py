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

import math
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from peerlearn.algorithms import Aggregator, Constant, InverseTime, Schedule, maa_rounds
from peerlearn.algorithms.easgd_theory import beta_max
from peerlearn.errors import ConfigError
from peerlearn.faults import CrashSpec, parse_crash
from peerlearn.membership import Membership
from peerlearn.problems.base import Constants
from peerlearn.topology import Topology, make_topology
from peerlearn.wire.messages import MAX_TAG_LEN

__all__ = [
    "ALGORITHMS",
    "Distribution",
    "ElasticConfig",
    "LRConfig",
    "MAAConfig",
    "MixConfig",
    "PartitionConfig",
    "ProblemConfig",
    "RunConfig",
    "SimConfig",
    "explain",
    "load_config",
    "merge",
    "read_toml",
]

Algorithm = Literal[
    # Attiya–Schiller
    "alg1",
    "alg2",
    "maa",
    # Tosi–Theobald
    "dasgd",
    # Zhang–Choromanska–LeCun, and MixML's asynchronous parameter server
    "easgd",
    "async_easgd",
    "eamsgd",
    "downpour",
    "mdownpour",
    "async_ps",
    # Lu–Nash–De Sa (MixML)
    "allreduce",
    "local_steps",
    "reduced_frequency",
    "slack",
    "sync_gossip",
    "async_gossip",
]
#: every algorithm, by paper (the README's algorithm table lists them with their parameters)
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
ATTIYA_SCHILLER = ("alg1", "alg2", "maa")
ELASTIC = ("easgd", "async_easgd", "eamsgd", "downpour", "mdownpour", "async_ps")
#: algorithms whose processes talk over a topology (the others talk to everyone or a center)
TOPOLOGY_ALGORITHMS = ("dasgd", "sync_gossip", "async_gossip")


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
    """Agreement parameters. ``q`` defaults to η/4 for Alg 2 (erratum a) and 1/4 for standalone
    agreement; ``rounds``/``inner_rounds`` override the counts derived from q (0 turns MAA off,
    ``inner_rounds = 1`` nearly switches SMMAA off — ablations)."""

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


class ProblemConfig(BaseModel):
    """``name`` (a registered problem or ``module:callable``) plus its keyword parameters."""

    model_config = ConfigDict(frozen=True, extra="allow")
    name: str = "quadratic"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunConfig(_Frozen):
    """Everything a simulated run needs. Processes are ``cluster.index``, round-robin."""

    algorithm: Algorithm = "alg1"
    seed: int = Field(0, ge=0)
    processes: int = Field(8, ge=1)
    clusters: int = Field(4, ge=1)
    quorum: int | None = Field(None, ge=1, description="N; defaults to n − f")
    steps: int | None = Field(
        100, ge=1, description="T (SGD iterations, or MAA instances); None: until stopped"
    )
    cluster_sizes: list[int] | None = Field(
        None, description="processes per cluster (daemons); default: even, round-robin"
    )
    dim: int = Field(4, ge=1, description="input dimension of standalone MAA")
    trace: bool = False
    topology: str | None = Field(
        None,
        description="complete, ring, random-regular[:d] or an edge file (DASGD: complete, "
        "gossip: ring)",
    )
    problem: ProblemConfig = ProblemConfig()
    lr: LRConfig = LRConfig()
    maa: MAAConfig = MAAConfig()
    elastic: ElasticConfig = ElasticConfig()
    mix: MixConfig = MixConfig()
    sim: SimConfig = SimConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        # Touch the derived views so that every inconsistency surfaces at load time.
        _ = self.membership
        crashes = self.crash_specs
        f = self.failures
        if self.quorum is not None and self.quorum > self.processes - f:
            raise ValueError(
                f"quorum N = {self.quorum} > n − f = {self.processes} − {f}: processes would "
                f"wait forever (the crash specs {[c.spec for c in crashes]} kill {f})"
            )
        if self.processes - f < 1:
            raise ValueError("the crash specs kill every process")
        for part in self.sim.partitions:
            seen = [c for g in part.groups for c in g]
            if len(seen) != len(set(seen)) or any(not 0 <= c < self.clusters for c in seen):
                raise ValueError(
                    f"partition groups {part.groups} must name distinct clusters "
                    f"0..{self.clusters - 1}"
                )
        if self.sim.stragglers > self.processes:
            raise ValueError("more stragglers than processes")
        if self.algorithm not in ATTIYA_SCHILLER and self.lr.schedule != "constant":
            raise ValueError(
                f"{self.algorithm} is analysed with a fixed η: use lr.schedule = constant (DASGD "
                "needs it: every node must apply every gradient with the same η)"
            )
        if self.algorithm == "dasgd" and self.processes > MAX_TAG_LEN - 3:
            raise ValueError(
                f"dasgd carries a version vector of n integers in every gradient's tag: "
                f"n ≤ {MAX_TAG_LEN - 3}"
            )
        if self.elastic.alpha is not None and "beta" in self.elastic.model_fields_set:
            raise ValueError("set elastic.alpha or elastic.beta (β = pα), not both")
        if self.algorithm in ELASTIC:
            if self.processes < 2:
                raise ValueError(f"{self.algorithm} needs a center and at least one worker")
            _ = self.center
            if self.elastic_alpha >= 1:
                raise ValueError(
                    f"elastic α = β/p = {self.elastic_alpha:g} must be < 1 "
                    f"(β = {self.elastic.beta:g}, p = {self.processes - 1})"
                )
        if self.algorithm in TOPOLOGY_ALGORITHMS:
            _ = self.graph
        return self

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
        if self.mix.period is not None:
            return self.mix.period
        return {"local_steps": 2, "reduced_frequency": 10}.get(self.algorithm, 1)

    @cached_property
    def graph(self) -> Topology:
        """The communication graph of a topology algorithm."""
        spec = self.topology or ("complete" if self.algorithm == "dasgd" else "ring")
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
        """f: the number of distinct processes the crash specs kill."""
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
        if self.algorithm == "alg2":
            return min(1.0, self.schedule()(1) / 4)
        return 0.25

    def agreement_rounds(self) -> tuple[int, int]:
        """(cluster rounds R, shared-memory rounds) per agreement instance."""
        outer, inner = maa_rounds(self.agreement_q(), self.maa.aggregator)
        return (
            outer if self.maa.rounds is None else self.maa.rounds,
            inner if self.maa.inner_rounds is None else self.maa.inner_rounds,
        )

    def theory_warnings(self, constants: Constants) -> list[str]:
        """The theorems' conditions this run breaks (spec pitfall 14), one sentence each."""
        out: list[str] = []
        n, m, big_n, steps = self.processes, self.clusters, self.n_quorum, self.steps
        if self.algorithm == "alg1" and self.lr.schedule == "inverse_time":
            beta, gamma = self.lr.beta, self.lr.gamma
            if constants.mu is not None and beta <= 1 / constants.mu:
                out.append(f"Thm 1 needs β > 1/μ = {1 / constants.mu:g}; β = {beta:g}")
            if constants.L is not None and beta / (gamma + 1) > 1 / constants.L:
                out.append(
                    f"Thm 1 needs β/(γ+1) ≤ 1/L = {1 / constants.L:g}; it is {beta / (gamma + 1):g}"
                )
        eta1 = self.schedule()(1) if self.lr.schedule != "sqrt_n_over_t" or steps else None
        constant = self.lr.schedule == "constant"
        if self.algorithm == "alg1" and constant and constants.L and self.lr.eta > 1 / constants.L:
            out.append(f"Thm 1 / Lemma 3 need η ≤ 1/L = {1 / constants.L:g}; η = {self.lr.eta:g}")
        if self.algorithm == "alg2" and eta1 is not None and constants.L:
            bound = min(1 / (4 * constants.L), 0.5)
            if eta1 > bound:
                out.append(
                    f"Thm 4 / Lemma 21 need η ≤ min{{1/(4L), 1/2}} = {bound:g}; η = {eta1:g}"
                )
        if self.algorithm == "alg1" and constants.mu is None:
            out.append("Alg 1's guarantee (Thm 1) is for strongly convex problems; μ is unknown")
        if self.algorithm == "alg2" and steps is not None:
            if constants.L is not None and steps < 16 * constants.L**2 * big_n:
                out.append(f"Thm 3/4 need T ≥ 16L²N = {16 * constants.L**2 * big_n:g}; T = {steps}")
            if steps < 4 * big_n:
                out.append(f"Thm 4 needs T ≥ 4N = {4 * big_n}; T = {steps}")
        if self.algorithm in ("alg2", "maa"):
            dead = {p for c in self.crash_specs for p in c.pids}
            alive = sum(1 for ms in self.membership.members if any(p not in dead for p in ms))
            if alive < m // 2 + 1:
                out.append(
                    f"only {alive} of {m} clusters keep a live process; agreement needs "
                    f"⌊m/2⌋+1 = {m // 2 + 1}: processes will block (Thm 5)"
                )
        if big_n > n - self.failures:
            out.append("N > n − f")  # unreachable: refused at validation
        out += self._other_warnings(constants)
        return out

    def unused_settings(self) -> list[str]:
        """Settings that differ from their defaults but mean nothing to this algorithm (a
        config shared between algorithms): warned about, not refused."""
        algo, out = self.algorithm, []

        def changed(section: BaseModel, name: str) -> bool:
            default = type(section).model_fields[name].default
            return bool(getattr(section, name) != default)

        def note(what: str, applies: tuple[str, ...]) -> None:
            out.append(f"{what} is ignored by {algo} (it applies to {', '.join(applies)})")

        if self.topology is not None and algo not in TOPOLOGY_ALGORITHMS:
            note("topology", TOPOLOGY_ALGORITHMS)
        momentum = ("eamsgd", "mdownpour")
        periodic = ("easgd", "async_easgd", "eamsgd", "downpour")
        for name, applies in (
            ("center", ELASTIC),
            ("alpha", ELASTIC),
            ("beta", ELASTIC),
            ("tau", periodic),
            ("delta", momentum),
        ):
            if changed(self.elastic, name) and algo not in applies:
                note(f"elastic.{name}", applies)
        if changed(self.mix, "period") and algo not in ("local_steps", "reduced_frequency"):
            note("mix.period", ("local_steps", "reduced_frequency"))
        if changed(self.mix, "gamma") and algo != "slack":
            note("mix.gamma", ("slack",))
        if self.quorum is not None and algo not in ("alg1", "alg2"):
            note("quorum", ("alg1", "alg2"))
        for name in ("aggregator", "q", "rounds", "inner_rounds"):
            if changed(self.maa, name) and algo not in ("alg2", "maa"):
                note(f"maa.{name}", ("alg2", "maa"))
        return out

    def _other_warnings(self, constants: Constants) -> list[str]:
        out: list[str] = []
        eta = self.schedule()(1) if self.steps or self.lr.schedule == "constant" else None
        if eta is None or constants.L is None:
            return out
        big_l = constants.L
        if self.algorithm == "dasgd" and eta > 1 / (4 * max(big_l, 1.0)):
            out.append(
                f"DASGD's Thm 1 needs η ≤ 1/(4·L_eff·S) ≤ 1/(4·max(L, 1)) = "
                f"{1 / (4 * max(big_l, 1.0)):g}; η = {eta:g}"
            )
        if self.algorithm == "easgd" and eta * big_l < 2:
            p = self.processes - 1
            bmax = beta_max(p, eta, big_l)
            beta = self.elastic_alpha * p
            if beta >= bmax:
                out.append(
                    f"EASGD's center is unstable (condition 17): β = pα = {beta:g} ≥ β_max = "
                    f"{bmax:g} for p = {p}, ηL = {eta * big_l:g}"
                )
        elif self.algorithm == "easgd":
            out.append(f"EASGD needs ηh < 2 for every curvature h; ηL = {eta * big_l:g}")
        return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, recursively (``over`` wins)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def explain(exc: ValidationError) -> str:
    """One line naming each invalid field and why (for a ConfigError)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def read_toml(path: Path | None) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict ({} for None); ConfigError if missing or invalid."""
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (TOML), apply nested ``overrides`` (CLI flags win) and validate."""
    data = merge(read_toml(path), overrides or {})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(explain(exc)) from None
