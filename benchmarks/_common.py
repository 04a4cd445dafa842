"""What the benchmarks that start real daemons share: free loopback ports and progress read
from ``/status``.

Benchmarks run as scripts (``python benchmarks/bench_round.py``); each puts the repository
on ``sys.path`` first and imports this as ``benchmarks._common``.
"""

from __future__ import annotations

import json
import socket
import urllib.request

__all__ = ["free_ports", "gradients"]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel hands out for port 0, all held until every one is picked (no port
    twice). Another process may still take one before the daemon binds it: rare, and the
    benchmark then says so instead of measuring."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def gradients(api: str) -> int:
    """Gradients all workers of the daemon at ``api`` (``http://host:port``) have computed."""
    with urllib.request.urlopen(f"{api}/status", timeout=30) as r:
        return sum(int(w["gradients"]) for w in json.load(r)["workers"])
