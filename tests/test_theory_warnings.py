"""Theory warnings (``RunConfig.theory_warnings``): each names a result, quotes that result's
whole condition as the paper states it, and checks exactly that condition — ties included.

The papers' wording is copied here (Attiya–Schiller: Thm 1, Lemmas 3, 4 and 6, Lemma 21,
Thm 3, Thm 4 with Lemma 22 — whose q_t = η/4 the printed Thm 4 gives as 1/4 — and Section 4.1's
f_c ≤ ⌊(m−1)/2⌋; Tosi–Theobald: Thm 1, eqs. (11)/(12), with Assumption 3's L ≥ 1; the EASGD
supplement's condition (17)), so the suite checks the config against them without the papers.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from peerlearn.analysis.easgd_theory import beta_max, stable
from peerlearn.config import THEORY_CONDITIONS, load_config
from peerlearn.problems.base import Constants

# result → the fragments of its hypothesis, verbatim from the paper (notation as in the docs)
PAPER_CONDITIONS = {
    "Thm 1": ("μ-strongly convex", "η_t = β/(γ+t) ≤ 1/L", "β > 1/μ", "γ > 0"),
    "Lemmas 3, 4 and 6": ("μ-strongly convex", "η ≤ 1/L"),
    "Lemma 21": ("constant η ≤ min{1/2, 1/L}", "q_t = η/4"),
    "Thm 3": ("T ≥ 16L²N", "constant η = √(N/T)"),
    "Thm 4": ("T ≥ max{16L²N, 4N}", "constant η = √(N/T)", "q_t = η/4"),
    "Alg 3": ("f_c ≤ ⌊(m−1)/2⌋",),
    "DASGD's Thm 1": ("L ≥ 1", "η ≤ 1/(4·L·S_avg)", "η ≤ 1/(4·L·√(Ŝ_avg·Ŝ_max))"),
    "EASGD's condition (17)": ("−1 < φ < γ < 1",),
}


def warnings(constants: Constants, **overrides: Any) -> list[str]:
    return load_config(overrides=overrides).theory_warnings(constants)


def named(result: str, found: list[str]) -> list[str]:
    return [w for w in found if w.startswith(f"{result} need")]


def test_every_quoted_condition_is_the_papers() -> None:
    assert set(THEORY_CONDITIONS) == set(PAPER_CONDITIONS)
    for result, fragments in PAPER_CONDITIONS.items():
        for fragment in fragments:
            assert fragment in THEORY_CONDITIONS[result], (result, fragment)
    # Lemma 21's bound is min{1/2, 1/L}; 1/(4L) belongs to Lemma 12 and follows from Thm 4's T
    assert "1/(4L)" not in THEORY_CONDITIONS["Lemma 21"]


@pytest.mark.parametrize("big_l", [0.5, 1.0, 2.0, 4.0, 3.0])
def test_lemma21_checks_eta_against_min_half_one_over_l(big_l: float) -> None:
    bound = min(0.5, 1 / big_l)
    constants = Constants(L=big_l)
    at_bound = warnings(constants, algorithm="alg2", steps=10**6, lr={"eta": bound})
    assert named("Lemma 21", at_bound) == []
    above = warnings(constants, algorithm="alg2", steps=10**6, lr={"eta": bound * (1 + 1e-6)})
    [warning] = named("Lemma 21", above)
    assert warning.startswith(f"Lemma 21 needs {THEORY_CONDITIONS['Lemma 21']}: ")
    assert f"> min{{1/2, 1/L}} = {bound:g}" in warning


def test_lemma21_names_a_decreasing_rate_and_a_changed_agreement() -> None:
    constants = Constants(L=1.0)
    base: dict[str, Any] = {"algorithm": "alg2", "steps": 10**6, "lr": {"eta": 0.25}}
    assert named("Lemma 21", warnings(constants, **base)) == []
    decreasing = {**base, "lr": {"schedule": "inverse_time", "beta": 0.25, "gamma": 1.0}}
    assert "not constant" in named("Lemma 21", warnings(constants, **decreasing))[0]
    other_q = named("Lemma 21", warnings(constants, **base, maa={"q": 0.25}))
    assert "q = 0.25 ≠ η/4 = 0.0625" in other_q[0]
    no_maa = named("Lemma 21", warnings(constants, **base, maa={"rounds": 0}))
    assert "maa.rounds/inner_rounds = 0/14" in no_maa[0]


@pytest.mark.parametrize(("big_l", "big_n"), [(1.1, 25), (0.7, 25), (1.3, 25), (2.0, 5)])
def test_thm3_and_thm4_at_t_equal_16_l2_n(big_l: float, big_n: int) -> None:
    # 16L²N is an integer, but 16·1.1²·25 evaluates to 484.00000000000006: T = 484 meets T ≥ 16L²N
    steps = round(16 * big_l**2 * big_n)
    base: dict[str, Any] = {
        "algorithm": "alg2",
        "processes": big_n,
        "clusters": 1,
        "lr": {"schedule": "sqrt_n_over_t"},
    }
    constants = Constants(L=big_l)
    assert named("Thm 3", warnings(constants, **base, steps=steps)) == []
    assert named("Thm 4", warnings(constants, **base, steps=steps)) == []
    short = warnings(constants, **base, steps=steps - 1)
    [thm3] = named("Thm 3", short)
    assert thm3 == (
        f"Thm 3 needs {THEORY_CONDITIONS['Thm 3']}: T = {steps - 1} < 16L²N = "
        f"{16 * big_l**2 * big_n:g}"
    )
    [thm4] = named("Thm 4", short)
    assert f"T = {steps - 1} < max{{16L²N, 4N}}" in thm4


def test_thm3_and_thm4_need_eta_sqrt_n_over_t() -> None:
    constants = Constants(L=0.25)  # 16L²N = N: T = 4N meets both T conditions
    base: dict[str, Any] = {"algorithm": "alg2", "processes": 4, "clusters": 1, "steps": 16}
    assert named("Thm 3", warnings(constants, **base, lr={"eta": 0.5})) == []  # √(4/16)
    [thm3] = named("Thm 3", warnings(constants, **base, lr={"eta": 0.4}))
    assert thm3.endswith("η = 0.4 ≠ √(N/T) = 0.5")


def test_thm1_strict_and_non_strict_bounds() -> None:
    constants = Constants(L=2.0, mu=0.5)
    schedule = {"schedule": "inverse_time", "beta": 2.0, "gamma": 3.0}  # β = 1/μ, β/(γ+1) = 1/L
    [thm1] = named("Thm 1", warnings(constants, lr=schedule))
    assert thm1 == f"Thm 1 needs {THEORY_CONDITIONS['Thm 1']}: β = 2 is not above 1/μ = 2"
    ok = {"schedule": "inverse_time", "beta": 2.0 * (1 + 1e-6), "gamma": 3.0 + 1e-5}
    assert warnings(constants, lr=ok) == []


def test_constant_rate_alg1_names_the_lemmas_not_thm1() -> None:
    constants = Constants(L=2.0, mu=0.5)
    assert warnings(constants, lr={"eta": 0.5}) == []
    [lemmas] = warnings(constants, lr={"eta": 0.9})
    condition = THEORY_CONDITIONS["Lemmas 3, 4 and 6"]
    assert lemmas == f"Lemmas 3, 4 and 6 need {condition}: η = 0.9 > 1/L = 0.5"


def test_dasgd_bound() -> None:
    constants = Constants(L=2.0)
    assert warnings(constants, algorithm="dasgd", lr={"eta": 0.125}) == []
    [warning] = warnings(constants, algorithm="dasgd", lr={"eta": 0.2})
    condition = THEORY_CONDITIONS["DASGD's Thm 1"]
    assert warning.startswith(f"DASGD's Thm 1 needs {condition}: ")
    assert "1/(4·max(L, 1)) = 0.125; η = 0.2" in warning


def test_cluster_majority() -> None:
    crashed = warnings(
        Constants(L=1.0),
        algorithm="maa",
        processes=4,
        clusters=4,
        sim={"crashes": ["cluster:0@t=1", "cluster:1@t=1"]},
    )
    [warning] = named("Alg 3", crashed)
    assert "2 of 4 clusters" in warning and "⌊m/2⌋+1 = 3" in warning
    # Thm 5 is about SGD; for agreement alone the bound is agreement's own impossibility
    assert "Thm 5" not in warning and "approximate agreement" in warning
    [sgd] = named(
        "Alg 3",
        warnings(
            Constants(L=1.0),
            algorithm="alg2",
            processes=4,
            clusters=4,
            quorum=2,
            sim={"crashes": ["cluster:0@t=1", "cluster:1@t=1"]},
        ),
    )
    assert "by Thm 5 no algorithm can do better" in sgd


# the 54 (p, ηh) pairs at β = β_max: φ = −1 exactly, computed a few ulps either side
EDGE = [(p, eh) for p in (1, 2, 3, 4, 5, 7, 10, 16, 100) for eh in (0.1, 0.3, 0.5, 1.0, 1.5, 1.9)]


@pytest.mark.parametrize(("p", "eta_h"), EDGE)
def test_easgd_warning_is_stable(p: int, eta_h: float) -> None:
    constants = Constants(L=1.0)
    base: dict[str, Any] = {"algorithm": "easgd", "processes": p + 1, "clusters": 1}
    bmax = beta_max(p, eta_h)
    for factor in (1 - 1e-6, 1.0, 1 + 1e-6):
        alpha = factor * bmax / p
        if alpha >= 1:
            continue
        found = named(
            "EASGD's condition (17)",
            warnings(constants, **base, lr={"eta": eta_h}, elastic={"alpha": alpha}),
        )
        assert bool(found) == (not stable(p, eta_h, alpha)), factor
        assert bool(found) == (factor >= 1.0), factor
    assert math.isfinite(bmax)
