"""The learning-quality tests can fail: with averaging switched off (tests/ablation.py), every
one of them must fail. Run as a `slow` test so that a later loosening of one of them is caught."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: the fast learning-quality tests; docs/testing.md has what each measures on and off
LEARNING_TESTS = (
    "tests/test_theorems.py::test_alg1_with_full_quorum_matches_exact_moment_propagation",
    "tests/test_theorems.py::test_thm1_external_and_internal_bounds",
    "tests/test_theorems.py::test_thm1_error_falls_with_n",
    "tests/test_daemon.py::test_three_daemons_train_like_sequential_sgd",
    "tests/test_daemon.py::test_alg1_on_digits_matches_sequential_sgd",
    "tests/test_demo.py::test_demo_trains_and_compares_with_sequential_sgd",
)


@pytest.mark.slow
def test_every_learning_quality_test_fails_without_averaging(tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    plugins = ["-p", "tests.ablation", "-p", "no:cacheprovider"]
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *plugins, f"--junitxml={report}", *LEARNING_TESTS],
        cwd=ROOT,
        capture_output=True,
        timeout=800,
        check=False,  # they are meant to fail: the report says how
    )
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {
        f"{case.get('classname')}::{case.get('name')}": [child.tag for child in case]
        for case in cases
    }
    # test_three_daemons_… runs twice (alg1, alg2): 7 cases from 6 ids
    assert len(outcomes) == len(LEARNING_TESTS) + 1, outcomes
    passed = [name for name, children in outcomes.items() if "failure" not in children]
    assert not passed, f"these pass with averaging off, so they cannot tell: {passed}"
