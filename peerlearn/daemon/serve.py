"""``peerlearn run``: one daemon in this process, on uvloop, until SIGTERM/SIGINT or /stop.

Signals are handled here and only here (two stages, as uvicorn does): the first asks for a
graceful shutdown, a second one exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import uvloop

from peerlearn.daemon.config import NodeConfig
from peerlearn.daemon.node import Daemon

__all__ = ["serve"]

log = logging.getLogger("peerlearn")


async def _main(cfg: NodeConfig) -> int:
    daemon = Daemon(cfg)
    await daemon.start()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            daemon.request_stop(f"{sig.name} (again to force)")
        else:
            log.warning("%s again: exiting without a graceful shutdown", sig.name)
            os._exit(130)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await daemon.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    failed = [w for w in daemon.workers if w.error is not None]
    return 1 if failed and len(failed) == len(daemon.workers) else 0


def serve(cfg: NodeConfig) -> int:
    """Run the daemon to its end; the exit code (0, or 1 if every local worker crashed)."""
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    return uvloop.run(_main(cfg))
