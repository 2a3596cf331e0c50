"""Round trips and multi-node losses for other (nodes, k, m) layouts.

Each layout gets its own real embedded cluster. Node losses here happen at
once (no re-protection in between): up to m per group must restore bitwise,
m + 1 in a group must give UnrecoverableError naming the lost chunks.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import job_status, running_store, wait_for

pytestmark = pytest.mark.cluster

NBYTES = 1 << 20


def _get(refs: Any, timeout: float = 120) -> Any:
    import ray

    return ray.get(refs, timeout=timeout)


def _rank(store: Any, node: str, job: str, rank: int, world: int) -> Any:
    from snapstore.bench.workers import rank_actor

    return rank_actor(node).remote(job, rank, world, store.rundir, NBYTES + 4096 * rank)


def _ranks(store: Any, nodes: list[str], job: str, world: int) -> list[Any]:
    return [_rank(store, nodes[r % len(nodes)], job, r, world) for r in range(world)]


def _kill_at_once(store: Any, victims: list[str]) -> None:
    from snapstore.ops import faults

    faults.kill_nodes(victims, store)


@pytest.mark.parametrize(
    ("nodes", "k", "m"),
    [
        # Both in the slow tier (scripts/test.sh --all): the m + 1 test below loses three
        # nodes of a k = 2, m = 2 group at once on every run, and the layouts' stripes are
        # checked without a cluster (test_stripes, test_placement, the simulation).
        pytest.param(4, 2, 2, marks=pytest.mark.slow),
        pytest.param(6, 4, 2, marks=pytest.mark.slow),
    ],
    ids=["4nodes-k2m2", "6nodes-k4m2"],
)
def test_round_trip_and_m_losses_at_once(nodes: int, k: int, m: int) -> None:
    from snapstore.ops import faults

    with running_store(nodes=nodes, k=k, m=m, memory_per_node="64MiB") as store:
        ids = faults.store_nodes(store)
        ranks = _ranks(store, ids[:4], "lay", 4)
        for step in (1, 2):
            _get([r.save.remote(step) for r in ranks])
        assert all(r["ok"] and r["step"] == 2 for r in _get([r.restore.remote() for r in ranks]))
        # Lose m nodes that hold ranks, at once; restart those ranks elsewhere.
        victims = ids[:m]
        _kill_at_once(store, victims)
        survivors = [n for n in ids if n not in victims]
        for r in range(m):
            ranks[r] = _rank(store, survivors[r], "lay", r, 4)
        res = _get([r.restore.remote() for r in ranks])
        assert all(x["ok"] and x["step"] == 2 for x in res), res


def test_m_plus_one_losses_in_a_group_is_a_clear_error() -> None:
    from snapstore.ops import faults

    with running_store(nodes=6, k=2, m=2, memory_per_node="64MiB") as store:
        ids = faults.store_nodes(store)
        ranks = _ranks(store, ids, "mp1", 6)
        _get([r.save.remote(1) for r in ranks])
        from snapstore.control.placement import data_stripe, stripe_members
        from snapstore.format.record import StepRecord

        rec = StepRecord.from_bytes(store.call("record", "mp1"))
        assert len(rec.groups) == 1  # six nodes, one group of six
        # Rank 0's home and two more members of the stripe holding its piece 0:
        # m + 1 = 3 chunks of that stripe are lost at once.
        home = rec.ranks[0].node
        stripe = data_stripe(rec.groups[0], home, 0)
        others = [mb.node for mb in stripe_members(rec.groups[0], stripe, 2, 2) if mb.node != home]
        victims = [home, *others[:2]]
        _kill_at_once(store, victims)
        wait_for(
            lambda: all(n["status"] != "alive" for n in store.nodes() if n["node_id"] in victims),
            20,
            "the losses to be detected",
        )
        survivors = [n for n in ids if n not in victims]
        lost_rank = _rank(store, survivors[0], "mp1", 0, 6)
        err = _get(lost_rank.restore_error.remote())
        assert err.startswith("UnrecoverableError"), err
        for v in victims:
            assert v[:12] in err
        # Every rank hears the same verdict: ranks whose homes survived do not
        # resume step 1 alone while rank 0 cannot (ranks never restore different steps).
        alive_ranks = [i for i in range(6) if ids[i] not in victims]
        errs = _get([ranks[i].restore_error.remote() for i in alive_ranks])
        assert all(e.startswith("UnrecoverableError") for e in errs), errs
        assert job_status(store, "mp1")["status"] in ("lost", "degraded")
