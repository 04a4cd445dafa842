"""MidExt / ApproachExt and round counts (Attiya–Schiller Section 4.1, App. A.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import peerlearn.algorithms.aggregate as aggregate
from peerlearn import ties
from peerlearn.algorithms import Aggregator, approach_ext, diam2, maa_rounds, mid_ext, rounds_for
from peerlearn.algorithms import vectors as vec

from .helpers import barycentric


def test_mid_ext_is_midpoint_of_farthest_pair() -> None:
    xs = [np.array([0.0, 0.0]), np.array([1.0, 0.0]), np.array([4.0, 3.0])]
    np.testing.assert_allclose(mid_ext(xs), [2.0, 1.5])


def test_mid_ext_single_value_is_identity() -> None:
    x = np.array([3.0, -1.0])
    assert mid_ext([x]) is x


def test_approach_ext_moves_halfway_to_farthest_from_own() -> None:
    own = np.array([1.0, 0.0])
    xs = [own, np.array([0.0, 0.0]), np.array([-3.0, 0.0])]
    np.testing.assert_allclose(approach_ext(xs, own), [-1.0, 0.0])


def test_diam2_is_squared() -> None:
    assert diam2([np.zeros(3), np.array([1.0, 2.0, 2.0])]) == pytest.approx(9.0)
    assert diam2([np.zeros(3)]) == 0.0


@pytest.mark.parametrize(
    ("q", "agg", "expected"),
    [
        (0.25, Aggregator.MIDEXT, (33, 14)),  # Alg 3: q = 1/4 → 33 rounds, 14 SMMAA rounds
        (0.25, Aggregator.APPROACHEXT, (111, 73)),  # Lemma 20: 111 outer, 73 inner
        (math.sqrt(4 / 64) / 4, Aggregator.MIDEXT, (66, 14)),  # Lemma 22 samples: N=4, T=64
        (math.sqrt(4 / 256) / 4, Aggregator.MIDEXT, (82, 14)),
        (math.sqrt(4 / 1024) / 4, Aggregator.MIDEXT, (98, 14)),
        (math.sqrt(1 / 64) / 4, Aggregator.MIDEXT, (82, 14)),
    ],
)
def test_round_counts_match_spec(q: float, agg: Aggregator, expected: tuple[int, int]) -> None:
    assert maa_rounds(q, agg) == expected


def test_smmaa_round_counts() -> None:
    assert rounds_for(1 / 6, 7 / 8) == 14  # Lemma 16
    assert rounds_for(1 / 6, 31 / 32) == 57
    assert rounds_for(1 / 10, 7 / 8) == 18
    assert rounds_for(1 / 10, 31 / 32) == 73
    assert rounds_for(1.0, 7 / 8) == 0
    with pytest.raises(ValueError, match="q must be"):
        rounds_for(0.0, 7 / 8)


vectors = st.integers(2, 8).flatmap(
    lambda k: arrays(np.float64, (k, 10), elements=st.floats(-1e3, 1e3, allow_nan=False))
)


@settings(max_examples=200, deadline=None)
@given(vectors)
def test_aggregates_stay_in_convex_hull(points: np.ndarray) -> None:
    """Both rules output convex combinations of their inputs (the validity of MAA)."""
    pts = points + np.random.default_rng(0).normal(0, 1e-3, points.shape)  # affinely independent
    for y in (mid_ext(list(pts)), approach_ext(list(pts), pts[0])):
        w, resid = barycentric(pts, y)
        scale = 1.0 + float(np.abs(pts).max())
        assert resid < 1e-6 * scale
        assert w.min() > -1e-6


# --- from `make mutate` (docs/testing.md): mutants of aggregate.py the tests above let live ---


def test_mid_ext_diam2_reports_the_diameter_it_used() -> None:
    """The diameter feeds the `agreement_spread` report: 0 for one value, diam² otherwise."""
    from peerlearn.algorithms.aggregate import mid_ext_diam2

    x = np.array([3.0, -1.0])
    mid, spread = mid_ext_diam2([x])
    assert mid is x and spread == 0.0
    xs = [np.array([0.0, 0.0]), np.array([1.0, 0.0]), np.array([4.0, 3.0])]
    mid, spread = mid_ext_diam2(xs)
    np.testing.assert_allclose(mid, [2.0, 1.5])
    assert spread == pytest.approx(diam2(xs)) and spread == pytest.approx(25.0)


@pytest.mark.parametrize("q", [1.0 + 1e-9, 1.5, 2.0])
def test_rounds_for_rejects_a_target_above_one(q: float) -> None:
    with pytest.raises(ValueError, match="q must be"):
        rounds_for(q, 7 / 8)


@pytest.mark.parametrize(("factor", "k"), [(0.5, 3), (7 / 8, 2), (7 / 8, 14), (23 / 24, 5)])
def test_rounds_for_at_an_exact_power_needs_exactly_k_rounds(factor: float, k: int) -> None:
    """q = factor^k is reached after k rounds, not k + 1 (the tolerance must round down)."""
    assert rounds_for(factor**k, factor) == k


@pytest.mark.parametrize("k", [1, 3, 14, 57, 103])
@pytest.mark.parametrize("ulps", [-4, -1, 0, 1, 4])
def test_ceil_counts_a_few_ulps_from_an_integer_as_the_integer(k: int, ulps: int) -> None:
    """The tie rule's ceiling: rounding on either side of k gives k on every machine, and a
    value clearly past k gives k + 1."""
    x = float(k)
    for _ in range(abs(ulps)):
        x = float(np.nextafter(x, np.inf if ulps > 0 else -np.inf))
    assert ties.ceil(x) == k
    assert ties.ceil(k + 1e-6) == k + 1 and ties.ceil(k - 1e-6) == k


def test_diam2_over_many_values_goes_in_blocks_and_finds_the_same_pair(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over thousands of values (the simulator's report) diam2 takes a block of rows at a time
    rather than n²·d differences at once; each distance is computed as before, so the maximum
    is the same number."""
    values = list(np.random.default_rng(5).standard_normal((300, 7)))
    whole = diam2(values)
    monkeypatch.setattr(aggregate, "_BLOCK_ELEMENTS", 7 * 300 * 16)  # 16 rows a block
    assert diam2(values) == whole
    monkeypatch.setattr(aggregate, "_BLOCK_ELEMENTS", 1)  # one row a block
    assert diam2(values) == whole
    values[150] = np.full(7, np.nan)  # a NaN is the answer, as unblocked
    assert np.isnan(diam2(values))


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 7),
    d=st.integers(1, 300),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_average_is_np_mean_bit_for_bit(k: int, d: int, dtype: type, seed: int) -> None:
    """Alg 1's and the all-reduce family's average skips np.mean's stacked copy, yet computes
    the same sums in the same order: the same bits, so runs are unchanged per seed."""
    rng = np.random.default_rng(seed)
    values = [(rng.standard_normal(d) * 10 ** rng.uniform(-4, 4)).astype(dtype) for _ in range(k)]
    for v in values:
        v.flags.writeable = False  # (received values are read-only: a new array comes back)
    got = vec.average(values)
    want = np.mean(values, axis=0)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(got, want)
    assert not any(np.shares_memory(got, v) for v in values)


def test_average_of_fewer_than_two_is_refused() -> None:
    with pytest.raises(ValueError, match="two or more"):
        vec.average([np.zeros(3)])


@settings(max_examples=100, deadline=None)
@given(
    d=st.integers(1, 300),
    dtype=st.sampled_from([np.float32, np.float64]),
    g_dtype=st.sampled_from([np.float32, np.float64]),
    eta=st.one_of(
        st.floats(-1e3, 1e3, allow_nan=False),
        st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.05]),
    ),
    numpy_eta=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_descend_is_x_minus_eta_g_bit_for_bit(
    d: int, dtype: type, g_dtype: type, eta: float, numpy_eta: bool, seed: int
) -> None:
    """Every algorithm's step x − η·g with one temporary fewer gives the very same bits and
    dtype, for either dtype of the model and of the gradient (a user's problem may mix them),
    a Python or a numpy η (which may promote float32), huge and tiny ones (overflow to ±inf,
    underflow to ±0 alike), and leaves x and g as they were."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(d) * 10 ** rng.uniform(-4, 4)).astype(dtype)
    g = (rng.standard_normal(d) * 10 ** rng.uniform(-4, 4)).astype(g_dtype)
    x.flags.writeable = g.flags.writeable = False
    step = np.float64(eta) if numpy_eta else eta
    with np.errstate(all="ignore"):
        want = x - step * g
        got = vec.descend(x, step, g)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # the bits, ±0 too
