"""The DCP adapter's own logic without a cluster: which step a save is, restore vs peek,
and which errors reach the caller. A fake client stands in for snapstore; DCP runs
for real in this one process (``no_dist=True``)."""

from __future__ import annotations

import traceback
import warnings
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import SavePlan

from snapstore.clients.dcp import (
    SnapstoreReader,
    SnapstoreWriter,
    _agree_on_step,
    _chosen_step,
    _propose_step,
    _StepChoice,
    snapstore_error,
)
from snapstore.errors import (
    RestoreRequiredError,
    SaveFailedError,
    SnapshotNotFoundError,
    StoreTimeoutError,
)


class _Done:
    def __init__(self, step: int, error: BaseException | None = None) -> None:
        self.step, self.error = step, error

    def result(self, timeout: float | None = None) -> int:
        if self.error is not None:
            raise self.error
        return self.step


class FakeClient:
    """What the adapter uses of a Client, over a dict of committed steps."""

    def __init__(self, rank: int = 0, latest: int | None = None, last: int | None = None):
        self.job, self.rank, self.timeout = "fake", rank, 5.0
        self.latest = latest
        self._last_step = last
        self.committed: dict[int, dict[int, Any]] = {}  # step -> rank -> state
        self.calls: list[tuple[str, Any]] = []
        self.fail_save: BaseException | None = None
        self.fail_restore: BaseException | None = None

    def latest_step(self) -> int | None:
        return self.latest

    def save(self, step: int, state: Any) -> _Done:
        self.calls.append(("save", step))
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} is not after the last saved step {self._last_step}")
        self._last_step = step
        if self.fail_save is not None:
            return _Done(step, self.fail_save)
        self.committed.setdefault(step, {})[self.rank] = state
        self.latest = step
        return _Done(step)

    def restore(self) -> tuple[int, Any]:
        self.calls.append(("restore", self.rank))
        if self.fail_restore is not None:
            raise self.fail_restore
        if self.latest is None:
            raise SnapshotNotFoundError("job 'fake' has no committed step")
        self._last_step = self.latest
        return self.latest, self.committed[self.latest][self.rank]

    def peek(self, rank: int) -> tuple[int, Any]:
        self.calls.append(("peek", rank))
        assert self.latest is not None
        return self.latest, self.committed[self.latest][rank]


def _save(state: dict[str, Any], writer: SnapstoreWriter, **kw: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, storage_writer=writer, no_dist=True, **kw)


def _load(state: dict[str, Any], reader: SnapstoreReader) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=reader, no_dist=True)


# -- the step of a save ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "explicit", "want"),
    [
        (None, None, _StepChoice(0)),  # a new process: the coordinator adds the job's latest
        (4, None, _StepChoice(5)),  # the usual: after its last save (or restore)
        (4, 9, _StepChoice(9, explicit=True)),  # a checkpoint_id
    ],
)
def test_a_rank_proposes_the_step_after_its_last(
    last: int | None, explicit: int | None, want: _StepChoice
) -> None:
    client: Any = FakeClient(latest=99, last=last)  # the job's latest is not asked here
    assert _propose_step(client, explicit) == want


@pytest.mark.parametrize(
    ("proposals", "latest", "want"),
    [
        ([5, 6, 5], 4, 6),  # the largest proposal: step 5 failed on one rank, so 6 for all
        ([5, 5], 4, 5),
        ([0, 0], 4, 5),  # new processes that did not restore: after the job's latest
        ([0, 0], None, 0),  # a new job
    ],
)
def test_the_coordinator_picks_one_step_for_every_rank(
    proposals: list[int], latest: int | None, want: int
) -> None:
    plans = [SavePlan([], storage_data=_StepChoice(s)) for s in proposals]
    agreed = _agree_on_step(plans, latest)
    assert [p.storage_data for p in agreed] == [_StepChoice(want)] * len(plans)


def test_an_explicit_step_is_kept_even_when_older_than_the_latest() -> None:
    plans = [SavePlan([], storage_data=_StepChoice(3, explicit=True))] * 2
    agreed = _agree_on_step(plans, 7)  # the store refuses it, clearly, rather than renumber
    assert [p.storage_data.step for p in agreed] == [3, 3]
    assert _agree_on_step([SavePlan([]), SavePlan([])], 7) == [SavePlan([]), SavePlan([])]


def test_a_stale_cached_choice_loses_to_the_current_proposal() -> None:
    cached = SavePlan([], storage_data=_StepChoice(3))
    assert _chosen_step(cached, _StepChoice(7)) == 7
    assert _chosen_step(SavePlan([], storage_data=_StepChoice(8)), _StepChoice(7)) == 8
    assert _chosen_step(SavePlan([]), _StepChoice(7)) == 7
    assert _chosen_step(cached, _StepChoice(2, explicit=True)) == 2


def test_after_a_failed_save_the_next_dcp_save_takes_the_next_step() -> None:
    client = FakeClient(latest=3, last=3)
    client.fail_save = SaveFailedError("job 'fake' step 4 was not committed: membership changed")
    with pytest.raises(CheckpointException) as info:
        _save({"w": torch.ones(2)}, SnapstoreWriter(client))  # type: ignore[arg-type]
    assert isinstance(snapstore_error(info.value), SaveFailedError)
    client.fail_save = None
    _save({"w": torch.ones(2)}, SnapstoreWriter(client))  # type: ignore[arg-type]
    assert client.calls == [("save", 4), ("save", 5)]


def test_a_save_that_cannot_commit_raises_save_failed_whatever_the_cause() -> None:
    from snapstore.errors import ActorUnavailableError, SnapstoreError

    client = FakeClient(latest=3, last=3)
    client.fail_save = ActorUnavailableError("SMP a1b2.wait_outcome: actor unavailable")
    with pytest.raises(CheckpointException) as info:
        _save({"w": torch.ones(2)}, SnapstoreWriter(client))  # type: ignore[arg-type]
    err = snapstore_error(info.value)
    assert isinstance(err, SaveFailedError) and "ActorUnavailableError" in str(err)
    client.fail_save = SnapstoreError("staging copy of step 5 failed")
    with pytest.raises(CheckpointException) as info:
        _save({"w": torch.ones(2)}, SnapstoreWriter(client))  # type: ignore[arg-type]
    assert isinstance(snapstore_error(info.value), SaveFailedError)
    for kept in (RestoreRequiredError("restore first"), StoreTimeoutError("60 s")):
        client.fail_save = kept
        with pytest.raises(CheckpointException) as info:
            _save({"w": torch.ones(2)}, SnapstoreWriter(client))  # type: ignore[arg-type]
        assert snapstore_error(info.value) is kept


def test_checkpoint_ids_name_steps_and_an_explicit_step_is_used_once() -> None:
    client = FakeClient()
    writer = SnapstoreWriter(client, step=10)  # type: ignore[arg-type]
    _save({"w": torch.ones(2)}, writer)
    _save({"w": torch.ones(2)}, writer)
    _save({"w": torch.ones(2)}, writer, checkpoint_id="step-20")
    assert client.calls == [("save", 10), ("save", 11), ("save", 20)]


# -- loads: restore this rank, peek the others ---------------------------------------------------


def test_a_load_restores_this_rank_then_the_next_save_follows_the_restored_step() -> None:
    client = FakeClient()
    saved = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    _save(saved, SnapstoreWriter(client))  # type: ignore[arg-type]
    _save(saved, SnapstoreWriter(client))  # type: ignore[arg-type]
    client.latest = 0  # step 1 "failed" elsewhere; step 0 is what the job committed
    client._last_step = None  # a new process
    client.calls.clear()
    live = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    _load(live, SnapstoreReader(client))  # type: ignore[arg-type]
    assert torch.equal(live["w"], saved["w"]) and torch.equal(live["b"], saved["b"])
    assert client.calls == [("restore", 0)]  # its own rank is restored, never peeked
    _save(live, SnapstoreWriter(client))  # type: ignore[arg-type]
    assert client.calls[-1] == ("save", 1)  # a restored client may reuse the failed number


def test_other_ranks_items_are_peeked_and_must_hold_the_same_step() -> None:
    client = FakeClient(rank=1)
    reader = SnapstoreReader(client)  # type: ignore[arg-type]
    client.latest = 3
    client.committed[3] = {0: {"items": {}, "metadata": b"x"}, 1: {"items": {}}}
    assert reader._state(1) == {"items": {}}
    assert reader._state(0)["metadata"] == b"x"
    assert client.calls == [("restore", 1), ("peek", 0)]
    reader.reset()
    reader._state(1)
    client.latest = 4  # a save committed between this rank's restore and the peek
    client.committed[4] = {0: {"items": {}}}
    with pytest.raises(SnapshotNotFoundError, match="load again"):
        reader._state(0)


@pytest.mark.parametrize(
    "error",
    [
        SnapshotNotFoundError("job 'fake' has no committed step in memory"),
        StoreTimeoutError("rank 0's data was not readable or rebuilt within 5 s"),
        RestoreRequiredError("restore first"),
    ],
)
def test_a_failed_load_says_why_with_the_snapstore_error_class(error: Exception) -> None:
    client = FakeClient()
    client.fail_restore = error
    with pytest.raises(CheckpointException) as info:
        _load({"w": torch.zeros(2)}, SnapstoreReader(client))  # type: ignore[arg-type]
    # DCP turns read_metadata's errors into an AssertionError; the reader's is raised
    # from set_up_storage_reader instead, so the caller gets snapstore's class.
    assert snapstore_error(info.value) is not None
    assert type(snapstore_error(info.value)) is type(error)


def test_a_step_not_saved_through_the_writer_is_refused_clearly() -> None:
    client = FakeClient(latest=0)
    client.committed[0] = {0: {"model": torch.ones(1)}}
    with pytest.raises(CheckpointException) as info:
        _load({"w": torch.zeros(2)}, SnapstoreReader(client))  # type: ignore[arg-type]
    err = snapstore_error(info.value)
    assert isinstance(err, SnapshotNotFoundError) and "no DCP metadata" in str(err)


def _failed(err: BaseException) -> tuple[BaseException, traceback.StackSummary]:
    """A rank's failure as DCP records it: the exception and its (here empty) traceback."""
    return err, traceback.StackSummary()


def test_snapstore_error_finds_the_lowest_ranks_snapstore_error() -> None:
    refused = RestoreRequiredError("restore first")
    exc = CheckpointException(
        "write",
        {2: _failed(SaveFailedError("lost")), 1: _failed(refused), 0: _failed(ValueError("x"))},
    )
    assert snapstore_error(exc) is refused
    assert snapstore_error(CheckpointException("write", {0: _failed(ValueError("x"))})) is None
    assert snapstore_error(refused) is refused
    assert snapstore_error(KeyError("k")) is None
