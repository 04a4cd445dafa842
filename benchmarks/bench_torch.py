"""Time to accuracy: the digits CNN (examples/digits_cnn.py) with 3 processes, peerlearn's
algorithms against torch's DistributedDataParallel on gloo (issue 16).

Every run: 3 processes (peerlearn: 3 ``peerlearn run`` daemons of one worker; DDP: 3 ranks),
each reading its own third of the training set (examples p, p+3, …; DDP the same shards), batch
32, plain SGD at η 0.1 (DASGD 0.05: its setting in tests/test_torch_training.py), the same
start model. Measured per run: the gradient evaluations
(over all processes) and wall seconds — from the first gradient completed — until the mean of
the processes' models first reaches ``--threshold`` test accuracy. peerlearn's models are read
through the control API (``GET /model``) every ``--every`` seconds and evaluated by this script
while the daemons run (a few ms a sample, on the same 2 cores: against peerlearn); DDP's rank 0
evaluates every 10 iterations, off its clock (its model is the mean: DDP keeps the ranks
equal). The figure is when the model was there, at the granularity of the sampling.

The same machine, the same run: the reference (DDP) is measured beside peerlearn each time.
Never in CI. Run from the repository root::

    .venv/bin/python benchmarks/bench_torch.py            # all algorithms and DDP, 1 repeat
    .venv/bin/python benchmarks/bench_torch.py --repeats 3 --algorithms alg1,dasgd
    .venv/bin/python benchmarks/bench_torch.py --algorithms alg1 --compression fp16,int8
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import free_ports  # noqa: E402
from examples.digits_cnn import digits, loss, model, problem  # noqa: E402

PEERLEARN = str(Path(sys.executable).with_name("peerlearn"))
CNN = "examples.digits_cnn:problem"
#: algorithm → (iterations per process, η): the settings tests/test_torch_training.py uses
SETTINGS = {
    "alg1": (1500, 0.1),
    "alg2": (1500, 0.1),
    "dasgd": (800, 0.05),
    "async_easgd": (1500, 0.1),
    "allreduce": (1500, 0.1),
}
#: Alg 2's agreement, short, as the tests run it
EXTRA = {"alg2": ("--set", "maa.rounds=3", "--set", "maa.inner_rounds=2")}


async def _peerlearn(
    algorithm: str, threshold: float, every: float, compression: str | None = None
) -> dict[str, float | None]:
    iterations, eta = SETTINGS[algorithm]
    ports = free_ports(6)
    addrs = [f"127.0.0.1:{p}" for p in ports[:3]]
    apis = [f"127.0.0.1:{p}" for p in ports[3:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 3 processes on 2 cores, as DDP's ranks
    procs = [
        subprocess.Popen(
            [
                *(PEERLEARN, "run", "--listen", addrs[i], "--api", apis[i]),
                *("--peers", ",".join(a for a in addrs if a != addrs[i])),
                *("--algorithm", algorithm, "--problem", CNN, "--workers", "1"),
                *("--steps", str(iterations), "--lr", str(eta), "--log-level", "warning"),
                *EXTRA.get(algorithm, ()),
                *(("--compression", compression) if compression else ()),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(3)
    ]
    prob = problem()
    reached: dict[str, float | None] = {"grads": None, "seconds": None, "accuracy": None}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            # The clock starts at the first gradient any process completes (DDP's at its
            # barrier, right before its first): polled every 10 ms from the moment the APIs
            # answer — two daemons of three make a quorum and may start before the third.
            while True:
                try:
                    statuses = [(await client.get(f"http://{api}/status")).json() for api in apis]
                except httpx.TransportError:
                    await asyncio.sleep(0.01)
                    continue
                if sum(w["gradients"] for s in statuses for w in s["workers"]) > 0:
                    break
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            while True:
                at = time.perf_counter() - started
                statuses = [(await client.get(f"http://{api}/status")).json() for api in apis]
                grads = sum(w["gradients"] for s in statuses for w in s["workers"])
                models = []
                for api, s in zip(apis, statuses, strict=True):
                    for w in s["workers"]:
                        got = await client.get(f"http://{api}/model", params={"worker": w["id"]})
                        if got.status_code == 200:
                            models.append(np.load(io.BytesIO(got.content)))
                accuracy = prob.evaluate(np.mean(models, axis=0))["test_accuracy"]
                reached["accuracy"] = accuracy
                if accuracy >= threshold:
                    reached.update(grads=grads, seconds=at)
                    return reached
                if all(s["state"] == "finished" for s in statuses):
                    return reached  # never reached it
                await asyncio.sleep(every)
    finally:
        for p in procs:
            p.kill()
            p.wait(30)


def _ddp_rank(
    rank: int, port: int, iterations: int, eta: float, threshold: float, q: object
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=3)
    (inputs, targets), (test_x, test_y) = digits()
    torch.manual_seed(0)  # the start model every peerlearn process has (problem seed 0)
    net = torch.nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.SGD(net.parameters(), lr=eta)
    shard = np.arange(rank, len(inputs), 3)
    rng = np.random.default_rng(rank)
    order, at = rng.permutation(shard), 0
    dist.barrier()
    started, clock = time.perf_counter(), 0.0  # evaluation time is taken off the clock
    result = {"grads": None, "seconds": None, "accuracy": None}
    for it in range(1, iterations + 1):
        if at + 32 > len(order):
            order, at = rng.permutation(shard), 0
        idx = torch.from_numpy(order[at : at + 32])
        at += 32
        opt.zero_grad()
        loss(net(inputs[idx]), targets[idx]).backward()
        opt.step()
        if it % 10 == 0:
            lap = time.perf_counter()
            if rank == 0:
                with torch.no_grad():
                    acc = float((net.module(test_x).argmax(1) == test_y).double().mean())
                result["accuracy"] = acc
                if acc >= threshold and result["seconds"] is None:
                    result.update(grads=3 * it, seconds=lap - started - clock)
            # rank 0 tells the others whether it is done: the ranks stop together once the
            # figure is in (the rest of the iterations would measure nothing)
            done = torch.tensor([float(result["seconds"] is not None)])
            dist.broadcast(done, 0)
            clock += time.perf_counter() - lap
            if done.item():
                break
    if rank == 0:
        q.put(result)  # type: ignore[attr-defined]
    dist.barrier()
    dist.destroy_process_group()


def _ddp(threshold: float) -> dict[str, float | None]:
    iterations, eta = SETTINGS["alg1"]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_ports(1)[0]
    procs = [
        ctx.Process(target=_ddp_rank, args=(r, port, iterations, eta, threshold, q))
        for r in range(3)
    ]
    for p in procs:
        p.start()
    out: dict[str, float | None] = q.get()
    for p in procs:
        p.join(120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", default=",".join(SETTINGS))
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--every", type=float, default=0.1, help="seconds between model reads")
    ap.add_argument(
        "--compression",
        default="",
        help="also run each algorithm with these payload compressions (comma-separated: "
        "fp16,bf16,int8), one row each",
    )
    a = ap.parse_args()
    schemes = [s for s in a.compression.split(",") if s]
    rows: dict[str, list[dict[str, float | None]]] = {}
    for _ in range(a.repeats):
        rows.setdefault("DDP (gloo)", []).append(_ddp(a.threshold))
        for algorithm in a.algorithms.split(","):
            rows.setdefault(algorithm, []).append(
                asyncio.run(_peerlearn(algorithm, a.threshold, a.every))
            )
            for scheme in schemes:
                rows.setdefault(f"{algorithm} {scheme}", []).append(
                    asyncio.run(_peerlearn(algorithm, a.threshold, a.every, scheme))
                )
    print(
        f"\ntime to {a.threshold:.2f} test accuracy, 3 processes, batch 32 (median of "
        f"{a.repeats}; '—': not reached, last accuracy shown)"
    )
    print(f"{'run':<17} {'gradients':>10} {'seconds':>9} {'accuracy':>9}  range (min–max)")
    for name, results in rows.items():
        done = [r for r in results if r["seconds"] is not None]
        if len(done) * 2 > len(results):
            gs = [float(r["grads"] or 0) for r in done]
            ss = [float(r["seconds"] or 0) for r in done]
            g, s = statistics.median(gs), statistics.median(ss)
            spread = f"{min(gs):.0f}–{max(gs):.0f} gradients, {min(ss):.2f}–{max(ss):.2f} s"
            print(f"{name:<17} {g:>10.0f} {s:>9.2f} {'':>9}  {spread}")
        else:
            last = results[-1]["accuracy"]
            print(f"{name:<17} {'—':>10} {'—':>9} {last if last is None else f'{last:.3f}':>9}")


if __name__ == "__main__":
    main()
