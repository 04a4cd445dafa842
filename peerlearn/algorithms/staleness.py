"""DASGD staleness from the apply and compute logs: tight S, loose Ŝ, and their averages.

Definitions (Tosi–Theobald, Section 4). Node j computed its gradient ``g_j^s`` on
the state ``G_j^s`` (the set of gradients applied to reach it); node i applies it as its step
t+1, from the state ``G_i^t``.

* **Def. 1, tight** (eq. 7): ``S_{i,j}^{t,s} = G_i^t Δ G_j^s``.
* **Def. 1, loose** (eq. 8): ``Ŝ_{i,j}^{t,s} = (G_i^t Δ G_j^s) ∪ ⋃_{g_k^u ∈ G_j^s \\ G_i^t}
  Ŝ_{i,k}^{t,u}`` — i's state is compared, recursively, with the origin state of every
  gradient j had applied and i has not.
* **Def. 2** (eqs. 9–10): ``S_max`` is the largest |S| of any step of any node; ``S_avg`` is the
  *per-node* time average over **all** local steps (own ones, with |S| = 0, included), then the
  maximum over nodes. Ŝ_avg and Ŝ_max likewise.

Time indexing. :func:`peerlearn.algorithms.dasgd.dasgd` reports one ``"staleness"`` value per
local step, with ``step = t`` for t = 1 … T_i: the |S| of the gradient that took the node from
state t − 1 to state t, i.e. the paper's ``S^{t−1}``. The paper's average
``(1/(T+1)) Σ_{t=0..T}`` runs over the states a gradient is applied *from*, x^0 … x^T, so its
T is the program's ``T_i − 1`` and its T + 1 terms are exactly the T_i reported values:
:func:`summarize` takes the plain mean of a node's list — no zero is padded in for t = 0 and
the final state, from which nothing is applied, contributes nothing.

Representation. The program applies each origin's gradients in sequence order (a reorder
buffer holds early arrivals), so every applied set is a prefix per origin and is described
exactly by a version vector ``V[k]`` = how many of k's gradients are in it:
``G = {(k, c) : c < V[k]}``. The compute log gives ``V_j^s`` for each gradient ``(j, seq)``;
``V_i^t`` is rebuilt by counting the node's apply log. Then ``|S| = Σ_k |V_i^t[k] − V_j^s[k]|``
(:func:`tight_from_vectors`).

Ŝ, exactly (:func:`loose_staleness`). For a fixed apply event, write A = G_i^t (vector V) and
R for the set of states the recursion of eq. 8 visits: G_j^s and the origin state of every
gradient in some visited state but not in A. Ŝ is a union of symmetric differences with the
fixed A, so ``Ŝ = (A \\ ⋂R) ∪ (⋃R \\ A)``, and with prefix sets, per origin m,
``|Ŝ| = Σ_m max(0, V[m] − lo[m]) + max(0, hi[m] − V[m])`` with lo/hi the componentwise min/max of
the visited vectors. The recursion is memoised over the gradient DAG by origin: node m's compute
vectors grow with seq (its applied set only grows, and ``V_{(m,c)}[m] = c``), so the visited
gradients of origin m are exactly seq ``V[m] … hi[m] − 1``, their largest vector is that of
``hi[m] − 1`` and their smallest that of ``V[m]``; ``hi`` is a fixpoint of O(n) vector maxima.
:func:`apply_log` checks these monotonicity facts, so the shortcut is exact on every log it
accepts; :func:`loose_staleness_reference` evaluates eq. 8 literally on Python sets (with a memo
per ``(k, u)``) for cross-checks on small runs.

Everything here is pure: no I/O, no simulator import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

__all__ = [
    "Apply",
    "ApplyLog",
    "GradientId",
    "LooseStaleness",
    "apply_log",
    "loose_staleness",
    "loose_staleness_reference",
    "summarize",
    "tight_from_vectors",
    "version_vectors",
]

GradientId = tuple[int, int]  # (origin node, origin's sequence number 0, 1, 2, …)


@dataclass(frozen=True)
class Apply:
    """One local step of one node: the gradient ``(origin, seq)`` applied as step ``t``
    (t = 1 … T_i, taking state t − 1 to state t) and the tight |S| the node reported."""

    t: int
    origin: int
    seq: int
    size: int

    @property
    def gid(self) -> GradientId:
        return (self.origin, self.seq)


@dataclass(frozen=True)
class ApplyLog:
    """The per-node apply logs and the compute version vector of every gradient.

    ``applies[i]`` lists node i's steps in order (t = 1, 2, …); ``computes[(j, c)]`` is the
    version vector ``V_j^s`` gradient c of node j was computed on; ``n`` is the vector length.
    """

    n: int
    applies: dict[int, list[Apply]]
    computes: dict[GradientId, tuple[int, ...]]


def _report_fields(rep: Any) -> tuple[str, Any, int, tuple[Any, ...]]:
    return rep.name, rep.value, int(rep.step), tuple(rep.key)


def apply_log(reports: Iterable[tuple[int, Any]]) -> ApplyLog:
    """Build the apply/compute logs from ``(pid, Report)`` pairs (``SimResult.reports``).

    Uses the ``"staleness"`` reports (``value`` |S|, ``key`` (origin, seq), ``step`` t) and the
    ``"compute"`` reports (``value`` the version vector, ``key`` (me, seq)); other names are
    ignored. Raises ValueError when the logs break what the exact version-vector arithmetic
    relies on: steps not numbered 1, 2, … per node, a gradient applied twice by a node, an
    origin's gradients applied out of sequence order, a compute vector whose own entry is not
    the seq, or an origin's compute vectors that do not grow with seq.
    """
    applies: dict[int, list[Apply]] = {}
    computes: dict[GradientId, tuple[int, ...]] = {}
    n = 0
    for pid, rep in reports:
        name, value, step, key = _report_fields(rep)
        if name == "staleness":
            origin, seq = int(key[0]), int(key[1])
            rows = applies.setdefault(int(pid), [])
            if step != len(rows) + 1:
                raise ValueError(f"node {pid}: step {step} follows {len(rows)} steps")
            rows.append(Apply(step, origin, seq, int(value)))
            n = max(n, origin + 1, int(pid) + 1)
        elif name == "compute":
            origin, seq = int(key[0]), int(key[1])
            if origin != pid:
                raise ValueError(f"node {pid} reported computing gradient {key}")
            if (origin, seq) in computes:
                raise ValueError(f"gradient {(origin, seq)} computed twice")
            vec = tuple(int(v) for v in value)
            computes[(origin, seq)] = vec
            n = max(n, len(vec))
    for vec in computes.values():
        if len(vec) != n:
            raise ValueError(f"compute vectors of length {len(vec)}, but {n} nodes")
    for (origin, seq), vec in computes.items():
        if vec[origin] != seq:
            raise ValueError(f"gradient {(origin, seq)} computed on own count {vec[origin]}")
        before = computes.get((origin, seq - 1))
        if before is not None and any(a > b for a, b in zip(before, vec, strict=True)):
            raise ValueError(f"compute vectors of node {origin} shrink at seq {seq}")
    for pid, rows in applies.items():
        nxt = [0] * n
        for row in rows:
            if row.seq != nxt[row.origin]:
                raise ValueError(
                    f"node {pid} step {row.t}: applied {row.gid}, expected seq "
                    f"{nxt[row.origin]} of node {row.origin} (not a per-origin prefix)"
                )
            nxt[row.origin] += 1
    return ApplyLog(n, applies, computes)


def version_vectors(log: ApplyLog, node: int) -> list[tuple[int, ...]]:
    """``V_i^{t−1}`` for each of node i's steps t = 1 … T_i: its version vector *before* the
    step, counted from its apply log (element t − 1 belongs to step t)."""
    current = [0] * log.n
    out = []
    for row in log.applies.get(node, []):
        out.append(tuple(current))
        current[row.origin] += 1
    return out


def _tight(v: Sequence[int], w: Sequence[int]) -> int:
    return sum(abs(a - b) for a, b in zip(v, w, strict=True))


def _compute_vector(log: ApplyLog, gid: GradientId) -> tuple[int, ...]:
    try:
        return log.computes[gid]
    except KeyError:
        raise ValueError(f"no compute record for gradient {gid}") from None


def tight_from_vectors(log: ApplyLog) -> dict[int, list[int]]:
    """|S| of every step recomputed as ``Σ_k |V_i^t[k] − V_j^s[k]|`` (Def. 1, eq. 7), per node;
    compare with the reported ``ApplyLog.applies[i][t − 1].size`` / ``SimResult.staleness``."""
    out: dict[int, list[int]] = {}
    for node, rows in log.applies.items():
        out[node] = [
            _tight(v, _compute_vector(log, row.gid))
            for v, row in zip(version_vectors(log, node), rows, strict=True)
        ]
    return out


def _loose_size(log: ApplyLog, v: Sequence[int], w: Sequence[int]) -> int:
    """|Ŝ| of applying a gradient computed on ``w`` from the state ``v`` (see module doc)."""
    n = log.n
    hi = list(w)
    changed = True
    while changed:  # hi: the componentwise max over the states the recursion visits
        changed = False
        for m in range(n):
            if hi[m] > v[m]:
                for k, value in enumerate(_compute_vector(log, (m, hi[m] - 1))):
                    if value > hi[k]:
                        hi[k] = value
                        changed = True
    lo = list(w)
    for m in range(n):
        if hi[m] > v[m]:  # the earliest of m's visited gradients has the smallest vector
            lo = [min(a, b) for a, b in zip(lo, _compute_vector(log, (m, v[m])), strict=True)]
    return sum(max(0, v[m] - lo[m]) + max(0, hi[m] - v[m]) for m in range(n))


@dataclass(frozen=True)
class LooseStaleness:
    """|Ŝ| of every step per node (element t − 1 for step t) and (Ŝ_avg, Ŝ_max) by Def. 2."""

    sizes: dict[int, list[int]]
    avg: float
    max: int


def loose_staleness(log: ApplyLog) -> LooseStaleness:
    """Ŝ (Def. 1, eq. 8) of every step of every node, exactly, and its Def. 2 summary."""
    sizes: dict[int, list[int]] = {}
    for node, rows in log.applies.items():
        sizes[node] = [
            _loose_size(log, v, _compute_vector(log, row.gid))
            for v, row in zip(version_vectors(log, node), rows, strict=True)
        ]
    avg, top = summarize(sizes)
    return LooseStaleness(sizes, avg, top)


def loose_staleness_reference(log: ApplyLog) -> dict[int, list[int]]:
    """|Ŝ| by eq. 8 read literally: explicit sets, recursion memoised per ``(k, u)`` for each
    apply event. Quadratic-or-worse in the number of gradients — for cross-checks only."""

    def applied_set(vec: Sequence[int]) -> frozenset[GradientId]:
        return frozenset((k, c) for k, count in enumerate(vec) for c in range(count))

    out: dict[int, list[int]] = {}
    for node, rows in log.applies.items():
        sizes = []
        for v, row in zip(version_vectors(log, node), rows, strict=True):
            mine = applied_set(v)

            @cache
            def s_hat(gid: GradientId, mine: frozenset[GradientId] = mine) -> frozenset[GradientId]:
                theirs = applied_set(_compute_vector(log, gid))
                result = set(mine ^ theirs)
                for other in theirs - mine:
                    result |= s_hat(other)
                return frozenset(result)

            sizes.append(len(s_hat(row.gid)))
        out[node] = sizes
    return out


def summarize(staleness_by_node: Mapping[int, Sequence[int]]) -> tuple[float, int]:
    """(S_avg, S_max) of Def. 2 from the per-step sizes of each node.

    S_avg is the max over nodes of the node's mean over all its reported steps (own steps
    included; see the module doc for why the mean over the T_i reported values *is* the
    paper's ``(1/(T+1)) Σ_{t=0..T}``); a node without steps is skipped. S_max is the global
    max. No steps at all: (0.0, 0).
    """
    means = [sum(v) / len(v) for v in staleness_by_node.values() if len(v)]
    tops = [max(v) for v in staleness_by_node.values() if len(v)]
    return (max(means, default=0.0), max(tops, default=0))
