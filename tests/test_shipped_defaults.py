"""What peerlearn ships runs within its own theory: every config under configs/, the compose
file, the Kubernetes ConfigMap, the demo's defaults for each algorithm and the README's
`peerlearn simulate` examples break none of the conditions `theory_warnings` and
`unused_settings` check (a user's first run must not start with a warning nobody explains)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from peerlearn.cli import app
from peerlearn.config import ALGORITHMS, RunConfig, load_config
from peerlearn.daemon.config import load_node_config
from peerlearn.demo import SHORT_AGREEMENT, DemoSettings
from peerlearn.runs import build_problem

ROOT = Path(__file__).resolve().parents[1]
SIMULATE_CONFIGS = ("demo.toml", "simulate.toml")
NODE_CONFIGS = ("node.toml", "local-3/node0.toml", "local-3/node1.toml", "local-3/node2.toml")


def _warnings(run: RunConfig) -> list[str]:
    problem = build_problem(run)
    return run.unused_settings() + (run.theory_warnings(problem.constants) if problem else [])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in os.environ:
        if name.startswith("PEERLEARN_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_config_file_is_covered() -> None:
    shipped = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.toml")}
    assert shipped == {*SIMULATE_CONFIGS, *NODE_CONFIGS}


@pytest.mark.parametrize("name", SIMULATE_CONFIGS)
def test_simulate_configs_warn_about_nothing(name: str) -> None:
    assert _warnings(load_config(ROOT / "configs" / name)) == []


@pytest.mark.parametrize("name", NODE_CONFIGS)
def test_node_configs_warn_about_nothing(name: str, clean_env: pytest.MonkeyPatch) -> None:
    assert _warnings(load_node_config(ROOT / "configs" / name).run) == []


def test_compose_daemons_warn_about_nothing(clean_env: pytest.MonkeyPatch) -> None:
    yaml = pytest.importorskip("yaml", reason="pyyaml (a dev extra) is not installed")
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    daemons = {k: v for k, v in compose["services"].items() if v.get("command") == ["run"]}
    assert len(daemons) == 3
    for service in daemons.values():
        with pytest.MonkeyPatch.context() as mp:
            for key, value in service["environment"].items():
                mp.setenv(key, str(value))
            assert _warnings(load_node_config(None).run) == []


def test_k8s_configmap_warns_about_nothing(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml", reason="pyyaml (a dev extra) is not installed")
    cm = yaml.safe_load((ROOT / "configs" / "k8s" / "configmap.yaml").read_text())
    node = tmp_path / "node.toml"
    node.write_text(cm["data"]["node.toml"])
    cfg = load_node_config(node, {"advertise": "peerlearn-0.peerlearn:7000"})
    assert _warnings(cfg.run) == []


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_demo_defaults_warn_about_nothing(algorithm: str, clean_env: pytest.MonkeyPatch) -> None:
    """The demo's default η for every algorithm meets the step-size conditions; Alg 2's one
    warning is the demo's shortened agreement, which the demo explains when it prints it."""
    settings = DemoSettings(algorithm=algorithm)
    warnings = settings.warnings()
    if algorithm == "alg2":
        assert len(warnings) == 1, warnings
        shortened = f"{SHORT_AGREEMENT['rounds']}/{SHORT_AGREEMENT['inner_rounds']}"
        assert "rounds" in warnings[0] and shortened in warnings[0], warnings
        # and the step itself is fine: with the full agreement nothing is left
        assert DemoSettings(algorithm=algorithm, extra={"maa": {}}).warnings() == []
    else:
        assert warnings == [], warnings


def _readme_simulate_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line
            if line.strip().startswith("peerlearn simulate"):
                commands.append(shlex.split(line)[1:])
    return commands


def _run_readme_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    commands = _readme_simulate_commands()
    algorithms = {cmd[cmd.index("--algorithm") + 1] for cmd in commands}
    assert {"alg1", "alg2", "maa", "dasgd", "async_easgd"} <= algorithms, commands
    monkeypatch.chdir(tmp_path)  # the examples write into runs/
    outputs = []
    for cmd in commands:
        res = CliRunner().invoke(app, [*cmd, "-q"])
        assert res.exit_code == 0, (cmd, res.output)
        assert "warning:" not in res.output, (cmd, res.output)
        outputs.append(res.output)
    return outputs


def test_readme_simulate_examples_configure_without_warnings(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """Fast: each example's flags, up to the point where the simulation would start (the
    warnings are printed before it)."""

    def started(*args: object, **kwargs: object) -> None:
        raise typer.Exit(0)

    clean_env.setattr("peerlearn.sim.runner.run_simulation", started)
    for output in _run_readme_examples(tmp_path, clean_env):
        assert " on " in output  # the run's one-line description: the config was built


@pytest.mark.slow
def test_readme_simulate_examples_run_without_warnings(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """The examples as a user runs them (about 7 s on an idle machine): they finish, warn
    about nothing, and write what the text says."""
    for output in _run_readme_examples(tmp_path, clean_env):
        assert "status: finished" in output, output
    assert (tmp_path / "runs" / "maa" / "trace.jsonl").exists()
