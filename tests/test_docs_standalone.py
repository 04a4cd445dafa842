"""The project's docs, code and configs stand alone: a user's clone has no ``../shared`` (the
engineering notes and paper transcripts the developers read), so nothing may point there — not
by path, and not by the notes' own numbering (a "spec B.5", a "pitfall 9", a paper line "E:L124").
Name the paper, its section, equation or result instead."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLACES = ("README.md", "docs", "peerlearn", "configs")
TEXT = {".md", ".py", ".toml", ".yaml", ".yml", ".json", ".js", ".css", ".html", ".txt", ""}
POINTERS = re.compile(
    r"\.\./shared"
    r"|shared/(?:specs|papers|DESIGN)"
    r"|\bspec(?:'s)? (?:§|[A-D]\.\d|pitfall|rows?\b|tables?\b)"
    r"|\bpitfall \d"
    r"|\bspec ``?[\w-]+\.md"
    r"|\b[EMD]:L\d"  # a line of a paper transcript
)


def pointers(text: str) -> list[str]:
    """The references to the developers' notes in ``text``, one per line that has any."""
    return [line.strip() for line in text.splitlines() if POINTERS.search(line)]


def _files() -> list[Path]:
    found = []
    for place in PLACES:
        path = ROOT / place
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        found += [
            p
            for p in candidates
            if p.is_file() and p.suffix in TEXT and "__pycache__" not in p.parts
        ]
    return found


def test_the_pattern_catches_what_it_should() -> None:
    caught = [
        "it follows `../shared/DESIGN.md`",
        "(`peerlearn/analysis/mixing.py`, spec `../shared/specs/easgd-mixml.md` §B)",
        "following the paper's 1000 runs and spec B.5",
        "future tags of a faster sender (spec pitfall 2)",
        "one stream per process (Attiya–Schiller pitfall 9)",
        "V_∞ (E:L124)",
        "the spec's tables",
        "(spec ``dasgd.md`` §1.3, V0 + V1)",
    ]
    assert [t for t in caught if not pointers(t)] == []
    fine = ["a --crash spec", "spec = parse(text)", "Lemma 7.1 of the supplement, eq. (15)"]
    assert [t for t in fine if pointers(t)] == []


def test_docs_code_and_configs_do_not_point_at_shared() -> None:
    files = _files()
    assert len(files) > 50 and ROOT / "README.md" in files
    offenders = {
        str(p.relative_to(ROOT)): hits
        for p in files
        if (hits := pointers(p.read_text("utf-8", errors="replace")))
    }
    if offenders:
        pytest.fail(f"references to ../shared or its numbering: {offenders}")
