"""The algorithm registry is the one home of what each algorithm is: the README's table agrees
with the records, and nothing outside the records branches on an algorithm's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from peerlearn.algorithms.registry import ALGORITHMS, REGISTRY, lookup, readers
from peerlearn.algorithms.spec import OPTIONAL_SETTINGS, AlgorithmSpec
from peerlearn.config import THEORY_CONDITIONS, RunConfig, load_config
from peerlearn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peerlearn"
RECORDS = PACKAGE / "algorithms" / "records"


def _readme_rows() -> dict[str, list[str]]:
    """The README's algorithm table: name → the other cells."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(
        "| algorithm | paper | what is exchanged | waits for | tolerates | parameters |"
    )
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_readme_table_is_the_records() -> None:
    rows = _readme_rows()
    assert list(rows) == list(ALGORITHMS)
    for name, spec in REGISTRY.items():
        assert rows[name] == [
            spec.paper,
            spec.exchanges,
            spec.waits_for,
            spec.tolerates,
            spec.parameters,
        ], name


def _names_in(node: ast.AST) -> set[str]:
    """Algorithm names written as string constants in ``node`` (a comparison's operand)."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value in REGISTRY:
            found.add(sub.value)
    return found


def branches_on_names(source: str, tables: bool = True) -> list[tuple[int, str]]:
    """(line, name) of every comparison or ``case`` against an algorithm's name, of every
    tuple, list or set of names (kept to compare with later) and of every dict keyed by
    names (a table of what algorithms are)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for k, op in enumerate(node.ops):
                # `name in ("alg1", "alg2")` tests a name; `"maa" in extra` (a config
                # section named like the algorithm) does not
                sides = (
                    operands[k + 1 : k + 2]
                    if isinstance(op, ast.In | ast.NotIn)
                    else operands[k : k + 2]
                )
                for side in sides:
                    out += [(node.lineno, n) for n in sorted(_names_in(side))]
        elif isinstance(node, ast.Tuple | ast.List | ast.Set):
            # names kept to compare with later (`algo in _SNAPSHOT_ALGORITHMS`): two or more,
            # and nothing else (not a tag like ("maa", t, r), not an __all__ of functions)
            names = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if len(names) == len(node.elts) >= 2 and all(n in REGISTRY for n in names):
                out += [(node.lineno, n) for n in names]
        elif tables and isinstance(node, ast.Dict):
            # a table keyed by names: knowledge of algorithms kept outside their records
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            if len(keys) == len(node.keys) >= 2 and all(k in REGISTRY for k in keys):
                out += [(node.lineno, k) for k in keys]
        elif isinstance(node, ast.match_case):
            out += [(node.pattern.lineno, n) for n in sorted(_names_in(node.pattern))]
    return sorted(set(out))


def test_the_check_sees_branches() -> None:
    source = (
        'if cfg.algorithm == "dasgd": pass\n'
        'x = 1 if algo in ("alg1", "alg2") else 2\n'
        'match name:\n    case "slack": pass\n'
        'y = {"alg1": 1}  # a table, not a branch\n'
        'z = "maa" in extra  # a section named like the algorithm\n'
        'SNAPSHOTS = ["dasgd", "downpour"]\n'
        'tag = ("maa", t, r)\n'
        'DEFAULTS = {"local_steps": 2, "reduced_frequency": 10}\n'
    )
    assert branches_on_names(source) == [
        (1, "dasgd"),
        (2, "alg1"),
        (2, "alg2"),
        (4, "slack"),
        (7, "dasgd"),
        (7, "downpour"),
        (9, "local_steps"),
        (9, "reduced_frequency"),
    ]


#: MixML's protocols modelled as mixing operators, by protocol name: the analysis tool's own
#: catalogue of what it can compute t_mix for (defaults it shares with a run come from the
#: records and the config)
CATALOGUES = {PACKAGE / "analysis" / "mixing.py"}


def test_no_branch_on_an_algorithm_name_outside_its_record() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if RECORDS in path.parents:
            continue
        for line, name in branches_on_names(path.read_text(), tables=path not in CATALOGUES):
            offenders.append(f"{path.relative_to(ROOT)}:{line} compares with {name!r}")
    assert offenders == []


def test_every_record_is_complete() -> None:
    for name, spec in REGISTRY.items():
        assert isinstance(spec, AlgorithmSpec) and spec.name == name
        assert spec.settings <= set(OPTIONAL_SETTINGS)
        for result, condition in spec.conditions.items():
            assert THEORY_CONDITIONS[result] == condition, (name, result)
    # every optional setting means something to some algorithm
    assert all(readers(setting) for setting in OPTIONAL_SETTINGS)


def test_a_record_with_an_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown settings"):
        AlgorithmSpec(
            name="x",
            paper="",
            exchanges="",
            waits_for="",
            tolerates="",
            parameters="",
            programs=lambda cfg, problem, pids: [],
            settings=frozenset({"mix.periodd"}),
        )


def test_unknown_algorithm_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="one of alg1, alg2"):
        lookup("alg3")
    with pytest.raises(ConfigError, match=r"unknown algorithm 'dasdg' \(did you mean 'dasgd'\?\)"):
        load_config(None, {"algorithm": "dasdg"})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_record_builds_its_programs(algorithm: str) -> None:
    from peerlearn.runs import build_problem, make_programs

    cfg = RunConfig(algorithm=algorithm, processes=4, clusters=2, steps=3)
    programs = make_programs(cfg, build_problem(cfg), range(cfg.processes))
    assert len(programs) == cfg.processes
    assert cfg.spec.planned_iterations(cfg) > 0


def test_the_json_schema_lists_the_algorithms() -> None:
    """/openapi.json (and any schema of a config) says which names are valid."""
    schema = RunConfig.model_json_schema()["properties"]["algorithm"]
    assert schema["enum"] == list(ALGORITHMS)


def test_readme_failure_semantics_name_every_algorithm_with_its_delivery_policy() -> None:
    from peerlearn.algorithms.spec import DeliveryPolicy

    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(
        "| algorithm | survives | messages for an away peer | what blocks "
        "(reported `blocked` in `/status`) |"
    )
    seen = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names, _, policy, _ = [c.strip() for c in line.strip("|").split("|")]
        for name in (n.strip().strip("`") for n in names.split(",")):
            seen.append(name)
            dropped = lookup(name).delivery is DeliveryPolicy.DROP_WHEN_AWAY
            assert policy.startswith("dropped") == dropped, (name, policy)
    assert sorted(seen) == sorted(ALGORITHMS)
