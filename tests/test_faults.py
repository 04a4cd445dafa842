"""Faults on real sockets: hostile bytes on the peer port, links cut mid-run, a worker that
raises. (Heavier fault combinations run in the simulator.)"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

import numpy as np
import pytest

from peerlearn.daemon.node import DaemonState
from peerlearn.runtime.worker import Worker, WorkerState
from peerlearn.testing import LocalCluster, local_cluster
from peerlearn.wire import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Codec,
    Data,
    Hello,
    Join,
    Refuse,
    Welcome,
)
from tests.helpers import noise_sum, oracle_fault, raises

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 10, "sigma": 1.0}


async def _exchange(port: int, payload: bytes) -> bytes:
    """Send raw bytes to a daemon's peer port and read until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()  # nothing more comes: a partial frame is now a truncated one
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # EOF: the daemon closed it
    writer.close()
    return data


async def _after_handshake(port: int, handshake: bytes, then: bytes) -> None:
    """Send a handshake, wait for its Ack (a dialer sends nothing else before: until then only
    small frames are taken), then send ``then`` and read until the daemon closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake)
    codec = Codec()
    while not any(isinstance(m, Ack) for m in _events(codec)):
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data, "closed before the Ack"
        codec.receive_data(data)
    writer.write(then)
    writer.write_eof()
    await writer.drain()
    await asyncio.wait_for(reader.read(), 10)
    writer.close()


def _events(codec: Codec) -> list[Any]:
    out = []
    while (event := codec.next_event()) is not NEED_DATA and event is not CLOSED:
        out.append(event)
    return out


def _hello(cluster: LocalCluster, member: int = 1, **over: Any) -> Hello:
    fields: dict[str, Any] = {
        "min_version": PROTOCOL_VERSION,
        "max_version": PROTOCOL_VERSION,
        "cluster": member,
        "incarnation": cluster.daemons[member].incarnation,
        "nonce": 1,
        "name": "intruder",
    }
    return Hello(**{**fields, **over})


def _join(cluster: LocalCluster, member: int = 1, **over: Any) -> Join:
    d = cluster.daemons[member]
    fields: dict[str, Any] = {
        "workers": d.pids,
        "dim": d.dim,
        "dtype": "float64",
        "fingerprint": d.cfg.fingerprint,
    }
    return Join(**{**fields, **over})


def _refusal(answer: bytes) -> Refuse:
    """The Refuse in a daemon's answer to a Hello and a Join (after its Welcome)."""
    codec = Codec()
    codec.receive_data(answer)
    welcome, refusal = codec.next_event(), codec.next_event()
    assert isinstance(welcome, Welcome) and isinstance(refusal, Refuse), (welcome, refusal)
    return refusal


def _frames(*msgs: Any) -> bytes:
    codec = Codec()
    return b"".join(bytes(chunk) for m in msgs for chunk in codec.send(m))


async def test_bad_input_closes_that_connection_counts_it_and_training_goes_on() -> None:
    async with local_cluster(3, workers=1, algorithm="alg1", steps=None, problem=QUAD) as cluster:
        target = cluster.daemons[0]
        port = target.peer_port
        assert port is not None
        await cluster.wait_for(lambda: cluster.min_step() > 5)

        await _exchange(port, np.random.default_rng(0).bytes(4096))  # random bytes
        prefix = struct.pack("!2sBBIQ", b"PL", PROTOCOL_VERSION, 0, 16, 1 << 40)
        await _exchange(port, prefix)  # oversized payload length
        huge_header = struct.pack("!2sBBIQ", b"PL", PROTOCOL_VERSION, 0, 1 << 30, 0)
        await _exchange(port, huge_header)  # oversized header length
        await _exchange(port, _frames(_hello(cluster))[:-3])  # a truncated frame
        hello = _hello(cluster)
        answer = await _exchange(port, _frames(hello, _join(cluster, fingerprint="0" * 32)))
        assert _refusal(answer).reason == "fingerprint_mismatch"
        answer = await _exchange(port, _frames(hello, _join(cluster, workers=(7,))))
        # only the reason code goes back: this run's membership stays with this daemon
        assert _refusal(answer).reason == "membership_mismatch"
        # a Hello from an earlier start of cluster 1 than the one connected
        stale = _hello(cluster, incarnation=cluster.daemons[1].incarnation - 1)
        codec = Codec()
        codec.receive_data(await _exchange(port, _frames(stale)))
        refusal = codec.next_event()
        assert isinstance(refusal, Refuse) and refusal.reason == "stale_incarnation"

        errors = target.stats.protocol_errors
        for reason in (
            "bad_magic",
            "payload_too_large",
            "header_too_large",
            "truncated",
            "fingerprint_mismatch",
            "membership_mismatch",
            "stale_incarnation",
        ):
            assert errors[reason] >= 1, (reason, dict(errors))
        metrics = (await cluster.client(0).get("/metrics")).text
        assert 'peerlearn_protocol_errors_total{reason="bad_magic"} 1.0' in metrics
        before = cluster.min_step()
        await cluster.wait_for(lambda: cluster.min_step() > before + 10)
        assert target.state is DaemonState.RUNNING


async def test_a_stranger_varying_its_hello_gets_one_log_line_not_one_per_try(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refusals are logged per remote host and reason: ten Hellos from one host, each with
    another name and fingerprint, make one ERROR line (the throttle once keyed on the claimed
    name, so every made-up name was logged anew) — and all ten are refused and counted."""
    async with local_cluster(2, workers=1, algorithm="alg1", steps=None, problem=QUAD) as cluster:
        port = cluster.daemons[0].peer_port
        assert port is not None
        caplog.set_level(logging.ERROR, logger="peerlearn.transport.peers")
        for i in range(10):
            hello = _hello(cluster, name=f"stranger-{i}")
            join = _join(cluster, fingerprint=f"{i:032x}")
            refusal = _refusal(await _exchange(port, _frames(hello, join)))
            assert refusal.reason == "fingerprint_mismatch"
        lines = [r for r in caplog.records if r.getMessage().startswith("refusing")]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert cluster.daemons[0].stats.protocol_errors["fingerprint_mismatch"] == 10


def _cut_every_link(cluster: LocalCluster) -> None:
    """Abort every outbound connection of every daemon (they reconnect with backoff)."""
    for d in cluster.daemons:
        assert d.transport is not None
        for link in d.transport.links:
            if link._proto is not None and link._proto.transport is not None:
                link._proto.transport.abort()


async def test_links_cut_and_restored_lose_no_message() -> None:
    """Alg 1 with N = n needs every message of every iteration: a single lost frame would block
    it for good. Cut every connection twice mid-run; the run still finishes."""
    async with local_cluster(
        3, workers=2, algorithm="alg1", steps=150, quorum=6, max_failures=0, problem=QUAD
    ) as cluster:
        for cut_at in (30, 80):
            await cluster.wait_for(lambda at=cut_at: cluster.min_step() > at)  # type: ignore[misc]
            _cut_every_link(cluster)
        await cluster.wait_until_finished()
        assert all(w.state is WorkerState.FINISHED for d in cluster.daemons for w in d.workers)
        assert sum(d.stats.reconnects for d in cluster.daemons) >= 6
        xs = [w.x for d in cluster.daemons for w in d.workers]
        assert all(x is not None for x in xs)


async def test_dasgd_applies_every_gradient_once_across_reconnects() -> None:
    """DASGD's exactly-once delivery over real links: cut every connection twice while the
    gradients flow (ring topology: most of them are relayed); resend + acks + dedupe leave every
    model equal to x⁰ − η Σ of all gradients, each applied once (Remark 1)."""
    noise = {"name": "tests.helpers:PureNoise", "dim": 3}
    async with local_cluster(
        3,
        workers=2,
        algorithm="dasgd",
        steps=150,
        topology="ring",
        problem=noise,
        lr={"eta": 0.1},
    ) as cluster:
        for cut_at in (200, 500):  # local steps: each node applies 6 × 150 gradients
            await cluster.wait_for(lambda at=cut_at: cluster.min_step() > at)  # type: ignore[misc]
            _cut_every_link(cluster)
        await cluster.wait_until_finished()
        assert sum(d.stats.reconnects for d in cluster.daemons) >= 6
        config = cluster.daemons[0].run_cfg
        want = np.arange(1.0, 4.0) - 0.1 * noise_sum(config, dict.fromkeys(range(6), 150))
        for d in cluster.daemons:
            for w in d.workers:
                assert w.state is WorkerState.FINISHED and w.step == 6 * 150 + 1
                np.testing.assert_allclose(w.x, want, rtol=0, atol=1e-11)  # type: ignore[arg-type]
        text = (await cluster.client(0).get("/metrics")).text
        assert "peerlearn_gradient_staleness_count 1800.0" in text  # 2 workers × 900 steps


Explodes = oracle_fault(10, raises("injected"))  # worker 0.0 crashes at iteration 10


async def test_a_crashed_worker_leaves_the_daemon_serving_and_relaying() -> None:
    async with local_cluster(
        3,
        workers=2,
        algorithm="alg1",
        steps=60,
        problem=QUAD,
        worker_factory=lambda i: Explodes if i == 0 else Worker,
    ) as cluster:
        await cluster.wait_until_finished()
        crashed = cluster.daemons[0].workers[0]
        assert crashed.state is WorkerState.CRASHED and crashed.error == "RuntimeError: injected"
        others = [w for d in cluster.daemons for w in d.workers if w is not crashed]
        assert all(w.state is WorkerState.FINISHED for w in others)
        # Its mailbox is retired: nothing is buffered for a process that will never read.
        assert crashed.mailbox.buffered == 0
        assert cluster.daemons[0].stats.dropped["receiver_exited"] > 0
        status = (await cluster.client(0).get("/status")).json()
        assert status["workers"][0]["state"] == "crashed"
        assert status["workers"][1]["state"] == "finished"


async def test_a_finished_daemon_leaving_still_delivers_to_a_late_peer() -> None:
    """Daemons 0 and 1 (4 of 6 processes, N = 4) can finish without daemon 2. Stopping them
    drains what they queued for daemon 2, which starts only then — and still finishes."""
    async with local_cluster(
        3, workers=2, algorithm="alg1", steps=30, problem=QUAD, start=False
    ) as cluster:
        early, late = cluster.daemons[:2], cluster.daemons[2]
        # Daemon 2 is not running yet: nothing listens on its port, connections are refused.
        sock = late._listen_socket
        assert sock is not None
        port = sock.getsockname()[1]
        sock.close()
        for d in early:
            await d.start()
        await cluster.wait_for(lambda: all(d.state is DaemonState.FINISHED for d in early))
        stopping = asyncio.gather(*(d.stop() for d in early))
        await asyncio.sleep(0)  # let the stops begin while daemon 2 is still away
        late._listen_socket = socket.create_server(("127.0.0.1", port), reuse_port=False)
        late._listen_socket.setblocking(False)
        await late.start()
        await stopping
        await cluster.wait_for(lambda: late.state is DaemonState.FINISHED)
        assert [w.step for w in late.workers] == [31, 31]


async def test_stop_does_not_wait_for_a_full_link_to_a_dead_peer() -> None:
    """Daemon 1 never runs; daemon 0's workers (N = 2, local) fill the 2-frame link to it and
    block in it for up to queue_timeout = 300 s. Stopping must not wait for that."""
    async with local_cluster(
        2,
        workers=2,
        algorithm="alg1",
        steps=None,
        problem=QUAD,
        quorum=2,
        max_failures=2,
        queue_size=2,
        queue_timeout=300.0,
        drain_timeout=0.5,
        start=False,
    ) as cluster:
        d = cluster.daemons[0]
        await d.start()
        assert d.transport is not None
        link = d.transport.links[0]
        await cluster.wait_for(lambda: d.stats.queue_waits > 0)
        assert link.outstanding == 2
        await asyncio.wait_for(d.stop(), 30)  # far below queue_timeout
        assert all(w.state is WorkerState.STOPPED for w in d.workers)
        assert d.stats.dropped["queue_full"] >= 1


async def test_a_dead_peer_does_not_stall_the_survivors() -> None:
    """Daemon 1 never comes up. Once daemon 0's window to it is full and it has been away for
    peer_timeout, frames for it are dropped (counted `peer_away`) instead of holding every
    worker for queue_timeout per frame."""
    async with local_cluster(
        2,
        workers=2,
        algorithm="alg1",
        steps=300,
        problem=QUAD,
        quorum=2,
        max_failures=2,
        queue_size=4,
        queue_timeout=300.0,
        peer_timeout=0.3,
        drain_timeout=0.2,
        start=False,
    ) as cluster:
        d = cluster.daemons[0]
        sock = cluster.daemons[1]._listen_socket
        assert sock is not None
        sock.close()  # nothing listens: connections are refused
        await d.start()
        await cluster.wait_for(lambda: d.state is DaemonState.FINISHED, timeout=60)
        assert d.stats.dropped["peer_away"] > 0
        peers = (await cluster.client(0).get("/peers")).json()
        assert peers[0]["away"] is True
        assert "peerlearn_peers_away 1.0" in (await cluster.client(0).get("/metrics")).text


async def test_bad_data_after_the_handshake_closes_the_link() -> None:
    """A peer that passed the handshake but sends a frame no process of its cluster could send
    (foreign sender id, wrong shape) gets its connection closed; the error is counted. (It
    plays daemon 2, which never starts: a member that is connected cannot be claimed.)"""
    async with local_cluster(
        3, workers=1, algorithm="alg1", steps=None, problem=QUAD, start=False
    ) as cluster:
        target = cluster.daemons[0]
        for d in cluster.daemons[:2]:
            await d.start()
        assert target.peer_port is not None
        live = [w for d in cluster.daemons[:2] for w in d.workers]
        await cluster.wait_for(lambda: min(w.completed for w in live) > 3)
        hello, join = _hello(cluster, 2), _join(cluster, 2)
        good = np.zeros(target.dim)
        for bad in (
            Data(seq=1, tag=("params", 5), sender=0, step=5, value=good),  # not cluster 2's
            Data(seq=1, tag=("params", 5), sender=2, step=5, value=np.zeros(3)),  # shape
            # addressed to a process daemon 0 does not host (process 1 lives on daemon 1)
            Data(1, ("params", 5), 2, 5, good, to=(1,), post=True),
        ):
            await _after_handshake(target.peer_port, _frames(hello, join), _frames(bad))
        assert target.stats.protocol_errors["bad_data"] == 3
        before = min(w.completed for w in live)
        await cluster.wait_for(lambda: min(w.completed for w in live) > before + 5)


async def test_graceful_stop_finishes_the_current_iteration() -> None:
    """With N = n the workers move in lockstep. Stopping every daemon at once, each worker
    completes the iteration it is in and stops at the next boundary: all end within one
    iteration of each other (a worker that already began iteration t+1 when the request came
    cannot complete it once its peers stopped at t+1's start: stop_grace bounds that wait).
    An abandoned iteration would show as a worker left *inside* t (state stopped while others
    completed t): there is none."""
    async with local_cluster(
        3,
        workers=2,
        algorithm="alg1",
        steps=None,
        quorum=6,
        max_failures=0,
        problem=QUAD,
        stop_grace=1.0,
    ) as cluster:
        await cluster.wait_for(lambda: cluster.min_step() > 30)
        await asyncio.gather(*(d.stop() for d in cluster.daemons))
        workers = [w for d in cluster.daemons for w in d.workers]
        assert all(w.state is WorkerState.STOPPED for w in workers)
        steps = sorted(w.step for w in workers)
        assert steps[-1] - steps[0] <= 1, steps


async def test_a_hello_that_fails_its_join_changes_nothing_for_its_cluster() -> None:
    """A Hello claiming a later start of cluster 1, followed by a Join of another run: refused,
    and what daemon 0 keeps for the real cluster 1 stays (before, the Hello alone reset it and
    closed the real links, which were then refused as stale for good). N = n: every message of
    the real daemon 1 is needed, so a lock-out would stop the run."""
    async with local_cluster(
        2, workers=1, algorithm="alg1", steps=None, quorum=2, max_failures=0, problem=QUAD
    ) as cluster:
        target = cluster.daemons[0]
        assert target.peer_port is not None
        await cluster.wait_for(lambda: cluster.min_step() > 5)
        later = _hello(cluster, incarnation=cluster.daemons[1].incarnation + 10**12)
        answer = await _exchange(target.peer_port, _frames(later, _join(cluster, dim=1)))
        assert _refusal(answer).reason == "dim_mismatch"
        before = cluster.min_step()
        await cluster.wait_for(lambda: cluster.min_step() > before + 20)
        assert target.stats.protocol_errors["stale_incarnation"] == 0


async def _throttle(target: int, rate: float) -> tuple[asyncio.Server, int]:
    """A proxy to 127.0.0.1:``target`` passing at most ``rate`` bytes/s towards it (a slow
    route: the sender's writes back up, as on a real one)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)

        async def forward() -> None:
            while data := await reader.read(16384):
                await asyncio.sleep(len(data) / rate)  # the route's speed
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def back() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(forward(), back(), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=16384)
    return server, server.sockets[0].getsockname()[1]


async def test_a_frame_longer_to_send_than_peer_timeout_still_arrives() -> None:
    """An 8 MB frame over a 4 MB/s route with peer_timeout 0.5 s: the dialer's ping waits behind
    the frame, so only the acceptor's own pongs show the link is alive. Without them the link
    dropped the connection every peer_timeout and resent the frame from the start, for good."""
    import time

    from peerlearn.membership import Membership
    from peerlearn.transport.links import LinkSettings
    from peerlearn.transport.peers import PeerAddress, Transport

    dim = 1_000_000
    settings = LinkSettings(peer_timeout=0.5, max_payload=dim * 8 + 1024)
    membership = Membership(2, 2)
    got: list[Data] = []
    arrived = asyncio.Event()

    def make(cluster: int, peers: list[PeerAddress], deliver: Any) -> Transport:
        hello = Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, cluster, time.time_ns(), 0, f"d{cluster}")
        join = Join((cluster,), dim, "float64", "fingerprint")
        return Transport(hello, join, membership, ("127.0.0.1", 0), peers, deliver, settings)

    def received(data: Data) -> None:
        got.append(data)
        arrived.set()

    async with asyncio.TaskGroup() as tasks:
        acceptor = make(0, [], received)
        await acceptor.start(tasks)
        assert acceptor.port is not None
        proxy, port = await _throttle(acceptor.port, rate=4e6)
        dialer = make(1, [PeerAddress(0, "127.0.0.1", port)], lambda data: None)
        await dialer.start(tasks)
        await asyncio.to_thread(dialer.links[0].offer, ("params", 1), 1, 1, np.ones(dim))
        try:
            await asyncio.wait_for(arrived.wait(), 30)
        finally:
            proxy.close()
            await dialer.close(drain_unconnected=False)
            await acceptor.close()
    assert len(got) == 1 and got[0].value.shape == (dim,)
    assert dialer.stats.protocol_errors["peer_silent"] == 0
