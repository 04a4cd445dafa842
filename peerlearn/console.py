"""The command line's two consoles and its one way to fail (shared by every command module).

Errors a user can cause print one line on stderr and exit with code 2, never a traceback.

Text that comes from the user (names, paths, values, messages quoting them) is printed
literally: emoji codes are off on both consoles (``--problem myprob:boom`` is not an emoji),
and :func:`fail` and :func:`warn` escape rich markup in their message (``[red]`` in a
problem name is text, and ``[/]`` cannot crash the printer). Anything else that prints user
text with ``print`` passes ``markup=False`` or :func:`escape` s it.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["err", "escape", "fail", "out", "warn"]

err = Console(stderr=True, soft_wrap=True, emoji=False)
out = Console(emoji=False)


def fail(message: str) -> typer.Exit:
    """Print ``message`` (literally) as an error and return the exit (code 2) to raise."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code=2)


def warn(message: str, label: str = "warning") -> None:
    """Print ``message`` (literally) on stderr as a warning (or another ``label``)."""
    err.print(f"[yellow]{label}:[/] {escape(message)}", highlight=False)
