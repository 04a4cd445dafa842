"""Tosi–Theobald's two-node slowdown (Section 5) on real daemons: two daemons on 127.0.0.1 in
this process, one worker each, DASGD over TCP; one daemon's gradients take x times as long
(``compute_delay``, a sleep after each gradient, as the paper's extra 0.05 s per gradient).

Timing on a shared machine is not the simulator's: the runs are repeated and the later node's
local steps to ε are taken as a ratio to serial gradient descent's, beside the staleness the
run had (its S_max against the simulator's x + 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peerlearn.effects import Report
from peerlearn.problems import Problem, make_problem
from peerlearn.reproduce.claims import Check, Claim, Interval, Outcome
from peerlearn.reproduce.dasgd import EPSILON, ETA, PAPER, QUADRATIC, WINDOW, serial_iterations
from peerlearn.reproduce.report import new_figure, save_figure
from peerlearn.runtime.worker import Worker

__all__ = ["dasgd_daemons"]


@dataclass
class _Log:
    """What one worker's reports show until its node reached ε: its local steps, the first at
    which the mean ‖∇f‖ of the last ``WINDOW`` models is ≤ ε, and the largest staleness of a
    gradient it applied."""

    steps: int = 0
    hit: int | None = None
    s_max: int = 0
    last: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))


@dataclass(frozen=True)
class _Run:
    """One two-daemon run: the later node's local steps to ε, the largest staleness either
    node applied before reaching ε, and each daemon's measured seconds per gradient."""

    hit: int
    s_max: int
    per_gradient: tuple[float, float]  # the fast daemon's, the slowed one's


def _recording(
    problem: Problem, logs: list[_Log], epsilon: float, wake: Callable[[], None]
) -> type[Worker]:
    """A worker class that keeps a :class:`_Log` of its reports (on its own thread, before the
    daemon sees them); ``wake()`` is called once its node has reached ε."""
    lock = threading.Lock()

    class Recording(Worker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            log = _Log()
            with lock:
                logs.append(log)
            # the constructor's report hook, wrapped: Worker has no other way in for a reader
            inner = self._on_report

            def on_report(worker: Worker, rep: Report) -> None:
                if log.hit is None:
                    if rep.name == "model":
                        log.last.append(float(np.linalg.norm(problem.full_grad(rep.value))))
                        if len(log.last) == WINDOW and sum(log.last) / WINDOW <= epsilon:
                            log.hit = log.steps
                            wake()
                        log.steps += 1
                    elif rep.name == "staleness":
                        log.s_max = max(log.s_max, int(rep.value))
                if inner is not None:
                    inner(worker, rep)

            self._on_report = on_report

    return Recording


async def _two_daemons(x: int, delay: float, eta: float, epsilon: float, timeout: float) -> _Run:
    """Two daemons, the second's gradients ×``x`` slower, until both nodes reach ε. A worker
    that ends before (crashed, diverged) or a run past ``timeout`` seconds is a RuntimeError
    that says where each node was."""
    from peerlearn.testing import local_cluster

    params = dict(QUADRATIC)
    problem = make_problem(params.pop("name"), **params)
    logs: list[_Log] = []
    progress = asyncio.Event()
    loop = asyncio.get_running_loop()

    def wake() -> None:  # on a worker's thread
        # a closed loop (RuntimeError): the run is over, nobody waits
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(progress.set)

    def watch(w: Worker) -> None:
        w.done.wait()
        wake()

    factory = _recording(problem, logs, epsilon, wake)
    async with local_cluster(
        2,
        workers=1,
        algorithm="dasgd",
        problem=QUADRATIC,
        lr={"eta": eta},
        steps=None,
        worker_factory=lambda i: factory,
        each=lambda i: {"compute_delay": delay * (x if i == 1 else 1)},
    ) as cluster:
        workers = [w for d in cluster.daemons for w in d.workers]
        for w in workers:  # a worker that ends wakes the wait below too
            threading.Thread(target=watch, args=(w,), daemon=True).start()

        def where() -> str:
            nodes = ", ".join(
                f"{w.name}: {log.steps} steps, ε {'at ' + str(log.hit) if log.hit else 'not yet'}"
                + (f", {w.error or w.diverged}" if w.error or w.diverged else "")
                for w, log in zip(workers, logs, strict=False)
            )
            return f"×{x}: {nodes}"

        try:
            async with asyncio.timeout(timeout):
                while True:
                    progress.clear()
                    if len(logs) == 2 and all(log.hit is not None for log in logs):
                        break
                    if any(w.done.is_set() for w in workers):
                        raise RuntimeError(f"a worker ended before ε — {where()}")
                    await progress.wait()
        except TimeoutError:
            raise RuntimeError(f"ε not reached within {timeout:.0f} s — {where()}") from None
        per_gradient = tuple(w.grad_seconds / max(w.grads, 1) for w in workers)
    return _Run(
        max(log.hit for log in logs if log.hit is not None),
        max(log.s_max for log in logs),
        (per_gradient[0], per_gradient[1]),
    )


def dasgd_daemons(quick: bool, figures: Path, say: Callable[[str], None]) -> Outcome:
    """Section 5's two nodes, one x times slower, on real daemons: local steps to ε against
    serial gradient descent's, and the staleness measured."""
    import uvloop

    slowdowns: tuple[int, ...]
    if quick:
        eta, epsilon, delay, slowdowns, repeats = 0.01, 1e-6, 0.001, (1, 10), 1
    else:
        eta, epsilon, delay, slowdowns, repeats = ETA, EPSILON, 0.002, (1, 10, 50), 3
    serial = serial_iterations(QUADRATIC, eta, epsilon)
    claim = Claim(
        PAPER,
        "Section 5 (Fig. 2a)",
        "no significant impact of Ŝ_max on the number of iterations necessary to reach ε "
        "(two nodes, one x times slower)",
    )
    ratios: dict[int, list[float]] = {x: [] for x in slowdowns}
    s_max: dict[int, list[int]] = {x: [] for x in slowdowns}
    pace: dict[int, list[float]] = {x: [] for x in slowdowns}  # slowed/fast seconds a gradient
    # ε comes after about serial's local steps, and the fast daemon computes at most one of
    # them at a time: five times that, and a minute to start and stop
    budget = 60.0 + 5 * serial * delay
    for x in slowdowns:
        for r in range(repeats):
            say(
                f"two daemons, one ×{x} ({delay * 1e3:g} ms a gradient, the other "
                f"{x * delay * 1e3:g} ms), run {r + 1} of {repeats}"
            )
            run = uvloop.run(_two_daemons(x, delay, eta, epsilon, budget))
            ratios[x].append(run.hit / serial)
            s_max[x].append(run.s_max)
            pace[x].append(run.per_gradient[1] / run.per_gradient[0])
    checks: list[Check] = []
    ratio = {x: Interval.over(v, unit="runs") for x, v in ratios.items()}
    for x in slowdowns:
        checks.append(
            Check(
                f"daemons: local steps to ε / serial gradient descent's, slowdown ×{x}",
                ratio[x],
                claim,
                "none",
                note=f"S_max {', '.join(map(str, s_max[x]))} (the simulator's: {x + 2}); "
                f"seconds a gradient, slowed/fast: {', '.join(f'{v:.1f}' for v in pace[x])}; "
                f"serial {serial}",
            )
        )
    fig, (ax, bx) = new_figure(2)
    xs = list(slowdowns)
    ax.errorbar(
        xs,
        [ratio[x].mean for x in xs],
        yerr=[
            [ratio[x].mean - ratio[x].low for x in xs],
            [ratio[x].high - ratio[x].mean for x in xs],
        ],
        fmt="o-",
        capsize=3,
        label=f"two daemons, the later node ({repeats} run{'s' if repeats > 1 else ''} each)",
    )
    ax.axhline(1.0, color="gray", ls="--", label="serial gradient descent")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.5)
    ax.set_xlabel("slowdown x of one daemon")
    ax.set_ylabel("local steps to ε / serial gradient descent's")
    ax.set_title(f"DASGD on two daemons, the quadratic (η = {eta}, ε = {epsilon:g})", fontsize=10)
    ax.legend(fontsize=8)
    bx.plot(xs, [max(s_max[x]) for x in xs], "o-", label="S_max measured (largest of the runs)")
    bx.plot(xs, [x + 2 for x in xs], "--", color="gray", label="the simulator's x + 2")
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("slowdown x of one daemon")
    bx.set_title("staleness on the daemons", fontsize=10)
    bx.legend(fontsize=8)
    shown = [save_figure(fig, figures, "dasgd-daemons")]
    most = {x: max(v) for x, v in s_max.items()}
    return Outcome(
        name="dasgd-daemons",
        title="DASGD on real daemons: iterations to ε as one of two slows down (Section 5)",
        paper=PAPER,
        setup=(
            "Two `peerlearn` daemons on 127.0.0.1 in one process, one worker each, DASGD over "
            "TCP on the quadratic of `dasgd-slowdown` (d = 10, μ = 1, L = 4, σ = 0), "
            f"η = {eta}, ε = {epsilon:g}"
            + (" (the paper's are 0.002 and 1e-12, the full run's)" if quick else "")
            + f". Each gradient is followed by a sleep of {delay * 1e3:g} ms on one daemon and "
            f"x times that on the other (`compute_delay`, as the paper's extra 0.05 s a "
            "gradient: computing must cost far more than applying); the run stops once both "
            f"nodes have reached ε (the mean ‖∇f‖ of their last {WINDOW} models). Slowdowns "
            f"×{', ×'.join(map(str, slowdowns))}, {repeats} run{'s' if repeats > 1 else ''} "
            "each: real timing varies from run to run, the simulator's does not."
        ),
        checks=tuple(checks),
        figures=tuple(shown),
        findings=_findings(ratio, most, {x: float(np.mean(v)) for x, v in pace.items()}),
    )


def _findings(ratio: dict[int, Interval], most: dict[int, int], pace: dict[int, float]) -> str:
    """What the daemon runs show, each sentence as the measurements have it."""
    means = [r.mean for r in ratio.values()]
    spread = max(means) / min(means) - 1
    text = (
        "**What the numbers say.** On real daemons the later node's local steps to ε, as a "
        "multiple of serial gradient descent's, are "
        + ", ".join(f"{r.mean:.3f} at ×{x}" for x, r in ratio.items())
        + f": {spread:.2%} apart from the least to the most slowed"
        + (
            " — as the paper reports, staleness leaves them where they were. "
            if spread <= 0.05
            else " — the slowdown shows, unlike the paper's report. "
        )
        + "The staleness before ε: S_max "
        + ", ".join(f"{s} at ×{x}" for x, s in most.items())
        + " against the simulator's "
        + ", ".join(str(x + 2) for x in most)
        + "; the slowed daemon took "
        + ", ".join(f"{v:.1f}×" for v in pace.values())
        + " the other's time a gradient (the sleep, and each gradient's own cost on top)"
    )
    over = [x for x, s in most.items() if s > x + 2]
    if over:
        text += (
            ". Above the simulator's at ×"
            + ", ×".join(map(str, over))
            + ": its timing is constant, a real machine's is not — a sleep may overrun, the "
            "two daemons' threads share one process — so one node may compute several "
            "gradients while the other's are on their way."
        )
    else:
        text += "."
    return text + " The paper states it qualitatively: these rows carry no verdict."
