"""The digits CNN of examples/digits_cnn.py trained by three daemons past the accuracy threshold,
with Alg 1, Alg 2 and DASGD, and with Alg 1 when one daemon is SIGKILLed mid-run (slow: a few
minutes on 2 cores). The threshold is the issue's 0.95 test accuracy; the step counts and
learning rates were measured to clear it with margin (RUNS says what the runs reached)."""

from __future__ import annotations

import io
import os
import signal

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from examples.digits_cnn import problem  # noqa: E402
from peerlearn.testing import local_cluster, poll_status  # noqa: E402

from .test_processes import daemons, steps  # noqa: E402

CNN = "examples.digits_cnn:problem"
THRESHOLD = 0.95
#: algorithm → (iterations of each process, η): in the simulator, over seeds 0–2, the mean
#: model reached 0.971–0.980 (Alg 1 and Alg 2 alike: every value arrives) and 0.976–0.980
#: (DASGD); at 600 iterations Alg 1 ended as low as 0.918
RUNS = {"alg1": (1500, 0.1), "alg2": (1500, 0.1), "dasgd": (800, 0.05)}
#: Alg 2's agreement, short (as tests/test_processes.py runs it): the default's R rounds per
#: iteration for this dimension would take the daemons hours
SHORT_MAA = {"rounds": 3, "inner_rounds": 2}

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("algorithm", list(RUNS))
async def test_three_daemons_train_the_digits_cnn_past_the_threshold(algorithm: str) -> None:
    iterations, eta = RUNS[algorithm]
    async with local_cluster(
        3,
        workers=1,
        algorithm=algorithm,
        steps=iterations,
        lr={"eta": eta},
        problem={"name": CNN},
        **({"maa": SHORT_MAA} if algorithm == "alg2" else {}),
    ) as c:
        await c.wait_until_finished(600)
        models = [w.x for d in c.daemons for w in d.workers if w.live and w.x is not None]
        assert len(models) == 3
    accuracy = problem().evaluate(np.mean(models, axis=0))["test_accuracy"]
    assert accuracy >= THRESHOLD


async def test_alg1_clears_the_threshold_with_a_daemon_sigkilled_mid_run() -> None:
    iterations, eta = RUNS["alg1"]
    with daemons(
        3,
        *("--workers", "1", "--algorithm", "alg1", "--problem", CNN),
        *("--steps", str(iterations), "--lr", str(eta)),
    ) as (procs, urls):
        await poll_status(urls[2], lambda s: steps(s) >= iterations // 3, timeout=120)
        os.kill(procs[2].pid, signal.SIGKILL)  # f = 1: the other two go on
        procs[2].wait(30)
        models = []
        async with httpx.AsyncClient(timeout=30) as client:
            for url in urls[:2]:
                status = await poll_status(url, lambda s: s["state"] == "finished", timeout=300)
                (worker,) = status["workers"]
                answer = await client.get(f"{url}/model", params={"worker": worker["id"]})
                models.append(np.load(io.BytesIO(answer.content)))
    accuracy = problem().evaluate(np.mean(models, axis=0))["test_accuracy"]
    assert accuracy >= THRESHOLD
