"""Lu–Nash–De Sa (MixML): AllReduce, local steps, reduced frequency, the slack matrix, and
synchronous and asynchronous gossip (D-PSGD and AD-PSGD). MixML's asynchronous parameter
server is MDOWNPOUR without momentum: its record is with the elastic family.

Every protocol averages with a mixing matrix; ``peerlearn mixing`` computes its mixing time
(:mod:`peerlearn.analysis.mixing`), which reads the default period from these records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from peerlearn.algorithms.mixml import async_gossip, averaging, sync_gossip
from peerlearn.algorithms.records._common import start_point, step_size
from peerlearn.algorithms.spec import AlgorithmSpec, RejoinState, Resumer
from peerlearn.effects import Program, Vector
from peerlearn.streams import Purpose, stream

if TYPE_CHECKING:
    from peerlearn.config import RunConfig
    from peerlearn.problems import Problem

__all__ = ["RECORDS"]

_Programs = Callable[["RunConfig", "Problem | None", Sequence[int]], list[Program]]


def _averaging(slack: bool) -> _Programs:
    def programs(cfg: RunConfig, problem: Problem | None, pids: Sequence[int]) -> list[Program]:
        x1, eta, n = start_point(problem), cfg.schedule()(1), cfg.processes
        gamma = cfg.mix.gamma if slack else 1.0
        return [averaging(x1, cfg.steps, eta, n, cfg.mix_period, gamma) for _ in pids]

    return programs


def _averaging_resume(slack: bool) -> Resumer:
    def resume(
        cfg: RunConfig, problem: Problem | None, pids: Sequence[int], state: RejoinState
    ) -> list[Program]:
        eta, n = cfg.schedule()(1), cfg.processes
        gamma = cfg.mix.gamma if slack else 1.0
        return [
            averaging(_model(state), cfg.steps, eta, n, cfg.mix_period, gamma, start=state.step)
            for _ in pids
        ]

    return resume


def _model(state: RejoinState) -> Vector:
    """The state's model, read-only (the resumed programs may share it)."""
    x = state.model.copy()
    x.flags.writeable = False
    return x


def _sync_gossip_resume(
    cfg: RunConfig, problem: Problem | None, pids: Sequence[int], state: RejoinState
) -> list[Program]:
    eta, graph = cfg.schedule()(1), cfg.graph
    out: list[Program] = []
    for p in pids:
        row = graph.metropolis_row(p)
        out.append(sync_gossip(_model(state), cfg.steps, eta, p, row, start=state.step))
    return out


def _sync_gossip(cfg: RunConfig, problem: Problem | None, pids: Sequence[int]) -> list[Program]:
    x1, eta, graph = start_point(problem), cfg.schedule()(1), cfg.graph
    return [sync_gossip(x1, cfg.steps, eta, p, graph.metropolis_row(p)) for p in pids]


def _async_gossip(cfg: RunConfig, problem: Problem | None, pids: Sequence[int]) -> list[Program]:
    x1, eta, m = start_point(problem), cfg.schedule()(1), cfg.membership
    return [
        async_gossip(
            x1,
            cfg.steps,
            eta,
            p,
            cfg.graph.neighbours[p],
            stream(cfg.seed, Purpose.GOSSIP, m.cluster_of[p], m.index(p)),
        )
        for p in pids
    ]


def _async_gossip_resume(
    cfg: RunConfig, problem: Problem | None, pids: Sequence[int], state: RejoinState
) -> list[Program]:
    """Processes that restarted resume at ``state.step`` from a live peer's model and tell
    their neighbours, which give up the exchanges the last incarnation took with it."""
    eta, m = cfg.schedule()(1), cfg.membership
    out: list[Program] = []
    for p in pids:
        x = state.model.copy()
        x.flags.writeable = False
        rng = stream(cfg.seed, Purpose.GOSSIP, m.cluster_of[p], m.index(p), state.step)
        out.append(
            async_gossip(
                x,
                cfg.steps,
                eta,
                p,
                cfg.graph.neighbours[p],
                rng,
                start=state.step,
                incarnation=state.incarnation,
            )
        )
    return out


def _period(cfg: RunConfig) -> list[str]:
    return [*step_size(cfg), f"m={cfg.mix_period}"]


def _topology(cfg: RunConfig) -> list[str]:
    return [*step_size(cfg), f"topology {cfg.graph.name}"]


#: the averaging protocols round the models they exchange
_AVERAGED = frozenset({"avg"})

RECORDS = (
    AlgorithmSpec(
        name="allreduce",
        paper="MixML AllReduce",
        exchanges="models after a step, to everyone; exact average",
        waits_for="all n",
        tolerates="no crashes",
        parameters="—",
        programs=_averaging(slack=False),
        resume=_averaging_resume(slack=False),
        lockstep=True,
        compressible=_AVERAGED,
        describe=step_size,
    ),
    AlgorithmSpec(
        name="local_steps",
        paper="MixML local steps",
        exchanges="the average every m steps",
        waits_for="all n",
        tolerates="no crashes",
        parameters="`[mix] period` m (2)",
        programs=_averaging(slack=False),
        resume=_averaging_resume(slack=False),
        lockstep=True,
        compressible=_AVERAGED,
        settings=frozenset({"mix.period"}),
        period=2,
        describe=_period,
    ),
    AlgorithmSpec(
        name="reduced_frequency",
        paper="MixML reduced frequency",
        exchanges="the same operator, rarer (t_mix = m·n)",
        waits_for="all n",
        tolerates="no crashes",
        parameters="m (10)",
        programs=_averaging(slack=False),
        resume=_averaging_resume(slack=False),
        lockstep=True,
        compressible=_AVERAGED,
        settings=frozenset({"mix.period"}),
        period=10,
        describe=_period,
    ),
    AlgorithmSpec(
        name="slack",
        paper="MixML slack matrix",
        exchanges="every step x ← (1 − γ)x + γx̄",
        waits_for="all n",
        tolerates="no crashes",
        parameters="`[mix] gamma` γ",
        programs=_averaging(slack=True),
        resume=_averaging_resume(slack=True),
        lockstep=True,
        compressible=_AVERAGED,
        settings=frozenset({"mix.gamma"}),
        describe=lambda cfg: [*step_size(cfg), f"γ={cfg.mix.gamma:g}"],
    ),
    AlgorithmSpec(
        name="sync_gossip",
        paper="MixML sync ring / D-PSGD",
        exchanges="models to the neighbours; Metropolis weights W (⅓ on a ring)",
        waits_for="every neighbour",
        tolerates="no crashes",
        parameters="`topology` (ring)",
        programs=_sync_gossip,
        resume=_sync_gossip_resume,
        lockstep=True,
        compressible=frozenset({"gossip"}),
        settings=frozenset({"topology"}),
        topology="ring",
        describe=_topology,
    ),
    AlgorithmSpec(
        name="async_gossip",
        paper="MixML async ring / AD-PSGD",
        exchanges="pairwise average with one random neighbour per step",
        waits_for="that neighbour's answer (serving others meanwhile)",
        tolerates="no crashes",
        parameters="`topology` (ring)",
        programs=_async_gossip,
        resume=_async_gossip_resume,
        settings=frozenset({"topology"}),
        # a request and its answer; a neutral answer returns the request's value as it came
        compressible=frozenset({"pair", "paired"}),
        topology="ring",
        describe=_topology,
    ),
)
