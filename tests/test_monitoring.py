"""The monitoring configs: Prometheus scrape config, Grafana provisioning and dashboard.

Three layers, cheapest first:

- structure: the dashboard JSON and the provisioning YAML agree with each other (datasource uid,
  dashboards path) and with Grafana's rules (unique panel ids, 24-column grid, a query per
  target);
- ``promtool``: ``check config`` on configs/prometheus.yml, ``check metrics`` on the /metrics of
  every daemon of a running Alg 2 and a running DASGD trio;
- a real Prometheus scrapes six real daemons (an Alg 2 trio for staleness and agreement, a
  DASGD trio for gradient staleness, a protocol error provoked with garbage bytes), with the
  scrape settings of configs/prometheus.yml and only the targets and intervals replaced; then
  every query of the dashboard must parse and return data from those daemons. Queries may not
  paper over missing data (``or vector(0)``, ``absent()``): a panel whose query returns nothing
  fails the test with its title.

The tests that need ``promtool`` or ``prometheus`` (Debian package prometheus, installed by
``make system-deps``) skip with the reason when the binary is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from peerlearn.effects import Program, Vector
from peerlearn.runtime.worker import Worker
from peerlearn.testing import local_cluster

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_YML = ROOT / "configs" / "prometheus.yml"
GRAFANA = ROOT / "configs" / "grafana"
DATASOURCE_YML = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER_YML = GRAFANA / "provisioning" / "dashboards" / "peerlearn.yml"
DASHBOARD_JSON = GRAFANA / "dashboards" / "peerlearn.json"
COMPOSE_YML = ROOT / "docker-compose.yml"

DATASOURCE_UID = "peerlearn-prometheus"
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"  # where compose mounts configs/grafana/dashboards
JOB = "peerlearn"

QUAD: dict[str, Any] = {"name": "quadratic"}
# Few agreement rounds per step: agreement metrics (rounds, contraction) and late drops get data
# at once, and steps stay fast.
ALG2: dict[str, Any] = {
    "algorithm": "alg2",
    "maa": {"rounds": 3, "inner_rounds": 2},
    "steps": None,
    "problem": QUAD,
}
PACE = 0.002  # seconds a DASGD gradient takes (below)


class _PacedWorker(Worker):
    """A worker whose every gradient takes PACE seconds more, asleep (the GIL released).

    DASGD waits for nobody: on the quadratic its six workers run thousands of steps a second
    each, and the event loop they share with every daemon's control API (one process here)
    then answers /metrics in 6-17 s (measured), beyond any scrape timeout. Paced, the run is
    still far faster than a real problem's gradients, and /metrics answers in ~0.1 s.
    """

    def __init__(
        self,
        pid: int,
        name: str,
        program: Program,
        grad: Callable[[Vector, np.random.Generator], Vector],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        def paced(x: Vector, rng: np.random.Generator) -> Vector:
            time.sleep(PACE)
            return grad(x, rng)

        super().__init__(pid, name, program, paced, *args, **kwargs)


DASGD: dict[str, Any] = {
    "algorithm": "dasgd",
    "steps": None,
    "problem": QUAD,
    "worker_factory": lambda i: _PacedWorker,
}

# Grafana's variables, as the test substitutes them: every daemon, one-minute rate windows
# (with 1 s scrapes that is ~60 samples, and 2 samples — what rate() needs — after 2 s).
VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "5m",
    "job": JOB,
    "instance": ".*",
}
# Ways a query can "have data" without any daemon: forbidden in dashboard queries.
FALLBACKS = ("vector(", "absent(", "absent_over_time(")
CONSTANT_FALLBACK = re.compile(r"\bor\s+[-+]?(\d|Inf|NaN)", re.IGNORECASE)

STARTUP_TIMEOUT = 20.0  # Prometheus up and every target scraped at least once
DATA_TIMEOUT = 25.0  # then every dashboard query returns data


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} not installed: it comes with the Debian package prometheus "
            "(`make system-deps` installs it as root)"
        )
    return path


# --- the dashboard ----------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def _queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of the dashboard."""
    return [
        (p["title"], t.get("refId", "?"), t.get("expr", ""))
        for p in _panels(_dashboard()["panels"])
        for t in p.get("targets", [])
    ]


def _substitute(expr: str) -> str:
    """Grafana's template variables ($x, ${x}, ${x:format}) as VARIABLES says."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in VARIABLES, f"unknown template variable ${name} in {expr!r}"
        return VARIABLES[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)
    assert "$" not in out and "[[" not in out, out
    return out


def test_dashboard_json_is_consistent() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36, "timeseries/heatmap panels need a recent schema"
    assert dashboard.get("uid") and dashboard.get("title")
    panels = list(_panels(dashboard["panels"]))
    assert len(panels) >= 10
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    boxes = []
    for p in panels:
        title = p.get("title", f"panel {p['id']}")
        if p["type"] == "row":
            continue
        assert p.get("datasource", {}).get("uid") == DATASOURCE_UID, title
        assert p["datasource"].get("type") == "prometheus", title
        targets = p.get("targets", [])
        assert targets, f"{title}: no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"{title}: duplicate refIds {refs}"
        for t in targets:
            expr = t.get("expr", "").strip()
            assert expr, f"{title} ({t['refId']}): no expr"
            assert t.get("datasource", {}).get("uid", DATASOURCE_UID) == DATASOURCE_UID, title
            assert "peerlearn_" in expr, f"{title}: {expr!r} reads no peerlearn metric"
            for bad in FALLBACKS:
                assert bad not in expr, f"{title}: {expr!r} has a fallback {bad}"
            assert not CONSTANT_FALLBACK.search(expr), f"{title}: constant fallback in {expr!r}"
            _substitute(expr)  # only known variables
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, title
        assert g["x"] + g["w"] <= 24, f"{title}: gridPos {g} exceeds 24 columns"
        boxes.append((title, g))
    for i, (a, ga) in enumerate(boxes):  # Grafana would push overlapping panels around
        for b, gb in boxes[i + 1 :]:
            overlap_x = ga["x"] < gb["x"] + gb["w"] and gb["x"] < ga["x"] + ga["w"]
            overlap_y = ga["y"] < gb["y"] + gb["h"] and gb["y"] < ga["y"] + ga["h"]
            assert not (overlap_x and overlap_y), f"panels {a!r} and {b!r} overlap"
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            assert var["datasource"]["uid"] == DATASOURCE_UID, var["name"]
            assert var["name"] in VARIABLES, f"the test does not know variable {var['name']}"


def _header(path: Path) -> str:
    """The comment block a YAML file starts with."""
    lines = path.read_text().splitlines()
    return "\n".join(itertools.takewhile(lambda line: not line or line.startswith("#"), lines))


def test_grafana_provisioning_matches_the_dashboard() -> None:
    datasources = yaml.safe_load(DATASOURCE_YML.read_text())["datasources"]
    assert len(datasources) == 1
    ds = datasources[0]
    assert ds["uid"] == DATASOURCE_UID
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    assert ds["isDefault"] is True

    providers = yaml.safe_load(PROVIDER_YML.read_text())["providers"]
    assert len(providers) == 1
    provider = providers[0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT
    header = _header(PROVIDER_YML)
    assert DASHBOARDS_MOUNT in header and "configs/grafana/dashboards" in header, header

    if COMPOSE_YML.exists():  # the compose file must mount the dashboards where we load them
        services = yaml.safe_load(COMPOSE_YML.read_text()).get("services", {})
        mounts = [
            v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}"
            for s in services.values()
            if "grafana" in str(s.get("image", ""))
            for v in s.get("volumes", [])
        ]
        assert any(
            "configs/grafana/dashboards" in m and f":{DASHBOARDS_MOUNT}" in m for m in mounts
        ), f"docker-compose.yml mounts {mounts}, not configs/grafana/dashboards:{DASHBOARDS_MOUNT}"


# --- Prometheus config --------------------------------------------------------------------


def _scrape_job(config: dict[str, Any]) -> dict[str, Any]:
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert len(jobs) == 1, config["scrape_configs"]
    job: dict[str, Any] = jobs[0]
    return job


def test_prometheus_config_scrapes_the_compose_daemons() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    assert config["global"]["evaluation_interval"] == "5s"
    job = _scrape_job(config)
    assert job.get("scrape_interval", "5s") == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["daemon0:8000", "daemon1:8000", "daemon2:8000"]


async def _run(*cmd: str, stdin: bytes = b"") -> tuple[int, str]:
    """Run a command without blocking the event loop (the daemons under test live on it)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_promtool_check_config() -> None:
    rc, out = await _run(_tool("promtool"), "check", "config", str(PROMETHEUS_YML))
    assert rc == 0, out


def _sample(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize(
    ("fields", "histogram"),
    [(ALG2, "peerlearn_staleness_steps_count"), (DASGD, "peerlearn_gradient_staleness_count")],
    ids=["alg2", "dasgd"],
)
async def test_promtool_check_metrics_on_running_daemons(
    fields: dict[str, Any], histogram: str
) -> None:
    promtool = _tool("promtool")
    async with local_cluster(3, **fields) as cluster:
        await cluster.wait_for(lambda: cluster.min_step() > 20)
        for i in range(len(cluster.daemons)):
            text = (await cluster.client(i).get("/metrics")).text
            rc, out = await _run(promtool, "check", "metrics", stdin=text.encode())
            assert rc == 0, f"daemon {i}: promtool check metrics:\n{out}"
            assert _sample(text, histogram) > 0, f"daemon {i}: {histogram} has no data"


# --- a real Prometheus ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _test_config(targets: list[str]) -> dict[str, Any]:
    """configs/prometheus.yml with our daemons as targets and 1 s intervals (its rule files
    made absolute: relative ones are read from the directory of the config, a temporary one)."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["rule_files"] = [str(PROMETHEUS_YML.parent / f) for f in config.get("rule_files", [])]
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    job = _scrape_job(config)
    job.update(scrape_interval="1s", scrape_timeout="1s")
    extra = {k: v for k, v in job["static_configs"][0].items() if k != "targets"}
    job["static_configs"] = [{"targets": targets, **extra}]
    return config


async def _garbage(port: int) -> None:
    """Random bytes on a daemon's peer port (a protocol error: the series the dashboard's
    error panel needs); the daemon closes that connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(np.random.default_rng(0).bytes(4096))
    writer.write_eof()
    await writer.drain()
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()


async def _get(api: httpx.AsyncClient, path: str, **params: str) -> Any:
    response = await api.get(path, params=params)
    body = response.json()
    assert body.get("status") == "success", f"{path} {params}: {body}"
    return body["data"]


async def _wait_targets_up(
    api: httpx.AsyncClient,
    proc: asyncio.subprocess.Process,
    targets: set[str],
    log: Path,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT
    health: dict[str, str] = {}
    while True:
        assert proc.returncode is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
        try:
            # Until ready, Prometheus answers its API with a plain-text 503, not JSON.
            if (await api.get("/-/ready")).status_code == 200:
                data = await _get(api, "/api/v1/targets", state="active")
                health = {t["labels"]["instance"]: t["health"] for t in data["activeTargets"]}
                if set(health) == targets and all(h == "up" for h in health.values()):
                    return
        except httpx.TransportError:
            pass  # not listening yet
        if loop.time() > deadline:
            raise AssertionError(
                f"targets not all up after {STARTUP_TIMEOUT} s: {health}\n{log.read_text()[-3000:]}"
            )
        await asyncio.sleep(0.2)


def _verdict(result: list[dict[str, Any]], targets: set[str]) -> str | None:
    """None if the instant-query result shows data from our daemons, else what is wrong."""
    if not result:
        return "no series"
    strangers = {r["metric"]["instance"] for r in result if "instance" in r["metric"]} - targets
    assert not strangers, f"series from instances nobody scrapes: {strangers}"
    if not any(math.isfinite(float(r["value"][1])) for r in result):
        return f"only NaN/Inf values: {result}"
    return None


async def _wait_for_data(
    api: httpx.AsyncClient, queries: list[tuple[str, str, str]], targets: set[str]
) -> dict[str, str]:
    """Poll every query until each has data (or the deadline); returns the failures."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DATA_TIMEOUT
    pending = {f"{title!r} ({ref}): {expr}": _substitute(expr) for title, ref, expr in queries}
    failures: dict[str, str] = {}
    while pending:
        failures = {}
        for key, expr in list(pending.items()):
            data = await _get(api, "/api/v1/query", query=expr)  # asserts it parses
            assert data["resultType"] == "vector", f"{key}: {data['resultType']}"
            problem = _verdict(data["result"], targets)
            if problem is None:
                del pending[key]
            else:
                failures[key] = problem
        if not pending or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)  # the next scrape (1 s interval)
    return failures


async def _template_variables_resolve(api: httpx.AsyncClient, targets: set[str]) -> None:
    """label_values(selector, label) of every query variable finds our daemons."""
    for var in _dashboard().get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert m, f"variable {var['name']}: unexpected query {query!r}"
        series = await _get(api, "/api/v1/series", **{"match[]": _substitute(m.group(1))})
        values = {s.get(m.group(2)) for s in series} - {None}
        expected = targets if m.group(2) == "instance" else {JOB}
        assert expected <= values, f"variable {var['name']}: {values}, want {expected}"


@contextlib.asynccontextmanager
async def prometheus_server(
    prometheus: str, config: dict[str, Any], tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Path]]:
    """A real Prometheus with ``config`` on a free port: (its process, its address, its log
    file); terminated (killed after 10 s) on the way out."""
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    listen = f"127.0.0.1:{_free_port()}"
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            prometheus,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={listen}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield proc, listen, log
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_every_dashboard_query_has_data_in_a_real_prometheus(tmp_path: Path) -> None:
    prometheus = _tool("prometheus")
    queries = _queries()
    async with local_cluster(3, **ALG2) as alg2, local_cluster(3, **DASGD) as dasgd:
        await alg2.wait_for(lambda: alg2.min_step() > 5)
        await dasgd.wait_for(lambda: dasgd.min_step() > 5)
        port = alg2.daemons[0].peer_port
        assert port is not None
        await _garbage(port)
        targets = {f"127.0.0.1:{d.api_port}" for d in alg2.daemons + dasgd.daemons}
        config = _test_config(sorted(targets))
        async with (
            prometheus_server(prometheus, config, tmp_path) as (proc, listen, log),
            httpx.AsyncClient(base_url=f"http://{listen}", timeout=2.0) as api,
        ):
            await _wait_targets_up(api, proc, targets, log)
            failures = await _wait_for_data(api, queries, targets)
            assert not failures, "dashboard panels without data:\n" + "\n".join(
                f"  {k}\n    -> {v}" for k, v in failures.items()
            )
            await _template_variables_resolve(api, targets)
