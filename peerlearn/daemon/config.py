"""The daemon's one config object: the run (common to every daemon) and this node.

Sources, highest priority first: command-line flags, ``PEERLEARN_*`` environment variables
(nested fields with ``__``, e.g. ``PEERLEARN_LR__ETA=0.1``), the TOML file, defaults.

Membership is static, as in the papers. Either list every daemon (``[[daemons]]`` tables with
``cluster``, ``address``, ``workers``) or use the short form for daemons on one machine:
``listen`` plus ``peers`` (the other daemons' addresses), every daemon with ``workers`` workers;
cluster ids are then the positions of the addresses in sorted order, the same on every daemon.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from peerlearn.algorithms.registry import lookup
from peerlearn.compression import Scheme
from peerlearn.config import RunConfig, RunSettings, explain, load_toml
from peerlearn.errors import ConfigError
from peerlearn.membership import Membership

__all__ = [
    "DaemonSpec",
    "NodeConfig",
    "load_node_config",
    "parse_address",
    "unknown_environment",
]


#: a host name (RFC 1123 labels, plus ``_`` as container names have) or an IPv4 address
_HOST = re.compile(
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*"
)


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` → (host, port); ConfigError with the reason otherwise.

    Strict on purpose: ``"a:1 b:2"`` (a space instead of a comma) must not pass as the host
    ``a:1 b`` and then look like a peer that is down."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            valid = isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
        except ValueError:
            valid = False
    else:
        valid = _HOST.fullmatch(host) is not None
    if not sep or not valid or not port.isdigit() or not 0 <= int(port) < 65536:
        hint = " (separate addresses with commas)" if any(c in text.strip() for c in " \t;") else ""
        raise ConfigError(f"address {text!r} is not host:port{hint}")
    return host, int(port)


class DaemonSpec(BaseModel):
    """One daemon of the run: its cluster id, peer address and worker count."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    cluster: int = Field(ge=0)
    address: str
    workers: int = Field(ge=1)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        parse_address(v)
        return v


class NodeConfig(BaseSettings, RunSettings):
    """Everything ``peerlearn run`` needs: the run's settings (declared once, by
    :class:`~peerlearn.config.RunSettings`; they must agree on every daemon and form the run
    fingerprint checked in the handshake), the membership, and this node's own settings."""

    model_config = SettingsConfigDict(
        env_prefix="PEERLEARN_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    # --- membership ---------------------------------------------------------------------------
    daemons: list[DaemonSpec] = Field(default_factory=list)
    peers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="short form: the daemons' addresses (this one's may be listed too); in "
        "the environment comma-separated or a JSON list",
    )
    workers: int = Field(2, ge=1, description="worker threads (processes) of this daemon")
    cluster: int | None = Field(None, ge=0, description="this daemon's cluster id")

    # --- this node ----------------------------------------------------------------------------
    listen: str = "127.0.0.1:7001"
    advertise: str | None = Field(None, description="address peers use for us (default listen)")
    api: str = "127.0.0.1:8001"
    exit_on_finish: bool = False
    secret_file: Path | None = Field(
        None,
        description="file holding the cluster secret (the same on every daemon; its owner's "
        "and group's alone): peer links are authenticated with it; required to listen for "
        "peers on an address other than loopback",
    )
    tls_cert: Path | None = Field(
        None,
        description="mutual TLS on peer links (with tls_key and tls_ca): this daemon's "
        "certificate (PEM), signed by the run's CA",
    )
    tls_key: Path | None = Field(
        None, description="mutual TLS: the certificate's private key (PEM; its owner's alone)"
    )
    tls_ca: Path | None = Field(
        None,
        description="mutual TLS: the run's CA certificate (PEM): a peer's certificate must be "
        "signed by it",
    )
    api_token_file: Path | None = Field(
        None,
        description="file holding the control API's bearer token (its owner's alone): "
        "POST /stop needs 'Authorization: Bearer <token>'; required to serve the API on an "
        "address other than loopback",
    )
    api_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="more names the Host header of a request that changes the daemon may "
        "carry (besides loopback, the API and advertised addresses); comma-separated in the "
        "environment",
    )
    api_header_timeout: float = Field(
        10.0,
        gt=0,
        description="a control API connection must send a whole request head "
        "within this of connecting or of its last response, or it is closed",
    )
    api_max_connections: int = Field(
        256, ge=1, description="control API connections and requests at once; beyond, 503"
    )
    insecure: bool = Field(
        False,
        description="listen for peers off loopback without a cluster secret, and serve the "
        "control API off loopback without a token: said in the log at start and in /status",
    )
    out: Path | None = Field(
        None,
        description="directory (one per daemon) for model.npz (the local models and their "
        "mean) and summary.json, written on finish and on stop, and metrics.csv, every second",
    )
    state_dir: Path | None = Field(
        None,
        description="directory (one per daemon) for checkpoints, written every "
        "checkpoint_every seconds and at shutdown; a daemon started on it resumes from it",
    )
    checkpoint_every: float = Field(
        60.0, gt=0, description="seconds between checkpoints into state_dir"
    )
    stall_timeout: float = Field(10.0, gt=0, description="waiting longer: reported blocked")
    compute_delay: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="seconds added to every gradient this daemon's workers compute (a sleep "
        "after the oracle): a slower host, emulated — a straggler in a staleness experiment; "
        "this daemon's own, not part of the run",
    )
    peer_timeout: float = Field(
        5.0,
        gt=0,
        description="silent longer: the connection is dropped; away longer: flagged in /peers "
        "and not waited for",
    )
    peer_give_up: float = Field(
        300.0,
        gt=0,
        description="algorithms that keep their frames for an away peer: away longer, the "
        "workers waiting on it are reported blocked (naming it) and it is logged; its frames "
        "are still kept and the run resumes if it comes back",
    )
    handshake_timeout: float = Field(
        5.0,
        gt=0,
        description="an accepted connection whose handshake has not ended by then "
        "is closed (a stranger trickling bytes holds nothing for long)",
    )
    queue_size: int = Field(
        256,
        ge=1,
        description="outstanding frames per peer link; the receiving loop works through up to "
        "this many per link before it answers an API request (4096 made /metrics take seconds)",
    )
    tag_window: int = Field(
        1024,
        ge=1,
        description="iterations a peer's message may be ahead of the slowest worker it is for "
        "and still go into its mailbox; one further ahead waits unacknowledged with its sender, "
        "whose window then bounds what a far-ahead (or hostile) peer costs this daemon",
    )
    tag_window_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="bytes of peers' frames the tag window may let into each worker's mailbox "
        "ahead of it: for large models the window is that many iterations' frames instead of "
        "tag_window (at least 8)",
    )
    queue_timeout: float = Field(
        30.0, gt=0, description="producer's bounded wait for room (algorithms that drop frames)"
    )
    queue_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="bytes of frames outstanding per peer link, at most (beside queue_size: "
        "the cap that binds for large models)",
    )
    stop_grace: float = Field(
        5.0, ge=0, description="at shutdown: time for workers to finish their iteration"
    )
    drain_timeout: float = Field(
        5.0, ge=0, description="at shutdown: time for queued frames to reach their peers"
    )
    eval_every: int = Field(
        10, ge=1, description="steps between a worker's loss evaluations (at most one a second)"
    )
    eval_batch: int = Field(256, ge=1, description="examples in the fixed evaluation batch")
    snapshot_every: float = Field(
        5.0,
        ge=0,
        description="seconds between model snapshots sent to peers, for the global consensus "
        "distance of algorithms that never send models (DASGD, centers); 0: off",
    )
    metrics: bool = Field(True, description="export metrics (off: for measuring their cost)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per line on stderr, for log collectors"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # flags (init) > env > file
        return init_settings, env_settings, _FileSource(settings_cls)

    # --- derived ------------------------------------------------------------------------------

    @cached_property
    def all_daemons(self) -> tuple[DaemonSpec, ...]:
        """Every daemon of the run, by cluster id."""
        if self.daemons:
            specs = sorted(self.daemons, key=lambda d: d.cluster)
            if [d.cluster for d in specs] != list(range(len(specs))):
                raise ConfigError(
                    f"daemons must have cluster ids 0..{len(specs) - 1}, got "
                    f"{[d.cluster for d in self.daemons]}"
                )
            return tuple(specs)
        me = self.advertise or self.listen
        if len(set(self.peers)) != len(self.peers):
            raise ConfigError(f"peers {self.peers} repeat an address")
        # Listing this daemon too is allowed: every daemon of a deployment can share one list.
        addrs = sorted({me, *self.peers}, key=parse_address)
        return tuple(
            DaemonSpec(cluster=i, address=a, workers=self.workers) for i, a in enumerate(addrs)
        )

    @cached_property
    def me(self) -> DaemonSpec:
        daemons = self.all_daemons
        if self.cluster is not None:
            if self.cluster >= len(daemons):
                raise ConfigError(f"cluster {self.cluster} is not in the daemon list")
            return daemons[self.cluster]
        me = parse_address(self.advertise or self.listen)
        for d in daemons:
            if parse_address(d.address) == me:
                return d
        raise ConfigError(
            f"this daemon's address {self.advertise or self.listen} is not in the daemon list; "
            "set cluster or advertise"
        )

    @cached_property
    def membership(self) -> Membership:
        return Membership.of_sizes([d.workers for d in self.all_daemons])

    @model_validator(mode="after")
    def _tls_all_or_none(self) -> NodeConfig:
        given = [n for n in ("tls_cert", "tls_key", "tls_ca") if getattr(self, n) is not None]
        if given and len(given) != 3:
            missing = sorted({"tls_cert", "tls_key", "tls_ca"} - set(given))
            raise ValueError(
                f"mutual TLS needs tls_cert, tls_key and tls_ca together; {', '.join(missing)} "
                "missing"
            )
        return self

    @model_validator(mode="after")
    def _give_up_after_away(self) -> NodeConfig:
        # A peer is away only after peer_timeout: giving up on it sooner would mean nothing.
        if self.peer_give_up < self.peer_timeout:
            raise ValueError(
                f"peer_give_up ({self.peer_give_up:g} s) must be at least peer_timeout "
                f"({self.peer_timeout:g} s): a peer is given up on once it has been away"
            )
        return self

    @field_validator("peers", "api_hosts", mode="before")
    @classmethod
    def _peer_list(cls, value: Any) -> Any:
        """``"a:1,b:2"`` or ``'["a:1", "b:2"]'`` from the environment, a list elsewhere."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list of addresses: {exc}") from None
            return [p.strip() for p in text.split(",") if p.strip()]
        return value

    @field_validator("peers")
    @classmethod
    def _peer_addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_address(item)  # names the offending item
        return value

    @field_validator("listen", "api", "advertise")
    @classmethod
    def _an_address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)
        return value

    @field_validator("steps", mode="before")
    @classmethod
    def _unlimited(cls, value: Any) -> Any:
        """``PEERLEARN_STEPS=`` (empty), ``none`` or ``unlimited``: no limit."""
        if isinstance(value, str) and value.strip().lower() in ("", "none", "unlimited"):
            return None
        return value

    @cached_property
    def run(self) -> RunConfig:
        """The run as the algorithms see it: this config's run settings, laid out over the
        daemons (the simulator's config type, so both runtimes build the same programs)."""
        n = self.membership.processes
        # the values themselves, not a dump: nested settings keep what was set explicitly
        # (elastic.alpha and elastic.beta may not both be)
        settings = {name: getattr(self, name) for name in RunSettings.model_fields}
        if not lookup(self.algorithm).reads("quorum"):
            settings["max_failures"] = None  # f sets N, and this algorithm has none
        elif self.max_failures is None:
            settings["max_failures"] = (n - 1) // 2  # a daemon survives any minority
        try:
            return RunConfig(
                **settings,
                processes=n,
                clusters=self.membership.clusters,
                cluster_sizes=[d.workers for d in self.all_daemons],
            )
        except ValidationError as exc:
            raise ConfigError(explain(exc)) from None

    @cached_property
    def _fingerprinted(self) -> dict[str, Any]:
        """Everything that must agree across daemons (run + membership), as JSON values."""
        # N as the run uses it, however it was given (quorum, max_failures or neither), and
        # nothing for algorithms that have none
        run = self.run
        quorum = run.n_quorum if run.spec.reads("quorum") else None
        fields = run.model_copy(update={"quorum": quorum}).model_dump(
            # dtype: the Join carries the one the run resolved it to (unset and the
            # problem's own are the same run), checked before the fingerprint
            mode="json",
            exclude={"sim", "trace", "topology", "max_failures", "dtype", "compression"},
        )
        # Cluster ids and worker counts, not addresses: a replaced host keeps its cluster id
        # (and the others' peer lists may name its old address until they are updated).
        daemons = [{"cluster": d.cluster, "workers": d.workers} for d in self.all_daemons]
        extra: dict[str, Any] = {}
        # The graph itself, not the topology's spelling: hosts may keep one edge file at
        # different paths, and two files at one path may differ.
        if self.run.spec.topology is not None:
            extra["graph"] = self.run.graph.edges()
        # Every daemon rounds as the others expect; left out when off, so that turning the
        # feature into the code changed no run's fingerprint (checkpoints stay resumable).
        if run.compression.scheme is not Scheme.NONE:
            extra["compression"] = run.compression.model_dump(mode="json")
        return {"run": fields, "daemons": daemons, **extra}

    @cached_property
    def fingerprint(self) -> str:
        """Hash of everything that must agree across daemons (run + membership)."""
        blob = json.dumps(self._fingerprinted, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @cached_property
    def fingerprint_settings(self) -> dict[str, str]:
        """What the fingerprint covers, one entry per setting (``lr``, ``problem.dim``,
        ``daemons``, …) as JSON text: what members are told differs when fingerprints do."""
        out: dict[str, str] = {}

        def flatten(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for key, item in value.items():
                    flatten(f"{prefix}.{key}" if prefix else str(key), item)
            else:
                out[prefix] = json.dumps(value, sort_keys=True)

        fingerprinted = self._fingerprinted
        flatten("", fingerprinted["run"])
        for key in fingerprinted.keys() - {"run"}:
            out[key] = json.dumps(fingerprinted[key], sort_keys=True)
        return out

    def validate_all(self) -> NodeConfig:
        """Resolve every derived view now, so that errors surface at start-up."""
        _ = (self.me, self.run, self.fingerprint)
        parse_address(self.api)
        parse_address(self.listen)
        return self


_FILE: ContextVar[dict[str, Any] | None] = ContextVar("peerlearn_node_file", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """The TOML file given to :func:`load_node_config`: the lowest-priority source."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _FILE.get() or {}


def load_node_config(path: Path | None = None, flags: dict[str, Any] | None = None) -> NodeConfig:
    """File < ``PEERLEARN_*`` env < flags; every problem is one ConfigError naming the field."""
    file = load_toml(path)
    token = _FILE.set(file.data if file is not None else None)
    try:
        return NodeConfig(**(flags or {})).validate_all()
    except ValidationError as exc:
        raise ConfigError(explain(exc, NodeConfig, file, flags, "PEERLEARN_")) from None
    except SettingsError as exc:  # an environment variable pydantic-settings cannot parse
        raise ConfigError(f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)) from None
    finally:
        _FILE.reset(token)


#: ``PEERLEARN_*`` variables that are no settings: knobs of the tests and benchmarks
_NOT_SETTINGS = frozenset(
    {"PEERLEARN_SCREENSHOT", "PEERLEARN_BENCH_LAYOUT", "PEERLEARN_REQUIRE_ALL"}
)


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``PEERLEARN_*`` variable that names no setting (pydantic-settings
    ignores them silently, so a misspelt ``PEERLEARN_STPES`` would simply not apply)."""
    env = os.environ if environ is None else environ
    fields = list(NodeConfig.model_fields)
    out = []
    for key in sorted(env):
        name = key.upper()
        if not name.startswith("PEERLEARN_") or name in _NOT_SETTINGS:
            continue
        top = name.removeprefix("PEERLEARN_").split("__")[0].lower()
        if top in fields:
            continue  # an unknown key below a known table is refused by validation
        close = difflib.get_close_matches(top, fields, n=1)
        hint = f" (did you mean PEERLEARN_{close[0].upper()}?)" if close else ""
        out.append(f"environment variable {key} is not a setting and is ignored{hint}")
    return out
