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
    processes: int
    clusters: int
    cluster_of: tuple[int, ...] = field(init=False)
    members: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise ConfigError(f"clusters must be ≥ 1, got {self.clusters}")
        if self.processes < self.clusters:
            raise ConfigError(
                f"{self.processes} processes cannot fill {self.clusters} clusters: "
                "every cluster needs at least one process"
            )
        object.__setattr__(
            self, "cluster_of", tuple(p % self.clusters for p in range(self.processes))
        )
        object.__setattr__(
            self,
            "members",
            tuple(tuple(range(c, self.processes, self.clusters)) for c in range(self.clusters)),
        )

    def name(self, pid: int) -> str:
        return f"{pid % self.clusters}.{pid // self.clusters}"

    def index(self, pid: int) -> int:
        """The position of ``pid`` inside its cluster."""
        return pid // self.clusters

    def pid(self, cluster: int, index: int) -> int:
        """The process id of ``cluster.index``; ConfigError if there is none."""
        if not 0 <= cluster < self.clusters:
            raise ConfigError(f"no cluster {cluster}: clusters are 0..{self.clusters - 1}")
        pid = index * self.clusters + cluster
        if index < 0 or pid >= self.processes:
            size = len(self.members[cluster])
            raise ConfigError(
                f"no process {cluster}.{index}: cluster {cluster} has indexes 0..{size - 1}"
            )
        return pid

    @property
    def majority(self) -> int:
        """⌊m/2⌋ + 1 clusters: the quorum of cluster agreement (Alg 3)."""
        return self.clusters // 2 + 1
