"""Every algorithm peerlearn runs, by name: the records of :mod:`peerlearn.algorithms.records`.

Config, runs, the CLI, the daemon, the demo and the simulator ask :func:`lookup` what an
algorithm is instead of branching on its name (``tests/test_registry.py`` checks the package
for comparisons against algorithm names outside the records).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from peerlearn.algorithms.records import (
    attiya_schiller,
    lu_nash_de_sa,
    tosi_theobald,
    zhang_choromanska_lecun,
)
from peerlearn.algorithms.spec import OPTIONAL_SETTINGS, AlgorithmSpec

__all__ = ["ALGORITHMS", "REGISTRY", "conditions", "lookup", "readers"]

#: every record, in the order of the papers (the README's table lists them in this order)
REGISTRY: Mapping[str, AlgorithmSpec] = MappingProxyType(
    {
        spec.name: spec
        for module in (attiya_schiller, tosi_theobald, zhang_choromanska_lecun, lu_nash_de_sa)
        for spec in module.RECORDS
    }
)
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)


def lookup(name: str) -> AlgorithmSpec:
    """The record of algorithm ``name`` (KeyError naming the known ones if there is none)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}: one of {', '.join(ALGORITHMS)}") from None


def readers(setting: str) -> tuple[str, ...]:
    """The algorithms that read ``setting`` (one of :data:`~peerlearn.algorithms.spec.
    OPTIONAL_SETTINGS`), in registry order."""
    assert setting in OPTIONAL_SETTINGS, setting
    return tuple(name for name, spec in REGISTRY.items() if spec.reads(setting))


def conditions() -> dict[str, str]:
    """Every result some algorithm's warnings cite, with its whole condition."""
    out: dict[str, str] = {}
    for spec in REGISTRY.values():
        out.update(spec.conditions)
    return out
