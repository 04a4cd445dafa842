"""Who is who: n processes in m clusters, assigned round-robin.

Process ``p`` (0-based) lives in cluster ``p % m`` with index ``p // m``; its name is
``"cluster.index"`` (e.g. ``"2.1"``). Membership is static, as in the papers: every runtime knows
n and m, so quorums mean the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peerlearn.errors import ConfigError

__all__ = ["Membership"]


@dataclass(frozen=True)
class Membership:
    """``processes`` processes in ``clusters`` clusters; ``sizes`` fixes each cluster's size
    (daemons with different worker counts), otherwise they are as even as round-robin makes
    them. Process ids are dealt round-robin over the clusters that still have room, so with
    even sizes process ``p`` is in cluster ``p mod m``."""

    processes: int
    clusters: int
    sizes: tuple[int, ...] | None = None
    cluster_of: tuple[int, ...] = field(init=False)
    members: tuple[tuple[int, ...], ...] = field(init=False)
    _index: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise ConfigError(f"clusters must be ≥ 1, got {self.clusters}")
        if self.processes < self.clusters:
            raise ConfigError(
                f"{self.processes} processes cannot fill {self.clusters} clusters: "
                "every cluster needs at least one process"
            )
        sizes = self.sizes or tuple(
            self.processes // self.clusters + (c < self.processes % self.clusters)
            for c in range(self.clusters)
        )
        if len(sizes) != self.clusters or sum(sizes) != self.processes or min(sizes) < 1:
            raise ConfigError(
                f"cluster sizes {list(sizes)} do not split {self.processes} processes into "
                f"{self.clusters} non-empty clusters"
            )
        cluster_of: list[int] = []
        members: list[list[int]] = [[] for _ in sizes]
        index: list[int] = []
        for i in range(max(sizes)):
            for c, size in enumerate(sizes):
                if i < size:
                    members[c].append(len(cluster_of))
                    cluster_of.append(c)
                    index.append(i)
        object.__setattr__(self, "cluster_of", tuple(cluster_of))
        object.__setattr__(self, "members", tuple(tuple(ms) for ms in members))
        object.__setattr__(self, "_index", tuple(index))

    @classmethod
    def of_sizes(cls, sizes: list[int] | tuple[int, ...]) -> Membership:
        return cls(sum(sizes), len(sizes), tuple(sizes))

    def name(self, pid: int) -> str:
        return f"{self.cluster_of[pid]}.{self._index[pid]}"

    def index(self, pid: int) -> int:
        """The position of ``pid`` inside its cluster."""
        return self._index[pid]

    def pid(self, cluster: int, index: int) -> int:
        """The process id of ``cluster.index``; ConfigError if there is none."""
        if not 0 <= cluster < self.clusters:
            raise ConfigError(f"no cluster {cluster}: clusters are 0..{self.clusters - 1}")
        size = len(self.members[cluster])
        if not 0 <= index < size:
            raise ConfigError(
                f"no process {cluster}.{index}: cluster {cluster} has indexes 0..{size - 1}"
            )
        return self.members[cluster][index]

    @property
    def majority(self) -> int:
        """⌊m/2⌋ + 1 clusters: the quorum of cluster agreement (Alg 3)."""
        return self.clusters // 2 + 1
