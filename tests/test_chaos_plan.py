"""bench.chaos's pure parts: the faults a seed draws, and which detections were false."""

from __future__ import annotations

from snapstore.bench.chaos import KIND_WEIGHTS, WORLD, draw_faults, false_detections
from snapstore.bench.training import Failure


def test_a_seed_draws_the_same_faults_and_every_kind_appears() -> None:
    a, b = draw_faults(200, seed=7), draw_faults(200, seed=7)
    assert [(f.kind, f.at_step, f.rank, f.seconds) for f in a] == [
        (f.kind, f.at_step, f.rank, f.seconds) for f in b
    ]
    assert [f.kind for f in draw_faults(200, seed=8)] != [f.kind for f in a]
    assert {f.kind for f in a} == set(KIND_WEIGHTS)
    steps = [f.at_step for f in a]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert all(0 <= f.rank < WORLD for f in a)
    assert all(1.5 <= f.seconds <= 4.0 for f in a if f.kind == "stall")


def _fault(kind: str, at: float) -> Failure:
    f = Failure(kind, 1)
    f.injected_at = at
    return f


def test_deaths_only_count_when_nothing_killed_that_node() -> None:
    faults = [_fault("smp", 100.0), _fault("stall", 200.0), _fault("node", 300.0)]
    nodes_of = {0: ["a"], 1: ["b"], 2: ["c"]}
    events = [
        {"kind": "node_dead", "node": "a", "time": 100.1},  # the SMP kill: rightful
        {"kind": "node_silent", "node": "b", "time": 202.0},  # the stall: expected
        {"kind": "node_dead", "node": "b", "time": 203.0},  # a stall is no death: false
        {"kind": "node_dead", "node": "c", "time": 299.0},  # before the node was killed
        {"kind": "node_lost", "node": "c", "time": 302.0},  # after: rightful
        {"kind": "node_silent", "node": "d", "time": 50.0},  # nothing hit d: a suspicion
        {"kind": "commit", "time": 1.0},
    ]
    deaths, suspicions = false_detections(events, faults, nodes_of)
    assert [(e["node"], e["time"]) for e in deaths] == [("b", 203.0), ("c", 299.0)]
    assert [e["node"] for e in suspicions] == ["d"]
