"""The ``peerlearn`` command line: the app and its commands.

Each command has its module (``simulate``, ``run``, ``demo``, ``collect``, ``reproduce``;
``mixing`` lives with the analysis code); :mod:`peerlearn.cli.flags` holds the flags of
``simulate`` and ``run`` and the
config fields they set, :mod:`peerlearn.cli.render` what the commands print.

Errors a user can cause (bad flags, bad config, bad problem) print one line and exit with
code 2; they never show a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from peerlearn import __version__
from peerlearn.analysis.mixing_command import mixing
from peerlearn.cli import collect, demo, reproduce, run, simulate
from peerlearn.console import err, escape, out
from peerlearn.errors import PeerlearnError

__all__ = ["app", "main"]


def _bare_flags(params: list[Any]) -> list[Any]:
    """``--help`` shows a boolean flag as the bare flag: typer prints ``<bool>`` after each
    (``--help`` itself included), which reads as if the flag took a value."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))


app = typer.Typer(
    name="peerlearn",
    help="Asynchronous, fully decentralized SGD: simulate the algorithms, run peer daemons.",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"peerlearn {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """peerlearn: asynchronous, fully decentralized SGD across machines."""


# the modules keep their names here (``peerlearn.cli.run`` is the module, not the command)
app.command(cls=_Command)(simulate.simulate)
app.command(cls=_Command)(run.run)
app.command(cls=_Command)(demo.demo)
app.command(name="mixing", cls=_Command)(mixing)
app.command(name="collect", cls=_Command)(collect.collect)
app.command(name="reproduce", cls=_Command)(reproduce.reproduce)


def main() -> None:
    try:
        app()
    except PeerlearnError as exc:  # last resort: a user error that escaped its command
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
