"""Mutual TLS for peer links, opt-in for networks the members do not trust (stdlib ``ssl``).

The default link is plain TCP with the authenticated handshake of :mod:`peerlearn.transport.auth`:
anyone without the cluster secret is out, but an attacker *on the path* between two members
could read or change frames after the handshake. With TLS (``tls_cert``, ``tls_key`` and
``tls_ca`` in the config, all three) every link is encrypted and integrity-protected, and both
ends present a certificate signed by the run's own CA: the acceptor requires one from the
dialer (``CERT_REQUIRED``), the dialer checks the acceptor's against the same CA. Membership is
the CA's signature, not a host name — peers are often addressed by IP and the CA is the run's
alone — so host names are not checked. TLS 1.3 only. The cluster secret may be used beside it
(both must pass).

A file that cannot be loaded, or a key file others may read, stops the start with one line
(:class:`~peerlearn.errors.StartupError`).
"""

from __future__ import annotations

import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from peerlearn.errors import StartupError

__all__ = ["TlsContexts", "load"]


@dataclass(frozen=True)
class TlsContexts:
    server: ssl.SSLContext  # for the listening socket: the dialer must present a certificate
    client: ssl.SSLContext  # for outbound links: the acceptor's certificate is checked


def _context(purpose: ssl.Purpose, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # membership is the run CA's signature (see the docstring)
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"--tls-cert {cert} / --tls-key {key}: {_why(exc)}") from None
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"--tls-ca {ca}: {_why(exc)}") from None
    return ctx


def _why(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"not a usable certificate or key ({exc.reason or exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def load(cert: Path, key: Path, ca: Path) -> TlsContexts:
    """Both contexts from PEM files; StartupError (one line) for a file that cannot be used
    or a key file others may read."""
    try:
        mode = key.stat().st_mode
    except OSError as exc:
        raise StartupError(f"--tls-key {key}: {exc.strerror or exc}") from None
    if mode & stat.S_IRWXO:
        raise StartupError(
            f"--tls-key {key}: the file can be read by others (mode {stat.filemode(mode)}); "
            f"chmod o-rwx {key}"
        )
    return TlsContexts(
        _context(ssl.Purpose.CLIENT_AUTH, cert, key, ca),
        _context(ssl.Purpose.SERVER_AUTH, cert, key, ca),
    )
