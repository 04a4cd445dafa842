"""One averaging round: peerlearn daemons against gloo, hivemind and a raw-socket exchange.

A round is one exchange-and-average of a d-vector among K processes, measured side by side in
one run on this machine (issue 17):

* **peerlearn** — K ``peerlearn run`` daemon processes of one worker each, Alg 1 with quorum K
  and no failures allowed, on the zero problem of this module (``grad`` returns a preallocated
  zero vector: the round is all communication), in the default deployed security mode (a
  cluster secret). Time per round = the window over the rounds every worker completed in it,
  read from ``/status`` (gradients computed) after the run has settled.
* **gloo** — ``torch.distributed`` all_reduce then divide by K, one process per rank; per
  iteration the slowest rank's time (after a barrier), the median over iterations.
* **raw** — K plain-socket processes doing Alg 1's all-to-all with the same bytes: each sends
  its vector to every other over TCP (``sendall`` from threads) and receives theirs
  (``recv_into`` preallocated buffers), then averages — the transfer limit of this machine.
  Timed like gloo (barrier, slowest process, median).
* **hivemind** — ``DecentralizedAverager.step()`` (float32 only, as shipped), when hivemind is
  importable; slowest peer per step, median.

The table gives each time and the ratios the targets are stated in. A gloo or hivemind target
may be set aside only where the raw exchange itself is slower than that target, and the cell's
target is then ≤ 1.25× raw. Rows for Alg 2 and DASGD at d = 1e6 are measured against raw.

Never in CI (a smoke run at tiny sizes is). Run from the repository root, on an idle machine::

    .venv/bin/python benchmarks/bench_round.py                 # every cell, about 10 minutes
    .venv/bin/python benchmarks/bench_round.py --cells 2:1e6:float32 --window 5

gloo needs torch, hivemind needs hivemind (see benchmarks/RESULTS.md for the install); a
missing one leaves its column empty.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peerlearn.problems import Problem

ROOT = Path(__file__).resolve().parent.parent

#: (K, d) -> target ratios: peerlearn / gloo (same dtype), hivemind / peerlearn (float32),
#: peerlearn / raw
TARGETS: dict[tuple[int, int], dict[str, float | None]] = {
    (2, 1_000_000): {"gloo": 0.8, "hivemind": 15.0, "raw": 2.0},
    (2, 10_000_000): {"gloo": 1.0, "hivemind": 8.0, "raw": 1.5},
    (4, 1_000_000): {"gloo": None, "hivemind": 10.0, "raw": 1.5},
}
#: where the raw exchange is itself slower than a target, the cell's target is this × raw
RAW_RULE = 1.25
DEFAULT_CELLS = [
    "2:1e6:float32",
    "2:1e6:float64",
    "2:1e7:float32",
    "2:1e7:float64",
    "4:1e6:float32",
    "4:1e6:float64",
]
DEFAULT_EXTRA = ["alg2:2:1e6:float64", "dasgd:2:1e6:float64"]


# --- the zero problem: a round is all communication --------------------------------------------


class Zero(Problem):
    """Q(x) = 0: the gradient is a preallocated zero vector, the loss a constant."""

    name = "zero"

    def __init__(self, dim: int, dtype: str) -> None:
        self._dim = dim
        self._dtype = np.dtype(dtype)
        self._zero = np.zeros(dim, self._dtype)
        self._zero.flags.writeable = False

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> np.dtype[np.floating]:
        return self._dtype  # type: ignore[return-value]

    def x0(self) -> Any:
        return np.zeros(self._dim, self._dtype)

    def grad(self, x: Any, rng: np.random.Generator) -> Any:
        return self._zero

    def loss(self, x: Any) -> float:
        return 0.0

    def full_grad(self, x: Any) -> Any:
        return self._zero


def zero(dim: int = 1000, dtype: str = "float64") -> Problem:
    """``--problem benchmarks.bench_round:zero`` with ``problem.dim`` and ``problem.dtype``."""
    return Zero(dim, dtype)


# --- cells --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    algorithm: str
    k: int
    d: int
    dtype: str

    @classmethod
    def parse(cls, text: str) -> Cell:
        parts = text.split(":")
        algorithm = parts.pop(0) if len(parts) == 4 else "alg1"
        if len(parts) != 3 or parts[2] not in ("float32", "float64"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected [ALG:]K:D:float32|float64")
        return cls(algorithm, int(parts[0]), int(float(parts[1])), parts[2])

    @property
    def label(self) -> str:
        return f"{self.algorithm} K={self.k} d={self.d:.0e} {self.dtype}".replace("e+0", "e")


@dataclass
class Result:
    cell: Cell
    times: dict[str, float | None] = field(default_factory=dict)  # system -> seconds a round
    notes: list[str] = field(default_factory=list)


# --- peerlearn daemons --------------------------------------------------------------------------


def _free_ports(k: int) -> list[int]:
    socks = [socket.socket() for _ in range(k)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _gradients(api: str) -> int:
    with urllib.request.urlopen(f"{api}/status", timeout=30) as r:
        return sum(int(w["gradients"]) for w in json.load(r)["workers"])


@contextlib.contextmanager
def _daemons(cell: Cell, secret: Path) -> Iterator[tuple[list[subprocess.Popen[bytes]], list[str]]]:
    ports = _free_ports(2 * cell.k)
    peers, apis = ports[: cell.k], ports[cell.k :]
    addrs = [f"127.0.0.1:{p}" for p in peers]
    base = [sys.executable, "-m", "peerlearn.cli", "run", "--workers", "1"]
    base += ["--algorithm", cell.algorithm, "--problem", "benchmarks.bench_round:zero"]
    base += ["--set", f"problem.dim={cell.d}", "--set", f"problem.dtype={cell.dtype}"]
    base += ["--set", f"dtype={cell.dtype}", "--secret-file", str(secret), "--log-level", "error"]
    if cell.algorithm in ("alg1", "alg2"):
        base += ["--quorum", str(cell.k), "--max-failures", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, (p, a) in enumerate(zip(peers, apis, strict=True)):
            others = ",".join(x for j, x in enumerate(addrs) if j != i)
            cmd = [*base, "--listen", f"127.0.0.1:{p}", "--api", f"127.0.0.1:{a}"]
            cmd += ["--peers", others]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, process_group=0))
        yield procs, [f"http://127.0.0.1:{a}" for a in apis]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def peerlearn_round(cell: Cell, window: float, secret: Path, settle: float = 2.0) -> float:
    """Seconds per round of ``cell`` run by real daemons (see the module docstring)."""
    with _daemons(cell, secret) as (procs, urls):
        deadline = time.monotonic() + 180
        for url in urls:
            while True:
                for proc in procs:
                    if proc.poll() is not None:
                        raise RuntimeError(f"peerlearn daemon exited with {proc.returncode}")
                with contextlib.suppress(OSError):
                    if _gradients(url) > 0:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} computed no gradient within 180 s")
                time.sleep(0.1)
        time.sleep(settle)
        t0, g0 = time.perf_counter(), sum(map(_gradients, urls))
        time.sleep(window)
        g1, t1 = sum(map(_gradients, urls)), time.perf_counter()
    rounds = (g1 - g0) / cell.k
    if rounds <= 0:
        raise RuntimeError(f"{cell.label}: no round completed in {window:g} s")
    return (t1 - t0) / rounds


# --- gloo ---------------------------------------------------------------------------------------


def _gloo_rank(rank: int, cell: Cell, port: int, reps: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=cell.k)
    x = torch.ones(cell.d, dtype=getattr(torch, cell.dtype))
    times = []
    for i in range(reps + 3):  # 3 warm-up rounds
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        x.div_(cell.k)
        if i >= 3:
            times.append(time.perf_counter() - start)
    worst = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        out.put(worst.tolist())
    dist.barrier()
    dist.destroy_process_group()


def gloo_round(cell: Cell, reps: int) -> float | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_ports(1)[0]
    procs = [ctx.Process(target=_gloo_rank, args=(r, cell, port, reps, out)) for r in range(cell.k)]
    return _collect(procs, out, "gloo")


# --- the raw-socket exchange --------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def _raw_process(i: int, cell: Cell, ports: Sequence[int], reps: int, out: Any) -> None:
    k = cell.k
    listener = socket.create_server(("127.0.0.1", ports[i]), backlog=k)
    peers: dict[int, socket.socket] = {}
    for j in range(i):  # dial the lower ids, accept the higher
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", ports[j]))
                break
            except ConnectionRefusedError:
                time.sleep(0.01)
        sock.sendall(bytes([i]))
        peers[j] = sock
    while len(peers) < k - 1:
        sock, _ = listener.accept()
        peers[sock.recv(1)[0]] = sock
    for sock in peers.values():
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    x = np.ones(cell.d, cell.dtype)
    bufs = {j: np.empty_like(x) for j in peers}
    token = bytearray(1)
    times = []
    with ThreadPoolExecutor(k - 1) as pool:
        for r in range(reps + 3):
            for sock in peers.values():  # barrier: a byte to and from everyone
                sock.sendall(b"b")
            for sock in peers.values():
                _recv_exactly(sock, memoryview(token))
            start = time.perf_counter()
            sends = [pool.submit(sock.sendall, memoryview(x).cast("B")) for sock in peers.values()]
            for j, sock in peers.items():
                _recv_exactly(sock, memoryview(bufs[j]).cast("B"))
            for f in sends:
                f.result()
            for buf in bufs.values():
                x += buf
            x /= k
            if r >= 3:
                times.append(time.perf_counter() - start)
    out.put((i, times))
    for sock in peers.values():
        sock.close()
    listener.close()


def raw_round(cell: Cell, reps: int) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    ports = _free_ports(cell.k)
    procs = [
        ctx.Process(target=_raw_process, args=(i, cell, ports, reps, out)) for i in range(cell.k)
    ]
    t = _collect(procs, out, "raw", parts=cell.k)
    assert t is not None
    return t


def _collect(procs: list[Any], out: Any, what: str, parts: int = 1) -> float | None:
    """Start ``procs``, take ``parts`` results (per-iteration times; several: the max per
    iteration over them) and return the median."""
    for p in procs:
        p.start()
    try:
        got: list[list[float]] = []
        deadline = time.monotonic() + 600
        while len(got) < parts:
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"{what}: a process failed: {[p.exitcode for p in procs]}")
            if out.empty():
                time.sleep(0.05)
                continue
            item = out.get()
            got.append(item[1] if isinstance(item, tuple) else item)
        worst = [max(ts) for ts in zip(*got, strict=True)]
        return statistics.median(worst)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()


# --- hivemind -----------------------------------------------------------------------------------


def _hivemind_peer(i: int, cell: Cell, steps: int, addrs: Any, out: Any, barrier: Any) -> None:
    import hivemind
    import torch
    from hivemind.averaging import DecentralizedAverager

    torch.set_num_threads(1)
    if i == 0:
        dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        visible = [str(a) for a in dht.get_visible_maddrs()]
        for _ in range(cell.k - 1):
            addrs.put(visible)
    else:
        dht = hivemind.DHT(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=addrs.get(), start=True
        )
    x = torch.full((cell.d,), float(i))
    averager = DecentralizedAverager(
        [x],
        dht,
        prefix=f"bench_{cell.k}_{cell.d}",
        target_group_size=cell.k,
        min_group_size=cell.k,
        min_matchmaking_time=0.5,
        request_timeout=0.25,
        start=True,
    )
    times = []
    for s in range(steps + 1):
        barrier.wait(timeout=120)
        start = time.perf_counter()
        ok = averager.step(timeout=60) is not None
        if s > 0:
            times.append(time.perf_counter() - start if ok else float("inf"))
    out.put((i, times))
    barrier.wait(timeout=120)
    averager.shutdown()
    dht.shutdown()


def hivemind_round(cell: Cell, steps: int) -> float | None:
    if cell.dtype != "float32":
        return None
    try:
        import hivemind  # noqa: F401
    except ImportError:
        return None
    ctx = mp.get_context("fork")  # hivemind's averager is a process of its own: not spawn
    addrs, out, barrier = ctx.Queue(), ctx.SimpleQueue(), ctx.Barrier(cell.k)
    procs = [
        ctx.Process(target=_hivemind_peer, args=(i, cell, steps, addrs, out, barrier))
        for i in range(cell.k)
    ]
    return _collect(procs, out, "hivemind", parts=cell.k)


# --- the table ----------------------------------------------------------------------------------


def verdicts(res: Result) -> list[str]:
    """Each target of the cell: met, missed, or set aside by the raw-socket rule."""
    cell, t = res.cell, res.times
    mine, raw = t.get("peerlearn"), t.get("raw")
    if cell.algorithm != "alg1" or mine is None or raw is None:
        return []
    goals = TARGETS.get((cell.k, cell.d), {})
    out = []
    for system in ("gloo", "hivemind"):
        goal, theirs = goals.get(system), t.get(system)
        if goal is None or theirs is None:
            continue
        # gloo: peerlearn ≤ goal × gloo; hivemind: peerlearn ≤ hivemind / goal
        limit = goal * theirs if system == "gloo" else theirs / goal
        if raw > limit:  # the machine's own transfer cannot meet it: ≤ 1.25 × raw instead
            ok = mine <= RAW_RULE * raw
            out.append(
                f"{system}: set aside (raw {raw * 1e3:.1f} ms > {limit * 1e3:.1f}), "
                f"≤ {RAW_RULE}× raw {'PASS' if ok else 'MISS'}"
            )
        else:
            out.append(f"{system}: {'PASS' if mine <= limit else 'MISS'}")
    goal = goals.get("raw")
    if goal is not None:
        out.append(f"raw ≤ {goal}×: {'PASS' if mine <= goal * raw else 'MISS'}")
    return out


def _ms(t: float | None) -> str:
    return "—" if t is None else f"{t * 1e3:.2f}"


def render(results: list[Result]) -> str:
    head = ["cell", "peerlearn ms", "gloo ms", "raw ms", "hivemind ms", "pl/gloo", "pl/raw"]
    head += ["hm/pl", "verdicts"]
    rows = []
    for res in results:
        t = res.times
        mine = t.get("peerlearn")

        def ratio(a: float | None, b: float | None) -> str:
            return "—" if a is None or b is None else f"{a / b:.2f}"

        rows.append(
            [
                res.cell.label,
                _ms(mine),
                _ms(t.get("gloo")),
                _ms(t.get("raw")),
                _ms(t.get("hivemind")),
                ratio(mine, t.get("gloo")),
                ratio(mine, t.get("raw")),
                ratio(t.get("hivemind"), mine),
                "; ".join(verdicts(res) + res.notes) or "—",
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, ["-" * w for w in widths], *rows]
    ]
    return "\n".join(lines)


def idle_check(seconds: float = 2.0) -> str:
    """The CPU share other processes used over ``seconds`` before the run (from /proc/stat)."""

    def busy() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    b0, t0 = busy()
    time.sleep(seconds)
    b1, t1 = busy()
    share = (b1 - b0) / max(1, t1 - t0)
    return f"CPU busy {share:.0%} over {seconds:g} s before the run" + (
        "" if share < 0.1 else " — NOT idle: the figures are suspect"
    )


def versions() -> str:
    parts = [f"Python {platform.python_version()}", f"numpy {np.__version__}"]
    for name in ("torch", "hivemind"):
        try:
            module = __import__(name)
            parts.append(f"{name} {module.__version__}")
        except ImportError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--cells",
        nargs="+",
        type=Cell.parse,
        default=[Cell.parse(c) for c in DEFAULT_CELLS],
        help="[ALG:]K:D:DTYPE, e.g. 2:1e6:float32 or dasgd:2:1e6:float64",
    )
    parser.add_argument(
        "--extra",
        nargs="*",
        type=Cell.parse,
        default=[Cell.parse(c) for c in DEFAULT_EXTRA],
        help="further algorithms' cells, against raw only",
    )
    parser.add_argument("--window", type=float, default=15.0, help="seconds peerlearn is timed")
    parser.add_argument("--reps", type=int, default=21, help="timed gloo and raw rounds")
    parser.add_argument("--hivemind-steps", type=int, default=10, help="timed hivemind steps")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["gloo", "raw", "hivemind"],
        help="systems left out",
    )
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    print(idle_check())
    print(f"{os.cpu_count()} CPUs, {platform.platform()}; {versions()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        secret = Path(tmp) / "cluster.secret"
        secret.write_text(os.urandom(24).hex())
        secret.chmod(0o600)
        for cell in [*args.cells, *args.extra]:
            res = Result(cell)
            say(f"{cell.label}: peerlearn …")
            res.times["peerlearn"] = peerlearn_round(cell, args.window, secret)
            if cell.algorithm == "alg1":
                if "gloo" not in args.skip:
                    say(f"{cell.label}: gloo …")
                    res.times["gloo"] = gloo_round(cell, args.reps)
                    if res.times["gloo"] is None:
                        res.notes.append("gloo: torch not installed")
                if "hivemind" not in args.skip and cell.dtype == "float32":
                    say(f"{cell.label}: hivemind …")
                    res.times["hivemind"] = hivemind_round(cell, args.hivemind_steps)
            if "raw" not in args.skip:
                say(f"{cell.label}: raw …")
                res.times["raw"] = raw_round(cell, args.reps)
            results.append(res)
    print(render(results))
    missed = any("MISS" in v for res in results for v in verdicts(res))
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
