"""Bounded after trust (peerlearn/transport/peers.py, the tag window), on real daemons: where
frames may drop (Alg 1), a frame more than the window ahead of running workers is acknowledged
and dropped on arrival — a flood of far-future frames from a member costs nothing and
training goes on, and an honest straggler does not pace its senders but catches up from a
peer's state; in a finite run, whose peers finish and leave, they are held and a peer's bye
hands them over. (Where frames are kept, such frames are held unacknowledged instead:
tests/test_transport_mutants.py drives that on a bare Transport.) Real sockets on 127.0.0.1;
the member is played by hand over the wire protocol."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest

from peerlearn.daemon.node import Daemon, DaemonState
from peerlearn.daemon.routing import MIN_WINDOW, tag_window
from peerlearn.effects import Grad
from peerlearn.runtime.worker import Worker, WorkerState
from peerlearn.testing import local_cluster
from peerlearn.transport import peers, pool
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


class _Slow(Worker):
    """A worker that takes 50 ms per gradient: an honest straggler."""

    def _effect(self, eff: Any) -> Any:
        if isinstance(eff, Grad):
            time.sleep(0.05)
        return super()._effect(eff)


async def test_a_straggler_does_not_pace_its_senders_and_catches_up() -> None:
    # Alg 1, f = 1: daemons 0 and 1 need not wait for daemon 2. Its peers' frames soon run more
    # than the window ahead of it: dropped there (acked), not held — held, they would fill its
    # senders' windows and pace them to it — and it catches up from a peer's state.
    async with local_cluster(
        3,
        workers=1,
        algorithm="alg1",
        problem=QUAD,
        steps=None,
        max_failures=1,
        tag_window=32,
        worker_factory=lambda i: _Slow if i == 2 else Worker,
    ) as c:
        fast, slow = c.daemons[:2], c.daemons[2]
        window = slow.cfg.tag_window
        # Paced, the fast ones could not get more than the window plus their link windows
        # ahead of a straggler at 20 iterations a second; here they go at their own speed.
        await c.wait_for(lambda: min(d.workers[0].step for d in fast) >= 3_000, 60)
        assert slow.stats.dropped.get("ahead", 0) > 0
        assert slow.transport is not None and slow.transport.holding == 0
        for d in fast:
            assert d.stats.dropped.get("queue_full", 0) == 0
            assert d.stats.dropped.get("ahead", 0) == 0
        await c.wait_for(lambda: slow.rejoin.rejoins >= 1, 30)  # it took a peer's state
        assert slow.workers[0].step > window
        # ... past every iteration it dropped frames of: it goes on from there, it does not
        # wait for the frames it dropped.
        at = slow.workers[0].completed
        await c.wait_for(lambda: slow.workers[0].completed >= at + 20, 30)


class _Slower(Worker):
    """A worker that takes 100 ms per gradient."""

    def _effect(self, eff: Any) -> Any:
        if isinstance(eff, Grad):
            time.sleep(0.1)
        return super()._effect(eff)


async def test_in_a_finite_run_a_straggler_holds_far_frames_and_finishes_after_its_peers_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In a finite run the peers finish and leave (--exit-on-finish): nobody may be left to catch
    # up from, so far frames are held rather than dropped, and a peer's bye hands what was held
    # of it to the workers — the straggler finishes from what the others sent.
    for name, value in (("TRIM_AFTER", 0), ("TRIM_DELAY", 0.1), ("TRIM_INTERVAL", 0.0)):
        monkeypatch.setattr(peers, name, value)  # this model's frames are 32 bytes
    async with local_cluster(
        3,
        workers=1,
        algorithm="alg1",
        problem=QUAD,
        steps=40,
        max_failures=1,
        tag_window=8,
        drain_timeout=0.5,  # they leave before the straggler has taken what they sent
        worker_factory=lambda i: _Slower if i == 2 else Worker,
    ) as c:
        fast, slow = c.daemons[:2], c.daemons[2]
        transport = slow.transport
        assert transport is not None
        await c.wait_for(lambda: all(d.state is DaemonState.FINISHED for d in fast), 30)
        await c.wait_for(lambda: transport.holding > 0, 10)
        assert not slow.workers[0].done.is_set()
        trims = transport.trims
        await asyncio.gather(*(d.stop() for d in fast))  # they leave: bye
        await c.wait_for(lambda: slow.state is DaemonState.FINISHED, 30)
        assert slow.workers[0].state is WorkerState.FINISHED
        assert transport.holding == 0 and transport.held_bytes == 0
        assert slow.stats.dropped.get("ahead", 0) == 0
        assert slow.rejoin.rejoins == 0
        # What it held is let go of, and the heap given back a moment after (glibc)
        if pool._TRIM is not None:
            await c.wait_for(lambda: transport.trims > trims, 10)


async def test_a_flood_of_far_future_frames_costs_nothing_and_training_goes_on() -> None:
    async with local_cluster(
        3,
        workers=1,
        algorithm="alg1",
        problem=QUAD,
        steps=None,
        max_failures=1,
        tag_window=32,
        start=False,
    ) as c:
        honest, played = c.daemons[:2], c.daemons[2]
        for d in honest:
            await d.start()

        def slowest() -> int:
            return min(w.completed for d in honest for w in d.workers)

        await c.wait_for(lambda: slowest() >= 20, 30)
        target = honest[0]
        assert target.peer_port is not None and target.transport is not None
        member = _Member(played, target.peer_port)
        reader: threading.Thread | None = None
        try:
            await asyncio.to_thread(member.join)
            reader = threading.Thread(target=member.read_acks, daemon=True)
            reader.start()
            threading.Thread(target=member.ping, daemon=True).start()
            far, count = 10**9, 20_000

            def flood() -> None:
                for i in range(count):
                    member.frame(far + i)

            await asyncio.to_thread(flood)
            # Every frame acknowledged and dropped on arrival: none held, none in a mailbox.
            await c.wait_for(lambda: member.acked == count, 60)
            assert target.stats.dropped.get("ahead", 0) == count
            assert target.transport.holding == 0
            buffered = max(box.buffered for box in target.mailboxes.values())
            assert buffered <= 4 * target.cfg.tag_window
            at = slowest()
            await c.wait_for(lambda: slowest() > at + 50, 30)  # honest training goes on
            for d in honest:
                assert d.stats.dropped.get("overflow", 0) == 0
                assert d.stats.dropped.get("queue_full", 0) == 0
        finally:
            member.close()
            if reader is not None:
                reader.join(timeout=5)


async def test_where_no_catch_up_is_possible_far_frames_are_held_and_a_flood_is_not_read() -> None:
    # Standalone MAA cannot take a peer's state: a frame dropped ahead would stall its worker
    # for good, so far-ahead frames are held — unacknowledged, the sender's window bounds them
    # — and a member that sends far more is not read from. Training goes on meanwhile.
    async with local_cluster(
        3, workers=1, algorithm="maa", problem=QUAD, steps=10_000_000, start=False, tag_window=32
    ) as c:
        honest, played = c.daemons[:2], c.daemons[2]
        for d in honest:
            await d.start()

        def slowest() -> int:
            return min(w.completed for d in honest for w in d.workers)

        await c.wait_for(lambda: slowest() >= 5, 30)
        target = honest[0]
        transport = target.transport
        assert target.peer_port is not None and transport is not None
        member = _Member(played, target.peer_port)
        reader: threading.Thread | None = None
        try:
            await asyncio.to_thread(member.join)
            reader = threading.Thread(target=member.read_acks, daemon=True)
            reader.start()
            threading.Thread(target=member.ping, daemon=True).start()
            sent = 0

            def flood() -> None:
                nonlocal sent
                member.sock.settimeout(2)
                try:
                    for i in range(100_000):
                        member.frame(10**9 + i)
                        sent += 1
                except TimeoutError:  # back-pressure: the daemon reads no more
                    pass

            await asyncio.to_thread(flood)
            assert sent < 100_000, "the daemon read a flood of 100,000 far-future frames"
            assert 0 < transport.holding <= 4 * transport.settings.window
            assert member.acked == 0  # nothing held is acknowledged
            assert target.stats.dropped.get("ahead", 0) == 0
            metrics = (await c.client(0).get("/metrics")).text
            assert 'peerlearn_protocol_errors_total{reason="window_exceeded"} 1.0' in metrics
            assert f"peerlearn_frames_held {float(transport.holding)}" in metrics
            at = slowest()
            await c.wait_for(lambda: slowest() > at + 5, 30)  # honest training goes on
        finally:
            member.close()
            if reader is not None:
                reader.join(timeout=5)
        await c.wait_for(lambda: transport.holding == 0, 10)  # given up with its connection


def test_the_window_shrinks_to_a_byte_budget_for_large_models() -> None:
    # 1 MiB of frames ahead per worker: a 4-parameter model keeps the iteration window, a
    # 1000-parameter one (8 KB frames from 6 remote processes) gets 21 iterations, a huge one
    # the minimum.
    assert tag_window(1024, 1 << 20, 4 * 8 + 256, 4) == 910
    assert tag_window(1024, 1 << 20, 1000 * 8 + 256, 6) == 21
    assert tag_window(1024, 1 << 20, 10**8 * 4, 2) == MIN_WINDOW
    assert tag_window(4, 1 << 20, 10**8 * 4, 2) == 4  # never more than asked
    assert tag_window(1024, 1 << 20, 100, 0) == 1024  # alone: nothing comes from peers


async def test_a_daemon_sizes_its_window_by_its_model() -> None:
    # 1,000 parameters, 2 remote processes: 63 iterations of 8 KB frames in 1 MiB
    big = {"name": "quadratic", "dim": 1000}
    async with local_cluster(3, workers=1, algorithm="alg1", problem=big, start=False) as c:
        assert c.daemons[0].tag_window == tag_window(1024, 1 << 20, 1000 * 8 + 256, 2) == 63
    async with local_cluster(3, workers=1, algorithm="alg1", problem=QUAD, start=False) as c:
        assert c.daemons[0].tag_window == 1024
