"""Hosts for multi-host tests: Linux network namespaces on one bridge (shared by the tests).

A *switch* namespace holds bridge ``br0`` at ``<subnet>.254``; every host namespace is joined to
it by a veth pair and gets ``eth0`` at ``<subnet>.<i + 1>``. Only our own namespaces are ever
addressed. When the environment cannot make namespaces (not root, no ``ip``, a refused
command) the test is skipped with the reason, never failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest

__all__ = ["Bridge", "bridge", "ip", "stop"]


@dataclass(frozen=True)
class Bridge:
    switch: str  # the namespace holding br0 (tests run observers in it)
    ns: dict[str, str]  # host name → namespace
    ips: dict[str, str]  # host name → address on the bridge


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _setup(*args: str) -> None:
    """One set-up command; the environment failing it is a skip, not a peerlearn failure."""
    res = ip(*args)
    if res.returncode != 0:
        pytest.skip(f"network namespaces unavailable: `ip {' '.join(args)}`: {res.stderr.strip()}")


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM (a daemon shuts down gracefully on it), SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(10)


@contextlib.contextmanager
def bridge(tag: str, hosts: Mapping[str, str], subnet: str) -> Iterator[Bridge]:
    """Namespaces ``{tag}-sw`` (the switch) and ``{tag}-{suffix}`` per host of ``hosts`` (host
    name → namespace suffix), bridged on ``subnet``; on exit every process still in them is
    killed and everything is deleted."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces unavailable: no `ip` command (iproute2)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces unavailable: not running as root")
    net = Bridge(
        switch=f"{tag}-sw",
        ns={h: f"{tag}-{suffix}" for h, suffix in hosts.items()},
        ips={h: f"{subnet}.{i + 1}" for i, h in enumerate(hosts)},
    )
    created: list[str] = []
    try:
        for ns in (net.switch, *net.ns.values()):
            _setup("netns", "add", ns)
            created.append(ns)
            _setup("-n", ns, "link", "set", "lo", "up")
        sw = net.switch
        _setup("-n", sw, "link", "add", "br0", "type", "bridge")
        _setup("-n", sw, "addr", "add", f"{subnet}.254/24", "dev", "br0")
        _setup("-n", sw, "link", "set", "br0", "up")
        for i, host in enumerate(hosts):
            ns, port = net.ns[host], f"port{i}"
            _setup(
                "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", sw
            )
            _setup("-n", sw, "link", "set", port, "master", "br0")
            _setup("-n", sw, "link", "set", port, "up")
            _setup("-n", ns, "addr", "add", f"{net.ips[host]}/24", "dev", "eth0")
            _setup("-n", ns, "link", "set", "eth0", "up")
        yield net
    finally:
        for ns in created:  # anything still in our namespaces is ours
            for pid in ip("netns", "pids", ns).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        if net.switch in created:
            for i in range(len(hosts)):
                ip("-n", net.switch, "link", "del", f"port{i}")  # takes the host's eth0 along
            ip("-n", net.switch, "link", "del", "br0")
        for ns in created:
            ip("netns", "del", ns)
