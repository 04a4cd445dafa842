"""Bounded before trust: a stranger who only knows a daemon's peer port cannot hold its memory
or descriptors, nor keep a connection open by trickling bytes — and honest training goes on
meanwhile. Real daemon processes on 127.0.0.1; the attacker connects from 127.0.0.2."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import httpx

from peerlearn.testing import poll_status
from peerlearn.wire import MAGIC

from .test_processes import daemons, steps


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _errors(url: str, reason: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("peerlearn_protocol_errors_total") and f'reason="{reason}"' in line:
            return float(line.split()[-1])
    return 0.0


def _peer_port(proc: object) -> int:
    args = proc.args  # type: ignore[attr-defined]
    return int(args[args.index("--listen") + 1].rsplit(":", 1)[1])


async def test_thousands_of_idle_connections_hold_little_memory_and_training_goes_on() -> None:
    with daemons(2, "--workers", "1", "--algorithm", "alg1") as (procs, urls):
        await poll_status(urls[0], lambda s: steps(s) > 20)
        port, pid = _peer_port(procs[0]), procs[0].pid
        before = _rss_mb(pid)
        held: list[socket.socket] = []
        try:
            for _ in range(4000):
                s = socket.socket()
                s.bind(("127.0.0.2", 0))
                s.settimeout(0.05)  # a full backlog drops the SYN: no retry a second later
                try:
                    s.connect(("127.0.0.1", port))
                except OSError:  # the backlog is full for a moment: the daemon is closing them
                    s.close()
                    continue
                held.append(s)
            during = _rss_mb(pid)
            status = await poll_status(urls[0], lambda s: True)
            at = steps(status)
            await poll_status(urls[0], lambda s: steps(s) > at + 20, timeout=30)
        finally:
            for s in held:
                s.close()
        print(f"RSS {before:.0f} -> {during:.0f} MB while {len(held)} connections were held")
        assert during - before <= 64, f"RSS grew {during - before:.0f} MB while held"
        assert _errors(urls[0], "too_many_pending") > 0


async def test_a_handshake_trickled_a_byte_at_a_time_is_closed_at_the_deadline() -> None:
    with daemons(2, "--workers", "1", "--algorithm", "alg1", "--set", "handshake_timeout=1") as (
        procs,
        urls,
    ):
        await poll_status(urls[0], lambda s: steps(s) > 5)
        s = socket.create_connection(("127.0.0.1", _peer_port(procs[0])))
        s.settimeout(0.2)
        started = time.monotonic()
        closed_after = None
        try:
            for byte in MAGIC * 100:  # one byte every 0.2 s: never silent, never done
                try:
                    s.sendall(bytes([byte]))
                    if s.recv(1) == b"":
                        closed_after = time.monotonic() - started
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed_after = time.monotonic() - started
                    break
                if time.monotonic() - started > 10:
                    break
        finally:
            s.close()
        # handshake_timeout (1 s) plus the check's period (peer_timeout / 4 = 1.25 s)
        assert closed_after is not None and closed_after < 4.0, closed_after
        assert _errors(urls[0], "handshake_timeout") >= 1
        status = await poll_status(urls[0], lambda s: True)
        at = steps(status)
        await poll_status(urls[1], lambda s: steps(s) > at + 10, timeout=30)
        for p in procs:
            os.kill(p.pid, signal.SIGTERM)


async def test_a_flood_of_handshakes_from_one_source_does_not_lock_out_an_honest_one() -> None:
    """Over the per-source cap the oldest handshake under way is closed, not the newcomer: a
    dialer behind the same address as a flood (a NAT) still gets its Welcome."""
    from peerlearn.wire import PROTOCOL_VERSION, Codec, Hello, Welcome

    with daemons(2, "--workers", "1", "--algorithm", "alg1") as (procs, urls):
        await poll_status(urls[0], lambda s: steps(s) > 5)
        port = _peer_port(procs[0])
        flood = []
        try:
            for _ in range(200):
                s = socket.socket()
                s.bind(("127.0.0.2", 0))
                s.settimeout(0.05)
                with contextlib.suppress(OSError):
                    s.connect(("127.0.0.1", port))
                flood.append(s)
            honest = socket.socket()
            honest.bind(("127.0.0.2", 0))
            honest.settimeout(5)
            honest.connect(("127.0.0.1", port))
            codec = Codec()
            hello = Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 1, time.time_ns(), 1, "x")
            for chunk in codec.send(hello):
                honest.sendall(chunk)
            codec.receive_data(honest.recv(65536))
            assert isinstance(codec.next_event(), Welcome)
            honest.close()
        finally:
            for s in flood:
                s.close()
        assert _errors(urls[0], "too_many_pending") > 0
