"""Payload compression: the schemes' arithmetic, error feedback, and the algorithms' laws with
compression on.

The laws are :mod:`tests.test_protocols`' with one change, what error feedback still owes:
with :class:`~tests.helpers.PureNoise` gradients the sum of what every process *meant* to send
is known in advance, and each stream's residual is exactly what it has not sent yet, so

* averaging (AllReduce, local steps, slack, sync gossip): mean(x) + mean(owed) stays at
  x⁰ − (η/n) Σ g — every process averages the very values the others rounded;
* pairwise gossip and the elastic symmetry: conserved as without compression (both ends use
  the two values as sent);
* DOWNPOUR and the parameter server: x̃ + Σ owed = x⁰ − η Σ g;
* DASGD: every model equal, at x⁰ − η (Σ g − Σ owed);
* Alg 1 with N = n: every process averages the same rounded values — equal models, bit for bit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from peerlearn.algorithms.registry import REGISTRY
from peerlearn.compression import (
    Compressor,
    Scheme,
    encode,
    nearest,
    pack,
    packed_size,
    unpack,
)
from peerlearn.config import CompressionConfig, RunConfig
from peerlearn.errors import ConfigError
from peerlearn.runtime.local import ThreadRun
from peerlearn.runtime.worker import WorkerState
from peerlearn.sim.core import Status
from peerlearn.sim.runner import run_simulation
from peerlearn.testing import local_cluster
from tests.helpers import cfg, noise_sum

LOSSY = [Scheme.FP16, Scheme.BF16, Scheme.INT8]
DIM = 40
BLOCK = 16  # 40 values: two whole blocks and a short one
NOISE = {"name": "tests.helpers:PureNoise", "dim": DIM}
ETA = 0.1
X0 = np.arange(1.0, DIM + 1)


# --- the schemes ------------------------------------------------------------------------------


def _vectors(dtype: type) -> st.SearchStrategy[np.ndarray]:
    """Finite vectors over many magnitudes, zeros and exact repeats included."""
    width = 32 if dtype is np.float32 else 64
    return hnp.arrays(
        dtype,
        st.integers(1, 70),
        elements=st.one_of(
            st.floats(-1e4, 1e4, width=width),
            st.floats(-(2.0**-20), 2.0**-20, width=width),
            st.sampled_from([0.0, -0.0, 1.0, 127.0, 65504.0]),
        ),
    )


@pytest.mark.parametrize("scheme", LOSSY)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_rounding_is_idempotent_and_packs_losslessly(
    scheme: Scheme, dtype: type, data: st.DataObject
) -> None:
    value = data.draw(_vectors(dtype))
    rounded = nearest(scheme, value, BLOCK)
    assert rounded is not None and rounded.dtype == value.dtype
    assert np.array_equal(nearest(scheme, rounded, BLOCK), rounded)  # rounds to itself
    raw = pack(scheme, rounded, BLOCK)
    assert raw is not None and raw.size == packed_size(scheme, value.size, BLOCK)
    back = unpack(scheme, raw, value.dtype, value.size, BLOCK)
    assert back.dtype == value.dtype and np.array_equal(back, rounded)


@pytest.mark.parametrize("scheme", LOSSY)
def test_rounding_error_is_within_the_schemes_precision(scheme: Scheme) -> None:
    rng = np.random.default_rng(3)
    value = rng.standard_normal(10_000) * rng.lognormal(0, 1, 10_000)
    rounded = nearest(scheme, value, BLOCK)
    assert rounded is not None
    err = np.abs(rounded - value)
    if scheme is Scheme.INT8:
        # half a step of the block's scale 2^e, and 2^e ≤ max|block|/64
        peak = np.repeat(np.abs(value).reshape(-1, BLOCK).max(axis=1), BLOCK)
        assert (err <= peak / 128).all()
    else:
        # half an ulp of 11 (fp16) or 8 (bf16) significant bits, for values in the normal range
        bits = 11 if scheme is Scheme.FP16 else 8
        normal = np.abs(value) > 1e-4
        assert (err[normal] <= np.abs(value[normal]) * 2.0**-bits).all()
    assert not np.array_equal(rounded, value)  # it did round


@pytest.mark.parametrize("scheme", LOSSY)
def test_a_value_nobody_rounded_does_not_pack(scheme: Scheme) -> None:
    value = np.array([1.0 + 2.0**-30, 3.0])
    assert pack(scheme, value, BLOCK) is None  # sent as plain floats: the wire changes nothing


def test_fp16_overflow_is_sent_exact_and_counted() -> None:
    c = Compressor(Scheme.FP16)
    value = np.array([1e6, 1.0])
    assert nearest(Scheme.FP16, value) is None
    assert c("s", value) is value  # exact, not an infinity
    assert c.exact == 1 and c.owed() == {}


@pytest.mark.parametrize("chunk", [4, 1 << 18])
def test_a_value_that_does_not_fit_goes_exact_with_what_was_owed(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream owed something: the exact value sent is the value plus that, so nothing
    meant is lost — whichever chunk the value that does not fit is in."""
    monkeypatch.setattr("peerlearn.compression._CHUNK", chunk)
    c = Compressor(Scheme.FP16)
    third = np.full(12, 1 / 3)
    first = c("s", third)
    owed = c.owed()["s"]
    assert np.abs(owed).max() > 0
    big = third.copy()
    big[9] = 1e6  # in the third chunk of four values
    sent = c("s", big)
    assert c.exact == 1 and c.owed() == {}
    np.testing.assert_array_equal(sent, big + owed)  # what was meant, all of it
    np.testing.assert_allclose(first + sent, third + big, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_int8_never_rounds_a_finite_value_to_an_infinity(dtype: type) -> None:
    """Rounding the largest float up to 64·2^(e+1) would overflow: such a value goes exact."""
    value = np.array([np.finfo(dtype).max, 1.0], dtype)
    assert encode(Scheme.INT8, value, 8) is None
    c = Compressor(Scheme.INT8, 8)
    assert c("s", value) is value and c.exact == 1


def test_owed_hands_out_copies() -> None:
    c = Compressor(Scheme.INT8, 8)
    c("g", np.full(8, 0.3))
    owed = c.owed()["g"]
    held = owed.copy()
    c("g", np.full(8, 0.7))
    np.testing.assert_array_equal(owed, held)


def test_int8_scales_are_powers_of_two_with_codes_up_to_127() -> None:
    raw = pack(Scheme.INT8, np.array([127.0, -3.0, 0.0, 1.0]), 4)
    assert raw is not None
    assert raw[:4].view(np.int8).tolist() == [127, -3, 0, 1]
    assert raw[4:].view("<i2").tolist() == [0]
    # 127.5 does not fit codes ≤ 127 at scale 1: the scale doubles
    rounded = nearest(Scheme.INT8, np.array([127.5, 3.0]), 4)
    assert rounded is not None and rounded.tolist() == [128.0, 4.0]


@pytest.mark.parametrize("scheme", LOSSY)
def test_error_feedback_sends_everything_but_the_last_residual(scheme: Scheme) -> None:
    rng = np.random.default_rng(0)
    c = Compressor(scheme, BLOCK)
    meant, sent = np.zeros(DIM), np.zeros(DIM)
    for _ in range(50):
        value = rng.standard_normal(DIM)
        meant += value
        sent += c("grad", value)
    np.testing.assert_allclose(sent + c.owed()["grad"], meant, rtol=0, atol=1e-12)
    plain = Compressor(scheme, BLOCK, feedback=False)
    third = np.full(3, 1 / 3)
    assert np.array_equal(plain("grad", third), nearest(scheme, third, BLOCK))
    assert plain.owed() == {}  # rounded, nothing carried over


@pytest.mark.parametrize("scheme", LOSSY)
def test_a_diverged_value_is_left_for_the_runtime_to_catch(scheme: Scheme) -> None:
    """int8 would turn NaN into finite codes: a non-finite value passes unrounded (the runtime
    stops the process on it: the stream's residual goes with it)."""
    for bad in (np.nan, np.inf, -np.inf):
        c = Compressor(scheme, 8)
        c("params", np.full(4, 0.3))
        value = np.array([bad, 1.0, 2.0, 3.0])
        assert c("params", value) is value
        assert encode(scheme, value, 8) is None and pack(scheme, value, 8) is None
        assert c.owed() == {} and c.exact == 0


def test_negative_zero_packs_only_where_the_scheme_has_it() -> None:
    value = np.array([-0.0, 1.0])
    assert pack(Scheme.INT8, value, 8) is None  # int8 has no −0: it would arrive as +0
    raw = pack(Scheme.FP16, value, 8)
    assert raw is not None
    back = unpack(Scheme.FP16, raw, value.dtype, 2, 8)
    assert np.signbit(back[0]) and back[1] == 1.0


@pytest.mark.parametrize("scheme", LOSSY)
def test_an_empty_vector_rounds_to_itself(scheme: Scheme) -> None:
    got = encode(scheme, np.zeros(0), 8)
    assert got is not None and got[0].size == 0 and got[1].size == 0


def test_no_compression_hands_the_value_itself_back() -> None:
    value = np.ones(3)
    assert Compressor()("params", value) is value


# --- config ---------------------------------------------------------------------------------


def test_agreement_alone_cannot_compress() -> None:
    with pytest.raises(ConfigError, match="agreement values"):
        cfg(algorithm="maa", compression={"scheme": "int8"})


def test_every_algorithm_that_learns_says_what_it_compresses() -> None:
    for name, spec in REGISTRY.items():
        assert bool(spec.compressible) == spec.needs_problem, name


# --- the laws, in the simulator ------------------------------------------------------------


def _run_cfg(algorithm: str, scheme: Scheme, n: int = 6, steps: int = 23, **over: Any) -> RunConfig:
    return cfg(
        algorithm=algorithm,
        processes=n,
        clusters=3,
        steps=steps,
        problem=NOISE,
        lr={"eta": ETA},
        compression={"scheme": scheme, "block": BLOCK},
        **over,
    )


def _owed(result: Any, pids: Any = None) -> np.ndarray:
    return sum(
        (
            p.owed
            for p in result.processes
            if p.owed is not None and (pids is None or p.pid in pids)
        ),
        start=np.zeros(DIM),
    )


@pytest.mark.parametrize("scheme", LOSSY)
@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("allreduce", {}),
        ("local_steps", {}),
        ("slack", {}),
        ("sync_gossip", {"topology": "random-regular:3"}),
    ],
)
def test_averaging_keeps_the_average_with_what_is_owed(
    algorithm: str, extra: dict[str, Any], scheme: Scheme
) -> None:
    config = _run_cfg(algorithm, scheme, **extra)
    result = run_simulation(config)
    assert result.status is Status.FINISHED
    n = config.processes
    want = X0 - ETA * noise_sum(config, dict.fromkeys(range(n), 23)) / n
    got = np.mean([p.x for p in result.processes], axis=0) + _owed(result) / n
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.abs(_owed(result)).max() > 0  # rounding happened, and is accounted for


@pytest.mark.parametrize("scheme", LOSSY)
def test_pairwise_gossip_keeps_the_sum(scheme: Scheme) -> None:
    config = _run_cfg("async_gossip", scheme, topology="ring")
    result = run_simulation(config)
    assert result.status is Status.FINISHED
    want = X0 - ETA * noise_sum(config, dict.fromkeys(range(6), 23)) / 6
    got = np.mean([p.x for p in result.processes], axis=0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    _assert_rounded(result, config)


def _assert_rounded(result: Any, config: RunConfig) -> None:
    """The run did round: its models differ from the exact run's (same seed, same schedule)."""
    exact = run_simulation(config.model_copy(update={"compression": CompressionConfig()}))
    xs = np.array([p.x for p in result.processes])
    assert not np.array_equal(xs, np.array([p.x for p in exact.processes]))


@pytest.mark.parametrize("scheme", LOSSY)
@pytest.mark.parametrize("algorithm", ["easgd", "async_easgd"])
def test_the_elastic_symmetry_holds(algorithm: str, scheme: Scheme) -> None:
    config = _run_cfg(algorithm, scheme, elastic={"tau": 2, "center": "1.0"})
    result = run_simulation(config)
    assert result.status is Status.FINISHED
    workers = [p for p in range(6) if p != config.center]
    want = 6 * X0 - ETA * noise_sum(config, dict.fromkeys(workers, 23))
    got = np.sum([p.x for p in result.processes], axis=0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)
    _assert_rounded(result, config)


@pytest.mark.parametrize("scheme", LOSSY)
@pytest.mark.parametrize("algorithm", ["downpour", "async_ps"])
def test_the_center_holds_every_push_but_what_is_owed(algorithm: str, scheme: Scheme) -> None:
    config = _run_cfg(algorithm, scheme, elastic={"tau": 3, "center": "1.0"})
    result = run_simulation(config)
    assert result.status is Status.FINISHED
    workers = [p for p in range(6) if p != config.center]
    want = X0 - ETA * noise_sum(config, dict.fromkeys(workers, 23))
    # DOWNPOUR pushes its accumulated −η·g, the parameter server its gradients g
    owed = _owed(result, workers) * (1.0 if algorithm == "downpour" else -ETA)
    got = result.processes[config.center].x + owed
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scheme", LOSSY)
@pytest.mark.parametrize("topology", ["complete", "ring"])
def test_dasgd_applies_every_rounded_gradient_once_everywhere(
    scheme: Scheme, topology: str
) -> None:
    config = _run_cfg("dasgd", scheme, n=6, steps=12, topology=topology)
    result = run_simulation(config)
    assert result.status is Status.FINISHED
    want = X0 - ETA * (noise_sum(config, dict.fromkeys(range(6), 12)) - _owed(result))
    xs = [p.x for p in result.processes]
    for x in xs:
        np.testing.assert_allclose(x, want, rtol=0, atol=1e-12)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("algorithm", "scheme"),
    [*(("alg1", s) for s in LOSSY), ("allreduce", Scheme.INT8), ("alg2", Scheme.INT8)],
)
def test_a_full_quorum_ends_in_equal_models(algorithm: str, scheme: Scheme) -> None:
    """Every process averages the very values the others rounded: no process is ahead by its
    own unrounded value. (Alg 2 rounds its gradients, and its agreement values stay exact:
    its models agree only as closely as its agreement makes them.)"""
    config = cfg(
        algorithm=algorithm,
        processes=6,
        clusters=3,
        steps=15 if algorithm == "alg1" else 6,
        problem={"name": "logistic"},
        quorum=6,
        compression={"scheme": scheme},
    )
    result = run_simulation(config)
    assert result.status is Status.FINISHED
    xs = np.array([p.x for p in result.processes])
    if algorithm != "alg2":
        assert np.array_equal(xs, np.broadcast_to(xs[0], xs.shape))
    owed = result.processes[0].owed
    assert owed is not None and np.abs(owed).max() > 0  # it rounded


def test_compressed_learning_follows_the_exact_run() -> None:
    """int8 with error feedback trains as the exact run does, to within a few rounding steps."""
    runs = {
        scheme: run_simulation(
            cfg(
                algorithm="alg1",
                processes=6,
                clusters=3,
                steps=80,
                problem={"name": "logistic"},
                compression={"scheme": scheme},
            )
        )
        for scheme in (Scheme.NONE, Scheme.INT8)
    }
    exact = np.mean([p.x for p in runs[Scheme.NONE].processes], axis=0)
    rounded = np.mean([p.x for p in runs[Scheme.INT8].processes], axis=0)
    assert np.linalg.norm(rounded - exact) < 0.01 * np.linalg.norm(exact)


# --- on threads and across daemons: one check of the laws -----------------------------------


def _assert_laws(config: RunConfig, workers: list[Any], steps: int) -> None:
    """The laws of this module's docstring for the finished ``workers`` (threads or daemons'),
    each with its ``compressor``: with what error feedback still owes where the law counts it."""
    xs = {w.pid: w.x for w in workers}
    owed = sum(
        (o for w in workers if (o := w.compressor.owed_total()) is not None),
        start=np.zeros(DIM),
    )
    g = noise_sum(config, dict.fromkeys(range(6), steps))
    match config.algorithm:
        case "dasgd":
            for x in xs.values():
                np.testing.assert_allclose(x, X0 - ETA * (g - owed), rtol=0, atol=1e-12)
        case "async_easgd":
            workers_only = [p for p in range(6) if p != config.center]
            want = 6 * X0 - ETA * noise_sum(config, dict.fromkeys(workers_only, steps))
            np.testing.assert_allclose(np.sum(list(xs.values()), axis=0), want, atol=1e-11)
        case "allreduce":
            got = np.mean(list(xs.values()), axis=0) + owed / 6
            np.testing.assert_allclose(got, X0 - ETA * g / 6, rtol=0, atol=1e-12)
        case "async_gossip":
            got = np.mean(list(xs.values()), axis=0)
            np.testing.assert_allclose(got, X0 - ETA * g / 6, rtol=0, atol=1e-12)
        case other:
            raise AssertionError(f"no law checked here for {other}")


@pytest.mark.parametrize("algorithm", ["dasgd", "async_easgd", "allreduce"])
def test_laws_hold_on_threads(algorithm: str) -> None:
    config = _run_cfg(algorithm, Scheme.INT8, topology="ring" if algorithm == "dasgd" else None)
    run = ThreadRun(config).start()
    assert run.wait(timeout=60), run.states()
    assert set(run.states()) == {WorkerState.FINISHED}
    _assert_laws(config, run.workers, 23)


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("dasgd", {"topology": "ring"}),
        ("async_easgd", {"elastic": {"center": "2.1"}}),
        ("allreduce", {}),
        ("async_gossip", {}),
    ],
)
async def test_laws_hold_across_daemons_with_packed_frames(
    algorithm: str, extra: dict[str, Any]
) -> None:
    """Three daemons × two workers on loopback: the rounded values cross real sockets packed
    (a data frame is a fraction of the floats' size) and unpack to the very values the sender
    used, so the laws hold to the last bit of rounding."""
    async with local_cluster(
        3,
        workers=2,
        algorithm=algorithm,
        steps=25,
        problem=NOISE,
        lr={"eta": ETA},
        compression={"scheme": "int8", "block": BLOCK},
        **extra,
    ) as cluster:
        await cluster.wait_until_finished(timeout=60)
        workers = [w for d in cluster.daemons for w in d.workers]
        assert {w.state for w in workers} == {WorkerState.FINISHED}
        config = cluster.daemons[0].run_cfg
        _assert_laws(config, workers, 25)
        stats, kinds = cluster.daemons[0].stats, config.spec.compressible
        frames = sum(
            n for (d, kind, _), n in stats.messages.items() if d == "out" and kind in kinds
        )
        sent = sum(n for (d, kind, _), n in stats.bytes.items() if d == "out" and kind in kinds)
        # a float frame is 8·40 bytes of payload plus a header of ~60; packed: 46 plus ~70
        assert frames > 0 and sent / frames < 200, (frames, sent)


def test_the_docs_table_lists_what_each_record_rounds() -> None:
    text = (Path(__file__).parent.parent / "docs" / "compression.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", text, re.M))
    assert set(rows) >= set(REGISTRY)
    for name, spec in REGISTRY.items():
        listed = (
            set(re.findall(r"`(\w+)`", rows[name].split("(")[-1])) if spec.compressible else set()
        )
        assert listed == set(spec.compressible), name


def test_the_fingerprint_covers_compression_only_when_it_is_on() -> None:
    """Off, it is not in the fingerprint (turning the feature into the code changed no run's
    fingerprint); on, daemons that differ in it are told which setting differs."""
    from peerlearn.daemon.config import NodeConfig

    def node(**run: Any) -> NodeConfig:
        peers = ["127.0.0.1:7001", "127.0.0.1:7002"]
        return NodeConfig(listen=peers[0], peers=peers, **run)

    plain, off = node(), node(compression={"scheme": "none"})
    on = node(compression={"scheme": "int8"})
    assert plain.fingerprint == off.fingerprint != on.fingerprint
    assert "compression" in on.fingerprint_settings
    assert "compression" not in plain.fingerprint_settings
