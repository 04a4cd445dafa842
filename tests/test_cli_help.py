"""`--help` of every command: defaults shown, flags shown as flags, short options in words."""

from __future__ import annotations

import re

import pytest
import typer
from typer.core import TyperOption
from typer.testing import CliRunner

from peerlearn.cli import app

COMMANDS = ("simulate", "run", "demo", "mixing")
# Options with no default worth a word: a file to read, repeatable FIELD=VALUE, log format
# (documented with its choices), an optional output path.
NO_DEFAULT = {"config", "set_", "plot", "log_format"}


def _help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_help_shows_flags_as_flags(command: str) -> None:
    text = _help(*([command] if command else []))
    assert "<bool>" not in text  # typer's default rendering of a flag, as if it took a value
    assert not re.search(r"--([\w-]+)\s*/\s*--no-\1", text), text
    for flag in {"": ["--version", "--help"], "simulate": ["--trace", "--quiet"]}.get(
        command, ["--help"]
    ):
        row = next(line for line in text.splitlines() if f"{flag} " in line)
        # the flag, (its short form), then straight to its description
        assert re.search(rf"{flag}\s+(-\w\s+)?[A-Z]", row), row


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command: str) -> None:
    click_cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    missing = [
        p.name
        for p in click_cmd.params
        if isinstance(p, TyperOption)
        and not p.is_flag
        and not p.required
        and p.name not in NO_DEFAULT
        and p.default is None
        and not isinstance(p.show_default, str)
    ]
    assert not missing, f"{command}: no default shown for {missing}"
    assert "[default:" in _help(command)


def test_help_says_what_short_options_mean() -> None:
    sim = " ".join(_help("simulate").split())  # rows wrap: compare the words
    for short, words in (
        ("-n", "Number of processes n"),
        ("-m", "Number of clusters m"),
        ("-N", "Quorum N"),
        ("-T", "Number of iterations T"),
    ):
        assert re.search(rf"{short} <int> {words}", sim), (short, sim)
    assert "[default: (8)]" in sim and "[default: (100)]" in sim
    mixing = " ".join(_help("mixing").split())
    assert "-n <int> Number of workers n" in mixing
