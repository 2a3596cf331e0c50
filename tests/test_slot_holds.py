"""Holds on a node's slot table, without a cluster: what a flush reading a committed slot
may rely on, and what training may.

A held slot is never retired, renamed, dropped or handed out until released
(or its hold expires); a retire asked for meanwhile happens at release.
Commits never wait for a hold. Only a lease that cannot fit in the budget
waits, bounded, and marks the hold wanted so the flush hurries.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from snapstore.errors import MemoryBudgetError, SnapstoreError
from snapstore.format.record import RankEntry, StepRecord
from snapstore.node.segments import data_name
from snapstore.node.slots import SlotTable

JOB = "hj"
NODE = "n" * 56
SIZE = 4096


def _record(step: int) -> StepRecord:
    return StepRecord(JOB, step, 0, 1, 1, 1, {0: RankEntry(NODE, SIZE, (0,))}, (), ())


def _save(table: SlotTable, step: int) -> None:
    lease = table.lease(JOB, 0, SIZE)
    assert lease["capacity"] >= SIZE
    table.stage(JOB, 0, step, SIZE)
    rec = _record(step)
    assert table.commit(rec, rec.to_bytes())


def _names(table: SlotTable) -> list[str]:
    return sorted(table._segments)


@pytest.fixture
def table(tmp_path: Any) -> SlotTable:
    return SlotTable(str(tmp_path / "node"), NODE, budget=3 * SIZE)


def test_a_held_committed_slot_outlives_newer_commits_until_released(table: SlotTable) -> None:
    _save(table, 1)
    assert table.hold(JOB, 1, "t", ttl=60) == [0]
    _save(table, 2)  # a commit never waits for the flush
    _save(table, 3)
    held = data_name(JOB, 0, 1)
    assert held in _names(table), "retired while held"
    assert table.get(held) is not None and table.holding("t")
    table.release("t")
    assert held not in _names(table)  # retired at release: a spare, or dropped
    assert not table.holding("t") and table.held() == {}


def test_a_held_slot_is_never_leased_and_the_next_slot_fits_beside_it(table: SlotTable) -> None:
    _save(table, 1)
    table.hold(JOB, 1, "t", ttl=60)
    seg = table.get(data_name(JOB, 0, 1))
    assert seg is not None
    before = seg.array.copy()
    for step in (2, 3, 4):
        lease = table.lease(JOB, 0, SIZE)
        assert lease["path"] != seg.path
        with open(lease["path"], "r+b") as f:
            f.write(b"\xab" * SIZE)
        table.stage(JOB, 0, step, SIZE)
        rec = _record(step)
        table.commit(rec, rec.to_bytes())
    assert (seg.array == before).all(), "the held bytes changed"
    assert table.used() <= table.budget


def test_a_lease_short_of_memory_waits_for_the_release_and_marks_it_wanted(
    tmp_path: Any,
) -> None:
    table = SlotTable(str(tmp_path / "node"), NODE, budget=2 * SIZE)
    _save(table, 1)
    table.hold(JOB, 1, "t", ttl=60)
    _save(table, 2)  # committed slot + held slot: the budget is full
    seen: list[bool] = []

    def flush_finishes() -> None:
        deadline = time.monotonic() + 5
        while not table.wanted("t") and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(table.wanted("t"))
        table.release("t")

    t = threading.Thread(target=flush_finishes)
    t.start()
    t0 = time.monotonic()
    lease = table.lease(JOB, 0, SIZE, hold_wait=10)
    t.join()
    assert seen == [True] and lease["capacity"] >= SIZE
    assert time.monotonic() - t0 < 5
    assert not table.wanted("t")


def test_a_lease_waits_only_bounded_then_names_the_budget(tmp_path: Any) -> None:
    table = SlotTable(str(tmp_path / "node"), NODE, budget=2 * SIZE)
    _save(table, 1)
    table.hold(JOB, 1, "t", ttl=60)
    _save(table, 2)
    t0 = time.monotonic()
    with pytest.raises(MemoryBudgetError, match="budget"):
        table.lease(JOB, 0, SIZE, hold_wait=0.3)
    assert 0.25 <= time.monotonic() - t0 < 3
    with pytest.raises(MemoryBudgetError):
        table.lease(JOB, 0, SIZE)  # no wait asked: at once, as before holds existed


def test_an_expired_hold_lets_go(table: SlotTable) -> None:
    _save(table, 1)
    table.hold(JOB, 1, "t", ttl=0.05)
    _save(table, 2)
    assert data_name(JOB, 0, 1) in _names(table)
    time.sleep(0.1)
    assert not table.holding("t")  # noticed on the next look, and the deferred retire done
    assert data_name(JOB, 0, 1) not in _names(table)


def test_two_holds_on_one_slot_release_separately(table: SlotTable) -> None:
    _save(table, 1)
    table.hold(JOB, 1, "a", ttl=60)
    table.hold(JOB, 1, "b", ttl=60)
    _save(table, 2)
    table.release("a")
    assert data_name(JOB, 0, 1) in _names(table)
    table.release("b")
    assert data_name(JOB, 0, 1) not in _names(table)


def test_dropping_a_job_waits_for_its_holds(table: SlotTable) -> None:
    _save(table, 1)
    table.hold(JOB, 1, "t", ttl=60)
    table.drop_job(JOB)
    assert _names(table) == [data_name(JOB, 0, 1)]
    table.release("t")
    assert _names(table) == []


def test_forget_keeps_slots_as_spares_and_allows_older_steps(table: SlotTable) -> None:
    _save(table, 5)
    table.forget(JOB)
    assert table.record(JOB) is None
    assert all(n.startswith("x.") for n in _names(table))
    _save(table, 3)  # the job resumes from an older (persisted) step
    assert table.record(JOB) is not None and table.record(JOB).step == 3  # type: ignore[union-attr]


def test_only_the_asked_step_and_ranks_are_held(table: SlotTable) -> None:
    _save(table, 1)
    assert table.hold(JOB, 2, "t", ttl=60) == []
    assert table.hold(JOB, 1, "u", ttl=60, ranks=[3]) == []
    assert not table.holding("t") and not table.holding("u")
    with pytest.raises(SnapstoreError, match="steps must increase"):
        table.stage(JOB, 0, 1, SIZE)


def test_a_spare_too_small_for_the_next_slots_gives_way_to_the_retired_one(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parity slots of a job go back to its one parity spare at each commit and come out
    of it for the next step: a spare left too small (by a step with less parity) is
    replaced by the larger segment retired next, not kept while every later slot is
    created afresh (whose pages the first writes fault in) and every retire dropped."""
    from snapstore.node.segments import Segment, parity_name

    created: list[str] = []
    create = Segment.create.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Segment], path: str, size: int) -> Segment:
        created.append(os.path.basename(path))
        return create(cls, path, size)

    monkeypatch.setattr(Segment, "create", classmethod(counted))
    table = SlotTable(str(tmp_path / "node"), NODE, budget=64 * SIZE)

    def step(n: int, parity: int) -> None:
        table.output(JOB, parity_name(JOB, n, 0), parity)
        _save(table, n)

    step(1, SIZE // 4)  # a small step's parity
    step(2, SIZE)  # the small spare is too small: a new segment
    made = len([n for n in created if n.startswith("p.")])
    for n in range(3, 9):
        step(n, SIZE)
    again = len([n for n in created if n.startswith("p.")]) - made
    assert again <= 1, f"{again} parity segments made for six equal steps"
    assert len([n for n in _names(table) if n.startswith(f"x.{JOB}.p.")]) <= 1
