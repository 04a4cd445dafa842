"""The command line's two consoles and its one way to fail (shared by every command module).

Errors a user can cause print one line on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import typer
from rich.console import Console

__all__ = ["err", "fail", "out"]

err = Console(stderr=True, soft_wrap=True)
out = Console()


def fail(message: str) -> typer.Exit:
    """Print ``message`` as an error and return the exit (code 2) to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)
