"""Conservation laws of DASGD, the elastic family and MixML's protocols, in all three runtimes.

With :class:`~tests.helpers.PureNoise` every process's k-th gradient is fixed in advance, so
what each protocol must conserve is known exactly whatever the schedule:

* doubly stochastic mixing (AllReduce, local steps, slack, gossip, pairwise averaging) keeps
  the average model at x⁰ − (η/n) Σ g — MixML's Assumption 1, M_∞ M_t = M_∞;
* the elastic symmetry keeps workers + center at (p + 1) x⁰ − η Σ g (EASGD, async EASGD);
* DOWNPOUR and the asynchronous parameter server end with x̃ = x⁰ − η Σ g;
* DASGD ends with every model equal to x⁰ − η Σ g (Remark 1, every gradient applied once).

A lost, duplicated or misrouted message, or an update applied twice, breaks these equalities,
so they test the effects' plumbing (Send, Post, Receive) as much as the programs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peerlearn.config import RunConfig
from peerlearn.runtime.local import ThreadRun
from peerlearn.runtime.worker import WorkerState
from peerlearn.sim.core import Status
from peerlearn.sim.runner import run_simulation
from peerlearn.testing import local_cluster
from tests.helpers import cfg, noise_sum

NOISE = {"name": "tests.helpers:PureNoise", "dim": 3}
ETA = 0.1
AVERAGING = [
    "allreduce",
    "local_steps",
    "reduced_frequency",
    "slack",
    "sync_gossip",
    "async_gossip",
]


def _run_cfg(algorithm: str, n: int = 6, steps: int = 23, **over: Any) -> RunConfig:
    return cfg(
        algorithm=algorithm,
        processes=n,
        clusters=3,
        steps=steps,
        problem=NOISE,
        lr={"eta": ETA},
        **over,
    )


def _expected(config: RunConfig, final: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(what the protocol conserves, its measured value) for the final models ``final``."""
    x0 = np.arange(1.0, 4.0)
    n, steps, algo = config.processes, config.steps or 0, config.algorithm
    if algo in ("easgd", "async_easgd", "downpour", "async_ps"):
        workers = [p for p in range(n) if p != config.center]
        total = noise_sum(config, dict.fromkeys(workers, steps))
        if algo in ("easgd", "async_easgd"):
            return n * x0 - ETA * total, np.sum(list(final.values()), axis=0)
        return x0 - ETA * total, final[config.center]
    total = noise_sum(config, dict.fromkeys(range(n), steps))
    return x0 - ETA * total / n, np.mean(list(final.values()), axis=0)


@pytest.mark.parametrize("algorithm", AVERAGING)
@pytest.mark.parametrize("seed", [0, 1])
def test_mixing_keeps_the_average_in_the_simulator(algorithm: str, seed: int) -> None:
    topology = "random-regular:3" if seed else "ring"
    config = _run_cfg(algorithm, seed=seed, topology=topology)
    result = run_simulation(config)
    assert result.status is Status.FINISHED
    want, got = _expected(config, {p.pid: p.x for p in result.processes})  # type: ignore[misc]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["allreduce", "local_steps", "reduced_frequency"])
def test_exact_averaging_ends_in_consensus(algorithm: str) -> None:
    config = _run_cfg(algorithm, steps=40)  # 40: a multiple of every default period
    result = run_simulation(config)
    xs = np.array([p.x for p in result.processes])
    assert np.abs(xs - xs[0]).max() < 1e-12
    # ... while with a slack matrix (γ < 1) or gossip the models still differ a little
    spread = run_simulation(_run_cfg("slack", steps=40)).max_pairwise_distance
    assert spread > 1e-6


@pytest.mark.parametrize("algorithm", ["easgd", "async_easgd", "downpour", "async_ps"])
@pytest.mark.parametrize("tau", [1, 3])
def test_elastic_family_conserves_in_the_simulator(algorithm: str, tau: int) -> None:
    config = _run_cfg(algorithm, elastic={"tau": tau, "center": "1.0"})
    result = run_simulation(config)
    assert result.status is Status.FINISHED
    want, got = _expected(config, {p.pid: p.x for p in result.processes})  # type: ignore[misc]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("topology", ["complete", "ring", "random-regular:3"])
def test_dasgd_applies_every_gradient_once_everywhere(topology: str) -> None:
    config = _run_cfg("dasgd", n=8, steps=15, topology=topology, sim={"link_spread": 0.9})
    result = run_simulation(config)
    assert result.status is Status.FINISHED
    want = np.arange(1.0, 4.0) - ETA * noise_sum(config, dict.fromkeys(range(8), 15))
    for p in result.processes:
        assert p.steps_done == 8 * 15  # |G_i| = every node's gradients
        np.testing.assert_allclose(p.x, want, rtol=0, atol=1e-12)  # type: ignore[arg-type]


def test_dasgd_relays_only_where_the_origin_did_not_post() -> None:
    """On the complete graph every node gets each gradient from its origin: no relay at all —
    n(n − 1) deliveries per round of gradients, plus one DONE and one COMPLETE per pair. On a
    ring relays are needed, and still each node receives each gradient at most twice (once per
    direction)."""
    n, steps = 6, 5
    complete = run_simulation(_run_cfg("dasgd", n=n, steps=steps, topology="complete"))
    assert complete.outcome.deliveries == n * (n - 1) * steps + 2 * n * (n - 1)
    ring = run_simulation(_run_cfg("dasgd", n=n, steps=steps, topology="ring"))
    assert ring.status is Status.FINISHED
    assert ring.outcome.deliveries <= 2 * n * (n - 1) * (steps + 2)


def test_dasgd_crash_blocks_the_survivors() -> None:
    """DASGD assumes no failures (Section 3.2): a node crashing before its DONE leaves the others
    waiting for its gradients forever — the simulator says so instead of hanging."""
    config = _run_cfg("dasgd", n=4, steps=10, sim={"crashes": ["process:0.0@t=3"]})
    result = run_simulation(config)
    assert result.status is Status.BLOCKED
    assert {b.tag for b in result.outcome.blocked} == {("inbox",)}


@pytest.mark.parametrize(
    "algorithm", ["dasgd", "async_gossip", "sync_gossip", "async_easgd", "downpour", "slack"]
)
def test_conservation_on_threads(algorithm: str) -> None:
    config = _run_cfg(algorithm, topology="ring" if "gossip" in algorithm else None)
    run = ThreadRun(config).start()
    assert run.wait(timeout=60), run.states()
    assert set(run.states()) == {WorkerState.FINISHED}
    final = {w.pid: w.x for w in run.workers}
    if algorithm == "dasgd":
        want = np.arange(1.0, 4.0) - ETA * noise_sum(config, dict.fromkeys(range(6), 23))
        for x in final.values():
            np.testing.assert_allclose(x, want, rtol=0, atol=1e-12)  # type: ignore[arg-type]
        return
    want, got = _expected(config, final)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("dasgd", {"topology": "ring"}),
        ("async_gossip", {}),
        ("async_easgd", {"elastic": {"center": "2.1"}}),
        ("downpour", {"elastic": {"tau": 2}}),
        ("sync_gossip", {}),
        ("allreduce", {}),
    ],
)
async def test_conservation_across_daemons(algorithm: str, extra: dict[str, Any]) -> None:
    """Three daemons × two workers on loopback: messages cross real sockets (Send and Post
    frames with recipients), and the same laws hold to the last bit of rounding."""
    async with local_cluster(
        3, workers=2, algorithm=algorithm, steps=25, problem=NOISE, lr={"eta": ETA}, **extra
    ) as cluster:
        await cluster.wait_until_finished(timeout=60)
        workers = [w for d in cluster.daemons for w in d.workers]
        assert {w.state for w in workers} == {WorkerState.FINISHED}
        config = cluster.daemons[0].run_cfg
        final = {w.pid: w.x for w in workers}
        if algorithm == "dasgd":
            want = np.arange(1.0, 4.0) - ETA * noise_sum(config, dict.fromkeys(range(6), 25))
            for x in final.values():
                np.testing.assert_allclose(x, want, rtol=0, atol=1e-12)  # type: ignore[arg-type]
        else:
            want, got = _expected(config, final)  # type: ignore[arg-type]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        sent = sum(
            n
            for (direction, *_), n in cluster.daemons[0].stats.messages.items()
            if direction == "out"
        )
        assert sent > 0
