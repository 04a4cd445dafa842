"""Config validation, crash specs, theory warnings, and the CLI's error handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peerlearn.cli import app
from peerlearn.config import load_config
from peerlearn.daemon.config import NodeConfig, load_node_config
from peerlearn.errors import ConfigError, CrashSpecError
from peerlearn.faults import parse_crash
from peerlearn.membership import Membership
from peerlearn.problems import make_problem

ROOT = Path(__file__).resolve().parents[1]


def test_round_robin_membership() -> None:
    m = Membership(7, 3)
    assert m.members == ((0, 3, 6), (1, 4), (2, 5))
    assert m.name(4) == "1.1" and m.pid(1, 1) == 4
    assert m.majority == 2
    with pytest.raises(ConfigError, match=r"no process 2\.2"):
        m.pid(2, 2)
    with pytest.raises(ConfigError, match="cannot fill"):
        Membership(2, 3)


@pytest.mark.parametrize(
    ("spec", "pids", "step", "time", "mode"),
    [
        ("cluster:2@t=10", (2, 6), 10, None, "clean"),
        ("process:3.1@t=5:mid-broadcast", (7,), 5, None, "mid-broadcast"),
        ("process:0.0@time=2.5", (0,), None, 2.5, "clean"),
    ],
)
def test_crash_specs(
    spec: str, pids: tuple[int, ...], step: int | None, time: float | None, mode: str
) -> None:
    c = parse_crash(spec, Membership(8, 4))
    assert (c.pids, c.at_step, c.at_time, c.mode) == (pids, step, time, mode)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cluster:2", "malformed"),
        ("node:1@t=2", "malformed"),
        ("cluster:9@t=1", "no cluster 9"),
        ("process:1.5@t=1", "no process 1.5"),
        ("process:1@t=1", "cluster.index"),
        ("process:1.0@t=0", "t must be"),
        ("process:1.0@time=3:mid-broadcast", "mid-broadcast needs t"),
    ],
)
def test_bad_crash_specs(spec: str, message: str) -> None:
    with pytest.raises(CrashSpecError, match=message):
        parse_crash(spec, Membership(8, 4))


def test_quorum_defaults_to_n_minus_f_and_is_checked() -> None:
    cfg = load_config(overrides={"sim": {"crashes": ["cluster:1@t=3", "process:0.0@t=2"]}})
    assert cfg.failures == 3 and cfg.n_quorum == 5
    with pytest.raises(ConfigError, match=r"N = 6 > n − f = 8 − 3"):
        load_config(
            overrides={"quorum": 6, "sim": {"crashes": ["cluster:1@t=3", "process:0.0@t=2"]}}
        )


def test_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('algorithm = "alg2"\nsteps = 9\n[problem]\nname = "nonconvex"\ndim = 3\n')
    cfg = load_config(path, {"steps": 4})
    assert (cfg.algorithm, cfg.steps, cfg.problem.params) == ("alg2", 4, {"dim": 3})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    path.write_text("steps = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"sim\.nonsense"):
        load_config(overrides={"sim": {"nonsense": 1}})


def test_theory_warnings() -> None:
    quad = make_problem("quadratic", mu=0.5, L=2.0)
    bad = load_config(overrides={"lr": {"schedule": "inverse_time", "beta": 1.0, "gamma": 0.5}})
    warnings = bad.theory_warnings(quad.constants)
    assert any("β > 1/μ" in w for w in warnings)
    assert any("β/(γ+1) ≤ 1/L" in w for w in warnings)
    good = load_config(overrides={"lr": {"schedule": "inverse_time", "beta": 4.0, "gamma": 7.0}})
    assert good.theory_warnings(quad.constants) == []
    alg2 = load_config(overrides={"algorithm": "alg2", "steps": 10})
    assert any("16L²N" in w for w in alg2.theory_warnings(quad.constants))
    big = load_config(overrides={"algorithm": "alg2", "lr": {"eta": 0.6}})  # Lemma 21: η ≤ 1/2
    assert any("min{1/2, 1/L} = 0.5" in w for w in big.theory_warnings(quad.constants))
    fast = load_config(overrides={"lr": {"eta": 0.9}})
    assert any("η ≤ 1/L" in w for w in fast.theory_warnings(quad.constants))
    # β_max(p = 2, ηL = 0.2) = 1.2857: β = 1.9 makes the synchronous center diverge
    unstable = load_config(
        overrides={
            "algorithm": "easgd",
            "processes": 3,
            "clusters": 1,
            "lr": {"eta": 0.1},
            "elastic": {"beta": 1.9},
        }
    )
    assert any("β_max = 1.28571" in w for w in unstable.theory_warnings(quad.constants))
    stable = load_config(
        overrides={
            "algorithm": "easgd",
            "processes": 3,
            "clusters": 1,
            "lr": {"eta": 0.1},
            "elastic": {"beta": 1.2},
        }
    )
    assert stable.theory_warnings(quad.constants) == []
    dasgd = load_config(overrides={"algorithm": "dasgd", "lr": {"eta": 0.2}})
    assert any("1/(4·max(L, 1)) = 0.125" in w for w in dasgd.theory_warnings(quad.constants))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--algorithm", "nope"], "algorithm"),
        (["--crash", "cluster:"], "malformed crash spec"),
        (["-n", "2", "-m", "4"], "cannot fill"),
        (["-N", "9"], "N = 9 > n − f"),
        (["--problem", "nope"], "unknown problem"),
        (["--config", "/nonexistent.toml"], "does not exist"),
        (["--algorithm", "dasgd", "--topology", "star"], "unknown topology 'star'"),
        (["--algorithm", "dasgd", "--topology", "random-regular:3", "-n", "7"], "n·d even"),
        (["--algorithm", "easgd", "--alpha", "1.5"], "elastic.alpha"),
        (["--algorithm", "easgd", "--center", "9.0"], "no cluster 9"),
        (["--algorithm", "easgd", "-n", "1", "-m", "1"], "a center and at least one worker"),
        (["--algorithm", "easgd", "-n", "4", "-m", "2", "--beta", "3.5"], "must be < 1"),
        (["--algorithm", "slack", "--gamma", "0"], "mix.gamma"),
        (["--algorithm", "dasgd", "--set", "lr.schedule=inverse_time"], "fixed η"),
        (["--set", "nonsense"], "expected FIELD=VALUE"),
        (["--set", "elastic=1", "--set", "elastic.tau=2"], "elastic was set to a value"),
        (["--algorithm", "easgd", "--set", "elastic.center=0.1"], "quote it"),
        (["--algorithm", "easgd", "--alpha", "0.1", "--beta", "0.5"], "not both"),
        (["--algorithm", "slack", "--set", "lr.schedule=sqrt_n_over_t"], "fixed η"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["simulate", "-q", *args])
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


def test_cli_blocked_run_lists_waiting_processes(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "simulate",
            "-q",
            "--algorithm",
            "maa",
            "-n",
            "4",
            "-m",
            "4",
            "-T",
            "2",
            "--crash",
            "cluster:2@t=1",
            "--crash",
            "cluster:3@t=1",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "blocked" in res.output and "has 2 of 3 clusters" in res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "blocked"
    assert summary["crashed"] == ["2.0", "3.0"]
    assert {b["process"] for b in summary["blocked"]} == {"0.0", "1.0"}
    assert summary["blocked"][0] == {
        "process": "0.0",
        "tag": ["maa", 1, 1],
        "have": 2,
        "need": 3,
        "unit": "clusters",
    }


def test_cli_outputs_and_trace(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "simulate",
            "-q",
            "--config",
            str(ROOT / "configs" / "demo.toml"),
            "-T",
            "3",
            "--trace",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["schema_version"] == 1
    assert summary["config"]["steps"] == 3 and summary["status"] == "finished"
    proc = summary["processes"][0]
    assert set(proc) == {
        "id",
        "cluster",
        "crashed",
        "diverged",
        "restarts",
        "resumed_at",
        "steps_done",
        "x",
        "loss",
        "output",
    }
    assert summary["restarts"] == [] and (proc["restarts"], proc["resumed_at"]) == (0, [])
    assert len(proc["output"]) == 10  # Alg 2's x_τ
    assert len(proc["x"]) == 10 and proc["steps_done"] == 3
    header, *rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert header == "time,process,step,loss,consensus_distance" and rows
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(x) for x in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert {"instance", "round", "inner_round", "process", "cluster", "value"} == set(lines[0])
    rounds = summary["derived"]["agreement_rounds"]
    outputs = [x for x in lines if x["round"] == rounds + 1 and x["inner_round"] is None]
    processes = summary["config"]["processes"]  # configs/demo.toml's
    assert len(outputs) == 3 * processes  # one per instance and process (no crash by t = 3)
    assert any(x["inner_round"] == 15 for x in lines)  # SMMAA outputs: inner round 14 + 1


def test_cli_same_seed_same_summary(tmp_path: Path) -> None:
    args = ["simulate", "-q", "--algorithm", "alg1", "-n", "6", "-m", "3", "-T", "15"]
    for d in ("a", "b"):
        assert CliRunner().invoke(app, [*args, "--out", str(tmp_path / d)]).exit_code == 0
    assert (tmp_path / "a" / "summary.json").read_text() == (
        tmp_path / "b" / "summary.json"
    ).read_text()
    assert (tmp_path / "a" / "metrics.csv").read_text() == (
        tmp_path / "b" / "metrics.csv"
    ).read_text()


def test_documented_template_states_the_defaults() -> None:
    """configs/simulate.toml documents every field with its default: keep them in sync."""
    documented = load_config(ROOT / "configs" / "simulate.toml")
    defaults = load_config()
    assert documented.model_dump(exclude={"problem"}) == defaults.model_dump(exclude={"problem"})
    quad = make_problem("quadratic")
    built = make_problem("quadratic", **documented.problem.params)
    assert built.dim == quad.dim and built.constants.L == quad.constants.L
    assert built.constants.mu == quad.constants.mu
    assert built.constants.sigma2 == quad.constants.sigma2


def test_membership_with_uneven_cluster_sizes() -> None:
    m = Membership.of_sizes([3, 1, 2])
    assert m.members == ((0, 3, 5), (1,), (2, 4))
    assert [m.name(p) for p in range(6)] == ["0.0", "1.0", "2.0", "0.1", "2.1", "0.2"]
    assert m.pid(0, 2) == 5 and m.index(5) == 2
    with pytest.raises(ConfigError, match="do not split"):
        Membership(6, 3, (3, 3, 0))
    even = Membership(7, 3)
    assert even.cluster_of == tuple(p % 3 for p in range(7))  # round-robin by default


def test_node_template_states_the_defaults() -> None:
    from peerlearn.daemon.config import NodeConfig, load_node_config

    documented = load_node_config(ROOT / "configs" / "node.toml")
    assert documented.model_dump() == NodeConfig().model_dump()


def test_local_3_configs_agree_on_the_run() -> None:
    from peerlearn.daemon.config import load_node_config

    cfgs = [load_node_config(ROOT / "configs" / "local-3" / f"node{i}.toml") for i in range(3)]
    assert [c.me.cluster for c in cfgs] == [0, 1, 2]
    assert len({c.fingerprint for c in cfgs}) == 1
    assert cfgs[0].run.n_quorum == 4  # n = 6, f = ⌊5/2⌋ = 2


def test_node_config_precedence_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peerlearn.daemon.config import load_node_config

    path = tmp_path / "n.toml"
    path.write_text("steps = 5\nworkers = 3\n[lr]\neta = 0.2\n")
    monkeypatch.setenv("PEERLEARN_STEPS", "7")
    monkeypatch.setenv("PEERLEARN_LR__ETA", "0.3")
    cfg = load_node_config(path, {"peers": ["127.0.0.1:7002"]})
    assert (cfg.steps, cfg.workers, cfg.lr.eta) == (7, 3, 0.3)  # env over file
    assert load_node_config(path, {"steps": 9}).steps == 9  # flags over env
    with pytest.raises(ConfigError, match="not host:port"):
        load_node_config(None, {"peers": ["nonsense"]})
    with pytest.raises(ConfigError, match=r"quorum N = 9 > n − f"):
        load_node_config(None, {"quorum": 9})
    with pytest.raises(ConfigError, match="repeat an address"):
        load_node_config(None, {"peers": ["127.0.0.1:7002", "127.0.0.1:7002"]})
    # every daemon may share one list that names itself too (listen defaults to :7001)
    shared = load_node_config(None, {"peers": ["127.0.0.1:7002", "127.0.0.1:7001"]})
    assert [d.address for d in shared.all_daemons] == ["127.0.0.1:7001", "127.0.0.1:7002"]
    # from the environment: comma-separated or JSON; an empty PEERLEARN_STEPS is unlimited
    monkeypatch.setenv("PEERLEARN_PEERS", "127.0.0.1:7002, 127.0.0.1:7003")
    monkeypatch.setenv("PEERLEARN_STEPS", "")
    env = load_node_config(None)
    assert env.peers == ["127.0.0.1:7002", "127.0.0.1:7003"] and env.steps is None
    monkeypatch.setenv("PEERLEARN_PEERS", '["127.0.0.1:7002"')
    with pytest.raises(ConfigError, match="not a JSON list"):
        load_node_config(None)


@pytest.mark.parametrize(
    "algorithm", ["dasgd", "easgd", "eamsgd", "mdownpour", "reduced_frequency", "async_gossip"]
)
def test_cli_simulates_the_other_papers(algorithm: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "simulate",
            "-q",
            "--algorithm",
            algorithm,
            "-n",
            "5",
            "-m",
            "5",
            "-T",
            "20",
            "--lr",
            "0.01",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "status: finished" in res.output and "stationary" in res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["algorithm"] == algorithm
    assert summary["stationary_distance"] >= 0
    if algorithm == "dasgd":
        assert "S_max" in res.output and "Ŝ_max" in res.output
        st = summary["staleness"]
        assert st["S_max"] <= st["S_hat_max"] and st["S_avg"] <= st["S_hat_avg"]
    else:
        assert summary["staleness"] is None


def test_settings_another_algorithm_uses_are_warned_about() -> None:
    shared = {"topology": "ring", "elastic": {"tau": 4}, "mix": {"gamma": 0.5}}
    warnings = load_config(overrides={"algorithm": "alg1", **shared}).unused_settings()
    assert len(warnings) == 3 and any("elastic.tau is ignored by alg1" in w for w in warnings)
    # each applies to some algorithm: no warning there
    assert (
        load_config(overrides={"algorithm": "downpour", "elastic": {"tau": 4}}).unused_settings()
        == []
    )
    assert load_config(
        overrides={"algorithm": "mdownpour", "elastic": {"tau": 4}}
    ).unused_settings()
    # the documented template (defaults) warns about nothing, whatever the algorithm
    for algorithm in ("alg1", "dasgd", "slack", "easgd"):
        cfg = load_config(ROOT / "configs" / "simulate.toml", {"algorithm": algorithm})
        assert cfg.unused_settings() == []
    res = CliRunner().invoke(app, ["simulate", "-q", "-T", "3", "--topology", "ring"])
    assert res.exit_code == 0 and "topology is ignored by alg1" in res.output


def test_mixing_plot_to_a_bad_path_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")  # a file where the plot's directory would go
    res = CliRunner().invoke(
        app, ["mixing", "-p", "allreduce", "--plot", str(tmp_path / "file" / "x.png")]
    )
    assert res.exit_code == 2 and "cannot write the plot" in res.output
    assert "Traceback" not in res.output


def test_a_typo_in_a_config_file_names_the_file_the_line_and_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('algorithm = "alg1"\nstpes = 10\n\n[lr]\neat = 0.1\n')
    res = CliRunner().invoke(app, ["simulate", "-q", "--config", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert f"{path}, line 2: unknown setting `stpes` (did you mean `steps`?)" in res.output
    assert f"{path}, line 5: unknown setting `lr.eat` (did you mean `lr.eta`?)" in res.output
    # a typo in a flag's --set names no file
    with pytest.raises(ConfigError, match=r"^unknown setting `sim.sample_evry` \(did you mean"):
        load_config(overrides={"sim": {"sample_evry": 1.0}})


def test_a_typo_in_a_node_config_or_its_environment_says_what_was_meant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peerlearn.daemon.config import load_node_config, unknown_environment

    path = tmp_path / "node.toml"
    path.write_text(
        'stpes = 3\nlr.eat = 0.1\n[[daemons]]\ncluster = 0\naddress = "a:1"\nworkers = 1\n'
        '[[daemons]]\ncluster = 1\nadress = "b:1"\nworkers = 1\n'
    )
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    message = str(info.value)
    assert f"{path}, line 1: unknown setting `stpes` (did you mean `steps`?)" in message
    assert f"{path}, line 2: unknown setting `lr.eat` (did you mean `lr.eta`?)" in message
    assert f"{path}, line 9: unknown setting `daemons[1].adress` (did you mean" in message
    monkeypatch.setenv("PEERLEARN_LR__EAT", "0.1")
    with pytest.raises(ConfigError, match="environment variable PEERLEARN_LR__EAT: unknown"):
        load_node_config(None)
    env = {"PEERLEARN_STPES": "3", "PEERLEARN_STEPS": "3", "PEERLEARN_SCREENSHOT": "x", "X": "1"}
    assert unknown_environment(env) == [
        "environment variable PEERLEARN_STPES is not a setting and is ignored "
        "(did you mean PEERLEARN_STEPS?)"
    ]


@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_peers_must_be_a_list_of_host_port(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A space instead of a comma made one peer `a:1 b:2` (host `a:1 b`): a peer that looked
    down forever. Every source now refuses it, naming the item."""
    from peerlearn.daemon.config import load_node_config

    bad, path, flags = "127.0.0.1:7002 127.0.0.1:7003", None, {}
    if source == "flag":
        flags = {"peers": [bad]}
    elif source == "env":
        monkeypatch.setenv("PEERLEARN_PEERS", bad)
    else:
        path = tmp_path / "node.toml"
        path.write_text(f'peers = ["{bad}"]\n')
    with pytest.raises(ConfigError, match=rf"'{bad}' is not host:port \(separate addresses"):
        load_node_config(path, flags)
    for good in ("[::1]:7002", "peer_1:7002", "host-a.example.org:7002", "10.0.0.2:7002"):
        assert load_node_config(None, {"peers": [good]}).peers == [good]
    for wrong in ("::1:7002", "a b:1", "a:1:2", "-a:1", "a:", "[a]:1", "a:70000"):
        with pytest.raises(ConfigError, match="is not host:port"):
            load_node_config(None, {"peers": [wrong]})


def test_user_strings_are_printed_literally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--problem myprob:boom` printed an emoji (the run's description line reads `… on
    myprob:boom: n=…`), and `[/]` crashed the printer: rich markup and emoji codes in what
    the user typed are text."""
    (tmp_path / "myprob.py").write_text(
        "from peerlearn.problems import make_problem\n\n"
        "def boom():\n    return make_problem('quadratic')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    res = CliRunner().invoke(app, ["simulate", "-q", "-T", "2", "--problem", "myprob:boom"])
    assert res.exit_code == 0, res.output
    assert "alg1 on myprob:boom: n=" in res.output and "💥" not in res.output
    for name in ("[/]x:boom", "[bold]b:c", "x:boom"):
        res = CliRunner().invoke(app, ["simulate", "-q", "--problem", name])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert f"problem {name!r}" in res.output


def _node(**fields: object) -> NodeConfig:
    three = {"listen": "127.0.0.1:7001", "peers": ["127.0.0.1:7002", "127.0.0.1:7003"]}
    return load_node_config(None, {**three, "workers": 2, **fields})


def test_the_run_settings_reach_the_daemons_run_as_given() -> None:
    """A daemon's run is built from its own settings (RunSettings, declared once): nested
    sections keep what was set explicitly, so `elastic.alpha` alone is not "alpha and beta"."""
    assert _node(algorithm="easgd", elastic={"alpha": 0.1}).run.elastic_alpha == 0.1
    # one quorum, however it is said: N = n − f with f = ⌊(n−1)/2⌋ by default
    same = {_node().fingerprint, _node(quorum=4).fingerprint, _node(max_failures=2).fingerprint}
    assert len(same) == 1 and _node(quorum=3).fingerprint not in same
    # f means nothing to an algorithm without a quorum
    dasgd = [_node(algorithm="dasgd", lr={"eta": 0.01}, **f) for f in ({}, {"max_failures": 1})]
    assert dasgd[0].fingerprint == dasgd[1].fingerprint
    assert dasgd[1].run.n_quorum == 6
    with pytest.raises(ConfigError, match=r"quorum N = 6 > n − f = 6 − 2"):
        _node(quorum=6, max_failures=2).validate_all()


def test_a_period_is_read_by_the_algorithms_with_one_only() -> None:
    """`mix.period` changes the local-step protocols; for the others it is warned about as
    ignored, and it is."""
    local = load_config(None, {"algorithm": "local_steps", "mix": {"period": 4}})
    assert local.mix_period == 4 and local.unused_settings() == []
    allreduce = load_config(None, {"algorithm": "allreduce", "mix": {"period": 4}})
    assert allreduce.mix_period == 1
    assert allreduce.unused_settings() == [
        "mix.period is ignored by allreduce (it applies to local_steps, reduced_frequency)"
    ]
    assert load_config(None, {"algorithm": "reduced_frequency"}).mix_period == 10


def test_the_fingerprint_covers_cluster_ids_and_workers_not_addresses() -> None:
    """A replaced host keeps its cluster id under a new address: the run is the same; a
    daemon with another number of workers is another run."""

    def node(address2: str, workers2: int = 2) -> NodeConfig:
        daemons = [
            {"cluster": 0, "address": "127.0.0.1:7001", "workers": 2},
            {"cluster": 1, "address": "127.0.0.1:7002", "workers": 2},
            {"cluster": 2, "address": address2, "workers": workers2},
        ]
        return load_node_config(None, {"listen": "127.0.0.1:7001", "daemons": daemons})

    assert node("127.0.0.1:7003").fingerprint == node("10.0.0.9:7100").fingerprint
    assert node("127.0.0.1:7003").fingerprint != node("127.0.0.1:7003", 3).fingerprint
