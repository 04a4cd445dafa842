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
about the run (no setting, digest, dimension or process list), and every refusal it gets is a
bare code: ``bad_secret`` for anything a Join claims — or, before that, ``bad_handshake`` (not
a Hello) or ``unsupported_version``, which say nothing of the run either.

Members — and only they — are told which settings differ when their run fingerprints do: the
dialer's Join carries a keyed digest of each setting (:func:`setting_digests`, sent only once
the acceptor proved the secret), the acceptor names the ones that differ (:func:`differing`)
with its own values in the refusal's detail (sent only once the dialer proved the secret), so
both sides can say what to fix from their own point of view.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from typing import Literal

from peerlearn.wire import Hello, Welcome

__all__ = [
    "MAC_SIZE",
    "differing",
    "explain_detail",
    "proof",
    "refusal_detail",
    "setting_digests",
    "verify",
]

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


#: a setting's value in a refusal's detail, at most (a long one is cut, and says so)
_VALUE_SHOWN = 120
_DETAIL_MAX = 1000  # the detail's JSON text, at most (a Refuse carries 1024 characters)


def setting_digests(secret: bytes, settings: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """(name, digest) of each setting, keyed with the secret: one on the path who sees a Join
    cannot try values against them."""
    return tuple(
        (name, hmac.new(secret, f"{name}={value}".encode(), hashlib.sha256).hexdigest()[:16])
        for name, value in sorted(settings.items())
    )


def differing(
    secret: bytes, mine: Mapping[str, str], theirs: tuple[tuple[str, str], ...]
) -> list[str]:
    """The names of the settings whose digests differ, or which one side has alone."""
    own = dict(setting_digests(secret, mine))
    other = dict(theirs)
    return sorted(name for name in own.keys() | other.keys() if own.get(name) != other.get(name))


def _shown(value: str) -> str:
    return value if len(value) <= _VALUE_SHOWN else value[: _VALUE_SHOWN - 1] + "…"


def refusal_detail(names: list[str], mine: Mapping[str, str]) -> str:
    """A refusal's detail for a member: the differing settings with this side's values (JSON;
    as many as fit, the count of the rest under ``"…"``)."""
    shown: dict[str, str | int] = {}
    for i, name in enumerate(names):
        shown[name] = _shown(mine.get(name, "(none)"))
        if len(json.dumps(shown)) > _DETAIL_MAX - 20:
            del shown[name]
            shown["…"] = len(names) - i
            break
    return json.dumps(shown)


def explain_detail(detail: str, mine: Mapping[str, str]) -> str | None:
    """A member's refusal detail in words from this side: ``lr.eta is 0.1 there, 0.05
    here; …`` — None if it is not what :func:`refusal_detail` writes."""
    try:
        theirs = json.loads(detail)
    except ValueError:
        return None
    if not isinstance(theirs, dict) or not theirs:
        return None
    parts = []
    for name, value in theirs.items():
        if name == "…" and isinstance(value, int):
            parts.append(f"and {value} more")
        elif isinstance(name, str) and isinstance(value, str):
            here = _shown(mine.get(name, "(none)"))
            parts.append(f"{_shown(name)} is {_shown(value)} there, {here} here")
        else:
            return None
    return "; ".join(parts)
