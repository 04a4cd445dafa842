"""``peerlearn reproduce``: the verdict rule, the report, and the quick run of every
experiment — every claim judged, every figure written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peerlearn.cli import app
from peerlearn.reproduce import EXPERIMENTS, Check, Claim, Experiment, Interval, Outcome
from peerlearn.reproduce.report import render

CLAIM = Claim("Paper", "Lemma 1", "x ≤ 1")


def test_interval_is_students_t_over_seeds() -> None:
    got = Interval.over([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302652729911275 (tables); sd = 1, n = 3
    half = 4.302652729911275 / 3**0.5
    assert (got.mean, got.n) == (2.0, 3)
    assert got.low == pytest.approx(2 - half, rel=1e-9)
    assert got.high == pytest.approx(2 + half, rel=1e-9)
    assert Interval.over([5.0]) == Interval.exact(5.0) == Interval(5.0, 5.0, 5.0, 1)
    with pytest.raises(ValueError, match="at least one"):
        Interval.over([])


def test_verdicts_judge_the_interval_not_the_mean() -> None:
    inside = Interval(0.5, 0.4, 0.9, 8)
    assert Check("q", inside, CLAIM, "at_most", 1.0).verdict == "PASS"
    # the mean is under the bound, the interval is not: not shown to hold
    assert Check("q", inside, CLAIM, "at_most", 0.8).verdict == "FAIL"
    assert Check("q", inside, CLAIM, "at_least", 0.4).verdict == "PASS"  # at the edge
    assert Check("q", inside, CLAIM, "at_least", 0.45).verdict == "FAIL"
    assert Check("q", inside, CLAIM, "equals", 0.85).verdict == "PASS"  # overlaps
    assert Check("q", inside, CLAIM, "equals", 0.95).verdict == "FAIL"
    assert Check("q", inside, CLAIM, "none").verdict == "no verdict"
    # a computed value at its bound, up to the last bits, counts as at the bound
    exact = Interval.exact(0.25 * (1 + 1e-13))
    assert Check("q", exact, CLAIM, "at_most", 0.25).verdict == "PASS"
    assert Check("q", exact, CLAIM, "equals", 0.25).verdict == "PASS"
    assert Check("q", inside, CLAIM, "at_most", 2.0).ratio == 0.25
    with pytest.raises(ValueError, match="a bound goes with a relation"):
        Check("q", inside, CLAIM, "at_most")
    with pytest.raises(ValueError, match="a bound goes with a relation"):
        Check("q", inside, CLAIM, "none", 1.0)


def test_report_shows_each_claim_its_numbers_and_verdict() -> None:
    checks = (
        Check("error", Interval(0.5, 0.4, 0.6, 10), CLAIM, "at_most", 1.0, note="tight"),
        Check("spread", Interval(2.0, 1.0, 3.0, 10), CLAIM, "at_most", 2.5),
        Check("other", Interval.exact(7.0), Claim("Paper", "Sec. 2", "no bound"), "none"),
    )
    text = render(
        [Outcome("demo", "A demo | result", "Paper", "set up so", checks, ("x/demo.png",))],
        90.0,
        "peerlearn reproduce demo --out d",
    )
    assert "**1 of 3 claims pass, 1 fail**; 1 comparisons carry no verdict" in text
    assert "in 1.5 minutes" in text and "`peerlearn reproduce demo --out d`" in text
    assert "- **Lemma 1** (Paper): x ≤ 1" in text  # each claim stated once
    assert "| error (tight) | Lemma 1 | 0.5 [0.4, 0.6] (10 seeds) | ≤ 1 | 0.5 | **PASS** |" in text
    assert "| spread | Lemma 1 | 2 [1, 3] (10 seeds) | ≤ 2.5 | 0.8 | **FAIL** |" in text
    assert "| other | Sec. 2 | 7 | — (no bound stated) | — | no verdict |" in text
    assert "A demo \\| result" in text  # a '|' in a cell does not break the table
    assert "![A demo | result](x/demo.png)" in text


def test_unknown_experiment_is_one_line_and_exit_2(tmp_path: Path) -> None:
    got = CliRunner().invoke(app, ["reproduce", "thm9", "--out", str(tmp_path)])
    assert got.exit_code == 2
    assert "no experiment 'thm9'" in got.output and "alg1-error" in got.output
    assert not (tmp_path / "reproduction.md").exists()


def test_list_names_every_experiment() -> None:
    got = CliRunner().invoke(app, ["reproduce", "list"])
    assert got.exit_code == 0
    for name in EXPERIMENTS:
        assert name in got.output


def test_a_failing_claim_is_reported_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong(quick: bool, figures: Path, say: object) -> Outcome:
        bad = Check("error", Interval(2.0, 1.5, 2.5, 5), CLAIM, "at_most", 1.0)
        return Outcome("wrong", "A wrong claim", "Paper", "none", (bad,))

    monkeypatch.setitem(EXPERIMENTS, "wrong", Experiment("wrong", "Paper", "fails", wrong))
    got = CliRunner().invoke(app, ["reproduce", "wrong", "--out", str(tmp_path)])
    assert got.exit_code == 1
    assert "0 of 1 claims pass, 1 fail" in got.output
    assert "FAIL wrong: error: 2 [1.5, 2.5] (5 seeds) ≤ 1" in got.output
    assert "**FAIL**" in (tmp_path / "reproduction.md").read_text()  # written all the same


def test_an_experiment_that_raises_is_a_failed_row_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(quick: bool, figures: Path, say: object) -> Outcome:
        raise RuntimeError("the run ended blocked")

    def fine(quick: bool, figures: Path, say: object) -> Outcome:
        ok = Check("error", Interval(0.5, 0.4, 0.6, 5), CLAIM, "at_most", 1.0)
        return Outcome("fine", "A fine claim", "Paper", "none", (ok,))

    monkeypatch.setattr(
        "peerlearn.reproduce.EXPERIMENTS",
        {
            "broken": Experiment("broken", "Paper", "raises", broken),
            "fine": Experiment("fine", "Paper", "passes", fine),
        },
    )
    got = CliRunner().invoke(app, ["reproduce", "all", "--out", str(tmp_path)])
    assert got.exit_code == 1
    assert "1 of 2 claims pass, 1 fail" in got.output
    report = (tmp_path / "reproduction.md").read_text()
    assert "RuntimeError: the run ended blocked" in report and "A fine claim" in report


def test_an_unwritable_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    got = CliRunner().invoke(app, ["reproduce", "alg1-error", "--out", str(blocker / "x")])
    assert got.exit_code == 2
    assert "cannot write the report" in got.output


@pytest.mark.timeout(300)
def test_quick_reproduction_judges_every_claim(tmp_path: Path) -> None:
    """The real command, every experiment reduced: it must write the report and every figure,
    and every claim with a verdict must pass."""
    exe = Path(sys.executable).with_name("peerlearn")
    run = subprocess.run(
        [str(exe), "reproduce", "all", "--out", str(tmp_path), "--quick"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = (tmp_path / "reproduction.md").read_text()
    assert "a **quick** run" in report and " 0 fail**" in report
    for name, exp in EXPERIMENTS.items():
        assert f"`peerlearn reproduce {name}`" in report
        assert f"[1/{len(EXPERIMENTS)}]" in run.stderr and exp.summary in run.stderr
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(figures) >= len(EXPERIMENTS)
    for fig in figures:
        assert (tmp_path / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in report.splitlines() if line.startswith("| ") and "seeds" in line]
    assert rows and all(("PASS" in r) or ("no verdict" in r) for r in rows)
