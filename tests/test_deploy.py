"""The deployment files: Dockerfile, docker-compose.yml and configs/k8s, checked without Docker.

There is no container engine in CI, so each file is checked by what can run here:

* ``docker-compose config`` validates the Compose file and resolves it (anchors, merge keys,
  paths); the tests read that resolved form, not the raw YAML.
* The multi-host recipe is *executed*: every daemon service of the compose file runs its
  ``command`` with exactly its ``environment`` (on top of the image's ``ENV`` defaults from the
  Dockerfile) in a network namespace of its own, service names resolving through
  ``/etc/netns/<ns>/hosts`` as Docker's DNS would resolve them. The services' healthchecks and
  the Dockerfile's HEALTHCHECK are run inside those namespaces, Prometheus is started from the
  ``prometheus`` service's command with its volumes mapped onto the host (the real
  ``configs/prometheus.yml``, a temporary directory for the named volume), and the test waits
  until Prometheus scrapes every daemon and sees them all advance.
* The Kubernetes manifests are validated against the schemas kubernetes-validate ships
  (strict), and the ConfigMap's node TOML is loaded with ``load_node_config`` under the
  environment the StatefulSet gives each pod, ``$(POD_NAME)`` expanded per ordinal.
* The secrets: ``scripts/make-secrets.sh`` is run into temporary directories; the compose
  recipe's daemons read its files where the services' ``secrets:`` put them, and
  ``kubectl kustomize`` builds the Secret of ``configs/k8s`` from them.

Namespace topology of the multi-host test (names carry the pid and a random token)::

    daemon0 ns: eth0 10.214.0.1 ─┐
    daemon1 ns: eth0 10.214.0.2 ─┤
    daemon2 ns: eth0 10.214.0.3 ─┼─ veth ─ br0 10.214.0.254   (switch ns)
    prometheus ns: eth0 10.214.0.4 ─┘

As in test_multihost.py, the root namespace gets no interface: the Prometheus API and the
daemons' APIs are read by an observer, this file run as a script inside the Prometheus
namespace, where ``daemon0`` … resolve through the same hosts file Prometheus uses.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if __name__ != "__main__":  # this file is also the observer script run in a namespace, where
    from tests.netns import bridge, stop  # the repository is not on sys.path (nor needed)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "configs" / "k8s"
MAKE_SECRETS = ROOT / "scripts" / "make-secrets.sh"
PROMETHEUS_YML = ROOT / "configs" / "prometheus.yml"
PEERLEARN = str(Path(sys.executable).with_name("peerlearn"))

DAEMONS = ["daemon0", "daemon1", "daemon2"]
PEER_PORT, API_PORT, PROMETHEUS_PORT = 7000, 8000, 9090
SUBNET = "10.214.0"
# The observer's budget: Prometheus must see every target up and then a second scrape of each
# with a higher step, so this must exceed two scrape intervals of configs/prometheus.yml.
OBSERVE_TIMEOUT = 40.0
HEALTHY_TIMEOUT = 30.0  # daemons' API up (the compose healthcheck passing), from their start


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="pyyaml (a dev extra) is not installed")


# --- docker-compose ---------------------------------------------------------------------------


def _docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (make system-deps installs Debian's)")
    return subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """``docker-compose config``, parsed: the file as Compose resolves it."""
    yaml = _yaml()
    res = _docker_compose("config")
    assert res.returncode == 0, res.stderr
    config: dict[str, Any] = yaml.safe_load(res.stdout)
    return config


@dataclass(frozen=True)
class Mount:
    source: str  # a host path (absolute once resolved) or a named volume
    target: str
    read_only: bool


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    """A service's volumes, from either the short (compose v1) or long (v2) resolved form."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out.append(Mount(source, target, "ro" in (mode[0].split(",") if mode else [])))
        else:
            out.append(Mount(v["source"], v["target"], bool(v.get("read_only", False))))
    return out


def _on_volume(service: Mapping[str, Any], path: str, host: Path) -> Path:
    """Where ``path`` (inside the container, on one of the service's named volumes) lives when
    that volume is the directory ``host``: each daemon has its own, as in compose."""
    for m in mounts(service):
        if Path(path).is_relative_to(m.target) and not m.source.startswith((".", "/")):
            return host / Path(path).relative_to(m.target)
    raise AssertionError(f"{path} is on no named volume of the service")


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """service name → condition (the short list form means service_started)."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def published(service: Mapping[str, Any]) -> dict[int, int]:
    """container port → host port."""
    return {container: port for container, (_, port) in bindings(service).items()}


def bindings(service: Mapping[str, Any]) -> dict[int, tuple[str, int]]:
    """container port → (host address, host port); "" for every interface of the host."""
    out = {}
    for p in service.get("ports", []):
        if isinstance(p, str):
            host, _, container = p.rpartition(":")
            address, _, port = host.rpartition(":")
            out[int(container.split("/")[0])] = (address, int(port))
        else:
            out[int(p["target"])] = (p.get("host_ip", ""), int(p["published"]))
    return out


def secret_mounts(compose: Mapping[str, Any], service: Mapping[str, Any]) -> dict[str, Path]:
    """Where a service's secrets are in its container → the host file compose mounts there
    (the short form or a source without target: /run/secrets/<name>)."""
    out = {}
    for ref in service.get("secrets", []):
        source, target = (ref, None) if isinstance(ref, str) else (ref["source"], ref.get("target"))
        spec = compose["secrets"][source]
        assert set(spec) == {"file"}, f"secret {source}: a file of its own, not {spec}"
        out[str(Path("/run/secrets") / (target or source))] = Path(spec["file"])
    return out


def limits(service: Mapping[str, Any]) -> dict[str, Any]:
    """A service's CPU and memory limits, as compose applies them without a swarm."""
    got = dict(service.get("deploy", {}).get("resources", {}).get("limits", {}))
    if "mem_limit" in service:
        got.setdefault("memory", service["mem_limit"])
    if "cpus" in service:
        got.setdefault("cpus", service["cpus"])
    return got


def seconds(duration: str | int | float) -> float:
    """Compose durations: ``20s``, ``1m30s``, ``500ms`` (or a bare number of seconds)."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        instruction, _, args = pending.strip().partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "Dockerfile ends in a continuation line"
    return out


def image_user() -> tuple[int, int]:
    """The uid and gid the image runs as (``USER uid:gid``, numeric)."""
    user = [a for i, a in dockerfile() if i == "USER"][-1]
    uid, _, gid = user.partition(":")
    return int(uid), int(gid)


def image_env() -> dict[str, str]:
    """The ENV defaults the image gives every container (``ENV K=V …`` form)."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                env[key] = value
    return env


def dockerfile_healthcheck() -> list[str]:
    """The HEALTHCHECK's exec-form command."""
    (args,) = [a for i, a in dockerfile() if i == "HEALTHCHECK"]
    _, cmd = args.split(" CMD ", 1)
    command: list[str] = json.loads(cmd)
    return command


def test_dockerfile_builds_a_slim_non_root_image_of_the_runtime_package() -> None:
    steps = dockerfile()
    by = {i: [a for j, a in steps if j == i] for i, _ in steps}
    assert by["FROM"] == ["python:3.11-slim"]
    pip = [a for a in by["RUN"] if "pip install" in a]
    assert len(pip) == 1 and "--no-cache-dir" in pip[0], pip
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", pip[0]), "install `.`, no [dev]"
    copied = " ".join(by["COPY"])
    assert "pyproject.toml" in copied and "peerlearn" in copied
    user = by["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {user}: numeric, non-root (runAsNonRoot)"
    assert by["EXPOSE"] == ["7000 8000"]
    assert json.loads(by["ENTRYPOINT"][0]) == ["peerlearn"]
    assert json.loads(by["CMD"][0]) == ["run"]
    env = image_env()
    assert env["PEERLEARN_LISTEN"] == f"0.0.0.0:{PEER_PORT}"
    assert env["PEERLEARN_API"] == f"0.0.0.0:{API_PORT}"
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    health = dockerfile_healthcheck()
    assert health[0] == "python" and "urllib" in health[-1]
    assert f"http://127.0.0.1:{API_PORT}/status" in health[-1]

    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", "runs", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"):
        assert entry in ignored, f".dockerignore lacks {entry}"
    for entry in ("secrets", "configs/k8s/secrets"):  # scripts/make-secrets.sh's directories
        assert entry in ignored, f".dockerignore lacks {entry}: the secrets would be sent"


# --- a. the compose file is valid Compose Specification ---------------------------------------


def test_compose_config_is_valid_and_has_no_version_key() -> None:
    yaml = _yaml()
    res = _docker_compose("config", "-q")
    assert res.returncode == 0, f"docker-compose config -q failed:\n{res.stderr}"
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "version" not in raw, "the Compose Specification has no top-level `version:`"
    assert set(raw["services"]) == {*DAEMONS, "prometheus", "grafana"}


# --- b. what the resolved services say --------------------------------------------------------


def _node_config(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str], path: Path | None) -> Any:
    """load_node_config as a daemon with exactly ``env`` (plus this process's non-PEERLEARN
    variables) would run it."""
    from peerlearn.daemon.config import load_node_config

    with monkeypatch.context() as m:
        for key in os.environ:
            if key.startswith("PEERLEARN_"):
                m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        return load_node_config(path)


def test_compose_daemons_form_one_run_and_monitoring_waits_for_them(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    configs = []
    for n, name in enumerate(DAEMONS):
        svc = services[name]
        where = f"service {name}"
        assert Path(svc["build"]["context"]).resolve() == ROOT, where
        assert svc["command"][0] == "run", f"{where}: command {svc['command']}"
        assert svc.get("restart") in ("always", "unless-stopped", "on-failure"), where
        health = svc["healthcheck"]
        assert health["test"][0] == "CMD", f"{where}: exec form (no shell needed)"
        assert f"http://127.0.0.1:{API_PORT}/status" in " ".join(health["test"]), where
        for key in ("interval", "timeout", "start_period"):
            assert seconds(health[key]) > 0, f"{where}: healthcheck {key}"
        assert published(svc) == {API_PORT: API_PORT + n}, f"{where}: API on host {8000 + n}"
        env = svc["environment"]
        assert env["PEERLEARN_API"] == f"0.0.0.0:{API_PORT}", where
        assert env["PEERLEARN_ADVERTISE"] == f"{name}:{PEER_PORT}", where
        # the cluster secret and the API token: files compose mounts, so no --insecure
        assert "PEERLEARN_INSECURE" not in env, f"{where}: with a secret and a token, not insecure"
        mounted = secret_mounts(compose, svc)
        for var, secret in [
            ("PEERLEARN_SECRET_FILE", "cluster_secret"),
            ("PEERLEARN_API_TOKEN_FILE", "api_token"),
        ]:
            assert env.get(var) in mounted, f"{where}: {var} {env.get(var)} is no mounted secret"
            assert mounted[env[var]] == Path(compose["secrets"][secret]["file"]), f"{where}: {var}"
        # what the daemon in the container sees: the image's ENV, then the service's
        cfg = _node_config(monkeypatch, {**image_env(), **env}, None)
        assert cfg.secret_file is not None and cfg.api_token_file is not None, where
        assert not cfg.insecure, where
        assert cfg.me.cluster == n, f"{where}: cluster {cfg.me.cluster}"
        assert [d.address for d in cfg.all_daemons] == [f"{d}:{PEER_PORT}" for d in DAEMONS]
        assert cfg.steps is None, f"{where}: unlimited steps"
        # its --out on a named volume of its own (the model outlives the container)
        (data,) = [m for m in mounts(svc) if cfg.out and cfg.out.is_relative_to(m.target)]
        assert data.source == f"{name}-data" and data.source in compose["volumes"], where
        assert not data.read_only, where
        assert (cfg.algorithm, cfg.problem.name) == ("alg1", "softmax"), where
        configs.append(cfg)
    assert len({c.fingerprint for c in configs}) == 1, "the daemons would refuse each other"
    # one cluster secret for all (the handshake proves it), one API token
    assert len({str(secret_mounts(compose, services[d])) for d in DAEMONS}) == 1

    # Nothing on the host's other interfaces: the APIs (whose reads are open), Prometheus and
    # Grafana are on its loopback only. Every service has CPU and memory limits.
    for name, svc in services.items():
        for port, (address, _) in bindings(svc).items():
            assert address == "127.0.0.1", f"{name}: port {port} published on {address or '*'}"
        assert {"cpus", "memory"} <= limits(svc).keys(), f"{name}: limits {limits(svc)}"

    prometheus = services["prometheus"]
    assert prometheus["image"].split(":")[0] in ("prom/prometheus", "docker.io/prom/prometheus")
    assert depends_on(prometheus) == dict.fromkeys(DAEMONS, "service_healthy")
    assert published(prometheus) == {PROMETHEUS_PORT: PROMETHEUS_PORT}
    pm = {m.target: m for m in mounts(prometheus)}
    config_mount = pm["/etc/prometheus/prometheus.yml"]
    assert Path(config_mount.source) == PROMETHEUS_YML and config_mount.read_only
    assert pm["/prometheus"].source == "prometheus-data"
    assert "prometheus-data" in compose["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "--storage.tsdb.path=/prometheus" in prometheus["command"]
    assert "healthcheck" in prometheus  # grafana waits for it

    grafana = services["grafana"]
    assert grafana["image"].split(":")[0] in ("grafana/grafana", "docker.io/grafana/grafana")
    assert depends_on(grafana) == {"prometheus": "service_healthy"}
    assert published(grafana) == {3000: 3000}
    gm = {m.target: m for m in mounts(grafana)}
    provisioning = gm["/etc/grafana/provisioning"]
    dashboards = gm["/var/lib/grafana/dashboards"]
    assert Path(provisioning.source) == ROOT / "configs/grafana/provisioning"
    assert Path(dashboards.source) == ROOT / "configs/grafana/dashboards"
    assert provisioning.read_only and dashboards.read_only
    # a login for everyone, the admin's password from a secret (not in the environment)
    genv = grafana["environment"]
    assert genv["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in genv and "GF_SECURITY_ADMIN_PASSWORD" not in genv
    assert genv["GF_USERS_ALLOW_SIGN_UP"] == "false"
    password = genv["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert secret_mounts(compose, grafana) == {
        password: Path(compose["secrets"]["grafana_admin_password"]["file"])
    }


# --- the secrets: scripts/make-secrets.sh ------------------------------------------------------


def make_secrets(directory: Path, *args: str) -> dict[str, Path]:
    """Run scripts/make-secrets.sh into ``directory``: name → file. Not root, it gives the
    files to this user's group instead of the containers' (that would need sudo)."""
    env = dict(os.environ)
    if os.geteuid() != 0:
        env.update(PEERLEARN_GID=str(os.getegid()), GRAFANA_GID=str(os.getegid()))
    res = subprocess.run(
        [str(MAKE_SECRETS), *args, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, f"make-secrets.sh {' '.join(args)}: {res.stdout}{res.stderr}"
    return {f.name: f for f in sorted(directory.iterdir())}


def _check_random(files: Mapping[str, Path]) -> None:
    values = [f.read_text() for f in files.values()]
    for name, value in zip(files, values, strict=True):
        assert re.fullmatch(r"[0-9a-f]{32,}\n", value), f"{name}: not ≥ 128 random bits in hex"
    assert len(set(values)) == len(values), "the same value twice"


def test_make_secrets_makes_the_compose_files_the_daemons_accept(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    from peerlearn.control.guard import read_token

    files = make_secrets(tmp_path / "s")
    # exactly the files docker-compose.yml mounts, where it looks for them by default
    wanted = {name: Path(spec["file"]) for name, spec in compose["secrets"].items()}
    assert sorted(files) == sorted(wanted)
    assert all(path == ROOT / "secrets" / name for name, path in wanted.items()), wanted
    _check_random(files)
    daemon_gid = image_user()[1] if os.geteuid() == 0 else os.getegid()
    grafana_gid = 0 if os.geteuid() == 0 else os.getegid()  # grafana/grafana: uid 472, gid 0
    for name, f in files.items():
        st = f.stat()
        # compose mounts the file as it is: its group is the container user's, nobody else's
        assert stat.S_IMODE(st.st_mode) == 0o640, f"{name}: mode {oct(st.st_mode)}"
        gid = grafana_gid if name == "grafana_admin_password" else daemon_gid
        assert st.st_gid == gid, f"{name}: group {st.st_gid}, not {gid}"
    for name in ("cluster_secret", "api_token"):
        assert read_token(files[name]) == files[name].read_text().strip()
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700

    # never written over: a second run keeps every file, and makes only a missing one
    kept = files["api_token"].read_text()
    files["cluster_secret"].unlink()
    again = make_secrets(tmp_path / "s")
    assert again["api_token"].read_text() == kept
    _check_random(again)


def test_make_secrets_makes_the_files_kustomize_reads(tmp_path: Path) -> None:
    files = make_secrets(tmp_path / "k", "--k8s")
    assert sorted(files) == ["api_token", "cluster_secret"]
    _check_random(files)
    for name, f in files.items():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f"{name}: {oct(f.stat().st_mode)}"


def test_git_never_sees_the_secrets() -> None:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["secrets/cluster_secret", "configs/k8s/secrets/api_token"]
    res = subprocess.run(
        [git, "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert res.stdout.split() == paths, f"not ignored: {res.stdout} {res.stderr}"


# --- c. the multi-host recipe, run in network namespaces --------------------------------------


@dataclass
class Hosts:
    """One namespace per compose service on a bridge, and what runs in them."""

    switch: str
    ns: dict[str, str]  # service → namespace
    ip: dict[str, str]  # service → address on the bridge
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(
        self, service: str, cmd: list[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        """``cmd`` with exactly ``env`` in the service's namespace, output to its log file."""
        log = self.logs.setdefault(service, self.tmp / f"{service}.log")
        with log.open("ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[service], *cmd],
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def run(self, service: str, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns[service], *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def log_text(self) -> str:
        return "\n".join(
            f"--- {name}:\n{path.read_text(errors='replace')[-4000:]}"
            for name, path in self.logs.items()
        )


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    services = [*DAEMONS, "prometheus"]
    tag = f"pldp-{os.getpid()}-{secrets.token_hex(2)}"
    suffixes = {s: f"{s[0]}{s[-1]}" for s in services}  # e.g. pldp-…-d0, pldp-…-ps
    netns_etc = Path("/etc/netns")
    etc_dirs: list[Path] = []
    made_netns_etc = False
    with bridge(tag, suffixes, SUBNET) as br:
        net = Hosts(switch=br.switch, ns=br.ns, ip=br.ips, tmp=tmp_path)
        try:
            # Service names resolve as on Docker's network: `ip netns exec NS` bind-mounts
            # every file of /etc/netns/NS/ over /etc/, so this hosts file is /etc/hosts there.
            hosts_file = "127.0.0.1\tlocalhost\n::1\tlocalhost\n" + "".join(
                f"{ip}\t{service}\n" for service, ip in net.ip.items()
            )
            made_netns_etc = not netns_etc.exists()
            for ns in net.ns.values():
                try:
                    (netns_etc / ns).mkdir(parents=True)
                    etc_dirs.append(netns_etc / ns)
                    (netns_etc / ns / "hosts").write_text(hosts_file)
                except OSError as exc:
                    pytest.skip(f"cannot write {netns_etc / ns}/hosts for name resolution: {exc}")
            yield net
        finally:
            for proc in net.procs:
                stop(proc)
            for d in etc_dirs:
                shutil.rmtree(d, ignore_errors=True)
            if made_netns_etc:
                with contextlib.suppress(OSError):  # only if empty: someone else may use it now
                    netns_etc.rmdir()


def _in_image(cmd: list[str]) -> list[str]:
    """A command of the image, run here: its `python` is this interpreter (peerlearn installed)."""
    return [sys.executable if c == "python" else c for c in cmd]


def _wait_healthy(
    net: Hosts, service: str, svc: Mapping[str, Any], daemon: subprocess.Popen[bytes]
) -> None:
    """Run the service's healthcheck in its namespace until it passes, as `depends_on:
    condition: service_healthy` waits for it; fail at once if the daemon exits."""
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD", test
    timeout = seconds(svc["healthcheck"]["timeout"])
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    while True:
        res = net.run(service, _in_image(test[1:]), timeout)
        if res.returncode == 0:
            return
        assert daemon.poll() is None, f"{service} exited ({daemon.returncode})\n{net.log_text()}"
        assert time.monotonic() < deadline, f"{service} never healthy: {res.stderr[-500:]}"
        time.sleep(0.2)  # poll interval, bounded by the deadline above


def _prometheus_command(compose: dict[str, Any], data_dir: Path) -> list[str]:
    """The prometheus service's command, its volume targets mapped onto host paths."""
    exe = shutil.which("prometheus")
    assert exe is not None
    svc = compose["services"]["prometheus"]
    where = {}
    for m in mounts(svc):
        if m.source in compose.get("volumes", {}):  # a named volume: a fresh directory here
            data_dir.mkdir()
            where[m.target] = str(data_dir)
        else:
            where[m.target] = m.source
    args = []
    for arg in svc["command"]:
        flag, sep, value = arg.partition("=")
        for target, source in where.items():
            if sep and (value == target or value.startswith(target + "/")):
                arg = f"{flag}={source}{value[len(target) :]}"
        args.append(arg)
    return [exe, *args]


def test_compose_recipe_runs_across_namespaces_with_prometheus(
    compose: dict[str, Any], hosts: Hosts
) -> None:
    net = hosts
    services = compose["services"]
    base = image_env()
    # `make secrets`, here into a directory of the test's: the files compose mounts
    made = make_secrets(net.tmp / "secrets")
    daemons = {}
    for name in DAEMONS:
        svc = services[name]
        # Exactly what the container gets: the image's ENV, the service's environment, and a
        # PATH. No step limit is added: the daemons train until stopped, as in compose.
        env = {**base, **svc["environment"], "PATH": os.environ["PATH"]}
        # its secrets where compose mounts them (/run/secrets/…): here, the files made above
        for target, file in secret_mounts(compose, svc).items():
            for key, value in env.items():
                if value == target:
                    env[key] = str(made[file.name])
        env["PEERLEARN_OUT"] = str(_on_volume(svc, env["PEERLEARN_OUT"], net.tmp / f"{name}-data"))
        state = _on_volume(svc, env["PEERLEARN_STATE_DIR"], net.tmp / f"{name}-data")
        env["PEERLEARN_STATE_DIR"] = str(state)
        daemons[name] = net.start(name, [PEERLEARN, *svc["command"]], env)
    for name in DAEMONS:  # prometheus' depends_on: condition: service_healthy
        _wait_healthy(net, name, services[name], daemons[name])
    for name in DAEMONS:  # the image's own HEALTHCHECK passes too
        res = net.run(name, _in_image(dockerfile_healthcheck()), 10)
        assert res.returncode == 0, f"Dockerfile HEALTHCHECK in {name}: {res.stderr[-500:]}"

    missing = []
    if shutil.which("prometheus") is None:
        missing.append("the prometheus binary is not installed (make system-deps)")
    if not PROMETHEUS_YML.exists():
        missing.append(f"{PROMETHEUS_YML.relative_to(ROOT)} does not exist yet")
    prometheus_url = None
    if not missing:
        cmd = _prometheus_command(compose, net.tmp / "prometheus-data")
        net.start("prometheus", cmd, {"PATH": os.environ["PATH"]})
        prometheus_url = f"http://127.0.0.1:{PROMETHEUS_PORT}"

    observer = net.run(
        "prometheus",
        [
            sys.executable,
            __file__,
            json.dumps(
                {"prometheus": prometheus_url, "daemons": DAEMONS, "timeout": OBSERVE_TIMEOUT}
            ),
        ],
        OBSERVE_TIMEOUT + 30,
    )
    assert observer.returncode == 0, f"observer: {observer.stderr}\n{net.log_text()}"
    report = json.loads(observer.stdout)
    context = f"\n{json.dumps(report, indent=1)[:6000]}\n{net.log_text()}"
    assert report["error"] is None, report["error"] + context
    dead = [n for n, p in daemons.items() if p.poll() is not None]
    assert not dead, f"daemons exited although not asked to: {dead}{context}"

    # One run: each daemon is the cluster its name sorts to, connected to the two others.
    for n, name in enumerate(DAEMONS):
        status = report["status"][name]
        where = f"{name}: {json.dumps(status)[:800]}"
        assert status["state"] == "running", where
        assert status["cluster"] == n and status["clusters"] == len(DAEMONS), where
        assert all(w["step"] > 0 and w["state"] == "running" for w in status["workers"]), where
        others = [f"{d}:{PEER_PORT}" for d in DAEMONS if d != name]
        assert sorted(p["address"] for p in status["peers"]) == others, where
        assert all(p["state"] == "connected" for p in status["peers"]), where
        # connected with the cluster secret; POST /stop needs the token, reads do not
        assert status["security"] == {
            "peer_links": "authenticated (cluster secret)",
            "encrypted": False,
            "api": "token for changes",
            "insecure": False,
        }, where
        assert report["stop_without_token"][name] == 401, report["stop_without_token"]

    if missing:
        pytest.skip(f"daemon part passed; Prometheus part not run: {'; '.join(missing)}")
    prom = report["prometheus"]
    instances = [f"{d}:{API_PORT}" for d in DAEMONS]
    assert sorted(prom["targets_up"]) == instances, context
    runs = prom["fingerprints"]  # fingerprint → instances reporting it
    assert len(runs) == 1, f"more than one run: {runs}"
    assert sorted(*runs.values()) == instances, runs
    for instance in instances:
        first, later = prom["steps_first"][instance], prom["steps_later"][instance]
        assert later > first, f"{instance}: peerlearn_step {first} → {later}{context}"
        assert prom["peers_connected"][instance] == len(DAEMONS) - 1, context

    # `docker compose stop`: SIGTERM, then SIGKILL after stop_grace_period. A graceful stop
    # (workers finish their iteration, links drain) must fit in it and exit 0.
    for proc in daemons.values():
        proc.send_signal(signal.SIGTERM)
    for name, proc in daemons.items():
        grace = seconds(services[name].get("stop_grace_period", "10s"))
        try:
            code = proc.wait(grace)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not stop within stop_grace_period {grace} s\n{net.log_text()}")
        assert code == 0, f"{name} exited {code}\n{net.log_text()}"
        # and its volume keeps the model and the summary of the run it stopped
        out = _on_volume(
            services[name], services[name]["environment"]["PEERLEARN_OUT"], net.tmp / f"{name}-data"
        )
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "stopped" and len(summary["processes"]) == 2, summary
        with np.load(out / "model.npz") as z:
            assert {"mean", *(f"worker_{p['id']}" for p in summary["processes"])} == set(z.files)
        # and the checkpoint to resume from, on the same volume
        state = _on_volume(
            services[name],
            services[name]["environment"]["PEERLEARN_STATE_DIR"],
            net.tmp / f"{name}-data",
        )
        with np.load(state / "checkpoint.npz") as z:
            assert "meta" in z.files and len([f for f in z.files if f.startswith("model_")]) == 2


# --- the observer (this file as a script, inside the Prometheus namespace) --------------------


def observe(prometheus: str | None, daemons: list[str], timeout: float) -> dict[str, Any]:
    """Wait for Prometheus to scrape every daemon twice with progress in between, then read
    each daemon's /status by its service name. Polls; gives up at the deadline."""
    import httpx

    deadline = time.monotonic() + timeout
    out: dict[str, Any] = {"error": None, "status": {}, "stop_without_token": {}}
    instances = [f"{d}:{API_PORT}" for d in daemons]

    def query(client: httpx.Client, expr: str) -> dict[str, float]:
        """instance → value of an instant query (one series per instance)."""
        r = client.get(f"{prometheus}/api/v1/query", params={"query": expr})
        r.raise_for_status()
        result = r.json()["data"]["result"]
        return {s["metric"]["instance"]: float(s["value"][1]) for s in result}

    def until(what: str, check: Any) -> Any:
        while True:
            try:
                got = check()
            except httpx.HTTPError:
                got = None
            if got is not None:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout} s: {what}")
            time.sleep(0.25)  # poll interval, bounded by the deadline

    with httpx.Client(timeout=5.0) as client:
        try:
            if prometheus is not None:
                prom: dict[str, Any] = {}
                out["prometheus"] = prom

                def targets_up() -> list[str] | None:
                    r = client.get(f"{prometheus}/api/v1/targets", params={"state": "active"})
                    r.raise_for_status()
                    active = r.json()["data"]["activeTargets"]
                    prom["targets"] = [
                        {k: t.get(k) for k in ("labels", "health", "lastError")} for t in active
                    ]
                    up = [
                        t["labels"]["instance"]
                        for t in active
                        if t["labels"].get("job") == "peerlearn" and t["health"] == "up"
                    ]
                    return up if sorted(up) == instances else None

                prom["targets_up"] = until("every peerlearn target up", targets_up)
                step = 'min by (instance) (peerlearn_step{job="peerlearn"})'

                def first() -> dict[str, float] | None:
                    got = query(client, step)
                    return got if sorted(got) == instances else None

                prom["steps_first"] = until("peerlearn_step of every daemon", first)

                def later() -> dict[str, float] | None:
                    got = query(client, step)
                    prom["steps_later"] = got
                    ok = all(got.get(i, -1) > prom["steps_first"][i] for i in instances)
                    return got if ok else None

                until("every daemon's peerlearn_step advancing in Prometheus", later)
                info = client.get(
                    f"{prometheus}/api/v1/query",
                    params={"query": 'peerlearn_config_info{job="peerlearn"}'},
                ).json()["data"]["result"]
                runs: dict[str, list[str]] = {}
                for series in info:
                    labels = series["metric"]
                    runs.setdefault(labels["fingerprint"], []).append(labels["instance"])
                prom["fingerprints"] = runs
                prom["peers_connected"] = query(
                    client, 'peerlearn_peers_connected{job="peerlearn"}'
                )

            def connected(name: str) -> dict[str, Any] | None:
                status: dict[str, Any] = client.get(f"http://{name}:{API_PORT}/status").json()
                out["status"][name] = status
                peers = status["peers"]
                ok = len(peers) == len(daemons) - 1 and all(
                    p["state"] == "connected" for p in peers
                )
                return status if ok and status["state"] == "running" else None

            for name in daemons:
                until(
                    f"{name}'s /status: running, every peer connected",
                    lambda name=name: connected(name),
                )
            for name in daemons:  # as from another container of the compose network
                stop = client.post(f"http://{name}:{API_PORT}/stop")
                out["stop_without_token"][name] = stop.status_code
        except TimeoutError as exc:
            out["error"] = str(exc)
    return out


# --- d. Kubernetes ----------------------------------------------------------------------------


def _manifests() -> dict[str, list[dict[str, Any]]]:
    yaml = _yaml()
    out = {}
    for path in sorted(K8S.glob("*.y*ml")):
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def test_k8s_manifests_validate_strictly() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    manifests = _manifests()
    (kustomization,) = manifests.pop("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(manifests), "kustomization lists all"
    version = kv.latest_version()
    kinds = []
    for name, docs in manifests.items():
        for doc in docs:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{name}: {doc['kind']} invalid for Kubernetes {version}: {path}: {exc}"
                )
            except kv.SchemaNotFoundError as exc:
                pytest.fail(f"{name}: {exc.message}")
            kinds.append(doc["kind"])
    assert sorted(kinds) == ["ConfigMap", "Service", "StatefulSet"]


def _expand(env: list[dict[str, Any]], pod: str) -> dict[str, str]:
    """A container's env as the kubelet builds it: fieldRef metadata.name is the pod name, and
    $(VAR) expands variables defined earlier in the list."""
    out: dict[str, str] = {}
    for var in env:
        if "valueFrom" in var:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, var
            out[var["name"]] = pod
        else:
            out[var["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: out.get(m.group(1), m.group(0)),
                var["value"],
            )
    return out


def test_k8s_pods_find_their_cluster_in_the_configmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = {d["kind"]: d for ds in _manifests().values() for d in ds if "kind" in d}
    sts, svc, cm = docs["StatefulSet"], docs["Service"], docs["ConfigMap"]
    name, spec = sts["metadata"]["name"], sts["spec"]
    pod = spec["template"]

    # the headless Service gives each pod its name; it publishes pods before they are ready
    assert spec["serviceName"] == svc["metadata"]["name"] == "peerlearn"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [PEER_PORT, API_PORT]
    labels = pod["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert spec["selector"]["matchLabels"].items() <= labels.items()

    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(API_PORT)
    assert notes["prometheus.io/path"] == "/metrics"
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    uid, gid = image_user()
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (uid, gid, gid)
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/status" and ports.get(get["port"], get["port"]) == API_PORT
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()

    # the config file: the ConfigMap's key, mounted where `--config` reads it
    args = container["args"]
    assert args[:1] == ["run"] and "--config" in args, args
    config_path = Path(args[args.index("--config") + 1])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [
        m
        for m in container["volumeMounts"]
        if volumes.get(m["name"], {}).get("configMap", {}).get("name") == cm["metadata"]["name"]
    ]
    # each pod's data (--out) on a claim of its own, which outlives the pod
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (data,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert not data.get("readOnly") and pod["spec"]["securityContext"]["fsGroup"] == 10001
    # the cluster secret and the API token: files of the generated Secret's volume
    env_vars = {v["name"]: v.get("value") for v in container["env"]}
    assert "PEERLEARN_INSECURE" not in env_vars, "with a secret and a token, not insecure"
    (kustomization,) = _manifests()["kustomization.yaml"]
    (generated,) = kustomization["secretGenerator"]
    keys = {f.partition("=")[0] for f in generated["files"]}
    for var, key in [
        ("PEERLEARN_SECRET_FILE", "cluster_secret"),
        ("PEERLEARN_API_TOKEN_FILE", "api_token"),
    ]:
        path = Path(env_vars[var])
        assert path.name == key and key in keys, f"{var}: {path}"
        (secret_mount,) = [
            m for m in container["volumeMounts"] if path.parent == Path(m["mountPath"])
        ]
        assert secret_mount.get("readOnly") is True, secret_mount
        secret = volumes[secret_mount["name"]]["secret"]
        assert secret["secretName"] == generated["name"] and "items" not in secret, secret
        # root's, given to the fsGroup by the kubelet: the pod's user reads them through its
        # group, and nobody else may (the daemon refuses a file others can read)
        assert secret["defaultMode"] == 0o440, oct(secret["defaultMode"])
    assert config_path.parent == Path(mount["mountPath"])
    toml = tmp_path / config_path.name
    toml.write_text(cm["data"][config_path.name])

    replicas = spec["replicas"]
    expected = [f"{name}-{i}.{spec['serviceName']}:{PEER_PORT}" for i in range(replicas)]
    fingerprints = set()
    for i in range(replicas):
        env = _expand(container["env"], f"{name}-{i}")
        assert env["PEERLEARN_ADVERTISE"] == expected[i]
        cfg = _node_config(monkeypatch, {**image_env(), **env}, toml)
        assert cfg.me.cluster == i, f"pod {name}-{i} took cluster {cfg.me.cluster}"
        assert [d.address for d in cfg.all_daemons] == expected, "one [[daemons]] per replica"
        assert cfg.api == f"0.0.0.0:{API_PORT}" and cfg.listen == f"0.0.0.0:{PEER_PORT}"
        assert cfg.out is not None and cfg.out.is_relative_to(data["mountPath"]), cfg.out
        assert cfg.secret_file is not None and cfg.api_token_file is not None
        assert not cfg.insecure
        fingerprints.add(cfg.fingerprint)
    assert len(fingerprints) == 1, "every pod must describe the same run"


def _kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (its kustomize builds configs/k8s)")
    return subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )


def test_k8s_secret_is_generated_from_the_files_and_mounted(tmp_path: Path) -> None:
    yaml = _yaml()
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s, ignore=shutil.ignore_patterns("secrets"))
    # without `make k8s-secrets` there is nothing to apply: no Secret, no pods without one
    res = _kustomize(k8s)
    assert res.returncode != 0 and "secrets/cluster_secret" in res.stderr, res.stderr

    files = make_secrets(k8s / "secrets", "--k8s")
    res = _kustomize(k8s)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {name: f.read_text() for name, f in files.items()}
    # the pods mount the generated Secret by its hashed name (a new value: new pods)
    assert secret["metadata"]["name"].startswith("peerlearn-secrets-")
    named = [
        v["secret"]["secretName"]
        for v in sts["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    ]
    assert named == [secret["metadata"]["name"]], named
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for doc in docs:
        kv.validate(doc, kv.latest_version(), strict=True)


if __name__ == "__main__":  # the observer: python test_deploy.py '{"prometheus": …}'
    args = json.loads(sys.argv[1])
    print(json.dumps(observe(args["prometheus"], args["daemons"], float(args["timeout"]))))
