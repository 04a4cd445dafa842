"""``peerlearn run``: one daemon in this process, on uvloop, until SIGTERM/SIGINT or /stop.

Signals are handled here and only here (two stages, as uvicorn does): the first asks for a
graceful shutdown, a second one exits at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
from datetime import UTC, datetime

import uvloop

from peerlearn.daemon.config import NodeConfig
from peerlearn.daemon.node import Daemon
from peerlearn.problems import Problem

__all__ = ["JsonFormatter", "run_daemon", "serve", "setup_logging"]

log = logging.getLogger("peerlearn")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (UTC, RFC 3339), ``level``, ``logger``,
    ``message``, and ``exception`` (the traceback) when there is one — for log collectors,
    which then need no pattern to split a line or to join a traceback's lines."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, str] = {
            "time": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str) -> None:
    """Log to stderr at ``level`` as ``fmt`` (text or json), every logger of the process alike:
    uvicorn's and asyncio's records reach the root handler (the daemon gives uvicorn no
    logging config of its own), and Python warnings become records too."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.captureWarnings(True)


async def _main(
    cfg: NodeConfig, problem: Problem | None = None, ran: list[Daemon] | None = None
) -> int:
    daemon = Daemon(cfg, problem=problem)
    if ran is not None:
        ran.append(daemon)
    loop = asyncio.get_running_loop()
    # Only the main thread takes signals (a notebook's daemon runs on a thread of its own).
    handles = threading.current_thread() is threading.main_thread()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            daemon.request_stop(f"{sig.name} (again to force)")
        else:
            log.warning("%s again: exiting without a graceful shutdown", sig.name)
            os._exit(130)

    # Before start(): a signal while starting (binding, connecting) also stops gracefully.
    signals_handled = (signal.SIGTERM, signal.SIGINT) if handles else ()
    for sig in signals_handled:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await daemon.start()
        await daemon.wait()
    finally:
        for sig in signals_handled:
            loop.remove_signal_handler(sig)
    # A worker whose model or gradient turned non-finite failed as well: the run diverged.
    diverged = [
        f"{w.name} (non-finite {w.diverged.quantity} at iteration {w.diverged.step})"
        for w in daemon.workers
        if w.diverged is not None
    ]
    if diverged:
        log.error("exit code 1: worker(s) %s diverged", ", ".join(diverged))
    # Any worker that raised fails the daemon, even if the others finished: a process of the
    # run crashed, and a supervisor or script must see that without reading the logs.
    failed = [w.name for w in daemon.workers if w.error is not None]
    if failed:
        log.error("exit code 1: worker(s) %s crashed (tracebacks above)", ", ".join(failed))
    # The model to take home is missing: a supervisor or script must see that too.
    if daemon.output_failed:
        log.error("exit code 1: the final model was not written to --out (see above)")
    return 1 if failed or diverged or daemon.output_failed else 0


def serve(cfg: NodeConfig) -> int:
    """Run the daemon to its end; the exit code: 0, or 1 if a local worker diverged or any
    local worker crashed."""
    setup_logging(cfg.log_level, cfg.log_format)
    return uvloop.run(_main(cfg))


def run_daemon(
    cfg: NodeConfig, problem: Problem | None = None, ran: list[Daemon] | None = None
) -> tuple[int, Daemon]:
    """:func:`serve` for a script (:func:`peerlearn.torch.train`): ``problem`` instead of the
    config's, logging left as the script set it up (stderr at ``log_level`` if it did not);
    the exit code and the daemon, stopped, to read its models from. ``ran`` gets the daemon
    as soon as it exists (another thread may stop it)."""
    setup_logging(cfg.log_level, cfg.log_format)  # (no-op where logging is set up)
    ran = [] if ran is None else ran
    code = uvloop.run(_main(cfg, problem, ran))
    return code, ran[-1]
