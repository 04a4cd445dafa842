"""Transport throughput: one parameter message between two daemon processes vs a raw socket.

Two OS processes on 127.0.0.1 (``multiprocessing``, spawn), one sender and one receiver, for
each size S (payload bytes of one float64 array):

``raw``
    The reference, measured exactly like ``shared/peers/bench_tcp.py`` mode ``sock`` so the
    figures compare with ``peers/RESULTS.md`` (5.8 GB/s at 4 MB, 3.4 GB/s at 40 MB): blocking
    sockets with TCP_NODELAY; the sender does ``sendall(8-byte length)`` +
    ``sendall(memoryview(array))``; the receiver ``recv_into``\\ s a preallocated array.
``peerlearn``
    The real stack on uvloop (``uvloop.run``) in both processes. The sender runs a
    ``Transport`` with one peer; a producer thread (standing in for a worker) calls
    ``Transport.broadcast`` with a float64 array of S bytes, so frames go through
    ``OutLink.offer`` → the link's queue → ``FrameProtocol.send`` → the codec (header + a
    memoryview of the array) → uvloop, and stay in the resend buffer until acked. The
    receiver runs a ``Transport`` (handshake, dedupe, cumulative acks) whose codec reads each
    payload straight into an array from its ``BufferPool``; ``deliver`` counts the message and
    drops it, so pool arrays get reused.

Timing (same for both): a rep streams K messages back to back (K = 4e8 // S, 4..4000: about
400 MB per rep); its time runs on the sender from just before the first message is handed over
to the moment the sender knows that the K-th arrived — raw: the receiver's 1-byte reply after
the K-th message; peerlearn: the cumulative ``Ack`` covering the K-th frame (the ack the link
needs anyway). One warm-up rep is dropped, a run's figure is the median over ``--reps`` reps,
and GB/s = S × K / time. A run is one fresh pair of processes; raw and peerlearn runs
alternate, and each table cell is the median [min–max] over ``--repeat`` runs. "ratio" is
peerlearn / raw of the two runs made back to back (median [min–max] over the pairs).

Target (performance issue): ratio ≥ 0.85 at 4 MB and ≥ 0.75 at 40 MB; other sizes are shown
for information. Exit code 1 if a target is missed.

CPU seconds per GB (user + system, all threads, over the timed reps) are printed for every
process too: unlike GB/s they hardly depend on how the two processes were scheduled, and they
show where a slow-down comes from. The machine's other load during each run is printed as well;
on a 2-core box, a busy machine lowers the ratio (the peerlearn processes do more, smaller
steps than the blocking raw loop), so compare runs made on an idle machine.

Run ``.venv/bin/python benchmarks/bench_transport.py`` (about 15 s; ``--quick``: about 6 s).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing as mp
import os
import platform
import queue
import resource
import shlex
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np

HEADER = struct.Struct("!Q")
TARGETS = {4_000_000: 0.85, 40_000_000: 0.75}  # payload bytes -> min ratio peerlearn / raw
FINGERPRINT = "bench_transport"
TIMEOUT = 120.0  # seconds for one run (a pair of processes) before it is killed


def messages_per_rep(nbytes: int) -> int:
    """K, as ``bench_tcp.k_for``: about 400 MB per rep, 4 to 4000 messages."""
    return max(4, min(4000, int(4e8 // nbytes)))


def payload_array(nbytes: int) -> np.ndarray:
    return np.random.default_rng(nbytes).random(nbytes // 8)


# --- raw sockets (the reference; bench_tcp.py mode "sock") -----------------------------------


def raw_receiver(out: Any, nbytes: int, k: int, reps: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    out.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = np.empty(nbytes // 8, np.float64)
    view = buf.data.cast("B")
    head = bytearray(HEADER.size)
    cpu = 0.0
    for rep in range(reps):
        if rep == 1:  # the warm-up rep is done
            cpu = time.process_time()
        for _ in range(k):
            got = 0
            while got < HEADER.size:
                got += conn.recv_into(memoryview(head)[got:], HEADER.size - got)
            n = HEADER.unpack(head)[0]
            got = 0
            while got < n:
                got += conn.recv_into(view[got:], n - got)
        conn.sendall(b"A")
    cpu = time.process_time() - cpu
    ok = bool(np.array_equal(buf, payload_array(nbytes)))
    conn.close()
    srv.close()
    out.put({"content_ok": ok, "cpu": cpu})


def raw_sender(out: Any, port: int, nbytes: int, k: int, reps: int) -> None:
    payload = payload_array(nbytes).data.cast("B")
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = HEADER.pack(nbytes)
    times = []
    cpu = 0.0
    for rep in range(reps):
        if rep == 1:
            cpu = time.process_time()
        start = time.perf_counter()
        for _ in range(k):
            s.sendall(head)
            s.sendall(payload)
        s.recv(1)
        times.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    s.close()
    out.put({"times": times, "cpu": cpu})


# --- peerlearn: Transport to Transport on uvloop ----------------------------------------------


def _hello(cluster: int, nbytes: int) -> Any:
    from peerlearn.membership import Membership
    from peerlearn.wire import PROTOCOL_VERSION, Hello, Join

    membership = Membership(processes=2, clusters=2)  # process 0 in cluster 0, 1 in 1
    hello = Hello(
        min_version=PROTOCOL_VERSION,
        max_version=PROTOCOL_VERSION,
        cluster=cluster,
        incarnation=time.time_ns(),
        nonce=0,
        name=f"bench-{cluster}",
    )
    join = Join(
        workers=membership.members[cluster],
        dim=nbytes // 8,
        dtype="float64",
        fingerprint=FINGERPRINT,
    )
    return membership, hello, join


#: the cluster secret of ``--security secret`` (both processes; a benchmark's, not a run's)
BENCH_SECRET = b"bench-transport-cluster-secret"


def _settings(nbytes: int, security: str, tls_dir: str | None, name: str) -> Any:
    from pathlib import Path

    from peerlearn.transport import tls
    from peerlearn.transport.links import LinkSettings

    extra: dict[str, Any] = {}
    if security == "secret":
        extra["secret"] = BENCH_SECRET
    elif security == "tls":
        assert tls_dir is not None
        d = Path(tls_dir)
        extra["tls"] = tls.load(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem")
    # The daemon passes max_payload = dim × 8, as here; max_queue ≥ K (at most 4000) so
    # that a rep is never throttled by the link's limit on outstanding frames.
    return LinkSettings(max_payload=nbytes, max_queue=4096, **extra)


def make_certs(directory: str) -> None:
    """A CA and two certificates it signed (rx, tx) in ``directory``, by the openssl CLI."""
    import subprocess

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=ca")
    for name in ("rx", "tx"):
        openssl("req", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=x")
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
        )  # fmt: skip
        os.chmod(os.path.join(directory, f"{name}.key"), 0o600)


def pl_receiver(
    out: Any, nbytes: int, k: int, reps: int, security: str = "plain", tls_dir: str | None = None
) -> None:
    import uvloop

    from peerlearn.transport.peers import Transport
    from peerlearn.transport.pool import BufferPool
    from peerlearn.wire import Data

    expected = payload_array(nbytes)
    total = k * reps
    report: dict[str, Any] = {"delivered": 0, "bytes": 0, "content_ok": None, "cpu": 0.0}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def deliver(data: Data) -> None:
            report["delivered"] += 1
            report["bytes"] += data.value.nbytes
            if report["delivered"] == 1:  # the warm-up rep: check once, outside the timing
                report["content_ok"] = bool(
                    np.array_equal(data.value, expected) and not data.value.flags.writeable
                )
            if report["delivered"] == k:  # the warm-up rep is done
                report["cpu"] = time.process_time()
            if report["delivered"] == total:
                report["cpu"] = time.process_time() - report["cpu"]
                done.set_result(None)
            # returning drops the last reference: the pool may hand the array out again

        membership, hello, join = _hello(1, nbytes)
        pool = BufferPool()
        settings = _settings(nbytes, security, tls_dir, "rx")
        transport = Transport(
            hello, join, membership, ("127.0.0.1", 0), [], deliver, settings, pool=pool
        )
        async with asyncio.TaskGroup() as tasks:
            await transport.start(tasks)
            out.put(transport.port)
            await done
            # Let the final Ack go out, and the sender say Bye, before closing.
            for _ in range(1000):
                if not transport._inbound:
                    break
                await asyncio.sleep(0.01)
            await transport.close()
        report.update(
            pool_allocated=pool.allocated,
            pool_reused=pool.reused,
            duplicates=transport.stats.dropped["duplicate"],
            protocol_errors=sum(transport.stats.protocol_errors.values()),
        )

    uvloop.run(main())
    out.put(report)


def pl_sender(
    out: Any,
    port: int,
    nbytes: int,
    k: int,
    reps: int,
    security: str = "plain",
    tls_dir: str | None = None,
) -> None:
    import uvloop

    from peerlearn.transport.links import LinkState
    from peerlearn.transport.peers import PeerAddress, Transport

    value = payload_array(nbytes)

    async def main() -> dict[str, Any]:
        membership, hello, join = _hello(0, nbytes)
        transport = Transport(
            hello,
            join,
            membership,
            ("127.0.0.1", 0),
            [PeerAddress(1, "127.0.0.1", port)],
            lambda data: None,
            _settings(nbytes, security, tls_dir, "tx"),
        )
        link = transport.links[0]
        # A worker thread is the producer, as in the daemon; it offers K frames per command.
        commands: queue.Queue[int | None] = queue.Queue()

        def produce() -> None:
            step = 0
            while (count := commands.get()) is not None:
                for _ in range(count):
                    step += 1
                    transport.broadcast(("params", step), 0, step, value)

        producer = threading.Thread(target=produce, name="producer", daemon=True)
        producer.start()
        times = []
        cpu = 0.0
        async with asyncio.TaskGroup() as tasks:
            await transport.start(tasks)
            while link.state is not LinkState.CONNECTED:
                await asyncio.sleep(0.001)
            sent = 0
            for rep in range(reps):
                if rep == 1:
                    cpu = time.process_time()
                sent += k
                start = time.perf_counter()
                commands.put(k)
                # Done when the K-th frame is acked: every frame was enqueued (its seq
                # assigned) and nothing is outstanding. ``_acked`` is the event the link's
                # draining close() waits on; it is set on every Ack.
                while link._seq < sent or link.outstanding:
                    link._acked.clear()
                    await link._acked.wait()
                times.append(time.perf_counter() - start)
            cpu = time.process_time() - cpu
            commands.put(None)
            await transport.close()
        producer.join()
        return {"times": times, "cpu": cpu}

    out.put(uvloop.run(main()))


# --- the driver -------------------------------------------------------------------------------


@dataclass
class Run:
    """One run of one mode: a fresh pair of processes."""

    gbps: float  # payload bytes / the sender's median rep time
    tx_cpu: float  # CPU seconds per GB moved (user + system, all threads), timed reps only
    rx_cpu: float
    others: float  # CPU used meanwhile by everything else on the machine, in cores
    report: dict[str, Any]  # the receiver's


@dataclass
class Row:
    nbytes: int
    raw: list[Run] = field(default_factory=list)
    peerlearn: list[Run] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [p.gbps / r.gbps for r, p in zip(self.raw, self.peerlearn, strict=True)]


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all CPUs; /proc/stat, Linux only)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _get(out: Any, procs: list[BaseProcess]) -> Any:
    """The next item a child puts in ``out``; fails fast if a child died instead."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=0.2)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].exitcode}") from None
    raise TimeoutError(f"no answer from {[p.name for p in procs]} in {TIMEOUT} s")


def run_pair(
    mode: str, nbytes: int, reps: int, security: str = "plain", tls_dir: str | None = None
) -> Run:
    """One run: start a receiver, then a sender process; collect both reports."""
    ctx = mp.get_context("spawn")
    k = messages_per_rep(nbytes)
    receiver, sender = (raw_receiver, raw_sender) if mode == "raw" else (pl_receiver, pl_sender)
    extra = () if mode == "raw" else (security, tls_dir)
    rx_out, tx_out = ctx.Queue(), ctx.Queue()
    procs: list[BaseProcess] = [
        ctx.Process(target=receiver, args=(rx_out, nbytes, k, reps + 1, *extra), name=f"{mode}-rx")
    ]
    busy, own, wall = _busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    procs[0].start()
    try:
        port = _get(rx_out, procs)
        procs.append(
            ctx.Process(
                target=sender, args=(tx_out, port, nbytes, k, reps + 1, *extra), name=f"{mode}-tx"
            )
        )
        procs[1].start()
        sent = _get(tx_out, procs)
        report = _get(rx_out, procs)
        for p in procs:
            p.join(TIMEOUT)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    others = (_busy_seconds() - busy - (_own_cpu_seconds() - own)) / (time.perf_counter() - wall)
    gigabytes = nbytes * k * reps / 1e9
    return Run(
        gbps=nbytes * k / statistics.median(sent["times"][1:]) / 1e9,  # warm-up rep dropped
        tx_cpu=sent["cpu"] / gigabytes,
        rx_cpu=report["cpu"] / gigabytes,
        others=max(others, 0.0),
        report=report,
    )


def cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def print_table(header: Sequence[str], table: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def parse_size(text: str) -> int:
    """Payload bytes: ``4000000``, ``4e6``, ``4M``, ``400k`` (decimal units), a multiple of 8."""
    text = text.strip()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    number = float(text[:-1] if scale > 1 else text) * scale
    nbytes = int(number)
    if nbytes != number or nbytes <= 0 or nbytes % 8:
        raise argparse.ArgumentTypeError(f"{text!r}: need a positive multiple of 8 bytes")
    return nbytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [parse_size(x) for x in s.split(",")],
        default="4M,40M",
        help="payload bytes per message, comma-separated (4M, 4e6, 400k …)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs (process pairs) per cell")
    parser.add_argument("--reps", type=int, default=7, help="timed reps within one run")
    parser.add_argument("--quick", action="store_true", help="--repeat 1 --reps 3")
    parser.add_argument(
        "--security",
        choices=("plain", "secret", "tls"),
        default="plain",
        help="peer links as measured: no secret, the cluster secret's authenticated handshake "
        "(the default mode of a deployed run: the frames are the same as plain), or mutual TLS "
        "(certificates made with the openssl CLI); the targets apply to plain and secret",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.reps = 1, 3

    now = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"peerlearn transport benchmark — {now}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
        f"Python {platform.python_version()}, numpy {np.__version__}, uvloop "
        f"{version('uvloop')}, Linux {platform.release()}"
    )
    print(f"command: python {shlex.join(['benchmarks/bench_transport.py', *sys.argv[1:]])}")
    print(f"runs per cell: {args.repeat}, reps per run: {args.reps} (+1 warm-up)")
    print("raw loopback on this machine type (peers/RESULTS.md): 5.8 GB/s at 4 MB, 3.4 at 40 MB")
    print(flush=True)

    print(f"peer links: {args.security}")
    tls_dir = None
    if args.security == "tls":
        import tempfile

        tls_dir = tempfile.mkdtemp(prefix="bench-tls-")
        make_certs(tls_dir)
    rows = [Row(n) for n in args.sizes]
    problems: list[str] = []
    for run in range(args.repeat):
        for row in rows:
            raw = run_pair("raw", row.nbytes, args.reps)
            pl = run_pair("peerlearn", row.nbytes, args.reps, args.security, tls_dir)
            row.raw.append(raw)
            row.peerlearn.append(pl)
            where = f"run {run + 1}, {row.nbytes / 1e6:g} MB"
            if not raw.report["content_ok"] or not pl.report["content_ok"]:
                problems.append(f"{where}: a received array differs, or is writable")
            if pl.report["duplicates"] or pl.report["protocol_errors"]:
                problems.append(f"{where}: {pl.report}")
            print(
                f"  run {run + 1}/{args.repeat} {row.nbytes / 1e6:g} MB: raw {raw.gbps:.2f} GB/s, "
                f"peerlearn {pl.gbps:.2f} GB/s, ratio {pl.gbps / raw.gbps:.2f}; "
                f"other load {raw.others:.2f} / {pl.others:.2f} cores",
                flush=True,
            )

    print()
    table = []
    missed = bool(problems)
    for row in rows:
        target = TARGETS.get(row.nbytes) if args.security != "tls" else None
        ratio = statistics.median(row.ratios)
        if target is None:
            verdict = "info"
        elif ratio >= target and not problems:
            verdict = "PASS"
        else:
            verdict, missed = "MISS", True
        table.append(
            (
                f"{row.nbytes / 1e6:g}",
                str(messages_per_rep(row.nbytes)),
                cell([r.gbps for r in row.raw]),
                cell([r.gbps for r in row.peerlearn]),
                cell(row.ratios),
                "—" if target is None else f"≥ {target:.2f}",
                verdict,
            )
        )
    print_table(
        ("MB/msg", "msgs/rep", "raw GB/s", "peerlearn GB/s", "ratio", "target", "verdict"), table
    )
    print("cells: median [min–max] over runs; ratio = peerlearn / raw, per back-to-back pair.")
    print()
    print_table(
        ("MB/msg", "raw tx", "raw rx", "peerlearn tx", "peerlearn rx"),
        [
            (
                f"{row.nbytes / 1e6:g}",
                cell([r.tx_cpu for r in row.raw], 3),
                cell([r.rx_cpu for r in row.raw], 3),
                cell([r.tx_cpu for r in row.peerlearn], 3),
                cell([r.rx_cpu for r in row.peerlearn], 3),
            )
            for row in rows
        ],
    )
    print("CPU seconds per GB moved (user + system, all threads of the process, timed reps).")
    print()
    for row in rows:
        total = (args.reps + 1) * messages_per_rep(row.nbytes)
        pools = ", ".join(
            f"{r.report['pool_allocated']} allocated + {r.report['pool_reused']} reused"
            for r in row.peerlearn
        )
        print(f"receiver pool, {row.nbytes / 1e6:g} MB ({total} messages per run): {pools}")
    others = [r.others for row in rows for r in (*row.raw, *row.peerlearn)]
    print(f"other load on the machine during the runs: {cell(others)} cores", end="")
    if max(others) > 0.25:
        print(" — the machine was busy; with 2 cores, figures are not comparable to an idle run")
    else:
        print()
    for problem in problems:
        print(f"PROBLEM {problem}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
