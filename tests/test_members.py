"""Members only, continued (peerlearn/transport/peers.py, auth.py): members whose run settings
differ are told which ones, from each side's point of view — and only members, never a
stranger; one connection per member, so that nobody but the sender of a link moves its
sequence numbers. Real daemons and sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from peerlearn.testing import local_cluster
from peerlearn.transport import auth
from peerlearn.wire import PROTOCOL_VERSION, Hello, Join, Refuse, Welcome

from .test_secret import QUAD, _secret, _Stranger


def _refusal(c: Any, i: int) -> str:
    (link,) = c.daemons[i].links
    return link.last_refusal or ""


async def test_members_are_told_which_settings_differ_and_strangers_are_not(
    tmp_path: Path,
) -> None:
    secret = _secret(tmp_path)
    async with local_cluster(
        2,
        workers=1,
        algorithm="alg1",
        problem=QUAD,
        secret_file=secret,
        steps=1000,
        each=lambda i: {"lr": {"eta": 0.05 if i == 0 else 0.1}},
    ) as c:
        await c.wait_for(lambda: "settings differ" in _refusal(c, 0), 30)
        await c.wait_for(lambda: "settings differ" in _refusal(c, 1), 30)
        assert _refusal(c, 0) == (
            "refused this daemon: its run settings differ from this daemon's: "
            "lr.eta is 0.1 there, 0.05 here"
        )
        assert _refusal(c, 1).endswith("lr.eta is 0.05 there, 0.1 here")
        peers = (await c.client(0).get("/peers")).json()
        assert "lr.eta is 0.1 there, 0.05 here" in peers[0]["refused"]
        # A stranger with a wrong proof sends digests of its own: it gets one code back, not
        # a word about the settings.
        port = c.daemons[0].peer_port
        assert port is not None
        s = _Stranger(port)
        try:
            hello = Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 1, time.time_ns(), 5, "x")
            s.send(hello)
            welcome = await asyncio.to_thread(s.receive)
            assert isinstance(welcome, Welcome)
            guess = auth.setting_digests(b"a guess", {"lr.eta": "0.1"})
            s.send(Join((1,), 4, "float64", "guess", b"\0" * 32, guess))
            assert await asyncio.to_thread(s.receive) == Refuse(reason="bad_secret")
        finally:
            s.close()


async def test_without_a_secret_a_refusal_names_no_setting() -> None:
    async with local_cluster(
        2,
        workers=1,
        algorithm="alg1",
        problem=QUAD,
        steps=1000,
        each=lambda i: {"lr": {"eta": 0.05 if i == 0 else 0.1}},
    ) as c:
        await c.wait_for(lambda: "settings differ" in _refusal(c, 0), 30)
        assert "lr.eta" not in _refusal(c, 0) and "there" not in _refusal(c, 0)
        assert "start every daemon with the same run" in _refusal(c, 0)


async def test_a_second_connection_claiming_a_connected_member_is_refused() -> None:
    async with local_cluster(2, workers=1, algorithm="alg1", problem=QUAD, steps=100_000) as c:
        await c.wait_for(lambda: c.min_step() >= 20, 30)
        port = c.daemons[0].peer_port
        real = c.daemons[1]
        assert port is not None
        # The real cluster 1's own start, claimed while its link is connected: refused — the
        # injected frames that would take its sequence numbers never get in.
        s = _Stranger(port)
        try:
            s.send(Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 1, real.incarnation, 9, "x"))
            assert isinstance(await asyncio.to_thread(s.receive), Welcome)
            s.send(Join((1,), 4, "float64", real.cfg.fingerprint))
            assert await asyncio.to_thread(s.receive) == Refuse(reason="already_connected")
            assert await asyncio.to_thread(s.receive) is None
        finally:
            s.close()
        metrics = (await c.client(0).get("/metrics")).text
        assert 'peerlearn_protocol_errors_total{reason="already_connected"} 1.0' in metrics
        at = c.min_step()
        await c.wait_for(lambda: c.min_step() > at + 20, 30)  # honest training goes on
        assert sum(c.daemons[0].stats.dropped.values()) == 0
