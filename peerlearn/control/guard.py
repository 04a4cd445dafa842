"""Who may change a daemon through its control API.

Reading (``/status``, ``/peers``, ``/metrics``, ``/model``, the status page) stays open: it is
what Prometheus, Grafana and ``peerlearn collect`` use. A request that changes something
(``POST /stop``) must pass three checks, each refusal counted in
``peerlearn_api_refused_total{reason}``:

* ``token`` — with an API token (``--api-token-file``), ``Authorization: Bearer <token>``,
  compared in constant time (401 otherwise).
* ``origin`` — no ``Origin`` header other than the API's own (http, a name of this daemon, the
  API's port): a web page the operator visits — another local web app included — cannot stop
  the daemon with a cross-site request, "simple" requests included (403). Scripts and ``curl``
  send no ``Origin``.
* ``host`` — the ``Host`` header names this daemon (a loopback name, its API or advertised
  address, or one of ``api_hosts``), whatever the port: a page that rebinds its own DNS name to
  127.0.0.1 reaches the port but not with this daemon's name (421).

A token is required to serve the API on an address other than loopback, unless ``--insecure``
(which the log says loudly at start): without one, anyone who reaches the port could stop the
daemon.

Every connection must send a whole request head (request line and headers) within
``api_header_timeout`` of connecting or of its last response, or it is closed (counted as
``header_timeout``): a client trickling a header byte by byte holds nothing for long.
uvicorn's own limits apply too: idle keep-alive connections close after 5 s, and beyond
``api_max_connections`` connections and tasks requests are answered 503.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import h11
from fastapi import HTTPException, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from peerlearn.errors import StartupError

__all__ = ["ApiGuard", "guarded_http", "is_loopback", "read_token"]

#: names that are this machine whatever its addresses
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
#: a token file longer than this is no token
_TOKEN_CAP = 4096


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, IPv6 with or without brackets) is this machine's
    loopback only; a wildcard (0.0.0.0, ::) is not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Path, what: str = "--api-token-file") -> str:
    """The secret in ``path``: its first line, stripped; StartupError (one line) if the file
    cannot be read, is shorter than 16 characters, or others (neither its owner nor its group)
    may read it."""
    try:
        st = path.stat()
        # Group access is allowed: a Kubernetes Secret reaches a pod's user through fsGroup.
        if st.st_mode & stat.S_IRWXO:
            raise StartupError(
                f"{what} {path}: the file can be read by others (mode "
                f"{stat.filemode(st.st_mode)}); chmod o-rwx {path} (600: the owner's alone)"
            )
        with path.open("rb") as fh:
            raw = fh.read(_TOKEN_CAP + 1)
    except OSError as exc:
        raise StartupError(f"{what} {path}: {exc.strerror or exc}") from None
    if len(raw) > _TOKEN_CAP:
        raise StartupError(f"{what} {path}: more than {_TOKEN_CAP} bytes, not a token")
    token = raw.decode("utf-8", "replace").splitlines()[0].strip() if raw.strip() else ""
    if len(token) < 16:
        raise StartupError(f"{what} {path}: the token must be at least 16 characters")
    return token


class ApiGuard:
    """The checks of a request that changes the daemon (see the module docstring)."""

    def __init__(
        self,
        token: str | None,
        hosts: Iterable[str],
        refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._token = token.encode() if token is not None else None
        self._hosts = frozenset(h.strip("[]").lower() for h in hosts) | {
            h.strip("[]") for h in _LOOPBACK_NAMES
        }
        self._refused = refused
        #: the API's port, once bound (an Origin must carry it)
        self.port: int | None = None

    def _own_origin(self, origin: str) -> bool:
        """Whether ``origin`` is this API's own (its status page): http, a name of this daemon
        and the API's port — another web app on the same machine is another origin."""
        scheme, _, hostport = origin.strip().lower().partition("://")
        if scheme != "http" or not hostport or "/" in hostport:
            return False
        host, port = _split(hostport)
        return host in self._hosts and (self.port is None or (port or 80) == self.port)

    def _refuse(self, code: int, reason: str, detail: str) -> HTTPException:
        self._refused(reason)
        headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
        return HTTPException(code, detail, headers=headers)

    async def mutating(self, request: Request) -> None:
        """A FastAPI dependency of every endpoint that changes the daemon."""
        host = _host_of(request.headers.get("host", ""))
        if host not in self._hosts:
            raise self._refuse(
                421, "host", f"Host {host!r:.80} does not name this daemon (see api_hosts)"
            )
        origin = request.headers.get("origin")
        if origin is not None and not self._own_origin(origin):
            raise self._refuse(403, "origin", "cross-origin requests may not change the daemon")
        if self._token is not None:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                value.strip().encode(), self._token
            )
            if not ok:
                raise self._refuse(
                    401, "token", "this endpoint needs Authorization: Bearer <the API token>"
                )


def _split(hostport: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) as (host in lower case without brackets, port or
    None); a port that is no number gives -1, which matches nothing."""
    hostport = hostport.strip().lower()
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            return hostport, None
        host, rest = hostport[1:end], hostport[end + 1 :]
    elif hostport.count(":") == 1:
        host, rest = hostport.split(":")
        rest = ":" + rest
    else:
        host, rest = hostport, ""
    if not rest:
        return host, None
    digits = rest[1:]
    return host, int(digits) if rest.startswith(":") and digits.isdigit() else -1


def _host_of(hostport: str) -> str:
    """The host of a ``host[:port]`` (IPv6 in brackets), lower case, without brackets."""
    return _split(hostport)[0]


class _GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request: a connection that has not
    sent a whole request (line, headers and any body) within ``header_timeout`` of connecting
    or of its last response is closed — uvicorn's own keep-alive timer restarts with every
    byte, so a client trickling a header, or a body it announced, would hold it for good."""

    header_timeout = 10.0
    on_slow: Callable[[], None] = staticmethod(lambda: None)
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def handle_events(self) -> None:
        super().handle_events()
        if self._deadline is not None and self.conn.their_state is h11.DONE:
            self._deadline.cancel()  # the whole request is in: the handler answers it
            self._deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request, or the rest of this one's
            self._arm()  # body (which no endpoint reads), has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
            self.on_slow()
            self.transport.close()


def guarded_http(header_timeout: float, on_slow: Callable[[], None]) -> type[H11Protocol]:
    """The HTTP protocol class for one daemon's API (uvicorn's ``http`` setting)."""
    return type(
        "GuardedH11",
        (_GuardedH11,),
        {"header_timeout": header_timeout, "on_slow": staticmethod(on_slow)},
    )
