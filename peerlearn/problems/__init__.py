"""Objectives with stochastic gradient oracles, and the registry that builds them by name.

=====================  ======================================  ==================================
name                   class                                   use
=====================  ======================================  ==================================
``quadratic``          :class:`NoisyQuadratic`                 Alg 1 / Theorem 1 (exact L, μ, x*)
``logistic``           :class:`LogisticRegression`             Alg 1 on real data (breast cancer)
``softmax``            :class:`SoftmaxRegression`              Alg 1 on real data (digits)
``mlp``                :class:`MLP`                            Alg 2 on real data (digits)
``double_well``        :class:`DoubleWell`                     Theorem 5 partition demo
``nonconvex``          :class:`SmoothNonConvex`                Alg 2 / Theorems 3–4, Lemma 21
``gaussian_logistic``  :class:`GaussianLogistic`               DASGD Section 5 (Fig. 2b)
=====================  ======================================  ==================================

:func:`make_problem` also accepts ``"package.module:callable"`` so experiments can plug in their
own :class:`Problem` without editing this registry.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable

from peerlearn.errors import ProblemError
from peerlearn.problems.base import Constants, Problem, in_dtype
from peerlearn.problems.digits import MLP, SoftmaxRegression
from peerlearn.problems.logistic import LogisticRegression
from peerlearn.problems.nonconvex import DoubleWell, SmoothNonConvex
from peerlearn.problems.quadratic import NoisyQuadratic
from peerlearn.problems.synthetic import GaussianLogistic

__all__ = [
    "MLP",
    "PROBLEMS",
    "PROBLEM_NAMES",
    "Constants",
    "DoubleWell",
    "GaussianLogistic",
    "LogisticRegression",
    "NoisyQuadratic",
    "Problem",
    "SmoothNonConvex",
    "SoftmaxRegression",
    "in_dtype",
    "make_problem",
]

#: registry: config name → problem class (each class's ``name`` is its key)
PROBLEMS: dict[str, type[Problem]] = {
    cls.name: cls
    for cls in (
        NoisyQuadratic,
        LogisticRegression,
        SoftmaxRegression,
        MLP,
        DoubleWell,
        SmoothNonConvex,
        GaussianLogistic,
    )
}

#: the registered names, in table order
PROBLEM_NAMES: tuple[str, ...] = tuple(PROBLEMS)


def make_problem(name: str, **params: object) -> Problem:
    """Build the problem called ``name`` (a registry name or ``"module:callable"``).

    Every failure a user can cause — unknown name, unknown or missing keyword, bad value,
    unimportable module, a callable that does not return a :class:`Problem` — raises
    :class:`ProblemError` with a message that says what would have been valid.
    """
    if ":" in name:
        factory = _import_factory(name)
    else:
        try:
            factory = PROBLEMS[name]
        except KeyError:
            raise ProblemError(
                f"unknown problem {name!r}; valid names: {', '.join(PROBLEM_NAMES)} "
                "(or 'package.module:callable')"
            ) from None
    _check_params(name, factory, params)
    problem = factory(**params)
    if not isinstance(problem, Problem):
        raise ProblemError(
            f"problem {name!r} returned {type(problem).__name__}, not a peerlearn Problem"
        )
    return problem


def _import_factory(spec: str) -> Callable[..., object]:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ProblemError(f"problem {spec!r}: expected 'package.module:callable'")
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was deleted under us: nothing to look in there
        cwd = None
    if cwd is not None and cwd not in sys.path and "" not in sys.path:
        # As `python -m` would: the user's own modules beside them (the console script's
        # sys.path[0] is its own bin/ directory). uvicorn's --app-dir does the same.
        sys.path.insert(0, cwd)
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProblemError(
            f"problem {spec!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ProblemError(
                f"problem {spec!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(obj):
        raise ProblemError(f"problem {spec!r}: {attr_path!r} is not callable")
    return obj


def _check_params(name: str, factory: Callable[..., object], params: dict[str, object]) -> None:
    """Reject keywords the factory does not take, listing the ones it does."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        signature.bind(**params)
    except TypeError as exc:
        valid = [
            f"{p.name}={p.default!r}" if p.default is not p.empty else p.name
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        raise ProblemError(
            f"problem {name!r}: {exc}; valid parameters: {', '.join(valid) or '(none)'}"
        ) from None
