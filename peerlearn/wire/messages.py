"""Wire messages: everything one peer daemon says to another.

Each message is a frozen dataclass with a literal ``kind`` (the type on the wire, as effects
carry theirs; fixed, not a constructor argument) and compares by value, so tests can assert
on exactly what comes out of a codec.

=====================================================  ============================================
message                                                meaning
=====================================================  ============================================
``Hello(min_version, max_version, cluster,             the dialer's first message: the versions
incarnation, nonce, name, mac)``                       it speaks, who it is and in which
                                                       incarnation (greater after a restart), a
                                                       fresh nonce, room for a MAC
``Welcome(version, cluster, incarnation, nonce,        your Hello is accepted: the version we
mac)``                                                 speak, who I am, my incarnation and nonce
``Join(workers, dim, dtype, fingerprint)``             the dialer's run: the process ids it hosts,
                                                       the model's dimension and dtype, the run
                                                       fingerprint; answered with ``Ack`` (the
                                                       last frame delivered) or ``Refuse``
``Refuse(reason)``                                     your Hello or Join is refused; I close
``Data(seq, tag, sender, step, value, to, post)``      an algorithm message (one copy of a
                                                       broadcast); ``seq`` numbers it on this link
                                                       for acks, resend and dedupe; ``step`` is
                                                       the sender's iteration (for staleness);
                                                       ``to`` the receiving processes (empty: all
                                                       of the peer's), ``post`` whether it goes
                                                       to their inbox queue (``Post``) rather
                                                       than their per-tag mailbox
``Ack(seq)``                                           cumulative: everything ≤ ``seq`` arrived
``Ping(nonce)`` / ``Pong(nonce)``                      liveness; a Pong echoes its Ping's nonce
``Bye(reason)``                                        I am closing this link on purpose
``Control(name, body)``                                room for later: a small msgpack-able body
=====================================================  ============================================

Every message validates its fields when it is built and raises
:class:`~peerlearn.wire.errors.LocalProtocolError` (reason ``bad_field``, ``bad_dtype`` or
``bad_shape``) if one is out of bounds. The decoder builds messages through the same
constructors, so a field that may not be sent cannot be received either; the codec turns the
error into a ``RemoteProtocolError`` there. The codec itself checks only what depends on its
configuration (payload cap) and on the framing (sizes).

Integers are int64 on the wire (counters, ids and steps are non-negative); numpy integers are
accepted and stored as ``int``, ``bool`` is refused. Strings and sequences are capped below,
so every header stays far under ``MAX_HEADER`` except for an absurdly long ``workers`` list or
``Control`` body, which the encoder refuses (``header_too_large``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NoReturn, TypeAlias

import numpy as np
import numpy.typing as npt

from peerlearn.compression import Scheme, pack
from peerlearn.wire.errors import LocalProtocolError, Reason

__all__ = [
    "DTYPE_CODES",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_BODY_DEPTH",
    "MAX_DIMS",
    "MAX_MAC",
    "MAX_REASON",
    "MAX_TAG_LEN",
    "MAX_TEXT",
    "MESSAGE_TYPES",
    "Ack",
    "Array",
    "Bye",
    "Control",
    "Data",
    "Hello",
    "Join",
    "Message",
    "Packed",
    "Ping",
    "Pong",
    "Refuse",
    "Welcome",
    "same_array",
]

Array: TypeAlias = npt.NDArray[Any]

INT64_MAX: Final = 2**63 - 1
INT64_MIN: Final = -(2**63)
MAX_TEXT: Final = 256  # names, fingerprints, dtype names, tag strings, Control names
MAX_MAC: Final = 64  # a handshake MAC: HMAC-SHA256 is 32 bytes
MAX_REASON: Final = 1024  # Refuse / Bye reasons: room for two fingerprints and a sentence
# Tags are (kind, t), (kind, t, r), (kind, t, r, k) — and DASGD's (kind, origin, seq, step,
# version vector…), one int per process: the header cap bounds the rest.
MAX_TAG_LEN: Final = 4096
MAX_SETTINGS: Final = 128  # a Join's (name, digest) pairs: one per setting the fingerprint covers
MAX_RECIPIENTS: Final = 4096  # with MAX_TAG_LEN, far below MAX_HEADER for realistic ids
MAX_DIMS: Final = 4
MAX_BODY_DEPTH: Final = 8  # nesting of a Control body

# The array dtypes the protocol carries, and their wire codes (little-endian on the wire).
DTYPE_CODES: Final[Mapping[type[np.floating[Any]], str]] = {np.float32: "f4", np.float64: "f8"}


# --- validators (shared by the constructors and the decoder) -------------------------------------


def excerpt(value: object) -> str:
    """A short excerpt of ``value`` for an error message (it may come from a hostile peer)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(field: str, problem: str, reason: Reason = Reason.BAD_FIELD) -> NoReturn:
    raise LocalProtocolError(reason, f"{field}: {problem}")


def check_int(field: str, value: object, lo: int = 0, hi: int = INT64_MAX) -> int:
    """``value`` as an ``int`` in ``[lo, hi]``; numpy integers accepted, ``bool`` refused."""
    if type(value) is int and lo <= value <= hi:  # fast path: every decoded field
        return value
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        _bad(field, f"expected an int, got {type(value).__name__} {excerpt(value)}")
    number = int(value)
    if not lo <= number <= hi:
        _bad(field, f"{number} out of range [{lo}, {hi}]")
    return number


def check_str(field: str, value: object, max_len: int = MAX_TEXT) -> str:
    """``value`` as a ``str`` of at most ``max_len`` characters."""
    if not isinstance(value, str):
        _bad(field, f"expected a str, got {type(value).__name__} {excerpt(value)}")
    if len(value) > max_len:
        _bad(field, f"{len(value)} characters, at most {max_len}")
    return value


def check_bytes(field: str, value: object, max_len: int = MAX_MAC) -> bytes:
    """``value`` as ``bytes`` of at most ``max_len``."""
    if type(value) is not bytes:
        _bad(field, f"expected bytes, got {type(value).__name__} {excerpt(value)}")
    if len(value) > max_len:
        _bad(field, f"{len(value)} bytes, at most {max_len}")
    return value


def _check_tuple(field: str, value: object, max_len: int) -> tuple[Any, ...]:
    # Lists are accepted from local callers and frozen; the decoder always hands tuples. Exact
    # types: msgpack's ExtType is a namedtuple and must not pass as a tuple.
    if type(value) is not tuple and type(value) is not list:
        _bad(field, f"expected a tuple, got {type(value).__name__} {excerpt(value)}")
    if len(value) > max_len:
        _bad(field, f"{len(value)} elements, at most {max_len}")
    return tuple(value)


def check_settings(value: object) -> tuple[tuple[str, str], ...]:
    """A Join's settings: at most ``MAX_SETTINGS`` (name, digest) pairs of short strs."""
    out = []
    for pair in _check_tuple("settings", value, MAX_SETTINGS):
        item = _check_tuple("settings element", pair, 2)
        if len(item) != 2:
            _bad("settings element", f"expected (name, digest), got {excerpt(item)}")
        out.append((check_str("setting name", item[0], 64), check_str("setting", item[1], 64)))
    return tuple(out)


def check_tag(value: object) -> tuple[str | int, ...]:
    """A tag: up to ``MAX_TAG_LEN`` elements, each a short ``str`` or an int64."""
    if type(value) is tuple and len(value) <= MAX_TAG_LEN:  # fast path: valid as it is
        for e in value:
            kind = type(e)
            if not (
                (kind is str and len(e) <= MAX_TEXT)
                or (kind is int and INT64_MIN <= e <= INT64_MAX)
            ):
                break
        else:
            return value
    return tuple(
        check_str("tag element", e)
        if isinstance(e, str)
        else check_int("tag element", e, INT64_MIN)
        for e in _check_tuple("tag", value, MAX_TAG_LEN)
    )


def check_workers(value: object) -> tuple[int, ...]:
    """Distinct non-negative global process ids (the header cap bounds how many)."""
    workers = tuple(check_int("workers element", w) for w in _check_tuple("workers", value, 2**16))
    if len(set(workers)) != len(workers):
        _bad("workers", f"duplicate process ids in {excerpt(workers)}")
    return workers


def check_array(value: object) -> Array:
    """A float32 / float64 array of at most ``MAX_DIMS`` dimensions (any order or strides)."""
    if not isinstance(value, np.ndarray):
        _bad("value", f"expected a numpy array, got {type(value).__name__}", Reason.BAD_DTYPE)
    if value.dtype.type not in DTYPE_CODES:
        _bad("value", f"dtype {value.dtype} not supported (float32 or float64)", Reason.BAD_DTYPE)
    if value.ndim > MAX_DIMS:
        _bad("value", f"{value.ndim} dimensions, at most {MAX_DIMS}", Reason.BAD_SHAPE)
    return value


def check_body(value: object, depth: int = 0) -> Any:
    """A Control body value: msgpack-able scalars, tuples and str-keyed dicts, frozen."""
    if depth > MAX_BODY_DEPTH:
        _bad("body", f"nested deeper than {MAX_BODY_DEPTH}")
    if value is None or isinstance(value, bool | float | str | bytes):
        return value
    if isinstance(value, int | np.integer):
        return check_int("body int", value, INT64_MIN)
    # Exact container types: msgpack's ExtType is a namedtuple and must not pass as a tuple.
    if type(value) is tuple or type(value) is list:
        return tuple(check_body(v, depth + 1) for v in value)
    if type(value) is dict:
        return {check_str("body key", k): check_body(v, depth + 1) for k, v in value.items()}
    _bad("body", f"cannot carry a {type(value).__name__} {excerpt(value)}")


def same_array(a: Array, b: Array) -> bool:
    """Same scalar type, shape and values (NaN equal to NaN; byte order ignored)."""
    return (
        a.dtype.type is b.dtype.type
        and a.shape == b.shape
        and bool(np.array_equal(a, b, equal_nan=True))
    )


def _freeze(obj: object, name: str, value: object, original: object) -> None:
    # Store a normalized field (np.int64 -> int, list -> tuple) on a frozen dataclass.
    if value is not original:
        object.__setattr__(obj, name, value)


# --- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The dialer's first message: who it is, in which incarnation, which versions it speaks.

    ``incarnation`` grows with every start of the daemon (its boot time in ns, or a counter
    kept in its state directory): a peer that sees a greater one knows the daemon restarted and
    resets what it kept for the old one (sequence numbers both ways). ``nonce`` is fresh per
    connection and ``mac`` (empty: none) is where an authenticated handshake answers the other
    side's nonce. Nothing about the run is said before the other side has answered: that is
    :class:`Join`'s."""

    min_version: int  # the protocol versions the sender speaks: min_version..max_version
    max_version: int
    cluster: int  # the sender's cluster (daemon) id
    incarnation: int  # greater after every restart of the sender
    nonce: int  # random, per connection
    name: str  # the daemon's display name, for logs
    mac: bytes = b""  # proof of the cluster secret over both nonces; empty: unauthenticated
    kind: Literal["hello"] = field(default="hello", init=False, repr=False)

    def __post_init__(self) -> None:
        _freeze(
            self,
            "min_version",
            check_int("min_version", self.min_version, 0, 255),
            self.min_version,
        )
        _freeze(
            self,
            "max_version",
            check_int("max_version", self.max_version, 0, 255),
            self.max_version,
        )
        if self.min_version > self.max_version:
            _bad("max_version", f"{self.max_version} below min_version {self.min_version}")
        _freeze(self, "cluster", check_int("cluster", self.cluster), self.cluster)
        _freeze(self, "incarnation", check_int("incarnation", self.incarnation), self.incarnation)
        _freeze(self, "nonce", check_int("nonce", self.nonce), self.nonce)
        check_str("name", self.name)
        check_bytes("mac", self.mac)


@dataclass(frozen=True, slots=True)
class Welcome:
    """The accepting side's answer to a Hello it accepts: the version both speak from now on,
    and who the acceptor is (cluster, incarnation, its own nonce and mac, as in Hello)."""

    version: int
    cluster: int
    incarnation: int
    nonce: int
    mac: bytes = b""
    kind: Literal["welcome"] = field(default="welcome", init=False, repr=False)

    def __post_init__(self) -> None:
        _freeze(self, "version", check_int("version", self.version, 0, 255), self.version)
        _freeze(self, "cluster", check_int("cluster", self.cluster), self.cluster)
        _freeze(self, "incarnation", check_int("incarnation", self.incarnation), self.incarnation)
        _freeze(self, "nonce", check_int("nonce", self.nonce), self.nonce)
        check_bytes("mac", self.mac)


@dataclass(frozen=True, slots=True)
class Join:
    """The dialer's run, after the Welcome: the global process ids it hosts, the model's
    dimension and dtype and the run fingerprint. Answered with an ``Ack`` of the last frame the
    acceptor delivered from this dialer's incarnation (the link is open), or a ``Refuse``."""

    workers: tuple[int, ...]
    dim: int
    dtype: str  # model dtype name ("float32", "float64"); compared, not interpreted
    fingerprint: str  # the run fingerprint (algorithm, problem, seed, hyper-parameters, …)
    mac: bytes = b""  # the dialer's proof of the cluster secret (peerlearn/transport/auth.py)
    #: (name, digest) of each setting the fingerprint covers — only to an acceptor that proved
    #: the cluster secret, which can then name the ones that differ; () otherwise
    settings: tuple[tuple[str, str], ...] = ()
    kind: Literal["join"] = field(default="join", init=False, repr=False)

    def __post_init__(self) -> None:
        _freeze(self, "workers", check_workers(self.workers), self.workers)
        _freeze(self, "dim", check_int("dim", self.dim), self.dim)
        check_str("dtype", self.dtype)
        check_str("fingerprint", self.fingerprint)
        check_bytes("mac", self.mac)
        _freeze(self, "settings", check_settings(self.settings), self.settings)


@dataclass(frozen=True, slots=True)
class Refuse:
    """The peer's Hello is refused; the refusing side closes after sending this."""

    reason: str
    #: what a member may be told about why (the settings that differ, with the refusing side's
    #: values, as JSON) — only to a dialer that proved the cluster secret; "" otherwise
    detail: str = ""
    kind: Literal["refuse"] = field(default="refuse", init=False, repr=False)

    def __post_init__(self) -> None:
        check_str("reason", self.reason, MAX_REASON)
        check_str("detail", self.detail, MAX_REASON)


@dataclass(frozen=True, slots=True, eq=False)
class Packed:
    """A Data's array in a compression scheme's packed form (:func:`peerlearn.compression.pack`):
    the bytes that go on the wire instead of the floats, which they unpack to exactly."""

    scheme: Scheme
    block: int  # int8: values per scale; 0 for fp16 and bf16
    raw: npt.NDArray[np.uint8]

    @classmethod
    def of(cls, scheme: Scheme, value: Array, block: int) -> Packed | None:
        """``value`` packed, or None if it does not pack exactly (nobody rounded it: it goes
        as plain floats) or is not one-dimensional."""
        raw = pack(scheme, value, block) if value.ndim == 1 else None
        return None if raw is None else cls(scheme, block if scheme is Scheme.INT8 else 0, raw)


@dataclass(frozen=True, slots=True, eq=False)
class Data:
    """One algorithm message (one copy of a broadcast), with its array payload.

    ``value`` is sent as is when it is C-contiguous and little-endian, converted once
    otherwise (see ``Codec.send``); a received ``value`` is read-only and lives in a buffer
    from the codec's allocator. Equality compares the array by value (:func:`same_array`);
    a ``Data`` is not hashable.
    """

    seq: int  # per-link sequence number (acks, resend, dedupe)
    tag: tuple[str | int, ...]  # the instance, e.g. ("params", t)
    sender: int  # global process id of the sender
    step: int  # the sender's iteration when it sent this (staleness)
    value: Array
    to: tuple[int, ...] = ()  # receiving processes; () is every process of the peer
    post: bool = False  # into the receivers' inbox queue (Post/Receive), not a tag's box
    #: ``value`` packed (sending only): the frame carries these bytes; the receiver's Data has
    #: the floats they unpack to, which are ``value`` exactly
    packed: Packed | None = field(default=None, repr=False)
    kind: Literal["data"] = field(default="data", init=False, repr=False)

    def __post_init__(self) -> None:
        fields = (self.seq, self.tag, self.sender, self.step, self.to, self.post)
        checked = check_data_fields(*fields)
        if any(a is not b for a, b in zip(checked, fields, strict=True)):  # normalized
            names = ("seq", "tag", "sender", "step", "to", "post")
            for name, value in zip(names, checked, strict=True):
                object.__setattr__(self, name, value)
        check_array(self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Data):
            return NotImplemented
        return (
            self.seq == other.seq
            and self.tag == other.tag
            and self.sender == other.sender
            and self.step == other.step
            and self.to == other.to
            and self.post == other.post
            and same_array(self.value, other.value)
        )


def check_data_fields(
    seq: object, tag: object, sender: object, step: object, to: object, post: object
) -> tuple[int, tuple[str | int, ...], int, int, tuple[int, ...], bool]:
    """The scalar fields of a Data, validated (the decoder calls this before allocating)."""
    if type(post) is not bool:
        _bad("post", f"expected a bool, got {type(post).__name__} {excerpt(post)}")
    return (
        check_int("seq", seq),
        check_tag(tag),
        check_int("sender", sender),
        check_int("step", step),
        to if to == () else check_recipients(to),
        post,
    )


def check_recipients(value: object) -> tuple[int, ...]:
    """Distinct non-negative global process ids, at most ``MAX_RECIPIENTS``."""
    to = tuple(check_int("to element", p) for p in _check_tuple("to", value, MAX_RECIPIENTS))
    if len(set(to)) != len(to):
        _bad("to", f"duplicate process ids in {excerpt(to)}")
    return to


@dataclass(frozen=True, slots=True)
class Ack:
    """Cumulative acknowledgement: every Data with ``seq`` ≤ this one arrived."""

    seq: int
    kind: Literal["ack"] = field(default="ack", init=False, repr=False)

    def __post_init__(self) -> None:
        _freeze(self, "seq", check_int("seq", self.seq), self.seq)


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness probe; answered by a Pong with the same nonce."""

    nonce: int
    kind: Literal["ping"] = field(default="ping", init=False, repr=False)

    def __post_init__(self) -> None:
        _freeze(self, "nonce", check_int("nonce", self.nonce), self.nonce)


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a Ping."""

    nonce: int
    kind: Literal["pong"] = field(default="pong", init=False, repr=False)

    def __post_init__(self) -> None:
        _freeze(self, "nonce", check_int("nonce", self.nonce), self.nonce)


@dataclass(frozen=True, slots=True)
class Bye:
    """The sender closes this link on purpose (shutdown, protocol error, …)."""

    reason: str
    kind: Literal["bye"] = field(default="bye", init=False, repr=False)

    def __post_init__(self) -> None:
        check_str("reason", self.reason, MAX_REASON)


@dataclass(frozen=True, slots=True)
class Control:
    """Room for later message types: a named, small msgpack-able body.

    The body is frozen on construction (lists become tuples, as they come back from the
    wire), so a Control compares equal to its own round trip. Its size is bounded by the
    header cap.
    """

    name: str
    body: Mapping[str, Any]
    kind: Literal["control"] = field(default="control", init=False, repr=False)

    def __post_init__(self) -> None:
        check_str("name", self.name)
        if not isinstance(self.body, dict):
            _bad("body", f"expected a dict, got {type(self.body).__name__}")
        object.__setattr__(self, "body", check_body(self.body))


Message: TypeAlias = Hello | Welcome | Join | Refuse | Data | Ack | Ping | Pong | Bye | Control

# The wire type of each message (its ``kind``). Spelled out: with ``slots=True`` the class
# attribute ``kind`` is a slot descriptor, not the default value.
MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = {
    "hello": Hello,
    "welcome": Welcome,
    "join": Join,
    "refuse": Refuse,
    "data": Data,
    "ack": Ack,
    "ping": Ping,
    "pong": Pong,
    "bye": Bye,
    "control": Control,
}
