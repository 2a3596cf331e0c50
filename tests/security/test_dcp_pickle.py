"""Finding 2: the DCP reader unpickled stored bytes.

DCP hands non-tensor values (BYTE_IO items) to storage as ``torch.save``
bytes and its default planner reads them back with
``torch.load(weights_only=False)``: a crafted snapshot or persisted file
ran code in the trainer during ``dcp.load``. Now the writer stores such
values in snapstore's own format (no pickle) and the reader never hands
stored bytes to an unrestricted unpickler.

The client here is a stand-in holding steps as snapstore's packer makes
them (:func:`snapstore.format.pack.pack` / ``unpack``), exactly the bytes
a real store keeps; what differs is only where they are kept.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from snapstore.clients.dcp import SnapstoreReader, SnapstoreWriter, _encode_metadata
from snapstore.format.pack import pack, unpack


class StoreStandIn:
    """What SnapstoreWriter/Reader use of a Client, over packed bytes of one rank.

    The reader restores its own rank through ``restore`` and peeks the
    others (here there is only rank 0); the writer proposes one past the
    client's ``_last_step``, which ``save`` and ``restore`` set as a Client does.
    """

    job = "dcp"
    rank = 0
    timeout = 30.0

    def __init__(self) -> None:
        self.steps: dict[int, tuple[bytes, bytes]] = {}
        self._last_step: int | None = None

    def latest_step(self) -> int | None:
        return max(self.steps, default=None)

    def save(self, step: int, state: Any) -> Any:
        packed = pack(state)
        self.steps[step] = (bytes(packed.manifest), np.asarray(packed.data).tobytes())
        self._last_step = step
        return SimpleNamespace(result=lambda timeout=None: step)

    def peek(
        self, rank: int | None = None, *, timeout: float | None = None, copy: bool = False
    ) -> tuple[int, Any]:
        step = max(self.steps)
        manifest, data = self.steps[step]
        return step, unpack(manifest, data)

    def restore(self, into: Any = None, *, timeout: float | None = None) -> tuple[int, Any]:
        step, state = self.peek(self.rank)
        self._last_step = step
        return step, state


def _quiet() -> Any:
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore")  # DCP without a process group says it assumes one process
    return w


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_a_crafted_byte_item_runs_no_code_on_load(tmp_path: Any) -> None:
    marker = str(tmp_path / "pwned")
    store = StoreStandIn()
    evil = pickle.dumps(_Payload(marker))
    meta = _encode_metadata(
        [SavePlan([WriteItem(MetadataIndex("evil"), WriteItemType.BYTE_IO)])], {}, "1.0.0"
    )
    store.save(1, {"items": {"evil": evil}, "metadata": meta})
    w = _quiet()
    try:
        with pytest.raises(
            CheckpointException, match=r"FormatError: DCP item 'evil'.*weights_only"
        ):
            dcp.load({"evil": 0}, storage_reader=SnapstoreReader(store))  # type: ignore[arg-type]
    finally:
        w.__exit__(None, None, None)
    assert not os.path.exists(marker), "dcp.load ran code from the stored bytes"


def test_values_round_trip_without_pickle_at_rest() -> None:
    store = StoreStandIn()
    saved: dict[str, Any] = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "step": 7,
        "cfg": {"lr": 0.1, "betas": (0.9, 0.99), "name": "adamw", "rng": torch.arange(5)},
    }
    w = _quiet()
    try:
        dcp.save(saved, storage_writer=SnapstoreWriter(store), checkpoint_id="step-1")  # type: ignore[arg-type]
        loaded: dict[str, Any] = {
            "w": torch.zeros(3, 4),
            "step": 0,
            "cfg": {"lr": 0.0, "betas": None, "name": "", "rng": torch.zeros(5, dtype=torch.int64)},
        }
        dcp.load(loaded, storage_reader=SnapstoreReader(store))  # type: ignore[arg-type]
    finally:
        w.__exit__(None, None, None)
    assert torch.equal(loaded["w"], saved["w"]) and loaded["step"] == 7
    assert loaded["cfg"]["betas"] == (0.9, 0.99) and torch.equal(
        loaded["cfg"]["rng"], torch.arange(5)
    )
    # What the store holds: no pickle (its protocol-2+ opcode) anywhere in the step's bytes.
    manifest, _ = store.steps[1]
    assert b"\x80\x02" not in manifest and b"PK\x03\x04" not in manifest
    _, state = store.peek(0)
    assert not any(isinstance(v, bytes) for v in state["objects"].values())


class _NotAllowed:
    pass


def test_a_value_that_could_not_be_loaded_safely_fails_the_save() -> None:
    store = StoreStandIn()
    w = _quiet()
    try:
        with pytest.raises(
            CheckpointException, match=r"'obj'.*Unsupported global.*add_safe_globals"
        ):
            dcp.save(
                {"obj": _NotAllowed()},
                storage_writer=SnapstoreWriter(store),  # type: ignore[arg-type]
                checkpoint_id="step-1",
            )
    finally:
        w.__exit__(None, None, None)
    assert store.steps == {}


def test_old_steps_holding_torch_save_bytes_still_load_safely() -> None:
    store = StoreStandIn()
    buf = io.BytesIO()
    torch.save({"epoch": 3}, buf)
    meta = _encode_metadata(
        [SavePlan([WriteItem(MetadataIndex("extra"), WriteItemType.BYTE_IO)])], {}, "1.0.0"
    )
    store.save(1, {"items": {"extra": buf.getvalue()}, "metadata": meta})
    loaded: dict[str, Any] = {"extra": None}
    w = _quiet()
    try:
        dcp.load(loaded, storage_reader=SnapstoreReader(store))  # type: ignore[arg-type]
    finally:
        w.__exit__(None, None, None)
    assert loaded["extra"] == {"epoch": 3}
