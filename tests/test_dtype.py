"""The run's dtype (``dtype = "float32" | "float64"``): models, gradients, the register store and
the wire in it. float64 is the default for the bundled problems (the specs' bounds are checked
in it); float32 halves every frame. Every algorithm keeps float32 models float32 — numpy would
silently promote them on meeting a float64 array or NumPy scalar, and a daemon's peers refuse a
frame of the wrong dtype (``bad_data``), so a promotion anywhere on the way stops a run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peerlearn.algorithms.registry import ALGORITHMS
from peerlearn.config import RunConfig
from peerlearn.daemon.node import DaemonState
from peerlearn.problems import in_dtype, make_problem
from peerlearn.problems.base import InDtype
from peerlearn.sim import Status
from peerlearn.sim.runner import run_simulation
from peerlearn.testing import local_cluster

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 10}
WITH_PROBLEM = [a for a in ALGORITHMS if a != "maa"]


def test_a_problem_in_float32_casts_its_start_and_every_gradient_once() -> None:
    base = make_problem("quadratic", dim=10)
    assert in_dtype(base, None) is base and in_dtype(base, "float64") is base
    p = in_dtype(base, "float32")
    assert isinstance(p, InDtype) and p.dtype == np.float32 and p.dim == 10
    x = p.x0()
    assert x.dtype == np.float32
    assert np.array_equal(x, base.x0().astype(np.float32))
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    g = p.oracle(0, 2, 1)(x, rng_a)
    assert g.dtype == np.float32
    assert np.array_equal(g, base.grad(x, rng_b).astype(np.float32))
    assert p.full_grad(x).dtype == np.float32
    assert p.loss(x) == base.loss(x)  # computed in the problem's own precision


@pytest.mark.parametrize("algorithm", WITH_PROBLEM)
def test_every_algorithm_keeps_float32_models_float32(algorithm: str) -> None:
    def run(dtype: str) -> Any:
        short = {"maa": {"rounds": 3, "inner_rounds": 2}} if algorithm == "alg2" else {}
        cfg = RunConfig(
            algorithm=algorithm,
            steps=40,
            processes=4,
            clusters=2,
            dtype=dtype,
            problem=QUAD,
            **short,
        )
        return run_simulation(cfg)

    single, double = run("float32"), run("float64")
    assert single.status is Status.FINISHED, single.failure_traceback
    models = [p.x for p in single.live() if p.x is not None]
    assert models and all(x.dtype == np.float32 for x in models)
    assert all(p.x is not None and p.x.dtype == np.float64 for p in double.live())
    # The same run in float32: the same descent, to float32's precision (the losses here are
    # O(0.01–1); float32 keeps 7 digits, 40 steps lose a few).
    assert single.final_loss is not None and double.final_loss is not None
    assert single.final_loss == pytest.approx(double.final_loss, rel=1e-3, abs=1e-5)


def test_standalone_agreement_says_dtype_does_not_apply() -> None:
    cfg = RunConfig(algorithm="maa", steps=2, processes=4, clusters=2, dtype="float32")
    assert any(w.startswith("dtype is ignored by maa") for w in cfg.unused_settings())


@pytest.mark.parametrize("algorithm", ["alg1", "alg2", "dasgd", "async_easgd", "async_gossip"])
async def test_daemons_in_float32_send_half_the_bytes(algorithm: str) -> None:
    extra: dict[str, Any] = {}
    if algorithm == "alg2":  # agreement short, as daemons run it in tests
        extra["maa"] = {"rounds": 3, "inner_rounds": 2}
    async with local_cluster(
        3,
        workers=1,
        algorithm=algorithm,
        problem={"name": "quadratic", "dim": 1000},
        steps=30,
        dtype="float32",
        **extra,
    ) as c:
        await c.wait_for(lambda: all(d.state is DaemonState.FINISHED for d in c.daemons), 60)
        for d in c.daemons:
            assert d.dtype == np.float32
            assert all(w.x is not None and w.x.dtype == np.float32 for w in d.workers)
            assert d.stats.protocol_errors.get("bad_data", 0) == 0
            frames = sum(n for (way, kind, _), n in d.stats.messages.items() if way == "in")
            size = sum(n for (way, kind, _), n in d.stats.bytes.items() if way == "in")
            assert frames > 0
            # 1000 float32 parameters and a header: 4 KB a frame, not float64's 8 KB
            assert 4000 <= size / frames < 5000
