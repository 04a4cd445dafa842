"""The alerting rules, configs/prometheus/rules.yml.

- structure: every alert has a severity, a summary and a description naming the daemon
  (``$labels.instance``), and a case in tests/alerts_test.yml where it fires; the shipped
  Prometheus config loads the file, and docker-compose mounts it where that config looks;
- ``promtool check rules``, and ``promtool test rules tests/alerts_test.yml``: every alert fires
  on the series it is meant for, after its ``for``, and not on look-alikes;
- a real Prometheus scraping real ``peerlearn run`` processes fires PeerlearnPeerAway on the
  survivors, and PeerlearnDaemonDown on the victim, once one daemon of three is SIGKILLed or
  SIGSTOPped (a hung daemon: its connections stay open, only heartbeats tell).

The Prometheus of the last test runs the shipped rules with every ``for`` cut to 1 s, and 1 s
scrape and evaluation intervals; the shipped files keep theirs. Tests needing ``promtool`` or
``prometheus`` (Debian package prometheus, ``make system-deps``) skip when it is missing.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]

from peerlearn.testing import poll_status
from tests.test_monitoring import (
    COMPOSE_YML,
    PROMETHEUS_YML,
    _get,
    _run,
    _test_config,
    _tool,
    _wait_targets_up,
    prometheus_server,
)
from tests.test_processes import daemons

ROOT = Path(__file__).resolve().parent.parent
RULES_YML = ROOT / "configs" / "prometheus" / "rules.yml"
RULES_TEST_YML = ROOT / "tests" / "alerts_test.yml"
CONFIG_DIR_IN_CONTAINER = PurePosixPath("/etc/prometheus")  # compose: prometheus.yml's directory
SEVERITIES = {"warning", "critical"}

PEER_TIMEOUT = 1.0  # the daemons' peer_timeout in the real-Prometheus test
# From the fault to a firing alert: peer_timeout (a stopped peer: its link's silence for
# peer_timeout first), a scrape (1 s), an evaluation (1 s), `for` (1 s) and the evaluation
# after it — 3-4 s measured; the rest is room for a loaded machine.
ALERT_TIMEOUT = 10.0


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES_YML.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_names_its_daemon_and_is_unit_tested() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), names
    assert {"PeerlearnPeerAway", "PeerlearnWorkerBlocked", "PeerlearnWorkerDiverged"} <= set(names)
    assert {"PeerlearnStepRateStalled", "PeerlearnProtocolErrors"} <= set(names)
    for r in rules:
        assert r.get("labels", {}).get("severity") in SEVERITIES, r["alert"]
        annotations = r.get("annotations", {})
        for key in ("summary", "description"):
            assert "{{ $labels.instance }}" in annotations.get(key, ""), (r["alert"], key)
        assert "job=" not in r["expr"], f"{r['alert']}: the rules must hold under any job name"
    fired = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TEST_YML.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == set(names), f"alerts without a firing case in {RULES_TEST_YML.name}"


def test_the_shipped_config_and_compose_load_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    files = config.get("rule_files", [])
    assert [(PROMETHEUS_YML.parent / f).resolve() for f in files] == [RULES_YML]
    # In compose, prometheus.yml is /etc/prometheus/prometheus.yml: its relative rule_files
    # are read below /etc/prometheus, which a mount must map back onto the repository's file.
    services = yaml.safe_load(COMPOSE_YML.read_text())["services"]
    mounts = {}
    for volume in services["prometheus"]["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[PurePosixPath(target)] = (ROOT / source).resolve()
    for f in files:
        inside = CONFIG_DIR_IN_CONTAINER / f
        covering = [t for t in mounts if t == inside or t in inside.parents]
        assert covering, f"compose mounts nothing at {inside}"
        target = max(covering, key=lambda t: len(t.parts))  # the innermost mount wins
        host = mounts[target] / inside.relative_to(target)
        assert host.resolve() == RULES_YML, f"compose mounts {host} at {inside}"


async def test_promtool_check_rules() -> None:
    rc, out = await _run(_tool("promtool"), "check", "rules", str(RULES_YML))
    assert rc == 0, out


async def test_promtool_unit_tests_of_the_alerts() -> None:
    """tests/alerts_test.yml: for each alert, when it fires, when not yet, and when not."""
    rc, out = await _run(_tool("promtool"), "test", "rules", str(RULES_TEST_YML))
    assert rc == 0, out
    assert "SUCCESS" in out, out


# --- a real Prometheus, real daemons ----------------------------------------------------------


def _fast_rules(path: Path) -> Path:
    """The shipped rules with every `for` cut to 1 s (the test's evaluation interval)."""
    data = yaml.safe_load(RULES_YML.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def _alerts(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    data = await _get(api, "/api/v1/alerts")
    alerts: list[dict[str, Any]] = data["alerts"]
    return alerts


async def _evaluated_after(api: httpx.AsyncClient, moment: datetime, timeout: float) -> None:
    """Wait until the rules have been evaluated after ``moment`` (a wall-clock time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while True:
        groups = (await _get(api, "/api/v1/rules", type="alert"))["groups"]
        if groups:
            # RFC 3339 with nanoseconds: fromisoformat takes at most microseconds
            stamp = re.sub(r"(\.\d{6})\d+", r"\1", groups[0]["lastEvaluation"])
            last = datetime.fromisoformat(stamp)
            if last > moment:
                return
        assert loop.time() < deadline, f"rules not evaluated after {moment}: last {last}"
        await asyncio.sleep(0.2)


def _firing(alerts: list[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    """instance → the firing alert ``name`` of that instance."""
    return {
        a["labels"]["instance"]: a
        for a in alerts
        if a["labels"]["alertname"] == name and a["state"] == "firing"
    }


@pytest.mark.parametrize(
    "fault", [signal.SIGKILL, signal.SIGSTOP], ids=lambda s: signal.Signals(s).name.lower()
)
async def test_a_real_prometheus_fires_peer_away(tmp_path: Path, fault: signal.Signals) -> None:
    """A stopped daemon keeps its connections open: its peers notice it by the silence of
    their links (heartbeats, peer_timeout); without heartbeats this fails for SIGSTOP."""
    prometheus = _tool("prometheus")
    with daemons(
        3,
        *("--workers", "1", "--algorithm", "alg1"),
        *("--set", f"peer_timeout={PEER_TIMEOUT}"),
    ) as (procs, urls):
        # Prometheus starts while the daemons do (their addresses are known already).
        instances = [url.removeprefix("http://") for url in urls]
        victim, survivors = instances[-1], instances[:-1]
        config = _test_config(instances)
        config["rule_files"] = [str(_fast_rules(tmp_path / "rules.yml"))]
        async with (
            prometheus_server(prometheus, config, tmp_path) as (proc, listen, log),
            httpx.AsyncClient(base_url=f"http://{listen}", timeout=2.0) as api,
        ):
            try:
                for url in urls:  # every link up, every daemon stepping
                    await poll_status(url, lambda s: min(w["step"] for w in s["workers"]) > 0)
                await _wait_targets_up(api, proc, set(instances), log)
                # A healthy run fires nothing: with `for` 1 s, a rule true on healthy daemons
                # would fire within two evaluations after a scrape of the running daemons.
                up = datetime.now(UTC)
                await _evaluated_after(api, up + timedelta(seconds=2.5), ALERT_TIMEOUT)
                healthy = [a["labels"] for a in await _alerts(api)]
                assert not healthy, f"alerts on a healthy run: {healthy}"

                os.kill(procs[-1].pid, fault)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + ALERT_TIMEOUT
                while True:
                    alerts = await _alerts(api)
                    away = _firing(alerts, "PeerlearnPeerAway")
                    down = _firing(alerts, "PeerlearnDaemonDown")
                    if set(away) == set(survivors) and set(down) == {victim}:
                        break
                    assert proc.returncode is None, f"prometheus exited:\n{log.read_text()}"
                    assert loop.time() < deadline, (
                        f"{fault.name} of {victim}: after {ALERT_TIMEOUT} s, PeerlearnPeerAway "
                        f"fires for {sorted(away)} (want {survivors}), PeerlearnDaemonDown for "
                        f"{sorted(down)} (want {victim}); all alerts: "
                        f"{[(a['labels'], a['state']) for a in alerts]}"
                    )
                    await asyncio.sleep(0.2)  # Prometheus evaluates every second
                for instance in survivors:
                    alert = away[instance]
                    assert alert["labels"]["severity"] == "warning"
                    assert alert["annotations"]["summary"] == (
                        f"peerlearn daemon {instance}: 1 peer(s) away"
                    )
                    assert float(alert["value"]) == 1.0
                assert down[victim]["annotations"]["summary"] == (
                    f"peerlearn daemon {victim} is down"
                )
            finally:
                if fault == signal.SIGSTOP:
                    os.kill(procs[-1].pid, signal.SIGCONT)
