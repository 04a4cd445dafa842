"""The plots: demo.png and simulate's plot.png start at step 0, show the sequential baseline
where there is one, and keep their log-scale panels readable when a value hits 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.axes import Axes

from peerlearn import demo
from peerlearn.config import load_config
from peerlearn.problems import make_problem
from peerlearn.runs import grad_stream
from peerlearn.sim.output import log_panel, sequential_baseline, write_outputs
from peerlearn.sim.runner import run_simulation


def _panel(ys: list[float]) -> Axes:
    _, ax = plt.subplots()
    log_panel(ax, list(range(len(ys))), ys, color="tab:orange")
    return ax


def test_one_dip_or_a_zero_does_not_squash_a_log_panel() -> None:
    rng = np.random.default_rng(0)
    ys = list(10 ** rng.uniform(-3, 0, size=200))
    ys[50], ys[120] = 1e-30, 0.0
    ax = _panel(ys)
    assert ax.get_yscale() == "log"
    bottom, top = ax.get_ylim()
    assert 1e-7 < bottom < 1e-3 and top > 0.5  # the data's three decades fill the panel
    # the dip and the zero are drawn on the floor (marked), not left out
    markers = [line for line in ax.get_lines() if line.get_marker() == "v"]
    assert len(markers) == 1 and np.size(markers[0].get_xdata()) == 2
    plt.close("all")


def test_a_real_descent_keeps_its_decades() -> None:
    ax = _panel(list(np.logspace(0, -20, 100)))
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] < 1e-12
    flat = _panel([0.0] * 10)  # nothing positive: a linear axis, no error
    assert flat.get_yscale() == "linear"
    plt.close("all")


@pytest.fixture
def plotted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Axes, tuple[Any, ...]]]:
    """Every Axes.plot call: (axes, positional arguments)."""
    calls: list[tuple[Axes, tuple[Any, ...]]] = []
    real = Axes.plot

    def record(self: Axes, *args: Any, **kwargs: Any) -> Any:
        calls.append((self, args))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", record)
    return calls


def test_simulate_plot_starts_at_step_0(
    tmp_path: Path, plotted: list[tuple[Axes, tuple[Any, ...]]]
) -> None:
    cfg = load_config(None, {"algorithm": "alg1", "processes": 4, "clusters": 2, "steps": 20})
    result = run_simulation(cfg)
    write_outputs(result, tmp_path)
    (loss_ax, (xs, ys)), (base_ax, (bxs, bys)), (cd_ax, (cd_xs, _)) = plotted[:3]
    problem = make_problem("quadratic")
    start = problem.loss(problem.x0())
    assert xs[0] == 0.0 and ys[0] == pytest.approx(start)
    # the sequential baseline on the loss panel, from the same start, at the same times
    assert base_ax is loss_ax and list(bxs) == list(xs) and bys[0] == pytest.approx(start)
    assert cd_xs[0] == 0.0 and cd_ax.get_yscale() == "log"  # consensus 0 at the start: floored
    assert loss_ax is not cd_ax


def test_simulate_baseline_is_one_process_alone_in_the_same_virtual_time() -> None:
    cfg = load_config(
        None,
        {"algorithm": "alg1", "processes": 4, "clusters": 2, "steps": 30, "seed": 3}
        | {"lr": {"schedule": "constant", "eta": 0.05}},
    )
    result = run_simulation(cfg)
    times = [0.0, 2.5, 10.0]
    baseline = sequential_baseline(result, times)
    # by hand: one gradient per mean compute time (1.0), process 0's noise stream, same η
    problem, rng = make_problem("quadratic"), grad_stream(cfg, 0)
    x, expected = problem.x0(), []
    for steps_before, time in zip([0, 2, 8], times, strict=True):
        for _ in range(steps_before):
            x = x - 0.05 * problem.grad(x, rng)
        expected.append((time, problem.loss(x)))
    assert [t for t, _ in baseline] == times
    assert np.allclose([v for _, v in baseline], [v for _, v in expected], rtol=1e-12)
    agreement = load_config(None, {"algorithm": "maa", "processes": 3, "clusters": 3, "steps": 1})
    assert sequential_baseline(run_simulation(agreement), times) == []


def test_demo_plot_starts_at_step_0_with_the_sequential_baseline(
    tmp_path: Path, plotted: list[tuple[Axes, tuple[Any, ...]]]
) -> None:
    samples = [
        demo._Sample(0.0, 0, [], 2.3, 0.0),
        demo._Sample(0.5, 600, [("0.0", 100, 0.9)], 0.8, 1e-4),
        demo._Sample(1.0, 1200, [("0.0", 200, 0.5)], 0.5, 1e-30),
    ]
    settings = demo.DemoSettings(out=tmp_path)
    demo._plot(samples, settings, [(0, 2.3), (600, 0.6), (1200, 0.4)])
    (ours, (xs, ys)), (_, (seq_xs, *_)) = plotted[0], plotted[1]
    assert list(xs) == [0, 600, 1200] and list(ys) == [2.3, 0.8, 0.5]
    legend = ours.get_legend()
    assert list(seq_xs) == [0, 600, 1200] and legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert any("sequential SGD" in label for label in labels)
    assert (tmp_path / "demo.png").exists()
