"""The SGD and agreement programs stepped by hand, and edge cases of the EASGD closed forms.

A scripted environment answers every effect with fixed, small dyadic values, so each assertion is
exact: which aggregator (MidExtremes or ApproachExtreme) a program applies where, the gradient
step's sign, the iteration and round counts, the reported keys, and the output iteration τ.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.algorithms.aggregate import Aggregator
from peerlearn.algorithms.maa import cluster_maa, smmaa
from peerlearn.algorithms.schedules import Constant, sqrt_n_over_t
from peerlearn.algorithms.sgd import alg1, alg2, maa_instances
from peerlearn.analysis import easgd_theory as et
from peerlearn.daemon.routing import _MODEL_KINDS
from peerlearn.effects import Collect, Effect, Exchange, Grad, Msg, Report, Vector, Write
from tests.helpers import exact

MID, APPROACH = Aggregator.MIDEXT, Aggregator.APPROACHEXT


def v(*xs: float) -> Vector:
    return np.array(xs, dtype=np.float64)


class Env:
    """Answers effects: registers hold the caller's write plus 0 and 4; a cluster round receives
    the caller's value plus 0 and 10; a gradient exchange the caller's gradient plus ``others``."""

    def __init__(self, others: tuple[float, ...] = (), grad_scale: float = 1.0) -> None:
        self.others = others
        self.grad_scale = grad_scale
        self.written: dict[Any, Vector] = {}
        self.effects: list[Effect] = []

    def answer(self, eff: Effect) -> Any:
        self.effects.append(eff)
        if isinstance(eff, Grad):
            return self.grad_scale * eff.x
        if isinstance(eff, Write):
            self.written[eff.key] = eff.value
            return None
        if isinstance(eff, Collect):
            return (Msg(0, self.written[eff.key]), Msg(1, v(0.0)), Msg(2, v(4.0)))
        if isinstance(eff, Exchange):
            if eff.tag[0] == "maa":
                return (Msg(0, eff.value), Msg(1, v(0.0)), Msg(2, v(10.0)))
            return (Msg(0, eff.value), *(Msg(i + 1, v(o)) for i, o in enumerate(self.others)))
        assert isinstance(eff, Report)
        return None

    def run(self, gen: Generator[Effect, Any, Any]) -> Any:
        gen = exact(gen)
        try:
            eff = next(gen)
            while True:
                eff = gen.send(self.answer(eff))
        except StopIteration as stop:
            return stop.value

    def reports(self, name: str) -> list[Report]:
        return [e for e in self.effects if isinstance(e, Report) and e.name == name]


# --- Alg 4 / Alg 3: which aggregator runs where ---------------------------------------------------
# Own value 1, registers {1, 0, 4}: MidExt → 2, ApproachExt from 1 → (1 + 4)/2 = 2.5.
# Cluster round receives {y, 0, 10}: MidExt → 5, ApproachExt from y → (y + 10)/2.
SMMAA_OUT = {MID: 2.0, APPROACH: 2.5}
CLUSTER_OUT = {MID: 5.0, APPROACH: 6.25}


@pytest.mark.parametrize("agg", [MID, APPROACH])
def test_smmaa_applies_the_chosen_aggregator(agg: Aggregator) -> None:
    env = Env()
    out = env.run(smmaa(v(1.0), (3, 1), 1, agg))
    assert out.tolist() == [SMMAA_OUT[agg]]


@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_smmaa_runs_rounds_registers_and_reports_the_output_as_round_r_plus_1(rounds: int) -> None:
    env = Env()
    env.run(smmaa(v(1.0), (3, 2), rounds, MID))
    assert [e.key for e in env.effects if isinstance(e, Write)] == [
        ("sm", 3, 2, k) for k in range(1, rounds + 1)
    ]
    keys = [r.key for r in env.reports("agreement")]
    assert keys == [(3, 2, k) for k in range(1, rounds + 2)]


@pytest.mark.parametrize("agg", [MID, APPROACH])
def test_cluster_maa_uses_the_aggregator_inside_and_across_clusters(agg: Aggregator) -> None:
    env = Env()
    out = env.run(cluster_maa(v(1.0), 1, 1, 1, agg))
    sent = [e.value.tolist() for e in env.effects if isinstance(e, Exchange)]
    assert sent == [[SMMAA_OUT[agg]]]  # the SMMAA output is what the cluster round broadcasts
    assert out.tolist() == [CLUSTER_OUT[agg]]


@pytest.mark.parametrize("agg", [MID, APPROACH])
def test_alg2_and_maa_instances_pass_the_aggregator_on(agg: Aggregator) -> None:
    # alg2: y = 2 − 0.5·2 = 1 enters the agreement, as in the cluster test above.
    env = Env()
    out = env.run(alg2(v(2.0), 1, 1, Constant(0.5), None, 1, 1, agg))
    assert out.tolist() == [CLUSTER_OUT[agg]]
    env = Env()
    outs = env.run(maa_instances(np.array([[1.0]]), 1, 1, agg))
    assert [o.tolist() for o in outs] == [[CLUSTER_OUT[agg]]]


# --- Alg 1 / Alg 2: the SGD step, iterations, τ -------------------------------------------------


def test_alg1_averages_the_exchanged_parameters() -> None:
    # x = 2, g = 2, η = 0.5: y = 1; the other process sent 3, so x_2 = (1 + 3)/2 = 2.
    env = Env(others=(3.0,))
    out = env.run(alg1(v(2.0), 1, 2, Constant(0.5)))
    assert out.tolist() == [2.0]
    assert [(r.step, r.value.tolist()) for r in env.reports("model")] == [(1, [2.0]), (2, [2.0])]


def test_alg1_exchanges_models_under_a_tag_the_daemon_counts_as_a_model() -> None:
    # The daemon's global consensus distance keeps the latest value of every message whose tag
    # kind is a model kind; Alg 1's exchange carries parameters, Alg 2's gradient exchange does not.
    env = Env()
    env.run(alg1(v(2.0), 2, 1, Constant(0.5)))
    tags = [e.tag for e in env.effects if isinstance(e, Exchange)]
    assert tags == [("params", 1), ("params", 2)]
    assert tags[0][0] in _MODEL_KINDS
    assert "grad" not in _MODEL_KINDS


def test_alg2_steps_against_the_mean_gradient_without_agreement_rounds() -> None:
    # x = 1, own g = 2, other g = 4: mean 3, y = 1 − 0.5·3 = −0.5; rounds = 0: no MAA exchange.
    env = Env(others=(4.0,), grad_scale=2.0)
    out = env.run(alg2(v(1.0), 1, 2, Constant(0.5), None, 0, 1, MID))
    assert out.tolist() == [-0.5]
    assert not any(isinstance(e, (Write, Collect)) for e in env.effects)
    assert [e.tag for e in env.effects if isinstance(e, Exchange)] == [("grad", 1)]


def test_alg2_large_step_size_derives_zero_agreement_rounds() -> None:
    # rounds=None: q_t = min(1, η/4) = 1 for η = 8, so no agreement round (and no error).
    env = Env()
    out = env.run(alg2(v(1.0), 1, 1, Constant(8.0), None, None, 1, MID))
    assert out.tolist() == [-7.0]
    assert [e.tag for e in env.effects if isinstance(e, Exchange)] == [("grad", 1)]


@pytest.mark.parametrize(("tau", "expected"), [(None, 1.0), (1, 8.0), (2, 4.0), (3, 2.0)])
def test_alg2_returns_the_model_at_the_start_of_iteration_tau(
    tau: int | None, expected: float
) -> None:
    # g = x, η = 1/2: x halves every iteration, 8 → 4 → 2 → 1.
    env = Env()
    out = env.run(alg2(v(8.0), 3, 1, Constant(0.5), tau, 0, 1, MID))
    assert out.tolist() == [expected]
    assert [(r.step, r.value.tolist()) for r in env.reports("model")] == [
        (1, [8.0]),
        (2, [4.0]),
        (3, [2.0]),
        (4, [1.0]),
    ]


def test_zero_iterations_report_the_initial_model_as_step_1() -> None:
    for prog in (
        alg1(v(5.0), 0, 1, Constant(0.5)),
        alg2(v(5.0), 0, 1, Constant(0.5), None, 1, 1, MID),
    ):
        env = Env()
        assert env.run(prog).tolist() == [5.0]
        assert [(r.step, r.value.tolist()) for r in env.reports("model")] == [(1, [5.0])]


def test_alg1_without_a_step_count_starts_at_iteration_1() -> None:
    env = Env()
    gen = exact(alg1(v(1.0), None, 1, Constant(0.5)))
    eff = next(gen)
    for _ in range(9):
        eff = gen.send(env.answer(eff))
    gen.close()
    assert [r.step for r in env.reports("model")][:3] == [1, 2, 3]


def test_maa_instances_reports_the_last_output_as_the_final_model() -> None:
    env = Env()
    rows = np.array([[1.0], [2.0], [3.0]])
    outs = env.run(maa_instances(rows, 0, 1, MID))
    assert [o.tolist() for o in outs] == [[1.0], [2.0], [3.0]]
    final = env.reports("model")[-1]
    assert (final.step, final.value.tolist()) == (4, [3.0])


def test_sqrt_n_over_t() -> None:
    assert sqrt_n_over_t(4, 16) == 0.5


# --- EASGD closed forms: edge cases ---------------------------------------------------------------


def test_roots_of_the_identity_drift() -> None:
    assert et.roots(4, 0.0, 0.0) == (1.0, 1.0)


def test_negative_eta_alone_is_rejected() -> None:
    with pytest.raises(ValueError, match="eta >= 0"):
        et.roots(4, -0.1, 0.1)


def test_beta_max_needs_positive_eta() -> None:
    with pytest.raises(ValueError, match="eta\\*h"):
        et.beta_max(4, 0.0)


def test_center_mean_without_elastic_force_stays_put() -> None:
    assert et.center_mean(5, 4, 0.0, 0.0, 1.0, 0.5) == 0.5
    assert et.center_mean(5, 4, 0.1, 0.0, 1.0, 0.5) == 0.5


def test_center_mean_saturates_with_the_sign_of_the_alternating_root() -> None:
    # φ ≈ −2.1 (p = 1, ηh = 3): φ^t overflows at t ≈ 1000; the sign alternates with t's parity as
    # it does at t = 200/201, where nothing overflows yet.
    for big, small in ((2000, 200), (2001, 201), (2002, 202)):
        near = et.center_mean(small, 1, 3.0, 0.1, 1.0, 0.0)
        assert math.isfinite(near)
        assert et.center_mean(big, 1, 3.0, 0.1, 1.0, 0.0) == math.copysign(math.inf, near)


def test_center_variance_at_phi_zero_matches_propagation() -> None:
    # p = 2, α = 1/4, ηh = 1/2: 1 − a + c² = 0, so φ = 0 exactly (s = 3/4, a + s = 2).
    assert et.roots(2, 0.5, 0.25)[1] == 0.0
    _, var = et.propagate_moments(6, 2, 0.5, 0.25, 1.0, 0.0, 0.0)
    for t in range(7):
        assert et.center_variance(t, 2, 0.5, 0.25, 1.0) == pytest.approx(var[t], rel=1e-12)


def test_center_variance_without_elastic_force_is_zero_also_when_workers_diverge() -> None:
    assert et.center_variance(1000, 4, 3.0, 0.0, 1.0) == 0.0
    assert et.asymptotic_variance(4, 0.1, 0.0, 1.0) == 0.0


def test_center_variance_at_alpha_one() -> None:
    # V[x̃_2] = pα²η²σ² (module docstring) also at α = 1.
    assert et.center_variance(2, 1, 0.5, 1.0, 1.0) == pytest.approx(0.25, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    p=st.integers(1, 16),
    eh=st.floats(0.01, 1.9),
    frac=st.floats(0.05, 0.9),
    h=st.floats(0.25, 4.0),
)
def test_curvature_enters_only_through_eta_h(p: int, eh: float, frac: float, h: float) -> None:
    # With ηh fixed the roots are fixed: V_∞ scales as η² and the Corollary 7.1 limit as 1/h².
    # β stays well inside the stable region, so rounding ηh cannot move it across the edge.
    beta = frac * et.beta_max(p, eh)
    alpha, eta = beta / p, eh / h
    base_v = et.asymptotic_variance(p, eh, alpha, 1.0)
    assert et.asymptotic_variance(p, eta, alpha, 1.0, h) == pytest.approx(base_v / h**2, rel=1e-9)
    base_c = et.corollary_71_limit(beta, eh, 1.0)
    assert et.corollary_71_limit(beta, eta, 1.0, h) == pytest.approx(base_c / h**2, rel=1e-9)


def test_asymptotic_variance_is_infinite_when_eta_h_is_unstable() -> None:
    # η = 1.5 is stable at h = 1, but ηh = 3 at h = 2 is not.
    assert math.isfinite(et.asymptotic_variance(4, 1.5, 0.01, 1.0))
    assert et.asymptotic_variance(4, 1.5, 0.01, 1.0, 2.0) == math.inf


def test_errors_name_the_offending_argument() -> None:
    with pytest.raises(ValueError, match=r"^t counts steps from 0, got t=-1$"):
        et.center_mean(-1, 4, 0.1, 0.05, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"^T counts steps from 0, got T=-1$"):
        et.propagate_moments(-1, 4, 0.1, 0.05, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"^T counts steps from 0, got T=-1$"):
        et.double_average_variance(-1, 4, 0.1, 0.05, 1.0)
    with pytest.raises(ValueError, match=r"got eta\*h=6\.0$"):
        et.beta_max(4, 3.0, 2.0)
