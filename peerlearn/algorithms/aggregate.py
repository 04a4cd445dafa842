"""Aggregation rules and round counts of approximate agreement (Attiya–Schiller §4.1, App. B).

``diam2`` is the *squared* Euclidean diameter, the quantity every contraction factor of the
paper refers to: its Lemma 19 proves the contraction factors for the squared diameter only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum

import numpy as np

from peerlearn import ties
from peerlearn.effects import Vector

__all__ = [
    "Aggregator",
    "approach_ext",
    "diam2",
    "maa_rounds",
    "mid_ext",
    "mid_ext_diam2",
    "rounds_for",
]


class Aggregator(StrEnum):
    """How a round combines the values it received (Alg 3 line 8, Alg 4 line 5)."""

    MIDEXT = "midext"
    APPROACHEXT = "approachext"


def _stack(values: Sequence[Vector]) -> Vector:
    stacked: Vector = np.stack(values)
    return stacked


def _pairwise2(stacked: Vector) -> Vector:
    # ‖a−b‖² = ‖a‖² + ‖b‖² − 2⟨a,b⟩ loses precision when values are nearly equal (exactly when
    # agreement has converged), so take explicit differences: k ≤ a few dozen here. Summed in
    # float64 whatever the models' dtype: a float32 sum over d elements would lose ~√d·2⁻²⁴ of
    # each distance, enough to pick another pair than the farthest and to blur the diameters
    # the contraction is measured by; the midpoint itself stays in the models' dtype.
    diff = stacked[:, None, :] - stacked[None, :, :]
    d2: Vector = np.einsum("ijk,ijk->ij", diff, diff, dtype=np.float64)
    return d2


#: diam2 over more values than fit this many differences at once goes a block of rows at a time
#: (the simulator's report over thousands of processes: n²·d differences would be gigabytes)
_BLOCK_ELEMENTS = 1 << 22


def diam2(values: Sequence[Vector]) -> float:
    """max over pairs of ‖a − b‖²; 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    stacked = _stack(values)
    n, d = len(stacked), stacked[0].size
    rows = max(1, _BLOCK_ELEMENTS // max(1, n * d))
    if rows >= n:
        return float(_pairwise2(stacked).max())
    maxima = []
    for start in range(0, n, rows):  # each entry computed as _pairwise2 computes it
        diff = stacked[start : start + rows, None, :] - stacked[None, :, :]
        maxima.append(np.einsum("ijk,ijk->ij", diff, diff, dtype=np.float64).max())
    return float(np.max(maxima))  # (a NaN anywhere is the answer, as unblocked)


def mid_ext(values: Sequence[Vector]) -> Vector:
    """MidExtremes: the midpoint of a farthest pair (Attiya–Schiller, Section 4.1). The identity
    on one value."""
    return mid_ext_diam2(values)[0]


def mid_ext_diam2(values: Sequence[Vector]) -> tuple[Vector, float]:
    """MidExtremes and the squared diameter of ``values``, which it finds anyway."""
    if len(values) == 1:
        return values[0], 0.0
    stacked = _stack(values)
    d2 = _pairwise2(stacked)
    a, b = np.unravel_index(int(np.argmax(d2)), d2.shape)
    mid: Vector = (stacked[a] + stacked[b]) / 2.0
    return mid, float(d2[a, b])


def approach_ext(values: Sequence[Vector], own: Vector) -> Vector:
    """ApproachExtreme: halfway from ``own`` towards the value farthest from it (Attiya–Schiller,
    Appendix A.2)."""
    stacked = _stack(values)
    diff = stacked - own
    far = int(np.argmax(np.einsum("ij,ij->i", diff, diff, dtype=np.float64)))  # (as above)
    out: Vector = (own + stacked[far]) / 2.0
    return out


def rounds_for(q: float, factor: float) -> int:
    """⌈log_factor q⌉: rounds of a ``factor``-contracting step needed to reach ``q``."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"contraction target q must be in (0, 1], got {q}")
    if q == 1.0:
        return 0
    # Exact powers (q = factor**k) must not round up to k + 1: the one tie rule.
    return ties.ceil(math.log(q) / math.log(factor))


#: Per-round squared-diameter factors: shared-memory round (Lemma 16) and cluster round
#: (Lemma 19 for MidExt, Lemma 20 for ApproachExt), with the SMMAA target each cluster round
#: needs (1/6 for MidExt, 1/10 for ApproachExt).
SMMAA_FACTOR = {Aggregator.MIDEXT: 7 / 8, Aggregator.APPROACHEXT: 31 / 32}
CLUSTER_FACTOR = {Aggregator.MIDEXT: 23 / 24, Aggregator.APPROACHEXT: 79 / 80}
SMMAA_TARGET = {Aggregator.MIDEXT: 1 / 6, Aggregator.APPROACHEXT: 1 / 10}


def maa_rounds(q: float, aggregator: Aggregator) -> tuple[int, int]:
    """(cluster rounds R, shared-memory rounds per cluster round) for a q-contraction.

    MidExt: R = ⌈log_{23/24} q⌉ with 14 SMMAA rounds (q = 1/4 → 33). ApproachExt (Lemma 20):
    R = ⌈log_{79/80} q⌉ with 73 SMMAA rounds (q = 1/4 → 111).
    """
    outer = rounds_for(q, CLUSTER_FACTOR[aggregator])
    inner = rounds_for(SMMAA_TARGET[aggregator], SMMAA_FACTOR[aggregator])
    return outer, inner
