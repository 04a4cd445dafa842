"""DASGD node programs stepped by hand, and the staleness module on hand-made and random logs.

A small driver (:func:`_drive`) runs the :func:`~peerlearn.algorithms.dasgd.dasgd` programs of
a graph without the simulator: Post puts letters in flight, a seeded scheduler interleaves
program steps with deliveries in any order (links reorder freely), Grad returns small integers
so that every sum is exact. It records every effect, so the tests can check what the programs
post and report, not only where they end: each gradient and DONE is posted at most once per
node (own post or one relay), nodes without samples still announce DONE and finish, and the
``"model"``/``"compute"``/``"staleness"`` reports are numbered as the staleness module expects.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.algorithms.dasgd import dasgd
from peerlearn.algorithms.staleness import (
    ApplyLog,
    apply_log,
    loose_staleness,
    loose_staleness_reference,
    tight_from_vectors,
    version_vectors,
)
from peerlearn.effects import Grad, Letter, Post, Receive, Report, Vector
from tests.helpers import exact

ETA = 0.5
X0: Vector = np.array([1.0, -2.0])

#: small topologies; DIAMOND gives node 3 two copies of each of node 0's gradients (via 1 and
#: via 2) and a third neighbour, 4, that only node 3 relays to
COMPLETE3 = ((1, 2), (0, 2), (0, 1))
PATH4 = ((1,), (0, 2), (1, 3), (2,))
RING5 = ((1, 4), (0, 2), (1, 3), (2, 4), (3, 0))
STAR4 = ((1, 2, 3), (0,), (0,), (0,))
DIAMOND = ((1, 2), (0, 3), (0, 3), (1, 2, 4), (3,))
GRAPHS = (COMPLETE3, PATH4, RING5, STAR4, DIAMOND)


def _grad(pid: int, seq: int) -> Vector:
    """Node pid's gradient number seq: small integers, so any order of summing is exact."""
    return np.array([pid + 1.0, seq - 1.0])


@dataclass
class _Node:
    pid: int
    posts: list[Post] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)
    inbox: list[Letter] = field(default_factory=list)
    computed: int = 0
    waiting: bool = False  # in a blocking Receive on an empty inbox
    result: Vector | None = None


def _drive(
    graph: tuple[tuple[int, ...], ...], samples: Sequence[int], rng: random.Random
) -> list[_Node]:
    """Run one dasgd program per node to the end; fails on a deadlock or a livelock."""
    n = len(graph)
    nodes = [_Node(p) for p in range(n)]
    programs = [exact(dasgd(p, X0, ETA, samples[p], graph)) for p in range(n)]
    sendval: list[Any] = [None] * n
    flight: list[tuple[int, Letter]] = []  # (receiver, letter)
    for _ in range(200_000):
        runnable = [
            p
            for p in range(n)
            if nodes[p].result is None and not (nodes[p].waiting and not nodes[p].inbox)
        ]
        if not runnable and not flight:
            assert all(node.result is not None for node in nodes), "deadlock"
            return nodes
        if flight and (not runnable or rng.random() < 0.5):
            to, letter = flight.pop(rng.randrange(len(flight)))
            nodes[to].inbox.append(letter)
            continue
        p = rng.choice(runnable)
        node = nodes[p]
        if node.waiting:  # a letter came: the blocking Receive returns
            node.waiting = False
            sendval[p] = tuple(node.inbox)
            node.inbox.clear()
        try:
            eff = programs[p].send(sendval[p])
        except StopIteration as stop:
            node.result = stop.value
            continue
        sendval[p] = None
        match eff:
            case Post():
                node.posts.append(eff)
                flight += [(k, Letter(eff.tag, p, eff.value)) for k in eff.to]
            case Report():
                node.reports.append(eff)
            case Grad():
                sendval[p] = _grad(p, node.computed)
                node.computed += 1
            case Receive(block=True) if not node.inbox:
                node.waiting = True
            case Receive():
                sendval[p] = tuple(node.inbox)
                node.inbox.clear()
            case _:
                raise AssertionError(f"unexpected effect {eff!r}")
    raise AssertionError("no end after 200000 scheduler steps")


def _check_run(graph: tuple[tuple[int, ...], ...], samples: Sequence[int], seed: int) -> None:
    """Everything a run of the programs must satisfy, whatever the schedule."""
    n = len(graph)
    nodes = _drive(graph, samples, random.Random(seed))
    everything = sorted((j, c) for j in range(n) for c in range(samples[j]))
    expected = X0 - ETA * sum((_grad(j, c) for j, c in everything), np.zeros_like(X0))
    for node in nodes:
        assert node.result is not None and np.array_equal(node.result, expected)
        assert node.computed == samples[node.pid]
        # each gradient and each DONE leaves a node at most once: its own post or one relay
        tags = [post.tag[:3] for post in node.posts]
        assert len(tags) == len(set(tags)), tags
        for post in node.posts:
            assert set(post.to) <= set(graph[node.pid]) and post.to
            if post.tag[0] in ("done", "complete"):
                # DONE carries the origin's count; COMPLETE (applied everything) nothing
                count = samples[post.tag[1]] if post.tag[0] == "done" else 0
                assert post.tag[2] == count
                assert isinstance(post.value, np.ndarray) and post.value.shape == X0.shape
                assert not post.value.any() and not post.value.flags.writeable
            else:
                assert post.tag[0] == "dg"
        if graph[node.pid]:  # every node announces its own DONE, also with no samples at all,
            assert ("done", node.pid, samples[node.pid]) in tags  # and that it is complete
            assert ("complete", node.pid, 0) in tags
        models = [r for r in node.reports if r.name == "model"]
        steps = [r.step for r in node.reports if r.name == "staleness"]
        assert steps == list(range(1, len(everything) + 1))
        assert [r.step for r in models] == list(range(1, len(everything) + 2))
        assert np.array_equal(models[0].value, X0) and np.array_equal(models[-1].value, expected)
        applied_at = {tuple(r.key): r.step for r in node.reports if r.name == "staleness"}
        assert sorted(applied_at) == everything
        for r in node.reports:
            if r.name == "compute":  # an own gradient is applied at the step it is computed for
                assert r.key[0] == node.pid and applied_at[tuple(r.key)] == r.step
    log = apply_log((node.pid, r) for node in nodes for r in node.reports)
    reported = {
        node.pid: [r.value for r in node.reports if r.name == "staleness"] for node in nodes
    }
    assert tight_from_vectors(log) == {i: sizes for i, sizes in reported.items() if sizes}


@settings(max_examples=40, deadline=None)
@given(
    graph=st.sampled_from(GRAPHS),
    samples=st.lists(st.integers(0, 3), min_size=5, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_programs_on_any_schedule(
    graph: tuple[tuple[int, ...], ...], samples: list[int], seed: int
) -> None:
    """Any interleaving and delivery order, any sample counts (0 included), sparse graphs:
    every node ends with x⁰ − η Σ all gradients, applies each once, relays each at most once."""
    _check_run(graph, samples[: len(graph)], seed)


@pytest.mark.parametrize("seed", range(3))
def test_duplicate_copies_are_not_relayed_again(seed: int) -> None:
    """Node 3 of DIAMOND gets every gradient of node 0 twice (through 1 and through 2) and
    relays the first copy to 4; the second copy must be dropped, not relayed once more."""
    _check_run(DIAMOND, [3, 1, 0, 2, 1], seed)
    nodes = _drive(DIAMOND, [3, 0, 0, 0, 0], random.Random(seed))
    relayed = [post for post in nodes[3].posts if post.tag[0] == "dg"]
    assert sorted(post.tag[:3] for post in relayed) == [("dg", 0, c) for c in range(3)]
    assert all(post.to == (4,) for post in relayed)


@pytest.mark.parametrize("graph", [COMPLETE3, PATH4])
def test_nodes_without_samples_announce_done_and_finish(graph: tuple[tuple[int, ...], ...]) -> None:
    """samples = 0: a node posts ("done", me, 0) at once and ends when all else is applied;
    samples = 1: its DONE carries 1."""
    for seed in range(3):
        _check_run(graph, [0, 1, 2, 0][: len(graph)], seed)
    nodes = _drive(graph, [0] * len(graph), random.Random(0))
    for node in nodes:
        assert node.posts[0] == Post(graph[node.pid], ("done", node.pid, 0), node.posts[0].value)
        # the model x⁰, nothing else — besides what it learns of the others' DONEs and
        # COMPLETEs (its state), which it ends with: everybody complete
        assert [r.step for r in node.reports if r.name == "model"] == [1]
        assert node.reports[-1].name == "state"
        assert node.reports[-1].key[-len(graph) :] == (1,) * len(graph)


def test_single_node_without_neighbours() -> None:
    nodes = _drive(((),), [2], random.Random(0))
    assert nodes[0].posts == []
    assert [(r.name, r.step) for r in nodes[0].reports] == [
        ("model", 1),
        ("compute", 1),
        ("staleness", 1),
        ("model", 2),
        ("compute", 2),
        ("staleness", 2),
        ("model", 3),
        ("state", 3),  # what it ends with: complete
    ]


# --- the staleness module -------------------------------------------------------------------------


def _log(
    computes: Mapping[tuple[int, int], tuple[int, ...]], applies: dict[int, list[tuple[int, int]]]
) -> list[tuple[int, Report]]:
    out = [(j, Report("compute", vec, key=(j, c))) for (j, c), vec in computes.items()]
    for node, rows in applies.items():
        out += [
            (node, Report("staleness", 0, step=t, key=gid)) for t, gid in enumerate(rows, start=1)
        ]
    return out


def test_loose_staleness_fixpoint_needs_a_second_pass() -> None:
    """Five nodes: g4 = (4, 0) on ∅; node 0 applies g4 and computes g0 on {g4}; node 1 applies
    g0 (not g4) and computes g1 on {g0}; node 2 applies g1 and computes g2 on {g1}; node 3,
    empty, applies g2. Eq. 8: Ŝ = {g1} ∪ Ŝ(g1) = {g1, g0} ∪ Ŝ(g0) = {g1, g0, g4}: |Ŝ| = 3, S = 1.
    The componentwise max first raises origin 0 while looking at origin 1 — a lower index, so
    finding g4 takes a second pass over the origins."""
    computes = {
        (4, 0): (0, 0, 0, 0, 0),
        (0, 0): (0, 0, 0, 0, 1),
        (1, 0): (1, 0, 0, 0, 0),
        (2, 0): (0, 1, 0, 0, 0),
    }
    log = apply_log(_log(computes, {3: [(2, 0)]}))
    assert tight_from_vectors(log) == {3: [1]}
    assert loose_staleness(log).sizes == {3: [3]} == loose_staleness_reference(log)


@st.composite
def _causal_logs(draw: st.DrawFn) -> ApplyLog:
    """A log as DASGD makes one: a node applies its own gradient at once, the others' in
    per-origin order once they exist; the compute vector is the state the gradient came from."""
    n = draw(st.integers(2, 6))
    state = [[0] * n for _ in range(n)]
    steps = [0] * n
    computes: dict[tuple[int, int], tuple[int, ...]] = {}
    reports: list[tuple[int, Report]] = []
    for _ in range(draw(st.integers(1, 30))):
        i = draw(st.integers(0, n - 1))
        known = [j for j in range(n) if j != i and (j, state[i][j]) in computes]
        remote = draw(st.booleans())
        if known and remote:
            j = draw(st.sampled_from(known))
            gid = (j, state[i][j])
        else:
            gid = (i, state[i][i])
            computes[gid] = tuple(state[i])
            reports.append((i, Report("compute", tuple(state[i]), key=gid)))
        steps[i] += 1
        size = sum(abs(a - b) for a, b in zip(state[i], computes[gid], strict=True))
        reports.append((i, Report("staleness", size, step=steps[i], key=gid)))
        state[i][gid[0]] += 1
    return apply_log(reports)


@settings(max_examples=150, deadline=None)
@given(_causal_logs())
def test_loose_staleness_equals_eq8_on_causal_logs(log: ApplyLog) -> None:
    loose = loose_staleness(log)
    assert loose.sizes == loose_staleness_reference(log)
    assert tight_from_vectors(log) == {
        i: [row.size for row in rows] for i, rows in log.applies.items()
    }


def test_apply_log_sizes_and_unknown_nodes() -> None:
    """n covers every node and origin named; no reports at all: n = 0; a node without steps
    has no version vectors."""
    assert apply_log([]) == ApplyLog(0, {}, {})
    assert apply_log([(0, Report("other", 1.0, step=1))]).n == 0
    only_applies = apply_log([(0, Report("staleness", 0, step=1, key=(1, 0)))])
    assert only_applies.n == 2 and version_vectors(only_applies, 0) == [(0, 0)]
    late_node = apply_log([(2, Report("staleness", 0, step=1, key=(0, 0)))])
    assert late_node.n == 3 and version_vectors(late_node, 2) == [(0, 0, 0)]
    assert version_vectors(late_node, 1) == [] and version_vectors(late_node, 7) == []


def test_apply_log_error_messages() -> None:
    with pytest.raises(ValueError, match=r"node 1: step 2 follows 0 steps"):
        apply_log([(1, Report("staleness", 0, step=2, key=(0, 0)))])
    with pytest.raises(ValueError, match=r"node 1 reported computing gradient \(0, 0\)"):
        apply_log([(1, Report("compute", (0, 0), key=(0, 0)))])
    twice = [(0, Report("compute", (0, 0), key=(0, 0)))] * 2
    with pytest.raises(ValueError, match=r"gradient \(0, 0\) computed twice"):
        apply_log(twice)
    short = [(0, Report("compute", (0,), key=(0, 0))), (1, Report("compute", (0, 0), key=(1, 0)))]
    with pytest.raises(ValueError, match=r"compute vectors of length 1, but 2 nodes"):
        apply_log(short)
