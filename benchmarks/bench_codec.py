"""Wire codec throughput: a Data frame through ``send`` and ``get_buffer``/``buffer_updated``.

In memory, no socket: the sender's chunks (``prefix + header`` bytes, then a memoryview of the
array) are copied into the regions the receiving codec lends, the way ``recv_into`` fills them
under ``asyncio.BufferedProtocol``, then ``next_event`` returns the message. That is exactly one
copy of the payload, so the reference is one ``np.copyto`` of the same size into a preallocated
array, measured in the same run; "ratio" is codec GB/s / copyto GB/s (1.0 = no overhead).

Two allocators: ``pool`` hands out views of one preallocated buffer (what the daemon's pool
will do), ``fresh`` is the default ``np.empty`` — at 40 MB every page of a fresh array faults,
the trap ``peers/RESULTS.md`` measures. GB/s = payload bytes / median time per frame.

Run ``python benchmarks/bench_codec.py`` (a few seconds; ``--sizes`` in float64 elements).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from peerlearn.wire import NEED_DATA, Allocator, Codec, Data, default_allocator


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm up (first-touch of buffers, code paths)
    times = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e9


def pool_allocator(dtype: np.dtype[Any], shape: tuple[int, ...]) -> Allocator:
    """Views of one buffer (fine here: each frame is dropped before the next arrives)."""
    buffer = np.empty(shape, dtype)

    def allocate(dt: np.dtype[Any], sh: tuple[int, ...]) -> np.ndarray:
        assert dt == buffer.dtype and sh == buffer.shape
        return buffer.view()  # a fresh writable view; the codec marks the view read-only

    return allocate


def round_trip(msg: Data, allocator: Allocator) -> Callable[[], object]:
    sender, receiver = Codec(), Codec(allocator=allocator)

    def run() -> object:
        for chunk in sender.send(msg):
            src = memoryview(chunk)
            while src:
                region = receiver.get_buffer(-1)
                n = min(len(region), len(src))
                region[:n] = src[:n]
                receiver.buffer_updated(n)
                src = src[n:]
        event = receiver.next_event()
        assert isinstance(event, Data) and receiver.next_event() is NEED_DATA
        return event

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[5_000, 500_000, 5_000_000], help="float64s"
    )
    parser.add_argument("--reps", type=int, default=21, help="timed repetitions per row")
    args = parser.parse_args(argv)

    print(
        f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}"
    )
    print(f"| {'MB':>6} | {'what':<22} | {'µs/frame':>9} | {'GB/s':>6} | {'ratio':>5} |")
    print(f"|{'-' * 8}|{'-' * 24}|{'-' * 11}|{'-' * 8}|{'-' * 7}|")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        value = rng.standard_normal(size)
        nbytes = value.nbytes
        reps = args.reps if nbytes < 10**7 else max(5, args.reps // 2)
        dst = np.empty_like(value)
        ref = median_seconds(lambda: np.copyto(dst, value), reps)  # noqa: B023
        msg = Data(1, ("params", 1), 0, 1, value)
        send_only = Codec()
        rows = [
            ("np.copyto (reference)", ref),
            ("send only (no copy)", median_seconds(lambda: send_only.send(msg), reps)),  # noqa: B023
            (
                "send+receive, pool",
                median_seconds(round_trip(msg, pool_allocator(value.dtype, value.shape)), reps),
            ),
            ("send+receive, fresh", median_seconds(round_trip(msg, default_allocator), reps)),
        ]
        for what, seconds in rows:
            # sending copies nothing: its cost does not grow with the payload, so no GB/s
            rate, ratio = (
                ("—", "—")
                if what.startswith("send only")
                else (f"{nbytes / seconds / 1e9:.1f}", f"{ref / seconds:.2f}")
            )
            print(
                f"| {nbytes / 1e6:>6.2f} | {what:<22} | {seconds * 1e6:>9.1f} | "
                f"{rate:>6} | {ratio:>5} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
