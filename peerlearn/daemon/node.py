"""One peer daemon: worker threads, register store, links to the other daemons, control API.

This module is the daemon's lifecycle: it builds the parts, starts them, stops them in a fixed
order and owns every task. The parts live apart: where messages go in
:mod:`peerlearn.daemon.routing` (local delivery shared with the in-process runtime, in
:mod:`peerlearn.runtime.delivery`), what is measured in :mod:`peerlearn.daemon.monitor`, what
``/status`` and ``/peers`` answer in :mod:`peerlearn.control.views`, from the read-only surface
this class offers (:attr:`Daemon.links`, :meth:`Daemon.loss_of`, :meth:`Daemon.blocked`, …).

Lifecycle (uvicorn's ``server.py`` shape, every task owned by one ``asyncio.TaskGroup``)::

    STARTING ─start()─> RUNNING ─every worker done─> FINISHED ─┐
         └──────────────────┴── request_stop / SIGTERM ─> STOPPING ─> STOPPED

Shutdown order is fixed: (1) workers finish their current iteration (a waiting worker wakes
at once) and are joined; (2) the transport stops accepting, drains its outbound links (frames
the workers produced get acked, bounded by ``drain_timeout``) and closes; (3) the control API
stops; (4) a final summary is logged. A finished daemon keeps relaying and serving its API
until stopped — other daemons may still need its links — unless ``exit_on_finish``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import numpy as np
import uvicorn

from peerlearn.algorithms.spec import DeliveryPolicy
from peerlearn.control.app import WorkerModel, build_app
from peerlearn.control.guard import ApiGuard, guarded_http, is_loopback, read_token
from peerlearn.control.metrics import DaemonMetrics
from peerlearn.daemon.checkpoint import Saver, StateDir, iteration
from peerlearn.daemon.config import NodeConfig, parse_address
from peerlearn.daemon.monitor import Monitor, SendWait, Staleness, WaitsOn
from peerlearn.daemon.output import Row, RunOutput, summary_of
from peerlearn.daemon.rejoin import REQUEST_TIMEOUT, Rejoin
from peerlearn.daemon.restore import Restore, resumable, start_from_checkpoint
from peerlearn.daemon.routing import DaemonRouter, Heard, packing, tag_window
from peerlearn.effects import Report, Tag, Vector, quiet_float_errors
from peerlearn.errors import StartupError
from peerlearn.problems import Problem, in_dtype
from peerlearn.runs import build_problem, grad_stream, make_programs
from peerlearn.runtime.delivery import Delivery
from peerlearn.runtime.mailbox import Mailbox, Waiting
from peerlearn.runtime.store import RegisterStore
from peerlearn.runtime.worker import Worker, WorkerState
from peerlearn.transport import tls
from peerlearn.transport.links import LinkSettings, OutLink
from peerlearn.transport.peers import PeerAddress, Transport
from peerlearn.transport.stats import TransportStats
from peerlearn.wire import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Hello, Join

__all__ = ["Daemon", "DaemonState"]

#: bytes a Data frame takes besides its vector (prefix, header with tag and recipients): an
#: allowance for sizing a link's window from its byte budget, not a cap
_HEADER_ALLOWANCE = 256

log = logging.getLogger(__name__)


class DaemonState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    FINISHED = "finished"  # every local worker is done; still relaying and serving
    STOPPING = "stopping"
    STOPPED = "stopped"


class Daemon:
    """A peer daemon for ``cfg``; use ``async with Daemon(cfg) as d`` or start()/stop()."""

    def __init__(
        self,
        cfg: NodeConfig,
        worker_factory: type[Worker] = Worker,
        listen_socket: socket.socket | None = None,
        problem: Problem | None = None,
    ) -> None:
        """``problem``: this object instead of the one the config names (a model defined in a
        script: :func:`peerlearn.torch.train`); the config's name still goes into the run
        fingerprint."""
        self._loop = asyncio.get_running_loop()  # built inside the loop that will run it
        self.cfg = cfg
        self.run_cfg = cfg.run
        self.membership = cfg.membership
        self.me = cfg.me
        #: which start of this daemon this is: its boot time, so a restart compares greater
        #: (peers reset the sequence numbers they kept for the last one)
        self.incarnation = time.time_ns()
        self.state = DaemonState.STARTING
        self.pids = self.membership.members[self.me.cluster]
        self.problem = (
            in_dtype(problem, self.run_cfg.dtype)
            if problem is not None
            else build_problem(self.run_cfg)
        )
        self.dim = self.problem.dim if self.problem is not None else cfg.dim
        #: the dtype of models, the store and the wire (standalone agreement: float64)
        self.dtype = self.problem.dtype if self.problem is not None else np.dtype(np.float64)
        self.store = RegisterStore(self.pids)
        self.mailboxes = {
            pid: Mailbox(self.membership.cluster_of, self.membership.clusters) for pid in self.pids
        }
        self.stats = TransportStats()
        self.metrics = DaemonMetrics(
            # scraped only once the API serves, when the monitor (made below) exists
            lambda: self.monitor.snapshot(),
            {
                "algorithm": self.run_cfg.algorithm,
                "problem": self.run_cfg.problem.name if self.problem is not None else "",
                "cluster": str(self.me.cluster),
                "clusters": str(self.membership.clusters),
                "processes": str(self.membership.processes),
                "workers": str(len(self.pids)),
                "fingerprint": cfg.fingerprint,
            },
        )
        self.heard = Heard()
        # The workers need the router, and its delivery's staleness their steps: the map is
        # filled as soon as they exist, before any runs.
        receivers: dict[int, Worker] = {}
        self.staleness = Staleness(receivers, self.metrics.staleness if cfg.metrics else None)
        self.delivery = Delivery(
            self.mailboxes, dropped=self.stats.drop, stored=self.staleness.record
        )
        # The workers need the router and the router the catch-up, which needs the workers:
        # it reads them only once a peer speaks, after start.
        self.rejoin = Rejoin(self.run_cfg, self.problem, self.membership, [])
        self.rejoin.incarnation = self.incarnation
        self.rejoin.deliver_with(self.delivery)
        # One frame per remote process and iteration. (Alg 2 and agreement send one per
        # cluster round besides, R of them: counted, the window would shrink to its minimum
        # at any model size and pace their runs far more often — not yet; their window lets
        # in up to R + 1 times the budget, README "Security" says so.)
        #: the tag window in iterations: tag_window, fewer for large models (tag_window_bytes)
        self.tag_window = tag_window(
            cfg.tag_window,
            cfg.tag_window_bytes,
            self.dim * self.dtype.itemsize + _HEADER_ALLOWANCE,
            self.membership.processes - len(self.pids),
        )
        if self.tag_window < cfg.tag_window:
            log.info(
                "tag window: %d iterations (tag_window_bytes: %d bytes of peers' frames)",
                self.tag_window,
                cfg.tag_window_bytes,
            )
        #: each worker's rounding (payload compression): the router packs what it rounded
        self.compressors = {pid: self.run_cfg.compressor() for pid in self.pids}
        self.router = DaemonRouter(
            self.delivery,
            self.membership,
            self.heard,
            self.rejoin.on_state,
            self.tag_window,
            # Where frames may drop, a frame far ahead of running workers is dropped, not
            # held: held, it would pace its sender to the slowest receiver.
            # Only where the workers can catch up from a peer's state (not standalone MAA, nor
            # once a state could not be resumed from): else a dropped frame stalls them.
            drop_ahead=lambda: (
                self.run_cfg.spec.delivery is not DeliveryPolicy.KEEP
                and self.run_cfg.spec.resume is not None
                # an open-ended run: in a finite one, peers finish and leave, and a late
                # daemon must finish from what they sent — nobody is left to catch up from
                and self.run_cfg.steps is None
                and not self.rejoin.cannot_resume
                and self.workers_started
            ),
            packing=packing(self.run_cfg, self.compressors),
        )
        programs = make_programs(self.run_cfg, self.problem, self.pids)
        problem, n = self.problem, self.run_cfg.processes
        self.workers = [
            worker_factory(
                pid,
                self.membership.name(pid),
                program,
                problem.oracle(pid, n, len(self.pids)) if problem is not None else _no_grad,
                grad_stream(self.run_cfg, pid),
                self.mailboxes[pid],
                self.store,
                self.router,
                self._on_report,
            )
            for pid, program in zip(self.pids, programs, strict=True)
        ]
        for w in self.workers:
            w.on_exit = self._on_worker_exit
            w.compressor = self.compressors[w.pid]
            w.compute_delay = self.cfg.compute_delay
        self.rejoin.workers = self.workers
        receivers.update((w.pid, w) for w in self.workers)
        self.monitor = Monitor(
            cfg, self.problem, self.workers, self.metrics, self.heard, self.stats
        )
        self.transport: Transport | None = None
        self.api_port: int | None = None
        self.peer_port: int | None = None
        self._api: uvicorn.Server | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._catchup_task: asyncio.Task[None] | None = None
        self._workers_task: asyncio.Task[None] | None = None
        self._peers_task: asyncio.Task[None] | None = None
        self._listen_socket = listen_socket
        self._stop_requested = asyncio.Event()
        self.progress = asyncio.Event()
        self._watched = False
        self._stopped = asyncio.Event()
        self.stop_reason: str | None = None
        self.started_at = time.monotonic()
        #: ``--out``: the final model, summary and metrics (peerlearn/daemon/output.py)
        self.output = RunOutput(cfg.out) if cfg.out is not None else None
        self.output_failed = False  # the last write of model.npz and summary.json failed
        self._output_task: asyncio.Task[None] | None = None
        #: ``--state-dir``: checkpoints, and the one this start resumes from
        self.state_dir = StateDir(cfg.state_dir) if cfg.state_dir is not None else None
        self.saver: Saver | None = None
        self.restore: Restore | None = None
        self.checkpoint_failed = False  # the final checkpoint was not written
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._guard: ApiGuard | None = None
        #: the workers run (before, a checkpoint or a peer's state may still set where from)
        self.workers_started = False
        self._secret: bytes | None = None
        self._tls: tls.TlsContexts | None = None

    def __repr__(self) -> str:
        return f"Daemon(cluster={self.me.cluster}, {self.state}, port={self.peer_port})"

    def _release_held(self) -> None:
        """A worker advanced (its thread): frames held for the tag window may be due now."""
        transport = self.transport
        if transport is None or (due := transport.due_at) is None:
            return
        reach = self.router.reach()
        if reach >= due:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to release
                self._loop.call_soon_threadsafe(transport.release, reach)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> Daemon:
        """Listen, connect, serve the API, start the workers.

        Raises:
            StartupError: the peer or API address cannot be listened on (in use, not an
                address of this host): one line naming the address, before anything started.

        Whatever start() raises, it leaves nothing behind: no socket open (the listening
        socket it was given included), no task, no worker thread.
        """
        api_sockets: list[socket.socket] = []
        try:
            if self.output is not None:
                try:
                    self.output.prepare()
                except OSError as exc:
                    raise StartupError(f"cannot use --out {self.output.dir}: {_why(exc)}") from None
            if self.state_dir is not None:
                await self._open_state_dir(self.state_dir)
            self._secret = self._read_secret()
            self._guard = self._api_guard()
            # Bound here, before anything runs, so that a busy port is one clear error —
            # uvicorn binding it itself logs its own error and exits its task with SystemExit.
            api_sockets = _listen("control API", self.cfg.api)
            await self._start(api_sockets)
        except BaseException as exc:
            await self._abandon(exc, api_sockets)
            raise
        return self

    def _read_secret(self) -> bytes | None:
        """The cluster secret (peerlearn/transport/auth.py); StartupError for a file that
        cannot be used, or peers listened for off loopback without one and without
        ``insecure``."""
        cfg = self.cfg
        if cfg.tls_cert is not None and cfg.tls_key is not None and cfg.tls_ca is not None:
            self._tls = tls.load(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
        if cfg.secret_file is not None:
            return read_token(cfg.secret_file, "--secret-file").encode()
        host = parse_address(cfg.listen)[0]
        if not is_loopback(host) and self._tls is None:
            if not cfg.insecure:
                raise StartupError(
                    f"listening for peers on {cfg.listen} needs a cluster secret "
                    "(--secret-file) or mutual TLS (--tls-cert, --tls-key, --tls-ca): anyone "
                    "who reaches it could join the run; --insecure listens without either"
                )
            log.warning(
                "INSECURE: peer links on %s are not authenticated: anyone who reaches the port "
                "can join the run (--insecure)",
                cfg.listen,
            )
        return None

    def security_status(self) -> dict[str, Any]:
        """``/status``'s ``security``: what guards the peer links and the control API."""
        cfg = self.cfg
        guards = [
            *(["mutual TLS"] if cfg.tls_cert is not None else []),
            *(["cluster secret"] if cfg.secret_file is not None else []),
        ]
        return {
            "peer_links": f"authenticated ({', '.join(guards)})" if guards else "not authenticated",
            "encrypted": cfg.tls_cert is not None,
            "api": "token for changes" if cfg.api_token_file is not None else "no token",
            "insecure": cfg.insecure
            and (
                (
                    cfg.secret_file is None
                    and cfg.tls_cert is None
                    and not is_loopback(parse_address(cfg.listen)[0])
                )
                or (cfg.api_token_file is None and not is_loopback(parse_address(cfg.api)[0]))
            ),
        }

    def _api_guard(self) -> ApiGuard:
        """The checks of API requests that change the daemon (peerlearn/control/guard.py);
        StartupError for a token file that cannot be used, or an API on a non-loopback address
        without a token and without ``insecure``."""
        cfg = self.cfg
        token = read_token(cfg.api_token_file) if cfg.api_token_file is not None else None
        api_host = parse_address(cfg.api)[0]
        if token is None and not is_loopback(api_host):
            if not cfg.insecure:
                raise StartupError(
                    f"the control API on {cfg.api} needs a token (--api-token-file): anyone who "
                    "reaches it could stop this daemon; --insecure serves it without one"
                )
            log.warning(
                "INSECURE: the control API on %s has no token: anyone who reaches it can stop "
                "this daemon (--insecure)",
                cfg.api,
            )
        hosts = {api_host, parse_address(cfg.listen)[0], *cfg.api_hosts}
        if cfg.advertise is not None:
            hosts.add(parse_address(cfg.advertise)[0])
        hosts.add(socket.gethostname())
        counter = self.metrics.api_refused
        return ApiGuard(token, hosts, lambda reason: counter.labels(reason).inc())

    async def _open_state_dir(self, state_dir: StateDir) -> None:
        """Take the state directory, read its checkpoint (CheckpointError: one that cannot be
        resumed, left as it is) and draw this start's incarnation from it."""
        try:
            state_dir.open()
        except OSError as exc:
            raise StartupError(f"cannot use --state-dir {state_dir.dir}: {_why(exc)}") from None
        fingerprint, cluster = self.cfg.fingerprint, self.me.cluster
        why = resumable(self.run_cfg.spec)
        if why is not None:  # nothing to resume from: no checkpoints are written either
            if state_dir.checkpoint.exists():
                aside = state_dir.set_aside()
                log.warning("not resuming from the checkpoint: %s; it is kept as %s", why, aside)
            log.warning("no checkpoints are written: %s", why)
            self.incarnation = await asyncio.to_thread(state_dir.next_incarnation, None)
            self.rejoin.incarnation = self.incarnation
            return
        saved = await asyncio.to_thread(
            state_dir.load, fingerprint, cluster, self.pids, self.dim, self.dtype
        )
        self.incarnation = await asyncio.to_thread(state_dir.next_incarnation, saved)
        self.rejoin.incarnation = self.incarnation
        spec = self.run_cfg.spec
        center = self.run_cfg.center if spec.center and not spec.lockstep else None
        self.saver = Saver(state_dir, fingerprint, cluster, center)
        for w in self.workers:
            w.keeps_rng = True
        if saved is None:
            return
        self.restore = Restore(self.run_cfg, self.problem, self.workers, saved, self.incarnation)
        self.restore.check()  # CheckpointError now, not once it is resumed from
        if self.restore.rebuilt:  # a center rebuilt here counts the workers' ledgers
            self.rejoin.checkpointed(self.restore.ledgers())
        elif self.restore.centered and self.run_cfg.center in self.pids:
            self.rejoin.center_restored = True  # from the checkpoint: nothing to rebuild
        if self.restore.centered and self.run_cfg.center not in self.pids:
            # The held ledgers may not be the ones the workers go on with: not told to a
            # restarted center until decided (before any link is up to be asked).
            self.rejoin.deciding = True
        if self.restore.takes_live_state:
            self.restore.hold()  # a live peer's state is taken, if one answers
        else:
            self.restore.own()  # the starting point; a live peer's newer state may replace it
        log.info(
            "resuming from the checkpoint of %s (iteration %d, written %s ago)",
            state_dir.checkpoint,
            self.restore.step,
            _ago(time.time() - saved.saved_at),
        )

    async def _abandon(self, exc: BaseException, api_sockets: list[socket.socket]) -> None:
        """Undo a start() that failed at any point (``exc``: why): a caller that goes on (a
        test, a program embedding daemons) keeps no port bound, no task, no thread."""
        if self.output is not None:
            self.output.close()
        if self.state_dir is not None:
            self.state_dir.close()
        for w in self.workers:
            w.stop()
        started = [w for w in self.workers if w.state is not WorkerState.CREATED]
        await asyncio.to_thread(_join, started)
        if self.transport is not None:  # its links end, its server closes
            try:
                await self.transport.close(drain_unconnected=False)
            except Exception:  # the caller must get exc, not this
                log.exception("closing the peer links after a failed start")
        api = self._api
        if api is not None:
            api.should_exit = True
            for server in getattr(api, "servers", ()):  # set once uvicorn bound them
                server.close()
        if self._tasks is not None:
            # Leaving the group with an error cancels what still runs (the API server, the
            # monitor) and raises a group holding exc, or exc: the caller gets exc itself.
            with contextlib.suppress(BaseException):
                await self._tasks.__aexit__(type(exc), exc, exc.__traceback__)
            self._tasks = None
        for sock in api_sockets:
            sock.close()
        if self._listen_socket is not None:
            self._listen_socket.close()

    async def _start(self, api_sockets: list[socket.socket]) -> None:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        hello = Hello(
            min_version=MIN_PROTOCOL_VERSION,
            max_version=PROTOCOL_VERSION,
            cluster=self.me.cluster,
            incarnation=self.incarnation,
            nonce=0,  # each connection draws its own
            name=f"{self.me.cluster}@{self.me.address}",
        )
        join = Join(
            workers=self.pids, dim=self.dim, dtype=self.dtype.name, fingerprint=self.cfg.fingerprint
        )
        peers = [
            PeerAddress(d.cluster, *parse_address(d.address))
            for d in self.cfg.all_daemons
            if d.cluster != self.me.cluster
        ]
        settings = LinkSettings(
            max_queue=self.cfg.queue_size,
            queue_timeout=self.cfg.queue_timeout,
            queue_bytes=self.cfg.queue_bytes,
            frame_bytes=self.dim * self.dtype.itemsize + _HEADER_ALLOWANCE,
            keep=self.run_cfg.spec.delivery is DeliveryPolicy.KEEP,
            replay=self.run_cfg.spec.lockstep and self.run_cfg.spec.resume is not None,
            peer_timeout=self.cfg.peer_timeout,
            handshake_timeout=self.cfg.handshake_timeout,
            peer_give_up=self.cfg.peer_give_up,
            drain_timeout=self.cfg.drain_timeout,
            max_payload=max(self.dim * self.dtype.itemsize, 1024),
            secret=self._secret,
            run_settings=self.cfg.fingerprint_settings,
            tls=self._tls,
        )
        self.transport = Transport(
            hello,
            join,
            self.membership,
            parse_address(self.cfg.listen),
            peers,
            self.router.deliver,
            settings,
            self.stats,
            catchup=self.rejoin.on_note,
            beyond=self.router.beyond,
            ahead=self.rejoin.dropped_here,
        )
        for box in self.mailboxes.values():
            box.on_advance = self._release_held
        # Before the links come up: the first catch-up waits for every peer's first note.
        self.rejoin.expect({p.cluster for p in peers}, time.monotonic() + self.cfg.peer_timeout)
        if self.restore is not None:  # said in the first note on every link
            self.transport.announce_start(self.restore.step)
        self.router.attach(self.transport)
        self.rejoin.attach(self.transport)
        self.monitor.attach(self.transport)
        try:
            await self.transport.start(self._tasks, self._listen_socket)
        except OSError as exc:
            raise StartupError(
                f"cannot listen for peers on {self.cfg.listen}: {_why(exc)}"
            ) from None
        self.peer_port = self.transport.port
        await self._start_api(api_sockets)
        spec = self.run_cfg.spec
        if self.restore is not None:
            self._workers_task = self._tasks.create_task(
                self._start_from_checkpoint(self.restore), name="start-workers"
            )
        elif spec.resume is not None and spec.delivery is DeliveryPolicy.KEEP:
            # Its messages are numbered per origin: a restarted process must take its state
            # before it sends anything (peerlearn/daemon/rejoin.py).
            self._workers_task = self._tasks.create_task(
                self._start_workers_once_settled(), name="start-workers"
            )
        else:
            self._start_workers()
        self.state = DaemonState.RUNNING
        self._monitor_task = self._tasks.create_task(
            self.monitor.evaluate_every_tick(), name="monitor"
        )
        self._catchup_task = self._tasks.create_task(self._catch_up(), name="catch-up")
        if self.output is not None:
            self._output_task = self._tasks.create_task(self._record(), name="output")
        if self.saver is not None:
            self._checkpoint_task = self._tasks.create_task(
                self._checkpoint_every(), name="checkpoints"
            )
        self._peers_task = self._tasks.create_task(self.monitor.watch_peers(), name="peers")
        if self.monitor.sends_snapshots:
            self._snapshot_task = self._tasks.create_task(
                self.monitor.send_snapshots(), name="snapshots"
            )
        log.info(
            "daemon started: %s, cluster %d of %d, workers %s, peers on :%s, API on :%s",
            self.cfg.run.algorithm,
            self.me.cluster,
            self.membership.clusters,
            ", ".join(self.membership.name(p) for p in self.pids),
            self.peer_port,
            self.api_port,
        )
        for warning in self.run_cfg.unused_settings():
            log.warning("%s", warning)
        if self.problem is not None:
            for warning in self.run_cfg.theory_warnings(self.problem.constants):
                log.warning("%s", warning)

    async def _start_from_checkpoint(self, restore: Restore) -> None:
        await start_from_checkpoint(self, restore)
        if not self._stop_requested.is_set():
            self._start_workers()

    def _start_workers(self) -> None:
        self.workers_started = True
        if self.transport is not None:  # what was held before the start, judged anew
            self._loop.call_soon(self.transport.release)
        for w in self.workers:
            if w.state is WorkerState.CREATED and not w.done.is_set():
                w.start()

    async def _start_workers_once_settled(self) -> None:
        """Start the workers once every peer has said what it dropped for this daemon and the
        state asked for, if any, has come. Peers that say nothing within peer_timeout are not
        waited for (a first start without them loses nothing); a state request is, up to
        three request timeouts (it is made again meanwhile): a peer that dropped frames for
        this daemon is alive, and starting without its state could reuse numbers the last
        incarnation used."""
        peers = {link.cluster for link in self.links}
        start = time.monotonic()
        notes_until = start + self.cfg.peer_timeout
        state_until = start + 3 * REQUEST_TIMEOUT
        self.rejoin.expect(peers, notes_until)
        while not self.rejoin.settled(peers):
            now = time.monotonic()
            until = state_until if self.rejoin.waiting_for_state() else notes_until
            if now >= until and not self.rejoin.waiting_for_state():
                # The peers heard so far are all there will be: the one furthest ahead of
                # those that dropped frames is asked now, if any did.
                self.rejoin.consider()
                if self.rejoin.waiting_for_state():
                    continue
            if now >= until:
                if self.rejoin.waiting_for_state():
                    log.warning("no peer answered with its state: the workers start afresh")
                break
            self.rejoin.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rejoin.changed.wait(), min(until - now, 1.0))
            self.rejoin.consider()  # a request that timed out is made again
        if not self._stop_requested.is_set():
            self._start_workers()

    async def _start_api(self, sockets: list[socket.socket]) -> None:
        slow = self.metrics.api_refused.labels("header_timeout")
        config = uvicorn.Config(
            build_app(self, self._guard),
            http=guarded_http(self.cfg.api_header_timeout, slow.inc),
            timeout_keep_alive=5,
            limit_concurrency=self.cfg.api_max_connections,
            log_config=None,  # its records reach the process's handler: one format (--log-format)
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        # Known at once: stop(), or a start() that fails, tells it to exit.
        if self._guard is not None and sockets:
            self._guard.port = sockets[0].getsockname()[1]
        server = self._api = _EmbeddedServer(config)
        assert self._tasks is not None
        self._tasks.create_task(server.serve(sockets=sockets), name="api")
        while not server.started:
            if server.should_exit:
                raise OSError(f"control API could not bind {self.cfg.api}")
            await asyncio.sleep(0.01)  # uvicorn exposes no started event
        self.api_port = server.servers[0].sockets[0].getsockname()[1]

    def request_stop_threadsafe(self, reason: str) -> None:
        """:meth:`request_stop` from another thread (a script's, while the daemon's loop runs
        on one of its own)."""
        self._loop.call_soon_threadsafe(self.request_stop, reason)

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("stop requested: %s", reason)
        self._stop_requested.set()

    async def wait(self) -> None:
        """Until the daemon has stopped (after a stop request, or finishing with
        ``exit_on_finish``)."""
        await self._stop_requested.wait()
        await self.stop()

    async def stop(self) -> None:
        """Graceful shutdown in the fixed order; idempotent."""
        if self.state in (DaemonState.STOPPING, DaemonState.STOPPED):
            await self._stopped.wait()
            return
        # Its workers' last frames may be what a peer starting late needs to finish too.
        finished = self.state is DaemonState.FINISHED
        self.state = DaemonState.STOPPING
        self._stop_requested.set()
        # (1) Workers finish their current iteration — bounded by stop_grace, since the
        # messages it waits for may never come (peers stopping or gone) — then stop.
        if self._workers_task is not None:
            self._workers_task.cancel()
        for w in self.workers:
            w.abandon()  # one that never started (waiting to rejoin) ends here
            w.request_stop()
        await self._grace(time.monotonic() + self.cfg.stop_grace)
        for w in self.workers:
            w.stop()
        if self.transport is not None:
            self.transport.release_producers()
        await asyncio.to_thread(lambda: [w.join(30.0) for w in self.workers])
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
        await self._save_checkpoint(final=True)
        if self.transport is not None:
            await self.transport.close(drain_unconnected=finished)
        if self._api is not None:
            self._api.should_exit = True
        for task in (
            self._monitor_task,
            self._snapshot_task,
            self._catchup_task,
            self._peers_task,
            self._output_task,
        ):
            if task is not None:
                task.cancel()
        if self._tasks is not None:  # links end once closed, the API once told to exit
            await self._tasks.__aexit__(None, None, None)
        await self.monitor.evaluate(final=True)
        await self._write_output()
        if self.output is not None:
            self.output.close()
        if self.state_dir is not None:
            self.state_dir.close()
        self.state = DaemonState.STOPPED
        self._stopped.set()
        log.info("daemon stopped: %s", self.summary())

    async def _grace(self, deadline: float) -> None:
        """Until every worker has left at an iteration boundary, or ``deadline``. A worker
        whose iteration cannot complete is not waited for — Ctrl-C while waiting for peers
        stops at once, not after stop_grace. Cannot complete means, for a stopping daemon:

        - its quorum needs more processes (or clusters) than this daemon and the peer daemons
          connected now have (:meth:`Monitor.reachable`), whatever it waits for; or
        - no peer daemon is connected and every local worker still running waits, and did so
          at two polls in a row with the very same waits: nothing can send anyone anything.
          This covers what the count cannot judge — an inbox (``Receive``: gossip pairing,
          an elastic center's requests) or a message from one process (``Await(("rep", t),
          Count(1))``: a worker and its center on a daemon that never came), whose sender
          the daemon does not know.
        """
        if self.transport is not None:
            # A worker blocked handing a frame to a peer that never connected (its window full:
            # DASGD's stream) would wait out the grace. Releasing it loses nothing: a daemon
            # that finished has no worker sending, and one that did not drops the frames for
            # such a peer at close anyway (never_connected).
            for link in self.transport.links:
                if link.connected_since is None:
                    link.release_producers()
        previous: dict[int, tuple[Tag, float]] | None = None
        while time.monotonic() < deadline:
            waits = {w.pid: w.mailbox.waiting() for w in self.workers if not w.done.is_set()}
            if all(wt is not None and not self.monitor.reachable(wt) for wt in waits.values()):
                return  # also: none left
            # Polled one worker after another, not atomically: a worker seen waiting may have
            # been woken by one seen running an instant later. The same waits (tag and start)
            # at two polls mean every worker waited throughout the second poll, all at once.
            # Frames from peers arrive on this loop, so none come in while it polls.
            now: dict[int, tuple[Tag, float]] | None = None
            if not self._peers_connected():
                now = {p: (wt.tag, wt.since) for p, wt in waits.items() if wt is not None}
                if len(now) < len(waits):  # one of them runs: it may still send
                    now = None
            if now is not None and now == previous:
                return
            previous = now
            await asyncio.sleep(0.02)  # shutdown only: a short poll, no thread per worker

    def _peers_connected(self) -> bool:
        return self.transport is not None and bool(self.transport.connected_clusters())

    async def __aenter__(self) -> Daemon:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _catch_up(self) -> None:
        """Make a state request again once the last one went unanswered (see
        :mod:`peerlearn.daemon.rejoin`); the notes themselves come with the peers' frames."""
        while True:
            await asyncio.sleep(1.0)  # a retry period: requests time out after 10 s
            self.rejoin.consider()

    # --- hooks from the workers ---------------------------------------------------------------

    def _on_worker_exit(self, worker: Worker) -> None:  # on the worker's thread
        self._loop.call_soon_threadsafe(self._worker_exited)

    def _worker_exited(self) -> None:
        self.progress.set()
        if self.state is DaemonState.RUNNING and all(w.done.is_set() for w in self.workers):
            self.state = DaemonState.FINISHED
            assert self._tasks is not None
            self._tasks.create_task(self._finished(), name="finished")

    async def _finished(self) -> None:
        await self.monitor.evaluate(final=True)  # the final models' losses: summary, /status
        log.info("every local worker is done: %s", self.summary())
        await self._write_output()
        if self.cfg.exit_on_finish:
            self.request_stop("finished (exit_on_finish)")

    async def _record(self) -> None:
        """``--out``'s metrics.csv: every local worker's figures once a second, until the
        workers are done (the final row comes with the final model)."""
        assert self.output is not None
        while self.state is DaemonState.RUNNING:
            await asyncio.sleep(1.0)
            try:
                await asyncio.to_thread(self.output.sample, time.time(), *self._sample())
            except OSError as exc:  # a full disk must not stop the run: said, tried again
                log.warning("cannot append to %s: %s", self.output.metrics, _why(exc))

    async def _checkpoint_every(self) -> None:
        """``--state-dir``: a checkpoint every ``checkpoint_every`` seconds (none while nothing
        changed: a finished daemon does not rewrite the same models)."""
        while True:
            await asyncio.sleep(self.cfg.checkpoint_every)
            await self._save_checkpoint()

    async def _save_checkpoint(self, final: bool = False) -> None:
        """Write a checkpoint of the workers as they are now (on a thread). A failure is
        logged and counted — the last checkpoint stays — and a failed final one makes the exit
        code 1: the state to resume from is not the latest."""
        saver = self.saver
        if saver is None:
            return
        snap = saver.snapshot(self.workers, self.incarnation, force=final)
        if snap is None:
            return
        try:
            await asyncio.to_thread(saver.write, *snap)
        except Exception as exc:  # (a full disk, a directory gone): the run goes on
            saver.forget()  # the next snapshot is written even if nothing changed
            saver.failures += 1
            saver.last_error = f"{type(exc).__name__}: {exc}"
            if final:
                self.checkpoint_failed = True
            log.error(
                "cannot write a checkpoint to %s: %s", saver.state_dir.checkpoint, saver.last_error
            )
            return
        if final:
            log.info(
                "wrote the last checkpoint to %s (iteration %d)",
                saver.state_dir.checkpoint,
                iteration(snap[1], saver.center),
            )

    def _sample(self) -> tuple[list[Row], list[Vector], list[Vector]]:
        """What a metrics.csv row needs, read on the loop (the distances are computed on a
        thread: they cost O(models × dim))."""
        rows = [(w.name, w.completed, self.loss_of(w)) for w in self.workers]
        local = [w.x for w in self.workers if w.live and w.x is not None]
        heard = [x for _, x in self.heard.models.values()]
        return rows, local, heard

    async def _write_output(self) -> None:
        """``--out``'s model.npz and summary.json, as they are now (on finish, on stop), and a
        last metrics row. A failure is logged and makes the exit code 1 (the model to take
        home is missing), never stops the shutdown."""
        output = self.output
        if output is None:
            return
        try:
            summary = summary_of(self, time.monotonic() - self.started_at)
            models = [(w.name, w.x, w.live) for w in self.workers]
            sample = self._sample()
            export = self.problem.export if self.problem is not None else None
            written = await asyncio.to_thread(output.write, summary, models, export)
        except Exception as exc:
            self.output_failed = True
            log.error(
                "cannot write model.npz and summary.json to %s: %s: %s",
                output.dir,
                type(exc).__name__,
                exc,
            )
            return
        self.output_failed = False
        log.info("wrote %s", ", ".join(map(str, written)))
        try:
            await asyncio.to_thread(output.sample, time.time(), *sample)
        except OSError as exc:
            log.warning("cannot append to %s: %s", output.metrics, _why(exc))

    def _on_report(self, worker: Worker, rep: Report) -> None:  # on the worker's thread
        self.monitor.on_report(worker, rep)
        if rep.name == "model" and self._watched:
            self._loop.call_soon_threadsafe(self.progress.set)

    def watch(self) -> asyncio.Event:
        """An event set whenever a local worker completes an iteration (for waiters such as
        :mod:`peerlearn.testing`); clear it before re-checking a condition."""
        self._watched = True
        return self.progress

    # --- what the control API and the tests read ----------------------------------------------

    @property
    def cluster(self) -> int:
        """This daemon's cluster id."""
        return self.me.cluster

    @property
    def links(self) -> tuple[OutLink, ...]:
        """The out-links to the other daemons (none before start)."""
        return tuple(self.transport.links) if self.transport is not None else ()

    def held_from(self) -> dict[int, int]:
        """Frames held back for the tag window, per peer cluster."""
        return self.transport.held_from() if self.transport is not None else {}

    def loss_of(self, worker: Worker) -> float | None:
        """The latest loss evaluation of a local worker's model; None: none yet."""
        return self.monitor.loss_of(worker)

    def blocked(self, waiting: Waiting | None) -> bool:
        """Whether a worker waiting on ``waiting`` counts as blocked (:meth:`Monitor.blocked`)."""
        return self.monitor.blocked(waiting)

    def sending(self, worker: Worker) -> SendWait | None:
        """The peer a local worker waits on to send, if any (:meth:`Monitor.sending`)."""
        return self.monitor.sending(worker)

    def waits_on(self, waiting: Waiting) -> WaitsOn:
        """Whom a wait for messages waits on (:meth:`Monitor.waits_on`)."""
        return self.monitor.waits_on(waiting)

    def models(self) -> list[WorkerModel]:
        # Worker.live is a whitelist: a worker in any failed state, today's or a future one,
        # keeps its model out of the daemon's mean.
        return [WorkerModel(w.name, w.x, w.live) for w in self.workers]

    def checkpoint_status(self) -> dict[str, Any] | None:
        """``/status``'s ``checkpoint`` (None: no state directory)."""
        saver = self.saver
        if self.state_dir is None or saver is None:
            return None
        last, restore = saver.last, self.restore
        return {
            "dir": str(self.state_dir.dir),
            "every_seconds": self.cfg.checkpoint_every,
            "last_seconds_ago": None if last is None else round(time.time() - last[0], 3),
            "last_iteration": None if last is None else last[1],
            "failures": saver.failures,
            "last_error": saver.last_error,
            "resumed": None
            if restore is None
            else {
                "mode": restore.mode,
                "checkpoint_iteration": restore.step,
                "agreed_iteration": restore.agreed,
            },
        }

    def summary(self) -> str:
        # In words for the log: "0.0 finished after 200 steps, 0.1 crashed after 7 steps".
        workers = ", ".join(f"{w.name} {w.state} after {w.completed} steps" for w in self.workers)
        # Live workers only: a diverged worker's last finite model may be astronomically bad,
        # a crashed one's is frozen where it stopped.
        losses = [loss for w in self.workers if (loss := self.loss_of(w)) is not None and w.live]
        with quiet_float_errors():
            mean = f"{np.mean(losses):.6g}" if losses else "—"
        return f"workers {workers}; mean loss {mean}"

    @property
    def finished(self) -> bool:
        return all(w.state is WorkerState.FINISHED for w in self.workers)


def _join(workers: list[Worker]) -> None:
    for w in workers:
        with contextlib.suppress(RuntimeError):  # its thread never started
            w.join(30.0)


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _why(exc: OSError) -> str:
    """An OSError's reason alone (``address already in use``): no errno prefix, no socket
    address in Python's or uvloop's wording (the caller names the address as the user wrote it)."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        reason = exc.strerror or str(exc)
    else:
        reason = os.strerror(exc.errno)
    return reason[:1].lower() + reason[1:]


def _listen(what: str, address: str) -> list[socket.socket]:
    """Listening TCP sockets on every address ``address``'s host resolves to, as asyncio's
    create_server binds them (``localhost``: 127.0.0.1 and ::1 where both exist), all on one
    port — for port 0, the one the first address got. An address whose family this host does
    not have (EADDRNOTAVAIL, EAFNOSUPPORT) is skipped, as asyncio does; StartupError naming
    ``address`` if any other fails, or none is left."""
    host, port = parse_address(address)
    for attempt in range(_PORT_ATTEMPTS):
        socks: list[socket.socket] = []
        try:
            socks = _bind_all(host, port)
        except _PortTaken:  # port 0: the port the first address got is taken on another
            if attempt + 1 < _PORT_ATTEMPTS:
                continue
            reason = os.strerror(errno.EADDRINUSE).lower()
            raise StartupError(f"cannot listen for the {what} on {address}: {reason}") from None
        except OSError as exc:
            raise StartupError(f"cannot listen for the {what} on {address}: {_why(exc)}") from None
        for sock in socks:
            sock.setblocking(False)
        return socks
    raise AssertionError("unreachable")


#: port 0 on several addresses: how often to pick a port again that another address had taken
_PORT_ATTEMPTS = 5


class _PortTaken(Exception):
    pass


def _bind_all(host: str, port: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in infos))
    socks: list[socket.socket] = []
    skipped: OSError | None = None
    try:
        for family, sockaddr in addresses:
            chosen = socks[0].getsockname()[1] if socks else port
            try:
                socks.append(
                    socket.create_server((sockaddr[0], chosen, *sockaddr[2:]), family=family)
                )
            except OSError as exc:
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    skipped = exc  # a family this host has not enabled (bpo-30945)
                    continue
                if exc.errno == errno.EADDRINUSE and port == 0 and socks:
                    raise _PortTaken from None
                raise
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise skipped or OSError(errno.EADDRNOTAVAIL, f"no address for {host}")
    return socks


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the daemon's loop: the daemon owns the signals, not the API server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _no_grad(x: Vector, rng: object) -> Vector:
    raise AssertionError("standalone agreement computes no gradient")
