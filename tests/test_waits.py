"""Whom a worker waits on, and giving up on a peer: /status names the senders still missing
and the peers away that host them, for waits on a quorum and on the inbox alike; where frames
are kept, a peer away longer than peer_give_up makes the workers waiting on it `blocked` (and
is logged once), and the run resumes when it is back. Also two lifecycle bugs of the links:
an all-stop of several daemons while links reconnect, and a late close of an old connection
answering a new connection's handshake."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jsonschema
import numpy as np
import pytest

from peerlearn.daemon.config import load_node_config
from peerlearn.errors import ConfigError
from peerlearn.testing import LocalCluster, local_cluster, poll_status
from peerlearn.transport import links as links_module
from peerlearn.transport.links import LinkSettings, LinkState, OutLink
from peerlearn.transport.protocol import FrameProtocol
from peerlearn.transport.stats import TransportStats
from peerlearn.wire import (
    PROTOCOL_VERSION,
    Ack,
    Codec,
    Hello,
    Join,
    Message,
    RemoteProtocolError,
    Welcome,
)

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 10, "sigma": 1.0}


def _validator(doc: dict[str, Any], path: str) -> jsonschema.protocols.Validator:
    """The JSON Schema of ``GET path``'s answer in the served OpenAPI document."""
    schema = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
    root = {**schema["schema"], "components": doc["components"]}
    return jsonschema.validators.validator_for(root)(root)


@contextmanager
def _dead_port() -> Iterator[int]:
    """A port nothing listens on (bound, not listening: connections to it are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _cut(links: list[OutLink], port: int) -> dict[OutLink, int]:
    """Cut ``links`` as a pulled cable would: their connections drop and every reconnect is
    refused (they dial ``port``) until :func:`_mend`. Returns the ports to restore."""
    ports = {link: link.port for link in links}
    for link in links:
        link.port = port
        if link._proto is not None:
            link._proto.abort()
    return ports


def _mend(ports: dict[OutLink, int]) -> None:
    for link, port in ports.items():
        link.port = port


def _workers(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["id"]: w for w in status["workers"]}


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def _logged(caplog: pytest.LogCaptureFixture, text: str, count: int) -> None:
    """Until ``count`` lines with ``text`` were logged (no event marks a log line: poll)."""
    async with asyncio.timeout(10):
        while len(_lines(caplog, text)) < count:
            await asyncio.sleep(0.02)


# --- whom a wait waits on --------------------------------------------------------------------


async def test_a_quorum_wait_names_the_missing_processes_capped_and_the_peers_away() -> None:
    """Alg 1, 3 daemons × 9 workers, N = 14; only daemon 0 runs: its workers have their own 9
    messages and wait for 5 more. /status names the 18 processes of the absent daemons (the
    first 16, and the total) and the two daemons, away (they never came)."""
    async with local_cluster(
        3, workers=9, algorithm="alg1", steps=None, problem=QUAD, peer_timeout=0.3, start=False
    ) as cluster:
        await cluster.daemons[0].start()
        status = await poll_status(
            cluster.urls[0],
            lambda s: all("waiting" in w and w["waiting"]["peers"] for w in s["workers"]),
            timeout=10,
        )
        waiting = _workers(status)["0.0"]["waiting"]
        assert (waiting["unit"], waiting["have"], waiting["need"]) == ("processes", 9, 14)
        absent = [f"{c}.{i}" for i in range(9) for c in (1, 2)]  # in pid order
        assert waiting["missing"] == absent[:16] and waiting["missing_total"] == 18
        assert waiting["peers"] == [1, 2]
        # Alg 1 drops frames for an away peer: nobody is given up on, and 9 + 0 < 14 is
        # blocked only after stall_timeout (10 s), not yet
        assert _workers(status)["0.0"]["state"] == "running"
        doc = (await cluster.client(0).get("/openapi.json")).json()
        _validator(doc, "/status").validate(status)
        peers = (await cluster.client(0).get("/peers")).json()
        _validator(doc, "/peers").validate(peers)
        assert all(p["away"] and p["away_seconds"] > 0.3 for p in peers), peers


async def test_a_cluster_majority_wait_names_the_clusters_with_none() -> None:
    """Agreement (MajorityOfClusters) with 3 daemons, only daemon 0 running: it waits for a
    second cluster; both others are missing, and away."""
    async with local_cluster(
        3, workers=1, algorithm="maa", steps=5, peer_timeout=0.3, start=False
    ) as cluster:
        await cluster.daemons[0].start()
        status = await poll_status(
            cluster.urls[0],
            lambda s: "waiting" in s["workers"][0] and s["workers"][0]["waiting"]["peers"],
            timeout=10,
        )
        waiting = status["workers"][0]["waiting"]
        assert (waiting["unit"], waiting["have"], waiting["need"]) == ("clusters", 1, 2)
        assert waiting["missing"] == ["1", "2"] and waiting["missing_total"] == 2
        assert waiting["peers"] == [1, 2]


# --- giving up on a peer (frames kept) --------------------------------------------------------


async def test_a_peer_away_longer_than_peer_give_up_blocks_whoever_waits_on_it_until_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Asynchronous EASGD keeps its frames. With the cable between the center's daemon (0) and
    the worker's (1) cut, the worker waits for its answer (a quorum of one that nothing
    judged unreachable) and the center on its inbox: after peer_give_up both are `blocked`,
    each naming the other daemon, /peers says for how long it has been away, and each daemon
    logs it once. Mended, the kept frames go out and both run again."""
    caplog.set_level(logging.INFO, logger="peerlearn")
    async with local_cluster(
        2,
        workers=1,
        algorithm="async_easgd",
        steps=None,
        problem=QUAD,
        peer_timeout=0.4,
        peer_give_up=1.0,
        stall_timeout=0.3,
    ) as cluster:
        await cluster.wait_for(lambda: cluster.min_step() > 3)
        links = [link for d in cluster.daemons for link in d.links]
        with _dead_port() as dead:
            ports = _cut(links, dead)
            try:
                statuses = [
                    await poll_status(
                        url,
                        lambda s: s["workers"][0]["state"] == "blocked",
                        timeout=10,
                        interval=0.05,
                    )
                    for url in cluster.urls
                ]
                peers = [(await cluster.client(i).get("/peers")).json() for i in (0, 1)]
                # logged by each daemon's peer watch, a few times per peer_timeout
                await _logged(caplog, "longer than peer_give_up", 2)
            finally:
                _mend(ports)
        center, worker = (s["workers"][0] for s in statuses)
        assert center["id"] == "0.0" and center["waiting"]["tag"] == ["inbox"], center
        assert center["waiting"]["missing"] is None and center["waiting"]["peers"] == [1]
        assert worker["waiting"]["tag"][0] == "rep", worker
        assert worker["waiting"]["missing"] == ["0.0"] and worker["waiting"]["peers"] == [0]
        for answer in peers:
            (peer,) = answer
            assert peer["away"] and peer["away_seconds"] > 1.0, peer
        doc = (await cluster.client(0).get("/openapi.json")).json()
        for s in statuses:
            _validator(doc, "/status").validate(s)

        before = cluster.min_step()
        await cluster.wait_for(lambda: cluster.min_step() > before + 3, timeout=20)
        for i in (0, 1):
            status = (await cluster.client(i).get("/status")).json()
            assert status["workers"][0]["state"] == "running", status
            (peer,) = (await cluster.client(i).get("/peers")).json()
            assert not peer["away"] and peer["away_seconds"] is None, peer
    assert len(_lines(caplog, "longer than peer_give_up")) == 2  # once per daemon
    back = _lines(caplog, "the run resumes")
    assert len(back) == 2 and all("is back after" in line for line in back), back


def test_peer_give_up_is_a_setting_and_never_shorter_than_peer_timeout() -> None:
    assert load_node_config(None, {}).peer_give_up == 300.0
    assert load_node_config(None, {"peer_give_up": 7, "peer_timeout": 2}).peer_give_up == 7
    with pytest.raises(ConfigError, match=r"peer_give_up \(1 s\) must be at least peer_timeout"):
        load_node_config(None, {"peer_give_up": 1})
    with pytest.raises(ConfigError, match="peer_give_up: Input should be greater than 0"):
        load_node_config(None, {"peer_give_up": 0})


# --- shutdown: links that reconnect while everyone stops --------------------------------------


def _one_frame_each(cluster: LocalCluster) -> None:
    """A frame outstanding on every link (a snapshot: harmless wherever it lands)."""
    for d in cluster.daemons:
        for link in d.links:
            assert link.offer_nowait(("snapshot", 0), d.pids[0], 0, np.zeros(d.dim))


async def test_stopping_three_daemons_at_once_while_their_links_reconnect_takes_no_drain_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every link is down with a frame outstanding and comes back only once every daemon has
    begun to drain. Before, each daemon closed its server first, so no link could reconnect to
    collect its acks or a bye, and each waited out drain_timeout (20 s here)."""
    caplog.set_level(logging.WARNING, logger="peerlearn")
    async with local_cluster(
        3,
        workers=1,
        algorithm="alg1",
        steps=None,
        problem=QUAD,
        drain_timeout=20.0,
        stop_grace=0.0,
    ) as cluster:
        await cluster.wait_for(lambda: cluster.min_step() > 3)
        links = [link for d in cluster.daemons for link in d.links]
        with _dead_port() as dead:
            ports = _cut(links, dead)
            _one_frame_each(cluster)
            draining = 0
            everyone = asyncio.Event()
            for link in links:
                close = link.close

                # The cable is mended once every link has begun to drain: the links reconnect
                # while all three daemons stop.
                async def draining_then_mended(
                    drain_unconnected: bool = True, close: Any = close
                ) -> None:
                    nonlocal draining
                    draining += 1
                    if draining == len(links):
                        _mend(ports)
                        everyone.set()
                    await everyone.wait()
                    await close(drain_unconnected)

                link.close = draining_then_mended  # type: ignore[method-assign]
            start = time.monotonic()
            await asyncio.gather(*(d.stop() for d in cluster.daemons))
            took = time.monotonic() - start
    assert took < 5.0, f"stopping took {took:.1f}s"  # a bound on a stall, not a speed target
    assert not _lines(caplog, "not acked at shutdown")


async def test_a_peer_that_says_bye_on_its_own_link_is_away_at_once_for_this_one() -> None:
    """Daemon 0's link to daemon 1 is down (with a frame outstanding) when daemon 1 stops: the
    bye daemon 1 sends on its own link to 0 tells daemon 0 too. Before, daemon 0 took it for
    a peer still reconnecting: not away before peer_timeout, and its stop waited out
    drain_timeout for acks that could not come."""
    async with local_cluster(
        2,
        workers=1,
        algorithm="alg1",
        steps=None,
        problem=QUAD,
        drain_timeout=20.0,
        stop_grace=0.0,
    ) as cluster:
        await cluster.wait_for(lambda: cluster.min_step() > 3)
        first, second = cluster.daemons
        (link,) = first.links
        with _dead_port() as dead:
            _cut([link], dead)
            assert link.offer_nowait(("snapshot", 0), first.pids[0], 0, np.zeros(first.dim))
            await second.stop()
            assert link.state is not LinkState.CONNECTED and link.away
            start = time.monotonic()
            await first.stop()
            assert time.monotonic() - start < 5.0


# --- a late close of an old connection --------------------------------------------------------


class _Acceptor:
    """A peer that answers the handshake by hand: never on the first connection, and on the
    second only after ``late`` (the first connection's delayed close) has run."""

    def __init__(self, late: asyncio.Event) -> None:
        self.connections = 0
        self.second_hello = asyncio.Event()  # the second connection's handshake has begun
        self._late = late
        self._tasks: set[asyncio.Task[None]] = set()

    def protocol(self) -> FrameProtocol:
        self.connections += 1
        number = self.connections
        return FrameProtocol(
            Codec(),
            lambda proto, msg: self._on_message(number, proto, msg),
            self._on_error,
            self._on_lost,
        )

    def _on_message(self, number: int, proto: FrameProtocol, msg: Message) -> None:
        if isinstance(msg, Hello) and number >= 2:
            self.second_hello.set()
            task = asyncio.ensure_future(self._welcome(number, proto))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(msg, Join):
            proto.send(Ack(seq=0))

    async def _welcome(self, number: int, proto: FrameProtocol) -> None:
        if number == 2:
            await self._late.wait()
        proto.send(Welcome(version=PROTOCOL_VERSION, cluster=1, incarnation=1, nonce=7))

    def _on_error(self, proto: FrameProtocol, exc: RemoteProtocolError) -> None:
        raise AssertionError(f"the acceptor got a bad frame: {exc}")

    def _on_lost(self, proto: FrameProtocol, exc: Exception | None) -> None:
        pass


async def test_an_old_connection_closing_late_does_not_fail_the_next_handshake(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first connection's Hello goes unanswered and the link gives it up; its close
    completes only once the second connection's handshake has begun (as a close with bytes
    still buffered does). Before, one answer slot per link: the old connection's loss
    answered the new handshake with "connection closed", which then failed (and its
    connection was left open) — the link needed a third connection."""
    caplog.set_level(logging.INFO, logger="peerlearn")
    loop = asyncio.get_running_loop()
    late = asyncio.Event()
    acceptor = _Acceptor(late)
    server = await loop.create_server(acceptor.protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dialed: list[FrameProtocol] = []

    class LateClose(FrameProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            dialed.append(self)

        def close(self) -> None:
            if self is not dialed[0]:
                super().close()
                return

            # completes when the second connection's handshake is under way
            async def later() -> None:
                await acceptor.second_hello.wait()
                super(LateClose, self).close()
                await self.closed.wait()
                late.set()

            self._later = asyncio.ensure_future(later())

    monkeypatch.setattr(links_module, "FrameProtocol", LateClose)
    hello = Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 1, 0, "0@127.0.0.1:0")
    settings = LinkSettings(connect_timeout=0.3, backoff_initial=0.01, backoff_max=0.02)
    link = OutLink(
        1, "127.0.0.1", port, hello, Join((0,), 1, "float64", "run"), settings,
        TransportStats(), loop,
    )  # fmt: skip
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(late.wait(), 10)
        for _ in range(500):  # the second handshake ends at once now: Welcome, Join, Ack
            if link.state is LinkState.CONNECTED:
                break
            await asyncio.sleep(0.01)
        assert link.state is LinkState.CONNECTED
        assert acceptor.connections == 2, acceptor.connections
        assert not _lines(caplog, "connection closed during the handshake")
    finally:
        await link.close()
        await task
        server.close()
        await server.wait_closed()


async def test_an_idle_link_stays_up() -> None:
    """Two daemons that finished send each other nothing: the dialer pings anyway once it has
    said nothing for a quarter of peer_timeout (the acceptor's own pongs keep the dialer hearing,
    but the acceptor judges the dialer by what it sends). Before, every idle link was dropped as
    silent and reconnected once per peer_timeout, two log lines each time."""
    timeout = 0.5
    async with local_cluster(
        2, workers=1, algorithm="alg1", steps=5, problem=QUAD, peer_timeout=timeout
    ) as cluster:
        await cluster.wait_until_finished()
        await asyncio.sleep(4 * timeout)  # the window in which nothing may happen
        for d in cluster.daemons:
            assert d.stats.reconnects == 0
            assert d.stats.protocol_errors.get("peer_silent", 0) == 0


async def test_a_producer_held_by_one_full_window_has_sent_to_every_other_peer() -> None:
    """Alg 1, three daemons. Daemon 0 stops reading what daemon 1 sends it (asyncio's own flow
    control on its connection): it acks nothing, and daemon 1's window to it fills. Daemon 1's
    worker then waits on that link (its first, by cluster id) — but only after the frame it
    waits to send there has gone to daemon 2: one slow peer holds back nobody else's frames."""
    async with local_cluster(
        3,
        workers=1,
        algorithm="alg1",
        steps=None,
        quorum=1,
        problem=QUAD,
        queue_size=8,
        queue_timeout=60.0,
        peer_timeout=60.0,
    ) as cluster:
        await cluster.wait_for(lambda: min(cluster.steps()) > 5)
        zero, one = cluster.daemons[0], cluster.daemons[1]
        assert zero.transport is not None
        for proto, state in list(zero.transport._inbound.items()):
            if state.cluster == 1 and proto.transport is not None:
                proto.transport.pause_reading()
        to_zero, to_two = one.links  # sorted by cluster id
        assert (to_zero.cluster, to_two.cluster) == (0, 2)
        await cluster.wait_for(lambda: bool(to_zero.senders_waiting), timeout=30)
        # the frame held for daemon 0 is queued for daemon 2 (from the loop), and no other
        try:
            await cluster.wait_for(lambda: to_two._seq == to_zero._seq + 1, timeout=5)
        except TimeoutError:  # say what was sent where
            raise AssertionError(f"to 2: {to_two._seq}, to 0: {to_zero._seq}") from None
        assert to_zero.senders_waiting and to_two._seq == to_zero._seq + 1
