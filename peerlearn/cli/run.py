"""``peerlearn run``: one peer daemon on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from peerlearn.cli import render
from peerlearn.cli.flags import parse_set, takes_flags
from peerlearn.config import merge
from peerlearn.console import fail
from peerlearn.errors import PeerlearnError

__all__ = ["run"]


@takes_flags("run")
def run(config: Path | None, set_: list[str] | None, overrides: dict[str, Any]) -> None:
    """Run one peer daemon on this machine (flags > PEERLEARN_* env > --config file)."""
    from peerlearn.daemon.config import load_node_config, unknown_environment
    from peerlearn.daemon.serve import serve

    try:
        # a field both a flag and --set give takes the flag's value
        flags = merge(parse_set(set_ or []), overrides)
        render.warnings(unknown_environment())
        cfg = load_node_config(config, flags)
    except PeerlearnError as exc:
        raise fail(str(exc)) from None
    try:
        code = serve(cfg)
    except OSError as exc:  # e.g. an address in use
        raise fail(f"cannot start the daemon: {exc}") from None
    except PeerlearnError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)
