"""Write the seed corpus of fuzz_codec.py: one valid frame stream per message type (and a
mixed one), under every configuration byte, so that the fuzzer starts past the prefix.

    python fuzz/make_seeds.py fuzz/corpus/codec

(fuzz_handshake.py needs no seeds: its input is a recipe of messages, not bytes on the wire.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from peerlearn.compression import Scheme, nearest
from peerlearn.wire import (
    Ack,
    Bye,
    Codec,
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
from peerlearn.wire.messages import Packed

MESSAGES: list[Message] = [
    Hello(4, 4, 1, 12, 99, "d1", b"\x01" * 32),
    Welcome(4, 0, 7, 5, b"\x02" * 32),
    Join((1, 4), 3, "float64", "fp", b"\x03" * 32),
    Refuse("bad_secret"),
    Data(1, ("params", 1), 1, 1, np.arange(3.0)),
    Data(2, ("grad", 2, "x"), 4, 2, np.ones((2, 2), np.float32), to=(0, 3), post=True),
    Data(3, (), 1, 3, np.empty((0, 5))),
    Ack(7),
    Ping(1),
    Pong(2),
    Bye("shutdown"),
    Control("missed", {"upto": 3, "start": None, "xs": (1.5, "a", b"b", True)}),
    *(  # packed arrays (protocol 7): each scheme, int8 with a short last block
        Data(6 + i, ("params", 3), 1, 3, v, packed=Packed.of(scheme, v, 8))
        for i, scheme in enumerate((Scheme.FP16, Scheme.BF16, Scheme.INT8))
        if (v := nearest(scheme, np.linspace(-3.0, 3.0, 13), 8)) is not None
    ),
]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    codec = Codec()
    streams = {msg.kind + str(i): codec.send(msg) for i, msg in enumerate(MESSAGES)}
    streams["mixed"] = [c for msg in MESSAGES for c in codec.send(msg)]
    # a Data in three parts with a Ping between the first two (protocol 6)
    parts = codec.send_parts(Data(5, ("params", 2), 0, 2, np.arange(6.0)), 16)
    streams["parts"] = [*parts[0], *codec.send(Ping(3)), *parts[1], *parts[2]]
    # a packed int8 array of 2 values whose exponent is hostile (2000: unpacks to infinities)
    pair = np.array([1.0, 0.0])
    head, _ = codec.send(Data(9, ("params", 1), 0, 1, pair, packed=Packed.of(Scheme.INT8, pair, 8)))
    hostile = np.array([1, 0], np.int8).tobytes() + np.array([2000], "<i2").tobytes()
    streams["hostile-exponent"] = [head, hostile]
    for name, chunks in streams.items():
        stream = b"".join(bytes(c) for c in chunks)
        for mode in (0, 1, 2, 4, 8, 9):
            for chunking in (0, 255):
                (out / f"seed-{name}-{mode}-{chunking}").write_bytes(
                    bytes([mode, chunking]) + stream
                )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus/codec"))
