"""The register store: the shared memory of one cluster (one daemon).

Theory of operation
-------------------
Alg 4 needs single-writer multi-reader *atomic* registers A_k[i], one array per (instance,
round) and one register per process, read one by one by a collect — no snapshot, no lock
(Attiya–Schiller, Algorithm 4, Appendix A.2; a published value is never mutated). Here a
register array is a Python list with one slot per local worker, kept in a dict keyed by the
register key ``("sm", t, r, k)``.

Memory ordering. A write publishes a *new, fully built, read-only* ndarray by a single
reference store (``slots[i] = value``); a read is a single reference load. In CPython both are
atomic (the GIL, and per-object locking on free-threaded builds), so a reader sees either ⊥
(``None``) or the complete array, never a torn value — exactly an atomic register. Creating an
array uses ``dict.setdefault``, itself atomic, so two first writers of one key end up sharing
one list. Published arrays are never mutated: that is what makes the reference the value.

No lock is taken on the read or write path. Reclamation (``reclaim``) deletes arrays of
instances every live local worker has moved past; a worker never reads a key of an instance it
has passed, so deleting them cannot race with a read that matters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from peerlearn.effects import Msg, Tag, Vector
from peerlearn.errors import PeerlearnError

__all__ = ["RegisterStore", "StoreError"]


class StoreError(PeerlearnError):
    """A program broke the register discipline (two writes to one register, a foreign writer)."""


class RegisterStore:
    """Registers of the processes ``members`` (global process ids of this cluster)."""

    def __init__(self, members: Iterable[int]) -> None:
        self.members: tuple[int, ...] = tuple(members)
        self._slot = {pid: i for i, pid in enumerate(self.members)}
        self._arrays: dict[Tag, list[Vector | None]] = {}
        self._steps: list[float] = [0.0] * len(self.members)  # each member's iteration
        self._low = 0.0
        self.writes = 0
        self.reclaimed = 0

    def __repr__(self) -> str:
        return f"RegisterStore(members={self.members}, arrays={len(self._arrays)})"

    def write(self, pid: int, key: Tag, value: Vector) -> None:
        """Publish ``value`` as ``pid``'s register at ``key`` (once per key)."""
        slot = self._slot.get(pid)
        if slot is None:
            raise StoreError(f"process {pid} is not a member of this cluster {self.members}")
        regs = self._arrays.get(key)
        if regs is None:
            regs = self._arrays.setdefault(key, [None] * len(self.members))
        if regs[slot] is not None:
            raise StoreError(f"register {key} of process {pid} written twice (expected ⊥)")
        # Programs hand over what they yield (effects contract): freeze it rather than copy it.
        value.flags.writeable = False
        regs[slot] = value
        self.writes += 1

    def read(self, key: Tag, index: int) -> Msg | None:
        """Read register ``index`` (0-based position in ``members``) of the array at ``key``."""
        regs = self._arrays.get(key)
        if regs is None:
            return None
        value = regs[index]
        return None if value is None else Msg(self.members[index], value)

    def advance(self, pid: int, step: int) -> None:
        """``pid`` reached iteration ``step``; reclaim what every live member has passed."""
        self._steps[self._slot[pid]] = step
        self._maybe_reclaim()

    def retire(self, pid: int) -> None:
        """``pid`` will never read again (finished, stopped or crashed)."""
        self._steps[self._slot[pid]] = float("inf")
        self._maybe_reclaim()

    def _maybe_reclaim(self) -> None:
        # Racing workers may read a stale minimum: it is only ever too low, so a reclaim is
        # late, never early.
        low = min(self._steps)
        if low > self._low and low != float("inf"):
            self._low = low
            self.reclaim(int(low))

    def reclaim(self, before: int) -> int:
        """Drop every register array whose instance (``key[1]``) is < ``before``."""
        dead = [k for k in list(self._arrays) if _instance(k) < before]
        for k in dead:
            self._arrays.pop(k, None)
        self.reclaimed += len(dead)
        return len(dead)

    def __len__(self) -> int:
        return len(self._arrays)


def _instance(key: Tag) -> Any:
    return key[1] if len(key) > 1 and isinstance(key[1], int) else float("inf")
