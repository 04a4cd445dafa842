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
from peerlearn.algorithms.easgd_theory import beta_max, stable
from peerlearn.errors import ConfigError
from peerlearn.faults import CrashSpec, parse_crash
from peerlearn.membership import Membership
from peerlearn.problems.base import Constants
from peerlearn.ties import at_most, below, compare
from peerlearn.topology import Topology, make_topology
from peerlearn.wire.messages import MAX_TAG_LEN

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
    "SimConfig",
    "TomlFile",
    "explain",
    "load_config",
    "load_toml",
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
        """The results' conditions this run breaks, one sentence each: the result's whole
        condition as :data:`THEORY_CONDITIONS` quotes it, then the parts this run breaks.

        Thresholds follow the tie rule of :mod:`peerlearn.ties`: a value equal to its bound up to
        rounding meets a "≤" (T = 16L²N computed as 16.000000000000004 does not warn) and fails
        a strict "<" or ">" (β = β_max is unstable, as :func:`easgd_theory.stable` says)."""
        out: list[str] = []
        algo, lr, big_l, mu = self.algorithm, self.lr, constants.L, constants.mu
        m, big_n, steps = self.clusters, self.n_quorum, self.steps
        eta1 = self.schedule()(1) if lr.schedule != "sqrt_n_over_t" or steps else None

        def warn(result: str, broken: list[str]) -> None:
            if broken:
                out.append(f"{_needs(result)} {THEORY_CONDITIONS[result]}: {'; '.join(broken)}")

        if algo == "alg1":
            parts = [] if mu is not None else ["μ is unknown (Q may not be strongly convex)"]
            if lr.schedule == "inverse_time":
                beta, gamma = lr.beta, lr.gamma
                if mu is not None and at_most(beta, 1 / mu):
                    parts.append(f"β = {beta:g} is not above 1/μ = {1 / mu:g}")
                if big_l is not None and not at_most(beta / (gamma + 1), 1 / big_l):
                    parts.append(f"β/(γ+1) = {beta / (gamma + 1):g} > 1/L = {1 / big_l:g}")
                warn("Thm 1", parts)
            else:  # a constant η: Thm 1 takes η_t = β/(γ+t), the per-iteration lemmas still hold
                if eta1 is not None and big_l is not None and not at_most(eta1, 1 / big_l):
                    parts.append(f"η = {eta1:g} > 1/L = {1 / big_l:g}")
                warn("Lemmas 3, 4 and 6", parts)
        if algo == "alg2":
            warn("Lemma 21", self._lemma21_broken(eta1, big_l))
            if steps is not None:
                t3, t4 = self._thm34_broken(eta1, big_l)
                warn("Thm 3", t3)
                warn("Thm 4", t4)
        if algo in ("alg2", "maa"):
            dead = {p for c in self.crash_specs for p in c.pids}
            alive = sum(1 for ms in self.membership.members if any(p not in dead for p in ms))
            if alive < m // 2 + 1:
                warn(
                    "Alg 3",
                    [
                        f"the crash specs leave {alive} of {m} clusters a live process, fewer than "
                        f"⌊m/2⌋+1 = {m // 2 + 1}, so processes will block (by Thm 5 no algorithm "
                        "can do better)"
                    ],
                )
        if big_n > self.processes - self.failures:
            out.append("N > n − f")  # unreachable: refused at validation
        out += self._other_warnings(constants)
        return out

    def _agreement_broken(self, eta1: float | None) -> list[str]:
        """The ways this run's agreement is not the "q_t = η/4" of Lemma 21 and Thm 4."""
        broken = []
        q = self.agreement_q()
        if eta1 is not None and compare(q, eta1 / 4) != 0:
            broken.append(f"q = {q:g} ≠ η/4 = {eta1 / 4:g}")
        rounds, inner = self.agreement_rounds()
        need, need_inner = maa_rounds(q, self.maa.aggregator)
        if rounds < need or inner < need_inner:
            broken.append(
                f"maa.rounds/inner_rounds = {rounds}/{inner} are below the {need}/{need_inner} "
                f"that a q-contraction needs"
            )
        return broken

    def _lemma21_broken(self, eta1: float | None, big_l: float | None) -> list[str]:
        broken = []
        if self.lr.schedule == "inverse_time":
            broken.append("lr.schedule = inverse_time is not constant")
        bound = min(0.5, 1 / big_l) if big_l is not None else None
        if eta1 is not None and bound is not None and not at_most(eta1, bound):
            broken.append(f"η = {eta1:g} > min{{1/2, 1/L}} = {bound:g}")
        return broken + self._agreement_broken(eta1)

    def _thm34_broken(self, eta1: float | None, big_l: float | None) -> tuple[list[str], list[str]]:
        """What this run breaks of Thm 3's and of Thm 4's conditions (T finite)."""
        steps, big_n = self.steps, self.n_quorum
        assert steps is not None
        rate: list[str] = []
        if self.lr.schedule == "inverse_time":
            rate.append("lr.schedule = inverse_time is not constant")
        elif eta1 is not None and compare(eta1, math.sqrt(big_n / steps)) != 0:
            rate.append(f"η = {eta1:g} ≠ √(N/T) = {math.sqrt(big_n / steps):g}")
        t3: list[str] = []
        t4: list[str] = []
        if big_l is not None and compare(steps, 16 * big_l**2 * big_n) < 0:
            t3.append(f"T = {steps} < 16L²N = {16 * big_l**2 * big_n:g}")
        need4 = max(16 * big_l**2 * big_n if big_l is not None else 0.0, 4.0 * big_n)
        if compare(steps, need4) < 0:
            what = "max{16L²N, 4N}" if big_l is not None else "4N"
            t4.append(f"T = {steps} < {what} = {need4:g}")
        return t3 + rate, t4 + rate + self._agreement_broken(eta1)

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

        def warn(result: str, broken: str) -> None:
            out.append(f"{_needs(result)} {THEORY_CONDITIONS[result]}: {broken}")

        if self.algorithm == "dasgd" and not at_most(eta, 1 / (4 * max(big_l, 1.0))):
            # S_avg ≥ 1 implies Ŝ_max ≥ Ŝ_avg ≥ 1 (Ŝ ⊇ S), so both bounds are ≤ 1/(4·max(L, 1))
            warn(
                "DASGD's Thm 1",
                "the staleness is only known after the run, but whenever S_avg ≥ 1 both mean "
                f"η ≤ 1/(4·max(L, 1)) = {1 / (4 * max(big_l, 1.0)):g}; η = {eta:g}",
            )
        p, alpha = self.processes - 1, self.elastic_alpha
        # (17) is easiest for the smallest ηh (β_max falls as ηh grows), so h = L decides it
        if self.algorithm == "easgd" and not stable(p, eta, alpha, big_l):
            if below(eta * big_l, 2.0):
                broken = (
                    f"β = pα = {p * alpha:g} is not below β_max = {beta_max(p, eta, big_l):g} "
                    f"(p = {p}, ηL = {eta * big_l:g}): the center diverges"
                )
            else:
                broken = f"ηL = {eta * big_l:g} is not below 2, where no β is stable"
            warn("EASGD's condition (17)", broken)
        return out


#: The whole hypothesis of each result a theory warning names, worded as the papers state it
#: (Attiya–Schiller Thm 1, Lemmas 3/4/6, 21, Thm 3, Thm 4 with Lemma 22 and erratum a, §4.1;
#: Tosi–Theobald Thm 1; EASGD supplement (17)). tests/test_theory_warnings.py holds the papers'
#: wording and checks these against it, and each warning's check against its condition.
THEORY_CONDITIONS: dict[str, str] = {
    "Thm 1": (
        "an L-smooth, μ-strongly convex Q and η_t = β/(γ+t) ≤ 1/L (i.e. β/(γ+1) ≤ 1/L) "
        "with β > 1/μ and γ > 0"
    ),
    "Lemmas 3, 4 and 6": "an L-smooth, μ-strongly convex Q and η ≤ 1/L",
    "Lemma 21": "a constant η ≤ min{1/2, 1/L} and q_t = η/4",
    "Thm 3": "T ≥ 16L²N and a constant η = √(N/T)",
    "Thm 4": "T ≥ max{16L²N, 4N}, a constant η = √(N/T) and q_t = η/4",
    "Alg 3": "f_c ≤ ⌊(m−1)/2⌋ crashed clusters, i.e. ⌊m/2⌋+1 clusters with a live process",
    "DASGD's Thm 1": (
        "L ≥ 1 and η ≤ 1/(4·L·S_avg) (eq. 11) or η ≤ 1/(4·L·√(Ŝ_avg·Ŝ_max)) (eq. 12)"
    ),
    "EASGD's condition (17)": "−1 < φ < γ < 1 for every curvature h ≤ L",
}


def _needs(result: str) -> str:
    return f"{result} {'need' if result.startswith('Lemmas') else 'needs'}"


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
