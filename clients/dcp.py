"""torch.distributed.checkpoint (DCP) storage backed by snapstore.

``dcp.save``, ``dcp.async_save`` and ``dcp.load`` work unchanged::

    client = Client("job", rank=dist.get_rank(), world_size=dist.get_world_size())
    dcp.save(state_dict, storage_writer=SnapstoreWriter(client))
    dcp.load(state_dict, storage_reader=SnapstoreReader(client))

Each ``dcp.save`` is one snapstore step of the client's job. The step is
taken from ``checkpoint_id`` when it is an int or ends in ``-<int>``;
otherwise every rank proposes one more than the last step its client saved
or restored, and the coordinator rank picks, for all ranks, the largest
proposal and at least one past the job's last committed step (so a step
that failed is not tried again by a live process, and every rank saves the
same number; only the coordinator rank asks the store). Every rank
stores the write items of its plan; the coordinator rank also stores the
checkpoint's metadata (which items exist and which rank holds each), so a
step carries everything a load needs and appears atomically when snapstore
commits it. Metadata is encoded with msgpack: DCP's own pickled
``.metadata`` file is not used.

``dcp.load`` reads the last committed step, and is this rank's restore: the
reader restores its own rank through :meth:`Client.restore` (a restarted
process joins the job's new incarnation there, and may save again
afterwards) and reads other ranks' items with :meth:`Client.peek`, checking
that they hold the same step. Ranks may be fewer than when the step was
saved (an elastic restart): each rank restores its own buffer and DCP's
planner reads the rest from the old ranks' buffers.

Errors: DCP gathers every rank's exception into a
``CheckpointException`` (a BaseException) whose ``failures`` map ranks to
them; the snapstore ones keep their classes (SaveFailedError,
RestoreRequiredError, SnapshotNotFoundError, StoreTimeoutError, ...), and
:func:`snapstore_error` finds the first. A reader's restore error is raised
from ``set_up_storage_reader`` rather than ``read_metadata``, because DCP
turns any error of ``read_metadata`` into an AssertionError.

Call protocol (DCP's): set_up -> prepare_local_plan (every rank proposes
a step) -> prepare_global_plan (coordinator; picks the step) -> write_data
(every rank; returns once the step is committed) -> finish (coordinator).
Reading: read_metadata (every rank: restore its own rank, then read the
coordinator rank's metadata) -> set_up_storage_reader -> prepare plans ->
read_data.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Any

import msgpack
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from snapstore.clients.client import Client
from snapstore.errors import (
    FormatError,
    MemoryBudgetError,
    SaveFailedError,
    SnapshotNotFoundError,
    SnapstoreError,
    StoreTimeoutError,
)

__all__ = ["SnapstoreReader", "SnapstoreWriter", "snapstore_error"]

_META_VERSION = 1


def _key(index: MetadataIndex) -> str:
    if index.offset is None:
        return index.fqn
    return f"{index.fqn}@{','.join(str(int(o)) for o in index.offset)}"


def _step_of(checkpoint_id: str | os.PathLike[str] | None) -> int | None:
    if checkpoint_id is None:
        return None
    m = re.search(r"(\d+)$", str(checkpoint_id))
    return int(m.group(1)) if m else None


def _encode_metadata(plans: list[SavePlan], planner_data: Any, version: Any) -> bytes:
    sdm: dict[str, Any] = {}
    storage: list[list[Any]] = []
    for rank, plan in enumerate(plans):
        for item in plan.items:
            idx = item.index
            storage.append([idx.fqn, None if idx.offset is None else list(idx.offset), rank])
            if item.type == WriteItemType.BYTE_IO:
                sdm[idx.fqn] = {"kind": "bytes"}
                continue
            td = item.tensor_data
            assert td is not None
            entry = sdm.setdefault(
                idx.fqn,
                {
                    "kind": "tensor",
                    "dtype": str(td.properties.dtype).removeprefix("torch."),
                    "size": list(td.size),
                    "chunks": [],
                },
            )
            entry["chunks"].append([list(td.chunk.offsets), list(td.chunk.sizes)])
    doc = {
        "v": _META_VERSION,
        "state_dict_metadata": sdm,
        "storage": storage,
        "planner_data": _plain(planner_data),
        "version": version,
    }
    return msgpack.packb(doc, use_bin_type=True)


def _plain(obj: Any) -> Any:
    """planner_data is fqn -> tuple path; msgpack keeps tuples as lists (restored on read)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool, bytes)):
        return obj
    return str(obj)


def _decode_metadata(data: bytes) -> tuple[Metadata, dict[str, int]]:
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if not isinstance(doc, dict) or doc.get("v") != _META_VERSION:
            raise ValueError(f"version {doc.get('v') if isinstance(doc, dict) else None!r}")
        sdm: dict[str, Any] = {}
        for fqn, e in doc["state_dict_metadata"].items():
            if e["kind"] == "bytes":
                sdm[fqn] = BytesStorageMetadata()
                continue
            dtype = getattr(torch, str(e["dtype"]))
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {e['dtype']!r}")
            chunks = [
                ChunkStorageMetadata(torch.Size(off), torch.Size(sz)) for off, sz in e["chunks"]
            ]
            sdm[fqn] = TensorStorageMetadata(
                TensorProperties(dtype=dtype), torch.Size(e["size"]), chunks
            )
        where = {}
        storage_data = {}
        for fqn, off, rank in doc["storage"]:
            idx = MetadataIndex(fqn, off)
            storage_data[idx] = int(rank)
            where[_key(idx)] = int(rank)
        pd = doc.get("planner_data")
        if isinstance(pd, dict):
            pd = {k: tuple(v) if isinstance(v, list) else v for k, v in pd.items()}
        meta = Metadata(
            state_dict_metadata=sdm,
            planner_data=pd,
            storage_data=storage_data,
            storage_meta=StorageMeta(),
            version=doc.get("version"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"snapstore DCP metadata is malformed: {e}") from None
    return meta, where


# -- which step a dcp.save is --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StepChoice:
    """``SavePlan.storage_data`` of this writer: the step a rank proposes (local plans),
    then the step the coordinator chose for every rank (global plans). ``explicit``: the
    step was asked for (a ``checkpoint_id``), not derived."""

    step: int
    explicit: bool = False


def _propose_step(client: Client, explicit: int | None) -> _StepChoice:
    """This rank's proposal: ``explicit``, else one more than the last step its client
    saved or restored (0 for a client that did neither).

    The client's own last step matters after a failure: a step that was aborted is
    recorded as failed, and saving that number again is refused to a client that has
    not restored since; a restored client's last step is the restored one, so it may
    reuse the number. No call to the store: the coordinator rank adds the job's last
    committed step (:func:`_agree_on_step`).
    """
    if explicit is not None:
        return _StepChoice(explicit, explicit=True)
    # The client's last saved or restored step: not public API of Client, read here only.
    own = client._last_step
    return _StepChoice(0 if own is None else own + 1)


def _agree_on_step(plans: list[SavePlan], latest: int | None) -> list[SavePlan]:
    """The coordinator's choice for every rank: an explicit step if one was asked for,
    else the largest proposal and at least one past the job's last committed step."""
    proposals = [p.storage_data for p in plans if isinstance(p.storage_data, _StepChoice)]
    if not proposals:
        return plans
    explicit = [c.step for c in proposals if c.explicit]
    if explicit:
        chosen = _StepChoice(max(explicit), explicit=True)
    else:
        floor = 0 if latest is None else latest + 1
        chosen = _StepChoice(max([floor, *(c.step for c in proposals)]))
    return [dataclasses.replace(p, storage_data=chosen) for p in plans]


def _chosen_step(plan: SavePlan, proposed: _StepChoice) -> int:
    """The step to save: the coordinator's choice, or this rank's proposal if larger.

    With DCP's plan caching a rank may get a cached plan whose choice is an older
    step; steps only grow, so the larger of the two is the current one.
    """
    chosen = plan.storage_data
    if proposed.explicit or not isinstance(chosen, _StepChoice):
        return proposed.step
    return max(chosen.step, proposed.step)


def _save_step(client: Client, step: int, state: Any, timeout: float) -> None:
    """Save ``state`` as ``step`` and wait for its commit, raising only documented classes.

    SaveFailedError (RestoreRequiredError among them), StoreTimeoutError and
    MemoryBudgetError go through as they are; any other snapstore error means the
    step will not commit either (the rank's SMP was unreachable, its staging copy
    failed...) and becomes a SaveFailedError naming it.
    """
    try:
        client.save(step, state).result(timeout)
    except (SaveFailedError, StoreTimeoutError, MemoryBudgetError):
        raise
    except SnapstoreError as e:
        raise SaveFailedError(
            f"job {client.job!r} step {step} was not saved: {type(e).__name__}: {e}",
            {f"rank {client.rank}": str(e)},
        ) from e


class SnapstoreWriter(StorageWriter):
    """A DCP StorageWriter that saves each rank's write items as one snapstore step.

    ``step``: the step of the next ``dcp.save`` (default: chosen as the module
    docstring says); a ``checkpoint_id`` ending in digits overrides it.
    ``write_data`` returns once the step is committed, or raises SaveFailedError
    (RestoreRequiredError: this process must restore first), StoreTimeoutError, ...
    """

    def __init__(self, client: Client, step: int | None = None, timeout: float | None = None):
        super().__init__()
        self.client = client
        self.step = step
        self.timeout = timeout
        self.checkpoint_id: str | None = None
        self._plans: list[SavePlan] | None = None
        self._proposed: _StepChoice | None = None
        self.is_coordinator = False

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.checkpoint_id = None if checkpoint_id is None else str(checkpoint_id)
        step = _step_of(checkpoint_id)
        if step is not None:
            self.step = step
        self._plans = None
        self._proposed = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _step_of(checkpoint_id) is not None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._proposed = _propose_step(self.client, self.step)
        return dataclasses.replace(plan, storage_data=self._proposed)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self._plans = list(plans)
        return _agree_on_step(plans, self.client.latest_step())  # one call per save, here

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        items: dict[str, Any] = {}
        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if isinstance(data, io.BytesIO):
                value: Any = data.getvalue()
                size = len(value)
            else:
                value = data.detach()
                size = value.numel() * value.element_size()
            items[_key(item.index)] = value
            results.append(WriteResult(item.index, size, self.client.rank))
        state: dict[str, Any] = {"items": items}
        if self.is_coordinator and self._plans is not None:
            meta = getattr(planner, "metadata", None)
            state["metadata"] = _encode_metadata(
                self._plans,
                getattr(meta, "planner_data", None),
                getattr(meta, "version", None),
            )
        proposed = self._proposed
        if proposed is None:  # DCP always plans first; a caller driving the writer may not
            proposed = _propose_step(self.client, self.step)
        step = _chosen_step(plan, proposed)
        if self.checkpoint_id is None:
            self.step = None  # an explicit step is used once; later saves choose their own
        _save_step(self.client, step, state, self.timeout or self.client.timeout)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        # The metadata went into the coordinator rank's step, committed with it.
        return None


class SnapstoreReader(StorageReader):
    """A DCP StorageReader over the last committed snapstore step of the client's job.

    A load restores this rank (see the module docstring): call it once per
    (re)started process before saving, as one would ``client.restore()``.
    """

    def __init__(self, client: Client, coordinator_rank: int = 0):
        super().__init__()
        self.client = client
        self.coordinator_rank = coordinator_rank
        self._where: dict[str, int] = {}
        self._states: dict[int, Any] = {}
        self._step: int | None = None
        self._error: SnapstoreError | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._states.clear()
        self._where.clear()
        self._step = None
        self._error = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _step_of(checkpoint_id) is not None

    def _state(self, rank: int) -> Any:
        """Rank ``rank``'s state of the step being loaded: restored for this rank, peeked
        (read-only, nothing aborted) for the others."""
        if rank not in self._states:
            if rank == self.client.rank:
                step, state = self.client.restore()
            else:
                step, state = self.client.peek(rank)
            if self._step is not None and step != self._step:
                raise SnapshotNotFoundError(
                    f"rank {rank} holds step {step}, not {self._step}: a save committed "
                    "during the load; load again"
                )
            self._step = step
            self._states[rank] = state
        return self._states[rank]

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Restore this rank, then read the checkpoint's metadata from the coordinator rank.

        DCP turns an exception of this call into a logged warning and an
        AssertionError; so a snapstore error here is kept, an empty Metadata
        returned, and the error raised by :meth:`set_up_storage_reader`, which DCP
        calls next on the same rank.
        """
        self._error = None
        try:
            self._state(self.client.rank)  # this rank's restore first: it pins the step
            state = self._state(self.coordinator_rank)
            data = state.get("metadata") if isinstance(state, dict) else None
            if not isinstance(data, bytes):
                raise SnapshotNotFoundError(
                    f"job {self.client.job!r}: the last committed step holds no DCP metadata "
                    "(it was not saved through SnapstoreWriter)"
                )
            meta, self._where = _decode_metadata(data)
        except SnapstoreError as e:
            self._error = e
            return Metadata(state_dict_metadata={})
        return meta

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if self._error is not None:
            raise self._error
        if not self._where and metadata.storage_data:
            self._where = {_key(idx): int(r) for idx, r in metadata.storage_data.items()}

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            key = _key(item.storage_index)
            rank = self._where.get(key)
            if rank is None:
                raise SnapshotNotFoundError(f"no rank holds {key} in the snapstore step")
            value = self._state(rank)["items"][key]
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(value))
                continue
            src = value
            for dim, (off, ln) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                src = src.narrow(dim, int(off), int(ln))
            target = planner.resolve_tensor(item).detach()
            target.copy_(src)
            planner.commit_tensor(item, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def snapstore_error(exc: BaseException) -> SnapstoreError | None:
    """The snapstore error behind a failed ``dcp.save`` or ``dcp.load``, or None.

    ``exc`` itself when it is one; for DCP's ``CheckpointException``, the
    lowest rank's snapstore error among its ``failures``. A launcher acts on
    its class: RestoreRequiredError -> let the process fail (every rank is
    restarted and restores); SaveFailedError -> this step is lost, the next
    ``dcp.save`` saves the next one.
    """
    if isinstance(exc, SnapstoreError):
        return exc
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for rank in sorted(failures):
            failure = failures[rank]
            err = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(err, SnapstoreError):
                return err
    return None
