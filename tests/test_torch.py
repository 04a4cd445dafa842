"""peerlearn.torch: a torch model, its data and its loss as a peerlearn problem — gradients equal
torch's, a step through peerlearn equals torch.optim.SGD's, data shards, threads, and the core
importing without torch. The digits CNN of examples/digits_cnn.py is the model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from examples.digits_cnn import digits, loss, model, problem  # noqa: E402
from peerlearn.errors import ProblemError  # noqa: E402
from peerlearn.problems import in_dtype  # noqa: E402
from peerlearn.runs import grad_stream  # noqa: E402
from peerlearn.runtime.worker import WorkerState  # noqa: E402
from peerlearn.sim import Status, run_simulation  # noqa: E402
from peerlearn.testing import local_cluster  # noqa: E402
from peerlearn.torch import Batches, TorchProblem  # noqa: E402

from .helpers import cfg  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CNN = "examples.digits_cnn:problem"


def _reference(x: np.ndarray, idx: np.ndarray) -> tuple[torch.nn.Module, torch.Tensor]:
    """A fresh torch model at x, with its per-parameter gradients on the examples ``idx``."""
    (inputs, targets), _ = digits()
    torch.manual_seed(0)
    net = model()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(x).float(), net.parameters())
    net.zero_grad()
    out = loss(net(inputs[torch.from_numpy(idx)]), targets[torch.from_numpy(idx)])
    out.backward()
    return net, out


def test_the_flat_gradient_is_torchs_per_parameter_gradients_exactly() -> None:
    p = problem(batch_size=16)
    oracle = p.oracle(1, 3, 1)
    assert p.x0().dtype == np.float32  # the model's own dtype: no float64 copy on the way
    x = (p.x0() + np.random.default_rng(5).normal(0, 0.05, p.dim)).astype(np.float32)
    # A twin of the oracle's batch stream, on a twin generator: the batches it took.
    twin, twin_rng, rng = (
        Batches(len(digits()[0][0]), 16, 1, 3, "shard"),
        np.random.default_rng(7),
        np.random.default_rng(7),
    )
    for _ in range(40):  # past an epoch of the shard: its buffers reused, never accumulated into
        got = oracle(x, rng)
        net, _ = _reference(x, twin.next(twin_rng))
        want = torch.cat([q.grad.reshape(-1) for q in net.parameters()]).numpy()
        assert got.dtype == np.float32 and got.shape == (p.dim,)
        assert np.array_equal(got, want)


def test_a_run_in_float64_casts_the_float32_model_once_each_way() -> None:
    # The run's dtype is the model's unless the config says otherwise: float64 then, each
    # gradient one cast beyond torch's copy out; losses and the module take either dtype.
    p = problem(batch_size=16)
    wide = in_dtype(p, "float64")
    assert p.dtype == np.float32 and wide.dtype == np.float64
    assert np.array_equal(wide.x0(), p.x0().astype(np.float64))
    x = wide.x0()
    g32 = p.oracle(1, 3, 1)(p.x0(), np.random.default_rng(2))
    g64 = wide.oracle(1, 3, 1)(x, np.random.default_rng(2))
    assert g64.dtype == np.float64 and np.array_equal(g64, g32.astype(np.float64))
    assert wide.loss(x) == p.loss(p.x0())


def test_a_step_through_peerlearn_is_torch_sgds_step_within_one_ulp() -> None:
    # One process, one iteration of Alg 1 in the simulator: x₂ = x₁ − η G(x₁). torch.optim.SGD
    # on the same batch (the process's own gradient stream draws it) does the same in float32,
    # and so does peerlearn (the run's dtype is the model's): within 1 ulp — torch may fuse the
    # multiply-add, numpy rounds twice. (η a power of two: exact in float32.)
    lr = 0.125
    run = cfg(
        algorithm="alg1", processes=1, clusters=1, steps=1, lr={"eta": lr}, problem={"name": CNN}
    )
    result = run_simulation(run)
    assert result.status is Status.FINISHED
    (proc,) = result.processes
    assert proc.x is not None and proc.x.dtype == np.float32  # the model's dtype throughout
    p = problem()
    chosen = Batches(len(digits()[0][0]), 32, 0, 1, "shard").next(grad_stream(run, 0))
    net, _ = _reference(p.x0(), chosen)
    torch.optim.SGD(net.parameters(), lr=lr).step()
    want = torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy()
    np.testing.assert_array_max_ulp(proc.x.astype(np.float32), want, maxulp=1)
    assert not np.array_equal(proc.x, p.x0())


def test_shards_partition_the_training_set_and_epochs_are_counted() -> None:
    n, processes = 1000, 3
    seen: list[np.ndarray] = []
    for pid in range(processes):
        b = Batches(n, 10, pid, processes, "shard")
        rng = np.random.default_rng(pid)
        batches = [b.next(rng) for _ in range(len(b.indices) // 10)]
        epoch = np.concatenate(batches)
        assert len(np.unique(epoch)) == len(epoch)  # an epoch takes each example once at most
        assert set(epoch) <= set(range(pid, n, processes))
        seen.append(b.indices)
        assert b.epochs == pytest.approx(len(epoch) / len(b.indices))
    assert sorted(np.concatenate(seen)) == list(range(n))
    whole = Batches(n, 10, 2, processes, "sample")
    assert len(whole.indices) == n


def test_each_process_starts_from_the_same_model_and_threads_fit_the_cores() -> None:
    a, b = problem(), problem()
    assert np.array_equal(a.x0(), b.x0())
    assert not np.array_equal(a.x0(), problem(seed=1).x0())
    before = torch.get_num_threads()
    try:
        a.oracle(0, 4, 2)
        assert torch.get_num_threads() * 2 <= max(os.cpu_count() or 1, 2)
    finally:
        torch.set_num_threads(before)


def test_evaluation_reports_test_loss_and_accuracy_and_the_model_goes_home() -> None:
    p = problem()
    start = p.evaluate(p.x0())
    assert set(start) == {"test_loss", "test_accuracy"}
    assert 0.0 <= start["test_accuracy"] <= 1.0
    oracle, rng, x = p.oracle(0, 1, 1), np.random.default_rng(0), p.x0()
    for _ in range(200):
        x = x - 0.1 * oracle(x, rng)
    assert p.loss(x) < p.loss(p.x0())
    assert p.evaluate(x)["test_accuracy"] > start["test_accuracy"]
    net = p.model(x)
    got = torch.nn.utils.parameters_to_vector(net.parameters()).detach().double().numpy()
    assert np.array_equal(got, x.astype(np.float32).astype(np.float64))


def test_bad_data_and_settings_are_refused_with_what_was_expected() -> None:
    with pytest.raises(ProblemError, match="must return"):
        TorchProblem(model, lambda: (1, 2), loss)  # type: ignore[arg-type,return-value]
    with pytest.raises(ProblemError, match="shard' or 'sample"):
        TorchProblem(model, digits, loss, data="all")  # type: ignore[arg-type]
    with pytest.raises(ProblemError, match="no trainable parameters"):
        TorchProblem(lambda: torch.nn.ReLU(), digits, loss)


def test_three_simulated_processes_train_the_cnn() -> None:
    run = cfg(
        algorithm="alg1",
        processes=3,
        clusters=3,
        max_failures=1,
        steps=300,
        lr={"eta": 0.1},
        problem={"name": CNN},
    )
    result = run_simulation(run)
    assert result.status is Status.FINISHED
    assert result.problem is not None
    live = np.mean([p.x for p in result.live() if p.x is not None], axis=0)
    assert result.problem.evaluate(live)["test_accuracy"] > 0.8


def test_the_core_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # `import torch` now fails
        "import peerlearn, peerlearn.cli, peerlearn.daemon.node, peerlearn.sim\n"
        "from peerlearn.cli import main\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, peerlearn.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.stdout.strip() == "False", loaded.stderr


async def test_three_daemons_train_the_cnn_count_epochs_and_write_model_pt(tmp_path: Path) -> None:
    async with local_cluster(
        3,
        workers=1,
        algorithm="alg1",
        steps=150,
        lr={"eta": 0.1},
        problem={"name": CNN},
        each=lambda i: {"out": tmp_path / f"d{i}"},
    ) as c:
        await c.wait_until_finished(120)
        p = c.daemons[0].problem
        assert isinstance(p, TorchProblem)
        for d in c.daemons:
            (w,) = d.workers
            assert w.state is WorkerState.FINISHED
            assert w.grads == 150
            x = w.position[1]
            assert x is not None and p.loss(x) < 0.8 * p.loss(p.x0())
        # process 0 reads training examples 0, 3, 6, …: 449 of 1,347
        shard = len(range(0, len(digits()[0][0]), 3))
        status = (await c.client(0).get("/status")).json()
        assert status["workers"][0]["epochs"] == pytest.approx(150 * 32 / shard, abs=1e-3)
        metrics = (await c.client(0).get("/metrics")).text
        assert f'peerlearn_epochs{{worker="0.0"}} {150 * 32 / shard}' in metrics
    # --out: the mean of model.npz, as a torch state dict in model.pt
    mean = np.load(tmp_path / "d0" / "model.npz")["mean"]
    net = model()
    net.load_state_dict(torch.load(tmp_path / "d0" / "model.pt"))
    got = torch.nn.utils.parameters_to_vector(net.parameters()).detach().double().numpy()
    assert np.array_equal(got, mean.astype(np.float32).astype(np.float64))


_SCRIPT = """
import sys
import torch
from examples.digits_cnn import digits, loss, model
from peerlearn.torch import train

listen, peers, out = sys.argv[1:4]
net = train(model, digits, loss, listen=listen, peers=peers, steps=120, lr=0.1, out=out,
            api="127.0.0.1:0")
print(type(net).__name__, sum(p.numel() for p in net.parameters()))
torch.save(net.state_dict(), out + "/returned.pt")
"""


def test_train_runs_a_daemon_per_script_and_returns_the_trained_model(tmp_path: Path) -> None:
    # The same script on two "machines" (two processes here), each with its own address: each
    # call blocks until the run ends and returns its daemon's mean model, written to out= too.
    from .test_processes import free_ports

    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    addrs = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), addrs[i], addrs[1 - i], str(tmp_path / f"m{i}")],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=100) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-2000:]
        assert stdout.split() == ["Sequential", "1898"]
    for i in range(2):
        mean = np.load(tmp_path / f"m{i}" / "model.npz")["mean"]
        for name in ("returned.pt", "model.pt"):
            net = model()
            net.load_state_dict(torch.load(tmp_path / f"m{i}" / name))
            got = torch.nn.utils.parameters_to_vector(net.parameters()).detach().double()
            assert np.array_equal(got.numpy(), mean.astype(np.float32).astype(np.float64))
        p = problem()
        assert p.loss(mean) < 0.8 * p.loss(p.x0())


def _bn_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )


def test_buffers_stay_local_and_model_pt_carries_the_first_processs(tmp_path: Path) -> None:
    p = TorchProblem(_bn_model, digits, loss)
    first, other = p.oracle(0, 2, 2), p.oracle(1, 2, 2)
    rng, x = np.random.default_rng(0), p.x0()
    for _ in range(30):
        x = x - 0.1 * first(x, rng)
        other(x, rng)
    mine = dict(first.model.module.named_buffers())  # type: ignore[attr-defined]
    theirs = dict(other.model.module.named_buffers())  # type: ignore[attr-defined]
    assert not torch.equal(mine["2.running_mean"], torch.zeros(32))  # trained statistics
    assert not torch.equal(mine["2.running_mean"], theirs["2.running_mean"])  # each its own
    assert p.x0().shape == (p.dim,)  # buffers are no parameters: not in x
    (path,) = p.export(x, tmp_path)
    net = _bn_model()
    net.load_state_dict(torch.load(path))
    for name, buf in net.named_buffers():
        assert torch.equal(buf, mine[name]), name
    got = torch.nn.utils.parameters_to_vector(net.parameters()).detach().double().numpy()
    assert np.array_equal(got, x.astype(np.float32).astype(np.float64))


def test_evaluation_from_two_threads_evaluates_each_ones_model() -> None:
    # The monitor's thread and a final evaluation may overlap: each must get its own x's loss.
    p = problem()
    x, y = p.x0(), p.x0() + 0.5
    want = {0: p.eval_loss(x, 512), 1: p.eval_loss(y, 512)}
    got: dict[int, list[float]] = {0: [], 1: []}

    def evaluate(i: int, model: np.ndarray) -> None:
        for _ in range(60):
            got[i].append(p.eval_loss(model, 512))

    threads = [threading.Thread(target=evaluate, args=(i, m)) for i, m in ((0, x), (1, y))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert want[0] != pytest.approx(want[1], rel=1e-3)
    for i in (0, 1):
        assert got[i] == pytest.approx([want[i]] * 60, rel=1e-6)


def test_full_gradient_and_loss_in_chunks_equal_one_pass() -> None:
    p = problem()
    x = p.x0() + np.random.default_rng(1).normal(0, 0.05, p.dim)
    (inputs, targets), _ = digits()
    torch.manual_seed(0)
    net = model()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(x).float(), net.parameters())
    whole = loss(net(inputs), targets)
    whole.backward()
    want = torch.cat([q.grad.reshape(-1) for q in net.parameters()]).double().numpy()
    np.testing.assert_allclose(p.full_grad(x), want, rtol=1e-4, atol=1e-7)
    assert p.loss(x) == pytest.approx(float(whole.detach()), rel=1e-5)  # 1,347 examples: two chunks


def test_sampled_batches_draw_from_the_whole_set() -> None:
    b = Batches(100, 10, 2, 3, "sample")
    rng = np.random.default_rng(0)
    drawn = [b.next(rng) for _ in range(50)]
    assert all(len(set(batch)) == 10 for batch in drawn)  # without replacement in a batch
    assert len(set(np.concatenate(drawn))) > 90  # not a shard: nearly every example
    assert b.epochs == pytest.approx(5.0)


_INTERRUPTED = """
import sys
from examples.digits_cnn import digits, loss, model
from peerlearn.torch import train

train(model, digits, loss, listen=sys.argv[1], peers=sys.argv[2], steps=10**9, lr=0.1,
      log_level="info")
"""


def test_train_interrupted_stops_its_daemon_and_raises(tmp_path: Path) -> None:
    # Ctrl-C in a script: the daemon stops gracefully and train() raises KeyboardInterrupt
    # instead of returning a half-trained model as if the run had ended. The peers string is
    # the config's ("a, b" with a space, this machine's own address in it).
    from .test_processes import free_ports

    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED)
    addrs = [f"127.0.0.1:{p}" for p in free_ports(2)]
    both = f"{addrs[0]}, {addrs[1]}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), addrs[i], both],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        assert procs[0].stderr is not None
        for line in procs[0].stderr:  # until it trains
            if "daemon started" in line:
                break
        procs[0].send_signal(signal.SIGINT)
        err = procs[0].communicate(timeout=60)[1]
        assert procs[0].returncode != 0
        assert "KeyboardInterrupt: train() interrupted" in err, err[-2000:]
        assert "daemon stopped" in err
    finally:
        for p in procs:
            p.kill()
            p.communicate(timeout=30)
