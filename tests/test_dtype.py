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
from peerlearn.daemon.config import load_node_config
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


def test_unset_and_the_problems_own_dtype_are_one_run() -> None:
    # The fingerprint leaves dtype out (runs from before the setting keep theirs, and their
    # checkpoints stay resumable); the handshake compares the dtype each daemon resolved.
    def fingerprint(**fields: Any) -> str:
        addrs = ["127.0.0.1:7000", "127.0.0.1:7001"]
        cfg = load_node_config(None, {"listen": addrs[0], "peers": addrs, **fields})
        return cfg.fingerprint

    assert fingerprint() == fingerprint(dtype="float64") == fingerprint(dtype="float32")


async def test_a_daemon_of_another_dtype_is_refused_and_says_why() -> None:
    async with local_cluster(
        2,
        workers=1,
        algorithm="alg1",
        problem=QUAD,
        each=lambda i: {"dtype": ("float32", "float64")[i]},
    ) as c:
        links = [link for d in c.daemons for link in d.links]
        await c.wait_for(lambda: all(link.last_error for link in links), 30)
        assert all("dtype differs" in (link.last_error or "") for link in links)


def test_a_cast_oracle_tells_what_its_process_tells() -> None:
    # A torch process's oracle counts epochs (/status, peerlearn_epochs): a cast keeps that.
    class Counting:
        epochs = 2.5

        def __call__(self, x: Any, rng: np.random.Generator) -> Any:
            return np.ones(3)

    class Own(type(make_problem("quadratic", dim=3))):  # type: ignore[misc]
        def oracle(self, pid: int, processes: int, local: int) -> Any:
            return Counting()

    oracle = in_dtype(Own(dim=3), "float32").oracle(0, 1, 1)
    assert oracle(np.zeros(3, np.float32), np.random.default_rng()).dtype == np.float32
    assert oracle.epochs == 2.5
