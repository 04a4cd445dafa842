"""Giving memory back (peerlearn/transport/pool.py ``give_back_memory``): payloads below the
buffer pool's size come from the C heap, which keeps the pages of a freed backlog unless it is
trimmed — a daemon that took in its peers' windows at once would keep that peak for good. The
transport trims after such a backlog (tests/test_window.py); here, that a trim gives back."""

from __future__ import annotations

import os

import numpy as np
import pytest

from peerlearn.transport.pool import _TRIM, give_back_memory

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


@pytest.mark.skipif(_TRIM is None, reason="the C library has no malloc_trim (not glibc)")
def test_a_trim_gives_back_the_pages_of_a_freed_backlog() -> None:
    # 4,000 frames of a 1,000-parameter model (8 KB each, under the mmap threshold: heap
    # blocks), then all but every tenth freed — the ones kept pin the heap's top, so the
    # allocator cannot give the rest back by shrinking it.
    frames = [np.ones(1000) for _ in range(4000)]
    kept = frames[::10]
    before = _rss()
    del frames
    freed = _rss()
    backlog = 3600 * 8000
    if before - freed > backlog // 2:  # (GLIBC_TUNABLES' mmap_threshold low, say)
        pytest.skip("freeing alone gave the backlog back here: nothing for a trim to do")
    assert give_back_memory()
    after = _rss()
    assert before - after > backlog // 2  # the trim gives back most of it
    assert len(kept) == 400
