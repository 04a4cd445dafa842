"""One TCP connection driven by the sans-IO codec (httpcore's ``http11.py`` shape).

Bytes arrive through ``asyncio.BufferedProtocol`` straight into the codec's buffers — a
payload lands directly in its final numpy array, never in a ``bytes`` object. Codec errors are
translated here and only here: a :class:`~peerlearn.wire.RemoteProtocolError` is counted by
reason, logged, and closes this one connection; nothing propagates to the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from peerlearn.wire import Codec, Message, RemoteProtocolError, Sentinel

__all__ = ["FrameProtocol", "keep_alive"]

log = logging.getLogger(__name__)


class FrameProtocol(asyncio.BufferedProtocol):
    """Frames in, frames out, for one connection.

    :param on_message: called on the event loop for every decoded message.
    :param on_error: called once with the protocol error that closed the connection.
    :param on_lost: called once when the connection is gone (cleanly or not).
    :param on_made: called once the connection is made (its peer's address known).
    """

    def __init__(
        self,
        codec: Codec,
        on_message: Callable[[FrameProtocol, Message], None],
        on_error: Callable[[FrameProtocol, RemoteProtocolError], None],
        on_lost: Callable[[FrameProtocol, Exception | None], None],
        timeout: float | None = None,
        on_made: Callable[[FrameProtocol], None] | None = None,
    ) -> None:
        self.codec = codec
        self._on_made = on_made
        self._timeout = timeout
        self._on_message = on_message
        self._on_error = on_error
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = asyncio.Event()
        self._paused = False  # pause_reading(): no message is taken, buffered or not
        self.peername: Any = None
        self.sent_bytes = 0
        self.received_bytes = 0
        #: when the last bytes came in (monotonic): liveness is judged on it
        self.heard_at = time.monotonic()
        #: when the last message went out: an idle dialer pings so that the other side hears it
        self.sent_at = self.heard_at

    def __repr__(self) -> str:
        return f"FrameProtocol({self.peername})"

    @property
    def remote(self) -> str:
        """The other end's address as log lines show it: ``127.0.0.1:41234``, ``[::1]:41234``."""
        peer = self.peername
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = str(peer[0])
            return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        return str(peer) if peer else "an unknown address"

    # --- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peername = transport.get_extra_info("peername")
        if self._timeout is not None:
            keep_alive(transport, self._timeout)
        if self._on_made is not None:
            self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.codec.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.received_bytes += nbytes
        self.heard_at = time.monotonic()
        try:
            self.codec.buffer_updated(nbytes)
            self._drain_events()
        except RemoteProtocolError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        try:
            self.codec.receive_eof()
            self._drain_events()
        except RemoteProtocolError as exc:
            self._fail(exc)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()  # wake a writer waiting on flow control: it will see `closed`
        if not self.closed.is_set():
            self.closed.set()
            self._on_lost(self, exc)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- sending ------------------------------------------------------------------------------

    def send(self, msg: Message) -> int:
        """Write one message (header, then a memoryview of the payload: no copy here)."""
        return self.write(self.codec.send(msg))

    def encode(self, msg: Message, part_bytes: int) -> list[list[bytes | memoryview]]:
        """``msg``'s frames (its parts, for a large Data), to :meth:`write` one by one."""
        return self.codec.send_parts(msg, part_bytes)

    def write(self, chunks: list[bytes | memoryview]) -> int:
        """Write one encoded frame (:meth:`Codec.send`, or a part of :meth:`Codec.send_parts`);
        the bytes written (0: the connection is closing)."""
        if self.transport is None or self.transport.is_closing():
            return 0
        n = 0
        for chunk in chunks:
            # One write per chunk: writelines would join them into one bytes (a copy).
            self.transport.write(chunk)
            n += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
        self.sent_bytes += n
        self.sent_at = time.monotonic()
        return n

    async def drain(self) -> None:
        """Wait while the kernel and the transport's buffer are full (flow control)."""
        await self._writable.wait()

    def pause_reading(self) -> None:
        """Take nothing more from this connection — not the messages already in the codec's
        buffer either — until :meth:`resume_reading`: the kernel's buffers, then the sender's
        window fill (back-pressure)."""
        self._paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Take messages again, starting with those left in the codec's buffer (on the loop's
        next turn: not from inside the caller)."""
        if not self._paused:
            return
        self._paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        try:
            self._drain_events()
        except RemoteProtocolError as exc:
            self._fail(exc)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent bytes and all (a peer that stopped reading would
        hold a closing transport with a full buffer open for good)."""
        if self.transport is not None:
            self.transport.abort()

    # --- internals ----------------------------------------------------------------------------

    def _drain_events(self) -> None:
        while not self._paused:
            event = self.codec.next_event()
            if isinstance(event, Sentinel):  # NEED_DATA, or CLOSED at a frame boundary
                return
            self._on_message(self, event)
            if self.transport is None or self.transport.is_closing():
                return

    def _fail(self, exc: RemoteProtocolError) -> None:
        log.warning("closing connection from %s: %s (%s)", self.remote, exc, exc.reason)
        self._on_error(self, exc)
        self.close()


def keep_alive(transport: asyncio.BaseTransport, timeout: float) -> None:
    """Let the kernel notice a dead route in about ``timeout`` seconds, not at the next
    retransmission timeout (minutes): TCP keepalive probes on an idle connection, and
    ``TCP_USER_TIMEOUT`` for data that stays unacknowledged. Best effort: an option this
    platform lacks is skipped (the links' own heartbeat covers what the kernel cannot see, such
    as a stopped process whose kernel still acknowledges)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    seconds = max(1, round(timeout))
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), max(1, seconds // 2)),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), max(1, seconds // 4)),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), int(timeout * 1000)),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)
