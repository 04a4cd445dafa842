"""Mutual TLS on peer links (peerlearn/transport/tls.py): members of one CA train over
encrypted links; a daemon whose certificate another CA signed, and a plain-TCP stranger, get
nowhere; a key file others may read stops the start. Real daemons on 127.0.0.1, certificates
made by the openssl command line (skipped without it)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from peerlearn.errors import StartupError
from peerlearn.testing import local_cluster
from peerlearn.wire import PROTOCOL_VERSION, Codec, Hello

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 4}

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> Path:
    """A CA certificate and key in ``directory``: ``{name}.pem``, ``{name}.key``."""
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.pem"


def make_cert(directory: Path, ca: str, name: str) -> tuple[Path, Path]:
    """A certificate signed by ``ca`` (made by :func:`make_ca` in ``directory``) and its key
    (mode 600)."""
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
        cwd=directory,
    )  # fmt: skip
    key = directory / f"{name}.key"
    key.chmod(0o600)
    return directory / f"{name}.pem", key


def _tls(directory: Path, ca: str, name: str) -> dict[str, Any]:
    cert, key = make_cert(directory, ca, name)
    return {"tls_cert": cert, "tls_key": key, "tls_ca": directory / f"{ca}.pem"}


async def test_members_of_one_ca_train_over_tls_and_a_plain_stranger_gets_nothing(
    tmp_path: Path,
) -> None:
    make_ca(tmp_path, "ca")
    files = [_tls(tmp_path, "ca", f"d{i}") for i in range(2)]
    async with local_cluster(
        2, workers=1, algorithm="alg1", problem=QUAD, steps=100_000, each=lambda i: files[i]
    ) as c:
        await c.wait_for(lambda: c.min_step() >= 20, 30)
        status = (await c.client(0).get("/status")).json()
        assert status["security"]["peer_links"] == "authenticated (mutual TLS)"
        assert status["security"]["encrypted"] is True
        port = c.daemons[0].peer_port
        assert port is not None

        def stranger() -> bytes:
            """A plain-TCP Hello: what comes back before the daemon closes the connection."""
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                hello = Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 1, 1, 1, "x")
                for chunk in Codec().send(hello):
                    s.sendall(chunk)
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
                return got

        answer = await asyncio.to_thread(stranger)
        assert b"PL" not in answer  # no peerlearn frame: at most a TLS alert
        at = c.min_step()
        await c.wait_for(lambda: c.min_step() > at + 20, 30)


async def test_a_daemon_of_another_ca_is_kept_out(tmp_path: Path) -> None:
    make_ca(tmp_path, "ca")
    make_ca(tmp_path, "other")
    files = [_tls(tmp_path, "ca", "d0"), _tls(tmp_path, "other", "d1")]
    async with local_cluster(
        2, workers=1, algorithm="alg1", problem=QUAD, steps=100, each=lambda i: files[i]
    ) as c:

        def error(i: int) -> str:
            (link,) = c.daemons[i].links
            return link.last_error or ""

        await c.wait_for(lambda: "TLS handshake failed" in error(0) and "TLS" in error(1), 30)
        assert "signed by the run's CA" in error(0)
        assert all(d.links[0].state != "connected" for d in c.daemons)
        assert c.min_step() == 0


async def test_a_key_others_may_read_or_a_half_config_stops_the_start(tmp_path: Path) -> None:
    make_ca(tmp_path, "ca")
    files = _tls(tmp_path, "ca", "d0")
    files["tls_key"].chmod(0o644)
    async with local_cluster(
        1, workers=1, algorithm="alg1", problem=QUAD, steps=10, start=False, **files
    ) as c:
        with pytest.raises(StartupError, match="can be read by others"):
            await c.daemons[0].start()
    with pytest.raises(Exception, match="tls_cert, tls_key and tls_ca together"):
        async with local_cluster(1, workers=1, tls_cert=files["tls_cert"]):
            pass
