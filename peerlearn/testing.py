"""In-process peers for integration tests — yours and ours.

``local_cluster`` starts k daemons in this process, on 127.0.0.1 port 0 (listening sockets are
bound first, so every daemon's config can list the others' real addresses), and stops them on
exit::

    async with local_cluster(3, workers=2, algorithm="alg1", steps=100) as cluster:
        await cluster.wait_for(lambda: cluster.min_step() > 20)
        status = (await cluster.client(0).get("/status")).json()

The ``peerlearn_cluster`` pytest fixture (a plugin registered through the ``pytest11`` entry
point, so it is available wherever peerlearn is installed) yields that same factory::

    async def test_mine(peerlearn_cluster):
        async with peerlearn_cluster(3, steps=50) as cluster:
            await cluster.wait_until_finished()
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from peerlearn.daemon.config import load_node_config
from peerlearn.daemon.node import Daemon, DaemonState
from peerlearn.runtime.worker import Worker

__all__ = ["LocalCluster", "local_cluster", "peerlearn_cluster", "poll_status"]


#: :meth:`LocalCluster.wait_for` re-checks its condition at least this often (seconds)
RECHECK = 0.2


@dataclass
class LocalCluster:
    """Running daemons, their URLs and HTTP clients."""

    daemons: list[Daemon]
    clients: dict[int, httpx.AsyncClient] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        """Control API URLs (of started daemons; ``port None`` for the others)."""
        return [f"http://127.0.0.1:{d.api_port}" for d in self.daemons]

    def client(self, i: int) -> httpx.AsyncClient:
        """An HTTP client for daemon i's control API (the daemon must have started)."""
        if i not in self.clients:
            if self.daemons[i].api_port is None:
                raise RuntimeError(f"daemon {i} has not started: no control API yet")
            self.clients[i] = httpx.AsyncClient(base_url=self.urls[i])
        return self.clients[i]

    def steps(self) -> list[int]:
        """Iterations each worker has completed (its step in /status)."""
        return [w.completed for d in self.daemons for w in d.workers]

    def min_step(self) -> int:
        """The fewest iterations any *live* worker has completed (``Worker.live``: crashed and
        diverged workers are left out, since their step never grows again and a
        ``wait_for(lambda: min_step() > k)`` would wait out its timeout); RuntimeError when no
        worker is live, so that such a wait fails at once."""
        steps = [w.completed for d in self.daemons for w in d.workers if w.live]
        if not steps:
            raise RuntimeError("no live worker: every worker crashed or diverged")
        return min(steps)

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 60.0) -> None:
        """Wait until ``condition()`` holds, re-checking whenever a worker makes progress —
        and every ``RECHECK`` seconds besides, for conditions no worker's progress signals (a
        link's error, a held frame); TimeoutError after ``timeout`` seconds."""
        events = [d.watch() for d in self.daemons]

        async def loop() -> None:
            while True:
                for e in events:
                    e.clear()
                if condition():
                    return
                waiters = [asyncio.ensure_future(e.wait()) for e in events]
                try:
                    await asyncio.wait(
                        waiters, timeout=RECHECK, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for w in waiters:
                        w.cancel()

        await asyncio.wait_for(loop(), timeout)

    async def wait_until_finished(self, timeout: float = 120.0) -> None:
        await self.wait_for(
            lambda: all(d.state is not DaemonState.RUNNING for d in self.daemons), timeout
        )


async def poll_status(
    url: str,
    condition: Callable[[dict[str, Any]], bool],
    timeout: float = 60.0,
    interval: float = 0.1,
) -> dict[str, Any]:
    """For daemons in *other* processes (no events to wait on across a process boundary):
    GET ``url``/status until ``condition(status)`` holds; returns that status. Connection
    errors while the daemon starts count as "not yet"; TimeoutError after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: dict[str, Any] | None = None
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
        while True:
            try:
                last = (await client.get("/status")).json()
                if condition(last):
                    return last
            except httpx.TransportError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{url}/status never met the condition; last: {last}")
            await asyncio.sleep(interval)


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def local_cluster(
    daemons: int = 3,
    *,
    workers: int = 2,
    worker_factory: Callable[[int], type[Worker]] | None = None,
    start: bool = True,
    each: Callable[[int], dict[str, Any]] | None = None,
    **fields: Any,
) -> AsyncIterator[LocalCluster]:
    """Start ``daemons`` daemons with ``workers`` workers each; ``fields`` are NodeConfig
    fields common to all (algorithm, steps, problem, …), ``each(i)`` those of daemon i alone
    (its ``out`` directory, say). ``worker_factory(i)`` picks the worker class of daemon i
    (fault injection)."""
    # Sorted like the configs sort addresses, so that daemon i is cluster i.
    socks = sorted((_bound_socket() for _ in range(daemons)), key=lambda s: s.getsockname()[1])
    addrs = [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    nodes = []
    for i, sock in enumerate(socks):
        cfg = load_node_config(
            None,
            {
                "listen": addrs[i],
                "peers": [a for a in addrs if a != addrs[i]],
                "api": "127.0.0.1:0",
                "workers": workers,
                "eval_every": 1,
                **fields,
                **(each(i) if each is not None else {}),
            },
        )
        factory = worker_factory(i) if worker_factory is not None else Worker
        nodes.append(Daemon(cfg, worker_factory=factory, listen_socket=sock))
    cluster = LocalCluster(nodes)
    try:
        if start:
            for node in nodes:
                await node.start()
        yield cluster
    finally:
        for c in cluster.clients.values():
            await c.aclose()
        await asyncio.gather(
            *(node.stop() for node in nodes if node.state is not DaemonState.STARTING)
        )
        for sock in socks:
            sock.close()


try:  # the fixture exists where pytest does; the context manager works without it
    import pytest
except ImportError:  # pragma: no cover
    pass
else:

    @pytest.fixture
    def peerlearn_cluster() -> Callable[..., AbstractAsyncContextManager[LocalCluster]]:
        """The :func:`local_cluster` factory, as a fixture."""
        return local_cluster
