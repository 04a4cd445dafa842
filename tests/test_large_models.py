"""Large models (issue 16): 3·10⁷ float32 parameters (120 MB a frame) between two real daemons.

The daemon sizes everything by the model's bytes: the codec's payload cap is the model's size
(dim × itemsize, not a fixed 256 MiB), a link's window is ``queue_bytes`` worth of frames (2
here), the tag window is ``tag_window_bytes`` worth (its minimum, 8 iterations), and payloads
over the buffer pool's threshold are read into recycled arrays. Alg 1 with two processes and no
crash tolerance averages both models every iteration, in the same order on both daemons: the
models end equal bit for bit only if every frame arrived intact. Each frame goes in 4 MiB parts
(protocol 6), so the bytes received count one more prefix per part.

``PEERLEARN_LARGE_DIM=100000000`` runs it by hand at 10⁸ parameters (400 MB a frame; about 13 GB
for both daemons in one process): benchmarks/RESULTS.md, "Large models"."""

from __future__ import annotations

import os

import numpy as np
import pytest

from peerlearn.daemon.node import DaemonState
from peerlearn.daemon.routing import MIN_WINDOW
from peerlearn.testing import local_cluster
from peerlearn.wire import PREFIX
from peerlearn.wire.codec import DEFAULT_PART_BYTES

DIM = int(os.environ.get("PEERLEARN_LARGE_DIM", 30_000_000))


@pytest.mark.slow
async def test_a_model_of_3e7_float32_parameters_arrives_intact() -> None:
    async with local_cluster(
        2,
        workers=1,
        algorithm="alg1",
        problem={"name": "quadratic", "dim": DIM},
        dtype="float32",
        steps=3,
        max_failures=0,
        eval_every=1000,  # a loss over 3·10⁷ coordinates is not what this measures
    ) as c:
        await c.wait_for(lambda: all(d.state is DaemonState.FINISHED for d in c.daemons), 600)
        a, b = (d.workers[0].x for d in c.daemons)
        assert a is not None and b is not None
        assert a.dtype == np.float32 and a.shape == (DIM,)
        assert np.array_equal(a, b)  # both averaged the same two models, received whole
        start = c.daemons[0].problem.x0()  # type: ignore[union-attr]
        assert not np.array_equal(a, start)
        for d in c.daemons:
            assert d.tag_window == MIN_WINDOW
            assert d.stats.protocol_errors.get("bad_data", 0) == 0
            frames = sum(n for (way, kind, _), n in d.stats.messages.items() if way == "in")
            size = sum(n for (way, kind, _), n in d.stats.bytes.items() if way == "in")
            parts = -(-DIM * 4 // DEFAULT_PART_BYTES)
            # the peer's params, 120 MB each, in 4 MiB parts
            assert frames >= 3 and size >= 3 * (DIM * 4 + parts * PREFIX.size)
