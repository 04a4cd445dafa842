"""Members only: the mutual challenge–response of the handshake, sans-IO.

With a cluster secret (``--secret-file``), each side proves it knows the secret over both
nonces of this very connection, both cluster ids, both incarnations and the protocol version —
HMAC-SHA256, compared in constant time:

1. the dialer's ``Hello`` carries its fresh nonce (and no proof: it has no challenge yet);
2. the acceptor's ``Welcome`` carries its own nonce and its proof (role ``acceptor``); the
   dialer checks it before it says anything about the run;
3. the dialer's ``Join`` carries its proof (role ``dialer``); the acceptor checks it before it
   looks at anything the Join says, and only then answers (``Ack``).

A handshake captured from a real member cannot be replayed: the other side's nonce is new on
every connection. A stranger learns the acceptor's cluster id, incarnation and nonce, nothing
about the run (no setting, digest, dimension or process list), and every refusal it gets is the
one code ``bad_secret``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Literal

from peerlearn.wire import Hello, Welcome

__all__ = ["MAC_SIZE", "proof", "verify"]

MAC_SIZE = hashlib.sha256().digest_size
_FIELDS = struct.Struct("<16sI4Q")  # role, version, clusters (2), incarnations (2) ...
_NONCES = struct.Struct("<2Q")


def proof(
    secret: bytes, role: Literal["dialer", "acceptor"], hello: Hello, welcome: Welcome
) -> bytes:
    """``role``'s proof of the secret for the connection whose handshake is ``hello`` (the
    dialer's) and ``welcome`` (the acceptor's, its ``mac`` not read)."""
    message = _FIELDS.pack(
        role.encode(),
        welcome.version,
        hello.cluster,
        welcome.cluster,
        hello.incarnation,
        welcome.incarnation,
    ) + _NONCES.pack(hello.nonce, welcome.nonce)
    return hmac.new(secret, message, hashlib.sha256).digest()


def verify(
    secret: bytes,
    role: Literal["dialer", "acceptor"],
    hello: Hello,
    welcome: Welcome,
    mac: bytes,
) -> bool:
    """Whether ``mac`` is ``role``'s proof for this handshake (constant time)."""
    return hmac.compare_digest(proof(secret, role, hello, welcome), mac)
