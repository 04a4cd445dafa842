"""Test-suite set-up.

- Async tests run on uvloop, the loop the daemon runs on in production.
- Every test has a time limit (pytest-timeout, ``timeout`` in pyproject.toml); ``slow`` tests,
  long statistical runs, get :data:`SLOW_TIMEOUT` unless they set their own.
- With ``PEERLEARN_REQUIRE_ALL=1`` (set by ``.ci/run``) a skipped test is a failure: CI runs as
  root with the Debian tools installed, so a Prometheus, Chromium, network-namespace or compose
  test that skips there means the suite silently stopped testing something.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Generator, Mapping

import pytest
import uvloop

#: seconds per `slow` test without its own @pytest.mark.timeout
SLOW_TIMEOUT = 900.0
REQUIRE_ALL_ENV = "PEERLEARN_REQUIRE_ALL"


def pytest_asyncio_loop_factories() -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


def _require_all() -> bool:
    return os.environ.get(REQUIRE_ALL_ENV, "") not in ("", "0")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if _require_all() and report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped ({reason.removeprefix('Skipped: ')}), but {REQUIRE_ALL_ENV}=1: "
            "this runner must run every test (see docs/testing.md)"
        )
    return report
