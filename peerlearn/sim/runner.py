"""Build a simulated run from a :class:`~peerlearn.config.RunConfig` and run it.

Problem, programs and random streams come from :mod:`peerlearn.runs`, shared with the other
runtimes; this module adds what only the simulator has: the schedule's distributions, link
factors, stragglers, partitions, metric samples and the agreement trace.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peerlearn.algorithms import diam2
from peerlearn.algorithms.spec import Ledger, RejoinState
from peerlearn.config import Distribution, RunConfig
from peerlearn.effects import Msg, Program, Report, Tag, Vector, quiet_float_errors
from peerlearn.errors import ConfigError
from peerlearn.problems import Problem
from peerlearn.runs import (
    Purpose,
    build_problem,
    grad_stream,
    make_programs,
    planned_iterations,
    stream,
)
from peerlearn.sim.core import (
    LinkFactors,
    Outcome,
    Partition,
    Proc,
    Restart,
    Resumer,
    Simulator,
    Status,
)

__all__ = [
    "ProcessResult",
    "SimResult",
    "consensus_distance",
    "run_simulation",
]


@dataclass(frozen=True)
class ProcessResult:
    pid: int
    name: str
    cluster: int
    crashed: bool
    steps_done: int
    x: Vector | None  # a diverged process's last finite model
    loss: float | None
    output: Any
    diverged: bool = False  # stopped by a non-finite gradient or model (not ``crashed``)
    restarts: tuple[Restart, ...] = ()  # its restarts, in order
    #: what compression's error feedback still owes its streams, summed (None: nothing owed)
    owed: Vector | None = None

    @property
    def resumed_at(self) -> tuple[int, ...]:
        """The iterations it resumed at after its restarts."""
        return tuple(r.resumed_at for r in self.restarts if r.resumed_at is not None)


@dataclass
class SimResult:
    config: RunConfig
    outcome: Outcome
    processes: list[ProcessResult]
    problem: Problem | None
    #: metric samples: (time, pid, step, loss, consensus distance)
    samples: list[tuple[float, int, int, float | None, float]] = field(default_factory=list)
    #: agreement trace: (instance, round, inner_round | None, pid, value)
    trace: list[tuple[int, int, int | None, int, Vector]] = field(default_factory=list)
    #: who each process heard from: (kind, tag) -> {pid: frozenset of senders/writers}
    receive_sets: dict[tuple[str, Tag], dict[int, frozenset[int]]] = field(default_factory=dict)
    #: the reports asked for with ``record_reports``, in the order they were made: (pid, report)
    reports: list[tuple[int, Report]] = field(default_factory=list)
    #: DASGD: the tight staleness |S| of every local step, per process (Def. 1)
    staleness: dict[int, list[int]] = field(default_factory=dict)
    failure_traceback: str | None = None

    @property
    def status(self) -> Status:
        return self.outcome.status

    def live(self) -> list[ProcessResult]:
        """The processes that neither crashed nor diverged."""
        return [p for p in self.processes if not p.crashed and not p.diverged]

    @property
    def final_loss(self) -> float | None:
        losses = [p.loss for p in self.live() if p.loss is not None]
        with quiet_float_errors():  # huge losses of a run near divergence: inf, not a warning
            return float(np.mean(losses)) if losses else None

    @property
    def stationary_distance(self) -> float:
        """MixML's stationary (consensus) distance (1/n) Σ ‖x_i − x̄‖² over live processes."""
        return consensus_distance([p.x for p in self.live() if p.x is not None])

    @property
    def max_pairwise_distance(self) -> float:
        """max over live processes i, j of ‖x_i − x_j‖² (internal convergence)."""
        with quiet_float_errors():
            return diam2([p.x for p in self.live() if p.x is not None])


def consensus_distance(xs: list[Vector]) -> float:
    """(1/n) Σ ‖x_i − x̄‖² (inf when huge models overflow it; never a RuntimeWarning)."""
    if len(xs) < 2:
        return 0.0
    stacked = np.stack(xs)
    with quiet_float_errors():
        return float(((stacked - stacked.mean(axis=0)) ** 2).sum(axis=1).mean())


def _vector_sampler(dist: Distribution, rng: np.random.Generator) -> Callable[[int], Vector]:
    mean, spread = dist.mean, dist.spread
    match dist.dist:
        case "constant":
            return lambda n: np.full(n, mean)
        case "exponential":
            return lambda n: rng.exponential(mean, n)
        case "uniform":
            return lambda n: rng.uniform(mean - spread, mean + spread, n)
        case "lognormal":
            mu = np.log(mean) - spread**2 / 2 if mean > 0 else -np.inf
            return lambda n: rng.lognormal(mu, spread, n) if mean > 0 else np.zeros(n)
    raise AssertionError(dist.dist)


def _scalar_sampler(dist: Distribution, rng: np.random.Generator) -> Callable[[], float]:
    mean, spread = dist.mean, dist.spread
    match dist.dist:
        case "constant":
            return lambda: mean
        case "exponential":
            return lambda: float(rng.exponential(mean))
        case "uniform":
            return lambda: float(rng.uniform(mean - spread, mean + spread))
        case "lognormal":
            mu = float(np.log(mean) - spread**2 / 2) if mean > 0 else 0.0
            return lambda: float(rng.lognormal(mu, spread)) if mean > 0 else 0.0
    raise AssertionError(dist.dist)


def run_simulation(
    cfg: RunConfig,
    *,
    record_receives: bool = False,
    record_reports: Collection[str] = (),
    report_pids: Collection[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimResult:
    """Run ``cfg`` in the simulator. ``progress(done, total)`` is called now and then with the
    number of iterations completed over all processes and the total planned.
    ``record_reports``: names of reports to keep in :attr:`SimResult.reports`, of the
    processes ``report_pids`` only if given (a run of 10⁴ workers need not keep them all)."""
    if cfg.steps is None:
        raise ConfigError("the simulator needs a finite number of steps (--steps)")
    problem = build_problem(cfg)
    members = cfg.membership
    n = cfg.processes
    sched = stream(cfg.seed, Purpose.SCHEDULE)
    grad_rngs = [grad_stream(cfg, p) for p in range(n)]
    sim_cfg = cfg.sim
    spread = sim_cfg.link_spread
    link = LinkFactors(sched, n, spread) if spread > 0 else None
    scale = [1.0] * n
    for p in sched.permutation(n)[: sim_cfg.stragglers]:
        scale[int(p)] = sim_cfg.slowdown
    partitions = []
    for part in sim_cfg.partitions:
        group_of = [-1] * cfg.clusters
        for g, clusters in enumerate(part.groups):
            for c in clusters:
                group_of[c] = g
        partitions.append(Partition(tuple(group_of), part.start, part.end))

    samples: list[tuple[float, int, int, float | None, float]] = []
    trace: list[tuple[int, int, int | None, int, Vector]] = []
    receive_sets: dict[tuple[str, Tag], dict[int, frozenset[int]]] = {}
    losses: dict[tuple[int, int], float] = {}

    def loss_of(proc: Proc) -> float | None:
        if problem is None or proc.x is None:
            return None
        key = (proc.pid, proc.step)
        if key not in losses:
            if len(losses) > 4 * n:  # bounded: only current steps are ever asked again
                losses.clear()
            losses[key] = problem.loss(proc.x)
        return losses[key]

    grad_fn: Callable[[int, Vector], Vector]
    if problem is not None:
        oracles = [problem.oracle(pid, n, 1) for pid in range(n)]  # one computes at a time

        def grad_fn(pid: int, x: Vector) -> Vector:
            return oracles[pid](x, grad_rngs[pid])
    else:

        def grad_fn(pid: int, x: Vector) -> Vector:
            raise AssertionError("standalone agreement computes no gradient")

    sim: Simulator

    def on_sample(time: float) -> None:
        live = [p for p in sim.procs if not p.crashed and p.x is not None]
        cd = consensus_distance([p.x for p in live if p.x is not None])
        for p in live:
            samples.append((time, p.pid, p.step, loss_of(p), cd))

    reports: list[tuple[int, Report]] = []
    staleness: dict[int, list[int]] = {}
    keep = frozenset(record_reports)
    keep_pids = frozenset(report_pids) if report_pids is not None else None

    def on_report(proc: Proc, rep: Report) -> None:
        if rep.name == "agreement" and cfg.trace:
            instance, rnd, inner = rep.key
            trace.append((instance, rnd, inner, proc.pid, rep.value))
        elif rep.name == "staleness":
            staleness.setdefault(proc.pid, []).append(rep.value)
        if rep.name in keep and (keep_pids is None or proc.pid in keep_pids):
            reports.append((proc.pid, rep))

    def on_receive(proc: Proc, kind: str, tag: Tag, msgs: tuple[Msg, ...]) -> None:
        receive_sets.setdefault((kind, tag), {})[proc.pid] = frozenset(m.sender for m in msgs)

    resume: Resumer | None = None
    # A lockstep algorithm's restarted process needs its peers' frames of the iterations it
    # resumes at again: daemons' links replay them, the simulator's restart fault does not.
    resume_programs = None if cfg.spec.lockstep else cfg.spec.resume
    if resume_programs is not None:
        resumer = resume_programs
        restarts: dict[int, int] = {}

        def resume(
            pid: int, step: int, model: Vector, key: Tag, ledgers: Mapping[int, Ledger]
        ) -> Program:
            # A model's report key is the rest of its state, integers (DASGD's version vector)
            extra = tuple(k for k in key if isinstance(k, int))
            restarts[pid] = restarts.get(pid, 0) + 1
            state = RejoinState(step, model, extra, ledgers, incarnation=restarts[pid])
            return resumer(cfg, problem, [pid], state)[0]

    sim = Simulator(
        members,
        make_programs(cfg, problem, range(n)),
        grad_fn,
        sched,
        delay_remote=_vector_sampler(sim_cfg.delay_remote, sched),
        delay_local=_vector_sampler(sim_cfg.delay_local, sched),
        compute=_scalar_sampler(sim_cfg.compute, sched),
        read=_scalar_sampler(sim_cfg.read, sched),
        link_factor=link,
        compute_scale=scale,
        partitions=partitions,
        sample_every=sim_cfg.sample_every,
        on_sample=on_sample,
        on_report=on_report if cfg.trace or keep or cfg.spec.staleness else None,
        on_receive=on_receive if record_receives else None,
        resume=resume,
        center=cfg.center if cfg.spec.center else None,
        compression=cfg.compressor,
    )
    for spec in cfg.crash_specs:
        for pid in spec.pids:
            if spec.mode == "restart":
                if spec.at_step is not None:
                    sim.restart_at_step(pid, spec.at_step)
                else:
                    assert spec.at_time is not None
                    sim.restart_at_time(pid, spec.at_time)
            elif spec.at_step is not None:
                sim.crash_at_step(pid, spec.at_step, spec.mode == "mid-broadcast")
            else:
                assert spec.at_time is not None
                sim.crash_at_time(pid, spec.at_time)
    total = planned_iterations(cfg)
    outcome = sim.run(
        progress=(lambda s: progress(s.steps_total, total)) if progress is not None else None
    )
    if progress is not None:
        progress(sim.steps_total, total)
    with quiet_float_errors():  # the final losses
        processes = [
            ProcessResult(
                pid=p.pid,
                name=members.name(p.pid),
                cluster=p.cluster,
                crashed=p.crashed and p.diverged is None,
                steps_done=max(p.step - 1, 0),
                x=p.x,
                loss=loss_of(p),
                output=p.output,
                diverged=p.diverged is not None,
                restarts=tuple(r for r in outcome.restarts if r.pid == p.pid),
                owed=p.compressor.owed_total(),
            )
            for p in sim.procs
        ]
    return SimResult(
        config=cfg,
        outcome=outcome,
        processes=processes,
        problem=problem,
        samples=samples,
        trace=trace,
        receive_sets=receive_sets,
        reports=reports,
        staleness=staleness,
        failure_traceback=sim.failure_traceback,
    )
