"""The control API as a user reads it: /model by the ids /status shows and as the daemon's
mean, the OpenAPI document's schemas against live answers, /docs with no network.

The browser test drives Debian's chromium like tests/test_status_page.py does, and is skipped
the same way when it or Playwright is missing.
"""

from __future__ import annotations

import io
import re
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest

from peerlearn.control.app import NPY_MEDIA_TYPE, WorkerModel, build_app
from peerlearn.control.metrics import DaemonMetrics
from peerlearn.runtime.worker import Worker, WorkerState
from peerlearn.testing import local_cluster, poll_status
from tests.helpers import oracle_fault, raises
from tests.test_status_page import CHROMIUM, CHROMIUM_ARGS, _foreign_urls

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 6, "sigma": 1.0}
OPERATIONS = {"/status", "/peers", "/metrics", "/model", "/stop"}


def _load(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPY_MEDIA_TYPE
    x: np.ndarray = np.load(io.BytesIO(response.content), allow_pickle=False)
    return x


# --- /model ------------------------------------------------------------------------------------


class _Models:
    """A control target with fixed worker models."""

    metrics: DaemonMetrics

    def __init__(self, models: list[WorkerModel]) -> None:
        self._models = models

    def status(self) -> dict[str, Any]:
        raise AssertionError("not asked")

    def peers(self) -> list[dict[str, Any]]:
        raise AssertionError("not asked")

    def models(self) -> list[WorkerModel]:
        return self._models

    def request_stop(self, reason: str) -> None:
        raise AssertionError("not asked")


def _client(models: list[WorkerModel]) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=build_app(_Models(models)))
    return httpx.AsyncClient(transport=transport, base_url="http://daemon")


async def test_model_mean_counts_only_live_workers_with_a_model() -> None:
    x0, x1 = np.array([1.0, 2.0, 3.0]), np.array([5.0, 6.0, 7.0])
    crashed = np.array([1e6, 1e6, 1e6])
    models = [
        WorkerModel("1.0", x0, True),
        WorkerModel("1.1", crashed, False),
        WorkerModel("1.2", x1, True),
        WorkerModel("1.3", None, True),
    ]
    async with _client(models) as c:
        np.testing.assert_array_equal(_load(await c.get("/model")), [3.0, 4.0, 5.0])
        response = await c.get("/model", params={"worker": "1.1"})
        np.testing.assert_array_equal(_load(response), crashed)  # asked by name: still there
        assert 'filename="model-1.1.npy"' in response.headers["content-disposition"]
        np.testing.assert_array_equal(_load(await c.get("/model", params={"worker": "2"})), x1)
        missing = await c.get("/model", params={"worker": "1.3"})
        assert missing.status_code == 404 and "no model yet" in missing.json()["detail"]
    async with _client([WorkerModel("0.0", None, True), WorkerModel("0.1", x0, False)]) as c:
        none = await c.get("/model")
        assert none.status_code == 404
        assert none.json()["detail"] == "no live worker here has a model yet (workers: 0.0, 0.1)"


async def test_model_by_the_ids_status_shows_and_the_daemon_mean() -> None:
    async with local_cluster(2, workers=2, algorithm="alg1", steps=5, problem=QUAD) as cluster:
        await cluster.wait_until_finished()
        c = cluster.client(1)
        ids = [w["id"] for w in (await c.get("/status")).json()["workers"]]
        assert ids == ["1.0", "1.1"]
        by_id = [_load(await c.get("/model", params={"worker": i})) for i in ids]
        by_index = [_load(await c.get("/model", params={"worker": str(i)})) for i in (0, 1)]
        for a, b, w in zip(by_id, by_index, cluster.daemons[1].workers, strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, w.x)
        np.testing.assert_allclose(_load(await c.get("/model")), (by_id[0] + by_id[1]) / 2)
        for wrong in ("0.0", "7", "1.2", "x"):  # 0.0 runs on the other daemon
            response = await c.get("/model", params={"worker": wrong})
            assert response.status_code == 404, wrong
            assert "this daemon's workers are 1.0, 1.1" in response.json()["detail"], wrong


_CrashesAtStep3 = oracle_fault(3, raises("injected"))  # worker 0.0, third gradient


async def test_the_daemon_mean_leaves_out_a_crashed_worker() -> None:
    async with local_cluster(
        2,
        workers=2,
        algorithm="alg1",
        steps=8,
        problem=QUAD,
        max_failures=1,
        worker_factory=lambda i: _CrashesAtStep3 if i == 0 else Worker,
    ) as cluster:
        await cluster.wait_until_finished()
        crashed, live = cluster.daemons[0].workers
        assert crashed.state is WorkerState.CRASHED and live.state is WorkerState.FINISHED
        c = cluster.client(0)
        np.testing.assert_array_equal(_load(await c.get("/model")), live.x)
        np.testing.assert_array_equal(_load(await c.get("/model?worker=0.0")), crashed.x)
        assert not np.array_equal(crashed.x, live.x)


# --- the OpenAPI document ---------------------------------------------------------------------


def _validator(doc: dict[str, Any], path: str) -> jsonschema.protocols.Validator:
    """The JSON Schema of ``GET path``'s 200 answer, references resolved in the document."""
    schema = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
    root = {**schema["schema"], "components": doc["components"]}
    cls = jsonschema.validators.validator_for(root, default=jsonschema.Draft202012Validator)
    cls.check_schema(root)
    return cls(root)


async def test_the_openapi_document_describes_what_the_daemon_answers() -> None:
    async with local_cluster(
        2, workers=1, algorithm="alg1", steps=None, problem=QUAD, start=False
    ) as cluster:
        lone, other = cluster.daemons
        await lone.start()
        c = cluster.client(0)
        doc = (await c.get("/openapi.json")).json()
        assert set(doc["paths"]) >= OPERATIONS
        schemas = doc["components"]["schemas"]
        assert {"StatusView", "WorkerView", "WaitingView", "PeerView"} <= set(schemas)
        assert schemas["StatusView"]["additionalProperties"] is False  # a new field fails here
        model = doc["paths"]["/model"]["get"]["responses"]["200"]["content"]
        assert list(model) == [NPY_MEDIA_TYPE]
        status, peers = _validator(doc, "/status"), _validator(doc, "/peers")

        # Alone: the worker waits for the other daemon's (quorum 2 of 2), which is not there.
        # (no event marks the start of a wait: poll the answer itself)
        alone = await poll_status(cluster.urls[0], lambda s: "waiting" in s["workers"][0])
        status.validate(alone)
        peers.validate((await c.get("/peers")).json())

        await other.start()
        await cluster.wait_for(lambda: cluster.min_step() > 3)
        for i in (0, 1):
            answer = (await cluster.client(i).get("/status")).json()
            assert answer["peers"] and answer["peers"][0]["state"] == "connected"
            status.validate(answer)
            peers.validate((await cluster.client(i).get("/peers")).json())
        wrong = {**answer, "workers": [{**answer["workers"][0], "unexpected": 1}]}
        with pytest.raises(jsonschema.ValidationError):
            status.validate(wrong)


# --- /docs, with no way out -------------------------------------------------------------------


async def test_the_docs_page_loads_nothing_from_elsewhere() -> None:
    async with _client([]) as c:
        page = await c.get("/docs")
        assert page.status_code == 200 and _foreign_urls(page.text) == []
        refs = re.findall(r"""(?:src|href|url):?\s*=?\s*["']([^"']+)["']""", page.text)
        assert len(refs) == 4, refs  # style sheet, icon, script, the OpenAPI document
        for ref in refs:
            assert ref.startswith("/"), ref
            assert (await c.get(ref)).status_code == 200, ref
        assert (await c.get("/redoc")).status_code == 404  # its logo comes from a CDN


async def test_docs_render_offline() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (make system-deps installs Debian's chromium)")
    pw_api = pytest.importorskip("playwright.async_api")
    async with (
        local_cluster(1, workers=1, algorithm="alg1", steps=1, problem=QUAD) as cluster,
        pw_api.async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            await _check_docs(browser, cluster.urls[0])
        finally:
            await browser.close()


async def _check_docs(browser: Any, base: str) -> None:
    page = await browser.new_page()
    problems: list[str] = []
    outside: list[str] = []

    async def only_the_daemon(route: Any) -> None:
        url = route.request.url
        if url.startswith(f"{base}/") or url.startswith(("data:", "blob:")):
            await route.continue_()
        else:  # a CDN, a validator, a font: blocked, as on a machine with no way out
            outside.append(url)
            await route.abort()

    await page.route("**/*", only_the_daemon)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    page.on(
        "console",
        lambda m: problems.append(f"console error: {m.text}") if m.type == "error" else None,
    )

    await page.goto(f"{base}/docs")
    await page.wait_for_selector('.opblock-summary-path[data-path="/status"]', timeout=20_000)
    paths = await page.locator(".opblock-summary-path").evaluate_all(
        "(els) => els.map((e) => e.dataset.path)"
    )
    assert set(paths) == OPERATIONS
    schemas = page.locator(".models .json-schema-2020-12__title")  # the Schemas section
    await schemas.filter(has_text="StatusView").wait_for(timeout=5_000)
    assert {"StatusView", "WorkerView", "WaitingView", "PeerView"} <= set(
        await schemas.all_inner_texts()
    )
    await page.locator('.opblock-summary-path[data-path="/model"]').click()
    # The response media type offered in the expanded operation's select
    choice = page.locator(f'.opblock-get option[value="{NPY_MEDIA_TYPE}"]')
    await choice.first.wait_for(state="attached", timeout=5_000)

    await page.close()
    assert outside == [] and problems == [], (outside, problems)
