"""Reliable links where frames really are lost or doubled in flight.

On loopback a cut connection loses nothing that was already written: the kernel delivers it.
So these tests lose frames on purpose, in two ways:

* the transport's test-only fault hook (:attr:`peerlearn.transport.peers.Transport.fault`)
  loses a chosen frame — not delivered, not acked, its connection aborted, as when a link breaks
  with frames outstanding — or takes it twice, as if it had been resent;
* a connection is aborted while a large payload (1.6 MB) is half-way through it: the reset
  discards what the kernels still hold, the frame is cut off mid-way at the receiver.

The sender must resend what was not acked after the reconnect, the receiver must drop the copy of
a frame it delivered, and DASGD must relay each gradient once however many copies reach a node.
Each test checks its algorithm's law (Alg 1: every message arrives or the run blocks; DASGD:
every model is x⁰ − η Σ g; DOWNPOUR, async EASGD, async gossip: their conservation laws and the
center's exact number of requests served), so that removing any of the three — the receiver's
sequence check, the resend after a reconnect, DASGD's dedupe — fails a test here (see
docs/testing.md, "Reliability").
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import peerlearn.daemon.node
from peerlearn.algorithms.elastic import Variant, center_requests
from peerlearn.config import RunConfig
from peerlearn.runtime.worker import WorkerState
from peerlearn.sim.core import Status
from peerlearn.sim.runner import run_simulation
from peerlearn.testing import LocalCluster, local_cluster
from peerlearn.transport.peers import FaultAction, FrameFault, Transport
from peerlearn.transport.pool import BufferPool
from peerlearn.wire import Data
from tests.helpers import cfg, noise_sum

ETA = 0.1
NOISE: dict[str, Any] = {"name": "tests.helpers:PureNoise", "dim": 3}
#: 200 000 float64 = 1.6 MB a frame: above the receive-buffer pool's 1 MiB, and many reads
#: through a small receive window
BIG: dict[str, Any] = {"name": "tests.helpers:PureNoise", "dim": 200_000}
#: a run that loses frames finishes in seconds; one that lost a frame for good never does
FINISH = 60.0


# --- the fault hook ---------------------------------------------------------------------------


def every(period: int, first: int) -> Callable[[int], bool]:
    """Sequence numbers first, first + period, first + 2·period, …"""
    return lambda seq: seq >= first and (seq - first) % period == 0


@dataclass
class Faults:
    """What every daemon's fault hook does: frames whose per-link sequence number ``lose``
    picks are lost, those ``duplicate`` picks are taken twice — each once (a lost frame comes
    again after the reconnect, and is delivered then)."""

    lose: Callable[[int], bool]
    duplicate: Callable[[int], bool] = lambda seq: False
    faulted: set[tuple[int, int, int]] = field(default_factory=set)  # (receiver, sender, seq)
    lost: Counter[int] = field(default_factory=Counter)  # by receiving cluster
    duplicated: Counter[int] = field(default_factory=Counter)
    active: bool = True

    def hook(self, me: int) -> FrameFault:
        def fault(peer: int, data: Data) -> FaultAction:
            key = (me, peer, data.seq)
            if not self.active or key in self.faulted:
                return FaultAction.DELIVER
            if self.lose(data.seq):
                self.faulted.add(key)
                self.lost[me] += 1
                return FaultAction.LOSE
            if self.duplicate(data.seq):
                self.faulted.add(key)
                self.duplicated[me] += 1
                return FaultAction.DUPLICATE
            return FaultAction.DELIVER

        return fault


@contextmanager
def transports(setup: Callable[[Transport], None]) -> Iterator[list[Transport]]:
    """Every Transport a daemon creates inside the block gets ``setup(transport)`` at once —
    before its first frame can arrive (a daemon takes frames while it is still starting)."""
    made: list[Transport] = []

    class Hooked(Transport):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            setup(self)
            made.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peerlearn.daemon.node, "Transport", Hooked)
        yield made


@contextmanager
def faulty(faults: Faults) -> Iterator[list[Transport]]:
    def setup(t: Transport) -> None:
        t.fault = faults.hook(t.hello.cluster)

    with transports(setup) as made:
        yield made


async def settle(cluster: LocalCluster, faults: Faults, timeout: float = 20.0) -> None:
    """The run is over: stop the faults and wait until every link got everything it holds
    acked. (Some frames are not needed to finish — relayed copies, the replies to a last
    request — and may still be on their way; a daemon stopping now would wait drain_timeout
    for a peer no longer taking connections.) Polled: no event says "all acked"."""
    faults.active = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    links = [link for d in cluster.daemons if d.transport for link in d.transport.links]
    while any(link.outstanding for link in links):
        if loop.time() > deadline:
            raise TimeoutError(f"frames never acked after the faults stopped: {links}")
        await asyncio.sleep(0.01)


def check_links(cluster: LocalCluster, faults: Faults, lost: int, duplicated: int) -> None:
    """After :func:`settle`: the faults happened (at least ``lost`` and ``duplicated`` of them),
    each lost frame cost its link a reconnect, and each copy was dropped as a duplicate —
    quietly: no sequence gap, no connection closed over it."""
    assert faults.lost.total() >= lost and faults.duplicated.total() >= duplicated, faults
    reconnects = sum(d.stats.reconnects for d in cluster.daemons)
    assert reconnects >= faults.lost.total(), (reconnects, faults.lost)
    for i, d in enumerate(cluster.daemons):
        assert d.stats.dropped["duplicate"] >= faults.duplicated[i], dict(d.stats.dropped)
        assert d.stats.protocol_errors["sequence_gap"] == 0, dict(d.stats.protocol_errors)
    workers = [w for d in cluster.daemons for w in d.workers]
    assert {w.state for w in workers} == {WorkerState.FINISHED}


# --- Alg 1 with N = n: every message of every iteration is needed ----------------------------


async def test_alg1_needing_every_message_finishes_through_lost_and_doubled_frames() -> None:
    """N = n: a frame lost for good blocks every worker at its iteration. Every 11th frame on
    each link is lost (the receiver aborts the connection), every 7th taken twice; the run
    ends with the exact model x⁰ − (η/n) Σ g, every worker at T + 1."""
    steps = 40
    faults = Faults(lose=every(11, 5), duplicate=every(7, 3))
    with faulty(faults):
        async with local_cluster(
            3,
            workers=2,
            algorithm="alg1",
            steps=steps,
            quorum=6,
            max_failures=0,
            problem=NOISE,
            lr={"eta": ETA},
        ) as cluster:
            await cluster.wait_until_finished(timeout=FINISH)
            config = cluster.daemons[0].run_cfg
            want = np.arange(1.0, 4.0) - ETA / 6 * noise_sum(config, dict.fromkeys(range(6), steps))
            for w in (w for d in cluster.daemons for w in d.workers):
                assert w.step == steps + 1
                np.testing.assert_allclose(w.x, want, rtol=0, atol=1e-12)  # type: ignore[arg-type]
            await settle(cluster, faults)
            check_links(cluster, faults, lost=12, duplicated=12)


# --- DASGD on a ring: relayed gradients, dedupe by (origin, seq) ------------------------------


def relay_bound(n: int, messages: int) -> int:
    """Letters a DASGD ring may deliver for ``messages`` gradients, DONEs and COMPLETEs (one
    DONE and one COMPLETE per node): the origin posts
    each to its 2 neighbours, and every other node relays it at most once — the first copy it
    sees — to at most one neighbour (not the one it came from). A node relaying every copy (no
    dedupe) relays twice at the node opposite the origin: 2 + (n − 1) + 1 letters each."""
    return (2 + (n - 1)) * messages


async def test_dasgd_ring_applies_every_gradient_once_through_lost_and_doubled_frames() -> None:
    """Six DASGD nodes on a ring over three daemons: most gradients are relayed, so a node gets
    many of them twice, over both directions — and with the hook some frames twice more, or
    again after a lost one. Every model ends at x⁰ − η Σ of all gradients, each applied once,
    and no node relays a gradient more than once (the letters delivered stay within
    ``relay_bound``: without the dedupe they would exceed it by one per gradient)."""
    n, steps = 6, 60
    faults = Faults(lose=every(23, 9), duplicate=every(9, 2))
    with faulty(faults):
        async with local_cluster(
            3,
            workers=2,
            algorithm="dasgd",
            steps=steps,
            topology="ring",
            problem=NOISE,
            lr={"eta": ETA},
        ) as cluster:
            await cluster.wait_until_finished(timeout=FINISH)
            config = cluster.daemons[0].run_cfg
            want = np.arange(1.0, 4.0) - ETA * noise_sum(config, dict.fromkeys(range(n), steps))
            for w in (w for d in cluster.daemons for w in d.workers):
                assert w.step == n * steps + 1  # |G_i| = every node's gradients
                np.testing.assert_allclose(w.x, want, rtol=0, atol=1e-11)  # type: ignore[arg-type]
            await settle(cluster, faults)  # every letter is in (or refused by a finished node)
            letters = sum(sum(d.delivery.counts.values()) for d in cluster.daemons)
            # gradients, DONEs and COMPLETEs; measured without the dedupe: 2,620–2,800 (before
            # COMPLETE was sent; bound then 2,562, now 2,604) — not (n + 2)·n·steps, as a node
            # that finished relays nothing more
            assert letters <= relay_bound(n, n * steps + 2 * n), letters
            check_links(cluster, faults, lost=6, duplicated=12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dasgd_ring_relays_each_gradient_once_per_node_in_the_simulator(seed: int) -> None:
    """The relay law of the test above under the simulator's seeded schedules, where it does
    not depend on how fast the machine is: at most 1,344 letters here; a node relaying every
    copy (no dedupe) delivers 1,474–1,479 (seeds 0–3, before COMPLETE was sent)."""
    n, steps = 6, 30
    config = cfg(
        algorithm="dasgd",
        processes=n,
        clusters=3,
        steps=steps,
        topology="ring",
        seed=seed,
        problem=NOISE,
        lr={"eta": ETA},
        sim={"link_spread": 0.9},
    )
    result = run_simulation(config)
    assert result.status is Status.FINISHED
    assert result.outcome.deliveries <= relay_bound(n, n * steps + 2 * n)


# --- Post-based algorithms: requests to a center, pairwise gossip -----------------------------


def _conserved(config: RunConfig, final: dict[int, Any]) -> tuple[Any, Any]:
    """(what the algorithm conserves, its measured value) — tests/test_protocols.py's laws."""
    x0 = np.arange(1.0, 4.0)
    n, steps = config.processes, config.steps or 0
    if config.algorithm in ("async_easgd", "downpour"):
        workers = [p for p in range(n) if p != config.center]
        total = noise_sum(config, dict.fromkeys(workers, steps))
        if config.algorithm == "async_easgd":  # the elastic symmetry: workers + center
            return n * x0 - ETA * total, np.sum(list(final.values()), axis=0)
        return x0 - ETA * total, final[config.center]  # the center took every update once
    total = noise_sum(config, dict.fromkeys(range(n), steps))  # pairwise averaging: the mean
    return x0 - ETA * total / n, np.mean(list(final.values()), axis=0)


POSTED = [
    ("downpour", {"elastic": {"tau": 2}}, Variant.DOWNPOUR),
    ("async_easgd", {"elastic": {"center": "2.1"}}, Variant.ASYNC),
    ("async_gossip", {"topology": "ring"}, None),
]


@pytest.mark.parametrize(("algorithm", "extra", "variant"), POSTED, ids=[p[0] for p in POSTED])
async def test_posted_messages_are_taken_once_through_lost_and_doubled_frames(
    algorithm: str, extra: dict[str, Any], variant: Variant | None
) -> None:
    """Posts go into inboxes, where nothing is deduplicated: a request taken twice moves the
    center twice (and it stops one request early, leaving a worker waiting for good), a pairing
    taken twice moves a gossip partner twice, a lost one leaves its sender waiting. With frames
    lost and doubled the conservation law holds exactly, and the center served exactly the
    requests the workers sent."""
    steps = 30
    faults = Faults(lose=every(13, 4), duplicate=every(5, 2))
    with faulty(faults):
        async with local_cluster(
            3, workers=2, algorithm=algorithm, steps=steps, problem=NOISE, lr={"eta": ETA}, **extra
        ) as cluster:
            await cluster.wait_until_finished(timeout=FINISH)
            config = cluster.daemons[0].run_cfg
            workers = [w for d in cluster.daemons for w in d.workers]
            want, got = _conserved(config, {w.pid: w.x for w in workers})
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
            if variant is not None:
                (center,) = (w for w in workers if w.pid == config.center)
                tau = config.elastic.tau
                requests = (config.processes - 1) * center_requests(variant, steps, tau)
                assert center.step == requests + 1  # its model report after the last one
            await settle(cluster, faults)
            check_links(cluster, faults, lost=3, duplicated=6)


# --- frames lost for real: a link cut while large payloads are in flight ---------------------


async def _cut_mid_frame(cluster: LocalCluster, deadline: float) -> int:
    """Abort the first inbound connection found in the middle of a frame's payload: the rest
    of that frame is in the kernels' buffers or still with the sender, and the reset discards
    it on both ends — the frame is lost in flight. The number of its bytes not received."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        for d in cluster.daemons:
            assert d.transport is not None
            for proto in list(d.transport._inbound):
                codec = proto.codec
                if codec._reading and proto.transport is not None:
                    missing = codec._part_end - codec._filled
                    proto.transport.abort()
                    return missing
        # Every turn of the loop: a 1.6 MB payload arrives in a few reads of a few hundred kB.
        await asyncio.sleep(0)
    raise TimeoutError("no connection in the middle of a frame to cut")


async def test_a_link_cut_with_large_frames_in_flight_loses_nothing() -> None:
    """Alg 1 with N = n on 1.6 MB models, three daemons whose receive windows are small (64 kB,
    as on a slow link), so that a frame takes many reads to arrive. Cut a connection four times
    while a frame is half-way through it: that frame really is lost in flight (the reset
    discards what the kernels still hold). The sender resends it after the reconnect: every
    worker finishes with the exact model."""
    steps = 24
    async with local_cluster(
        3,
        workers=1,
        algorithm="alg1",
        steps=steps,
        quorum=3,
        max_failures=0,
        problem=BIG,
        lr={"eta": ETA},
        start=False,
    ) as cluster:
        for d in cluster.daemons:  # accepted connections inherit the listener's buffer size
            assert d._listen_socket is not None
            d._listen_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        for d in cluster.daemons:
            await d.start()
        loop = asyncio.get_running_loop()
        cut_bytes = []
        for at in (2, 7, 12, 17):
            await cluster.wait_for(lambda at=at: cluster.min_step() >= at)  # type: ignore[misc]
            cut_bytes.append(await _cut_mid_frame(cluster, loop.time() + 20))
        await cluster.wait_until_finished(timeout=FINISH)
        assert all(b > 0 for b in cut_bytes), cut_bytes
        assert sum(d.stats.reconnects for d in cluster.daemons) >= len(cut_bytes)
        config = cluster.daemons[0].run_cfg
        want = np.arange(1.0, BIG["dim"] + 1) - ETA / 3 * noise_sum(
            config, dict.fromkeys(range(3), steps)
        )
        for w in (w for d in cluster.daemons for w in d.workers):
            assert w.state is WorkerState.FINISHED and w.step == steps + 1
            np.testing.assert_allclose(w.x, want, rtol=0, atol=1e-9)  # type: ignore[arg-type]


# --- the receive-buffer pool (payloads ≥ 1 MiB) -----------------------------------------------


def _address(a: np.ndarray[Any, Any]) -> int:
    return int(a.__array_interface__["data"][0])


def test_buffer_pool_reuses_an_array_only_once_nothing_holds_it() -> None:
    """An array the pool handed out comes back only when nothing references it — not the
    receiver of the message, not a view of it; small payloads are never pooled, and the pool
    keeps at most ``max_bytes``."""
    pool = BufferPool(min_bytes=1 << 20, max_bytes=4 << 20)  # room for two 1.6 MB arrays
    f8, shape = np.dtype(np.float64), (200_000,)
    a = pool(f8, shape)
    a[:] = 1.0
    a.flags.writeable = False  # as delivery shares it
    where = _address(a)
    b = pool(f8, shape)  # a is held: another array
    b_where = _address(b)
    assert b_where != where and pool.allocated == 2 and pool.reused == 0
    view = a[10:20]
    del a
    gc.collect()
    c = pool(f8, shape)  # a's view holds it: still not reused
    assert _address(c) != where and pool.reused == 0
    assert np.all(view == 1.0)
    assert pool.allocated == 3  # beyond max_bytes: c is not kept for later
    del view
    d = pool(f8, shape)  # now nothing holds it: the same memory, writable again
    assert _address(d) == where and pool.reused == 1 and d.flags.writeable
    del b
    e = pool(f8, shape)  # b's array is free too
    assert _address(e) == b_where and pool.reused == 2
    small = pool(f8, (1000,))  # 8 kB: allocated fresh, never kept
    assert pool.allocated == 3 and pool.reused == 2
    del small
    other = pool(np.dtype(np.float32), shape)  # 800 kB of float32: below min_bytes
    assert other.dtype == np.float32 and pool.allocated == 3


async def test_received_large_payloads_are_never_overwritten_while_held() -> None:
    """Alg 1 on 1.6 MB models: every payload is read into a pooled buffer. Hold on to every
    third one received (as a slow mailbox or a program would) and let the rest go. The pool
    recycles the released buffers — but no frame ever lands in one still held: each held payload
    still equals its copy at the end, and every worker's model is exact."""
    steps = 24
    kept: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []

    def setup(t: Transport) -> None:
        deliver = t._deliver

        def keep_some(data: Data) -> None:
            if data.tag[1] % 3 == 0:
                kept.append((data.value, data.value.copy()))
            deliver(data)

        t._deliver = keep_some

    with transports(setup) as made:
        async with local_cluster(
            3,
            workers=1,
            algorithm="alg1",
            steps=steps,
            quorum=3,
            max_failures=0,
            problem=BIG,
            lr={"eta": ETA},
        ) as cluster:
            await cluster.wait_until_finished(timeout=FINISH)
            config = cluster.daemons[0].run_cfg
            want = np.arange(1.0, BIG["dim"] + 1) - ETA / 3 * noise_sum(
                config, dict.fromkeys(range(3), steps)
            )
            for w in (w for d in cluster.daemons for w in d.workers):
                assert w.state is WorkerState.FINISHED
                np.testing.assert_allclose(w.x, want, rtol=0, atol=1e-9)  # type: ignore[arg-type]
    assert len(kept) == 3 * 2 * (steps // 3)  # each daemon gets 2 frames per iteration
    for value, copy in kept:
        np.testing.assert_array_equal(value, copy)
    received = 3 * 2 * steps
    # Recycled: the buffers let go were taken again, so far fewer were ever allocated.
    assert sum(t.pool.reused for t in made) > received // 3, [t.pool.reused for t in made]
    assert sum(t.pool.allocated for t in made) < received - len(kept)


# --- longer runs (make test-slow) -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("alg1", {"quorum": 6, "max_failures": 0}),
        ("dasgd", {"topology": "ring"}),
        ("downpour", {"elastic": {"tau": 1}}),
        ("async_easgd", {"elastic": {"center": "1.0"}}),
        ("async_gossip", {"topology": "ring"}),
    ],
)
async def test_long_runs_with_frequent_faults(algorithm: str, extra: dict[str, Any]) -> None:
    """Every 5th frame lost, every 3rd doubled (of those not lost), 200 iterations: the laws of
    the fast tests hold."""
    steps = 200
    faults = Faults(lose=every(5, 1), duplicate=every(3, 0))
    with faulty(faults):
        async with local_cluster(
            3, workers=2, algorithm=algorithm, steps=steps, problem=NOISE, lr={"eta": ETA}, **extra
        ) as cluster:
            await cluster.wait_until_finished(timeout=600)
            config = cluster.daemons[0].run_cfg
            workers = [w for d in cluster.daemons for w in d.workers]
            final = {w.pid: w.x for w in workers}
            if algorithm in ("alg1", "dasgd"):
                per = 1 if algorithm == "dasgd" else 6
                want = np.arange(1.0, 4.0) - ETA / per * noise_sum(
                    config, dict.fromkeys(range(6), steps)
                )
                for x in final.values():
                    np.testing.assert_allclose(x, want, rtol=0, atol=1e-10)  # type: ignore[arg-type]
            else:
                want, got = _conserved(config, final)
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)
            await settle(cluster, faults)
            check_links(cluster, faults, lost=100, duplicated=100)
