"""Zhang–Choromanska–LeCun: synchronous and asynchronous EASGD, EAMSGD, DOWNPOUR and its
momentum variant MDOWNPOUR — and MixML's asynchronous parameter server, which is MDOWNPOUR
without momentum. One process (``elastic.center``) runs the center, the others are workers.

The theory warning quotes the stability condition (17) of synchronous EASGD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from peerlearn.algorithms.elastic import (
    Variant,
    answered_requests,
    center_requests,
    elastic_center,
    elastic_worker,
    sync_center,
    sync_worker,
)
from peerlearn.algorithms.records._common import first_eta, sentence, start_point, step_size
from peerlearn.algorithms.spec import AlgorithmSpec, Ledger, RejoinState, Resumer
from peerlearn.analysis.easgd_theory import beta_max, stable
from peerlearn.effects import Program, Vector
from peerlearn.ties import below

if TYPE_CHECKING:
    from peerlearn.config import RunConfig
    from peerlearn.problems import Problem
    from peerlearn.problems.base import Constants

__all__ = ["RECORDS"]

CONDITIONS = {"EASGD's condition (17)": "−1 < φ < γ < 1 for every curvature h ≤ L"}

_CENTER = frozenset({"elastic.center", "elastic.alpha", "elastic.beta"})
_PERIOD = frozenset({"elastic.tau"})
_MOMENTUM = frozenset({"elastic.delta"})


def _workers(cfg: RunConfig) -> tuple[int, ...]:
    return tuple(p for p in range(cfg.processes) if p != cfg.center)


def _check(cfg: RunConfig) -> None:
    """α = β/p < 1 (config checks the center itself for every algorithm that has one)."""
    if cfg.elastic_alpha >= 1:
        raise ValueError(
            f"elastic α = β/p = {cfg.elastic_alpha:g} must be < 1 "
            f"(β = {cfg.elastic.beta:g}, p = {cfg.processes - 1})"
        )


def _describe(momentum: bool) -> Callable[[RunConfig], list[str]]:
    def describe(cfg: RunConfig) -> list[str]:
        el = cfg.elastic
        parts = [*step_size(cfg), f"center {el.center}, α={cfg.elastic_alpha:g}, τ={el.tau}"]
        return parts + ([f"δ={el.delta:g}"] if momentum else [])

    return describe


# --- synchronous EASGD -----------------------------------------------------------------------


def _sync_programs(cfg: RunConfig, problem: Problem | None, pids: Sequence[int]) -> list[Program]:
    x1, steps, tau = start_point(problem), cfg.steps, cfg.elastic.tau
    eta, alpha, center = cfg.schedule()(1), cfg.elastic_alpha, cfg.center
    return [
        sync_center(x1, steps, alpha, tau, _workers(cfg))
        if p == center
        else sync_worker(x1, steps, eta, alpha, tau, center)
        for p in pids
    ]


def _sync_resume(
    cfg: RunConfig, problem: Problem | None, pids: Sequence[int], state: RejoinState
) -> list[Program]:
    """Processes that restarted, resumed at iteration ``state.step`` from a live peer's model
    (lockstep: the iteration of the exchange the slowest peer waits in). A worker takes the
    model the center's daemon sends (x̃, or a worker's hosted with the center); a center takes
    a worker's model, which the elastic force pulls together with the others from the next
    exchange on (the center's own x̃ is gone with it)."""
    steps, tau = cfg.steps, cfg.elastic.tau
    eta, alpha, center = cfg.schedule()(1), cfg.elastic_alpha, cfg.center
    model = state.model.copy()
    model.flags.writeable = False
    return [
        sync_center(model, steps, alpha, tau, _workers(cfg), start=state.step)
        if p == center
        else sync_worker(model, steps, eta, alpha, tau, center, start=state.step)
        for p in pids
    ]


def _sync_warnings(cfg: RunConfig, constants: Constants) -> list[str]:
    eta = first_eta(cfg)
    if eta is None or constants.L is None:
        return []
    big_l, p, alpha = constants.L, cfg.processes - 1, cfg.elastic_alpha
    # (17) is easiest for the smallest ηh (β_max falls as ηh grows), so h = L decides it
    if stable(p, eta, alpha, big_l):
        return []
    if below(eta * big_l, 2.0):
        broken = (
            f"β = pα = {p * alpha:g} is not below β_max = {beta_max(p, eta, big_l):g} "
            f"(p = {p}, ηL = {eta * big_l:g}): the center diverges"
        )
    else:
        broken = f"ηL = {eta * big_l:g} is not below 2, where no β is stable"
    return sentence(CONDITIONS, "EASGD's condition (17)", [broken])


# --- the asynchronous variants ---------------------------------------------------------------


def _tau(cfg: RunConfig, variant: Variant) -> int:
    return 1 if variant is Variant.MDOWNPOUR else cfg.elastic.tau


def _async_programs(
    variant: Variant, momentum: bool
) -> Callable[[RunConfig, Problem | None, Sequence[int]], list[Program]]:
    def programs(cfg: RunConfig, problem: Problem | None, pids: Sequence[int]) -> list[Program]:
        x1, steps, center = start_point(problem), cfg.steps, cfg.center
        eta, alpha, tau = cfg.schedule()(1), cfg.elastic_alpha, _tau(cfg, variant)
        delta = cfg.elastic.delta if momentum else 0.0
        out: list[Program] = []
        for p in pids:
            if p == center:
                workers = len(_workers(cfg))
                requests = None if steps is None else workers * center_requests(variant, steps, tau)
                out.append(
                    elastic_center(variant, x1, requests, eta, alpha, delta, workers=_workers(cfg))
                )
            else:
                out.append(elastic_worker(variant, x1, steps, eta, tau, delta, center))
        return out

    return programs


def _check_ledger(variant: Variant, steps: int | None, tau: int, pid: int, lg: Ledger) -> None:
    """A ledger a worker of this run can hold, or ValueError: its last answered request is a
    request iteration (0: none; DOWNPOUR's last is the flush at T + 1) and the one it waits on,
    if any, is its next. The center's count of served requests is built from these."""
    last = None if steps is None else (steps + 1 if variant is Variant.DOWNPOUR else steps)
    step = 1 if variant is Variant.MDOWNPOUR else tau

    def request(t: int) -> bool:
        return (
            t >= 1
            and (last is None or t <= last)
            and ((t - 1) % step == 0 or (variant is Variant.DOWNPOUR and t == last))
        )

    if not (lg.answered == 0 or request(lg.answered)):
        raise ValueError(f"process {pid}'s ledger: {lg.answered} is no request iteration")
    following = 1 if lg.answered == 0 else lg.answered + step
    if variant is Variant.DOWNPOUR and last is not None:
        following = min(following, last)  # the flush
    if lg.waiting is not None and not (lg.waiting == following and request(lg.waiting)):
        raise ValueError(
            f"process {pid}'s ledger: it cannot wait on iteration {lg.waiting} after {lg.answered}"
        )


def _requests_up_to(variant: Variant, steps: int | None, tau: int, t: int) -> int:
    """How many requests of one worker the center has answered once it has answered the one of
    iteration ``t`` (0: none) — DOWNPOUR's flush at T + 1 included."""
    if variant is Variant.DOWNPOUR and steps is not None and t > steps:
        return answered_requests(steps, tau) + 1
    return answered_requests(t, tau)  # (τ = 1 for MDOWNPOUR: every iteration)


def _async_resume(variant: Variant, momentum: bool) -> Resumer:
    """Programs of processes ``pids`` that restarted (docs/algorithms.md, "Restarts and
    rejoin"). A worker whose center lives resumes from the center's model ``state.model`` at
    the iteration after its last answered request (``state.ledgers[pid].answered``), with the
    center's record of its ledger. A center that restarted is rebuilt from its workers'
    ledgers, x̃ = x̃_1 + Σ_i D_i, and first answers the requests they wait on (lost with it);
    a worker restarted together with it starts over from that rebuilt model, unless it resumes
    from its own checkpoint (``state.own``: its model at iteration ``state.step`` and the
    ledger that goes with it — a whole-cluster restart, where the center is rebuilt from the
    checkpointed ledgers). Only the elastic variants (A.1b, A.1c) keep ledgers: DOWNPOUR's
    and MDOWNPOUR's center cannot be rebuilt (their updates are not a sum the workers hold),
    which raises ValueError — it resumes from its own checkpoint only (``state.own``: its
    model and ``state.extra``, the last request it answered per worker, which says what it
    served), and its workers from its model and record."""

    def resume(
        cfg: RunConfig, problem: Problem | None, pids: Sequence[int], state: RejoinState
    ) -> list[Program]:
        x1, steps, center = start_point(problem), cfg.steps, cfg.center
        eta, alpha, tau = cfg.schedule()(1), cfg.elastic_alpha, _tau(cfg, variant)
        delta = cfg.elastic.delta if momentum else 0.0
        elastic = variant in (Variant.ASYNC, Variant.EAMSGD)
        workers = _workers(cfg)
        for pid, lg in state.ledgers.items():
            _check_ledger(variant, steps, tau, pid, lg)
        ledgers = dict(state.ledgers)
        rebuilt: Vector | None = None
        # DOWNPOUR's, MDOWNPOUR's center from its own checkpoint: its model, the requests it had
        # served, the last it answered per worker (its model's key) — not rebuildable otherwise
        restored = state.own and center in pids and not elastic
        if center in pids and not restored:
            # Workers restarted with it start over (below): nothing of theirs is in the
            # rebuilt center, nothing of theirs was served — not a ledger it waits for.
            for p in pids:
                if p != center and p not in ledgers:
                    ledgers[p] = Ledger(0, None, 0 * x1)
            if not elastic:
                raise ValueError(
                    f"the center of {variant.value} cannot be rebuilt from its workers: its "
                    "model is not a sum of what each worker holds"
                )
            rebuilt = x1 + sum((ledgers[w].total for w in sorted(ledgers)), 0 * x1)
            rebuilt.flags.writeable = False
        out: list[Program] = []
        requests = None if steps is None else len(workers) * center_requests(variant, steps, tau)

        def worker_from(start: int, ledger: Vector | None, answered: int | None = None) -> Program:
            """A worker resuming from ``state.model`` (read-only, its own copy)."""
            model = state.model.copy()
            model.flags.writeable = False
            return elastic_worker(
                variant,
                model,
                steps,
                eta,
                tau,
                delta,
                center,
                start=start,
                ledger=ledger,
                answered=answered,
            )

        for p in pids:
            if p == center and restored:
                if len(state.extra) != len(workers) or state.step < 1:
                    raise ValueError(
                        f"a center's state is its served requests and the last it answered for "
                        f"each of its {len(workers)} workers"
                    )
                last = dict(zip(workers, state.extra, strict=True))
                for w, t in last.items():
                    _check_ledger(variant, steps, tau, w, Ledger(t, None, 0 * x1))
                model = state.model.copy()
                model.flags.writeable = False
                out.append(
                    elastic_center(
                        variant,
                        model,
                        requests,
                        eta,
                        alpha,
                        delta,
                        workers=workers,
                        # what its record answered, request by request (not state.step − 1: a
                        # center resumed while its workers ran on served more than it knows)
                        served=sum(_requests_up_to(variant, steps, tau, t) for t in last.values()),
                        answered=last,
                        tau=tau,
                    )
                )
            elif p == center:
                assert rebuilt is not None
                pending = {w: lg.waiting for w, lg in ledgers.items() if lg.waiting is not None}
                answered = {w: max(lg.answered, pending.get(w, 0)) for w, lg in ledgers.items()}
                served = sum(answered_requests(t, tau) for t in answered.values())
                out.append(
                    elastic_center(
                        variant,
                        rebuilt,
                        requests,
                        eta,
                        alpha,
                        delta,
                        workers=workers,
                        served=served,
                        answered=answered,
                        given={w: lg.total for w, lg in ledgers.items()},
                        pending=pending,
                        tau=tau,
                    )
                )
            elif state.own:  # from its own checkpoint: its model, its iteration, its ledger
                own = state.ledgers.get(p)
                if not elastic or own is None or own.waiting is not None:
                    raise ValueError(f"process {p} has no ledger its own model goes with")
                if own.answered >= state.step:
                    raise ValueError(
                        f"process {p}'s ledger: request {own.answered} is not answered before "
                        f"iteration {state.step}"
                    )
                out.append(worker_from(state.step, own.total, own.answered))
            elif rebuilt is not None:  # restarted with the center: starts over from it
                out.append(elastic_worker(variant, rebuilt, steps, eta, tau, delta, center))
            else:  # from the center's model and its record of this worker
                own = state.ledgers.get(p)
                after, total = (own.answered, own.total) if own is not None else (0, None)
                out.append(worker_from(after + 1, total if elastic else None))
        return out

    return resume


def _async_planned(variant: Variant) -> Callable[[RunConfig], int]:
    def planned(cfg: RunConfig) -> int:
        steps, workers = cfg.steps or 0, cfg.processes - 1
        return workers * steps + workers * center_requests(variant, steps, _tau(cfg, variant))

    return planned


def _asynchronous(
    name: str,
    variant: Variant,
    *,
    paper: str,
    exchanges: str,
    parameters: str,
    settings: frozenset[str],
    momentum: bool = False,
    demo_step: float = 1.0,
    waits_for: str = "its answer",
    tolerates: str = "as above",
) -> AlgorithmSpec:
    return AlgorithmSpec(
        name=name,
        paper=paper,
        exchanges=exchanges,
        waits_for=waits_for,
        tolerates=tolerates,
        parameters=parameters,
        programs=_async_programs(variant, momentum),
        resume=_async_resume(variant, momentum),
        settings=_CENTER | settings,
        center=True,
        center_rebuilt=variant in (Variant.ASYNC, Variant.EAMSGD),
        sends_models=False,
        # the workers' requests (snapshot, accumulated update, gradient) and the center's
        # answers (elastic difference, model)
        compressible=frozenset({"req", "rep"}),
        check=_check,
        describe=_describe(momentum),
        planned_iterations=_async_planned(variant),
        demo_step=demo_step,
    )


RECORDS = (
    AlgorithmSpec(
        name="easgd",
        paper="Zhang et al. synchronous EASGD",
        exchanges="workers ⇄ center: x^i_t and x̃_t every τ steps",
        waits_for="the center: all p workers",
        tolerates="no crashes",
        parameters="`[elastic]` α or β = pα, τ",
        programs=_sync_programs,
        resume=_sync_resume,
        lockstep=True,
        settings=_CENTER | _PERIOD,
        center=True,
        compressible=frozenset({"x", "center"}),
        conditions=CONDITIONS,
        check=_check,
        warnings=_sync_warnings,
        describe=_describe(False),
        # the center counts the workers' iterations too (its reports step by τ)
        planned_iterations=lambda cfg: cfg.processes * (cfg.steps or 0),
    ),
    _asynchronous(
        "async_easgd",
        Variant.ASYNC,
        paper="EASGD (async, Alg 1)",
        exchanges="worker's snapshot → center; center answers d = α(x − x̃)",
        parameters="α/β, τ",
        settings=_PERIOD,
        waits_for="the worker: its answer",
        tolerates="crashed workers, not the center",
    ),
    _asynchronous(
        "eamsgd",
        Variant.EAMSGD,
        paper="EAMSGD (Alg 2)",
        exchanges="as `async_easgd`, Nesterov momentum on the worker",
        parameters="α/β, τ, δ",
        settings=_PERIOD | _MOMENTUM,
        momentum=True,
    ),
    _asynchronous(
        "downpour",
        Variant.DOWNPOUR,
        paper="DOWNPOUR (Alg 3)",
        exchanges="accumulated update v → center, x̃ back, every τ steps",
        parameters="τ",
        settings=_PERIOD,
    ),
    _asynchronous(
        "mdownpour",
        Variant.MDOWNPOUR,
        paper="MDOWNPOUR (Alg 4–5)",
        exchanges="gradient → center (Nesterov momentum there), x̃ back",
        parameters="δ",
        settings=_MOMENTUM,
        momentum=True,
        # the center's momentum δ = 0.9 makes the effective step η/(1 − δ)
        demo_step=0.1,
    ),
    _asynchronous(
        "async_ps",
        Variant.MDOWNPOUR,  # δ = 0
        paper="MixML asynchronous parameter server",
        exchanges="gradient → center, x̃ back (MDOWNPOUR with δ = 0)",
        parameters="—",
        settings=frozenset(),
    ),
)
