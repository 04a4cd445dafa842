"""Communication graphs between processes: who talks to whom.

DASGD (any connected topology, gradients relayed) and the gossip protocols of MixML (a doubly
stochastic W over the graph's edges) take their neighbours from here. A topology is given as

* ``complete``            every process talks to every other one;
* ``ring``                process ``i`` talks to ``i ± 1 (mod n)``;
* ``random-regular[:d]``  a random ``d``-regular graph (default ``d = 3``), drawn from the run
                          seed until it is connected;
* a file path             a JSON list of edges ``[[i, j], …]`` or an object ``{"edges": …}``.

Every graph is undirected, without self-loops, and must be connected — DASGD's "no lost
messages" (its Section 3.2) needs a path between every pair — otherwise :class:`ConfigError`.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from peerlearn.errors import ConfigError

__all__ = ["Topology", "make_topology"]


@dataclass(frozen=True)
class Topology:
    """An undirected connected graph on processes ``0 … n−1``."""

    name: str
    neighbours: tuple[tuple[int, ...], ...]

    @property
    def n(self) -> int:
        return len(self.neighbours)

    def edges(self) -> list[tuple[int, int]]:
        return [(i, j) for i, ns in enumerate(self.neighbours) for j in ns if i < j]

    def metropolis(self) -> npt.NDArray[np.float64]:
        """The Metropolis–Hastings weights: symmetric, doubly stochastic, positive diagonal.

        ``W_ij = 1/(1 + max(d_i, d_j))`` on edges, the rest on the diagonal; on a ring this is
        the 1/3 weighting of MixML's synchronous ring (its Section 3 case study II). Dense, for
        the analyses that need the matrix; a process needs only its row (:meth:`metropolis_row`).
        """
        w = np.zeros((self.n, self.n))
        for i in range(self.n):
            for j, weight in self.metropolis_row(i).items():
                w[i, j] = weight
        return w

    def metropolis_row(self, i: int) -> dict[int, float]:
        """Row ``i`` of :meth:`metropolis`, its nonzero entries: O(degree), not O(n)."""
        deg = len(self.neighbours[i])
        row = {j: 1.0 / (1 + max(deg, len(self.neighbours[j]))) for j in self.neighbours[i]}
        # fsum: the diagonal does not depend on the order the neighbours are summed in
        return {i: 1.0 - math.fsum(row.values()), **row}


def _from_edges(name: str, n: int, edges: list[tuple[int, int]]) -> Topology:
    adj: list[set[int]] = [set() for _ in range(n)]
    for i, j in edges:
        if not (0 <= i < n and 0 <= j < n):
            raise ConfigError(
                f"topology {name}: edge ({i}, {j}) names a process outside 0..{n - 1}"
            )
        if i == j:
            raise ConfigError(f"topology {name}: self-loop at {i}")
        adj[i].add(j)
        adj[j].add(i)
    topo = Topology(name, tuple(tuple(sorted(a)) for a in adj))
    if not _connected(topo):
        raise ConfigError(
            f"topology {name} is not connected on {n} processes: a gradient could not reach "
            "every process"
        )
    return topo


def _connected(topo: Topology) -> bool:
    if topo.n <= 1:
        return True
    seen = {0}
    todo = deque([0])
    while todo:
        for j in topo.neighbours[todo.popleft()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == topo.n


def _random_regular(n: int, d: int, rng: np.random.Generator) -> list[tuple[int, int]] | None:
    """One try of the pairing model; None when it produced a loop or a double edge."""
    stubs = rng.permutation(np.repeat(np.arange(n), d))
    edges = set()
    for a, b in stubs.reshape(-1, 2).tolist():
        e = (min(a, b), max(a, b))
        if a == b or e in edges:
            return None
        edges.add(e)
    return sorted(edges)


def make_topology(spec: str, n: int, seed: int = 0) -> Topology:
    """The topology named by ``spec`` on ``n`` processes (see the module docstring)."""
    if n < 1:
        raise ConfigError(f"a topology needs at least one process, got {n}")
    if spec == "complete":
        return _from_edges(spec, n, [(i, j) for i in range(n) for j in range(i + 1, n)])
    if spec == "ring":
        return _from_edges(spec, n, [(i, (i + 1) % n) for i in range(n)] if n > 1 else [])
    if spec == "random-regular" or spec.startswith("random-regular:"):
        try:
            d = int(spec.partition(":")[2] or 3)
        except ValueError:
            raise ConfigError(f"topology {spec!r}: the degree after ':' must be an int") from None
        if not 1 <= d < n or (n * d) % 2:
            raise ConfigError(
                f"topology {spec!r}: a {d}-regular graph on {n} processes needs 1 ≤ d < n and "
                "n·d even"
            )
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
        for _ in range(10_000):
            edges = _random_regular(n, d, rng)
            if edges is not None:
                topo = Topology(spec, tuple(() for _ in range(n)))
                try:
                    topo = _from_edges(spec, n, edges)
                except ConfigError:
                    continue  # not connected: draw again
                return topo
        raise ConfigError(f"topology {spec!r}: no connected {d}-regular graph found on {n}")
    path = Path(spec)
    if not path.exists():
        raise ConfigError(
            f"unknown topology {spec!r}: complete, ring, random-regular[:d] or a JSON edge file"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"topology file {path}: {exc}") from None
    raw = data.get("edges") if isinstance(data, dict) else data
    if not isinstance(raw, list) or not all(
        isinstance(e, list) and len(e) == 2 and all(isinstance(v, int) for v in e) for e in raw
    ):
        raise ConfigError(f"topology file {path}: expected a list of [i, j] integer pairs")
    return _from_edges(str(path), n, [(int(a), int(b)) for a, b in raw])
