"""Closed forms for synchronous EASGD on a 1-D quadratic (EASGD supplement, Section 7.1).

Model (eqs. (14), (18), (19)): worker i sees g = h·x − b − ξ with ξ ~ (0, σ²) i.i.d. per worker per
step; p workers update in lock-step with constant η and moving rate α, the center with β = pα.
Every function works in coordinates centered at x* = b/h, so pass ``x0 − x*``, not ``x0``.

Time indexing (the one of the table in tests/test_easgd_theory.py): t counts synchronous
steps, ``x̃_0`` is the initial center, and step t → t+1 reads only time-t values (eqs. (18)–(19)).
With equal initial values x̃_1 = x̃_0, and noise drawn at step 0 reaches the center first at
t = 2, so V[x̃_0] = V[x̃_1] = 0 and V[x̃_2] = pα²η²σ². Row 1 of the table (p=4, η=0.1, α=0.05,
x₀=1): E x̃_2 = 1 + β·(0.9 − 1) = 0.98. Arrays indexed by t have length T + 1 and hold t = 0..T.

Sources, all in the supplement's Section 7: the drift matrix M (proof of Lemma 7.1), Lemma 7.1
with eqs. (15)/(16) and a, c², γ, φ, stability condition (17) (Section 7.1.2), V_∞ (proof of
Corollary 7.1), Corollary 7.1, Lemma 7.2 (Section 7.2). The round-robin map is our reconstruction
of the main paper's asynchronous EASGD (its Algorithm 1), which the supplement does not analyse:
it only says the analysis is "similar" (after Lemma 7.1).

Everything is plain numpy on floats; nothing here simulates the algorithm programs, so Monte-Carlo
tests of those can compare against these numbers.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from peerlearn.ties import compare

__all__ = [
    "asymptotic_variance",
    "beta_max",
    "center_mean",
    "center_variance",
    "corollary_71_limit",
    "double_average_variance",
    "drift_matrix",
    "propagate_moments",
    "roots",
    "round_robin_radius",
    "stable",
]

FloatArray = npt.NDArray[np.float64]


def _check(p: int, eta: float, alpha: float, h: float) -> None:
    if p < 1:
        raise ValueError(f"need p >= 1 workers, got p={p}")
    if h <= 0:
        raise ValueError(f"the quadratic needs curvature h > 0, got h={h}")
    if eta < 0 or alpha < 0:
        raise ValueError(f"need eta >= 0 and alpha >= 0, got eta={eta}, alpha={alpha}")


def _check_t(name: str, t: int) -> None:
    if t < 0:
        raise ValueError(f"{name} counts steps from 0, got {name}={t}")


def roots(p: int, eta: float, alpha: float, h: float = 1.0) -> tuple[float, float]:
    """γ and φ of Lemma 7.1, γ ≥ φ.

    Args:
        p: number of workers.
        eta: learning rate η.
        alpha: moving rate α (β = pα).
        h: curvature of the quadratic.

    Returns:
        (γ, φ), the roots of λ² − (2 − a)λ + (1 − a + c²) with a = ηh + (p+1)α, c² = ηh·pα.
    """
    _check(p, eta, alpha, h)
    eh, beta = eta * h, p * alpha
    a = eh + beta + alpha
    c2 = eh * beta
    # a² − 4c² written as a sum of non-negative terms: no cancellation, never negative.
    s = math.sqrt((eh - beta) ** 2 + 2 * alpha * (eh + beta) + alpha**2)
    if a + s == 0:  # η = α = 0: M is the identity
        return 1.0, 1.0
    # 1 − γ = (a − s)/2 cancels when c² ≪ a²; (a − s)(a + s) = 4c² gives the same value exactly.
    gamma = 1.0 - 2.0 * c2 / (a + s)
    phi = 1.0 - (a + s) / 2.0
    return gamma, phi


def drift_matrix(p: int, eta: float, alpha: float, h: float = 1.0) -> FloatArray:
    """The symmetric (p+1)×(p+1) drift matrix M on (x¹…x^p, x̃) − x* (proof of Lemma 7.1).

    One synchronous step is x_{t+1} = M x_t + (ηξ¹_t, …, ηξ^p_t, 0).
    """
    _check(p, eta, alpha, h)
    m = np.zeros((p + 1, p + 1))
    m[np.arange(p), np.arange(p)] = 1.0 - alpha - eta * h
    m[:p, p] = alpha
    m[p, :p] = alpha
    m[p, p] = 1.0 - p * alpha
    return m


def _workers(x0_workers: npt.ArrayLike, p: int) -> FloatArray:
    x: FloatArray = np.broadcast_to(np.asarray(x0_workers, dtype=np.float64), (p,)).copy()
    return x


def center_mean(
    t: int,
    p: int,
    eta: float,
    alpha: float,
    x0_workers: npt.ArrayLike,
    x0_center: float,
    h: float = 1.0,
) -> float:
    """E[x̃_t − x*] by eq. (15): γ^t x̃₀ + (γ^t − φ^t)/(γ − φ) · α u₀.

    Args:
        t: step count, t = 0 is the initial value.
        p, eta, alpha, h: as in :func:`roots`.
        x0_workers: x₀ⁱ − x*, a scalar (all workers equal) or p values.
        x0_center: x̃₀ − x*.

    Returns:
        The center's mean offset from x* after t synchronous steps.
    """
    _check_t("t", t)
    gamma, phi = roots(p, eta, alpha, h)
    x0 = _workers(x0_workers, p)
    if alpha == 0:  # the center is never pulled anywhere
        return float(x0_center)
    # u₀ = Σ_i (x₀ⁱ − α/(1 − pα − φ)·x̃₀) (Lemma 7.1). Both 1 − pα − φ and 1 − α − ηh − φ are ≥ 0 and
    # their product is pα², so divide by the larger one: the smaller may have cancelled.
    g_center = 1.0 - p * alpha - phi
    g_worker = 1.0 - alpha - eta * h - phi
    ratio = alpha / g_center if g_center >= g_worker else g_worker / (p * alpha)
    u0 = float(np.sum(x0)) - p * ratio * x0_center
    # γ > φ whenever α > 0 (a² − 4c² ≥ α² > 0), so the divided difference is well defined.
    gt, ft = _pow(gamma, t), _pow(phi, t)
    return float(gt * x0_center + (gt - ft) / (gamma - phi) * alpha * u0)


def _pow(x: float, t: int) -> float:
    """x**t that saturates to ±inf instead of raising (unstable parameters at large t)."""
    try:
        return x**t
    except OverflowError:
        return -math.inf if x < 0 and t % 2 else math.inf


def _geom(r: float, t: int) -> float:
    """Σ_{k=1}^{t−1} r^k, accurate also for r next to 1 (φ² at the stability edge φ = −1)."""
    if r == 1.0:
        return float(t - 1)
    if r > 0.0:
        # (r − r^t)/(1 − r) loses every digit when 1 − r ~ 1e-16; expm1 keeps them (1 − r is exact).
        try:
            return -r * math.expm1((t - 1) * math.log(r)) / (1.0 - r)
        except OverflowError:
            return math.inf
    return (r - _pow(r, t)) / (1.0 - r)  # r ≤ 0: |1 − r| ≥ 1, nothing cancels


def center_variance(
    t: int, p: int, eta: float, alpha: float, sigma: float, h: float = 1.0
) -> float:
    """V[x̃_t] by eq. (16); σ² is the per-worker, per-step gradient-noise variance.

    Each bracket term of (16) is a geometric sum Σ_{k=1}^{t−1} r^k, so V[x̃_0] = V[x̃_1] = 0 and
    V[x̃_2] = pα²η²σ². Valid for any t, also outside region (17) (it then grows without bound).
    When γ − φ is tiny (α and ηh both tiny) the bracket cancels; use :func:`propagate_moments`.
    """
    _check_t("t", t)
    gamma, phi = roots(p, eta, alpha, h)
    if alpha == 0 or eta == 0 or t <= 1:
        return 0.0
    bracket = _geom(gamma**2, t) + _geom(phi**2, t) - 2.0 * _geom(gamma * phi, t)
    return p**2 * alpha**2 * eta**2 / (gamma - phi) ** 2 * bracket * sigma**2 / p


def asymptotic_variance(p: int, eta: float, alpha: float, sigma: float, h: float = 1.0) -> float:
    """V_∞ = β²η²/((1−γ²)(1−φ²)) · (1+γφ)/(1−γφ) · σ²/p (proof of Corollary 7.1).

    Returns ``math.inf`` outside region (17) and 0.0 when α = 0 or η = 0 (no noise reaches x̃).
    """
    gamma, phi = roots(p, eta, alpha, h)
    if alpha == 0 or eta == 0:
        return 0.0
    if not stable(p, eta, alpha, h):
        return math.inf
    beta = p * alpha
    return (
        beta**2
        * eta**2
        / ((1 - gamma**2) * (1 - phi**2))
        * (1 + gamma * phi)
        / (1 - gamma * phi)
        * sigma**2
        / p
    )


def corollary_71_limit(beta: float, eta: float, sigma: float, h: float = 1.0) -> float:
    """lim_p lim_t p·E[(x̃_t − x*)²] with β fixed (Corollary 7.1).

    βηh/((2−β)(2−ηh)) · (2 − β − ηh + βηh)/(β + ηh − βηh) · σ²/h².
    """
    eh = eta * h
    return (
        beta * eh / ((2 - beta) * (2 - eh)) * (2 - beta - eh + beta * eh) / (beta + eh - beta * eh)
    ) * (sigma**2 / h**2)


def propagate_moments(
    T: int,
    p: int,
    eta: float,
    alpha: float,
    sigma: float,
    x0_workers: npt.ArrayLike,
    x0_center: float,
    h: float = 1.0,
) -> tuple[FloatArray, FloatArray]:
    """The center's mean and variance for t = 0..T by exact propagation, not by (15)/(16).

    m_{t+1} = M m_t and C_{t+1} = M C_t Mᵀ + η²σ²·diag(1,…,1,0) on the full (p+1)-dim state, so
    this checks the eigen-decomposition behind Lemma 7.1 independently. Cost O(T·p³).

    Args:
        T: last step.
        x0_workers, x0_center: initial offsets from x*, as in :func:`center_mean`.

    Returns:
        (means, variances), each of shape (T+1,), indexed by t.
    """
    _check_t("T", T)
    m = drift_matrix(p, eta, alpha, h)
    mean = np.append(_workers(x0_workers, p), float(x0_center))
    cov = np.zeros((p + 1, p + 1))
    noise = np.diag(np.append(np.full(p, (eta * sigma) ** 2), 0.0))
    means = np.empty(T + 1)
    variances = np.empty(T + 1)
    for t in range(T + 1):
        means[t] = mean[p]
        variances[t] = cov[p, p]
        mean = m @ mean
        cov = m @ cov @ m.T + noise
    return means, variances


def stable(p: int, eta: float, alpha: float, h: float = 1.0) -> bool:
    """Condition (17): −1 < φ < γ < 1, strict.

    γ < 1 ⇔ ηh > 0 and α > 0 (Section 7.1.2), and then φ < γ (γ − φ = √(a² − 4c²) ≥ α > 0): both are
    decided exactly. φ > −1 is decided with the tie rule of :mod:`peerlearn.ties`: at β =
    :func:`beta_max`, where φ = −1 exactly, the computed φ lands a few ulps either side of −1
    (−0.9999999999999996 for about a quarter of (p, ηh)), and a φ equal to −1 up to rounding fails
    the strict condition. This is the only stability test: :func:`asymptotic_variance` and the
    config warning (``peerlearn.config``) both call it.
    """
    _check(p, eta, alpha, h)
    _, phi = roots(p, eta, alpha, h)
    return eta * h > 0 and alpha > 0 and compare(phi, -1.0) > 0


def beta_max(p: int, eta: float, h: float = 1.0) -> float:
    """Sup of the stable β = pα for fixed p and ηh: 2(2 − ηh)/((2 − ηh) + 2/p).

    It solves the product condition (2 − ηh)(2 − β) > 2β/p of (17) for β. With u = 2 − ηh ∈ (0, 2)
    the sum condition (2 − ηh) + (2 − β) > β/p allows β < (2 + u)p/(p + 1), which is never below
    this bound (the difference reduces to 4 + u²p ≥ 0), so the product condition is the binding one.
    The stable set is 0 < β < beta_max, and φ = −1 at β = beta_max (which :func:`stable` counts
    as unstable, also when rounding puts the computed φ just above −1).

    Raises:
        ValueError: unless 0 < ηh < 2; outside it no β > 0 is stable.
    """
    _check(p, eta, 0.0, h)
    u = 2.0 - eta * h
    if not 0.0 < u < 2.0:
        raise ValueError(f"no stable beta unless 0 < eta*h < 2, got eta*h={eta * h}")
    return 2.0 * u / (u + 2.0 / p)


def double_average_variance(
    T: int, p: int, eta: float, alpha: float, sigma: float, h: float = 1.0
) -> FloatArray:
    """t·V[z_t] for t = 0..T, z_t = (1/t) Σ_{k=0}^{t−1} x̃_k (eq. 26), by exact propagation.

    Lemma 7.2: the values tend to σ²/(p h²) inside region (17), with an O(1/t) gap.
    Entry 0 is NaN (z_0 is an empty average). Initial values are irrelevant: they only shift the
    mean.

    The propagated state is (y, x̃, S) with y the worker average and S_t = Σ_{k<t} x̃_k: x̃ sees
    the workers only through y (eq. (19)), and y's noise is ηξ̄ with variance η²σ²/p (eq. (42)), so
    this is exact while costing O(T) instead of O(T·p³).
    """
    _check_t("T", T)
    _check(p, eta, alpha, h)
    beta = p * alpha
    m = np.array(
        [
            [1.0 - alpha - eta * h, alpha, 0.0],
            [beta, 1.0 - beta, 0.0],
            [0.0, 1.0, 1.0],
        ]
    )
    noise = np.diag([(eta * sigma) ** 2 / p, 0.0, 0.0])
    cov = np.zeros((3, 3))
    out = np.empty(T + 1)
    out[0] = math.nan
    for t in range(1, T + 1):
        cov = m @ cov @ m.T + noise
        out[t] = cov[2, 2] / t
    return out


def round_robin_radius(p: int, eta_h: float, alpha: float) -> float:
    """Spectral radius of one round (p ticks) of round-robin async EASGD, τ = 1, 1-D quadratic.

    Worker i is active at ticks ≡ i (mod p). Its tick is the main paper's Algorithm 1 on the
    snapshot x = xⁱ: xⁱ ← xⁱ − α(x − x̃) − ηh·x and x̃ ← x̃ + α(x − x̃), the gradient taken at the
    pre-elastic x. The result is the radius of the product of the p tick maps (a cyclic shift of
    the order leaves it unchanged); below 1 means the noiseless iteration converges. For p = 1 the
    map is M, so the radius is max(|γ|, |φ|).
    """
    _check(p, eta_h, alpha, 1.0)
    composed = np.eye(p + 1)
    for i in range(p):
        tick = np.eye(p + 1)
        tick[i, i] = 1.0 - alpha - eta_h
        tick[i, p] = alpha
        tick[p, i] = alpha
        tick[p, p] = 1.0 - alpha
        composed = tick @ composed
    return float(np.max(np.abs(np.linalg.eigvals(composed))))
