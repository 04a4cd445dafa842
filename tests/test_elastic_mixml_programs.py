"""The EASGD family's and MixML's programs stepped by hand, effect by effect.

Each program is driven by a script that answers its effects: ``Grad(x)`` with x (the gradient
of ½|x|²), ``Await``/``Exchange`` with the messages given for that tag, ``Receive`` with the next
batch of letters. The transcripts are checked against values worked out by hand from the
update rules in :mod:`peerlearn.algorithms.elastic` and :mod:`peerlearn.algorithms.mixml`;
every number is dyadic, so the arithmetic is exact. The starting point has a zero coordinate,
which tells ``0 * x`` from ``0 / x``.

What the runtimes rely on, checked for every program:

* the ``"model"`` reports: the model at the start of iteration t under ``step = t`` for
  t = 1..T, and the final model under ``step = T + 1`` (also for T = 0);
* every tag a program yields can go over the wire (:func:`peerlearn.wire.messages.check_tag`:
  strings and ints, not floats);
* ``steps = None`` runs forever, from iteration 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from peerlearn.algorithms.elastic import (
    Variant,
    elastic_center,
    elastic_worker,
    sync_center,
    sync_worker,
)
from peerlearn.algorithms.mixml import async_gossip, averaging, sync_gossip
from peerlearn.effects import (
    Await,
    Count,
    Done,
    Exchange,
    Grad,
    Letter,
    Msg,
    Post,
    Program,
    Receive,
    Report,
    Send,
    Tag,
    Vector,
)
from peerlearn.wire.messages import check_tag
from tests.helpers import exact

CENTER = 9


def vec(*xs: float) -> Vector:
    return np.array(xs, dtype=np.float64)


X0 = vec(0.0, 2.0)


def norm(value: Any) -> Any:
    """An effect (or anything in one) as plain comparable data: arrays become tuples."""
    if isinstance(value, np.ndarray):
        return ("array", tuple(value.tolist()))
    if is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, *(norm(getattr(value, f.name)) for f in fields(value)))
    if isinstance(value, tuple | list):
        return tuple(norm(e) for e in value)
    return value


class Script:
    """Answers a program's effects: see the module docstring."""

    def __init__(
        self,
        replies: Mapping[Tag, Sequence[tuple[int, Vector]]] | None = None,
        inbox: Sequence[Sequence[Letter]] = (),
    ) -> None:
        self.replies = replies or {}
        self.inbox: Iterator[Sequence[Letter]] = iter(inbox)

    def __call__(self, effect: Any) -> Any:
        match effect:
            case Grad(x=x):
                return x
            case Await(tag=tag) | Exchange(tag=tag):
                return tuple(Msg(sender, value) for sender, value in self.replies[tag])
            case Receive():
                return tuple(next(self.inbox))
        return None


def drive(
    program: Program, answer: Callable[[Any], Any], limit: int = 1000
) -> tuple[list[Any], Any]:
    """The effects ``program`` yields when ``answer`` answers them (at most ``limit``), and its
    result (None if it was cut off): what it returns or, as a runtime counts it, what it says
    it is ``Done`` with. Every tag must pass the wire's check."""
    effects: list[Any] = []
    program = exact(program)
    try:
        effect = next(program)
        while len(effects) < limit:
            if isinstance(effect, Done):
                program.close()
                return effects, effect.value
            effects.append(effect)
            tag = getattr(effect, "tag", None)
            if tag is not None:
                assert check_tag(tag) == tag and all(type(e) in (str, int) for e in tag), tag
            effect = program.send(answer(effect))
    except StopIteration as stop:
        return effects, stop.value
    program.close()
    return effects, None


def check(program: Program, script: Script, expected: list[Any], result: Vector) -> None:
    """The transcript without the ledger reports (tests/test_elastic_rejoin.py checks those)."""
    effects, out = drive(program, script)
    effects = [e for e in effects if not (isinstance(e, Report) and e.name == "ledger")]
    assert norm(effects) == norm(expected)
    assert norm(out) == norm(result)


def model(x: Vector, step: int) -> Report:
    return Report("model", x, step=step)


# --- the reports and tags of every program, for any number of steps ---------------------------


def generic(effect: Any) -> Any:
    """Answers anything but Receive: gradients x, every quorum filled with zeros."""
    match effect:
        case Grad(x=x):
            return x
        case Await(quorum=Count(n=n)) | Exchange(quorum=Count(n=n)):
            return tuple(Msg(i, 0 * X0) for i in range(n))
    return None


def _elastic_worker(variant: Variant) -> Callable[[int, int], Program]:
    return lambda steps, tau: elastic_worker(variant, X0, steps, 0.5, tau, 0.5, CENTER)


PROGRAMS: dict[str, Callable[[int, int], Program]] = {
    "sync_worker": lambda steps, tau: sync_worker(X0, steps, 0.5, 0.25, tau, CENTER),
    "sync_center": lambda steps, tau: sync_center(X0, steps, 0.25, tau, (1, 2)),
    **{f"elastic_worker_{v}": _elastic_worker(v) for v in Variant},
    "averaging": lambda steps, tau: averaging(X0, steps, 0.5, 3, tau, 0.5),
    "sync_gossip": lambda steps, tau: sync_gossip(X0, steps, 0.5, 0, {0: 0.5, 1: 0.5}),
    "async_gossip": lambda steps, tau: async_gossip(
        X0, steps, 0.5, 0, (), np.random.default_rng(0)
    ),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
@settings(max_examples=20, deadline=None)
@given(steps=st.integers(0, 6), tau=st.integers(1, 3))
@example(steps=0, tau=1)
def test_model_reports_number_the_iterations(name: str, steps: int, tau: int) -> None:
    effects, out = drive(PROGRAMS[name](steps, tau), generic)
    reports = [e for e in effects if isinstance(e, Report) and e.name == "model"]
    # the center reports at the exchange iterations 1, τ + 1, … (the workers' clock) and T + 1
    stride = tau if name == "sync_center" else 1
    expected = [*range(1, steps + 1, stride), steps + 1]
    assert [(r.name, r.step) for r in reports] == [("model", t) for t in expected]
    assert norm(reports[-1].value) == norm(out)


@settings(max_examples=20, deadline=None)
@given(requests=st.integers(0, 5), variant=st.sampled_from(Variant))
@example(requests=0, variant=Variant.ASYNC)
def test_center_reports_one_model_per_request(requests: int, variant: Variant) -> None:
    inbox = [[Letter(("req", k), k % 3, X0 + k)] for k in range(requests)]
    program = elastic_center(variant, X0, requests, 0.5, 0.25, 0.5)
    effects, out = drive(program, Script(inbox=inbox))
    reports = [e for e in effects if isinstance(e, Report) and e.name == "model"]
    assert [(r.name, r.step) for r in reports] == [("model", s) for s in range(1, requests + 2)]
    assert norm(reports[-1].value) == norm(out)
    assert [(e.to, e.tag) for e in effects if isinstance(e, Send)] == [
        ((k % 3,), ("rep", k)) for k in range(requests)
    ]


# --- runs without an end ------------------------------------------------------------------------


def test_sync_center_without_steps_serves_exchange_after_exchange() -> None:
    effects, _ = drive(sync_center(X0, None, 0.25, 2, (1,)), generic, limit=8)
    assert norm(effects) == norm(
        [
            model(X0, 1),
            Send((1,), ("center", 1), X0),
            Await(("x", 1), Count(1)),
            model(0.75 * X0, 3),
            Send((1,), ("center", 3), 0.75 * X0),
            Await(("x", 3), Count(1)),
            model(0.5625 * X0, 5),
            Send((1,), ("center", 5), 0.5625 * X0),
        ]
    )


def test_worker_without_steps_starts_at_iteration_one() -> None:
    program = elastic_worker(Variant.MDOWNPOUR, X0, None, 0.5, 1, 0.0, CENTER)
    effects, _ = drive(program, generic, limit=9)
    zero = 0 * X0
    assert norm(effects) == norm(
        [
            model(X0, 1),
            Grad(X0),
            Post((CENTER,), ("req", 1), X0),
            Await(("rep", 1), Count(1)),
            model(zero, 2),
            Grad(zero),
            Post((CENTER,), ("req", 2), zero),
            Await(("rep", 2), Count(1)),
            model(zero, 3),
        ]
    )


def test_gossip_without_steps_starts_at_iteration_one() -> None:
    program = async_gossip(X0, None, 0.5, 0, (), np.random.default_rng(0))
    effects, _ = drive(program, generic, limit=5)
    assert norm(effects) == norm(
        [model(X0, 1), Grad(X0), model(0.5 * X0, 2), Grad(0.5 * X0), model(0.25 * X0, 3)]
    )


# --- synchronous EASGD --------------------------------------------------------------------------


def test_sync_worker_transcript() -> None:
    # η = 0.5, α = 0.25, τ = 2: exchanges at t = 1 and t = 3 (tagged with the iteration)
    script = Script({("center", 1): [(CENTER, vec(4, 4))], ("center", 3): [(CENTER, vec(8, 0))]})
    expected = [
        model(X0, 1),
        Send((CENTER,), ("x", 1), X0),
        Await(("center", 1), Count(1)),
        Grad(X0),  # x ← x − ηx − α(x − x̃) = (0, 1) + (1, 0.5)
        model(vec(1, 1.5), 2),
        Grad(vec(1, 1.5)),
        model(vec(0.5, 0.75), 3),
        Send((CENTER,), ("x", 3), vec(0.5, 0.75)),
        Await(("center", 3), Count(1)),
        Grad(vec(0.5, 0.75)),  # (0.25, 0.375) − 0.25·(−7.5, 0.75)
        model(vec(2.125, 0.1875), 4),
    ]
    check(sync_worker(X0, 3, 0.5, 0.25, 2, CENTER), script, expected, vec(2.125, 0.1875))


def test_sync_center_transcript() -> None:
    script = Script(
        {
            ("x", 1): [(1, vec(4, 2)), (2, vec(0, 0))],  # Σ(x^i − x̃) = (4, −2)
            ("x", 3): [(2, vec(1, 1.5)), (1, vec(5, 1.5))],  # Σ(x^i − x̃) = (4, 0)
        }
    )
    expected = [
        model(X0, 1),
        Send((1, 2), ("center", 1), X0),
        Await(("x", 1), Count(2)),
        model(vec(1, 1.5), 3),
        Send((1, 2), ("center", 3), vec(1, 1.5)),
        Await(("x", 3), Count(2)),
        model(vec(2, 1.5), 4),
    ]
    check(sync_center(X0, 3, 0.25, 2, (1, 2)), script, expected, vec(2, 1.5))


# --- asynchronous variants: workers ---------------------------------------------------------------


def test_async_worker_transcript() -> None:
    # η = 0.5, τ = 2: x ← x − d − η g(snapshot), the gradient asked before the answer
    script = Script({("rep", 1): [(CENTER, vec(1, -1))], ("rep", 3): [(CENTER, vec(0.5, 0.5))]})
    expected = [
        model(X0, 1),
        Post((CENTER,), ("req", 1), X0),
        Grad(X0),
        Await(("rep", 1), Count(1)),
        model(vec(-1, 2), 2),
        Grad(vec(-1, 2)),
        model(vec(-0.5, 1), 3),
        Post((CENTER,), ("req", 3), vec(-0.5, 1)),
        Grad(vec(-0.5, 1)),
        Await(("rep", 3), Count(1)),
        model(vec(-0.75, 0), 4),
    ]
    program = elastic_worker(Variant.ASYNC, X0, 3, 0.5, 2, 0.0, CENTER)
    check(program, script, expected, vec(-0.75, 0))


def test_eamsgd_worker_transcript() -> None:
    # η = 0.5, δ = 0.5, τ = 1: v ← δv − η g(snapshot + δv), x ← x − d + v
    script = Script({("rep", 1): [(CENTER, vec(1, -1))], ("rep", 2): [(CENTER, vec(0.5, 0.5))]})
    expected = [
        model(X0, 1),
        Post((CENTER,), ("req", 1), X0),
        Await(("rep", 1), Count(1)),
        Grad(X0),  # v = (0, −1)
        model(vec(-1, 2), 2),
        Post((CENTER,), ("req", 2), vec(-1, 2)),
        Await(("rep", 2), Count(1)),
        Grad(vec(-1, 1.5)),  # the look-ahead point (−1, 2) + 0.5·(0, −1); v = (0.5, −1.25)
        model(vec(-1, 0.25), 3),
    ]
    program = elastic_worker(Variant.EAMSGD, X0, 2, 0.5, 1, 0.5, CENTER)
    check(program, script, expected, vec(-1, 0.25))


def test_downpour_worker_transcript() -> None:
    # η = 0.5, τ = 2: push v and pull x̃ at t = 1 and 3, plain steps between, a final flush
    script = Script(
        {
            ("rep", 1): [(CENTER, vec(4, 4))],
            ("rep", 3): [(CENTER, vec(2, 0))],
            ("rep", 4): [(CENTER, vec(1, 1))],
        }
    )
    expected = [
        model(X0, 1),
        Post((CENTER,), ("req", 1), vec(0, 0)),
        Await(("rep", 1), Count(1)),
        Grad(vec(4, 4)),  # x = (2, 2), v = (−2, −2)
        model(vec(2, 2), 2),
        Grad(vec(2, 2)),  # x = (1, 1), v = (−3, −3)
        model(vec(1, 1), 3),
        Post((CENTER,), ("req", 3), vec(-3, -3)),
        Await(("rep", 3), Count(1)),
        Grad(vec(2, 0)),  # x = (1, 0), v = (−1, 0)
        Post((CENTER,), ("req", 4), vec(-1, 0)),
        Await(("rep", 4), Count(1)),
        model(vec(1, 1), 4),
    ]
    program = elastic_worker(Variant.DOWNPOUR, X0, 3, 0.5, 2, 0.0, CENTER)
    check(program, script, expected, vec(1, 1))


def test_mdownpour_worker_transcript() -> None:
    script = Script({("rep", 1): [(CENTER, vec(1, 1))], ("rep", 2): [(CENTER, vec(3, 0))]})
    expected = [
        model(X0, 1),
        Grad(X0),
        Post((CENTER,), ("req", 1), X0),
        Await(("rep", 1), Count(1)),
        model(vec(1, 1), 2),
        Grad(vec(1, 1)),
        Post((CENTER,), ("req", 2), vec(1, 1)),
        Await(("rep", 2), Count(1)),
        model(vec(3, 0), 3),
    ]
    program = elastic_worker(Variant.MDOWNPOUR, X0, 2, 0.5, 1, 0.9, CENTER)
    check(program, script, expected, vec(3, 0))


# --- asynchronous variants: the center ------------------------------------------------------------


def test_async_center_transcript() -> None:
    # α = 0.25: d = α(x − x̃), x̃ ← x̃ + d, answer d; one letter at a time, in arrival order
    inbox = [
        [Letter(("req", 1), 1, vec(4, 2)), Letter(("req", 1), 2, vec(0, 6))],
        [Letter(("req", 3), 1, vec(4.75, -1))],
    ]
    expected = [
        model(X0, 1),
        Receive(block=True),
        Send((1,), ("rep", 1), vec(1, 0)),
        model(vec(1, 2), 2),
        Send((2,), ("rep", 1), vec(-0.25, 1)),
        model(vec(0.75, 3), 3),
        Receive(block=True),
        Send((1,), ("rep", 3), vec(1, -1)),
        model(vec(1.75, 2), 4),
    ]
    program = elastic_center(Variant.ASYNC, X0, 3, 0.5, 0.25, 0.0)
    check(program, Script(inbox=inbox), expected, vec(1.75, 2))


def test_mdownpour_center_transcript() -> None:
    # η = 0.5, δ = 0.5: v ← δv − ηg, x̃ ← x̃ + δv − ηg, from v = 0
    inbox = [[Letter(("req", 1), 1, vec(2, 2))], [Letter(("req", 1), 2, vec(1, -1))]]
    expected = [
        model(X0, 1),
        Receive(block=True),
        Send((1,), ("rep", 1), vec(-1.5, 0.5)),  # v = (−1, −1)
        model(vec(-1.5, 0.5), 2),
        Receive(block=True),
        Send((2,), ("rep", 1), vec(-2.5, 1)),  # v = (−1, 0)
        model(vec(-2.5, 1), 3),
    ]
    program = elastic_center(Variant.MDOWNPOUR, X0, 2, 0.5, 0.0, 0.5)
    check(program, Script(inbox=inbox), expected, vec(-2.5, 1))


# --- MixML ----------------------------------------------------------------------------------------


def test_averaging_transcript() -> None:
    # η = 0.5, n = 2, period 2, γ = 0.5: x ← (x + mean)/2 after the step of t = 2
    script = Script({("avg", 2): [(0, vec(0, 0.5)), (1, vec(2, 1.5))]})
    expected = [
        model(X0, 1),
        Grad(X0),
        model(vec(0, 1), 2),
        Grad(vec(0, 1)),
        Exchange(("avg", 2), vec(0, 0.5), Count(2)),  # mean (1, 1)
        model(vec(0.5, 0.75), 3),
        Grad(vec(0.5, 0.75)),
        model(vec(0.25, 0.375), 4),
    ]
    check(averaging(X0, 3, 0.5, 2, 2, 0.5), script, expected, vec(0.25, 0.375))


def test_sync_gossip_transcript() -> None:
    # η = 0.5, W row (0.5, 0.25, 0.25): y = x − ηg, then y ← Σ_j W_0j y_j
    script = Script(
        {
            ("gossip", 1): [(2, vec(4, 0)), (1, vec(0, 4))],
            ("gossip", 2): [(1, vec(2, 2)), (2, vec(0, -1))],
        }
    )
    expected = [
        model(X0, 1),
        Grad(X0),
        Send((1, 2), ("gossip", 1), vec(0, 1)),
        Await(("gossip", 1), Count(2)),
        model(vec(1, 1.5), 2),
        Grad(vec(1, 1.5)),
        Send((1, 2), ("gossip", 2), vec(0.5, 0.75)),
        Await(("gossip", 2), Count(2)),
        model(vec(0.75, 0.625), 3),
    ]
    program = sync_gossip(X0, 2, 0.5, 0, {0: 0.5, 1: 0.25, 2: 0.25})
    check(program, script, expected, vec(0.75, 0.625))


def test_async_gossip_without_neighbours_is_sgd() -> None:
    expected = [
        model(X0, 1),
        Grad(X0),
        model(vec(0, 1), 2),
        Grad(vec(0, 1)),
        model(vec(0, 0.5), 3),
        Grad(vec(0, 0.5)),
        model(vec(0, 0.25), 4),
    ]
    program = async_gossip(X0, 3, 0.5, 0, (), np.random.default_rng(0))
    check(program, Script(), expected, vec(0, 0.25))


# --- asynchronous gossip across a restart: messages name incarnations -------------------------


def _gossip(incarnation: int, steps: int = 1) -> Program:
    # one neighbour (1): every request goes to it; η = 0 with gradient x: x stays until averaged
    return async_gossip(
        X0, steps, 0.0, 0, (1,), np.random.default_rng(0), start=1, incarnation=incarnation
    )


def test_a_request_meant_for_an_older_incarnation_is_answered_without_a_move() -> None:
    far = vec(10, 10)
    inbox = [
        [Letter(("pair", 7), 1, far)],  # addressed to incarnation 0, which is gone
        [Letter(("paired", 1), 1, vec(2, 2))],
        [Letter(("bye", 9), 1, far)],
    ]
    effects, out = drive(_gossip(incarnation=3), Script(inbox=inbox))
    posts = [e for e in effects if isinstance(e, Post)]
    assert posts[0].tag == ("rejoined", 3)
    neutral = next(p for p in posts if p.tag == ("paired", 7))
    assert norm(neutral.value) == norm(far)  # its own value back: it does not move either
    # it moved only by its own exchange: half-way to (2, 2) from X0 = (0, 2)
    assert norm(out) == norm(vec(1, 2))
    assert ("bye", 1, 3) in [p.tag for p in posts]  # its bye names its incarnation


def test_a_requester_gives_up_when_it_hears_of_a_newer_incarnation_and_ignores_a_late_bye() -> None:
    inbox = [
        [Letter(("bye", 4), 1, X0)],  # the old incarnation's bye (0), then the news of 5
        [Letter(("rejoined", 5), 1, X0)],
        [Letter(("bye", 4), 1, X0)],  # a late copy of the old bye: ignored
        [Letter(("bye", 9, 5), 1, X0)],  # the new incarnation's bye ends the wait
    ]
    effects, out = drive(_gossip(incarnation=0), Script(inbox=inbox))
    assert norm(out) == norm(X0)  # the request to the old incarnation was given up
    receives = [e for e in effects if isinstance(e, Receive)]
    assert len(receives) == 4  # it waited for the new incarnation's bye
    assert [e.tag for e in effects if isinstance(e, Post)] == [("pair", 1), ("bye", 1)]


def test_a_finished_gossip_process_answers_a_restarted_neighbour() -> None:
    """Finished (its bye said, its neighbour's heard), it stays to answer: a neighbour that
    restarts afterwards has forgotten the bye and may ask for an exchange. A request gets the
    asker's own value back (neither moves), a newer incarnation's note gets the bye again, a
    note of an incarnation already known gets nothing."""
    program = _gossip(incarnation=0)
    inbox = iter(
        [
            (Letter(("paired", 1), 1, vec(2, 2)),),  # its own exchange
            (Letter(("bye", 1), 1, X0),),  # the neighbour's bye: it has finished
            (Letter(("pair", 4, 2), 1, vec(7, 7)),),  # the neighbour restarted (2) and asks
            (Letter(("rejoined", 2), 1, X0),),  # its note: the bye again
            (Letter(("rejoined", 2), 1, X0),),  # known already: nothing
        ]
    )
    effects: list[Any] = []
    program = exact(program)
    effect = next(program)
    while True:
        effects.append(effect)
        if isinstance(effect, Receive):
            letters = next(inbox, None)
            if letters is None:
                break
            effect = program.send(letters)
        else:
            effect = program.send(Script()(effect))
    program.close()  # it would answer forever: closed here, not by the garbage collector
    done_at = next(i for i, e in enumerate(effects) if isinstance(e, Done))
    assert norm(effects[done_at].value) == norm(vec(1, 2))
    posts = [(e.to, e.tag, norm(e.value)) for e in effects[done_at:] if isinstance(e, Post)]
    assert posts == [
        ((1,), ("paired", 4), norm(vec(7, 7))),
        ((1,), ("bye", 1), norm(vec(1, 2))),
    ]
