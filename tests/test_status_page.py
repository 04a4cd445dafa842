"""The live status page (``GET /``): self-contained, and its charts plot what /metrics says.

The browser test drives Debian's chromium (/usr/bin/chromium) through Playwright and is skipped
when either is missing; no browser is ever downloaded. It checks the page's plotted data
(``window.peerlearn``, docs/status-page.md), not pixels; the screenshot it takes is an artifact.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from peerlearn.control.app import WorkerModel, build_app
from peerlearn.testing import LocalCluster, local_cluster

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FIELDS: dict[str, Any] = {
    "algorithm": "alg1",
    "steps": None,
    "problem": {"name": "quadratic"},
    "lr": {"schedule": "constant", "eta": 0.05},
}
CHARTS = ("loss", "consensus", "staleness", "steps", "messages", "bytes")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- without a browser: what GET / serves ------------------------------------------------------


class _Idle:
    """A control target that is never asked anything: the page and its assets are static."""

    metrics: Any = None

    def status(self) -> dict[str, Any]:
        raise AssertionError("not asked")

    def peers(self) -> list[dict[str, Any]]:
        raise AssertionError("not asked")

    def models(self) -> list[WorkerModel]:
        raise AssertionError("not asked")

    def request_stop(self, reason: str) -> None:
        raise AssertionError("not asked")


def _foreign_urls(text: str) -> list[str]:
    """Absolute or protocol-relative references: none may appear (the page only talks to the
    daemon that served it, through relative URLs)."""
    absolute = re.findall(r"""\bhttps?://[^\s"'`<>)]+""", text, flags=re.IGNORECASE)
    relative = re.findall(r"""(?:src|href|action)\s*=\s*["']?\s*//[^\s"'>]+""", text)
    imports = re.findall(r"""@import|url\(\s*["']?(?!data:)[^)]*\)""", text)
    return absolute + relative + imports


async def test_the_page_and_its_assets_are_self_contained() -> None:
    transport = httpx.ASGITransport(app=build_app(_Idle()))
    async with httpx.AsyncClient(transport=transport, base_url="http://daemon") as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert _foreign_urls(page.text) == []
        refs = re.findall(r"""(?:src|href)="([^"]+)\"""", page.text)
        assets = [r for r in refs if not r.startswith("data:")]
        assert sorted(assets) == ["static/status.css", "static/status.js"]
        expected = {".js": "text/javascript", ".css": "text/css"}
        for ref in assets:
            response = await client.get(f"/{ref}")
            assert response.status_code == 200, ref
            media = expected[Path(ref).suffix]
            assert response.headers["content-type"] == f"{media}; charset=utf-8", ref
            assert _foreign_urls(response.text) == [], ref
        assert 'fetch("metrics"' in (await client.get("/static/status.js")).text
        for missing in ("/static/app.py", "/static/index.html", "/static/..%2Fapp.py"):
            assert (await client.get(missing)).status_code == 404, missing
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert "/" not in paths and not any(p.startswith("/static") for p in paths)  # no API


# --- in Chromium, against a running cluster ---------------------------------------------------


def _parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _select(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


def _by_peer(samples: Samples, name: str) -> dict[str, float]:
    """Counter totals per "peer direction", summed over message kinds (as the page does)."""
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in samples.items():
        if n == name:
            d = dict(labels)
            out[f"{d['peer']} {d['direction']}"] += v
    return dict(out)


def _frozen_values(samples: Samples) -> dict[str, Any]:
    return {
        "loss": _select(samples, "peerlearn_loss", "worker"),
        "consensus": _select(samples, "peerlearn_consensus_distance", "scope"),
        "messages": _by_peer(samples, "peerlearn_messages_total"),
        "bytes": _by_peer(samples, "peerlearn_bytes_total"),
    }


def _latest(chart: dict[str, Any]) -> dict[str, float]:
    return {key: s["points"][-1][1] for key, s in chart["series"].items()}


async def _stop_workers(cluster: LocalCluster) -> None:
    """Every worker of every daemon stops; the daemons and their APIs keep running, so the
    figures /metrics reports stop changing."""
    workers = [w for d in cluster.daemons for w in d.workers]
    for w in workers:
        w.stop()
    await asyncio.to_thread(lambda: [w.join(30) for w in workers])


async def test_status_page_plots_the_daemons_metrics(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (make system-deps installs Debian's chromium)")
    pw_api = pytest.importorskip("playwright.async_api")
    async with local_cluster(3, workers=2, **FIELDS) as cluster, pw_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            await _check_page(browser, cluster, tmp_path)
        finally:
            await browser.close()  # before the daemons stop: no failed polls at teardown


async def _check_page(browser: Any, cluster: LocalCluster, tmp_path: Path) -> None:
    base = cluster.urls[0]
    client = cluster.client(0)
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    requested: list[str] = []

    def on_console(message: Any) -> None:
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    def on_response(response: Any) -> None:
        if response.status >= 400:
            problems.append(f"HTTP {response.status}: {response.url}")

    page.on("console", on_console)
    page.on("response", on_response)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    page.on("request", lambda request: requested.append(request.url))

    await page.goto(f"{base}/")
    enough = """(charts) => {
        const s = window.peerlearn;
        return Boolean(s) && charts.every((id) => {
            const series = Object.values(s.charts[id].series);
            return series.length > 0 && series.every((x) => x.points.length >= 3);
        });
    }"""
    await page.wait_for_function(enough, arg=list(CHARTS), timeout=20_000, polling=100)
    shot = tmp_path / "status-page.png"
    await page.screenshot(path=str(shot), full_page=True)
    if target := os.environ.get("PEERLEARN_SCREENSHOT"):
        shutil.copyfile(shot, target)

    # While training: every series the page should have, with traffic to both peers.
    status = (await client.get("/status")).json()
    peers = [f"{p['cluster']}@{p['address']}" for p in status["peers"]]
    assert len(peers) == 2
    charts = await page.evaluate("window.peerlearn.charts")
    assert set(charts["loss"]["series"]) == {"0.0", "0.1"}
    assert set(charts["consensus"]["series"]) == {"host", "global"}
    assert set(charts["staleness"]["series"]) == {"steps"}  # no DASGD gradients under Alg 1
    assert set(charts["steps"]["series"]) == {"0.0", "0.1"}
    for chart in ("messages", "bytes"):
        series = charts[chart]["series"]
        assert set(series) == {f"{p} {d}" for p in peers for d in ("in", "out")}, chart
        for key, s in series.items():
            assert s["labels"]["peer"] in peers and s["labels"]["direction"] in key
            assert any(v > 0 for _, v in s["points"]), (chart, key)
    assert all(v > 0 for v in _latest(charts["steps"]).values())
    stale = charts["staleness"]["series"]["steps"]["points"]
    assert all(math.isfinite(v) and -8 <= v <= 64 for _, v in stale)  # the buckets' range
    for chart in CHARTS:  # every series is drawn
        for key in charts[chart]["series"]:
            path = page.locator(f'svg[data-chart="{chart}"] path[data-key="{key}"]')
            assert (await path.get_attribute("d") or "").count("L") >= 2, (chart, key)

    # Freeze the figures, let the page poll past the freeze, then compare exactly.
    await _stop_workers(cluster)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        before = _frozen_values(_parse((await client.get("/metrics")).text))
        polls = await page.evaluate("window.peerlearn.polls")
        # poll polls+1 may have started before `before`; polls+2 and polls+3 began after it
        await page.wait_for_function(f"window.peerlearn.polls >= {polls + 3}", timeout=10_000)
        after_text = (await client.get("/metrics")).text
        after = _frozen_values(_parse(after_text))
        if before == after:
            break
        assert loop.time() < deadline, "the figures never stopped changing"
    state = await page.evaluate("window.peerlearn")
    charts = state["charts"]
    assert after["loss"] and set(after["consensus"]) == {"host", "global"}
    assert _latest(charts["loss"]) == after["loss"]
    assert _latest(charts["consensus"]) == after["consensus"]
    page_scrape: Samples = {
        (s["name"], tuple(sorted(s["labels"].items()))): s["value"]
        for s in state["last"]["samples"]
    }
    assert _by_peer(page_scrape, "peerlearn_messages_total") == after["messages"]
    assert _by_peer(page_scrape, "peerlearn_bytes_total") == after["bytes"]
    for chart in ("messages", "bytes", "steps"):  # no traffic, no steps between the last polls
        assert all(v == 0 for v in _latest(charts[chart]).values()), chart
    assert all(len(s["points"]) >= 3 for c in CHARTS for s in charts[c]["series"].values())

    # The header: /status as the page shows it.
    status = (await client.get("/status")).json()
    assert await page.text_content("#state") == status["state"]
    assert status["algorithm"] in (await page.text_content("#run") or "")
    rows = await page.locator("#peers tbody tr").all_inner_texts()
    assert len(rows) == 2
    for row, peer in zip(rows, status["peers"], strict=True):
        assert peer["address"] in row and peer["state"] in row
    worker_rows = await page.locator("#workers tbody tr").all_inner_texts()
    for row, w in zip(worker_rows, status["workers"], strict=True):
        assert row.split()[:3] == [w["id"], w["state"], f"{w['step']:,}"]

    await page.close()
    assert problems == []
    assert requested and all(url.startswith(f"{base}/") for url in requested), requested
