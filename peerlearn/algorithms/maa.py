"""Multidimensional approximate agreement: Alg 3 (cluster MAA) and Alg 4 (SMMAA).

Both are sub-programs: an SGD program runs them with ``yield from``. They read like the paper
(Attiya–Schiller, Algorithms 3 and 4); tags and register keys carry the instance so that
rounds of different iterations never mix (the paper's Alg 3 tags a message with its round only,
but each iteration runs an instance of its own).

Every value a process holds at the start of a round is reported as ``Report("agreement", v,
key=(instance, r, k))`` — ``k`` is ``None`` for a cluster round — and the outputs appear as round
``R + 1``; a trace of these is enough to check contraction and validity offline. After each
cluster round's exchange, ``Report("agreement_spread", (diam², ‖x‖²), key=(instance, r))`` gives
the squared diameter of what the round received (MidExt computes it anyway): a daemon turns
consecutive rounds into its measured-contraction histogram.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from peerlearn.algorithms.aggregate import (
    Aggregator,
    approach_ext,
    diam2,
    mid_ext,
    mid_ext_diam2,
)
from peerlearn.effects import (
    Collect,
    Effect,
    Exchange,
    MajorityOfClusters,
    Report,
    Vector,
    Write,
)

__all__ = ["cluster_maa", "smmaa"]


def _aggregate(aggregator: Aggregator, values: Sequence[Vector], own: Vector) -> Vector:
    if aggregator is Aggregator.MIDEXT:
        return mid_ext(values)
    return approach_ext(values, own)


def smmaa(
    x: Vector,
    instance: tuple[int, int],
    rounds: int,
    aggregator: Aggregator = Aggregator.MIDEXT,
) -> Generator[Effect, Any, Vector]:
    """Alg 4, wait-free shared-memory MAA inside the caller's cluster.

    ``instance = (t, r)``: the iteration and cluster round this SMMAA call belongs to; register
    array ``A_k`` of this call is the key ``("sm", t, r, k)``, written once by each process.
    """
    t, r = instance
    a = x  # A_1[i] ← x
    for k in range(1, rounds + 1):
        yield Report("agreement", a, key=(t, r, k))
        # Write before collecting: the first value written to A_k is then seen by every
        # collector (the proof of the paper's Lemma 16), the whole correctness argument.
        yield Write(("sm", t, r, k), a)
        collected = yield Collect(("sm", t, r, k))
        a = _aggregate(aggregator, [m.value for m in collected], a)  # A_{k+1}[i]
    yield Report("agreement", a, key=(t, r, rounds + 1))
    return a


def cluster_maa(
    x: Vector,
    instance: int,
    rounds: int,
    inner_rounds: int,
    aggregator: Aggregator = Aggregator.MIDEXT,
) -> Generator[Effect, Any, Vector]:
    """Alg 3, cluster-based MAA: ``rounds`` rounds of SMMAA, broadcast, cluster majority, MidExt.

    With ``aggregator = APPROACHEXT`` this is the variant of Lemma 20: line 8 becomes
    ApproachExt(Rcv, y_r^i), and the SMMAA calls use ApproachExt too.
    """
    for r in range(1, rounds + 1):
        yield Report("agreement", x, key=(instance, r, None))
        y = yield from smmaa(x, (instance, r), inner_rounds, aggregator)
        rcv = yield Exchange(("maa", instance, r), y, MajorityOfClusters())
        values = [m.value for m in rcv]
        if aggregator is Aggregator.MIDEXT:
            x, spread = mid_ext_diam2(values)  # MidExt finds the diameter anyway
        else:
            x, spread = approach_ext(values, y), diam2(values)
        # diam² of what this round received and the values' scale: the measured contraction
        yield Report("agreement_spread", (spread, float(x @ x)), key=(instance, r))
    yield Report("agreement", x, key=(instance, rounds + 1, None))
    return x
