"""What one algorithm is, in one record: :class:`AlgorithmSpec`.

A record holds everything the rest of peerlearn needs to know about an algorithm — how to build
its programs, which settings it reads, what it checks before a run and which theorems'
conditions it warns about, what it exchanges and whom it waits for (the README's table is
tested against these records), whether it has a center or a topology — so that config, runs,
the CLI, the daemon, the demo and the simulator look the record up instead of branching on the
algorithm's name. The records themselves live in :mod:`peerlearn.algorithms.records`, one
module per paper; :mod:`peerlearn.algorithms.registry` collects them.

Three fields say what an algorithm needs of the system around it: ``delivery`` (what happens to
its messages for a peer that is away), ``resume`` (its resume-from-state entry point: the
programs of a process that rejoins, or None if it cannot) and ``compressible`` (the tag kinds
of its messages whose values it rounds when the run compresses payloads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from peerlearn.effects import Program, Vector

if TYPE_CHECKING:
    from peerlearn.config import RunConfig
    from peerlearn.problems import Problem
    from peerlearn.problems.base import Constants

__all__ = [
    "OPTIONAL_SETTINGS",
    "AlgorithmSpec",
    "DeliveryPolicy",
    "Ledger",
    "RejoinState",
    "Resumer",
    "every_step",
    "no_check",
    "no_warnings",
]


class DeliveryPolicy(StrEnum):
    """What the algorithm needs of the transport when a peer is away (silent or unreachable
    longer than ``peer_timeout``)."""

    #: frames for it are dropped and counted (``peer_away``): a quorum of N ≤ n − f goes on
    #: without them (Attiya–Schiller); the away daemon, when back, has missed them
    DROP_WHEN_AWAY = "drop_when_away"
    #: frames for it are kept (a link's window: ``queue_size`` frames, at most ``queue_bytes``)
    #: and resent when it is back; a producer finding the window full waits, and /status names
    #: the peer it waits on — a lost gradient, request or model would block these for good
    KEEP = "keep"


@dataclass(frozen=True)
class Ledger:
    """What one worker of a centered algorithm holds of its exchanges with the center: the
    iteration of the last request the center answered (0: none), the iteration of a request
    it waits the answer of (None: none), and the sum of the center's elastic differences it
    applied — a restarted center is rebuilt from these (x̃ = x̃_1 + Σ_i D_i), and a restarted
    worker takes the center's record of its own."""

    answered: int
    waiting: int | None
    total: Vector


@dataclass(frozen=True)
class RejoinState:
    """The state a process resumes from — data, not a program (generators cannot be copied):
    the iteration it starts at, the model it starts with (a live peer's) and what else of that
    peer's state the algorithm needs, as integers (DASGD: the version vector of the model; a
    center: the last iteration answered per worker) and, for centered algorithms, the workers'
    ledgers by pid."""

    step: int
    model: Vector
    extra: tuple[int, ...] = ()
    ledgers: Mapping[int, Ledger] = field(default_factory=dict)
    #: grows with every restart of the resuming process (a daemon's boot time in ns; the
    #: simulator's count of the process's restarts): tells its incarnations apart
    incarnation: int = 1
    #: the model, iteration and ledger are the process's own, a checkpoint's (the elastic
    #: family: a worker resumes from them, not from the center's model and record)
    own: bool = False


#: the resume-from-state entry point: (config, problem or None, pids, state) → programs that
#: start at ``state.step`` from ``state.model``
Resumer = Callable[["RunConfig", "Problem | None", Sequence[int], RejoinState], list[Program]]


#: settings that mean something to some algorithms only: each record lists the ones it reads
#: in ``settings``, and a config that changes one its algorithm ignores gets a warning
#: (:meth:`peerlearn.config.RunConfig.unused_settings`)
OPTIONAL_SETTINGS = (
    "topology",
    "elastic.center",
    "elastic.alpha",
    "elastic.beta",
    "elastic.tau",
    "elastic.delta",
    "mix.period",
    "mix.gamma",
    "quorum",
    "maa.aggregator",
    "maa.q",
    "maa.rounds",
    "maa.inner_rounds",
)


def no_check(cfg: RunConfig) -> None:
    """Nothing beyond the generic validation."""


def no_warnings(cfg: RunConfig, constants: Constants) -> list[str]:
    """No theorem whose conditions a run could break."""
    return []


def every_step(cfg: RunConfig) -> int:
    """Every process makes every iteration: n·T."""
    return cfg.processes * (cfg.steps or 0)


@dataclass(frozen=True, kw_only=True)
class AlgorithmSpec:
    """One algorithm. The text fields are the README's algorithm table, row by row."""

    name: str
    #: the README columns: the paper and algorithm, what is exchanged, whom a process waits
    #: for (its quorum), which failures it survives, the settings it takes
    paper: str
    exchanges: str
    waits_for: str
    tolerates: str
    parameters: str
    #: the programs of processes ``pids``: (config, problem or None, pids) → programs
    programs: Callable[[RunConfig, Problem | None, Sequence[int]], list[Program]]
    #: the entries of :data:`OPTIONAL_SETTINGS` it reads
    settings: frozenset[str] = frozenset()
    #: False for standalone agreement: no problem, no gradient, no step size
    needs_problem: bool = True
    #: analysed with a fixed η only (``lr.schedule = constant``)
    fixed_eta: bool = True
    #: the default communication graph; None: it talks to everyone or to a center
    topology: str | None = None
    #: one process (``elastic.center``) serves the others
    center: bool = False
    #: a restarted center is rebuilt from its workers' ledgers (the elastic variants); if not,
    #: only its workers can restart
    center_rebuilt: bool = False
    #: the default period m: local steps between averagings
    period: int = 1
    #: runs multidimensional approximate agreement (the ``[maa]`` settings and round counts)
    agreement: bool = False
    #: its messages carry the workers' models; if not, daemons send model snapshots so that
    #: the consensus distance across daemons can still be measured
    sends_models: bool = True
    #: reports DASGD's staleness (Def. 2): the runtimes keep its apply logs
    staleness: bool = False
    #: the theorems it warns about, each with its whole condition as the paper states it
    conditions: Mapping[str, str] = field(default_factory=dict)
    #: raises ValueError when a config cannot run this algorithm (beyond the generic checks)
    check: Callable[[RunConfig], None] = no_check
    #: the conditions of ``conditions`` a config breaks, one sentence per result
    warnings: Callable[[RunConfig, Constants], list[str]] = no_warnings
    #: its parameters in a one-line description of a run ("η=0.05", "topology ring", …)
    describe: Callable[[RunConfig], list[str]] = lambda cfg: []
    #: iterations (model reports past the first) all processes make in a finite run
    planned_iterations: Callable[[RunConfig], int] = every_step
    #: the agreement target q when the config gives none (agreement algorithms)
    default_q: float | Callable[[RunConfig], float] = 0.25
    #: the demo's step relative to a plain SGD step (momentum on the center multiplies the
    #: effective step by 1/(1 − δ))
    demo_step: float = 1.0
    delivery: DeliveryPolicy = DeliveryPolicy.KEEP
    #: its resume-from-state entry point; None: a process that fell behind or restarted cannot
    #: take a peer's state and goes on from where it is
    resume: Resumer | None = None
    #: after a whole-cluster restart (every daemon resumed from its checkpoint at once), every
    #: process takes one process's checkpointed state, because a model and its ``extra`` agree
    #: only with each other (DASGD: x and its version vector); this maps that ``extra`` to what
    #: still holds once every process restarted from it. None: each process resumes from its
    #: own checkpointed model (peerlearn/daemon/restore.py)
    cluster_restart: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None
    #: a resumed process whose workers then wait on their inboxes for the request timeout takes
    #: a peer's state again (DASGD: the peers that could answer may have ended meanwhile, and a
    #: final state says so); elsewhere a wait is only a wait
    rejoin_when_stalled: bool = False
    #: its processes move in lockstep (everyone, or every neighbour, waits for everyone's value
    #: of each averaging iteration): a restarted process resumes at the iteration the slowest
    #: peer is at, from that peer's model, and its peers send it their frames of the last two
    #: iterations again (the ones its last incarnation took with it)
    lockstep: bool = False
    #: the tag kinds of its messages whose values its programs round (``Quantize``) when the run
    #: compresses payloads, and which the wire then packs: models, gradients, elastic
    #: differences; never agreement values (MAA's validity and contraction are stated for exact
    #: values). Empty: it cannot run compressed.
    compressible: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = self.settings - set(OPTIONAL_SETTINGS)
        if unknown:
            raise ValueError(f"{self.name}: unknown settings {sorted(unknown)}")

    def reads(self, setting: str) -> bool:
        return setting in self.settings

    def agreement_q(self, cfg: RunConfig) -> float:
        return self.default_q(cfg) if callable(self.default_q) else self.default_q
