"""Effects: what an algorithm program asks its runtime to do.

Contract
--------
An algorithm is a generator (a *program*). It yields one effect at a time and receives the
effect's result through ``send``; when it returns, its return value is its output. Programs do
no I/O, start no threads and never look at a clock: every interaction with the world is one of
the effects below, so the simulator and the network runtime run the very same objects.

============================  =================================================================
effect                        result sent back into the program
============================  =================================================================
``Grad(x)``                   a stochastic gradient at ``x`` from the process's own RNG stream
``Broadcast(tag, value)``     ``None``; ``value`` goes to every process, the sender included
``Await(tag, quorum)``        a tuple of :class:`Msg` with this tag, once ``quorum`` holds
``Exchange(tag, value, q)``   ``Broadcast`` then ``Await``: the tuple of :class:`Msg`
``Send(to, tag, value)``      ``None``; like ``Broadcast``, to the processes ``to`` only
``Post(to, tag, value)``      ``None``; ``value`` goes to the *inbox* of the processes ``to``
``Receive(block)``            a tuple of :class:`Letter`: everything in the caller's inbox, in
                              arrival order (empty if ``block`` is false and nothing came;
                              with ``block`` the caller waits for at least one)
``Write(key, value)``         ``None``; the caller's own single-writer register at ``key``
``Collect(key)``              a tuple of :class:`Msg`: the non-⊥ registers at ``key`` of the
                              caller's cluster, read one by one (no snapshot)
``Report(name, value, …)``    ``None``; a sample for metrics and traces
``Quantize(stream, value)``   ``value`` as it is to be sent: rounded to the run's payload
                              compression (with ``stream``'s error feedback), or ``value``
                              itself when the run compresses nothing
``Done(value)``               ``None``; the program has finished with output ``value``, and
                              goes on only to answer what still reaches its inbox
============================  =================================================================

Compression. A program yields ``Quantize`` just before it sends a value the run may compress
(a model, a gradient, an elastic difference — never an agreement value), names the *stream*
the value belongs to (the tag kind of its messages, and the addressee where each has its own
stream), sends the result and goes on with the result wherever it uses what it sent — so both
ends of an exchange use the very same value and the conservation laws hold. The algorithm's
record lists the tag kinds whose values it rounds (``AlgorithmSpec.compressible``).

A program that returns is gone: whatever reaches it later is dropped. One whose peers may need an
answer after it finished — a restarted neighbour of asynchronous gossip asks for an exchange and
waits for its bye — yields ``Done(value)`` instead: the runtime counts it finished (its output
``value``, the run may end) and goes on driving it, and from there on it only receives and posts
until the run stops.

Tags name an instance: ``("params", t)`` for an SGD iteration, ``("maa", t, r)`` for a round of
cluster agreement, ``("sm", t, r, k)`` for a shared-memory round. A runtime buffers messages for
tags nobody awaits yet and drops (and counts) messages for a tag whose ``Await`` completed: one
value per sender and tag is kept, the first.

Two kinds of delivery
---------------------
``Broadcast``/``Send`` fill per-tag boxes that ``Await`` drains with a quorum: the instance-based
exchanges of the Attiya–Schiller algorithms, synchronous EASGD and the synchronous MixML
protocols. ``Post`` fills a FIFO *inbox* that ``Receive`` drains whole: streams of requests and
gradients with no common iteration — DASGD's gradients, an elastic center serving its workers,
pairwise gossip. Inbox messages are never late and never deduplicated by the runtime: the
transport delivers each exactly once, and programs that relay (DASGD) deduplicate themselves.

Quorums
-------
``Count(n)``            exactly the first ``n`` distinct senders, in arrival order (Alg 1).
``AtLeast(n)``          everything buffered once ``n`` distinct senders are in (Alg 2).
``MajorityOfClusters``  everything buffered once senders of ``⌊m/2⌋ + 1`` distinct clusters are
                        in (Alg 3).

Values are numpy arrays that nobody mutates after they were yielded: a runtime may hand the same
object to every receiver.

Values are finite, too. A process whose gradient, reported model or outgoing value holds a NaN or
an infinity has *diverged*: the runtime stops it right there, before the value reaches anyone,
like a crash (:class:`Divergence` says where), and reports it; the other processes go on without
it. A non-finite value that arrives over a network anyway is dropped, never delivered.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = [
    "AtLeast",
    "Await",
    "Broadcast",
    "Collect",
    "Count",
    "Divergence",
    "Done",
    "Effect",
    "Exchange",
    "Grad",
    "Letter",
    "MajorityOfClusters",
    "Msg",
    "Post",
    "Program",
    "Quantity",
    "Quantize",
    "Quorum",
    "Receive",
    "Report",
    "Send",
    "Tag",
    "Vector",
    "Write",
    "finite",
    "quiet_float_errors",
    "quorum_have",
    "quorum_need",
    "quorum_take",
]

Vector: TypeAlias = npt.NDArray[np.float64]
Tag: TypeAlias = tuple[Any, ...]


def tag_text(tag: Tag) -> str:
    """A tag as log lines show it: ``("params", 12)`` → ``params 12``."""
    return " ".join(str(part) for part in tag)


#: what turned non-finite when a process diverged
Quantity: TypeAlias = Literal["gradient", "model"]


class Divergence(NamedTuple):
    """Where a process diverged: the iteration that produced the non-finite value, and whether
    that value was a gradient or a model (a value a process sends is derived from its model,
    unless it is the gradient it computed — which was checked first)."""

    step: int
    quantity: Quantity


def finite(value: Vector) -> bool:
    """Whether every entry of ``value`` is finite (no NaN, no ±inf).

    One vectorised pass over the values: about 1.5 µs for 650 floats, 0.15 ms for 10⁶ (a copy
    of 10⁶ takes 0.6 ms). A sum would tell as well — NaN and ±inf propagate through ``+`` — and
    is a little cheaper for small arrays (1 µs), but finite terms can overflow it, so it needs
    this check behind it, and its overflow and invalid-value flags would be RuntimeWarnings
    wherever numpy's errors are not silenced (the transport's event loop)."""
    return bool(np.isfinite(value).all())


def quiet_float_errors() -> np.errstate:
    """numpy's floating-point warnings off (overflow, invalid value, divide by zero), for the
    code that computes a run's values: a diverging run is reported once, by the :func:`finite`
    checks, instead of as RuntimeWarnings on the user's terminal."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


class Msg(NamedTuple):
    """One received message or register value: who sent (wrote) it, and what."""

    sender: int
    value: Vector


class Letter(NamedTuple):
    """One inbox message: its tag, who sent it, and what."""

    tag: Tag
    sender: int
    value: Vector


# --- quorums ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Count:
    """Exactly the first ``n`` distinct senders."""

    n: int
    kind: Literal["count"] = "count"


@dataclass(frozen=True, slots=True)
class AtLeast:
    """All messages buffered once ``n`` distinct senders are in."""

    n: int
    kind: Literal["at_least"] = "at_least"


@dataclass(frozen=True, slots=True)
class MajorityOfClusters:
    """All messages buffered once ``⌊m/2⌋ + 1`` distinct clusters are represented."""

    kind: Literal["majority_of_clusters"] = "majority_of_clusters"


Quorum: TypeAlias = Count | AtLeast | MajorityOfClusters


def quorum_need(quorum: Quorum, clusters: int) -> int:
    """How many distinct senders (or clusters, for a cluster majority) the quorum needs."""
    match quorum:
        case Count(n=n) | AtLeast(n=n):
            return n
        case MajorityOfClusters():
            return clusters // 2 + 1


def quorum_take(
    quorum: Quorum, box: Sequence[Msg], cluster_of: Sequence[int], clusters: int
) -> tuple[Msg, ...] | None:
    """What an ``Await(tag, quorum)`` returns given the buffered messages ``box`` (arrival
    order, one per sender), or ``None`` while the quorum does not hold yet. Both runtimes use
    this one definition."""
    match quorum:
        case Count(n=need):
            return tuple(box[:need]) if len(box) >= need else None
        case AtLeast(n=need):
            return tuple(box) if len(box) >= need else None
        case MajorityOfClusters():
            have = len({cluster_of[m.sender] for m in box})
            return tuple(box) if have >= clusters // 2 + 1 else None


def quorum_have(quorum: Quorum, box: Sequence[Msg], cluster_of: Sequence[int]) -> int:
    """How many distinct senders (or clusters, for a cluster majority) ``box`` holds."""
    if isinstance(quorum, MajorityOfClusters):
        return len({cluster_of[m.sender] for m in box})
    return len(box)


# --- effects ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grad:
    """Compute a stochastic gradient at ``x``; the runtime charges (or measures) compute time."""

    x: Vector
    kind: Literal["grad"] = "grad"


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send ``value`` under ``tag`` to every process, the sender included."""

    tag: Tag
    value: Vector
    kind: Literal["broadcast"] = "broadcast"


@dataclass(frozen=True, slots=True)
class Await:
    """Block until ``quorum`` holds for ``tag``; the result is a tuple of :class:`Msg`."""

    tag: Tag
    quorum: Quorum
    kind: Literal["await"] = "await"


@dataclass(frozen=True, slots=True)
class Exchange:
    """``Broadcast(tag, value)`` then ``Await(tag, quorum)``: the common case."""

    tag: Tag
    value: Vector
    quorum: Quorum
    kind: Literal["exchange"] = "exchange"


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``value`` under ``tag`` to the processes ``to`` (their per-tag boxes)."""

    to: tuple[int, ...]
    tag: Tag
    value: Vector
    kind: Literal["send"] = "send"


@dataclass(frozen=True, slots=True)
class Post:
    """Put ``value`` under ``tag`` into the inbox of each process in ``to``."""

    to: tuple[int, ...]
    tag: Tag
    value: Vector
    kind: Literal["post"] = "post"


@dataclass(frozen=True, slots=True)
class Receive:
    """Take the caller's whole inbox (a tuple of :class:`Letter`); ``block``: wait for one."""

    block: bool = True
    kind: Literal["receive"] = "receive"


@dataclass(frozen=True, slots=True)
class Write:
    """Write the caller's own register at ``key`` (single writer, many readers, once per key)."""

    key: Tag
    value: Vector
    kind: Literal["write"] = "write"


@dataclass(frozen=True, slots=True)
class Collect:
    """Read every register at ``key`` of the caller's cluster, one read at a time."""

    key: Tag
    kind: Literal["collect"] = "collect"


@dataclass(frozen=True, slots=True)
class Report:
    """A sample for metrics and traces.

    Names the runtimes understand: ``"model"`` (``value`` is the model ``x_t`` at the start of
    iteration ``step``; ``step = T + 1`` carries the final model) and ``"agreement"`` (``value`` is
    the value held at the start of agreement round ``key = (instance, round, inner_round)``,
    ``inner_round`` ``None`` for a cluster round).
    """

    name: str
    value: Any
    step: int = 0
    key: Tag = field(default=())
    kind: Literal["report"] = "report"


@dataclass(frozen=True, slots=True)
class Quantize:
    """``value`` as the run sends it on ``stream``: rounded to its payload compression, with the
    stream's error feedback (:class:`peerlearn.compression.Compressor`); the value itself when
    the run compresses nothing."""

    stream: Tag
    value: Vector
    kind: Literal["quantize"] = "quantize"


@dataclass(frozen=True, slots=True)
class Done:
    """The program has finished with output ``value``; it goes on only to answer its inbox."""

    value: Any
    kind: Literal["done"] = "done"


Effect: TypeAlias = (
    Grad
    | Broadcast
    | Await
    | Exchange
    | Send
    | Post
    | Receive
    | Write
    | Collect
    | Report
    | Quantize
    | Done
)
Program: TypeAlias = Generator[Effect, Any, Any]
