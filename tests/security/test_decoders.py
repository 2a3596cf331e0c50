"""Findings 5 and 9: decoders bound every count before allocating; a bad file is a
corrupt step, never a crash of the listing; every decoder survives mutation fuzzing.

A 180-byte persisted manifest claiming ``world_size = 2**24`` made the
decoder build a 16M-entry list (681 MiB); larger values raised MemoryError
or OverflowError, which the persisted-step listing did not catch, so one
such file broke the coordinator's index for every job. DCP metadata with
``rank = inf`` raised OverflowError. Mutation fuzzing of each decoder
(``SNAPSTORE_FUZZ_EXAMPLES`` sets the depth; 15000 was the review's) must
find nothing but their own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tracemalloc
from types import SimpleNamespace
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapstore import persist
from snapstore.control.events import EventLog
from snapstore.control.flush import Flusher
from snapstore.errors import FormatError, PersistedStepCorruptError
from snapstore.format.frame import read_frame
from snapstore.format.pack import unpack
from snapstore.node.dataserver import DataServer, _Refused
from snapstore.persist.backend import FilesTier
from snapstore.persist.manifest import MAX_WORLD_SIZE
from tests.security.helpers import staged_buffer

_EXAMPLES = int(os.environ.get("SNAPSTORE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _manifest(**change: Any) -> bytes:
    ranks = {0: persist.PersistedRank(0, "rank-0.bin", 10, (1, 2))}
    doc = msgpack.unpackb(persist.PersistManifest("j", 3, 1, 2, ranks).to_bytes())
    doc.update(change)
    return bytes(msgpack.packb(doc))


@pytest.mark.parametrize("world_size", [2**24, MAX_WORLD_SIZE + 1, 2**62, 2**64 - 1])
def test_a_forged_world_size_allocates_nothing(world_size: int) -> None:
    blob = _manifest(world_size=world_size)
    assert len(blob) < 200
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="world_size"):
            persist.PersistManifest.from_bytes(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding a {len(blob)}-byte manifest took {peak} bytes"


@pytest.mark.parametrize(
    "change",
    [
        {"k": 2**40},
        {"ranks": [[0, "rank-0.bin", 10, list(range(300))]]},
        {"ranks": [[2**63, "rank-0.bin", 10, [1, 2]]]},
        {"created_at": "inf"},
        {"extra": [[1, 2, 3]]},
    ],
)
def test_other_forged_counts_are_format_errors(change: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        persist.PersistManifest.from_bytes(_manifest(**change))


def _step_dir(root: str, job: str, step: int, manifest: bytes) -> str:
    d = os.path.join(root, job, f"step-{step}")
    os.makedirs(d)
    with open(os.path.join(d, persist.MANIFEST_NAME), "wb") as f:
        f.write(manifest)
    return d


def test_a_bad_manifest_is_a_corrupt_step_and_the_listing_goes_on(tmp_path: Any) -> None:
    root = str(tmp_path)
    _step_dir(root, "good", 1, _manifest(job="good", step=1))
    _step_dir(root, "bad", 1, _manifest(job="bad", step=1))
    bomb = _step_dir(root, "bad", 2, _manifest(job="bad", step=2, world_size=2**62))
    listed = persist.list_steps(root, "bad")
    assert [(s.step, s.problem is None) for s in listed] == [(1, True), (2, False)]
    assert "world_size" in str(listed[1].problem)

    # The coordinator's index: the corrupt step is an event and left out; every job listed.
    async def offload(fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    plane = SimpleNamespace(cfg=SimpleNamespace(), events=EventLog(), offload=offload)
    flusher = Flusher(plane, FilesTier(root))  # type: ignore[arg-type]
    for _ in range(2):  # a second listing adds no second event
        asyncio.run(flusher.refresh())
    assert [s["step"] for s in flusher.jobs["good"].steps] == [1]
    assert [s["step"] for s in flusher.jobs["bad"].steps] == [1]
    corrupt = plane.events.recent(kinds=["persisted_corrupt"])
    assert [(e["job"], e["step"], e["path"]) for e in corrupt] == [("bad", 2, bomb)]
    assert flusher.newest("bad", intact=True) == 1


def test_an_oversized_manifest_file_is_not_read_whole(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(persist.tier, "MAX_MANIFEST_BYTES", 1000)
    d = _step_dir(str(tmp_path), "j", 1, _manifest() + b"\0" * 2000)
    with pytest.raises(PersistedStepCorruptError, match="more than 1000 bytes"):
        persist.read_manifest(d)


# -- mutation fuzzing: nothing but each decoder's own error --------------------------------

_MANIFEST = _manifest()


def _mutate(blob: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    out = bytearray(blob)
    for at, value, how in edits:
        at = min(at, max(0, len(out) - 1))
        if how == "s" and out:
            out[at] = value
        elif how == "i":
            out.insert(at, value)
        elif out:
            del out[at]
    return bytes(out)


_edits = st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 255), st.sampled_from("sid")),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(_edits)
def test_fuzz_persisted_manifest(edits: list[tuple[int, int, str]]) -> None:
    with contextlib.suppress(FormatError):
        persist.PersistManifest.from_bytes(_mutate(_MANIFEST, edits))


def _dcp_metadata() -> bytes:
    import torch
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    from snapstore.clients.dcp import _encode_metadata

    tensor = WriteItem(
        MetadataIndex("w", torch.Size([0])),
        WriteItemType.TENSOR,
        tensor_data=TensorWriteData(
            ChunkStorageMetadata(torch.Size([0]), torch.Size([4])),
            TensorProperties(dtype=torch.float32),
            torch.Size([4]),
        ),
    )
    obj = WriteItem(MetadataIndex("step"), WriteItemType.BYTE_IO)
    return _encode_metadata([SavePlan([tensor, obj])], {"w": ("w",)}, "1.0.0")


_DCP = _dcp_metadata()


@pytest.mark.parametrize("rank", [float("inf"), 2**40, -1, "0", None])
def test_dcp_metadata_with_a_forged_rank_is_a_format_error(rank: Any) -> None:
    from snapstore.clients.dcp import _decode_metadata

    doc = msgpack.unpackb(_DCP, raw=False)
    doc["storage"][0][2] = rank
    with pytest.raises(FormatError, match="malformed"):
        _decode_metadata(msgpack.packb(doc))


@FUZZ
@given(_edits)
def test_fuzz_dcp_metadata(edits: list[tuple[int, int, str]]) -> None:
    from snapstore.clients.dcp import _decode_metadata

    with contextlib.suppress(FormatError):
        _decode_metadata(_mutate(_DCP, edits))


_FRAME = staged_buffer({"w": torch.arange(6.0), "meta": {"step": 3, "t": (1, "x")}}, 3).tobytes()


@FUZZ
@given(_edits.map(lambda e: [(len(_FRAME) - 1 - min(at, 300), v, how) for at, v, how in e]))
def test_fuzz_frames_and_what_they_hold(edits: list[tuple[int, int, str]]) -> None:
    """Damage near the end of a staged buffer (the manifest and the trailer)."""
    blob = np.frombuffer(_mutate(_FRAME, edits), dtype=np.uint8)
    with contextlib.suppress(FormatError):
        framed = read_frame(blob, len(blob))
        unpack(framed.manifest, framed.data)


_REQUEST = msgpack.packb({"op": "read", "name": "d.job.r0.s3.seg", "offset": 0, "length": 8})
_server = object.__new__(DataServer)  # only the request parser: no socket, no thread
_server._resolve = lambda name: np.zeros(64, dtype=np.uint8)


@FUZZ
@given(_edits)
def test_fuzz_data_server_requests(edits: list[tuple[int, int, str]]) -> None:
    """An authenticated peer's request, damaged: refused with a reason, never a crash."""
    with contextlib.suppress(_Refused):
        _server._answer(_mutate(_REQUEST, edits))
