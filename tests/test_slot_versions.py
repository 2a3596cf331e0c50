"""Versions of one step on a node's slot table, without a cluster.

A step is committed first without parity (too few nodes), then re-protected as a
newer version once a node joins. The decisions of the two may reach a member in
either order: applying the older one must not retire the parity the member already
built for the newer one, and a member must not keep a prepared record that places
parity here which it does not hold (a record never describes bytes that are not
there). Seed 9700815 of the simulation found the first.
"""

from __future__ import annotations

from typing import Any

import pytest

from snapstore.errors import SnapstoreError
from snapstore.format.record import ParityEntry, RankEntry, StepRecord
from snapstore.node.segments import parity_name
from snapstore.node.slots import SlotTable

JOB = "vj"
NODE = "n" * 56
OTHERS = ("a" * 56, "b" * 56, "c" * 56)
SIZE = 4096
STEP = 5


def _unprotected(version: int) -> StepRecord:
    return StepRecord(JOB, STEP, version, 3, 1, 1, {0: RankEntry(NODE, SIZE, (0, 0, 0))}, (), ())


def _protected(version: int) -> StepRecord:
    group = (NODE, *OTHERS)
    parity = (ParityEntry(0, 0, 3, NODE, 0, SIZE // 3 + 64, 0),)
    ranks = {0: RankEntry(NODE, SIZE, (0, 0, 0))}
    return StepRecord(JOB, STEP, version, 3, 1, 1, ranks, (group,), parity)


@pytest.fixture
def table(tmp_path: Any) -> SlotTable:
    t = SlotTable(str(tmp_path / "node"), NODE, budget=8 * SIZE)
    assert t.lease(JOB, 0, SIZE)["capacity"] >= SIZE
    t.stage(JOB, 0, STEP, SIZE)
    return t


def test_an_older_commit_keeps_the_parity_of_a_newer_version_being_prepared(
    table: SlotTable,
) -> None:
    table.keep_prepared(_unprotected(6))
    newer = _protected(7)
    table.output(JOB, parity_name(JOB, STEP, 7), newer.parity_file_size(NODE))  # built
    ok, missing, _ = table.commit_prepared(JOB, STEP, 6)  # the older decision, late
    assert ok and not missing
    assert parity_name(JOB, STEP, 7) in table._segments, "the re-protection's parity retired"
    table.keep_prepared(newer)
    assert table.commit_prepared(JOB, STEP, 7)[0]
    rec = table.record(JOB)
    assert rec is not None and (rec.step, rec.version) == (STEP, 7)
    assert parity_name(JOB, STEP, 7) in table._segments


def test_an_older_version_of_the_step_is_retired_by_a_newer_commit(table: SlotTable) -> None:
    older = _protected(6)
    table.output(JOB, parity_name(JOB, STEP, 6), older.parity_file_size(NODE))
    table.keep_prepared(older)
    assert table.commit_prepared(JOB, STEP, 6)[0]
    table.output(JOB, parity_name(JOB, STEP, 7), older.parity_file_size(NODE))
    table.keep_prepared(_protected(7))
    assert table.commit_prepared(JOB, STEP, 7)[0]
    assert parity_name(JOB, STEP, 6) not in table._segments
    assert parity_name(JOB, STEP, 7) in table._segments


def test_a_prepared_record_placing_parity_here_is_refused_without_it(table: SlotTable) -> None:
    with pytest.raises(SnapstoreError, match="does not hold the parity"):
        table.keep_prepared(_protected(7))
    assert table.commit_prepared(JOB, STEP, 7) == (True, [], ""), "nothing was prepared"
    assert table.record(JOB) is None
