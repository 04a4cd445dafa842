"""The wire messages' validators at their edges: exact bounds, normalization, errors.

``test_wire.py`` covers the codec and one illegal value per rule; this file pins what it leaves
loose, found by mutation testing: every cap accepts its limit and refuses one more, numpy
integers on the slow path of :func:`check_int` at both ends of the range, valid tags kept as
the same object (the fast path), a normalized field stored on every message type, ``Data``
equality on each field, and each error naming its field and its problem.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from peerlearn.wire import (
    Ack,
    Bye,
    Control,
    Data,
    Hello,
    Join,
    LocalProtocolError,
    Message,
    Ping,
    Pong,
    Reason,
    Refuse,
    Welcome,
)
from peerlearn.wire.messages import (
    INT64_MAX,
    INT64_MIN,
    MAX_BODY_DEPTH,
    MAX_REASON,
    MAX_RECIPIENTS,
    MAX_TAG_LEN,
    MAX_TEXT,
    check_int,
    check_tag,
    excerpt,
    same_array,
)

MAX_WORKERS = 2**16


def hello(**change: Any) -> Hello:
    fields: dict[str, Any] = {
        "min_version": 3,
        "max_version": 3,
        "cluster": 0,
        "incarnation": 1,
        "nonce": 2,
        "name": "n",
    }
    return Hello(**(fields | change))


def welcome(**change: Any) -> Welcome:
    fields: dict[str, Any] = {"version": 3, "cluster": 0, "incarnation": 1, "nonce": 2}
    return Welcome(**(fields | change))


def join(**change: Any) -> Join:
    fields: dict[str, Any] = {"workers": (1,), "dim": 3, "dtype": "float64", "fingerprint": "f"}
    return Join(**(fields | change))


def data(**change: Any) -> Data:
    fields: dict[str, Any] = {"seq": 0, "tag": ("p", 1), "sender": 0, "step": 0}
    fields["value"] = np.zeros(2)
    return Data(**(fields | change))


def make(cls: Any, *args: Any) -> object:
    """``cls(*args)``, for arguments of the wrong type."""
    return cls(*args)


def nested(depth: int, wrap: Callable[[object], object]) -> object:
    value: object = 1
    for _ in range(depth):
        value = wrap(value)
    return value


# --- excerpt --------------------------------------------------------------------------------------


@given(st.text(max_size=80) | st.binary(max_size=80) | st.integers())
@example("x" * 58)  # repr is 60 characters: kept whole
@example("x" * 59)  # 61: cut
def test_excerpt_is_the_repr_cut_to_60_characters(value: object) -> None:
    text = repr(value)
    expected = text if len(text) <= 60 else text[:57] + "..."
    assert excerpt(value) == expected
    assert len(excerpt(value)) <= 60


def test_excerpt_appears_in_the_error() -> None:
    with pytest.raises(LocalProtocolError) as info:
        Ack("seven")  # type: ignore[arg-type]
    assert str(info.value) == "seq: expected an int, got str 'seven'"
    assert info.value.reason is Reason.BAD_FIELD


# --- check_int: the slow path (numpy integers) at both ends ---------------------------------------


@pytest.mark.parametrize(("lo", "hi"), [(0, 255), (0, INT64_MAX), (INT64_MIN, INT64_MAX), (5, 5)])
def test_numpy_integers_at_the_bounds_are_accepted(lo: int, hi: int) -> None:
    for number in (lo, hi):
        got = check_int("f", np.int64(number), lo, hi)
        assert got == number and type(got) is int


@pytest.mark.parametrize(("lo", "hi"), [(0, 255), (INT64_MIN + 1, INT64_MAX - 1), (5, 5)])
def test_numpy_integers_just_outside_are_refused(lo: int, hi: int) -> None:
    for number in (lo - 1, hi + 1):
        with pytest.raises(LocalProtocolError, match=rf"^f: {number} out of range \[{lo}, {hi}\]$"):
            check_int("f", np.int64(number), lo, hi)


# --- caps: the limit is accepted, one more is refused ---------------------------------------------


def test_text_caps() -> None:
    assert hello(name="n" * MAX_TEXT)
    assert join(dtype="d" * MAX_TEXT, fingerprint="f" * MAX_TEXT)
    assert Control("c" * MAX_TEXT, {}).name == "c" * MAX_TEXT
    assert Refuse("r" * MAX_REASON).reason == "r" * MAX_REASON
    assert Bye("r" * MAX_REASON).reason == "r" * MAX_REASON
    refused: list[tuple[Callable[[], object], str]] = [
        (lambda: join(dtype="d" * (MAX_TEXT + 1)), "dtype"),
        (lambda: join(fingerprint="f" * (MAX_TEXT + 1)), "fingerprint"),
        (lambda: hello(name="n" * (MAX_TEXT + 1)), "name"),
        (lambda: Control("c" * (MAX_TEXT + 1), {}), "name"),
        (lambda: Refuse("r" * (MAX_REASON + 1)), "reason"),
        (lambda: Bye("r" * (MAX_REASON + 1)), "reason"),
    ]
    for build, name in refused:
        with pytest.raises(LocalProtocolError, match=rf"^{name}: \d+ characters, at most \d+$"):
            build()


def test_sequence_caps() -> None:
    assert len(data(tag=[7] * MAX_TAG_LEN).tag) == MAX_TAG_LEN  # a list: the slow path
    assert len(data(to=list(range(MAX_RECIPIENTS))).to) == MAX_RECIPIENTS
    assert len(join(workers=list(range(MAX_WORKERS))).workers) == MAX_WORKERS
    refused: list[tuple[Callable[[], object], str, int]] = [
        (lambda: data(tag=[7] * (MAX_TAG_LEN + 1)), "tag", MAX_TAG_LEN),
        (lambda: data(to=list(range(MAX_RECIPIENTS + 1))), "to", MAX_RECIPIENTS),
        (lambda: join(workers=list(range(MAX_WORKERS + 1))), "workers", MAX_WORKERS),
    ]
    for build, name, cap in refused:
        with pytest.raises(
            LocalProtocolError, match=rf"^{name}: {cap + 1} elements, at most {cap}$"
        ):
            build()


def test_body_nesting_cap_through_tuples_and_dicts() -> None:
    for wrap in (lambda v: (v,), lambda v: {"k": v}):
        deepest = nested(MAX_BODY_DEPTH - 1, wrap)  # plus the body dict itself: 8 levels
        assert Control("c", {"a": deepest}).body == {"a": deepest}
        with pytest.raises(LocalProtocolError, match=r"^body: nested deeper than 8$"):
            Control("c", {"a": nested(MAX_BODY_DEPTH, wrap)})


# --- tags -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    [
        ("params", 3),
        ("s" * MAX_TEXT, INT64_MIN, INT64_MAX, -1),
        ("x",) * MAX_TAG_LEN,
        (),
    ],
)
def test_a_valid_tag_tuple_is_kept_as_is(tag: tuple[str | int, ...]) -> None:
    assert check_tag(tag) is tag
    assert data(tag=tag).tag is tag


def test_tags_are_normalized_on_the_slow_path() -> None:
    got = check_tag([-1, "a", np.int64(INT64_MIN), np.int32(2)])
    assert got == (-1, "a", INT64_MIN, 2) and all(type(e) in (int, str) for e in got)
    assert check_tag((np.int64(-5),)) == (-5,)


# --- normalization: every message stores its checked fields ---------------------------------------


def test_every_message_stores_normalized_fields() -> None:
    h = hello(
        min_version=np.uint8(2),
        max_version=np.uint8(3),
        cluster=np.int64(3),
        incarnation=np.int64(4),
        nonce=np.int64(5),
    )
    assert (h.min_version, h.max_version, h.cluster, h.incarnation, h.nonce) == (2, 3, 3, 4, 5)
    fields = (h.min_version, h.max_version, h.cluster, h.incarnation, h.nonce)
    assert [type(v) for v in fields] == [int] * 5
    w = welcome(
        version=np.uint8(3), cluster=np.int64(3), incarnation=np.int64(4), nonce=np.int64(5)
    )
    assert (w.version, w.cluster, w.incarnation, w.nonce) == (3, 3, 4, 5)
    assert [type(v) for v in (w.version, w.cluster, w.incarnation, w.nonce)] == [int] * 4
    j = join(workers=[np.int32(4), 5], dim=np.int16(6))
    assert (j.workers, j.dim) == ((4, 5), 6) and type(j.workers) is tuple
    assert [type(v) for v in (j.dim, *j.workers)] == [int] * 3
    singles: list[tuple[Message, str]] = [
        (Ack(np.int64(7)), "seq"),  # type: ignore[arg-type]
        (Ping(np.int64(7)), "nonce"),  # type: ignore[arg-type]
        (Pong(np.int64(7)), "nonce"),  # type: ignore[arg-type]
    ]
    for msg, name in singles:
        value = getattr(msg, name)
        assert value == 7 and type(value) is int, msg
    assert Pong(9).nonce == 9 and Ping(9) == Ping(9) and Pong(8) != Pong(9)


# --- equality -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 1},
        {"tag": ("p", 2)},
        {"sender": 1},
        {"step": 1},
        {"to": (1,)},
        {"post": True},
        {"value": np.ones(2)},
        {"value": np.zeros(2, np.float32)},
        {"value": np.zeros((1, 2))},
    ],
)
def test_data_differing_in_one_field_is_unequal(change: dict[str, Any]) -> None:
    assert data() == data()
    assert data() != replace(data(), **change)
    assert replace(data(), **change) != data()


def test_same_array_needs_the_same_type_shape_and_values() -> None:
    a = np.array([1.0, np.nan])
    assert same_array(a, a.copy()) and same_array(a, a.astype(">f8"))
    assert not same_array(a, a.astype(np.float32))  # equal values, other type
    assert not same_array(a, np.array([2.0, np.nan]))  # same type and shape, other values
    assert not same_array(a, a.reshape(1, 2))


# --- errors name their field and their problem ----------------------------------------------------


@pytest.mark.parametrize(
    ("build", "reason", "message"),
    [
        (
            lambda: make(Hello, "1", 3, 0, 1, 1, "n"),
            Reason.BAD_FIELD,
            "min_version: expected an int",
        ),
        (
            lambda: hello(max_version=256),
            Reason.BAD_FIELD,
            "max_version: 256 out of range [0, 255]",
        ),
        (lambda: hello(min_version=4), Reason.BAD_FIELD, "max_version: 3 below min_version 4"),
        (lambda: hello(cluster=-1), Reason.BAD_FIELD, "cluster: -1 out of range"),
        (lambda: hello(incarnation=-1), Reason.BAD_FIELD, "incarnation: -1 out of range"),
        (lambda: hello(nonce=2**63), Reason.BAD_FIELD, "nonce: 9223372036854775808 out of range"),
        (lambda: hello(name=b"n"), Reason.BAD_FIELD, "name: expected a str, got bytes b'n'"),
        (lambda: hello(mac="m"), Reason.BAD_FIELD, "mac: expected bytes, got str 'm'"),
        (lambda: hello(mac=b"m" * 65), Reason.BAD_FIELD, "mac: 65 bytes, at most 64"),
        (lambda: welcome(version=256), Reason.BAD_FIELD, "version: 256 out of range [0, 255]"),
        (lambda: welcome(cluster=-1), Reason.BAD_FIELD, "cluster: -1 out of range"),
        (lambda: welcome(incarnation=-1), Reason.BAD_FIELD, "incarnation: -1 out of range"),
        (lambda: welcome(nonce=-1), Reason.BAD_FIELD, "nonce: -1 out of range"),
        (lambda: welcome(mac=bytearray(b"m")), Reason.BAD_FIELD, "mac: expected bytes"),
        (lambda: join(dim=1.0), Reason.BAD_FIELD, "dim: expected an int, got float 1.0"),
        (lambda: join(dtype=1), Reason.BAD_FIELD, "dtype: expected a str, got int 1"),
        (lambda: join(fingerprint=None), Reason.BAD_FIELD, "fingerprint: expected a str"),
        (lambda: join(workers=3), Reason.BAD_FIELD, "workers: expected a tuple, got int 3"),
        (lambda: join(workers=(1, "2")), Reason.BAD_FIELD, "workers element: expected an int"),
        (
            lambda: join(workers=(2, 1, 2)),
            Reason.BAD_FIELD,
            "workers: duplicate process ids in (2, 1, 2)",
        ),
        (lambda: make(Refuse, 1), Reason.BAD_FIELD, "reason: expected a str, got int 1"),
        (lambda: make(Bye, None), Reason.BAD_FIELD, "reason: expected a str, got NoneType None"),
        (lambda: Ack(-1), Reason.BAD_FIELD, "seq: -1 out of range"),
        (lambda: Ping(-1), Reason.BAD_FIELD, "nonce: -1 out of range"),
        (lambda: Pong(2**63), Reason.BAD_FIELD, "nonce: 9223372036854775808 out of range"),
        (lambda: data(seq=-1), Reason.BAD_FIELD, "seq: -1 out of range"),
        (lambda: data(sender=-1), Reason.BAD_FIELD, "sender: -1 out of range"),
        (lambda: data(step=-1), Reason.BAD_FIELD, "step: -1 out of range"),
        (lambda: data(post=0), Reason.BAD_FIELD, "post: expected a bool, got int 0"),
        (lambda: data(tag="p"), Reason.BAD_FIELD, "tag: expected a tuple, got str 'p'"),
        (lambda: data(tag=("p", 1.5)), Reason.BAD_FIELD, "tag element: expected an int, got float"),
        (
            lambda: data(tag=("p" * 257,)),
            Reason.BAD_FIELD,
            "tag element: 257 characters, at most 256",
        ),
        (
            lambda: data(tag=(2**63,)),
            Reason.BAD_FIELD,
            "tag element: 9223372036854775808 out of range",
        ),
        (lambda: data(to=5), Reason.BAD_FIELD, "to: expected a tuple, got int 5"),
        (lambda: data(to=(0, -1)), Reason.BAD_FIELD, "to element: -1 out of range"),
        (lambda: data(to=(3, 3)), Reason.BAD_FIELD, "to: duplicate process ids in (3, 3)"),
        (lambda: data(value=[0.0]), Reason.BAD_DTYPE, "value: expected a numpy array, got list"),
        (
            lambda: data(value=np.zeros(1, np.int8)),
            Reason.BAD_DTYPE,
            "value: dtype int8 not supported",
        ),
        (
            lambda: data(value=np.zeros((1,) * 5)),
            Reason.BAD_SHAPE,
            "value: 5 dimensions, at most 4",
        ),
        (lambda: make(Control, None, {}), Reason.BAD_FIELD, "name: expected a str, got NoneType"),
        (
            lambda: make(Control, "c", [("a", 1)]),
            Reason.BAD_FIELD,
            "body: expected a dict, got list",
        ),
        (
            lambda: make(Control, "c", {1: 2}),
            Reason.BAD_FIELD,
            "body key: expected a str, got int 1",
        ),
        (
            lambda: Control("c", {"a": 2**63}),
            Reason.BAD_FIELD,
            "body int: 9223372036854775808 out of",
        ),
        (lambda: Control("c", {"a": {1.5j}}), Reason.BAD_FIELD, "body: cannot carry a set {1.5j}"),
    ],
)
def test_errors_name_the_field_and_the_problem(
    build: Callable[[], object], reason: Reason, message: str
) -> None:
    with pytest.raises(LocalProtocolError, match="^" + re.escape(message)) as info:
        build()
    assert info.value.reason is reason
