"""End-to-end smoke: the CLI runs each algorithm and writes its files."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from peerlearn.cli import app


def test_simulate_writes_outputs(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "simulate",
            "--algorithm",
            "alg1",
            "-n",
            "4",
            "-m",
            "2",
            "-T",
            "20",
            "-q",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert len(summary["processes"]) == 4
