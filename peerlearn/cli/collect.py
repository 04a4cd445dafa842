"""``peerlearn collect``: the one model a user takes home from a decentralized run.

Fetches every worker's model from each daemon's control API (``GET /status`` names the
workers, ``GET /model?worker=ID`` gives each model as ``.npy`` bytes), and writes their mean
— with each model beside it — to one ``.npz``, saying how far apart the models were: the
consensus distance (1/n) Σ ‖x_i − x̄‖², the same figure as the daemons' metric. Crashed and
diverged workers are left out of the mean, as the daemons' own mean leaves them out.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer

from peerlearn.console import escape, fail, out, warn
from peerlearn.effects import Vector, quiet_float_errors
from peerlearn.errors import ConfigError

__all__ = ["collect"]

#: worker states whose model does not count (the daemons' mean leaves them out too)
_FAILED = frozenset({"crashed", "diverged"})


def _models(client: httpx.Client, api: str) -> tuple[str, list[tuple[str, str, Vector]]]:
    """The daemon's state, and (worker id, state, model) of each of its workers that has a
    model (one without is said)."""
    status = client.get(f"http://{api}/status")
    status.raise_for_status()
    view = status.json()
    got: list[tuple[str, str, Vector]] = []
    for worker in view["workers"]:
        wid, state = str(worker["id"]), str(worker["state"])
        answer = client.get(f"http://{api}/model", params={"worker": wid})
        if answer.status_code == 404:
            warn(f"daemon {api}: worker {wid} has no model yet: left out")
            continue
        answer.raise_for_status()
        x = np.load(io.BytesIO(answer.content), allow_pickle=False)
        if x.dtype not in (np.float32, np.float64):
            raise fail(f"daemon {api}: worker {wid}'s model is {x.dtype}, not a float vector")
        got.append((wid, state, x.ravel()))
    return str(view["state"]), got


def collect(
    api: Annotated[
        str,
        typer.Option(
            "--api",
            help="The daemons' control APIs, HOST:PORT[,HOST:PORT…] (their --api addresses).",
            show_default=False,
        ),
    ],
    out_file: Annotated[
        Path,
        typer.Option(
            "--out",
            help="The .npz file to write: mean (of the live workers' models), "
            "consensus_distance, and worker_<id> for each worker.",
        ),
    ] = Path("model.npz"),
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for each daemon's answer.", min=0.1)
    ] = 10.0,
) -> None:
    """Fetch every daemon's models and write their mean: the model to take home.

    Crashed and diverged workers are left out of the mean. A daemon not reached: exit 2."""
    from peerlearn.daemon.config import parse_address
    from peerlearn.daemon.output import write_npz
    from peerlearn.sim.runner import consensus_distance

    apis = list(dict.fromkeys(a.strip() for a in api.split(",") if a.strip()))
    try:
        for a in apis:
            parse_address(a)
    except ConfigError as exc:
        raise fail(f"--api: {exc}") from None
    if not apis:
        raise fail("--api: no address given")
    models: dict[str, tuple[str, Vector]] = {}
    running: list[str] = []
    with httpx.Client(timeout=timeout) as client:
        for a in apis:
            try:
                state, got = _models(client, a)
            except httpx.HTTPError as exc:
                raise fail(f"daemon {a}: {type(exc).__name__}: {exc}") from None
            except (KeyError, TypeError, ValueError, EOFError, OSError) as exc:
                raise fail(f"daemon {a}: not a peerlearn control API ({exc})") from None
            if state != "finished":
                running.append(a)
            if not got:
                warn(f"daemon {a}: no worker has a model yet")
            for wid, state, x in got:
                if wid in models:
                    warn(
                        f"worker {wid} came from two daemons (an address listed twice?): kept once"
                    )
                    continue
                models[wid] = (state, x)
    live = {wid: x for wid, (state, x) in models.items() if state not in _FAILED}
    dims = {x.shape for x in live.values()}
    if not live:
        raise fail("no live worker has a model: nothing to average")
    if len(dims) > 1:
        raise fail(f"the models differ in shape {sorted(dims)}: daemons of different runs?")
    xs = list(live.values())
    with quiet_float_errors():
        # averaged in float64, written in the models' dtype
        mean = np.mean(np.stack(xs), axis=0, dtype=np.float64).astype(np.result_type(*xs))
        spread = consensus_distance(xs)
    arrays = {
        "mean": mean,
        "consensus_distance": np.float64(spread),
        **{f"worker_{wid}": x for wid, (_, x) in models.items()},
    }
    if running:
        warn(
            f"daemon(s) {', '.join(running)} had not finished: their models were fetched one "
            "after another, each as it was then"
        )
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        write_npz(out_file, arrays)
    except OSError as exc:
        raise fail(f"cannot write {out_file}: {exc.strerror or exc}") from None
    left_out = sorted(set(models) - set(live))
    note = f"; left out (crashed or diverged): {', '.join(left_out)}" if left_out else ""
    out.print(
        escape(
            f"wrote {out_file}: the mean of {len(live)} models from {len(apis)} daemon(s) "
            f"(dim {mean.size}); consensus distance (1/n)Σ‖x_i − x̄‖² = {spread:.6g}{note}"
        ),
        highlight=False,
    )
