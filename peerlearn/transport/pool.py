"""Receive buffers: payload arrays reused once nothing references them any more.

A large payload is read straight into an array from this pool (DESIGN "Buffers"). Fresh
allocations over ~32 MB cost 2× a copy here (`peers/RESULTS.md`), so big arrays are recycled
— but never while a mailbox, a register or a program still holds the array or a view of it.
"Nothing references it" is read off the reference count: the pool's own list entry is then
the only holder. Views of an array keep the array itself alive (numpy makes it their
``base``), so a live view always shows up in that count.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from peerlearn.effects import Vector

__all__ = ["BufferPool", "give_back_memory"]


def _only_the_pool() -> int:
    """The reference count of an array held by nothing but a pool list, read in the same code
    shape as the check in ``BufferPool.__call__`` (list slot + loop variable + getrefcount's
    argument: 3 on CPython 3.11). Measured, not assumed: interpreters that elide references
    (3.14, free-threaded builds) report fewer, and a hard-coded 3 would then hand out an array
    still in use."""
    arrays = [np.empty(1)]
    for arr in arrays:
        return sys.getrefcount(arr)
    raise AssertionError("unreachable")


_ONLY_THE_POOL = _only_the_pool()


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, which returns the free pages of every heap arena to the
    system; None where the C library has none (musl, macOS: nothing to give back this way)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # (TypeError: Windows has no CDLL(None))
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


_TRIM = _malloc_trim()


def give_back_memory() -> bool:
    """Return the C heap's free pages to the system (payloads too small for the pool — under
    ``min_bytes`` — come from it, and the allocator keeps a peak of them otherwise); False
    where the C library cannot. It walks every arena's free blocks: milliseconds for a heap of
    100 MB, up to a few hundred for a fragmented one of 300 MB — call it off the event loop."""
    if _TRIM is None:
        return False
    _TRIM()
    return True


class BufferPool:
    """Reusable arrays for payloads of at least ``min_bytes``; smaller ones are allocated
    fresh (cheap). At most ``max_bytes`` are kept around."""

    def __init__(self, min_bytes: int = 1 << 20, max_bytes: int = 1 << 30) -> None:
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self._arrays: dict[tuple[str, tuple[int, ...]], list[Vector]] = {}
        self._held = 0
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def __call__(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Vector:
        """The codec's allocator: a writable C-contiguous array of ``dtype`` and ``shape``."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        key = (dtype.str, shape)
        with self._lock:
            arrays = self._arrays.setdefault(key, [])
            for arr in arrays:
                if sys.getrefcount(arr) <= _ONLY_THE_POOL:
                    arr.flags.writeable = True  # the owner may lift its own read-only flag
                    self.reused += 1
                    return arr
            out: Vector = np.empty(shape, dtype)
            self.allocated += 1
            if self._held + nbytes <= self.max_bytes:
                arrays.append(out)
                self._held += nbytes
            return out
