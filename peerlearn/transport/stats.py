"""Transport counters, read by the metrics exporter at scrape time (cheap on the hot path)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["TransportStats"]


@dataclass
class TransportStats:
    """Counters keyed by small, bounded label tuples.

    ``messages``/``bytes``: (direction, kind, peer) — peers are the static membership, so the
    label set stays bounded. ``protocol_errors``: reason. ``dropped``: reason.
    """

    messages: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    bytes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    protocol_errors: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    queue_waits: int = 0
    reconnects: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, direction: str, kind: str, peer: str, nbytes: int) -> None:
        with self._lock:
            self.messages[(direction, kind, peer)] += 1
            self.bytes[(direction, kind, peer)] += nbytes

    def error(self, reason: str) -> None:
        with self._lock:
            self.protocol_errors[reason] += 1

    def drop(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.dropped[reason] += n
