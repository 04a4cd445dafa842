"""Tests for the problems: exact derivatives, oracle statistics and the registry.

The statistical checks compare against tolerances derived from standard errors with fixed seeds,
so they are deterministic; each has a companion showing the check rejects a broken oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.effects import Vector
from peerlearn.errors import ProblemError
from peerlearn.problems import (
    MLP,
    PROBLEM_NAMES,
    PROBLEMS,
    DoubleWell,
    GaussianLogistic,
    LogisticRegression,
    NoisyQuadratic,
    Problem,
    SmoothNonConvex,
    SoftmaxRegression,
    make_problem,
)

# Small instances of every problem, keyed by a readable id.
FACTORIES: dict[str, Callable[[], Problem]] = {
    "quadratic": lambda: NoisyQuadratic(dim=6, mu=0.3, L=3.0, sigma=1.5, seed=3),
    "quadratic_d1": lambda: NoisyQuadratic(dim=1, mu=1.0, L=1.0, sigma=0.7),
    "logistic": lambda: LogisticRegression(batch_size=4, l2=1e-2),
    "softmax": lambda: SoftmaxRegression(batch_size=8, l2=1e-2),
    "mlp": lambda: MLP(hidden=5, batch_size=8, l2=1e-3),
    "double_well": lambda: DoubleWell(sigma=0.5),
    "nonconvex": lambda: SmoothNonConvex(dim=5, sigma=2.0, seed=1),
    "gaussian_logistic": lambda: GaussianLogistic(dim=5, samples=40, batch_size=4, seed=1),
}
IDS = list(FACTORIES)


def _point(problem: Problem, seed: int = 0, scale: float = 0.3) -> Vector:
    """A generic test point near x0 (not x0 itself: x0 = 0 is special for linear models)."""
    rng = np.random.default_rng(seed)
    return problem.x0() + scale * rng.standard_normal(problem.dim)


def _fd_partial(problem: Problem, x: Vector, direction: Vector, h: float = 1e-5) -> float:
    return (problem.loss(x + h * direction) - problem.loss(x - h * direction)) / (2 * h)


def _assert_unbiased(problem: Problem, x: Vector, n: int, seed: int = 0) -> None:
    """Every coordinate of the sample mean within 6 standard errors of ∇Q(x)."""
    rng = np.random.default_rng(seed)
    total = np.zeros(problem.dim)
    total2 = np.zeros(problem.dim)
    for _ in range(n):
        g = problem.grad(x, rng)
        total += g
        total2 += g * g
    mean = total / n
    var = np.maximum(total2 / n - mean * mean, 0.0) * n / (n - 1)
    full = problem.full_grad(x)
    tol = 6.0 * np.sqrt(var / n) + 1e-9 * (1.0 + np.abs(full))
    worst = np.max(np.abs(mean - full) / tol)
    assert worst <= 1.0, f"sample mean off by {worst:.2f}× the tolerance"


def _noise_moments(
    problem: Problem, x: Vector, rngs: list[np.random.Generator], reps: int
) -> float:
    """E‖mean of one draw per rng − ∇Q(x)‖², estimated over ``reps`` repetitions."""
    full = problem.full_grad(x)
    errs = np.empty(reps)
    for r in range(reps):
        mean = np.mean([problem.grad(x, rng) for rng in rngs], axis=0)
        errs[r] = np.sum((mean - full) ** 2)
    return float(errs.mean())


# --- every problem -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", IDS)
def test_basic_shapes_and_fresh_arrays(key: str) -> None:
    problem = FACTORIES[key]()
    x0 = problem.x0()
    assert x0.shape == (problem.dim,) and x0.dtype == np.float64
    x0 += 1.0
    assert not np.array_equal(problem.x0(), x0), "x0() must return a fresh array"
    x = _point(problem)
    before = x.copy()
    g1 = problem.grad(x, np.random.default_rng(5))
    g2 = problem.grad(x, np.random.default_rng(5))
    assert np.array_equal(x, before), "grad must not mutate x"
    assert g1 is not g2 and np.array_equal(g1, g2), "same rng state, same sample"
    assert g1.shape == (problem.dim,) and g1.dtype == np.float64
    assert math.isfinite(problem.loss(x))
    assert problem.name in PROBLEMS and isinstance(problem, PROBLEMS[problem.name])


@pytest.mark.parametrize("key", IDS)
def test_full_grad_matches_finite_differences(key: str) -> None:
    problem = FACTORIES[key]()
    x = _point(problem, seed=1)
    full = problem.full_grad(x)
    rng = np.random.default_rng(2)
    # Every coordinate where that is cheap; a random subset plus random directions otherwise.
    if problem.dim <= 100:
        coords = np.arange(problem.dim)
    else:
        coords = rng.choice(problem.dim, size=40, replace=False)
    for i in coords:
        e = np.zeros(problem.dim)
        e[i] = 1.0
        assert _fd_partial(problem, x, e) == pytest.approx(full[i], rel=1e-5, abs=1e-7), i
    for _ in range(3):
        d = rng.standard_normal(problem.dim)
        assert _fd_partial(problem, x, d) == pytest.approx(float(full @ d), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("key", IDS)
def test_grad_is_unbiased(key: str) -> None:
    problem = FACTORIES[key]()
    n = 3000 if problem.dim > 100 else 10000
    _assert_unbiased(problem, _point(problem, seed=4), n)


def test_unbiasedness_check_rejects_a_biased_oracle() -> None:
    class Biased(NoisyQuadratic):
        def grad(self, x: Vector, rng: np.random.Generator) -> Vector:
            return super().grad(x, rng) + 0.05

    with pytest.raises(AssertionError):
        _assert_unbiased(Biased(dim=6, sigma=1.0), np.zeros(6), 10000)


# --- noise variance: Attiya–Schiller Lemmas 1/2 ------------------------------------------------

NOISY = ["quadratic", "quadratic_d1", "double_well", "nonconvex"]


@pytest.mark.parametrize("key", NOISY)
def test_total_noise_variance_is_sigma2(key: str) -> None:
    problem = FACTORIES[key]()
    sigma2 = problem.constants.sigma2
    assert sigma2 is not None and sigma2 > 0
    measured = _noise_moments(problem, _point(problem), [np.random.default_rng(7)], reps=20000)
    # Std of the estimate ≤ σ²·√(2/20000) ≈ 0.01σ²: 5 % is ~5 standard errors.
    assert measured == pytest.approx(sigma2, rel=0.05)


@pytest.mark.parametrize("key", ["quadratic", "nonconvex"])
@pytest.mark.parametrize("batch", [2, 8])
def test_mean_of_independent_draws_has_variance_sigma2_over_b(key: str, batch: int) -> None:
    problem = FACTORIES[key]()
    sigma2 = problem.constants.sigma2
    assert sigma2 is not None
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(11).spawn(batch)]
    measured = _noise_moments(problem, _point(problem), rngs, reps=4000)
    assert measured == pytest.approx(sigma2 / batch, rel=0.1)


def test_shared_seeds_destroy_the_variance_gain() -> None:
    """B processes with the same seed average B copies of one draw — variance σ² (docs/papers.md,
    independent randomness)."""
    problem = FACTORIES["quadratic"]()
    sigma2 = problem.constants.sigma2
    assert sigma2 is not None
    rngs = [np.random.default_rng(123) for _ in range(8)]
    mean_err = 0.0
    x = _point(problem)
    for _ in range(2000):
        draws = [problem.grad(x, rng) for rng in rngs]
        mean_err += float(np.sum((np.mean(draws, axis=0) - problem.full_grad(x)) ** 2))
    assert mean_err / 2000 == pytest.approx(sigma2, rel=0.1)


# --- the quadratic -----------------------------------------------------------------------------


def test_quadratic_geometry() -> None:
    p = NoisyQuadratic(dim=10, mu=0.5, L=2.0, sigma=1.0, start_distance2=10.0, seed=0)
    c = p.constants
    assert c.x_star is not None and c.L == 2.0 and c.mu == 0.5 and c.sigma2 == 1.0
    assert c.q_star == 0.0 and p.loss(c.x_star) == 0.0
    assert np.array_equal(p.full_grad(c.x_star), np.zeros(10))
    assert float(np.sum((p.x0() - c.x_star) ** 2)) == pytest.approx(10.0, rel=1e-12)
    lam = p.eigenvalues
    assert lam.min() == 0.5 and lam.max() == 2.0 and np.all(np.diff(lam) > 0)
    # Hessian is diag(λ): the loss is exactly ½ Σ λ_k u_k².
    u = np.arange(10.0)
    assert p.loss(c.x_star + u) == pytest.approx(0.5 * float(lam @ u**2))
    assert p.evaluate(p.x0())["dist2"] == pytest.approx(10.0)
    with pytest.raises(ValueError):
        c.x_star[0] = 1.0  # shared with every process: read-only


def test_quadratic_seed_fixes_xstar_and_start() -> None:
    a, b, c = NoisyQuadratic(seed=1), NoisyQuadratic(seed=1), NoisyQuadratic(seed=2)
    assert a.constants.x_star is not None and c.constants.x_star is not None
    assert np.array_equal(a.x0(), b.x0())
    assert not np.allclose(a.constants.x_star, c.constants.x_star)


def test_quadratic_one_dimensional_and_noiseless() -> None:
    p = NoisyQuadratic(dim=1, mu=0.5, L=2.0, sigma=0.0)
    assert np.all((p.eigenvalues >= 0.5) & (p.eigenvalues <= 2.0))
    x = p.x0()
    assert np.array_equal(p.grad(x, np.random.default_rng(0)), p.full_grad(x))


@settings(max_examples=60, deadline=None)
@given(
    mu=st.floats(0.05, 2.0),
    ratio=st.floats(1.0, 20.0),
    eta_frac=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_lemma3_gradient_step_contracts(
    mu: float, ratio: float, eta_frac: float, seed: int
) -> None:
    """Lemma 3: for η ≤ 1/L, ‖x−η∇Q(x)−y+η∇Q(y)‖² ≤ (1−ημ)‖x−y‖²."""
    p = NoisyQuadratic(dim=8, mu=mu, L=mu * ratio, seed=seed % 7)
    assert p.constants.L is not None
    eta = eta_frac / p.constants.L
    rng = np.random.default_rng(seed)
    x, y = 3 * rng.standard_normal(8), 3 * rng.standard_normal(8)
    lhs = float(np.sum((x - eta * p.full_grad(x) - y + eta * p.full_grad(y)) ** 2))
    dist2 = float(np.sum((x - y) ** 2))
    assert lhs <= (1 - eta * mu) * dist2 + 1e-12 * dist2  # absolute slack for rounding at ημ = 1


def test_lemma3_fails_for_too_large_a_step() -> None:
    """The Lemma 3 check is not vacuous: a step of 2.5/L expands along the top eigenvector."""
    p = NoisyQuadratic(dim=4, mu=0.5, L=2.0)
    eta = 2.5 / 2.0
    x, y = np.zeros(4), np.array([0.0, 0.0, 0.0, 1.0])
    lhs = float(np.sum((x - eta * p.full_grad(x) - y + eta * p.full_grad(y)) ** 2))
    assert lhs > (1 - eta * 0.5) * 1.0


# --- smoothness and strong convexity of the other problems -------------------------------------


@pytest.mark.parametrize(
    "key", ["logistic", "softmax", "nonconvex", "double_well", "gaussian_logistic"]
)
def test_declared_L_and_mu_hold_on_random_pairs(key: str) -> None:
    problem = FACTORIES[key]()
    c = problem.constants
    assert c.L is not None
    for k in range(20):
        x, y = _point(problem, 2 * k, scale=2.0), _point(problem, 2 * k + 1)
        dg = problem.full_grad(x) - problem.full_grad(y)
        dx2 = float(np.sum((x - y) ** 2))
        assert float(np.sum(dg**2)) <= c.L**2 * dx2 * (1 + 1e-9)
        if c.mu is not None:
            assert float(dg @ (x - y)) >= c.mu * dx2 * (1 - 1e-9)


def _hvp(problem: Problem, x: Vector, v: Vector, eps: float = 1e-4) -> Vector:
    """Hessian-vector product at x, from central differences of the exact gradient."""
    return (problem.full_grad(x + eps * v) - problem.full_grad(x - eps * v)) / (2 * eps)


def _top_curvature(problem: Problem, x: Vector, iterations: int = 40) -> float:
    """λ_max of the Hessian at x by power iteration (the Rayleigh quotient never exceeds it)."""
    v = np.random.default_rng(0).standard_normal(problem.dim)
    for _ in range(iterations):
        v = _hvp(problem, x, v / np.linalg.norm(v))
    v /= np.linalg.norm(v)
    return float(v @ _hvp(problem, x, v))


@pytest.mark.parametrize("key", ["logistic", "softmax"])
def test_declared_L_bounds_the_hessian_and_is_attained_where_expected(key: str) -> None:
    """Random pairs rarely align with the top eigenvector, so probe the Hessian directly.

    At θ = 0 every sigmoid slope is exactly ¼, so the logistic bound is attained there; the
    softmax Hessian at θ = 0 has factor 1/10 (uniform p) instead of the worst case ½.
    """
    problem = FACTORIES[key]()
    c = problem.constants
    assert c.L is not None and c.mu is not None
    rng = np.random.default_rng(1)
    for x in (problem.x0(), _point(problem, seed=3, scale=1.0)):
        assert _top_curvature(problem, x) <= c.L * (1 + 1e-6)
        for _ in range(5):
            v = rng.standard_normal(problem.dim)
            assert float(v @ _hvp(problem, x, v)) >= c.mu * float(v @ v) * (1 - 1e-6)
    factor = 1.0 if key == "logistic" else 0.1 / 0.5
    expected = factor * (c.L - c.mu) + c.mu
    assert _top_curvature(problem, problem.x0()) == pytest.approx(expected, rel=1e-6)


def test_nonconvex_L_is_tight_and_minimum_at_centre() -> None:
    p = SmoothNonConvex(dim=5, sigma=1.0, seed=4)
    c = p.constants
    assert c.x_star is not None and c.L == 2.0 and c.q_star == 0.0 and c.sigma2 == 1.0
    assert p.loss(c.x_star) == 0.0 and np.all(p.full_grad(c.x_star) == 0.0)
    e = np.zeros(5)
    e[2] = 1e-4
    ratio = np.linalg.norm(p.full_grad(c.x_star + e)) / 1e-4
    assert ratio == pytest.approx(2.0, rel=1e-6)
    assert np.allclose(np.abs(p.x0() - c.x_star), 2.0)
    rng = np.random.default_rng(0)
    assert all(p.loss(5 * rng.standard_normal(5)) >= 0.0 for _ in range(50))
    assert p.evaluate(c.x_star)["grad_norm2"] == 0.0


def test_double_well() -> None:
    p = DoubleWell(sigma=0.5)
    c = p.constants
    assert np.array_equal(p.x0(), [0.0]) and p.dim == 1
    assert np.array_equal(p.full_grad(np.zeros(1)), [0.0])
    lo, hi = p.minimizers
    assert lo == -hi and 0.9 < hi < 1.0
    for m in (lo, hi):
        assert abs(p.full_grad(np.array([m]))[0]) < 1e-12
        assert p.loss(np.array([m])) == pytest.approx(c.q_star, abs=1e-14)
    grid = np.linspace(-5, 5, 20001)
    values = np.array([p.loss(np.array([v])) for v in grid])
    assert c.q_star is not None and values.min() >= c.q_star - 1e-15
    assert abs(grid[values.argmin()]) == pytest.approx(hi, abs=1e-3)
    # L = max |Q''|: valid (checked on pairs elsewhere) and tight.
    h = 1e-4
    q2 = [
        (p.full_grad(np.array([v + h]))[0] - p.full_grad(np.array([v - h]))[0]) / (2 * h)
        for v in grid
    ]
    assert c.L is not None and max(np.abs(q2)) == pytest.approx(c.L, rel=1e-6)
    assert p.evaluate(np.array([-0.5]))["well"] == -1.0


# --- data problems -----------------------------------------------------------------------------


def test_softmax_sgd_reaches_90_percent_on_digits() -> None:
    p = SoftmaxRegression()
    x, rng = p.x0(), np.random.default_rng(0)
    for _ in range(500):
        x -= 0.5 * p.grad(x, rng)
    result = p.evaluate(x)
    assert set(result) == {"train_accuracy", "test_accuracy", "test_loss"}
    assert result["test_accuracy"] > 0.9
    assert p.loss(x) < p.loss(p.x0()) == pytest.approx(math.log(10))


def test_mlp_start_breaks_symmetry_and_sgd_learns() -> None:
    p = MLP(hidden=16)
    x0 = p.x0()
    assert np.array_equal(x0, MLP(hidden=16).x0()) and not np.array_equal(x0, MLP(seed=1).x0())
    assert np.count_nonzero(x0) > 0.9 * 16 * (64 + 10)
    x, rng = x0.copy(), np.random.default_rng(0)
    for _ in range(300):
        x -= 0.5 * p.grad(x, rng)
    assert p.evaluate(x)["test_accuracy"] > 0.8


def test_logistic_constants_and_learning() -> None:
    p = LogisticRegression()
    assert p.dim == 31 and p.constants.mu == 1e-3 and p.constants.x_star is None
    assert p.loss(p.x0()) == pytest.approx(math.log(2))
    x, rng = p.x0(), np.random.default_rng(0)
    for _ in range(200):
        x -= 0.1 * p.grad(x, rng)
    assert p.evaluate(x)["test_accuracy"] > 0.9


def test_gaussian_logistic_is_the_papers_problem() -> None:
    """DASGD's Section 5 logistic regression: full gradients by default (σ = 0), the log-loss
    log 2 at x = 0, where every sigmoid slope is ¼ and the declared L is the Hessian's top
    eigenvalue; gradient descent finds a finite minimiser (the data are not separable)."""
    p = GaussianLogistic()
    assert p.dim == 20 and p.constants.mu is None and p.constants.L is not None
    assert p.constants.sigma2 == 0.0
    x = p.x0()
    assert p.loss(x) == pytest.approx(math.log(2))
    assert np.array_equal(p.grad(x, np.random.default_rng(0)), p.full_grad(x))
    hessian = np.column_stack([_hvp(p, x, e) for e in np.eye(p.dim)])
    top = np.linalg.eigvalsh((hessian + hessian.T) / 2)[-1]
    assert top == pytest.approx(p.constants.L, rel=1e-6)
    assert 0.3 < p.constants.L < 0.7  # ¼·λ_max of a 20-d Gaussian Gram over 100: ≈ ¼·(1 + √0.2)²
    for _ in range(3000):
        x -= (1.0 / p.constants.L) * p.full_grad(x)
    assert np.linalg.norm(p.full_grad(x)) < 1e-6 and np.linalg.norm(x) < 100
    with pytest.raises(ProblemError, match="linearly separable in 20 dimensions"):
        GaussianLogistic(samples=10)
    # near Cover's threshold m = 2d the check decides, draw by draw: seed 0's 36 points are
    # separable, seed 2's are not (so gradient descent there finds a finite minimiser)
    with pytest.raises(ProblemError, match="the 36 points of seed 0 are linearly separable"):
        GaussianLogistic(samples=36, seed=0)
    q = GaussianLogistic(samples=36, seed=2)
    y = q.x0()
    for _ in range(20_000):
        y -= (1.0 / q.constants.L) * q.full_grad(y)
    assert np.linalg.norm(q.full_grad(y)) < 1e-6


def test_datasets_are_cached_and_read_only() -> None:
    a, b = SoftmaxRegression(seed=0), MLP(seed=0)
    assert a.split is b.split
    assert SoftmaxRegression(seed=1).split is not a.split
    with pytest.raises(ValueError):
        a.split.x_train[0, 0] = 1.0
    s = a.split
    assert s.x_train.min() >= 0.0 and s.x_train.max() <= 1.0
    assert len(s.y_test) / (len(s.y_test) + len(s.y_train)) == pytest.approx(0.25, abs=0.01)
    # Stratified: every class keeps its share in the test set.
    train_share = np.bincount(s.y_train) / len(s.y_train)
    test_share = np.bincount(s.y_test) / len(s.y_test)
    assert np.allclose(train_share, test_share, atol=0.01)


# --- registry ----------------------------------------------------------------------------------


def test_registry_names_and_defaults() -> None:
    expected = (
        "quadratic",
        "logistic",
        "softmax",
        "mlp",
        "double_well",
        "nonconvex",
        "gaussian_logistic",
    )
    assert expected == PROBLEM_NAMES
    for name in expected:
        problem = make_problem(name)
        assert type(problem) is PROBLEMS[name] and problem.name == name
    q = make_problem("quadratic", dim=3, sigma=0.0)
    assert isinstance(q, NoisyQuadratic) and q.dim == 3


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("quadrtic", {}, "valid names: quadratic, logistic"),
        ("quadratic", {"dimension": 3}, "valid parameters: dim=10"),
        ("logistic", {"batch_size": 0}, "batch_size must be ≥ 1"),
        ("mlp", {"batch_size": 2.5}, "batch_size must be an integer"),
        ("quadratic", {"mu": 3.0, "L": 2.0}, "mu ≤ L"),
        ("quadratic", {"dim": True}, "dim must be an integer"),
        ("nonconvex", {"sigma": -1.0}, "sigma must be ≥ 0"),
        ("double_well", {"sigma": float("nan")}, "sigma must be finite"),
        ("softmax", {"l2": "big"}, "l2 must be a number"),
        ("mlp", {"hidden": 0}, "hidden must be ≥ 1"),
        ("no.such.module:Thing", {}, "cannot import module"),
        ("peerlearn.problems.quadratic:Nope", {}, "has no attribute"),
        ("math:pi", {}, "is not callable"),
        ("builtins:dict", {}, "not a peerlearn Problem"),
        (":NoisyQuadratic", {}, "expected 'package.module:callable'"),
    ],
)
def test_make_problem_errors(name: str, params: dict[str, object], fragment: str) -> None:
    with pytest.raises(ProblemError) as info:
        make_problem(name, **params)
    assert fragment in str(info.value)


def test_make_problem_module_callable() -> None:
    p = make_problem("peerlearn.problems.quadratic:NoisyQuadratic", dim=4, seed=2)
    assert isinstance(p, NoisyQuadratic) and p.dim == 4
    assert np.array_equal(p.x0(), NoisyQuadratic(dim=4, seed=2).x0())
    with pytest.raises(ProblemError, match="valid parameters"):
        make_problem("peerlearn.problems.nonconvex:DoubleWell", dim=3)
