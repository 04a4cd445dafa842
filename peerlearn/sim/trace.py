"""Reading a simulation's agreement trace (``SimResult.trace``, recorded with ``trace = true``):
the values of every round, grouped, and how much each round contracted them."""

from __future__ import annotations

from collections import defaultdict

from peerlearn.algorithms import diam2
from peerlearn.effects import Vector
from peerlearn.sim.runner import SimResult

__all__ = ["contraction_ratios", "receive_sets_differ", "rounds_by"]


def rounds_by(result: SimResult, inner: bool) -> dict[tuple[int, ...], dict[int, Vector]]:
    """Trace values grouped by round.

    inner=False: key (instance, round) → {pid: x_r} over *all* processes (cluster rounds);
    inner=True:  key (instance, round, cluster, k) → {pid: A_k[pid]} (shared-memory rounds).
    """
    members = result.config.membership
    out: dict[tuple[int, ...], dict[int, Vector]] = defaultdict(dict)
    for instance, rnd, k, pid, value in result.trace:
        if inner and k is not None:
            out[(instance, rnd, members.cluster_of[pid], k)][pid] = value
        elif not inner and k is None:
            out[(instance, rnd)][pid] = value
    return out


def contraction_ratios(
    groups: dict[tuple[int, ...], dict[int, Vector]],
) -> list[tuple[tuple[int, ...], float, float]]:
    """(key, diam² of round r, diam² of round r+1) for every consecutive pair of rounds."""
    out = []
    for key, values in groups.items():
        nxt = (*key[:-1], key[-1] + 1)
        if nxt in groups and len(values) >= 1:
            out.append((key, diam2(list(values.values())), diam2(list(groups[nxt].values()))))
    return out


def receive_sets_differ(result: SimResult, kind: str, tag_kind: str) -> bool:
    """True when, for some tag, two processes received (or collected) different sender sets
    (``record_receives``): a contraction measured otherwise would hold trivially."""
    for (k, tag), sets in result.receive_sets.items():
        if k == kind and tag[0] == tag_kind and len(set(sets.values())) > 1:
            return True
    return False
