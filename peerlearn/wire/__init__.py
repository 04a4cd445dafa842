"""The wire protocol between peer daemons: typed messages and a sans-IO frame codec.

No I/O happens here (no asyncio, no sockets): ``transport/`` drives a :class:`Codec` per
connection, writing what :meth:`Codec.send` returns and feeding what it reads through
:meth:`Codec.get_buffer` / :meth:`Codec.buffer_updated`, then draining :meth:`Codec.next_event`.
"""

from peerlearn.wire.codec import (
    CLOSED,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_READ_BUFFER,
    MAGIC,
    MAX_HEADER,
    MIN_PROTOCOL_VERSION,
    NEED_DATA,
    PREFIX,
    PROTOCOL_VERSION,
    Allocator,
    Codec,
    Event,
    Sentinel,
    check_join,
    default_allocator,
    negotiate,
)
from peerlearn.wire.errors import (
    HandshakeError,
    LocalProtocolError,
    ProtocolError,
    Reason,
    RemoteProtocolError,
)
from peerlearn.wire.messages import (
    MAX_REASON,
    MAX_TEXT,
    Ack,
    Bye,
    Control,
    Data,
    Hello,
    Join,
    Message,
    Ping,
    Pong,
    Refuse,
    Welcome,
)

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_READ_BUFFER",
    "MAGIC",
    "MAX_HEADER",
    "MAX_REASON",
    "MAX_TEXT",
    "MIN_PROTOCOL_VERSION",
    "NEED_DATA",
    "PREFIX",
    "PROTOCOL_VERSION",
    "Ack",
    "Allocator",
    "Bye",
    "Codec",
    "Control",
    "Data",
    "Event",
    "HandshakeError",
    "Hello",
    "Join",
    "LocalProtocolError",
    "Message",
    "Ping",
    "Pong",
    "ProtocolError",
    "Reason",
    "Refuse",
    "RemoteProtocolError",
    "Sentinel",
    "Welcome",
    "check_join",
    "default_allocator",
    "negotiate",
]
