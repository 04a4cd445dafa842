"""`peerlearn run --log-format json`: every line on stderr is one JSON object, tracebacks
included, and log messages name things in words, not by their Python reprs."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from peerlearn.daemon.serve import JsonFormatter
from tests.test_processes import CRASHY, PEERLEARN, free_ports

#: reprs that used to reach log lines: objects (``Transport(cluster=0, …)``), tuples of strings
#: (a peer's ``('127.0.0.1', 41234)``), lists (``['0.0', '0.1']``)
REPRS = re.compile(
    r"\b(?:Transport|OutLink|Daemon|PeerAddress|FrameProtocol|Worker|Hello)\(|\('|\['|\[\d"
)
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _records(stderr: str) -> list[dict[str, Any]]:
    records = []
    for line in stderr.splitlines():
        record = json.loads(line)  # every line, not just most: a collector reads them all
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        assert TIME.match(record["time"]), line
        records.append(record)
    return records


def test_json_records_carry_the_exception_on_one_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed: %s", ("twice",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "x"
    assert entry["message"] == "failed: twice"
    assert (
        entry["exception"].startswith("Traceback")
        and "ValueError: bad\nvalue" in entry["exception"]
    )


def test_run_logs_json_lines_without_reprs(tmp_path: Path) -> None:
    """Two daemons (links, handshakes), one worker crashing (a traceback): the flag on one, the
    environment variable on the other."""
    (tmp_path / "crashy.py").write_text(CRASHY)
    ports = free_ports(4)  # one call: two could pick the same port twice
    peers, apis = ports[:2], ports[2:]
    addrs = [f"127.0.0.1:{p}" for p in peers]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    procs = []
    for i in range(2):
        cmd = [
            *(PEERLEARN, "run", "--listen", addrs[i], "--api", f"127.0.0.1:{apis[i]}"),
            *("--peers", addrs[1 - i], "--workers", "2", "--max-failures", "1"),
            *("--steps", "20", "--exit-on-finish", "--problem", "crashy:make"),
            *("--log-level", "info"),
        ]
        if i == 0:
            cmd += ["--log-format", "json"]
        extra = {"PEERLEARN_LOG_FORMAT": "json"} if i == 1 else {}
        procs.append(
            subprocess.Popen(
                cmd,
                env={**env, **extra},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=90)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    logs = [_records(out) for out in outputs]
    everything = [r for records in logs for r in records]
    assert any("inbound link from daemon" in r["message"] for r in everything), everything
    assert [r["message"] for r in everything if REPRS.search(r["message"])] == []
    crashes = [r for r in everything if r["logger"] == "peerlearn.runtime.worker"]
    assert len(crashes) == 1 and crashes[0]["level"] == "ERROR", crashes
    assert 'raise RuntimeError("boom in the oracle")' in crashes[0]["exception"]
    # The daemon hosting the crashed worker says so in its exit code; the other finished.
    cluster_of_crash = 0 if any(r is crashes[0] for r in logs[0]) else 1
    codes = [p.returncode for p in procs]
    assert codes[cluster_of_crash] == 1 and codes[1 - cluster_of_crash] == 0, (codes, outputs)
