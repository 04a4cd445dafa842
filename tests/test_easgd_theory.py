"""EASGD quadratic closed forms against the reference table (docs/papers.md).

Table values are checked to the precision they are printed with: a value printed as 0.626047
must lie within half a unit of its last digit. Time index t counts synchronous steps from x̃_0.
"""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest

from peerlearn.analysis import easgd_theory
from peerlearn.analysis.easgd_theory import (
    asymptotic_variance,
    beta_max,
    center_mean,
    center_variance,
    corollary_71_limit,
    double_average_variance,
    drift_matrix,
    propagate_moments,
    roots,
    round_robin_radius,
    stable,
)

# "≈0" entries of the table are not printed to any precision; every one of them is below 1e-9.
NEAR_ZERO = 1e-8


def assert_printed(value: float, printed: str) -> None:
    """``value`` rounds to ``printed`` (plus a hair of slack for the rounding of the rounding)."""
    if printed == "≈0":
        assert abs(value) < NEAR_ZERO, value
        return
    exponent = Decimal(printed).as_tuple().exponent
    assert isinstance(exponent, int)
    half_unit = 0.5 * 10.0**exponent
    assert abs(value - float(printed)) <= half_unit * (1 + 1e-9), (value, printed)


# The reference table (docs/papers.md); x₀ⁱ = x̃₀ = 1, h = 1.
# (p, η, α, σ, γ, φ, E x̃ at 2/10/100, V at 2/10/100, V_∞, p·V_∞, Cor 7.1)
TABLE = [
    (4, 0.1, 0.05, 1.0, "0.92807764", "0.72192236",
     ("0.98", "0.626047", "7.73397e-4"), ("1.0e-4", "0.0040607", "0.00762139"),
     "0.0076213947", "0.0304856", "0.0359231"),
    (10, 0.5, 0.09, 1.0, "0.57907561", "-0.06907561",
     ("0.55", "0.00699334", "≈0"), ("0.02025", "0.0282562", "0.0282575"),
     "0.028257457", "0.282575", "0.301435"),
    (1, 0.5, 0.5, 1.0, "0.80901699", "-0.30901699",
     ("0.75", "0.140625", "7.3e-10"), ("0.0625", "0.117912", "0.12"),
     "0.12", "0.12", "0.185185"),
    (16, 0.1, 0.05625, 10.0, "0.90651970", "0.03723030",
     ("0.91", "0.415079", "6.05e-5"), ("0.050625", "0.251523", "0.304321"),
     "0.30432109", "4.86914", "5.158"),
    (100, 1.0, 0.01, 10.0, "0.09512492", "-0.10512492",
     ("≈0", "≈0", "≈0"), ("1", "1.0002", "1.0002"),
     "1.0002021", "100.02", "100"),
]  # fmt: skip

TABLE_TIMES = (2, 10, 100)


@pytest.mark.parametrize("row", TABLE, ids=[f"p{r[0]}-eta{r[1]}-alpha{r[2]}" for r in TABLE])
def test_spec_table_row(row: tuple[object, ...]) -> None:
    p, eta, alpha, sigma, g_s, f_s, means_s, vars_s, vinf_s, pvinf_s, cor_s = row
    assert isinstance(p, int) and isinstance(eta, float) and isinstance(alpha, float)
    assert isinstance(sigma, float) and isinstance(means_s, tuple) and isinstance(vars_s, tuple)
    gamma, phi = roots(p, eta, alpha)
    assert_printed(gamma, str(g_s))
    assert_printed(phi, str(f_s))
    prop_means, prop_vars = propagate_moments(max(TABLE_TIMES), p, eta, alpha, sigma, 1.0, 1.0)
    for t, m_s, v_s in zip(TABLE_TIMES, means_s, vars_s, strict=True):
        assert_printed(center_mean(t, p, eta, alpha, 1.0, 1.0), m_s)
        assert_printed(center_variance(t, p, eta, alpha, sigma), v_s)
        # each row was derived by exact propagation too
        assert_printed(float(prop_means[t]), m_s)
        assert_printed(float(prop_vars[t]), v_s)
    v_inf = asymptotic_variance(p, eta, alpha, sigma)
    assert_printed(v_inf, str(vinf_s))
    assert_printed(p * v_inf, str(pvinf_s))
    assert_printed(corollary_71_limit(p * alpha, eta, sigma), str(cor_s))


def test_time_indexing_first_steps() -> None:
    # t = 0 is the initial value; with equal starts the center cannot move at step 1, and the
    # first step's worker noise reaches it at t = 2 (row 1: E x̃_2 = 1 + 0.2·(0.9 − 1) = 0.98).
    p, eta, alpha, sigma = 4, 0.1, 0.05, 1.0
    assert center_mean(0, p, eta, alpha, 1.0, 1.0) == 1.0
    assert center_mean(1, p, eta, alpha, 1.0, 1.0) == pytest.approx(1.0, abs=1e-15)
    assert center_mean(2, p, eta, alpha, 1.0, 1.0) == pytest.approx(0.98, abs=1e-15)
    means, variances = propagate_moments(3, p, eta, alpha, sigma, 1.0, 1.0)
    assert means.shape == variances.shape == (4,)
    assert (means[0], variances[0], variances[1]) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("p", "eta", "alpha", "sigma"),
    [(4, 0.1, 0.05, 1.0), (10, 0.5, 0.09, 1.0), (1, 0.5, 0.5, 1.0), (100, 1.0, 0.01, 10.0),
     (16, 0.1, 0.05625, 10.0), (3, 1.7, 0.2, 0.3)],
)  # fmt: skip
def test_variance_after_one_and_two_steps(p: int, eta: float, alpha: float, sigma: float) -> None:
    assert center_variance(0, p, eta, alpha, sigma) == 0.0
    assert center_variance(1, p, eta, alpha, sigma) == 0.0
    v2 = p * alpha**2 * eta**2 * sigma**2
    assert center_variance(2, p, eta, alpha, sigma) == pytest.approx(v2, rel=1e-12)
    assert propagate_moments(2, p, eta, alpha, sigma, 0.0, 0.0)[1][2] == pytest.approx(v2)


# Formula (15)/(16) vs exact propagation: unequal worker starts (u₀ matters), p = 1, unstable
# parameters at finite t, h ≠ 1, and the stability edge φ = −1.
PROPAGATION_CASES = [
    (4, 0.1, 0.05, 1.0, 1.0, [1.0, -2.0, 0.5, 3.0], 0.7, 60),
    (1, 0.5, 0.5, 1.0, 1.0, 1.0, -1.0, 40),
    (7, 0.3, 0.11, 2.0, 0.5, [0.1 * i for i in range(7)], 2.0, 80),
    (5, 0.8, 0.35, 1.0, 1.0, [-1.0, 0.0, 1.0, 2.0, 3.0], 0.0, 30),  # β = 1.75 > β_max = 1.5
    (2, 1.0, 0.5, 1.0, 1.0, [1.0, 0.0], 1.0, 25),  # p = 2, ηh = 1: β = β_max, so φ = −1
    # φ = −1 + 8e-12: the naive geometric sum (φ² − φ^{2t})/(1 − φ²) is off by 2e-9 here
    (4, 1.5, 0.25 * (1 - 1e-11), 1.0, 1.0, 1.0, 1.0, 300),
    (50, 0.02, 0.001, 3.0, 10.0, 1.0, 1.0, 120),
]


@pytest.mark.parametrize(("p", "eta", "alpha", "h", "sigma", "xw", "xc", "T"), PROPAGATION_CASES)
def test_closed_forms_match_exact_propagation(
    p: int, eta: float, alpha: float, h: float, sigma: float, xw: object, xc: float, T: int
) -> None:
    x0_workers = np.asarray(xw, dtype=float)
    means, variances = propagate_moments(T, p, eta, alpha, sigma, x0_workers, xc, h=h)
    scale_m = max(1.0, float(np.max(np.abs(means))))
    scale_v = max(1e-300, float(np.max(variances)))
    for t in range(T + 1):
        m = center_mean(t, p, eta, alpha, x0_workers, xc, h=h)
        v = center_variance(t, p, eta, alpha, sigma, h=h)
        assert m == pytest.approx(means[t], abs=1e-11 * scale_m), t
        assert v == pytest.approx(variances[t], rel=1e-9, abs=1e-12 * scale_v), t


def test_per_eigen_coordinate_formulas_match_multidimensional_propagation() -> None:
    # Lemma 7.3: with A = Q diag(λ) Qᵀ and Σ = Q diag(s²) Qᵀ the system
    # splits into 1-D problems per eigen-coordinate (h → λ_k, σ² → s_k²). Propagate the full
    # n(p+1)-dim system in the original basis and compare the center's moments.
    rng = np.random.default_rng(7)
    n, p, eta, alpha, T = 3, 3, 0.2, 0.07, 40
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.array([0.5, 1.0, 2.5])
    s = np.array([0.3, 1.0, 2.0])
    a_mat = q @ np.diag(lam) @ q.T
    cov_noise = q @ np.diag(s**2) @ q.T
    x0_workers = rng.standard_normal((p, n))
    x0_center = rng.standard_normal(n)

    elastic = np.zeros((p + 1, p + 1))
    elastic[np.arange(p), np.arange(p)] = -alpha
    elastic[:p, p] = alpha
    elastic[p, :p] = alpha
    elastic[p, p] = -p * alpha
    workers = np.diag([1.0] * p + [0.0])
    m_full = np.eye(n * (p + 1)) + np.kron(elastic, np.eye(n)) - eta * np.kron(workers, a_mat)
    noise = eta**2 * np.kron(workers, cov_noise)
    mean = np.concatenate([*x0_workers, x0_center])
    cov = np.zeros((n * (p + 1), n * (p + 1)))
    center = slice(n * p, n * (p + 1))
    for t in range(T + 1):
        w_workers = x0_workers @ q  # row i: worker i in eigen-coordinates
        w_center = q.T @ x0_center
        exp_mean = q @ np.array(
            [
                center_mean(t, p, eta, alpha, w_workers[:, k], w_center[k], h=lam[k])
                for k in range(n)
            ]
        )
        exp_cov = (
            q @ np.diag([center_variance(t, p, eta, alpha, s[k], h=lam[k]) for k in range(n)]) @ q.T
        )
        np.testing.assert_allclose(mean[center], exp_mean, atol=1e-12)
        np.testing.assert_allclose(cov[center, center], exp_cov, atol=1e-12)
        mean = m_full @ mean
        cov = m_full @ cov @ m_full.T + noise


def test_drift_matrix_shape_and_spectrum() -> None:
    p, eta, alpha = 5, 0.3, 0.07
    m = drift_matrix(p, eta, alpha)
    assert m.shape == (p + 1, p + 1)
    np.testing.assert_array_equal(m, m.T)
    gamma, phi = roots(p, eta, alpha)
    # γ, φ plus the p − 1 worker-disagreement modes 1 − α − ηh (eigenvalues of M)
    expected = sorted([gamma, phi] + [1 - alpha - eta] * (p - 1))
    # eigvalsh is backward stable: a few ulps times p + 1, whatever the LAPACK kernel
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(m)), expected, atol=1e-12)


GRID = [(p, eta, alpha) for p in (1, 2, 7, 100) for eta in (0.01, 0.5, 1.9, 2.5)
        for alpha in (0.0, 1e-4, 0.03, 0.4)]  # fmt: skip


@pytest.mark.parametrize(("p", "eta", "alpha"), GRID)
def test_root_identities(p: int, eta: float, alpha: float) -> None:
    h = 1.3
    gamma, phi = roots(p, eta, alpha, h=h)
    a = eta * h + (p + 1) * alpha
    c2 = eta * h * p * alpha
    assert gamma >= phi
    assert gamma + phi == pytest.approx(2 - a, abs=1e-13)
    assert gamma * phi == pytest.approx(1 - a + c2, abs=1e-13)
    assert (1 - gamma) * (1 - phi) == pytest.approx(c2, rel=1e-12, abs=1e-300)


BETA_MAX_TABLE = {
    1: ("0.974359", "0.857143", "0.666667", "0.400000", "0.095238"),
    2: ("1.310345", "1.200000", "1.000000", "0.666667", "0.181818"),
    4: ("1.583333", "1.500000", "1.333333", "1.000000", "0.333333"),
    10: ("1.809524", "1.764706", "1.666667", "1.428571", "0.666667"),
    100: ("1.979167", "1.973684", "1.960784", "1.923077", "1.666667"),
}
ETA_H = (0.1, 0.5, 1.0, 1.5, 1.9)
BETA_MAX_CASES = [(p, eh, printed[j]) for p, printed in BETA_MAX_TABLE.items()
                  for j, eh in enumerate(ETA_H)]  # fmt: skip


@pytest.mark.parametrize(("p", "eta_h", "printed"), BETA_MAX_CASES)
def test_beta_max_table_and_edge(p: int, eta_h: float, printed: str) -> None:
    h = 2.0  # η = ηh/h, so the table must not depend on how ηh is split
    bmax = beta_max(p, eta_h / h, h=h)
    assert_printed(bmax, printed)
    _, phi = roots(p, eta_h / h, bmax / p, h=h)
    assert phi == pytest.approx(-1.0, abs=1e-12)
    for factor, expect in ((0.95, True), (0.999, True), (1.001, False), (1.05, False)):
        assert stable(p, eta_h / h, factor * bmax / p, h=h) is expect, factor


# β = β_max exactly (φ = −1) over 54 (p, ηh): the computed φ lands a few ulps either side of −1
# (−0.9999999999999996 for some), and condition (17) is strict, so each must be unstable.
EDGE = [(p, eh) for p in (1, 2, 3, 4, 5, 7, 10, 16, 100) for eh in (0.1, 0.3, 0.5, 1.0, 1.5, 1.9)]
ULPS = (-8, -1, 0, 1, 8)


def _ulps(x: float, k: int) -> float:
    """x moved by k units in the last place."""
    for _ in range(abs(k)):
        x = float(np.nextafter(x, math.copysign(math.inf, k)))
    return x


@pytest.mark.parametrize(("p", "eta_h"), EDGE)
def test_beta_max_is_unstable_whatever_the_last_bit(
    p: int, eta_h: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha = beta_max(p, eta_h) / p
    assert not stable(p, eta_h, alpha)
    assert asymptotic_variance(p, eta_h, alpha, 1.0) == math.inf
    for shift in ULPS:  # β_max itself a few ulps off
        assert not stable(p, eta_h, _ulps(alpha, shift)), shift
    assert stable(p, eta_h, alpha * (1 - 1e-6))
    assert asymptotic_variance(p, eta_h, alpha * (1 - 1e-6), 1.0) < math.inf
    assert not stable(p, eta_h, alpha * (1 + 1e-6))
    original = easgd_theory.roots
    for shift in ULPS:  # the computed φ a few ulps off, through stable()'s own roots()
        monkeypatch.setattr(
            easgd_theory,
            "roots",
            lambda *a, s=shift: (original(*a)[0], _ulps(original(*a)[1], s)),
        )
        assert not stable(p, eta_h, alpha), shift


def test_stability_needs_positive_rates_and_eta_h_below_two() -> None:
    assert not stable(4, 0.0, 0.1)
    assert not stable(4, 0.1, 0.0)
    assert not stable(100, 2.05, 0.001)
    with pytest.raises(ValueError, match="eta\\*h"):
        beta_max(4, 2.0)
    assert asymptotic_variance(1, 1.0, 1.0, 10.0) == math.inf


@pytest.mark.parametrize(
    ("p", "eta", "alpha", "expected"),
    [
        (4, 0.1, 0.05, {10: "0.0078", 100: "0.18886", 1000: "0.24388", 10000: "0.24939"}),
        (10, 0.5, 0.09, {10: "0.0587", 100: "0.0958", 1000: "0.09958", 10000: "0.099958"}),
    ],
)
def test_lemma_72_double_averaging(
    p: int, eta: float, alpha: float, expected: dict[int, str]
) -> None:
    values = double_average_variance(10000, p, eta, alpha, 1.0)
    assert values.shape == (10001,)
    assert math.isnan(values[0])
    for t, printed in expected.items():
        assert_printed(float(values[t]), printed)
    limit = 1.0 / p  # σ²/(p h²)
    assert abs(values[1000] - limit) < 0.05 * limit  # t ≥ 1000 within 5 %: the gap is O(1/t)
    assert abs(values[10000] - limit) < abs(values[1000] - limit)  # the O(1/t) gap shrinks


def test_lemma_72_matches_full_system_running_sum() -> None:
    # double_average_variance propagates the reduced (y, x̃, S) system; check it against the full
    # (p+1)-dim M with a running-sum coordinate appended.
    p, eta, alpha, sigma, h, T = 5, 0.4, 0.06, 2.0, 1.5, 200
    m = np.zeros((p + 2, p + 2))
    m[: p + 1, : p + 1] = drift_matrix(p, eta, alpha, h=h)
    m[p + 1, p] = 1.0
    m[p + 1, p + 1] = 1.0
    noise = np.diag([(eta * sigma) ** 2] * p + [0.0, 0.0])
    cov = np.zeros((p + 2, p + 2))
    expected = []
    for t in range(1, T + 1):
        cov = m @ cov @ m.T + noise
        expected.append(cov[p + 1, p + 1] / t)
    got = double_average_variance(T, p, eta, alpha, sigma, h=h)
    np.testing.assert_allclose(got[1:], expected, rtol=1e-10)


@pytest.mark.parametrize(
    ("p", "eta_h", "alpha", "printed"),
    [
        (1, 0.5, 0.5, "0.809017"),
        (3, 0.5, 0.5, "0.668089"),
        (8, 0.5, 0.5, "0.576691"),
        (1, 1.0, 0.9, "1.43"),
        (3, 1.0, 0.9, "1.54"),
        (8, 1.0, 0.9, "1.58"),
    ],
)
def test_round_robin_radius(p: int, eta_h: float, alpha: float, printed: str) -> None:
    assert_printed(round_robin_radius(p, eta_h, alpha), printed)


def test_round_robin_p1_is_sync_easgd() -> None:
    for eta_h, alpha in ((0.5, 0.5), (1.0, 0.9), (0.1, 0.05)):
        gamma, phi = roots(1, eta_h, alpha)
        assert round_robin_radius(1, eta_h, alpha) == pytest.approx(max(abs(gamma), abs(phi)))


def _mse(t: int, p: int, eta: float, beta: float, sigma: float = 10.0) -> float:
    alpha = beta / p
    return center_mean(t, p, eta, alpha, 1.0, 1.0) ** 2 + center_variance(t, p, eta, alpha, sigma)


@pytest.mark.parametrize(
    ("p", "eta", "beta", "expected"),
    [
        (1, 0.1, 0.1, {1: "1", 2: "0.9901", 10: "1.164", 100: "1.729", None: "1.729"}),
        (100, 0.1, 0.1, {1: "1", 2: "0.9802", 10: "0.5512", 100: "0.02625", None: "0.02625"}),
        (10000, 0.1, 0.1, {100: "0.000264", None: "0.0002639"}),
        (10, 1.0, 1.0, {None: "10.23"}),
        (100, 1.5, 1.5, {None: "16.51"}),
    ],
)
def test_fig5_mse(p: int, eta: float, beta: float, expected: dict[int | None, str]) -> None:
    # Fig. 5 setting (Section 7.1.1): x̃₀ = x₀ⁱ = 1, h = 1, σ = 10; t = None is t → ∞ (bias → 0).
    assert stable(p, eta, beta / p)
    for t, printed in expected.items():
        value = asymptotic_variance(p, eta, beta / p, 10.0) if t is None else _mse(t, p, eta, beta)
        assert_printed(value, printed)


@pytest.mark.parametrize(("p", "eta_beta"), [(1, 1.0), (10, 1.5)])
def test_fig5_unstable_corners(p: int, eta_beta: float) -> None:
    assert not stable(p, eta_beta, eta_beta / p)
    assert _mse(200, p, eta_beta, eta_beta) > 1e6


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="p >= 1"):
        roots(0, 0.1, 0.1)
    with pytest.raises(ValueError, match="h > 0"):
        drift_matrix(2, 0.1, 0.1, h=0.0)
    with pytest.raises(ValueError, match="t="):
        center_variance(-1, 2, 0.1, 0.1, 1.0)
    with pytest.raises(ValueError):
        center_mean(3, 4, 0.1, 0.05, [1.0, 2.0], 0.0)  # two starts for four workers
