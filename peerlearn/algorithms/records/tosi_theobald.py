"""Tosi–Theobald DASGD: apply received gradients first, over any connected topology.

The theory warning quotes DASGD's Thm 1 (its step-size conditions, eq. 11 and eq. 12); the
staleness it is stated in is measured by the runtimes (:mod:`peerlearn.algorithms.staleness`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from peerlearn.algorithms.dasgd import dasgd
from peerlearn.algorithms.records._common import first_eta, sentence, start_point, step_size
from peerlearn.algorithms.spec import AlgorithmSpec, RejoinState
from peerlearn.effects import Program
from peerlearn.ties import at_most
from peerlearn.wire.messages import MAX_TAG_LEN

if TYPE_CHECKING:
    from peerlearn.config import RunConfig
    from peerlearn.problems import Problem
    from peerlearn.problems.base import Constants

__all__ = ["RECORDS"]

CONDITIONS = {
    "DASGD's Thm 1": (
        "L ≥ 1 and η ≤ 1/(4·L·S_avg) (eq. 11) or η ≤ 1/(4·L·√(Ŝ_avg·Ŝ_max)) (eq. 12)"
    ),
}


def _programs(cfg: RunConfig, problem: Problem | None, pids: Sequence[int]) -> list[Program]:
    x1 = start_point(problem)
    eta = cfg.schedule()(1)  # fixed η (validated)
    return [dasgd(p, x1, eta, cfg.steps, cfg.graph.neighbours) for p in pids]


def _resume(
    cfg: RunConfig, problem: Problem | None, pids: Sequence[int], state: RejoinState
) -> list[Program]:
    """From a live node's model and the state it was reported with (its version vector, the
    DONE counts and the nodes complete it knows). On the complete graph only: elsewhere a node
    also relays, and what a dead relay had still to pass on is not repaired yet."""
    graph = cfg.graph.neighbours
    if any(len(adjacent) != len(graph) - 1 for adjacent in graph):
        raise ValueError(
            f"DASGD resumes from a peer's state on the complete graph only, not on "
            f"{cfg.graph.name}: a restarted relay's undelivered gradients are not repaired"
        )
    n, extra = len(graph), state.extra
    applied, finals, complete = extra[:n], extra[n : 2 * n], extra[2 * n :]
    if (
        len(extra) != 3 * n
        or min(applied, default=0) < 0
        or min(finals, default=0) < -1
        or any(bit not in (0, 1) for bit in complete)
    ):
        raise ValueError(
            f"a DASGD state is n = {n} applied counts ≥ 0, n DONE counts ≥ −1 and n "
            f"complete bits, got {len(extra)} integers"
        )
    eta = cfg.schedule()(1)
    return [dasgd(p, state.model, eta, cfg.steps, graph, resume=extra) for p in pids]


def _cluster_restart(extra: tuple[int, ...]) -> tuple[int, ...]:
    """The state every node takes after a whole-cluster restart: the gradients outside its
    version vector are gone with the nodes that held them (every inbox and kept gradient is),
    so a DONE count beyond what it applied no longer holds (that origin computes the rest
    again, numbered on from its count), and every node says again that it is complete."""
    n = len(extra) // 3
    applied, finals = extra[:n], extra[n : 2 * n]
    return (
        *applied,
        *(f if f == a else -1 for a, f in zip(applied, finals, strict=True)),
        *[0] * n,
    )


def _check(cfg: RunConfig) -> None:
    # A state for rejoin carries 3n integers in its tag (version vector, DONE counts, COMPLETE).
    most = (MAX_TAG_LEN - 2) // 3
    if cfg.processes > most:
        raise ValueError(
            f"dasgd carries a version vector of n integers in every gradient's tag and 3n in a "
            f"state for rejoin: n ≤ {most}"
        )


def _warnings(cfg: RunConfig, constants: Constants) -> list[str]:
    eta = first_eta(cfg)
    if eta is None or constants.L is None:
        return []
    big_l = constants.L
    if at_most(eta, 1 / (4 * max(big_l, 1.0))):
        return []
    # S_avg ≥ 1 implies Ŝ_max ≥ Ŝ_avg ≥ 1 (Ŝ ⊇ S), so both bounds are ≤ 1/(4·max(L, 1))
    return sentence(
        CONDITIONS,
        "DASGD's Thm 1",
        [
            "the staleness is only known after the run, but whenever S_avg ≥ 1 both mean "
            f"η ≤ 1/(4·max(L, 1)) = {1 / (4 * max(big_l, 1.0)):g}; η = {eta:g}"
        ],
    )


RECORDS = (
    AlgorithmSpec(
        name="dasgd",
        paper="Tosi–Theobald Alg 1",
        exchanges="each gradient once, tagged with its version vector, relayed over the topology",
        waits_for="nothing: applies what arrived, else computes",
        tolerates="no crashes (a lost node blocks the end)",
        parameters="`topology`, fixed η",
        programs=_programs,
        resume=_resume,
        cluster_restart=_cluster_restart,
        settings=frozenset({"topology"}),
        topology="complete",
        sends_models=False,
        staleness=True,
        # each gradient is rounded once, by its origin; relays forward it as it came
        compressible=frozenset({"dg"}),
        rejoin_when_stalled=True,
        conditions=CONDITIONS,
        check=_check,
        warnings=_warnings,
        describe=lambda cfg: [*step_size(cfg), f"topology {cfg.graph.name}"],
        # every node applies every node's gradients
        planned_iterations=lambda cfg: cfg.processes**2 * (cfg.steps or 0),
    ),
)
