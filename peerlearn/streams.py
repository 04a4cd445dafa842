"""The run's random streams, all derived from its seed.

``numpy.random.SeedSequence`` with a spawn key of ``(purpose, cluster, index)``: gradient noise
and agreement inputs are independent per process (Attiya–Schiller's Lemma 1 needs independent
samples), the simulator's schedule has its own stream, and x_1 and τ are common to every
process. A process therefore draws the same numbers whichever runtime hosts it.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

__all__ = ["Purpose", "stream"]


class Purpose(IntEnum):
    GRADIENT = 0
    SCHEDULE = 1
    INPUTS = 2
    TAU = 3
    GOSSIP = 4  # async gossip's choice of neighbours, per process


def stream(seed: int, purpose: Purpose, *key: int) -> np.random.Generator:
    """The random stream for ``purpose`` (and process ``key``) of the run with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(int(purpose), *key)))
