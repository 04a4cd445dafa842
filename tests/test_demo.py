"""`peerlearn demo` end to end, shortened."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from peerlearn.cli import app
from peerlearn.config import ALGORITHMS
from peerlearn.demo import DemoSettings, run_demo


def test_demo_trains_and_compares_with_sequential_sgd(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    result = run_demo(DemoSettings(duration=4.0, out=tmp_path), console)
    text = console.export_text()
    assert "status pages" in text and "/metrics" in text
    assert "sequential SGD" in text and "test accuracy" in text
    assert result["gradient_evaluations"] > 100
    assert result["test_accuracy"] > 0.85  # digits, softmax regression
    assert abs(result["test_accuracy"] - result["sequential_test_accuracy"]) < 0.1
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_rejects_nonsense() -> None:
    res = CliRunner().invoke(app, ["demo", "--algorithm", "nope"])
    assert res.exit_code == 2 and "unknown algorithm" in res.output


def test_demo_runs_standalone_agreement(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    result = run_demo(DemoSettings(algorithm="maa", duration=2.0, out=tmp_path), console)
    assert result["instances"] > 0
    assert "instances completed" in console.export_text()


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a not in ("alg1", "maa")])
def test_demo_runs_every_algorithm(algorithm: str, tmp_path: Path) -> None:
    """Short demos of the other algorithms: each trains softmax regression across three
    daemons and ends within reach of sequential SGD with the same gradient budget."""
    result = run_demo(
        DemoSettings(algorithm=algorithm, duration=1.5, out=tmp_path),
        Console(record=True, width=120),
    )
    assert result["gradient_evaluations"] > 100
    assert result["test_accuracy"] > 0.8
    assert result["test_accuracy"] > result["sequential_test_accuracy"] - 0.1
