"""Daemons over real TCP on 127.0.0.1, built on peerlearn.testing (in-process peers)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from peerlearn.algorithms import diam2
from peerlearn.control.views import peers_view
from peerlearn.daemon import node
from peerlearn.daemon.config import load_node_config
from peerlearn.daemon.node import Daemon, DaemonState
from peerlearn.errors import StartupError
from peerlearn.problems import make_problem
from peerlearn.runs import Purpose, grad_stream, stream
from peerlearn.runtime.worker import WorkerState
from peerlearn.testing import LocalCluster, local_cluster
from peerlearn.transport.links import LinkSettings, OutLink
from peerlearn.transport.stats import TransportStats
from peerlearn.wire import PROTOCOL_VERSION, Hello, Join

QUAD: dict[str, Any] = {"name": "quadratic", "dim": 10, "sigma": 1.0}
# The same problem in 100 coordinates: the loss at the noise floor is a sum of 100 terms with the
# same total, so one run's final loss fluctuates ~3× less than in 10 coordinates.
WIDE_QUAD: dict[str, Any] = {**QUAD, "dim": 100}


def sequential_sgd_loss(problem: dict[str, Any], eta: float, budget: int, seeds: int = 3) -> float:
    """Plain SGD with the same learning rate and the same number of gradient evaluations,
    averaged over a few seeds (measured in the same test run)."""
    params = {k: v for k, v in problem.items() if k != "name"}
    prob = make_problem(problem["name"], **params)
    losses = []
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        x = prob.x0()
        for _ in range(budget):
            x = x - eta * prob.grad(x, rng)
        losses.append(prob.loss(x))
    return float(np.mean(losses))


def final_models(cluster: LocalCluster) -> list[np.ndarray]:
    return [w.x for d in cluster.daemons for w in d.workers if w.x is not None]


def mean_final_loss(cluster: LocalCluster, problem: dict[str, Any]) -> float:
    params = {k: v for k, v in problem.items() if k != "name"}
    prob = make_problem(problem["name"], **params)
    return float(np.mean([prob.loss(x) for x in final_models(cluster)]))


def noise_excess(cluster: LocalCluster, eta: float, steps: int) -> tuple[float, float]:
    """(with averaging, alone): the mean loss of the workers' final models, and of the models
    each worker would have reached *alone* — plain SGD from x_1 on its own gradient stream,
    the same draws it used in the run — each as the excess over noise-free gradient descent.

    Averaging N models (or gradients) divides the gradient noise's variance by about N, and
    the excess over the noise-free path is what that noise costs, so the ratio is ~1/N with
    averaging and exactly 1 without: a paired comparison, measured in the same test.
    """
    run, prob = cluster.daemons[0].run_cfg, cluster.daemons[0].problem
    assert prob is not None
    x = prob.x0()
    for _ in range(steps):
        x = x - eta * prob.full_grad(x)
    floor = prob.loss(x)
    alone = []
    for pid in range(run.processes):
        rng, x = grad_stream(run, pid), prob.x0()
        for _ in range(steps):
            x = x - eta * prob.grad(x, rng)
        alone.append(prob.loss(x))
    ours = [prob.loss(x) for x in final_models(cluster)]
    return float(np.mean(ours)) - floor, float(np.mean(alone)) - floor


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("alg1", {}),
        ("alg2", {"maa": {"rounds": 4, "inner_rounds": 3}}),
    ],
)
async def test_three_daemons_train_like_sequential_sgd(
    algorithm: str, extra: dict[str, Any]
) -> None:
    steps, eta = 300, 0.05  # long enough that both sit at their noise floor
    async with local_cluster(
        3, workers=2, algorithm=algorithm, steps=steps, problem=WIDE_QUAD, lr={"eta": eta}, **extra
    ) as cluster:
        await cluster.wait_until_finished()
        assert all(d.state is DaemonState.FINISHED for d in cluster.daemons)
        assert all(w.state is WorkerState.FINISHED for d in cluster.daemons for w in d.workers)
        loss = mean_final_loss(cluster, WIDE_QUAD)
        ours, alone = noise_excess(cluster, eta, steps)
    reference = sequential_sgd_loss(WIDE_QUAD, eta, budget=6 * steps)
    assert loss <= 1.5 * reference, (loss, reference)
    # N = 4 of 6: about 1/4 of the noise or less (0.15–0.2 measured); exactly 1 without averaging.
    assert ours < 0.5 * alone, (ours, alone)


async def test_alg1_on_digits_matches_sequential_sgd() -> None:
    problem = {"name": "softmax", "batch_size": 16}
    steps, eta = 200, 0.5
    async with local_cluster(
        3, workers=2, algorithm="alg1", steps=steps, problem=problem, lr={"eta": eta}
    ) as cluster:
        await cluster.wait_until_finished()
        loss = mean_final_loss(cluster, problem)
        ours, alone = noise_excess(cluster, eta, steps)
    assert loss <= 1.5 * sequential_sgd_loss(problem, eta, budget=6 * steps)
    # Still far from the optimum after 200 steps, so the loss itself hardly shows the averaging
    # (~0.338 against ~0.347 alone); what the gradient noise added over the noise-free path does.
    assert ours < 0.5 * alone, (ours, alone)


async def test_alg1_with_full_quorum_ends_with_equal_models() -> None:
    async with local_cluster(
        3, workers=2, algorithm="alg1", steps=40, quorum=6, max_failures=0, problem=QUAD
    ) as c:
        await c.wait_until_finished()
        xs = final_models(c)
    assert len(xs) == 6 and diam2(xs) < 1e-20


async def test_agreement_contracts_across_threads_and_sockets() -> None:
    """Standalone MAA on 3 daemons: each instance's outputs are within q = 1/4 of the inputs'
    squared diameter (Lemma 19 / Thm 2), with inputs from the same seeded streams."""
    steps, dim = 3, 4
    async with local_cluster(3, workers=2, algorithm="maa", steps=steps, dim=dim) as cluster:
        await cluster.wait_until_finished()
        run = cluster.daemons[0].run_cfg
        m = run.membership
        inputs = [
            stream(run.seed, Purpose.INPUTS, m.cluster_of[p], m.index(p)).standard_normal(
                (steps, dim)
            )
            for p in range(run.processes)
        ]
        outputs = [w.output for d in cluster.daemons for w in d.workers]
    assert all(o is not None and len(o) == steps for o in outputs)
    for j in range(steps):
        before = diam2([x[j] for x in inputs])
        after = diam2([o[j] for o in outputs])
        assert after <= 0.25 * before


async def test_status_peers_metrics_model_and_stop() -> None:
    async with local_cluster(3, workers=2, algorithm="alg1", steps=None, problem=QUAD) as cluster:
        await cluster.wait_for(lambda: cluster.min_step() > 20)
        c = cluster.client(0)
        status = (await c.get("/status")).json()
        assert status["state"] == "running" and status["algorithm"] == "alg1"
        assert [w["id"] for w in status["workers"]] == ["0.0", "0.1"]
        assert all(w["step"] > 20 for w in status["workers"])
        assert all(w["gradients"] >= 20 for w in status["workers"])  # one per Alg 1 step
        peers = (await c.get("/peers")).json()
        assert [p["state"] for p in peers] == ["connected", "connected"]
        text = (await c.get("/metrics")).text
        for name in (
            "peerlearn_loss",
            "peerlearn_step",
            "peerlearn_staleness_steps_bucket",
            "peerlearn_consensus_distance",
            "peerlearn_messages_total",
            "peerlearn_bytes_total",
            "peerlearn_peers_connected 2.0",
        ):
            assert name in text, name
        assert 'scope="host"' in text and 'scope="global"' in text
        npy = await c.get("/model", params={"worker": 1})
        assert npy.status_code == 200 and npy.content[:6] == b"\x93NUMPY"
        assert (await c.get("/model", params={"worker": 7})).status_code == 404
        assert (await c.post("/stop")).json() == {"state": "stopping"}
        await cluster.daemons[0].wait()
        assert cluster.daemons[0].state is DaemonState.STOPPED
        assert all(w.state is WorkerState.STOPPED for w in cluster.daemons[0].workers)


async def test_async_tests_run_on_uvloop() -> None:
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_the_pytest_plugin_fixture(peerlearn_cluster: Any) -> None:
    """The fixture comes from the installed `pytest11` entry point, not from a conftest."""
    async with peerlearn_cluster(2, workers=1, algorithm="alg1", steps=10, problem=QUAD) as c:
        await c.wait_until_finished()
        assert c.min_step() == 10 and len(c.urls) == 2


async def test_step_means_completed_iterations_in_status_metrics_and_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After --steps 15: step 15 in /status, peerlearn_step, peerlearn_steps_total and the
    summary log line (status said 16 before: the iteration the worker would start next)."""
    caplog.set_level(logging.INFO, logger="peerlearn")
    async with local_cluster(1, workers=2, algorithm="alg1", steps=15, problem=QUAD) as cluster:
        await cluster.wait_until_finished()
        c = cluster.client(0)
        status = (await c.get("/status")).json()
        assert [w["step"] for w in status["workers"]] == [15, 15]
        text = (await c.get("/metrics")).text
        for worker in ("0.0", "0.1"):
            assert f'peerlearn_step{{worker="{worker}"}} 15.0' in text
            assert f'peerlearn_steps_total{{worker="{worker}"}} 15.0' in text
    done = "workers 0.0 finished after 15 steps, 0.1 finished after 15 steps"
    assert any(done in r.getMessage() for r in caplog.records)


async def _wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Link state changes on retries, which wake no waiter: a short poll, with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _fake_resolver(monkeypatch: pytest.MonkeyPatch, host: str, hang: bool = False) -> list[str]:
    """The running loop's resolver, with ``host`` unknown (or never answered, with ``hang``):
    no test depends on the machine's DNS. Returns the hosts looked up, in order."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    asked: list[str] = []

    async def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(name)
        if name != host:
            return await real(name, *args, **kwargs)
        if hang:
            await asyncio.Event().wait()
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return asked


async def test_a_peer_name_that_does_not_resolve_says_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="peerlearn")
    asked = _fake_resolver(monkeypatch, "peer0.test")
    cfg = load_node_config(
        None, {"listen": "127.0.0.1:0", "api": "127.0.0.1:0", "peers": ["peer0.test:7002"]}
    )
    async with Daemon(cfg) as d:
        assert d.transport is not None
        link = d.transport.links[0]
        await _wait_until(lambda: link.failed_attempts >= 3)
        async with _client(d) as client:
            (peer,) = (await client.get("/peers")).json()
        assert peer["last_error"] == "cannot resolve host 'peer0.test': Name or service not known"
        assert peer["refused"] is None
    assert asked.count("peer0.test") >= 3  # a lookup of its own at each attempt
    # the resolver error once, not once per retry
    assert len(_messages(caplog, "cannot resolve host 'peer0.test'")) == 1


async def test_a_resolver_that_does_not_answer_is_not_a_peer_that_is_down(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the lookup ran inside the connect's timeout: a resolver that times out read
    "no connection within 5s", like a peer that is down."""
    caplog.set_level(logging.INFO, logger="peerlearn")
    asked = _fake_resolver(monkeypatch, "peer0.test", hang=True)
    hello = Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 1, 0, "0@127.0.0.1:0")
    join = Join((0,), 1, "float64", "run")
    settings = LinkSettings(resolve_timeout=0.1, backoff_initial=0.01, backoff_max=0.02)
    link = OutLink(
        1, "peer0.test", 7002, hello, join, settings, TransportStats(), asyncio.get_running_loop()
    )
    task = asyncio.create_task(link.run())
    try:
        await _wait_until(lambda: link.failed_attempts >= 3)
    finally:
        await link.close()
        await task
    assert (
        link.last_error
        == "cannot resolve host 'peer0.test': no answer from the resolver within 0.1s"
    )
    assert len(_messages(caplog, "cannot resolve host 'peer0.test'")) == 1
    assert asked == ["peer0.test"]  # the hung lookup is waited for again, not started anew


async def test_frames_dropped_for_a_full_window_are_counted_each_and_logged_rarely(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that takes nothing (never connected here) with a window of one frame: every
    further frame waits queue_timeout and is dropped — each one counted, but one log line,
    not one per frame (a busy run drops thousands)."""
    caplog.set_level(logging.WARNING, logger="peerlearn")
    hello = Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 1, 0, "0@127.0.0.1:0")
    join = Join((0,), 1, "float64", "run")
    settings = LinkSettings(max_queue=1, queue_timeout=0.01, peer_timeout=60.0)
    stats = TransportStats()
    link = OutLink(1, "127.0.0.1", 9, hello, join, settings, stats, asyncio.get_running_loop())

    def produce() -> list[bool]:
        return [link.offer(("params", t), 0, t, np.zeros(1)) for t in range(1, 21)]

    sent = await asyncio.to_thread(produce)
    assert sent == [True] + [False] * 19
    assert stats.dropped["queue_full"] == 19
    lines = _messages(caplog, "queue full")
    assert len(lines) == 1 and "(1 so far" in lines[0], lines
    await link.close(drain_unconnected=False)


async def test_a_fingerprint_mismatch_is_worded_from_this_side_and_not_repeated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two daemons of different runs (seeds 0 and 1) refuse each other. /peers says so in this
    daemon's words (before: the other side's message, whose "peer" was this daemon), no
    fingerprint crosses the wire, and each side logs it once (before: every retry)."""
    caplog.set_level(logging.INFO, logger="peerlearn")
    socks = sorted(
        (socket.create_server(("127.0.0.1", 0)) for _ in range(2)),
        key=lambda s: s.getsockname()[1],
    )
    addrs = [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    daemons = []
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        fields = {"listen": addrs[i], "peers": [addrs[1 - i]], "api": "127.0.0.1:0"}
        cfg = load_node_config(None, {**fields, "seed": i, "workers": 1})
        daemons.append(Daemon(cfg, listen_socket=sock))
    try:
        for d in daemons:
            await d.start()
        await _wait_until(
            lambda: all(d.stats.protocol_errors["handshake_refused"] >= 3 for d in daemons)
        )
        for d, other in zip(daemons, reversed(daemons), strict=True):
            (peer,) = peers_view(d.links)
            assert peer["refused"].startswith("refused this daemon: its run settings differ")
            assert d.cfg.fingerprint in peer["refused"]  # ours, to compare with the other's
            assert other.cfg.fingerprint not in peer["refused"]  # theirs never came
            assert peer["last_error"] == peer["refused"]
    finally:
        await asyncio.gather(*(d.stop() for d in daemons if d.state is not DaemonState.STARTING))
        for sock in socks:
            sock.close()
    assert len(_messages(caplog, "refused this daemon")) == 2  # one per side
    assert len(_messages(caplog, "refusing daemon")) == 2


def _client(d: Daemon) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.api_port}")


def test_a_recurring_error_is_logged_again_at_doubling_intervals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peerlearn.transport import links

    now = [0.0]
    monkeypatch.setattr(links.time, "monotonic", lambda: now[0])
    throttle = links.Throttle(first=10.0, longest=40.0)
    logged = []
    for second in range(200):  # one retry a second
        now[0] = float(second)
        if throttle.due("refused") is not None:
            logged.append(second)
    assert logged == [0, 10, 30, 70, 110, 150, 190]  # then every `longest` seconds
    assert throttle.due("another reason") == 1  # a change is logged at once
    assert throttle.due("another reason", repeat=False) is None


def _free(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be listened on again (nothing of ours holds it)."""
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


def _ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


async def test_api_on_localhost_answers_on_every_address_of_localhost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where localhost resolves to ::1 first, `--api localhost:…` listened on ::1 only (the
    first answer), and http://127.0.0.1 found nothing; uvicorn, binding it itself, had bound
    both. Now every address, on one port."""
    real = socket.getaddrinfo

    def ipv6_first(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "localhost":
            return real(host, port, *args, **kwargs)
        stream = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        return [
            (socket.AF_INET6, *stream, ("::1", port, 0, 0)),
            (socket.AF_INET, *stream, ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_first)
    cfg = load_node_config(
        None,
        {"listen": "127.0.0.1:0", "api": "localhost:0", "workers": 1, "steps": 5, "problem": QUAD},
    )
    hosts = ["127.0.0.1", "[::1]"] if _ipv6_loopback() else ["127.0.0.1"]
    async with Daemon(cfg) as d:
        for host in hosts:
            async with httpx.AsyncClient(base_url=f"http://{host}:{d.api_port}") as client:
                assert (await client.get("/status")).status_code == 200, host


def _leftover_tasks() -> list[str]:
    return [
        t.get_name()
        for t in asyncio.all_tasks()
        if t.get_name().startswith(("link-", "api", "monitor")) and not t.done()
    ]


async def test_a_busy_peer_port_leaves_nothing_behind() -> None:
    """The API socket was bound first: the StartupError for the peer port frees it again."""
    api_port, busy_port = _free_ports(2)
    with socket.create_server(("127.0.0.1", busy_port)):
        cfg = load_node_config(
            None,
            {
                "listen": f"127.0.0.1:{busy_port}",
                "api": f"127.0.0.1:{api_port}",
                "peers": ["127.0.0.1:9"],
            },
        )
        with pytest.raises(StartupError, match="cannot listen for peers"):
            await Daemon(cfg).start()
    assert _free(api_port)
    assert _leftover_tasks() == []


@pytest.mark.parametrize("failure", ["api_port_busy", "api_app_fails"])
async def test_a_failed_start_closes_every_socket_and_task(
    failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start() that fails, before or after the peer links started: the listening socket it
    was given is closed, the API port free, no link or API task left running (before: the
    TaskGroup was entered and never left, the given socket stayed open)."""
    api_port, peer_port = _free_ports(2)
    given = socket.create_server(("127.0.0.1", peer_port))
    given.setblocking(False)
    busy = socket.create_server(("127.0.0.1", api_port)) if failure == "api_port_busy" else None
    if failure == "api_app_fails":

        def broken_app(daemon: Daemon, guard: Any) -> Any:
            raise RuntimeError("the API cannot be built")

        monkeypatch.setattr(node, "build_app", broken_app)
    cfg = load_node_config(
        None,
        {
            "listen": f"127.0.0.1:{peer_port}",
            "api": f"127.0.0.1:{api_port}",
            "peers": ["127.0.0.1:9"],  # a link task to end
        },
    )
    expected = StartupError if busy is not None else RuntimeError
    try:
        with pytest.raises(expected):
            await Daemon(cfg, listen_socket=given).start()
    finally:
        if busy is not None:
            busy.close()
    assert given.fileno() == -1
    assert _free(peer_port) and _free(api_port)
    assert _leftover_tasks() == []


def _free_ports(k: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(k)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def test_a_finished_gossip_worker_that_still_answers_is_finished_not_waiting() -> None:
    """Asynchronous gossip's finished workers go on answering their inbox (``Done``) for a
    neighbour that may restart: /status and /metrics still show them finished — no inbox wait,
    never blocked, also once a peer daemon has left."""
    async with local_cluster(
        3, workers=1, algorithm="async_gossip", steps=30, peer_give_up=0.5, peer_timeout=0.5
    ) as cluster:
        await asyncio.wait_for(
            asyncio.gather(
                *(asyncio.to_thread(w.done.wait) for d in cluster.daemons for w in d.workers)
            ),
            60,
        )
        await cluster.daemons[2].stop()  # a peer leaves: the others give it up
        transports = [cluster.daemons[i].transport for i in (0, 1)]
        deadline = time.monotonic() + 20  # (nothing to wait on: nobody makes progress)
        while not all(t is not None and any(link.given_up for link in t.links) for t in transports):
            assert time.monotonic() < deadline, "daemon 2 was never given up on"
            await asyncio.sleep(0.05)
        for i in (0, 1):
            status = (await cluster.client(i).get("/status")).json()
            (worker,) = status["workers"]
            assert worker["state"] == "finished" and "waiting" not in worker, worker
            assert cluster.daemons[i].monitor.snapshot().states["blocked"] == 0


async def test_compute_delay_slows_one_daemon_and_is_no_part_of_the_run() -> None:
    """``compute_delay`` sleeps after each gradient on its own daemon only (an emulated slower
    host): the daemons still form one run (it is left out of the fingerprint), and the slowed
    daemon's gradients took at least the delay each, in all."""
    delay = 0.02
    async with local_cluster(
        2,
        workers=1,
        algorithm="dasgd",
        steps=5,
        problem=QUAD,
        each=lambda i: {"compute_delay": delay if i == 1 else 0.0},
    ) as c:
        fast, slow = c.daemons
        assert fast.cfg.fingerprint == slow.cfg.fingerprint
        await c.wait_until_finished(60)
        (worker,) = slow.workers
        assert worker.grads >= 5 and worker.grad_seconds >= worker.grads * delay
        assert fast.workers[0].compute_delay == 0.0


async def test_a_stop_cuts_a_compute_delay_short() -> None:
    """A worker asleep in a long ``compute_delay`` stops with its daemon, not a minute later."""
    async with local_cluster(
        1, workers=1, algorithm="alg1", steps=None, problem=QUAD, compute_delay=60.0
    ) as c:
        (daemon,) = c.daemons
        (worker,) = daemon.workers
        await c.wait_for(lambda: worker.state is WorkerState.RUNNING, 30)  # then asleep
        await asyncio.wait_for(daemon.stop(), 30)
        # without the cut the daemon would give up on it after stop_grace, still asleep
        assert worker.done.is_set() and worker.grads <= 1
