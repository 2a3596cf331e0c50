"""The node interface's contract (:class:`snapstore.node.api.NodeStore`), for each implementation.

What the control plane relies on from a node, whatever keeps its bytes:

- a lease never hands out a committed slot, nor the slot of a step in
  progress unless that step was abandoned;
- a prepared slice is kept only for bytes the node holds, and a commit is
  refused (changing nothing) once a slot it homes is gone;
- a commit installs the record, drops what it supersedes, and is idempotent;
  a stale commit changes nothing;
- an abort frees a step's slots and prepared slices and never touches the
  committed step;
- forget and drop_job let go of the job.

Implementations: ``shm`` (:class:`snapstore.node.store.ShmNodeStore`, the
SMP's, real bytes in a private directory) and ``mem`` (the bookkeeping-only
store of ``bench.scale``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from snapstore.config import StoreConfig
from snapstore.errors import SnapstoreError
from snapstore.format.record import RankEntry, StepRecord
from snapstore.format.work import Lease, RankStaged

NODE = "a" * 32
JOB = "contract"
K, M = 2, 1
SIZE = 64 << 10


@dataclass
class Impl:
    store: Any
    write: Callable[[Lease, int], None]
    """Fill a leased slot with the bytes of a step (a no-op where no bytes are kept)."""
    intact: Callable[[int, int, RankStaged], bool]
    """Whether the node still holds (rank, step) as staged."""


def _shm(tmp: str) -> Impl:
    from snapstore.node.store import ShmNodeStore

    cfg = StoreConfig(k=K, m=M)
    store = ShmNodeStore(NODE, os.path.join(tmp, "node"), cfg, "t", "127.0.0.1", 64 << 20, False)

    def write(lease: Lease, step: int) -> None:
        with open(lease.path, "r+b") as f:
            f.write(bytes([step % 251]) * SIZE)

    def intact(rank: int, step: int, staged: RankStaged) -> bool:
        opened = store.open_committed(JOB, rank, step, staged.size, staged.sums)
        return opened.path is not None and not opened.bad

    return Impl(store, write, intact)


def _mem(tmp: str) -> Impl:
    from snapstore.bench.scale_store import MemNodeStore

    store = MemNodeStore.standalone(NODE, K, M, budget=64 << 20)

    def intact(rank: int, step: int, staged: RankStaged) -> bool:
        return store.holds(JOB, rank, step)

    return Impl(store, lambda lease, step: None, intact)


IMPLS: dict[str, Callable[[str], Impl]] = {"shm": _shm, "mem": _mem}


@pytest.fixture(params=sorted(IMPLS))
def node(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Impl]:
    impl = IMPLS[request.param](str(tmp_path))
    yield impl
    close = getattr(impl.store, "close", None)
    if close is not None:
        close()


def _save(node: Impl, step: int, rank: int = 0, abandoned: tuple[int, ...] = ()) -> RankStaged:
    lease = node.store.lease(JOB, rank, SIZE, abandoned)
    assert lease.capacity >= SIZE
    node.write(lease, step)
    return node.store.stage(JOB, rank, step, SIZE, None, None)


def _record(step: int, staged: dict[int, RankStaged], version: int = 0) -> StepRecord:
    ranks = {r: RankEntry(NODE, s.size, s.sums) for r, s in staged.items()}
    return StepRecord(JOB, step, version, K, M, len(staged), ranks, ((NODE,),), ())


def _commit(node: Impl, step: int, staged: dict[int, RankStaged], version: int = 0) -> Any:
    node.store.keep_prepared(_record(step, staged, version))
    return node.store.commit(JOB, step, version, "", 0.0)


def test_stage_reports_the_step_and_k_checksums(node: Impl) -> None:
    staged = _save(node, 1)
    assert staged.rank == 0 and staged.size == SIZE and len(staged.sums) == K
    assert node.store.abandon_candidates(JOB, 0) == [1]
    assert node.store.record(JOB) is None


def test_commit_installs_the_record_and_supersedes_older_steps(node: Impl) -> None:
    s1 = {0: _save(node, 1), 1: _save(node, 1, rank=1)}
    assert [(r.step, r.version) for r in node.store.prepared()] == []
    node.store.keep_prepared(_record(1, s1))
    assert [(r.step, r.version) for r in node.store.prepared()] == [(1, 0)]
    res = node.store.commit(JOB, 1, 0, "", 0.0)
    assert res.ok and not res.missing
    assert node.store.record(JOB) == _record(1, s1)
    assert node.store.records() == {JOB: _record(1, s1)}
    assert node.store.prepared() == []
    assert node.store.abandon_candidates(JOB, 0) == []  # the committed slot is not reusable

    s2 = {0: _save(node, 2), 1: _save(node, 2, rank=1)}
    assert _commit(node, 2, s2).ok
    assert node.store.record(JOB).step == 2
    # Again, and a stale (older) commit: both change nothing.
    assert node.store.commit(JOB, 2, 0, "", 0.0).ok
    assert node.store.commit(JOB, 1, 0, "", 0.0).ok
    assert node.store.record(JOB) == _record(2, s2)


def test_a_lease_never_hands_out_a_committed_slot(node: Impl) -> None:
    s1 = {0: _save(node, 1)}
    assert _commit(node, 1, s1).ok
    lease = node.store.lease(JOB, 0, SIZE, (1,))  # even when told step 1 is abandoned
    node.write(lease, 9)
    assert node.intact(0, 1, s1[0])
    assert node.store.record(JOB) == _record(1, s1)


def test_a_step_in_progress_keeps_its_slot_unless_abandoned(node: Impl) -> None:
    s1 = _save(node, 1)
    assert node.store.abandon_candidates(JOB, 0) == [1]
    _save(node, 2)  # step 1 was not abandoned: its slot stays
    assert node.store.abandon_candidates(JOB, 0) == [1, 2]
    assert node.intact(0, 1, s1)
    node.store.lease(JOB, 0, SIZE, (1, 2))  # now they may be reused
    assert node.store.abandon_candidates(JOB, 0) == []


def test_a_commit_whose_home_slot_was_reused_is_refused(node: Impl) -> None:
    committed = {0: _save(node, 1)}
    assert _commit(node, 1, committed).ok
    s2 = {0: _save(node, 2)}
    node.store.keep_prepared(_record(2, s2))
    # The node was told step 2 is abandoned (a restarted trainer's lease) before
    # the commit decision reached it: its slot is gone, so the record must not land.
    node.store.lease(JOB, 0, SIZE, (2,))
    res = node.store.commit(JOB, 2, 0, "", 0.0)
    assert not res.ok and res.missing == (0,)
    assert node.store.record(JOB) == _record(1, committed)


def test_keep_prepared_refuses_a_slice_homing_bytes_not_held(node: Impl) -> None:
    staged = _save(node, 1)
    with pytest.raises(SnapstoreError, match="does not hold ranks"):
        node.store.keep_prepared(_record(1, {0: staged, 3: staged}))
    assert node.store.prepared() == []


def test_an_abort_frees_the_step_and_never_touches_the_committed_one(node: Impl) -> None:
    committed = {0: _save(node, 1)}
    assert _commit(node, 1, committed).ok
    s2 = {0: _save(node, 2)}
    node.store.keep_prepared(_record(2, s2))
    node.store.abort(JOB, 1, None)  # the committed step: nothing happens
    assert node.store.record(JOB) == _record(1, committed)
    node.store.abort(JOB, 2, None)
    assert node.store.prepared() == []
    assert node.store.abandon_candidates(JOB, 0) == []
    # The aborted step's number may be saved again, and committed.
    again = {0: _save(node, 2)}
    assert _commit(node, 2, again).ok and node.store.record(JOB) == _record(2, again)


def test_a_reprotection_commits_a_new_version_of_the_same_step(node: Impl) -> None:
    staged = {0: _save(node, 1)}
    assert _commit(node, 1, staged).ok
    assert _commit(node, 1, staged, version=1).ok
    rec = node.store.record(JOB)
    assert (rec.step, rec.version) == (1, 1)


def test_forget_and_drop_let_go_of_the_job(node: Impl) -> None:
    assert _commit(node, 1, {0: _save(node, 1)}).ok
    node.store.forget(JOB)
    assert node.store.record(JOB) is None and node.store.records() == {}
    assert _commit(node, 2, {0: _save(node, 2)}).ok
    used = node.store.sizes()["used"]
    node.store.drop_job(JOB)
    assert node.store.records() == {} and node.store.prepared() == []
    assert node.store.sizes()["used"] < used


def test_sizes_name_every_kind(node: Impl) -> None:
    _save(node, 1)
    sizes = node.store.sizes()
    assert {"used", "data", "parity", "spare", "work", "delta", "budget"} <= set(sizes)
    assert sizes["data"] >= SIZE and sizes["used"] >= sizes["data"]
