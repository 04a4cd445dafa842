"""Algorithm programs: generators that yield :mod:`peerlearn.effects` and do no I/O."""

from peerlearn.algorithms.aggregate import (
    Aggregator,
    approach_ext,
    diam2,
    maa_rounds,
    mid_ext,
    rounds_for,
)
from peerlearn.algorithms.maa import cluster_maa, smmaa
from peerlearn.algorithms.schedules import Constant, InverseTime, Schedule, sqrt_n_over_t
from peerlearn.algorithms.sgd import alg1, alg2, maa_instances

__all__ = [
    "Aggregator",
    "Constant",
    "InverseTime",
    "Schedule",
    "alg1",
    "alg2",
    "approach_ext",
    "cluster_maa",
    "diam2",
    "maa_instances",
    "maa_rounds",
    "mid_ext",
    "rounds_for",
    "smmaa",
    "sqrt_n_over_t",
]
