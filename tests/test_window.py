"""Bounded after trust (peerlearn/transport/peers.py, the tag window): a member's frames for
iterations far ahead of this daemon's workers wait unacknowledged with their sender — they
neither fill the mailboxes nor get dropped — and go in once the workers come near. A member
flooding far-future tags is held by back-pressure: the daemon keeps training, its memory
stays bounded, nothing honest is lost. Real daemons and sockets on 127.0.0.1; the member is
played by hand over the wire protocol."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import numpy as np

from peerlearn.daemon.node import Daemon
from peerlearn.testing import local_cluster
from peerlearn.wire import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Codec,
    Data,
    Hello,
    Join,
    Message,
    Ping,
    Welcome,
)

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 4}


class _Member:
    """A daemon of the run played by hand: it takes cluster ``me.cluster``'s place (that
    daemon is never started) and speaks the wire protocol itself."""

    def __init__(self, me: Daemon, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.codec = Codec()
        self.me = me
        self.seq = 0
        self.acked = 0
        self._lock = threading.Lock()
        self.closed = threading.Event()

    def send(self, msg: Message) -> None:
        with self._lock:  # the pinger's and the frames' writes do not interleave
            for chunk in self.codec.send(msg):
                self.sock.sendall(chunk)

    def receive(self) -> Message | None:
        while (event := self.codec.next_event()) is NEED_DATA:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.codec.receive_data(data)
        return None if event is CLOSED else event

    def join(self) -> None:
        hello = Hello(
            PROTOCOL_VERSION,
            PROTOCOL_VERSION,
            self.me.me.cluster,
            self.me.incarnation,
            1,
            "member",
        )
        self.send(hello)
        assert isinstance(self.receive(), Welcome)
        self.send(Join(self.me.pids, 4, "float64", self.me.cfg.fingerprint))
        assert self.receive() == Ack(seq=0)

    def frame(self, iteration: int) -> None:
        self.seq += 1
        (pid,) = self.me.pids
        self.send(Data(self.seq, ("params", iteration), pid, iteration, np.ones(4)))

    def read_acks(self) -> None:
        """Record the acks as they come (a thread): until the connection closes."""
        while True:
            try:
                msg = self.receive()
            except TimeoutError:  # (the flood's send timeout is the socket's)
                continue
            except OSError:  # closed by this side
                return
            if msg is None:
                return
            if isinstance(msg, Ack):
                self.acked = max(self.acked, msg.seq)

    def ping(self) -> None:
        """A sign of life now and then (a thread), as a daemon's link gives: a silent
        connection is dropped. Not while a flood is blocked in a send: that holds the lock."""
        while not self.closed.wait(1.0):
            if self._lock.acquire(timeout=0.1):
                try:
                    for chunk in self.codec.send(Ping(nonce=1)):
                        self.sock.sendall(chunk)
                except OSError:
                    return
                finally:
                    self._lock.release()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


async def test_frames_far_ahead_wait_unacked_then_go_in_and_a_flood_is_held_back() -> None:
    async with local_cluster(
        3,
        workers=1,
        algorithm="alg1",
        problem=QUAD,
        steps=10_000_000,
        max_failures=1,
        start=False,
    ) as c:
        honest, played = c.daemons[:2], c.daemons[2]
        for d in honest:
            await d.start()

        def slowest() -> int:
            return min(w.completed for d in honest for w in d.workers)

        await c.wait_for(lambda: slowest() >= 20, 30)
        target = honest[0]
        assert target.peer_port is not None
        member = _Member(played, target.peer_port)
        reader: threading.Thread | None = None
        try:
            await asyncio.to_thread(member.join)
            reader = threading.Thread(target=member.read_acks, daemon=True)
            reader.start()
            threading.Thread(target=member.ping, daemon=True).start()
            transport = target.transport
            assert transport is not None
            window = target.cfg.tag_window

            # Ten frames far ahead: held, unacked; they go in (acked) as the workers come near.
            ahead = target.workers[0].step + window + 300
            for _ in range(10):
                await asyncio.to_thread(member.frame, ahead)
            await c.wait_for(lambda: transport.holding == 10, 10)
            assert member.acked == 0
            assert target.held_from() == {played.me.cluster: 10}
            status = (await c.client(0).get("/status")).json()
            assert [p["held"] for p in status["peers"] if p["cluster"] == 2] == [10]
            assert "peerlearn_frames_held 10.0" in (await c.client(0).get("/metrics")).text
            await c.wait_for(lambda: transport.holding == 0, 60)
            await c.wait_for(lambda: member.acked == 10, 10)
            assert target.workers[0].mailbox.step >= ahead - window

            # A flood far into the future, far beyond any window: read until the daemon stops
            # reading from this member; the sender blocks, the daemon trains on.
            far = 10**9
            sent = 0

            def flood() -> None:
                nonlocal sent
                member.sock.settimeout(2)
                try:
                    for i in range(100_000):
                        member.frame(far + i)
                        sent += 1
                except TimeoutError:  # back-pressure: the daemon reads no more
                    pass

            await asyncio.to_thread(flood)
            held = transport.holding
            assert sent < 100_000, "the daemon read a flood of 100,000 far-future frames"
            assert 0 < held <= 2 * transport.settings.window, held
            assert member.acked == 10  # nothing of the flood is acknowledged
            buffered = max(box.buffered for box in target.mailboxes.values())
            assert buffered <= 4 * window, buffered  # the mailboxes hold no part of it
            at = slowest()
            await c.wait_for(lambda: slowest() > at + 50, 30)  # honest training goes on
            metrics = (await c.client(0).get("/metrics")).text
            assert 'peerlearn_protocol_errors_total{reason="window_exceeded"} 1.0' in metrics
            for d in honest:
                assert d.stats.dropped.get("overflow", 0) == 0
                assert d.stats.dropped.get("queue_full", 0) == 0
        finally:
            member.close()
            if reader is not None:
                reader.join(timeout=5)
        # The member's connection gone: what was held is given up (unacked: it would be
        # resent), and the honest daemons go on.
        await c.wait_for(lambda: transport.holding == 0, 10)
        at = slowest()
        started = time.monotonic()
        await c.wait_for(lambda: slowest() > at + 20, 30)
        assert time.monotonic() - started < 30
