"""Errors of the wire codec.

The split follows h11 (``h11/_util.py``)::

    PeerlearnError
    └── ProtocolError            abstract: something broke the wire protocol
        ├── LocalProtocolError   we tried to do something illegal (send a float16 array, a
        │                        header over the cap, …); nothing was emitted
        └── RemoteProtocolError  the peer sent something illegal; the connection is unusable
            └── HandshakeError   the peer's ``Hello`` is well formed but not for this run

Inside the package every check raises the *local* kind, whichever side it protects, because
the validators do not know who is calling them (a message built by our own code, or one
decoded from the network). The receive entry points of :class:`~peerlearn.wire.codec.Codec`
are the single place that converts a local error into a remote one
(:meth:`RemoteProtocolError.from_local`).

Every error carries a :class:`Reason`: a short snake_case code, stable across releases, meant
as the ``reason`` label of ``peerlearn_protocol_errors_total``. The message (``str(err)``)
is for humans and may change; it never embeds more than a short excerpt of remote data.
"""

from __future__ import annotations

from enum import StrEnum

from peerlearn.errors import PeerlearnError

__all__ = [
    "HandshakeError",
    "LocalProtocolError",
    "ProtocolError",
    "Reason",
    "RemoteProtocolError",
]


class Reason(StrEnum):
    """Why a frame or a handshake was refused (a bounded set: safe as a Prometheus label)."""

    # the fixed prefix
    BAD_MAGIC = "bad_magic"  # not a peerlearn stream (or out of sync)
    UNSUPPORTED_VERSION = "unsupported_version"  # frame or Hello of another protocol version
    BAD_FLAGS = "bad_flags"  # reserved prefix bits set
    HEADER_TOO_LARGE = "header_too_large"  # header length over MAX_HEADER
    PAYLOAD_TOO_LARGE = "payload_too_large"  # payload length over the codec's max_payload
    # the msgpack header
    BAD_HEADER = "bad_header"  # not msgpack, not a map, missing or unexpected keys
    UNKNOWN_TYPE = "unknown_type"  # a message type this version does not know
    BAD_FIELD = "bad_field"  # a field of the wrong type, out of range or too long
    BAD_DTYPE = "bad_dtype"  # an array dtype other than float32 / float64
    BAD_SHAPE = "bad_shape"  # too many dimensions, or a dimension not a non-negative int64
    SIZE_MISMATCH = "size_mismatch"  # payload length != dtype × shape (or a payload where none)
    # the stream
    TRUNCATED = "truncated"  # end of stream in the middle of a frame (or of a Data in parts)
    BAD_PART = "bad_part"  # a part of a Data out of sequence, or sized wrong
    # the handshake (HandshakeError)
    DIM_MISMATCH = "dim_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    STALE_INCARNATION = "stale_incarnation"  # a Hello older than one already seen from it


class ProtocolError(PeerlearnError):
    """Base of the wire errors; abstract (raise one of the subclasses).

    Attributes:
        reason: the machine-readable code (a :class:`Reason`, which is a ``str``).
    """

    reason: Reason

    def __init__(self, reason: Reason, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError(
                "ProtocolError is abstract: raise LocalProtocolError or RemoteProtocolError"
            )
        super().__init__(message)
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value!r}, {str(self)!r})"


class LocalProtocolError(ProtocolError):
    """We tried to build or send something the protocol does not allow; nothing was sent."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow; close the connection."""

    @classmethod
    def from_local(cls, err: LocalProtocolError) -> RemoteProtocolError:
        """The remote twin of ``err`` (same reason and message); the one conversion point."""
        remote = cls(err.reason, str(err))
        remote.__cause__ = err
        return remote


class HandshakeError(RemoteProtocolError):
    """The peer's ``Hello`` is valid but incompatible with this run (version, dim, fingerprint)."""
