"""Only operators change a daemon through its control API (peerlearn/control/guard.py): a
bearer token, no cross-site requests, a Host that names the daemon; a token to serve it off
loopback. Real daemons on 127.0.0.1, real HTTP requests."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from peerlearn.daemon.node import DaemonState
from peerlearn.errors import StartupError
from peerlearn.testing import local_cluster

from .test_processes import PEERLEARN, free_ports

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 4}
TOKEN = "s3cret-token-0123456789"


def _token_file(tmp_path: Path, mode: int = 0o600, text: str = TOKEN) -> Path:
    path = tmp_path / f"api-token-{mode:o}-{len(text)}"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def _refused(text: str, reason: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'peerlearn_api_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no refusal count for {reason}")


async def test_stop_needs_the_token_and_refusals_are_counted(tmp_path: Path) -> None:
    token = _token_file(tmp_path)
    async with local_cluster(
        1, workers=1, algorithm="alg1", problem=QUAD, api_token_file=token
    ) as c:
        url = c.urls[0]
        async with httpx.AsyncClient(base_url=url) as http:
            missing = await http.post("/stop")
            wrong = await http.post("/stop", headers={"Authorization": "Bearer nope"})
            assert missing.status_code == wrong.status_code == 401
            assert missing.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in missing.json()["detail"]
            assert c.daemons[0].state is DaemonState.RUNNING
            assert _refused((await http.get("/metrics")).text, "token") == 2
            # reading stays open
            assert (await http.get("/status")).status_code == 200
            ok = await http.post("/stop", headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.json() == {"state": "stopping"}
        await c.daemons[0].wait()
        assert c.daemons[0].state is DaemonState.STOPPED


async def test_no_web_page_can_stop_a_daemon() -> None:
    """A cross-site "simple" request (text/plain, a foreign Origin) and a DNS-rebound name
    reach the port but are refused; the daemon keeps running. Without a token, loopback
    clients that send no Origin may stop it."""
    async with local_cluster(1, workers=1, algorithm="alg1", problem=QUAD) as c:
        port = c.daemons[0].api_port
        async with httpx.AsyncClient(base_url=c.urls[0]) as http:
            cross = await http.post(
                "/stop",
                content=b"x",
                headers={"Content-Type": "text/plain", "Origin": "http://evil.example"},
            )
            assert cross.status_code == 403
            opaque = await http.post("/stop", headers={"Origin": "null"})
            assert opaque.status_code == 403
            rebound = await http.post("/stop", headers={"Host": f"evil.example:{port}"})
            assert rebound.status_code == 421
            assert c.daemons[0].state is DaemonState.RUNNING
            metrics = (await http.get("/metrics")).text
            assert _refused(metrics, "origin") == 2 and _refused(metrics, "host") == 1
            # its own status page (same origin) and a script may
            # a page on another local port is another origin
            other = await http.post("/stop", headers={"Origin": "http://localhost:3000"})
            assert other.status_code == 403
            same = await http.post("/stop", headers={"Origin": f"http://localhost:{port}"})
            assert same.json() == {"state": "stopping"}
        await c.daemons[0].wait()


async def test_a_token_file_others_can_read_or_too_short_is_refused(tmp_path: Path) -> None:
    for path, says in [
        (_token_file(tmp_path, 0o644), "can be read by others"),
        (_token_file(tmp_path, 0o600, "short"), "at least 16 characters"),
        (tmp_path / "missing", "No such file"),
    ]:
        async with local_cluster(
            1, start=False, workers=1, algorithm="alg1", problem=QUAD, api_token_file=path
        ) as c:
            with pytest.raises(StartupError, match=says):
                await c.daemons[0].start()


def test_an_api_off_loopback_needs_a_token_or_insecure(tmp_path: Path) -> None:
    listen, api = free_ports(2)
    base = [
        PEERLEARN,
        "run",
        *("--listen", f"127.0.0.1:{listen}", "--api", f"0.0.0.0:{api}"),
        *("--peers", f"127.0.0.1:{listen}", "--workers", "1", "--algorithm", "alg1"),
    ]
    done = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a token (--api-token-file)" in lines[0], lines
    # --insecure starts it, and says so
    proc = subprocess.Popen([*base, "--insecure"], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "INSECURE" in line:
                break
            assert "daemon started" not in line, "started without saying it is insecure"
    finally:
        proc.terminate()
        proc.wait(30)


async def test_slowloris_connections_are_closed_at_the_header_deadline() -> None:
    """1,000 connections that trickle a request head a byte at a time: each is closed once
    api_header_timeout has passed, counted; then /status answers, and training went on. The
    worker sleeps a millisecond a gradient: on a 4-d quadratic a worker thread otherwise holds
    the GIL nearly all the time, and the loop, this test's client included, got each of the
    1,000 connections in up to 0.2 s on some runs — a hang past the test's limit, not a
    measure of the guard."""
    async with local_cluster(
        1,
        workers=1,
        algorithm="alg1",
        problem=QUAD,
        api_header_timeout=1.0,
        compute_delay=0.001,
    ) as c:
        port = c.daemons[0].api_port
        before = c.min_step()
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(1000)]
        started = time.monotonic()

        async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
            head = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
            try:
                for byte in head:
                    if writer.is_closing():  # the close came as the read timed out
                        break
                    writer.write(bytes([byte]))
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(reader.read(1), 0.3) == b"":
                            break  # closed by the daemon
            # reset by the daemon, which closed it while bytes came in; uvloop says a write on
            # a transport that has just seen the close with RuntimeError, not OSError
            except (OSError, RuntimeError):
                pass
            writer.close()
            return time.monotonic() - started

        closed = await asyncio.gather(*(trickle(r, w) for r, w in conns))
        # 1 s deadline; 100 bytes would take 30 s. The bound is loose: a CI run once saw one
        # connection closed at 6.3 s (the rest at 0.65 s), the loop starved for a moment; the
        # counter below is what shows the daemon, not the client, closed each of them.
        assert max(closed) < 20.0, sorted(closed)[-5:]
        async with httpx.AsyncClient(base_url=c.urls[0]) as http:
            status = await http.get("/status")
            assert status.status_code == 200
            assert _refused((await http.get("/metrics")).text, "header_timeout") >= 1000
        await c.wait_for(lambda: c.min_step() > before + 10, 30)


async def test_a_body_trickled_after_the_response_is_closed() -> None:
    """A request that announces a body it never finishes sending is closed at the deadline
    too (uvicorn would keep it open forever)."""
    async with local_cluster(
        1, workers=1, algorithm="alg1", problem=QUAD, api_header_timeout=1.0
    ) as c:
        port = c.daemons[0].api_port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n\r\n"
        )
        assert (await reader.readuntil(b"\r\n"))[:12] == b"HTTP/1.1 200"
        started = time.monotonic()
        try:
            while time.monotonic() - started < 10:
                writer.write(b"x")
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(65536), 0.3) == b"":
                        break
        except OSError:
            pass
        closed_after = time.monotonic() - started
        writer.close()
        assert closed_after < 4.0, closed_after


async def test_a_request_that_came_in_time_is_answered_after_the_loop_stalled() -> None:
    """The deadline closes clients that are slow, not a daemon whose loop was: a request whose
    bytes arrived before the deadline is answered even if the loop stalled past it (a GC pause,
    a starved machine). This holds because the loop reads what came in before it runs the
    timers that fell due meanwhile (libuv polls, then runs timers); the guard relies on it."""
    async with local_cluster(
        1, workers=1, algorithm="alg1", problem=QUAD, api_header_timeout=0.5
    ) as c:
        reader, writer = await asyncio.open_connection("127.0.0.1", c.daemons[0].api_port)
        request = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        writer.write(request)  # a first answer: the connection is accepted, the deadline armed
        head = await reader.readuntil(b"\r\n\r\n")
        assert head[:12] == b"HTTP/1.1 200", head
        length = next(
            int(h.split(b":")[1])
            for h in head.split(b"\r\n")
            if h.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(request)
        time.sleep(1.0)  # the loop stalls with the request in its socket, past the deadline
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)
        writer.close()
        assert line[:12] == b"HTTP/1.1 200", line
