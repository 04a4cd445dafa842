"""The EASGD family and DOWNPOUR (Zhang–Choromanska–LeCun: the main paper's Algorithms 1–2
and the supplement's Section 8). The labels A.1a–A.1e below are explained in docs/papers.md.

Every variant has p workers and one *center* (master) process, the ``center`` of the run; the
center is a program of its own, hosted by whichever daemon hosts that process. Time indexing:
a worker's local clock is ``c = t − 1`` at iteration ``t``; it talks to the center when τ
divides ``c``.

=============  ==================================================================================
``easgd``      synchronous (A.1a): at each exchange every worker sends x^i_t, gets x̃_t, and
               x^i ← x^i − η g(x^i) − α(x^i − x̃); the center x̃ ← x̃ + α Σ_i (x^i_t − x̃)
               — both from time-t values (Jacobi); between exchanges workers do plain SGD
``async``      asynchronous EASGD (A.1b): the worker sends its snapshot x; the center applies
               d = α(x − x̃), x̃ ← x̃ + d atomically and answers d; x^i ← x^i − d − η g(x)
``eamsgd``     A.1c: the same elastic exchange, then Nesterov momentum on the worker:
               v ← δv − η g(x + δv), x^i ← x^i + v
``downpour``   A.1d: push the accumulated update v, pull x̃ (x̃ ← x̃ + v; x^i ← x̃; v ← 0), then
               x^i ← x^i − η g, v ← v − η g (one gradient for both); a last push flushes v
``mdownpour``  A.1e: workers pull x̃ and push g(x̃); the center applies Nesterov momentum,
               v ← δv − η g, x̃ ← x̃ + δv − η g (the −ηg term the supplement's transcription
               lost in Section 8.2: without it δ = 0 would never move x̃); δ = 0 is MixML's
               asynchronous parameter server
=============  ==================================================================================

Messages: workers ``Post`` requests to the center's inbox (``("req", t)``) and the center
answers with ``Send(("rep", t), …)``, which the worker awaits; the synchronous variant
uses ``Send``/``Await`` both ways (``("x", t)`` and ``("center", t)``, t the workers' iteration
of the exchange).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping
from enum import StrEnum
from itertools import count
from typing import Any

from peerlearn.algorithms.vectors import descend
from peerlearn.effects import (
    Await,
    Count,
    Effect,
    Grad,
    Letter,
    Post,
    Quantize,
    Receive,
    Report,
    Send,
    Vector,
)

__all__ = [
    "Variant",
    "answered_requests",
    "center_requests",
    "elastic_center",
    "elastic_worker",
    "sync_center",
    "sync_worker",
]


class Variant(StrEnum):
    """The asynchronous programs: what a worker sends the center and what it gets back."""

    ASYNC = "async"  # snapshot x → d = α(x − x̃); the gradient computed meanwhile
    EAMSGD = "eamsgd"  # the same, with Nesterov momentum on the worker
    DOWNPOUR = "downpour"  # accumulated update v → x̃, every τ steps
    MDOWNPOUR = "mdownpour"  # gradient → x̃, Nesterov momentum on the center


def _clock(steps: int | None, start: int = 1) -> Iterable[int]:
    return count(start) if steps is None else range(start, steps + 1)


def _exchanges(steps: int, tau: int) -> int:
    """How many local clocks c ∈ [0, T) τ divides: ⌈T/τ⌉."""
    return -(-steps // tau)


def answered_requests(t: int, tau: int) -> int:
    """How many requests of an elastic worker (A.1b, A.1c) the center has answered once it has
    answered the one of iteration ``t`` (0: none): one every τ iterations from iteration 1."""
    return 0 if t <= 0 else (t - 1) // tau + 1


def center_requests(variant: Variant, steps: int, tau: int) -> int:
    """How many requests one worker sends the center in a run of ``steps`` iterations."""
    match variant:
        case Variant.ASYNC | Variant.EAMSGD:
            return _exchanges(steps, tau)
        case Variant.DOWNPOUR:
            return _exchanges(steps, tau) + 1  # + the final flush of v
        case Variant.MDOWNPOUR:
            return steps


# --- synchronous EASGD -----------------------------------------------------------------------


def sync_worker(
    x0: Vector,
    steps: int | None,
    eta: float,
    alpha: float,
    tau: int,
    center: int,
    *,
    start: int = 1,
) -> Generator[Effect, Any, Vector]:
    """``start``: a worker resumed at iteration ``start`` from ``x0`` (a live peer's model)."""
    x = x0
    t = start - 1
    for t in _clock(steps, start):
        yield Report("model", x, step=t)
        c = t - 1
        if c % tau == 0:
            sent = yield Quantize(("x",), x)
            yield Send((center,), ("x", t), sent)
            (got,) = yield Await(("center", t), Count(1))
            g = yield Grad(x)
            # the elastic term from both values as sent: the center uses the same two
            x = x - eta * g - alpha * (sent - got.value)
        else:
            g = yield Grad(x)
            x = descend(x, eta, g)
    yield Report("model", x, step=t + 1)
    return x


def sync_center(
    x0: Vector,
    steps: int | None,
    alpha: float,
    tau: int,
    workers: tuple[int, ...],
    *,
    start: int = 1,
) -> Generator[Effect, Any, Vector]:
    """x̃_{k+1} = x̃_k + α Σ_i (x^i − x̃_k), from the workers' values at exchange k.

    The center counts the workers' iterations: exchange k is iteration t = (k − 1)τ + 1, its
    model reports and tags say t, and its last report is iteration T + 1 — so a restarted
    process and its peers agree on which exchange is which. ``start``: a center resumed at
    iteration ``start`` (from ``x0``, a live peer's model) serves the exchanges from there."""
    xc = x0
    first = start + (1 - start) % tau  # the first exchange iteration at or after start
    t = first - tau
    for t in count(first, tau) if steps is None else range(first, steps + 1, tau):
        yield Report("model", xc, step=t)
        sent = yield Quantize(("center",), xc)
        yield Send(workers, ("center", t), sent)  # the workers' iteration
        xs = yield Await(("x", t), Count(len(workers)))
        xc = xc + alpha * sum((m.value - sent for m in xs), start=0 * xc)
    yield Report("model", xc, step=t + 1 if steps is None else steps + 1)
    return xc


# --- asynchronous variants -------------------------------------------------------------------


def elastic_worker(
    variant: Variant,
    x0: Vector,
    steps: int | None,
    eta: float,
    tau: int,
    delta: float,
    center: int,
    *,
    start: int = 1,
    ledger: Vector | None = None,
    answered: int | None = None,
) -> Generator[Effect, Any, Vector]:
    """``start``, ``ledger``: a worker resumed at iteration ``start`` (from the center's model
    ``x0``) whose elastic differences so far sum to ``ledger`` (the center's record of them);
    ``answered``: its last answered request, when not ``start − 1`` (a worker resumed from its
    own checkpointed model, taken in the middle of an exchange period).

    The elastic variants report their *ledger* — the sum D of the differences d the center
    answered, as ``Report("ledger", D, step=t)`` after the exchange of iteration t, and with
    ``key=(t,)`` just before a request of iteration t goes out — which is what the center is
    rebuilt from if it restarts: x̃ = x̃_1 + Σ_i D_i, and the requests it must answer."""
    x = x0
    v = 0 * x0
    elastic = variant in (Variant.ASYNC, Variant.EAMSGD)
    given = 0 * x0 if ledger is None else ledger
    if elastic:
        yield Report("ledger", given, step=start - 1 if answered is None else answered)
    # (a DOWNPOUR worker resumed after its flush, at T + 2, has done its T iterations)
    t = start - 1 if steps is None else min(start - 1, steps)
    answered = start - 1 if answered is None else answered
    for t in _clock(steps, start):
        yield Report("model", x, step=t)
        c = t - 1
        talk = c % tau == 0
        match variant:
            case Variant.ASYNC | Variant.EAMSGD:
                snapshot = x
                if talk:
                    # its key: the request it is about to wait for (lost if the center restarts)
                    yield Report("ledger", given, step=answered, key=(t,))
                    yield Post((center,), ("req", t), (yield Quantize(("req",), snapshot)))
                if variant is Variant.ASYNC:
                    g = yield Grad(snapshot)  # computed while the center answers
                if talk:
                    (d,) = yield Await(("rep", t), Count(1))
                    x = x - d.value
                    given = given + d.value
                    answered = t
                    yield Report("ledger", given, step=t)
                if variant is Variant.ASYNC:
                    x = descend(x, eta, g)
                else:
                    g = yield Grad(snapshot + delta * v)
                    v = delta * v - eta * g
                    x = x + v
            case Variant.DOWNPOUR:
                if talk:
                    # what rounding left of v goes with the next push (error feedback)
                    yield Post((center,), ("req", t), (yield Quantize(("req",), v)))
                    (xc,) = yield Await(("rep", t), Count(1))
                    x, v = xc.value, 0 * v
                g = yield Grad(x)
                x = descend(x, eta, g)
                v = descend(v, eta, g)
            case Variant.MDOWNPOUR:
                g = yield Grad(x)
                yield Post((center,), ("req", t), (yield Quantize(("req",), g)))
                (xc,) = yield Await(("rep", t), Count(1))
                x = xc.value
    if variant is Variant.DOWNPOUR and steps is not None and start <= steps + 1:
        # flush the last accumulated update (unless resumed after its flush was answered)
        yield Post((center,), ("req", steps + 1), (yield Quantize(("req",), v)))
        (xc,) = yield Await(("rep", steps + 1), Count(1))
        x = xc.value
    yield Report("model", x, step=t + 1)
    return x


def elastic_center(
    variant: Variant,
    x0: Vector,
    requests: int | None,
    eta: float,
    alpha: float,
    delta: float,
    *,
    workers: tuple[int, ...] = (),
    served: int = 0,
    answered: Mapping[int, int] | None = None,
    given: Mapping[int, Vector] | None = None,
    pending: Mapping[int, int] | None = None,
    tau: int = 1,
) -> Generator[Effect, Any, Vector]:
    """Serve ``requests`` requests in all (None: forever), one at a time, in arrival order.

    It keeps, per worker, the iteration of the last request it answered and (A.1b, A.1c) the
    sum of the differences it sent that worker — its *ledger*, which a worker restarted from
    the center's model takes over. Its model report's key lists the former for ``workers``
    in order; ``Report("ledger", {worker: sum}, …)`` reports the latter after every answer.

    A request of an iteration already answered (sent again around a restart) gets a neutral
    answer — d = 0, or x̃ with nothing added — and changes nothing: each worker's requests are
    applied once. The resumed center (see the records' resume entry point) starts at x0 with
    ``served`` requests counted, and first answers the ``pending`` ones — iteration per worker,
    requests lost with its last incarnation — neutrally: the worker goes on as if the exchange
    had not pulled it, and the center's model stays x̃_1 + Σ_i D_i (the conservation law).

    A resumed center may lack some workers' ledgers (their daemons did not answer in time): it
    holds their requests until a *late ledger* arrives in its inbox, a letter
    ``("ledger", w, answered, waiting)`` from w whose value is D_w. It then adds D_w to its
    model, counts w's answered requests (one every ``tau`` iterations), serves the held
    requests, and answers the one w waits on neutrally if that one was lost."""
    xc = x0
    v = 0 * x0
    last: dict[int, int] = dict(answered or {})
    sums: dict[int, Vector] = dict(given or {})
    elastic = variant in (Variant.ASYNC, Variant.EAMSGD)
    #: workers whose ledgers a resumed center lacks, and their requests held meanwhile
    missing = set(workers) - set(last) if answered is not None and elastic else set()
    held: dict[int, list[Letter]] = {}

    def key() -> tuple[int, ...]:
        return tuple(last.get(w, 0) for w in workers)

    # The ledger goes first, then the model whose key says which requests it covers: a reader
    # between the two sees sums at least as new as the key (a worker resumed from them sends a
    # request again at worst, which gets a neutral answer), never older.
    if elastic:
        yield Report("ledger", dict(sums), step=served + 1)
    yield Report("model", xc, step=served + 1, key=key())
    for w, t in sorted((pending or {}).items()):
        yield Send((w,), ("rep", t), 0 * xc if elastic else xc)
        last[w] = t
    while requests is None or served < requests:
        todo = list((yield Receive(block=True)))
        while todo:
            letter = todo.pop(0)
            value, t, sender = letter.value, letter.tag[1], letter.sender
            if letter.tag[0] == "ledger":
                if sender != t or sender not in missing:
                    continue  # not one this center waits for (a duplicate): nothing to add
                missing.discard(sender)
                done, waiting = int(letter.tag[2]), int(letter.tag[3])
                xc = xc + value
                sums[sender] = value
                last[sender] = done
                served += answered_requests(done, tau)
                queued = held.pop(sender, [])
                if waiting and all(q.tag[1] != waiting for q in queued):
                    # lost with the last center: neutral, as for the pending ones
                    yield Send((sender,), ("rep", waiting), 0 * xc)
                    last[sender] = waiting
                    served += 1
                yield Report("ledger", dict(sums), step=served + 1)
                yield Report("model", xc, step=served + 1, key=key())
                todo[:0] = queued
                continue
            if sender in missing:  # its ledger first: what it applied is not counted yet
                held.setdefault(sender, []).append(letter)
                continue
            if sender in last and t <= last[sender]:  # answered already: neutral, once
                yield Send((sender,), ("rep", t), 0 * xc if elastic else xc)
                continue
            match variant:
                case Variant.ASYNC | Variant.EAMSGD:
                    # as sent: the worker subtracts the very d the center adds
                    d = yield Quantize(("rep", sender), alpha * (value - xc))
                    xc = xc + d
                    answer = d
                    sums[sender] = sums[sender] + d if sender in sums else d
                case Variant.DOWNPOUR:
                    xc = xc + value
                    answer = yield Quantize(("rep", sender), xc)
                case Variant.MDOWNPOUR:
                    v = delta * v - eta * value
                    xc = xc + delta * v - eta * value
                    answer = yield Quantize(("rep", sender), xc)
            yield Send((sender,), ("rep", t), answer)
            last[sender] = t
            served += 1
            if elastic:
                yield Report("ledger", dict(sums), step=served + 1)
            yield Report("model", xc, step=served + 1, key=key())
    return xc
