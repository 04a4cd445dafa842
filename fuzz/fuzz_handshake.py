"""Atheris harness: arbitrary message sequences into the acceptor's handshake
(``Transport._accept`` and its ``FrameProtocol``, peerlearn/transport/peers.py).

Run it by hand, never in CI (fuzz/README.md)::

    python fuzz/fuzz_handshake.py -atheris_runs=1000000 fuzz/corpus/handshake

No socket: each input builds a fresh acceptor (cluster 0 of 3, DIM 3, float64), takes one
inbound connection from ``_accept()`` as the event loop would, hands it a stand-in for the
asyncio transport that records what is written and whether it was closed, and feeds it bytes
through ``get_buffer``/``buffer_updated`` — the acceptor's real code path, codec included.

Input layout (``atheris.FuzzedDataProvider``): a bool, whether the acceptor has a cluster
secret, then actions until the input runs out, each followed by a bool: send what is queued
now, in reads of 1..4096 bytes the input picks, or queue the next action's bytes behind it
(several messages in one read: a frame pipelined behind the Join, say):

0. raw bytes;
1. a Hello (versions around the current one, a claimed cluster, incarnation, nonce, name, mac);
2. a Join: the claimed cluster's members or other workers, the run's dim/dtype/fingerprint or
   others, and a proof that is none, the right one (computed from the Hello sent last and the
   Welcome received), the right one with a byte flipped, the other role's, or random bytes;
3. a Data with a small payload (the pre-trust codec takes none);
4. any other message (Ping, Pong, Ack, Bye, Welcome, Refuse, Control);
5. end of stream (after what is queued).

Checked for every input (any exception out of the acceptor is a finding too: asyncio would
log it as a fatal error of the protocol):

* what the acceptor writes decodes, and is a Welcome (once, first), then an Ack or a Refuse;
  Pongs, Acks and a Bye may follow an accepted Join only;
* a Refuse is the last thing written, the connection is closed after it, and it carries only
  a reason code from a fixed set — with a secret, before a Join with a valid proof the only
  codes are ``bad_handshake``, ``unsupported_version`` and ``bad_secret`` (no claim is judged
  before the proof: a stranger learns nothing about the run);
* with a secret, the Welcome carries the acceptor's valid proof, and the first Ack answers a
  Join whose proof verifies; without one, a Welcome carries no proof and a Join with a proof
  is refused;
* an accepted Join matched the run (its cluster's members, dim, dtype, fingerprint);
* until the Join is accepted the connection's codec keeps its pre-trust caps, then takes the
  run's frame size (``max(DIM * 8, 1024)``, as the daemon sets it) and no more.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["peerlearn.wire", "peerlearn.transport"]):
    import numpy as np

    from peerlearn.membership import Membership
    from peerlearn.transport import auth
    from peerlearn.transport.links import LinkSettings
    from peerlearn.transport.peers import PRE_TRUST_HEADER, Transport
    from peerlearn.wire import (
        MIN_PROTOCOL_VERSION,
        PROTOCOL_VERSION,
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
        Reason,
        Refuse,
        RemoteProtocolError,
        Sentinel,
        Welcome,
    )

MEMBERS = Membership(processes=6, clusters=3)  # cluster c hosts processes c and c + 3
DIM = 3
FINGERPRINT = "fp-fuzz"
SECRET = b"the-cluster-secret-of-the-fuzz-run"
SELF = Hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 7, 0, "acceptor")
RUN = Join(workers=MEMBERS.members[0], dim=DIM, dtype="float64", fingerprint=FINGERPRINT)
#: every refusal code the acceptor may send
CODES = frozenset({"bad_handshake", "bad_secret", "membership_mismatch"} | {str(r) for r in Reason})
#: the codes a peer that has not proved the secret may get
BEFORE_PROOF = frozenset({"bad_handshake", "bad_secret", str(Reason.UNSUPPORTED_VERSION)})
#: the payload cap after the Join, as peerlearn/daemon/node.py sets it for a run of dimension DIM
_WIDE = max(DIM * 8, 1024)
_SETTINGS = {
    False: LinkSettings(max_payload=_WIDE),
    True: LinkSettings(max_payload=_WIDE, secret=SECRET),
}


def _is_proof(role: str, hello: Hello, welcome: Welcome, mac: bytes) -> bool:
    """Whether ``mac`` is ``role``'s proof: compared here, not by ``auth.verify`` — the
    acceptor's own decision is what is being judged."""
    return mac == auth.proof(SECRET, role, hello, welcome)  # type: ignore[arg-type]


class FakeTransport:
    """The part of ``asyncio.Transport`` that FrameProtocol uses: writes are kept."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | memoryview) -> None:
        assert not self.closing, "write after close"
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def _text(fdp: atheris.FuzzedDataProvider, most: int) -> str:
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, most))


def _hello(fdp: atheris.FuzzedDataProvider) -> Hello:
    lo = fdp.ConsumeIntInRange(PROTOCOL_VERSION - 2, PROTOCOL_VERSION + 2)
    hi = fdp.ConsumeIntInRange(lo, PROTOCOL_VERSION + 3)
    cluster = fdp.ConsumeIntInRange(0, 4)
    incarnation = fdp.ConsumeIntInRange(0, 10)
    nonce = fdp.ConsumeIntInRange(0, 2**63 - 1)
    mac = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
    return Hello(lo, hi, cluster, incarnation, nonce, _text(fdp, 8), mac)


def _join(fdp: atheris.FuzzedDataProvider, hello: Hello | None, welcome: Welcome | None) -> Join:
    """A Join; ``hello`` and ``welcome``: the handshake so far, which a proof covers."""
    cluster = hello.cluster if hello is not None else 1
    match fdp.ConsumeIntInRange(0, 3):
        case 0:
            workers = MEMBERS.members[cluster] if cluster < MEMBERS.clusters else (1, 4)
        case 1:
            workers = tuple(reversed(MEMBERS.members[1]))
        case 2:
            workers = ()
        case _:
            workers = tuple(sorted({fdp.ConsumeIntInRange(0, 7) for _ in range(3)}))
    dim = DIM if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**63 - 1)
    dtype = "float64" if fdp.ConsumeBool() else _text(fdp, 8)
    fingerprint = FINGERPRINT if fdp.ConsumeBool() else _text(fdp, 12)
    mac = b""
    how = fdp.ConsumeIntInRange(0, 4)
    if how and hello is not None and welcome is not None:
        mac = auth.proof(SECRET, "dialer", hello, welcome)
        if how == 2:
            i = fdp.ConsumeIntInRange(0, len(mac) - 1)
            mac = mac[:i] + bytes([mac[i] ^ (1 << fdp.ConsumeIntInRange(0, 7))]) + mac[i + 1 :]
        elif how == 3:
            mac = auth.proof(SECRET, "acceptor", hello, welcome)
        elif how == 4:
            mac = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    elif how:
        mac = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    return Join(workers, dim, dtype, fingerprint, mac)


def _other(fdp: atheris.FuzzedDataProvider) -> Message:
    n = fdp.ConsumeIntInRange(0, 2**63 - 1)
    match fdp.ConsumeIntInRange(0, 6):
        case 0:
            return Ping(n)
        case 1:
            return Pong(n)
        case 2:
            return Ack(n)
        case 3:
            return Bye(_text(fdp, 16))
        case 4:
            return Welcome(PROTOCOL_VERSION, 0, 7, n, fdp.ConsumeBytes(32))
        case 5:
            return Refuse(_text(fdp, 16))
        case _:
            return Control(_text(fdp, 12), {"upto": n})


def _data(fdp: atheris.FuzzedDataProvider) -> Data:
    size = fdp.ConsumeIntInRange(0, 4)
    value = np.full(size, fdp.ConsumeRegularFloat())
    seq = fdp.ConsumeIntInRange(0, 3)
    return Data(seq, ("params", seq), fdp.ConsumeIntInRange(0, 5), seq, value)


class Run:
    """One connection to one fresh acceptor, and the oracle over what it answers.

    The acceptor's message callback is wrapped: every answer is judged against the very
    message the acceptor was handling when it wrote it (raw bytes may carry messages too)."""

    def __init__(self, secret: bool) -> None:
        self.secret = secret
        self.delivered: list[Data] = []
        self.acceptor = Transport(
            SELF,
            RUN,
            MEMBERS,
            ("127.0.0.1", 0),
            [],
            self.delivered.append,
            _SETTINGS[secret],
        )
        self.proto = self.acceptor._accept()
        self._handle = self.proto._on_message
        self.proto._on_message = self._received
        self.wire = FakeTransport()
        self.proto.connection_made(self.wire)  # type: ignore[arg-type]
        self.client = Codec()  # what the dialer encodes and decodes with
        self.answers = 0  # chunks of self.wire.written already judged
        self.out: list[Message] = []
        self.hello: Hello | None = None  # the Hello the acceptor took, for a Join's proof
        self.welcome: Welcome | None = None  # and its answer
        self.joined = False
        self.pending = bytearray()

    def _received(self, proto: Any, msg: Message) -> None:
        self.judge_written(None)  # (nothing may be pending)
        self._handle(proto, msg)
        self.judge_written(msg)

    def judge_written(self, to: Message | None) -> None:
        """Decode what the acceptor wrote since last time; judge it as its answer to ``to``."""
        fresh = self.wire.written[self.answers :]
        self.answers = len(self.wire.written)
        if fresh:
            self.client.receive_data(b"".join(fresh))
        while not isinstance(event := self.client.next_event(), Sentinel):
            self.judge(event, to)
            self.out.append(event)

    def feed(self, data: bytes, fdp: atheris.FuzzedDataProvider) -> None:
        """``data`` in reads of sizes the input picks (what is left in one read at its end)."""
        pos = 0
        while pos < len(data) and not self.wire.closing:
            region = self.proto.get_buffer(-1)
            size = fdp.ConsumeIntInRange(1, 4096) if fdp.remaining_bytes() else len(data)
            n = min(size, len(region), len(data) - pos)
            region[:n] = data[pos : pos + n]
            self.proto.buffer_updated(n)
            pos += n
            self.judge_written(None)
            codec = self.proto.codec
            if not self.joined:
                assert (codec.max_payload, codec.max_header) == (0, PRE_TRUST_HEADER), codec
            else:
                assert codec.max_payload == _WIDE, codec

    def queue(self, data: bytes) -> None:
        """Bytes to send at the next flush: messages queued together may share a read."""
        self.pending += data

    def flush(self, fdp: atheris.FuzzedDataProvider) -> None:
        data, self.pending = bytes(self.pending), bytearray()
        self.feed(data, fdp)

    def send(self, msg: Message) -> None:
        self.queue(b"".join(bytes(c) for c in self.client.send(msg)))

    def proved(self, join: Join) -> bool:
        return (
            self.hello is not None
            and self.welcome is not None
            and _is_proof("dialer", self.hello, self.welcome, join.mac)
        )

    def judge(self, msg: Message, to: Message | None) -> None:
        assert not any(isinstance(m, Refuse) for m in self.out), f"{msg} after a refusal"
        match msg:
            case Welcome():
                assert not self.out and isinstance(to, Hello), f"a Welcome to {to} after {self.out}"
                if self.secret:
                    assert _is_proof("acceptor", to, msg, msg.mac), "a wrong proof"
                else:
                    assert msg.mac == b"", "a proof with no secret set"
                self.hello, self.welcome = to, msg
            case Refuse(reason=reason):
                assert to is not None, "a refusal of nothing"
                assert reason in CODES, reason
                if self.secret and not (isinstance(to, Join) and self.proved(to)):
                    assert reason in BEFORE_PROOF, f"{reason} told before a proof"
                if (
                    self.secret
                    and isinstance(to, Join)
                    and self.welcome is not None
                    and not self.proved(to)
                ):
                    assert reason == "bad_secret", f"{reason} for a Join without its proof"
            case Ack() if not self.joined:
                assert isinstance(to, Join), f"an Ack to {to} before the Join"
                if self.secret:
                    assert self.proved(to), "an Ack for a Join without a valid proof"
                else:
                    assert to.mac == b"", "an Ack for a proof with no secret set"
                assert self.hello is not None
                assert to.workers == MEMBERS.members[self.hello.cluster], to
                assert (to.dim, to.dtype, to.fingerprint) == (DIM, "float64", FINGERPRINT), to
                self.joined = True
            case Ack():
                assert to is None, f"an Ack to {to} after the Join (acks are scheduled)"
            case Pong():
                assert self.joined and isinstance(to, Ping) and msg.nonce == to.nonce, (to, msg)
            case _:
                raise AssertionError(f"the acceptor sent {msg} (to {to})")

    def finish(self) -> None:
        self.judge_written(None)
        if self.out and isinstance(self.out[-1], Refuse):
            assert self.wire.closing, "refused but not closed"
        self.proto.connection_lost(None)
        assert not self.acceptor._inbound


async def _one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    run = Run(secret=fdp.ConsumeBool())
    while fdp.remaining_bytes() and not run.wire.closing:
        match fdp.ConsumeIntInRange(0, 5):
            case 0:
                run.queue(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300)))
            case 1:
                run.send(_hello(fdp))
            case 2:
                run.send(_join(fdp, run.hello, run.welcome))
            case 3:
                run.send(_data(fdp))
            case 4:
                run.send(_other(fdp))
            case _:
                run.flush(fdp)
                if not run.wire.closing:
                    run.proto.eof_received()
                    run.wire.close()
        if fdp.ConsumeBool():  # else the next message goes out in the same reads
            run.flush(fdp)
    run.flush(fdp)
    await asyncio.sleep(0)  # the acks an accepted Data scheduled (call_soon)
    run.finish()


def TestOneInput(data: bytes) -> None:
    try:
        LOOP.run_until_complete(_one(data))
    except RemoteProtocolError as exc:  # FrameProtocol handles these: none may escape it
        raise AssertionError(f"a protocol error escaped the acceptor: {exc!r}") from exc


LOOP = asyncio.new_event_loop()


def main() -> None:
    logging.disable(logging.CRITICAL)  # every refusal is logged: quiet at a million inputs
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
