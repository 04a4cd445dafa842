"""The small pure helpers of effects.py and ties.py, pinned exactly.

``quiet_float_errors`` silences exactly overflow, invalid value and divide by zero, whatever the
surrounding numpy error state; the quorum rules count ``⌊m/2⌋ + 1`` clusters with integer
division and never release an ``AtLeast`` early; ``compare`` returns exactly −1, 0 or 1, with
the tie band relative (``TIE_RTOL·max(|a|, |b|)``) and closed (a difference of exactly the band,
and 0 vs 0, tie); ``tag_text`` is how log lines show a tag.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerlearn.effects import (
    AtLeast,
    MajorityOfClusters,
    Msg,
    quiet_float_errors,
    quorum_need,
    quorum_take,
    tag_text,
)
from peerlearn.ties import TIE_RTOL, at_most, below, compare

# --- quiet_float_errors ---------------------------------------------------------------------------


def test_quiet_float_errors_silences_exactly_the_three_errors_even_inside_raise() -> None:
    with np.errstate(all="raise"), quiet_float_errors():
        state = np.geterr()
        assert (state["over"], state["invalid"], state["divide"]) == ("ignore",) * 3
        big = np.array([1e308])
        zero = np.array([0.0])
        assert np.isinf(big * 10.0).all()  # overflow
        assert np.isnan(zero / zero).all()  # invalid
        assert np.isinf(np.array([1.0]) / zero).all()  # divide by zero


# --- quorums --------------------------------------------------------------------------------------


def _box(senders: list[int]) -> list[Msg]:
    return [Msg(s, np.zeros(1)) for s in senders]


@given(st.integers(min_value=1, max_value=1000))
def test_majority_of_clusters_needs_floor_half_plus_one(clusters: int) -> None:
    need = quorum_need(MajorityOfClusters(), clusters)
    assert type(need) is int
    assert need == clusters // 2 + 1


@pytest.mark.parametrize(("clusters", "need"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)])
def test_majority_of_clusters_take_holds_at_exactly_floor_half_plus_one(
    clusters: int, need: int
) -> None:
    cluster_of = list(range(clusters))  # one process per cluster
    short = _box(list(range(need - 1)))
    assert quorum_take(MajorityOfClusters(), short, cluster_of, clusters) is None
    box = _box(list(range(need)))
    assert quorum_take(MajorityOfClusters(), box, cluster_of, clusters) == tuple(box)


@given(st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=8))
def test_at_least_holds_only_once_n_senders_are_in(need: int, have: int) -> None:
    box = _box(list(range(have)))
    taken = quorum_take(AtLeast(need), box, list(range(8)), 8)
    assert taken == (tuple(box) if have >= need else None)


# --- ties.compare ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        (1.0, 2.0, -1),
        (2.0, 1.0, 1),
        (-3.0, 5.0, -1),
        (5.0, -3.0, 1),
        (1.0, 1.0, 0),
        (0.0, 0.0, 0),  # a band of width 0 still ties identical values: the band is closed
        (-0.0, 0.0, 0),
    ],
)
def test_compare_is_exactly_minus_one_zero_or_one(a: float, b: float, want: int) -> None:
    assert compare(a, b) == want


def test_compare_ties_at_exactly_the_band_edge() -> None:
    # 1e9 and 1e9 − 1 differ by exactly 1.0, and the band TIE_RTOL·1e9 rounds to exactly 1.0 as
    # well (checked), so only a closed band (≤) ties them; one ulp further out they order
    a, b = 1e9 - 1.0, 1e9
    assert b - a == 1.0
    assert TIE_RTOL * b == 1.0
    assert compare(a, b) == 0
    assert compare(b, a) == 0
    assert at_most(b, a)
    a_out = np.nextafter(a, 0.0)
    assert compare(float(a_out), b) == -1
    assert compare(b, float(a_out)) == 1


@given(
    st.floats(min_value=1e3, max_value=1e12),
    st.floats(min_value=-0.9, max_value=0.9),
)
def test_compare_band_is_relative_to_the_larger_magnitude(x: float, frac: float) -> None:
    # within 0.9·TIE_RTOL relative of each other: a tie at any magnitude, also far above 1
    y = x * (1.0 + frac * TIE_RTOL)
    assert compare(x, y) == 0
    assert compare(-x, -y) == 0
    assert at_most(x, y)
    assert not below(x, y)


@given(st.floats(min_value=1e3, max_value=1e12), st.floats(min_value=1.5, max_value=100.0))
def test_compare_outside_the_band_orders(x: float, k: float) -> None:
    y = x * (1.0 + k * TIE_RTOL)
    assert compare(x, y) == -1
    assert compare(y, x) == 1
    assert below(x, y)
    assert not at_most(y, x)


# --- tag_text -------------------------------------------------------------------------------------


def test_tag_text_joins_the_parts_with_one_space() -> None:
    assert tag_text(("params", 12)) == "params 12"
    assert tag_text(("grad",)) == "grad"
    assert tag_text(()) == ""
