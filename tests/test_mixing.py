"""MixML t_mix: exact values against the paper's and closed-form formulas, sampled values
against the reference values of docs/papers.md, Assumption 1, Lemma 1, and the ``peerlearn
mixing`` command."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from peerlearn.analysis import mixing
from peerlearn.analysis.mixing import (
    PROTOCOLS,
    MixingProtocol,
    _first_halving,
    _halved,
    _rounds_to_halve,
    build_protocol,
    event_operator,
    exact_tmix,
    halves,
    lemma1_holds,
    sample_tmix,
)
from peerlearn.cli import app
from peerlearn.errors import ConfigError
from peerlearn.topology import make_topology

DETERMINISTIC: list[tuple[str, dict[str, Any]]] = [
    ("allreduce", {}),
    ("local_steps", {}),
    ("reduced_frequency", {}),
    ("slack", {"gamma": 0.1}),
    ("sync_gossip", {}),
    ("sync_gossip", {"topology": "random-regular:3"}),
    ("async_ps", {"scheduling": "round_robin"}),
]
RANDOM: list[tuple[str, dict[str, Any]]] = [
    ("async_gossip", {}),
    ("async_gossip", {"topology": "complete"}),
    ("async_ps", {"scheduling": "random"}),
]


def _brute_tmix(proto: MixingProtocol) -> int:
    """Assumption 2 by the book: every start of one period, every window, dense M_t, SVD."""
    q = proto.q
    worst = 0
    for s in range(proto.period):
        p, tau = q.copy(), 0
        while not halves(float(np.linalg.norm(p, 2))):
            p = proto.operator(s + tau) @ p
            tau += 1
        worst = max(worst, tau)
    return worst


# --- exact t_mix against closed forms -------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_allreduce_is_n(n: int) -> None:
    assert exact_tmix("allreduce", n) == n


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_round_robin_parameter_server_is_n(n: int) -> None:
    assert exact_tmix("async_ps", n, scheduling="round_robin") == n
    assert exact_tmix("async_ps", n) == n  # round-robin is the default


@pytest.mark.parametrize("n", [2, 4, 8, 16])
@pytest.mark.parametrize("m", [1, 2, 3, 10])
def test_local_steps_and_reduced_frequency_are_m_n(n: int, m: int) -> None:
    assert exact_tmix("local_steps", n, period=m) == m * n
    assert exact_tmix("reduced_frequency", n, period=m) == m * n


def test_step_defaults_are_the_papers() -> None:
    assert exact_tmix("local_steps", 8) == 2 * 8  # Fig. 3: m = 2
    assert exact_tmix("reduced_frequency", 8) == 10 * 8


@pytest.mark.parametrize("n", [2, 4, 8, 16])
@pytest.mark.parametrize(("gamma", "k"), [(0.9, 1), (0.5, 1), (0.3, 2), (0.1, 7), (0.01, 69)])
def test_slack_is_n_ceil_ln2_over_rate(n: int, gamma: float, k: int) -> None:
    # k = ⌈ln 2/−ln(1−γ)⌉, written out: γ = 0.5 is an exact tie, (1 − γ)¹ = ½, which Assumption
    # 2's "≤ ½" counts as halved, and a float ceiling there would depend on libm's last bit.
    assert exact_tmix("slack", n, gamma=gamma) == n * k


def test_slack_spec_values() -> None:
    assert exact_tmix("slack", 8, gamma=0.1) == 56  # the paper's n/γ would say 80
    assert exact_tmix("slack", 8, gamma=1e-3) == 5544
    assert exact_tmix("slack", 8, gamma=1e-4) == 55456
    assert exact_tmix("slack", 8, gamma=1.0) == 8  # γ = 1 is AllReduce


@pytest.mark.parametrize("n", [4, 6, 8, 10, 16, 32])
def test_sync_ring_matches_lambda2_rule(n: int) -> None:
    w = make_topology("ring", n).metropolis()
    np.testing.assert_allclose(w[0, [n - 1, 0, 1]], [1 / 3] * 3)
    eig = np.sort(np.abs(np.linalg.eigvalsh(w)))
    lam2 = eig[-2]  # the largest |λ| once the eigenvalue 1 of the vector 1 is dropped
    if n % 2 == 0:
        assert lam2 == pytest.approx((1 + 2 * math.cos(2 * math.pi / n)) / 3)
    rounds = math.log(2) / -math.log(lam2)
    assert abs(rounds - round(rounds)) > 0.05  # no tie: the same ceiling on every machine
    assert exact_tmix("sync_gossip", n) == n * math.ceil(rounds)


def test_sync_ring_spec_table() -> None:
    got = {n: exact_tmix("sync_gossip", n, topology="ring") for n in (4, 8, 16, 32)}
    assert got == {4: 4, 8: 32, 16: 224, 32: 1728}


def test_sync_gossip_on_complete_graph_is_allreduce() -> None:
    assert exact_tmix("sync_gossip", 8, topology="complete") == 8


@pytest.mark.parametrize(
    ("name", "params"), [*DETERMINISTIC, ("local_steps", {"period": 3}), ("slack", {})]
)
@pytest.mark.parametrize("n", [3, 4, 8])
def test_exact_matches_brute_force_over_every_start(
    name: str, params: dict[str, Any], n: int
) -> None:
    if params.get("topology") == "random-regular:3" and n % 2:
        params = {}
    proto = build_protocol(name, n, **params)
    assert proto.exact_tmix() == _brute_tmix(proto)


def test_weights_file_symmetric_and_not(tmp_path: Path) -> None:
    n = 5
    lazy = np.full((n, n), 0.1) + 0.5 * np.eye(n)  # symmetric: |λ₂| = 0.5 → one round
    (tmp_path / "lazy.json").write_text(json.dumps(lazy.tolist()))
    proto = build_protocol("sync_gossip", n, weights=str(tmp_path / "lazy.json"))
    assert proto.exact_tmix() == proto.closed_form == n
    shift = 0.5 * np.eye(n) + 0.5 * np.roll(np.eye(n), 1, axis=1)  # not symmetric
    (tmp_path / "shift.json").write_text(json.dumps(shift.tolist()))
    proto = build_protocol("sync_gossip", n, weights=str(tmp_path / "shift.json"))
    assert proto.closed_form is None  # the λ₂ rule assumes a symmetric W
    assert proto.exact_tmix() == _brute_tmix(proto)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([[0.5, 0.5], [0.5, 0.5]], "3×3"),
        ([[0.6, 0.4, 0.0], [0.4, 0.6, 0.0], [0.0, 0.0, 0.9]], "not doubly stochastic"),
        ([[1.5, -0.5, 0.0], [-0.5, 1.5, 0.0], [0.0, 0.0, 1.0]], "not doubly stochastic"),
        (np.eye(3).tolist(), "never mixes"),  # doubly stochastic but disconnected
        ("nope", "matrix"),
    ],
)
def test_bad_weights_are_config_errors(tmp_path: Path, matrix: Any, message: str) -> None:
    path = tmp_path / "w.json"
    path.write_text(json.dumps(matrix))
    with pytest.raises(ConfigError, match=message):
        exact_tmix("sync_gossip", 3, weights=str(path))


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match=r"is random.*--runs"):
        exact_tmix("async_gossip", 8)
    with pytest.raises(ConfigError, match="--runs"):
        exact_tmix("async_ps", 8, scheduling="random")
    with pytest.raises(ConfigError, match="unknown protocol"):
        exact_tmix("ring_allreduce", 8)
    with pytest.raises(ConfigError, match="gamma does not apply to allreduce"):
        exact_tmix("allreduce", 8, gamma=0.5)
    with pytest.raises(ConfigError, match="0 < γ ≤ 1"):
        exact_tmix("slack", 8, gamma=1.5)
    with pytest.raises(ConfigError, match="between 2 and"):
        exact_tmix("allreduce", 1)
    with pytest.raises(ConfigError, match="exceeds 1,000,000 events"):
        exact_tmix("slack", 8, gamma=1e-7)
    with pytest.raises(ConfigError, match="unknown scheduling"):
        exact_tmix("async_ps", 4, scheduling="fifo")


# --- sampled t_mix of the random protocols ---------------------------------------------------


@pytest.mark.parametrize("n", [4, 8, 16])
def test_random_parameter_server_is_coupon_collector(n: int) -> None:
    dist = sample_tmix("async_ps", n, runs=1000, seed=1, scheduling="random")
    harmonic = n * sum(1 / k for k in range(1, n + 1))
    assert abs(dist.mean - harmonic) <= 4 * dist.stderr
    assert dist.min >= n  # every cache must be pulled at least once


@pytest.mark.parametrize(("n", "reference"), [(4, 7.1), (8, 31.4), (16, 177.6)])
def test_async_ring_gossip_near_spec_table(n: int, reference: float) -> None:
    # The reference 7.1 at n = 4 counts windows whose norm is exactly ½ as not halved (a float
    # rounding artifact; ½ is attained exactly with dyadic matrices); "≤ ½" gives about 6.7.
    dist = sample_tmix("async_gossip", n, runs=1000, seed=0)
    assert dist.mean == pytest.approx(reference, rel=0.10)
    assert dist.min <= dist.median <= dist.p90 <= dist.max


def test_sampling_is_reproducible_and_seeded() -> None:
    a = sample_tmix("async_gossip", 8, runs=50, seed=3)
    assert a == sample_tmix("async_gossip", 8, runs=50, seed=3)
    assert a != sample_tmix("async_gossip", 8, runs=50, seed=4)
    assert a.runs == len(a.values) == 50


def test_sampling_a_deterministic_protocol_is_its_t0_window() -> None:
    dist = sample_tmix("sync_gossip", 8, runs=5)
    assert dist.values == (32,) * 5


@pytest.mark.parametrize(("name", "params"), RANDOM)
def test_first_halving_search_matches_a_linear_scan(name: str, params: dict[str, Any]) -> None:
    proto = build_protocol(name, 6, **params)
    for seed in range(20):
        fast = _first_halving(
            proto.q, proto.stream(0, np.random.default_rng(seed)), True, 10**6, name
        )
        p, tau = proto.q.copy(), 0
        while not halves(float(np.linalg.norm(p, 2))):
            p = proto.operator(tau, seed) @ p
            tau += 1
        assert fast == tau


def test_event_operator_is_periodic_or_seeded() -> None:
    j = np.full((4, 4), 0.25)
    np.testing.assert_array_equal(event_operator("allreduce", 4, 3), j)
    np.testing.assert_array_equal(event_operator("allreduce", 4, 7), j)
    np.testing.assert_array_equal(event_operator("allreduce", 4, 5), np.eye(4))
    a = event_operator("async_gossip", 6, 17, seed=2)
    np.testing.assert_array_equal(a, event_operator("async_gossip", 6, 17, seed=2))
    assert sorted(np.diag(a).tolist()) == [0.5, 0.5, 1, 1, 1, 1]


# --- ties: windows whose norm is exactly ½ --------------------------------------------------
# Their computed norm lands a few ulps either side of ½ depending on the BLAS kernel, so every
# check below also moves the computed value by a few ulps and wants the same answer.

ULPS = (-4, -1, 0, 1, 4)
TIE_KS = range(1, 16)  # the failures: slack k = 2, 3, 7, 9, 12; sync gossip k = 1…7


def _ulps(x: float, k: int) -> float:
    """x moved by k units in the last place."""
    for _ in range(abs(k)):
        x = float(np.nextafter(x, math.copysign(math.inf, k)))
    return x


def test_halves_counts_half_up_to_rounding_as_half() -> None:
    for k in ULPS:
        assert halves(_ulps(0.5, k)), k
    assert halves(0.5 * (1 - 1e-6))
    assert not halves(0.5 * (1 + 1e-6))
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 4)))[0]  # ‖q‖₂ = 1
    for k in ULPS:
        assert _halved(q * _ulps(0.5, k)), k
    assert not _halved(q * 0.5 * (1 + 1e-6))


@pytest.mark.parametrize("k", TIE_KS)
def test_slack_ties_exact_and_closed_form_agree(k: int) -> None:
    # γ = 1 − 2^{−1/k}: (1 − γ)^k = ½ exactly, so t_mix = n·k, also with γ a few ulps off
    n = 5
    gamma = 1 - 2 ** (-1 / k)
    for shift in ULPS:
        proto = build_protocol("slack", n, gamma=_ulps(gamma, shift))
        assert proto.exact_tmix() == proto.closed_form == n * k, shift


@pytest.mark.parametrize("k", TIE_KS)
def test_sync_gossip_ties_exact_and_closed_form_agree(k: int) -> None:
    # W = aI + (1 − a)J, a = 2^{−1/k}: |λ₂| = a and a^k = ½, whatever last bits eigvalsh gives λ₂
    n = 5
    a = 2 ** (-1 / k)
    w = a * np.eye(n) + (1 - a) * np.full((n, n), 1 / n)
    proto = build_protocol("sync_gossip", n, weights=w)
    assert proto.derived["lambda2"] == pytest.approx(a, rel=1e-12)
    assert proto.exact_tmix() == proto.closed_form == n * k
    for shift in ULPS:
        assert _rounds_to_halve(_ulps(proto.derived["lambda2"], shift)) == k, shift


def _psd_exact(m: list[list[Fraction]]) -> tuple[bool, bool]:
    """(M ⪰ 0, M singular) for a symmetric rational M, by exact symmetric elimination."""
    m = [row[:] for row in m]
    singular = False
    for k, row_k in enumerate(m):
        pivot = row_k[k]
        if pivot < 0 or (pivot == 0 and any(row_k[k + 1 :])):
            return False, singular
        if pivot == 0:
            singular = True
            continue
        for row in m[k + 1 :]:
            if row[k]:
                f = row[k] / pivot
                row[k:] = [x - f * y for x, y in zip(row[k:], row_k[k:], strict=True)]
    return True, singular


def _exact_first_halving(events: list[Any], n: int) -> tuple[int, bool]:
    """First τ with ‖P_τ Q‖₂ ≤ ½ in rational arithmetic, and whether that norm is exactly ½.

    ‖PQ‖₂ = ‖P(I − J)‖₂ (QQᵀ = I − J), and ‖A‖₂ ≤ ½ ⇔ ¼I − AᵀA ⪰ 0, singular exactly when
    ‖A‖₂ = ½ (A1 = 0, so ¼ is always an eigenvalue and never 0)."""
    a = [[Fraction(int(i == j)) - Fraction(1, n) for j in range(n)] for i in range(n)]
    for tau, ev in enumerate(events, 1):
        row = [(x + y) / 2 for x, y in zip(a[ev.i], a[ev.j], strict=True)]
        a[ev.i], a[ev.j] = row, row[:]
        cols = list(zip(*a, strict=True))
        m = [
            [Fraction(int(i == j), 4) - sum(x * y for x, y in zip(ci, cj, strict=True))
             for j, cj in enumerate(cols)]
            for i, ci in enumerate(cols)
        ]  # fmt: skip
        psd, singular = _psd_exact(m)
        if psd:
            return tau, singular
    raise AssertionError("no halving within the recorded events")


@pytest.mark.parametrize(("n", "runs", "min_ties"), [(4, 200, 0.15), (6, 40, 0.02)])
def test_async_ring_sampled_tmix_counts_ties_as_halved(
    n: int, runs: int, min_ties: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sample_tmix's runs against exact rational arithmetic: equal on every run, ties included
    # (norm exactly ½, the window halves: "≤ ½"), and still equal with every computed norm a few
    # ulps off. Ties decide many runs (about 29 % at n = 4, 8 % at n = 6).
    proto = build_protocol("async_gossip", n)
    exact, ties = [], 0
    for ss in np.random.SeedSequence(0).spawn(runs):
        events = [ev for _, ev in islice(proto.stream(0, np.random.default_rng(ss)), 500)]
        tau, tie = _exact_first_halving(events, n)
        exact.append(tau)
        ties += tie
    assert ties >= min_ties * runs
    original = halves
    for shift in ULPS:
        monkeypatch.setattr(mixing, "halves", lambda x, s=shift: original(_ulps(x, s)))
        assert sample_tmix("async_gossip", n, runs=runs, seed=0).values == tuple(exact), shift


# --- Assumption 1 and Lemma 1 ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), DETERMINISTIC + RANDOM)
def test_consensus_projector_commutes(name: str, params: dict[str, Any]) -> None:
    proto = build_protocol(name, 8, **params)
    assert proto.assumption1_residual() < 1e-12
    assert proto.monotone


def test_every_protocol_is_covered() -> None:
    assert {name for name, _ in DETERMINISTIC + RANDOM} == set(PROTOCOLS)


@pytest.mark.parametrize(("name", "params"), DETERMINISTIC)
def test_lemma1_on_every_window_deterministic(name: str, params: dict[str, Any]) -> None:
    check = lemma1_holds(name, 8, **params)
    assert check.holds, check
    assert check.t_mix == exact_tmix(name, 8, **params)
    assert check.xi >= 1.0


@pytest.mark.parametrize(("name", "params"), RANDOM)
def test_lemma1_on_every_window_of_a_random_schedule(name: str, params: dict[str, Any]) -> None:
    check = lemma1_holds(name, 8, seed=5, **params)
    assert check.holds, check
    assert check.windows > check.length  # all windows, not one per start


def test_parameter_server_xi_is_above_one() -> None:
    # Copy operators expand: the limit M_∞ (server copied into n caches) has norm √(n+1).
    assert lemma1_holds("async_ps", 8).xi == pytest.approx(3.0)


# --- the command -----------------------------------------------------------------------------


def test_cli_json_exact() -> None:
    res = CliRunner().invoke(app, ["mixing", "--protocol", "allreduce", "-n", "8", "--json"])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.strip().splitlines()) == 1
    data = json.loads(res.stdout)
    assert data["t_mix"] == 8 and data["protocol"] == "allreduce" and data["n"] == 8
    assert "params" in data and "distribution" not in data


def test_cli_json_runs_has_distribution() -> None:
    res = CliRunner().invoke(
        app, ["mixing", "-p", "async_gossip", "-n", "4", "--runs", "200", "--seed", "1", "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    dist = data["distribution"]
    assert set(dist) == {"mean", "median", "p90", "min", "max", "runs"}
    assert dist["runs"] == 200 and data["t_mix"] == dist["mean"]
    assert data["params"] == {"topology": "ring", "seed": 1}


def test_cli_random_protocol_defaults_to_sampling() -> None:
    res = CliRunner().invoke(app, ["mixing", "-p", "async_ps", "--scheduling", "random", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["distribution"]["runs"] == 1000


def test_cli_table() -> None:
    res = CliRunner().invoke(app, ["mixing", "-p", "sync_gossip", "-n", "16"])
    assert res.exit_code == 0, res.output
    assert "224" in res.stdout and "0.949253" in res.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--protocol", "ring_allreduce"], "unknown protocol 'ring_allreduce'"),
        (["-p", "async_gossip", "--exact"], "--runs"),
        (["-p", "slack", "--gamma", "0"], "0 < γ ≤ 1"),
        (["-p", "allreduce", "--gamma", "0.5"], "does not apply"),
        (["-p", "allreduce", "-n", "1"], "between 2"),
        (["-p", "allreduce", "--exact", "--runs", "3"], "exclude each other"),
        (["-p", "sync_gossip", "--weights", "/nonexistent.json"], "weights file"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["mixing", *args])
    assert res.exit_code == 2
    assert message in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_cli_plot_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "fig3.png"
    res = CliRunner().invoke(
        app, ["mixing", "-p", "async_gossip", "--runs", "20", "--json", "--plot", str(path)]
    )
    assert res.exit_code == 0, res.output
    assert path.read_bytes()[:4] == b"\x89PNG"
    json.loads(res.stdout)  # stdout still holds exactly the one JSON object


@pytest.mark.parametrize("spec", ["ring", "complete", "random-regular:3", "random-regular:4"])
def test_metropolis_rows_are_the_matrix_rows_and_doubly_stochastic(spec: str) -> None:
    """A process takes its gossip weights from its own sparse row (O(degree), so that n = 10⁴
    builds no 800 MB matrix); the rows are the dense matrix's, symmetric, summing to 1."""
    topo = make_topology(spec, 12, seed=3)
    # the definition, densely: 1/(1 + max degree) on each edge, the rest of the row on the diagonal
    deg = [len(ns) for ns in topo.neighbours]
    want = np.zeros((topo.n, topo.n))
    for i, j in topo.edges():
        want[i, j] = want[j, i] = 1.0 / (1 + max(deg[i], deg[j]))
    w = topo.metropolis()
    for i in range(topo.n):
        row = topo.metropolis_row(i)
        assert set(row) == {i, *topo.neighbours[i]}
        off = [j for j in range(topo.n) if j != i]
        np.testing.assert_array_equal(w[i, off], want[i, off])
        assert w[i, i] == row[i] == pytest.approx(1.0 - want[i].sum(), abs=1e-15)
        assert [w[i, j] for j in row] == list(row.values())
        assert math.fsum(row.values()) == pytest.approx(1.0, abs=1e-15)
        assert row[i] > 0
    np.testing.assert_array_equal(w, w.T)
