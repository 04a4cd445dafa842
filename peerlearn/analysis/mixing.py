"""MixML mixing time t_mix of communication protocols (Lu, Nash & De Sa, Section 3.1).

Theory of operation
-------------------
The storage of a run is a vector X of scalar *slots*: worker copies, a server copy, … A
d-dimensional model averaged coordinate-wise moves as W ⊗ I_d, so every norm below reduces to the
small slot matrix. Time is counted in MixML units: **one t is one computation event, i.e. one
worker update anywhere in the system**. Everything communicated between computation t and t+1 is
one linear operator M_t (the identity when nothing is sent), so a protocol is a sequence
M_0, M_1, … — periodic for the deterministic protocols, drawn from a seeded numpy Generator for
the random ones.

Each protocol has a consensus projector M_∞ with M_∞M_t = M_tM_∞ = M_∞ = M_∞² (Assumption 1):
J = 11ᵀ/n for the averaging protocols, "copy the server into every cache" for the parameter
server. t_mix is Assumption 2 — the ½ halving constant, the 2-norm, uniformly in the start s::

    t_mix = max_s min{τ : ‖M_{s+τ−1} ⋯ M_s Q‖₂ ≤ ½}

with Q an orthonormal basis of ker(M_∞) (from the SVD of M_∞): P M_∞ = M_∞ for every window
product P, so (P − M_∞)X = P(X − M_∞X), and X − M_∞X ranges over ker(M_∞).

* Deterministic protocols repeat with a period, so one period of start offsets covers every s;
  inside a run of identity events only the earliest start matters, so the starts scanned are
  "just after each communication". Identity events cost nothing: only the communicating events
  are multiplied in.
* Random protocols have no uniform bound (an unlucky schedule never mixes), so, as in the paper's
  "1000 runs" (Section 6), :meth:`MixingProtocol.sample_tmix` reports the distribution of the
  first τ with ‖P_{0,τ}Q‖₂ ≤ ½ over independent schedules — the window starting at t = 0.
* When every communication is non-expansive on ker(M_∞) (true of all protocols here, checked at
  build time), ‖P_{s,τ}Q‖₂ cannot grow with τ, and the first halving is found by doubling then
  bisection with O(log τ) norm evaluations; otherwise every prefix is checked.
* Ties: many windows have a norm of exactly ½ (γ = ½ or 1 − 2^{−1/k}, |λ₂(W)| = 2^{−1/k}, the
  dyadic products of pair averages), and the computed norm then lands a few ulps either side of
  ½ depending on the BLAS kernel. Every comparison with ½ — the exact scan, the sampled runs,
  Lemma 1's uniform t_mix and the closed forms — goes through :func:`halves`, which counts a
  norm within a relative 1e-9 of ½ (:mod:`peerlearn.ties`) as ½, hence halved ("≤ ½").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import count, islice, takewhile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from peerlearn.algorithms.registry import lookup
from peerlearn.config import MixConfig
from peerlearn.errors import ConfigError
from peerlearn.ties import at_most, below
from peerlearn.topology import make_topology

__all__ = [
    "MAX_EVENTS",
    "PROTOCOLS",
    "Copy",
    "Dense",
    "Event",
    "Lemma1Check",
    "MixingProtocol",
    "PairAverage",
    "TmixDistribution",
    "build_protocol",
    "event_operator",
    "exact_tmix",
    "halves",
    "lemma1_holds",
    "sample_tmix",
]

Matrix = npt.NDArray[np.float64]

MAX_EVENTS = 1_000_000  # τ cap: beyond this a protocol is reported as (practically) not mixing
_BLOCK = 1024  # random events are drawn in fixed blocks, so a seed fixes the whole schedule
_MAX_N = 1024  # every operator is a dense (slots × slots) matrix
#: the slack matrix's γ unless given: the run config's default, so both tools agree
SLACK_GAMMA = MixConfig().gamma
#: the orders of events a protocol with a ``scheduling`` parameter can follow (the first is its
#: default): the asynchronous parameter server has no fixed one
SCHEDULINGS = ("round_robin", "random")

# name → (parameters it takes, what its operators are); the CLI and the docs read this table.
PROTOCOLS: dict[str, tuple[frozenset[str], str]] = {
    "allreduce": (frozenset(), "J at the last of every n events, I otherwise"),
    "local_steps": (
        frozenset({"period"}),
        f"J every m·n events (m local steps; m = {lookup('local_steps').period})",
    ),
    "reduced_frequency": (
        frozenset({"period"}),
        f"J every m·n events (m = {lookup('reduced_frequency').period})",
    ),
    "slack": (frozenset({"gamma"}), f"(1−γ)I + γJ every n events (γ = {SLACK_GAMMA:g})"),
    "sync_gossip": (
        frozenset({"weights", "topology", "seed"}),
        "W every n events; W = Metropolis weights of the topology (ring: 1/3) or a JSON file",
    ),
    "async_gossip": (
        frozenset({"topology", "seed"}),
        "every event averages the two ends of a uniformly random edge (AD-PSGD)",
    ),
    "async_ps": (
        frozenset({"scheduling"}),
        "slots (s, c_1..c_n); worker i's event pushes into s then pulls c_i ← s",
    ),
}


@dataclass(frozen=True, eq=False)
class Dense:
    """A general communication: P ← M P."""

    matrix: Matrix

    def apply(self, p: Matrix) -> Matrix:
        return self.matrix @ p

    def dense(self, slots: int) -> Matrix:
        return self.matrix.copy()


@dataclass(frozen=True)
class PairAverage:
    """Slots i and j both become their mean: I − ½(e_i − e_j)(e_i − e_j)ᵀ (updates p in place)."""

    i: int
    j: int

    def apply(self, p: Matrix) -> Matrix:
        row = 0.5 * (p[self.i] + p[self.j])
        p[self.i] = row
        p[self.j] = row
        return p

    def dense(self, slots: int) -> Matrix:
        return self.apply(np.eye(slots))


@dataclass(frozen=True)
class Copy:
    """Slot ``dst`` takes the value of slot ``src`` (updates p in place)."""

    dst: int
    src: int

    def apply(self, p: Matrix) -> Matrix:
        p[self.dst] = p[self.src]
        return p

    def dense(self, slots: int) -> Matrix:
        return self.apply(np.eye(slots))


Event = Dense | PairAverage | Copy


def _opnorm(a: Matrix) -> float:
    return float(np.linalg.norm(a, 2)) if a.size else 0.0


def halves(norm: float) -> bool:
    """Assumption 2's "≤ ½", the one place a window's norm meets ½: a norm equal to ½ up to
    rounding (:func:`peerlearn.ties.compare`) counts as ½, so as halved, on every machine."""
    return at_most(norm, 0.5)


def _halved(p: Matrix) -> bool:
    """halves(‖p‖₂), with the SVD only when ‖p‖_F/√rank ≤ ‖p‖₂ ≤ ‖p‖_F leaves it open."""
    frob = float(np.linalg.norm(p))
    if halves(frob):
        return True
    if not halves(frob / math.sqrt(min(p.shape))):
        return False
    return halves(_opnorm(p))


def _advance(p: Matrix, events: Sequence[Event]) -> Matrix:
    p = p.copy()
    for ev in events:
        p = ev.apply(p)
    return p


def _first_halving(
    q: Matrix, stream: Iterator[tuple[int, Event]], monotone: bool, cap: int, name: str
) -> int:
    """Window length τ (1 + time of the deciding event) at which ‖P Q‖₂ first drops to ≤ ½.

    ``stream`` yields (time since the window start, event) for the non-identity events."""
    times: list[int] = []
    events: list[Event] = []

    def available(want: int) -> int:  # pull events up to index `want`, never past the cap
        while len(events) < want:
            t, ev = next(stream)
            if t >= cap:
                break
            times.append(t)
            events.append(ev)
        return min(want, len(events))

    def too_slow() -> ConfigError:
        return ConfigError(
            f"{name}: t_mix exceeds {cap:,} events (the cap); the protocol mixes too slowly "
            "to measure (e.g. γ too small)"
        )

    if not monotone:  # a norm may grow again: check every prefix
        p = q.copy()
        for k in count():
            if available(k + 1) == k:
                raise too_slow()
            p = events[k].apply(p)
            if _halved(p):
                return times[k] + 1
    lo, p_lo, step = 0, q, 1  # invariant: the first `lo` events leave ‖P Q‖₂ > ½
    while True:
        hi = available(lo + step)
        if hi == lo:
            raise too_slow()
        p_hi = _advance(p_lo, events[lo:hi])
        if _halved(p_hi):
            break
        lo, p_lo, step = hi, p_hi, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p_mid = _advance(p_lo, events[lo:mid])
        if _halved(p_mid):
            hi = mid
        else:
            lo, p_lo = mid, p_mid
    return times[hi - 1] + 1


@dataclass(frozen=True)
class TmixDistribution:
    """Per-run t_mix of independent schedules, each measured from t = 0."""

    values: tuple[int, ...]

    @property
    def runs(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def stderr(self) -> float:
        """Standard error of the mean (0 for a single run)."""
        return float(np.std(self.values, ddof=1) / math.sqrt(self.runs)) if self.runs > 1 else 0.0

    @property
    def median(self) -> float:
        return float(np.median(self.values))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.values, 90))

    @property
    def min(self) -> int:
        return min(self.values)

    @property
    def max(self) -> int:
        return max(self.values)

    def summary(self) -> dict[str, float | int]:
        return {
            "mean": self.mean,
            "median": self.median,
            "p90": self.p90,
            "min": self.min,
            "max": self.max,
            "runs": self.runs,
        }


@dataclass(frozen=True)
class Lemma1Check:
    """Lemma 1 on every window of a recorded schedule, as operator norms:
    ‖P − M_∞‖₂ ≤ 2^{−⌊len/t_mix⌋}(1+ξ)ξ, ξ = max over the windows of ‖P‖₂."""

    holds: bool
    worst_ratio: float  # max over windows of ‖P − M_∞‖₂ / bound
    worst_window: tuple[int, int]  # (start, length) of the window attaining it
    t_mix: int  # exact, or (random) the uniform t_mix of the recorded schedule
    xi: float
    windows: int  # distinct window products checked
    length: int  # events recorded


@dataclass(frozen=True, eq=False)
class MixingProtocol:
    """One protocol on n workers: M_∞ plus either a periodic pattern or uniform random events.

    Deterministic: M_t is the event at offset ``t mod period`` of ``pattern`` (the identity if
    none). Random: M_t is drawn uniformly from ``choices``, independently per event."""

    name: str
    n: int
    m_inf: Matrix
    params: dict[str, Any]  # resolved parameters, JSON-ready
    # events per repetition of ``pattern``: m·n for local_steps, whose m is params["period"]
    period: int = 0
    pattern: tuple[tuple[int, Event], ...] = ()
    choices: tuple[Event, ...] = ()
    closed_form: float | None = None  # t_mix by formula (its mean if random)
    derived: dict[str, float] = field(default_factory=dict)  # e.g. |λ₂(W)| of a symmetric W

    @property
    def slots(self) -> int:
        return int(self.m_inf.shape[0])

    @property
    def random(self) -> bool:
        return bool(self.choices)

    @cached_property
    def q(self) -> Matrix:
        """Orthonormal basis of ker(M_∞), from its SVD."""
        _, sv, vt = np.linalg.svd(self.m_inf)
        rank = int(np.sum(sv > 1e-10 * max(1.0, float(sv[0]))))
        return np.ascontiguousarray(vt[rank:].T)

    def events(self) -> list[Event]:
        """Every distinct communication the protocol can perform."""
        return list(self.choices) or [ev for _, ev in self.pattern]

    @cached_property
    def monotone(self) -> bool:
        """Whether every communication is non-expansive on ker(M_∞) (‖M Q‖₂ ≤ 1)."""
        return all(
            isinstance(ev, PairAverage)  # an orthogonal projection
            or at_most(_opnorm(ev.dense(self.slots) @ self.q), 1.0)
            for ev in self.events()
        )

    def assumption1_residual(self) -> float:
        """max ‖M_∞M − M_∞‖, ‖MM_∞ − M_∞‖, ‖M_∞² − M_∞‖ over every communication M."""
        mi = self.m_inf
        worst = float(np.abs(mi @ mi - mi).max())
        for ev in self.events():
            m = ev.dense(self.slots)
            worst = max(worst, float(np.abs(mi @ m - mi).max()), float(np.abs(m @ mi - mi).max()))
        return worst

    def stream(
        self, start: int = 0, rng: np.random.Generator | None = None
    ) -> Iterator[tuple[int, Event]]:
        """(t − start, M_t) for the non-identity events t ≥ start, in order (a random
        schedule is i.i.d., so ``start`` does not matter for it)."""
        if self.random:
            if rng is None:
                raise ValueError(f"{self.name} is random: its schedule needs a Generator")
            t = 0
            while True:
                for k in rng.integers(len(self.choices), size=_BLOCK).tolist():
                    yield t, self.choices[k]
                    t += 1
        for c in count():
            for offset, ev in self.pattern:
                if c * self.period + offset >= start:
                    yield c * self.period + offset - start, ev

    def operator(self, t: int, seed: int = 0) -> Matrix:
        """Dense M_t; a random protocol's schedule is the one fixed by ``seed``."""
        if t < 0:
            raise ConfigError(f"event times start at 0, got {t}")
        if not self.random:
            ev = dict(self.pattern).get(t % self.period)
            return np.eye(self.slots) if ev is None else ev.dense(self.slots)
        _, ev = next(islice(self.stream(0, np.random.default_rng(seed)), t, None))
        return ev.dense(self.slots)

    def _check_mixes(self) -> None:
        p = _advance(self.q, [ev for _, ev in self.pattern])
        rho = float(np.max(np.abs(np.linalg.eigvals(self.q.T @ p)))) if p.size else 0.0
        if not below(rho, 1.0):
            raise ConfigError(
                f"{self.name} never mixes: one period of its operators has spectral radius "
                f"{rho:.6g} on ker(M_∞) (e.g. a disconnected W)"
            )

    def exact_tmix(self, cap: int = MAX_EVENTS) -> int:
        """Assumption 2's t_mix, maximised over every start offset of one period."""
        if self.random:
            raise ConfigError(
                f"{self.name} ({self._describe()}) is random: t_mix is a distribution, not one "
                "number; sample it with --runs R"
            )
        self._check_mixes()
        starts = sorted({(offset + 1) % self.period for offset, _ in self.pattern})
        return max(
            _first_halving(self.q, self.stream(s), self.monotone, cap, self.name) for s in starts
        )

    def sample_tmix(self, runs: int, seed: int = 0, cap: int = MAX_EVENTS) -> TmixDistribution:
        """Per-run first τ with ‖P_{0,τ}Q‖₂ ≤ ½ over ``runs`` independent schedules."""
        if runs < 1:
            raise ConfigError(f"--runs must be ≥ 1, got {runs}")
        if not self.random:  # one schedule only: every run is the same window from t = 0
            self._check_mixes()
            tau = _first_halving(self.q, self.stream(0), self.monotone, cap, self.name)
            return TmixDistribution((tau,) * runs)
        values = tuple(
            _first_halving(
                self.q, self.stream(0, np.random.default_rng(ss)), self.monotone, cap, self.name
            )
            for ss in np.random.SeedSequence(seed).spawn(runs)
        )
        return TmixDistribution(values)

    def lemma1(self, length: int | None = None, seed: int = 0) -> Lemma1Check:
        """Check Lemma 1 on every window of a recorded schedule of ``length`` events.

        Deterministic: t_mix is exact and the default length is one period plus 4·t_mix.
        Random: the schedule drawn from ``seed``, and t_mix is that schedule's uniform one (the
        least t such that every complete window of length t halves ker(M_∞)); the default length
        is 4× the largest of 20 pilot runs."""
        t_mix: int | None = None
        if self.random:
            if length is None:
                length = 4 * self.sample_tmix(20, seed=seed + 1).max
            record = list(islice(self.stream(0, np.random.default_rng(seed)), length))
        else:
            t_mix = self.exact_tmix()
            length = length or self.period + 4 * t_mix
            record = list(takewhile(lambda te: te[0] < length, self.stream(0)))
        return _check_lemma1(self, record, length, t_mix)

    def _describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items()) or "no parameters"


def _check_lemma1(
    proto: MixingProtocol, record: list[tuple[int, Event]], length: int, t_mix: int | None
) -> Lemma1Check:
    # A window's product only depends on the communications inside it, and the bound only
    # shrinks as the window grows, so for each run of communications a..b it is enough to check
    # the longest window holding exactly them: from just after event a−1 to just before b+1.
    times = [t for t, _ in record]
    k_ops, eye = len(record), np.eye(proto.slots)
    starts, lens, devs, restricted = [], [], [], np.full((k_ops + 1, k_ops + 1), np.inf)
    xi = 1.0
    for a in range(k_ops + 1):
        prods, p = [eye], eye
        for _, ev in record[a:]:
            p = ev.apply(p.copy())
            prods.append(p)
        stack = np.stack(prods)
        s = times[a - 1] + 1 if a else 0
        ends = np.array([times[a + j] if a + j < k_ops else length for j in range(len(prods))])
        xi = max(xi, float(np.linalg.norm(stack, 2, axis=(1, 2)).max()))
        starts.append(np.full(len(prods), s))
        lens.append(ends - s)
        devs.append(np.linalg.norm(stack - proto.m_inf, 2, axis=(1, 2)))
        if t_mix is None:  # random: every event communicates, so window (a, j) is exact
            restricted[a, : len(prods)] = np.linalg.norm(stack @ proto.q, 2, axis=(1, 2))
    if t_mix is None:
        for t in range(1, k_ops + 1):
            if all(halves(float(v)) for v in restricted[: k_ops - t + 1, t]):
                t_mix = t
                break
        else:
            raise ConfigError(
                f"{proto.name}: the recorded {length} events never halve ker(M_∞); record more"
            )
    all_starts, all_lens, all_devs = (
        np.concatenate(starts),
        np.concatenate(lens),
        np.concatenate(devs),
    )
    bound = np.exp2(-(all_lens // t_mix).astype(float)) * (1 + xi) * xi
    ratio = all_devs / bound
    worst = int(np.argmax(ratio))
    return Lemma1Check(
        holds=at_most(float(ratio[worst]), 1.0),
        worst_ratio=float(ratio[worst]),
        worst_window=(int(all_starts[worst]), int(all_lens[worst])),
        t_mix=t_mix,
        xi=xi,
        windows=len(ratio),
        length=length,
    )


def _load_weights(source: str | Path | Matrix, n: int) -> Matrix:
    """W from a JSON n×n matrix file (or an array), checked doubly stochastic within 1e-9."""
    if isinstance(source, np.ndarray):
        raw: Any = source
        where = "--weights"
    else:
        where = f"weights file {source}"
        try:
            raw = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    try:
        w = np.array(raw, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected an {n}×{n} matrix of numbers") from None
    if w.shape != (n, n) or not np.all(np.isfinite(w)):
        raise ConfigError(f"{where}: expected a finite {n}×{n} matrix, got shape {w.shape}")
    rows, cols = np.abs(w.sum(axis=1) - 1).max(), np.abs(w.sum(axis=0) - 1).max()
    if w.min() < -1e-9 or rows > 1e-9 or cols > 1e-9:
        raise ConfigError(
            f"{where}: W is not doubly stochastic (min entry {w.min():.3g}, row sums off by "
            f"{rows:.3g}, column sums off by {cols:.3g}; tolerance 1e-9)"
        )
    return w


def _rounds_to_halve(rate: float) -> int:
    """The least k ≥ 1 with halves(rate^k): applications of a contraction by ``rate`` ≥ 0.

    That is ⌈ln 2 / −ln rate⌉, except at a tie, where the float ratio is k ± a few ulps and its
    ceiling may be k + 1 (rate = 2^{−1/k}); deciding with :func:`halves`, as the exact scan
    does, makes the closed form agree with it there."""
    if rate <= 0:
        return 1
    k = max(1, math.ceil(math.log(2) / -math.log(rate)))
    while k > 1 and halves(rate ** (k - 1)):
        k -= 1
    while not halves(rate**k):
        k += 1
    return k


def build_protocol(
    name: str,
    n: int,
    *,
    period: int | None = None,
    gamma: float | None = None,
    weights: str | Path | Matrix | None = None,
    topology: str | None = None,
    scheduling: str | None = None,
    seed: int | None = None,
) -> MixingProtocol:
    """The protocol ``name`` on ``n`` workers; a parameter that does not apply is an error."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}: {', '.join(PROTOCOLS)}")
    given = {
        "period": period,
        "gamma": gamma,
        "weights": weights,
        "topology": topology,
        "scheduling": scheduling,
    }
    for key, value in given.items():
        if value is not None and key not in PROTOCOLS[name][0]:
            takes = ", ".join(sorted(PROTOCOLS[name][0] - {"seed"})) or "no parameters"
            raise ConfigError(f"{key} does not apply to {name} (it takes {takes})")
    if not 2 <= n <= _MAX_N:
        raise ConfigError(f"n must be between 2 and {_MAX_N} workers, got {n}")
    return _BUILDERS[name](n, given, seed)


_Given = dict[str, Any]


def _allreduce(n: int, given: _Given, seed: int | None) -> MixingProtocol:
    jmat = np.full((n, n), 1.0 / n)
    return MixingProtocol("allreduce", n, jmat, {}, n, ((n - 1, Dense(jmat)),), closed_form=n)


def _periodic(name: str) -> Callable[[int, _Given, int | None], MixingProtocol]:
    """Local steps and reduced frequency: J every m·n events, m the algorithm's own period
    (:mod:`peerlearn.algorithms.registry`) unless given."""

    def build(n: int, given: _Given, seed: int | None) -> MixingProtocol:
        jmat = np.full((n, n), 1.0 / n)
        m = lookup(name).period if given["period"] is None else given["period"]
        if m < 1:
            raise ConfigError(f"--period must be ≥ 1, got {m}")
        pattern = ((m * n - 1, Dense(jmat)),)
        return MixingProtocol(name, n, jmat, {"period": m}, m * n, pattern, closed_form=m * n)

    return build


def _slack(n: int, given: _Given, seed: int | None) -> MixingProtocol:
    jmat = np.full((n, n), 1.0 / n)
    g = SLACK_GAMMA if given["gamma"] is None else given["gamma"]
    if not 0 < g <= 1:
        raise ConfigError(f"--gamma must satisfy 0 < γ ≤ 1, got {g}")
    op = Dense((1 - g) * np.eye(n) + g * jmat)
    form = n * _rounds_to_halve(1 - g)
    return MixingProtocol("slack", n, jmat, {"gamma": g}, n, ((n - 1, op),), closed_form=form)


def _async_gossip(n: int, given: _Given, seed: int | None) -> MixingProtocol:
    jmat = np.full((n, n), 1.0 / n)
    topo = make_topology(given["topology"] or "ring", n, seed or 0)
    choices = tuple(PairAverage(i, j) for i, j in topo.edges())
    return MixingProtocol("async_gossip", n, jmat, _topo_params(topo.name, seed), choices=choices)


def _topo_params(topology: str, seed: int | None) -> dict[str, Any]:
    """The topology, plus the seed when the seed decides the graph (random-regular)."""
    if topology.startswith("random-regular"):
        return {"topology": topology, "seed": seed or 0}
    return {"topology": topology}


def _async_ps(n: int, given: _Given, seed: int | None) -> MixingProtocol:
    scheduling = given["scheduling"] or SCHEDULINGS[0]
    m_inf = np.zeros((n + 1, n + 1))
    m_inf[:, 0] = 1.0  # slot 0 is the server s; M_∞ copies it into every cache c_i
    pulls = tuple(Copy(i + 1, 0) for i in range(n))  # the push is the update Δ, not an operator
    params = {"scheduling": scheduling}
    if scheduling == "round_robin":
        pattern: tuple[tuple[int, Event], ...] = tuple(enumerate(pulls))
        return MixingProtocol("async_ps", n, m_inf, params, n, pattern, closed_form=n)
    if scheduling == "random":  # coupon collector: mean n·H_n
        form = n * sum(1.0 / k for k in range(1, n + 1))
        return MixingProtocol("async_ps", n, m_inf, params, choices=pulls, closed_form=form)
    raise ConfigError(f"unknown scheduling {scheduling!r}: {' or '.join(SCHEDULINGS)}")


def _sync_gossip(n: int, given: _Given, seed: int | None) -> MixingProtocol:
    weights: str | Path | Matrix | None = given["weights"]
    topology: str | None = given["topology"]
    params: dict[str, Any]
    if weights is None or (isinstance(weights, str) and weights == "metropolis"):
        topo = make_topology(topology or "ring", n, seed or 0)
        w, params = (
            topo.metropolis(),
            {"weights": "metropolis", **_topo_params(topo.name, seed or 0)},
        )
    elif topology is not None:
        raise ConfigError("sync_gossip: give --weights FILE or --topology, not both")
    else:
        w = _load_weights(weights, n)
        params = {"weights": "array" if isinstance(weights, np.ndarray) else str(weights)}
    jmat = np.full((n, n), 1.0 / n)
    form: int | None = None
    derived: dict[str, float] = {}
    if np.allclose(w, w.T, atol=1e-12):  # the ⌈ln 2/−ln|λ₂|⌉ rule holds for symmetric W only
        q = np.linalg.svd(jmat)[2][1:].T
        lam2 = float(np.max(np.abs(np.linalg.eigvalsh(q.T @ w @ q))))
        derived["lambda2"] = lam2
        form = n * _rounds_to_halve(lam2) if below(lam2, 1.0) else None
    pattern = ((n - 1, Dense(w)),)
    return MixingProtocol(
        "sync_gossip", n, jmat, params, n, pattern, closed_form=form, derived=derived
    )


#: how each protocol's operators are built: a table, so adding a protocol is one entry here
#: and one in :data:`PROTOCOLS`
_BUILDERS: dict[str, Callable[[int, _Given, int | None], MixingProtocol]] = {
    "allreduce": _allreduce,
    "local_steps": _periodic("local_steps"),
    "reduced_frequency": _periodic("reduced_frequency"),
    "slack": _slack,
    "sync_gossip": _sync_gossip,
    "async_gossip": _async_gossip,
    "async_ps": _async_ps,
}


def event_operator(protocol: str, n: int, t: int, *, seed: int = 0, **params: Any) -> Matrix:
    """Dense M_t of ``protocol``; for a random protocol, of the schedule drawn from ``seed``."""
    return build_protocol(protocol, n, seed=seed, **params).operator(t, seed)


def exact_tmix(protocol: str, n: int, **params: Any) -> int:
    """Exact t_mix of a deterministic protocol (random ones: ConfigError, use sample_tmix)."""
    return build_protocol(protocol, n, **params).exact_tmix()


def sample_tmix(protocol: str, n: int, runs: int, seed: int = 0, **params: Any) -> TmixDistribution:
    """Distribution of per-run t_mix (window from t = 0) over ``runs`` seeded schedules."""
    return build_protocol(protocol, n, seed=seed, **params).sample_tmix(runs, seed)


def lemma1_holds(
    protocol: str, n: int, *, length: int | None = None, seed: int = 0, **params: Any
) -> Lemma1Check:
    """Lemma 1 on every window of a recorded schedule (see :meth:`MixingProtocol.lemma1`)."""
    return build_protocol(protocol, n, seed=seed, **params).lemma1(length, seed)
