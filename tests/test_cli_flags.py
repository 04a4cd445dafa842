"""The flag table of `simulate` and `run`: their options come from it, its config paths exist,
and the flags set the fields the table names (unset ones leave the config file alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel
from typer.core import TyperOption
from typer.testing import CliRunner

from peerlearn.cli import app
from peerlearn.cli.flags import FLAGS, command_flags, overrides, takes_flags
from peerlearn.config import RunConfig
from peerlearn.daemon.config import NodeConfig

MODELS: dict[str, type[BaseModel]] = {"simulate": RunConfig, "run": NodeConfig}


@pytest.mark.parametrize("command", MODELS)
def test_the_options_of_a_command_are_its_flags_of_the_table(command: str) -> None:
    click_cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    options = [p for p in click_cmd.params if isinstance(p, TyperOption) and p.name != "help"]
    flags = command_flags(command)
    assert [p.name for p in options] == [f.name for f in flags]
    for param, flag in zip(options, flags, strict=True):
        assert [*param.opts, *param.secondary_opts] == list(flag.declarations(command))
        assert param.help == flag.uses[command].help


@pytest.mark.parametrize("command", MODELS)
def test_every_flag_sets_a_field_of_the_config(command: str) -> None:
    for flag in command_flags(command):
        model: Any = MODELS[command]
        for key in flag.path or ():
            assert isinstance(model, type) and issubclass(model, BaseModel), (flag.name, key)
            assert key in model.model_fields, (flag.name, flag.path)
            model = model.model_fields[key].annotation


def test_a_command_function_that_drifted_from_the_table_is_refused() -> None:
    def simulate(config: Path | None, set_: list[str] | None, overrides: dict[str, Any]) -> None:
        """No --out, no --quiet."""

    with pytest.raises(TypeError, match="out_dir"):
        takes_flags("simulate")(simulate)


def test_flags_map_onto_nested_config_fields() -> None:
    unset = {f.name: f.default for f in FLAGS}
    assert overrides("simulate", {**unset, "crash": []}) == {}
    given = {**unset, "processes": 4, "lr": 0.1, "crash": ["cluster:1@t=3"], "tau": 2}
    assert overrides("simulate", {**given, "trace": True, "quiet": True, "stragglers": 0}) == {
        "processes": 4,
        "lr": {"schedule": "constant", "eta": 0.1},
        "sim": {"crashes": ["cluster:1@t=3"], "stragglers": 0},
        "elastic": {"tau": 2},
        "trace": True,
    }
    daemon = {**unset, "peers": " a:1, b:2,", "problem": "mlp", "exit_on_finish": True}
    assert overrides("run", daemon) == {
        "peers": ["a:1", "b:2"],
        "problem": {"name": "mlp"},
        "exit_on_finish": True,
    }
    assert overrides("run", {**unset, "processes": 4}) == {}  # not a flag of run


def test_set_overrides_a_flag_in_simulate_and_a_flag_overrides_set_in_run() -> None:
    res = CliRunner().invoke(
        app, ["simulate", "-q", "--problem", "nosuch1", "--set", "problem.name=nosuch2"]
    )
    assert res.exit_code == 2 and "'nosuch2'" in res.output and "nosuch1" not in res.output
    res = CliRunner().invoke(app, ["run", "--peers", "bad1", "--set", "peers=['bad2']"])
    assert res.exit_code == 2 and "'bad1'" in res.output and "bad2" not in res.output
