"""Members only (peerlearn/transport/auth.py): with a cluster secret, peer links are
authenticated both ways; a stranger — or a member's replayed handshake — is refused and learns
nothing about the run; off loopback a secret is required. Real daemons and sockets on
127.0.0.1; the stranger speaks the wire protocol by hand."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from peerlearn.testing import local_cluster
from peerlearn.transport import auth
from peerlearn.wire import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Codec,
    Hello,
    Join,
    Message,
    Refuse,
    Welcome,
)

from .test_processes import PEERLEARN, free_ports

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 4}
SECRET = "the-cluster-secret-of-this-run"


def _secret(tmp_path: Path, text: str = SECRET, name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


class _Stranger:
    """A raw wire client: sends messages, reads answers (blocking, with a timeout)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.codec = Codec()

    def send(self, msg: Message) -> None:
        for chunk in self.codec.send(msg):
            self.sock.sendall(chunk)

    def receive(self) -> Message | None:
        """The next message; None once the daemon closed the connection."""
        while (event := self.codec.next_event()) is NEED_DATA:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.codec.receive_data(data)
        return None if event is CLOSED else event

    def close(self) -> None:
        self.sock.close()


def _hello(cluster: int, nonce: int) -> Hello:
    return Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, cluster, time.time_ns(), nonce, "x")


async def test_members_with_the_secret_train_and_a_stranger_learns_nothing(
    tmp_path: Path,
) -> None:
    secret = _secret(tmp_path)
    async with local_cluster(
        2, workers=1, algorithm="alg1", problem=QUAD, secret_file=secret, steps=100_000
    ) as c:
        await c.wait_for(lambda: c.min_step() >= 20, 30)
        status = (await c.client(0).get("/status")).json()
        assert status["security"]["peer_links"] == "authenticated (cluster secret)"
        port = c.daemons[0].peer_port
        assert port is not None
        # A stranger claiming cluster 1 (connected right now): a Welcome with the acceptor's
        # proof and nothing about the run, then one refusal code for its Join.
        s = _Stranger(port)
        try:
            s.send(_hello(1, 7))
            welcome = await asyncio.to_thread(s.receive)
            assert isinstance(welcome, Welcome) and len(welcome.mac) == auth.MAC_SIZE
            s.send(Join((1,), 4, "float64", "guess"))
            refused = await asyncio.to_thread(s.receive)
            assert refused == Refuse(reason="bad_secret")
            assert await asyncio.to_thread(s.receive) is None  # closed
        finally:
            s.close()
        # A member's handshake, recorded and replayed on a new connection: refused — the
        # acceptor's nonce is new.
        key = SECRET.encode()
        first = _Stranger(port)
        hello = _hello(1, 11)
        first.send(hello)
        w1 = await asyncio.to_thread(first.receive)
        assert isinstance(w1, Welcome)
        join = Join(
            (1,), 4, "float64", c.daemons[0].cfg.fingerprint, auth.proof(key, "dialer", hello, w1)
        )
        first.close()  # (not sent: the daemon's own link to cluster 1 stays)
        again = _Stranger(port)
        try:
            again.send(hello)
            w2 = await asyncio.to_thread(again.receive)
            assert isinstance(w2, Welcome) and w2.nonce != w1.nonce
            again.send(join)
            assert await asyncio.to_thread(again.receive) == Refuse(reason="bad_secret")
        finally:
            again.close()
        # Claims a stranger makes are not judged before a proof: a cluster that does not exist
        # and a stale incarnation get the same answer as any other stranger.
        for claim in (_hello(99, 3), Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 1, 1, 4, "x")):
            s = _Stranger(port)
            try:
                s.send(claim)
                assert isinstance(await asyncio.to_thread(s.receive), Welcome)
                s.send(Join((1,), 4, "float64", "guess"))
                assert await asyncio.to_thread(s.receive) == Refuse(reason="bad_secret")
            finally:
                s.close()
        metrics = (await c.client(0).get("/metrics")).text
        assert 'peerlearn_protocol_errors_total{reason="bad_secret"} 4.0' in metrics
        at = c.min_step()
        await c.wait_for(lambda: c.min_step() > at + 20, 30)  # honest training went on


async def test_a_daemon_with_another_secret_or_none_is_kept_out(tmp_path: Path) -> None:
    secrets = [_secret(tmp_path), _secret(tmp_path, "another-secret-entirely", "other")]
    async with local_cluster(
        2,
        workers=1,
        algorithm="alg1",
        problem=QUAD,
        each=lambda i: {"secret_file": secrets[i]},
        peer_timeout=1.0,
    ) as c:
        await c.wait_for(lambda: all(link.last_error for d in c.daemons for link in d.links), 30)
        texts = [link.last_error or "" for d in c.daemons for link in d.links]
        assert all("secret" in t for t in texts), texts
        assert all(link.state.value != "connected" for d in c.daemons for link in d.links)
    async with local_cluster(
        2,
        workers=1,
        algorithm="alg1",
        problem=QUAD,
        each=lambda i: {"secret_file": secrets[0]} if i == 0 else {},
    ) as c:
        await c.wait_for(lambda: all(link.last_error for d in c.daemons for link in d.links), 30)
        theirs = c.daemons[1].links[0].last_error or ""
        assert "runs with a cluster secret and this daemon has none" in theirs, theirs
        ours = c.daemons[0].links[0].last_error or ""
        assert "has no cluster secret" in ours, ours


def test_peers_off_loopback_need_a_secret_or_insecure(tmp_path: Path) -> None:
    listen, api = free_ports(2)
    base = [
        PEERLEARN,
        "run",
        *("--listen", f"0.0.0.0:{listen}", "--api", f"127.0.0.1:{api}"),
        *("--advertise", f"127.0.0.1:{listen}", "--peers", f"127.0.0.1:{listen}"),
        *("--workers", "1", "--algorithm", "alg1"),
    ]
    done = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a cluster secret (--secret-file)" in lines[0], lines
    proc = subprocess.Popen([*base, "--insecure"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status = httpx.get(f"http://127.0.0.1:{api}/status", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)  # a daemon in another process: no event to wait on
        assert status["security"]["insecure"] is True
        assert status["security"]["peer_links"] == "not authenticated"
        with_secret = subprocess.run(
            [*base, "--secret-file", str(_secret(tmp_path, "short", "short"))],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert with_secret.returncode == 2 and "at least 16 characters" in with_secret.stderr
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("role", ["dialer", "acceptor"])
def test_a_proof_covers_every_field_of_the_handshake(role: str) -> None:
    hello = Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 1, 10**18, 5, "d1")
    welcome = Welcome(PROTOCOL_VERSION, 0, 2 * 10**18, 6)
    key = b"k" * 20
    mac = auth.proof(key, role, hello, welcome)  # type: ignore[arg-type]
    assert auth.verify(key, role, hello, welcome, mac)  # type: ignore[arg-type]
    other = "acceptor" if role == "dialer" else "dialer"
    assert not auth.verify(key, other, hello, welcome, mac)  # type: ignore[arg-type]
    assert not auth.verify(b"x" * 20, role, hello, welcome, mac)  # type: ignore[arg-type]
    for changed in (
        (Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 2, 10**18, 5, "d1"), welcome),
        (Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 1, 10**18 + 1, 5, "d1"), welcome),
        (Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 1, 10**18, 4, "d1"), welcome),
        (hello, Welcome(PROTOCOL_VERSION, 3, 2 * 10**18, 6)),
        (hello, Welcome(PROTOCOL_VERSION, 0, 2 * 10**18 + 1, 6)),
        (hello, Welcome(PROTOCOL_VERSION, 0, 2 * 10**18, 7)),
    ):
        assert not auth.verify(key, role, *changed, mac)  # type: ignore[arg-type]
