"""The layout API the client copies with: caching, regions, sources, copy_into, into=."""

from __future__ import annotations

import mmap
import statistics
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from snapstore.errors import FormatError
from snapstore.format.pack import Layout, pack, plan, unpack
from tests.test_format import assert_same, roundtrip


def _state() -> dict[str, Any]:
    emb = torch.randn(11, 8)
    return {
        "model": OrderedDict(
            [
                ("embed", emb),
                ("head", emb.view(11, 8)),
                ("norm", torch.ones(8, dtype=torch.bfloat16)),
            ]
        ),
        "optim": {"state": {0: {"step": torch.tensor(3.0), "m": torch.zeros(11, 8)}}},
        "step": 3,
        "lr": 0.1,
        "np": np.arange(5, dtype=np.int64),
    }


def test_layout_is_reused_while_structure_is_unchanged() -> None:
    state = _state()
    layout = plan(state)
    assert plan(state, previous=layout) is layout
    # Non-tensor values and tensor contents change every step; the layout stays.
    state["step"] = 4
    state["lr"] = 0.05
    state["optim"]["state"][0]["m"].add_(1)
    state["optim"]["state"][0]["m"] = torch.ones(11, 8)  # new object, same structure
    assert plan(state, previous=layout) is layout
    assert unpack(layout.manifest(state), pack(state, layout=layout).data)["step"] == 4


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s["optim"]["state"][0].__setitem__("m", torch.zeros(11, 9)),
        lambda s: s["optim"]["state"][0].__setitem__("m", torch.zeros(11, 8).double()),
        lambda s: s["optim"]["state"][0].__setitem__("m", torch.zeros(8, 11).t()),
        lambda s: s["model"].__setitem__("head", s["model"]["head"].clone()),  # untied
        lambda s: s["optim"]["state"][0].__setitem__("v", torch.zeros(1)),
        lambda s: s.__setitem__("np", np.arange(5, dtype=np.int32)),
        lambda s: s["optim"]["state"][0]["m"].requires_grad_(True),
        lambda s: s.__setitem__("renamed", s.pop("np")),
    ],
)
def test_structure_changes_give_a_new_layout(change: Any) -> None:
    state = _state()
    layout = plan(state)
    change(state)
    fresh = plan(state, previous=layout)
    assert fresh is not layout and fresh.key != layout.key
    with pytest.raises(FormatError, match="no longer matches the layout"):
        layout.copy_into(state, np.empty(layout.nbytes + 4096, dtype=np.uint8))
    with pytest.raises(FormatError, match="plan a new layout"):
        layout.manifest(state)
    packed = pack(state, layout=layout)
    assert packed.layout is not layout
    assert_same(state, unpack(packed.manifest, packed.data))


def test_regions_are_aligned_disjoint_and_cover_the_leaves() -> None:
    layout = plan(_state())
    assert layout.nbytes % 64 == 0
    end = 0
    for r in layout.regions:
        assert r.offset % 64 == 0 and r.offset >= end and r.nbytes > 0
        end = r.offset + r.nbytes
        index = layout.regions.index(r)
        assert r.leaves and all(layout.leaves[i].region == index for i in r.leaves)
    assert end <= layout.nbytes < end + 64
    tied = [r for r in layout.regions if len(r.leaves) == 2]
    paths = [layout.leaves[i].path for i in tied[0].leaves]
    assert paths == [("model", "embed"), ("model", "head")]
    assert {leaf.dtype for leaf in layout.leaves} >= {"float32", "bfloat16", "<i8"}


def test_sources_view_live_bytes_and_members_name_the_tensors() -> None:
    state = _state()
    layout = plan(state)
    bound = layout.bind(state)
    assert len(bound.sources) == len(layout.regions) == len(bound.members)
    for r, src, members in zip(layout.regions, bound.sources, bound.members, strict=True):
        assert src.dtype == torch.uint8 and src.dim() == 1 and src.numel() == r.nbytes
        assert all(any(m is leaf for leaf in _leaves(state)) for m in members)
    embed_region = next(i for i, m in enumerate(bound.members) if len(m) == 2)
    assert bound.members[embed_region][0] is state["model"]["embed"]
    state["model"]["embed"][0, 0] = 42.0  # a view, not a copy
    assert bound.sources[embed_region][:4].view(torch.float32).item() == 42.0
    # Copying the sources by hand is what copy_into does.
    by_hand = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for r, src in zip(layout.regions, layout.sources(state), strict=True):
        by_hand[r.offset : r.offset + r.nbytes].copy_(src)
    out = np.full(layout.nbytes, 0xAB, dtype=np.uint8)
    layout.copy_into(state, out)
    assert np.array_equal(by_hand.numpy(), out)  # padding zeroed even in a dirty buffer


def _leaves(state: Any) -> list[Any]:
    if isinstance(state, dict):
        return [x for v in state.values() for x in _leaves(v)]
    if isinstance(state, torch.Tensor | np.ndarray):
        return [state]
    return []


@pytest.mark.parametrize("kind", ["numpy", "tensor", "bytearray", "mmap", "memoryview"])
def test_pack_into_caller_buffers(kind: str) -> None:
    state = _state()
    layout = plan(state)
    size = layout.nbytes + 100
    out: Any
    if kind == "numpy":
        out = np.full(size, 7, dtype=np.uint8)
    elif kind == "tensor":
        out = torch.full((size,), 7, dtype=torch.uint8)
    elif kind == "bytearray":
        out = bytearray(b"\x07" * size)
    elif kind == "mmap":
        out = mmap.mmap(-1, size)
    else:
        out = memoryview(bytearray(size))
    packed = pack(state, out=out, layout=layout)
    assert packed.layout is layout and len(packed.data) == layout.nbytes
    whole, data = _raw(out), _raw(packed.data)
    assert whole[: layout.nbytes] == data
    assert whole[layout.nbytes :] == (b"\x00" if kind in ("mmap", "memoryview") else b"\x07") * 100
    packed.data[0] = 99  # a view of out, not a copy
    assert _raw(out)[0] == 99
    packed.data[0] = data[0]
    assert_same(state, unpack(packed.manifest, packed.data))
    del packed
    if kind == "mmap":
        out.close()


def _raw(buf: Any) -> bytes:
    return buf.numpy().tobytes() if isinstance(buf, torch.Tensor) else bytes(memoryview(buf))


def test_pack_without_out_allocates_an_aligned_exact_buffer() -> None:
    packed = pack(_state())
    assert packed.data.ctypes.data % 64 == 0 and len(packed.data) == packed.layout.nbytes


def test_bad_out_buffers_are_refused() -> None:
    state = _state()
    layout = plan(state)
    with pytest.raises(ValueError, match="needs"):
        layout.copy_into(state, np.empty(layout.nbytes - 1, dtype=np.uint8))
    with pytest.raises(TypeError, match="read-only"):
        pack(state, out=bytes(layout.nbytes))
    with pytest.raises(TypeError, match="uint8"):
        pack(state, out=np.empty(layout.nbytes, dtype=np.float32))


def test_unpack_into_restores_in_place() -> None:
    state = _state()
    packed = pack(state)
    live = _state()
    live["model"]["head"] = torch.zeros(3)  # shape differs: gets a new tensor
    ptrs = {k: v.data_ptr() for k, v in live["model"].items()}
    m = live["optim"]["state"][0]["m"]
    back = unpack(packed.manifest, packed.data, into=live)
    assert back["model"]["embed"] is live["model"]["embed"]
    assert back["model"]["embed"].data_ptr() == ptrs["embed"]
    assert back["optim"]["state"][0]["m"] is m
    assert back["np"] is live["np"]
    assert back["model"]["head"] is not live["model"]["head"]
    assert_same(state, back)


def test_unpack_into_a_model_state_dict_updates_the_parameters() -> None:
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    dst = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    packed = pack({"model": src.state_dict()})
    before = [p.data_ptr() for p in dst.parameters()]
    unpack(packed.manifest, packed.data, into={"model": dst.state_dict()})
    assert [p.data_ptr() for p in dst.parameters()] == before
    for a, b in zip(src.parameters(), dst.parameters(), strict=True):
        assert torch.equal(a, b)
    # Parameters themselves (requires_grad) are valid targets too.
    params = dict(dst.named_parameters())
    zeros = pack({k: torch.zeros_like(v) for k, v in params.items()})
    unpack(zeros.manifest, zeros.data, into=params)
    assert all(not p.detach().any() for p in dst.parameters())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_sources_copy_to_host_and_restore_into_device_tensors() -> None:
    state = {
        "w": torch.randn(64, 64, device="cuda"),
        "t": torch.randn(8, device="cuda").expand(3, 8),
    }
    layout = plan(state)
    assert all(src.device.type == "cuda" for src in layout.sources(state))
    assert {r.device for r in layout.regions} == {"cuda:0"}
    packed = pack(state)
    back = unpack(packed.manifest, packed.data)
    assert torch.equal(back["w"], state["w"].cpu())
    live = {"w": torch.zeros(64, 64, device="cuda"), "t": torch.zeros(3, 8, device="cuda")}
    ptr = live["w"].data_ptr()
    out = unpack(packed.manifest, packed.data, into=live)
    assert out["w"] is live["w"] and live["w"].data_ptr() == ptr
    assert torch.equal(live["w"], state["w"]) and torch.equal(live["t"], state["t"])


def _big_state(n: int) -> dict[str, Any]:
    """About n tensors shaped like a model plus its AdamW state."""
    params = {f"layers.{i // 4}.w{i % 4}": torch.zeros(16) for i in range(n // 3)}
    optim = {
        "state": {
            i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(16), "exp_avg_sq": torch.ones(8)}
            for i in range(n // 3)
        },
        "param_groups": [
            {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
             "amsgrad": False, "foreach": None, "params": list(range(n // 3))}
        ],
    }  # fmt: skip
    return {"model": params, "optim": optim, "step": 10, "rng": torch.get_rng_state()}


def test_manifest_reencode_is_cheap_for_a_thousand_tensors() -> None:
    state = _big_state(1000)
    layout = plan(state)
    assert len(layout.leaves) > 1000
    times = []
    for step in range(15):
        state["step"] = step
        t0 = time.perf_counter()
        layout.manifest(state)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    # A few ms on a quiet core; the bound leaves room for a shared CI machine.
    assert median < 0.025, f"Layout.manifest took {median * 1e3:.1f} ms for 1000+ tensors"


# Property: any state built from these pieces round-trips exactly.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_tensors = st.builds(
    lambda shape, dtype, t: (
        torch.arange(int(np.prod(shape)), dtype=dtype).reshape(shape).mT
        if t and len(shape) >= 2
        else torch.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    ),
    st.lists(st.integers(0, 4), max_size=3),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float64]),
    st.booleans(),
)
_arrays = st.builds(
    lambda n, dt: (np.arange(n) % 2).astype(dt),
    st.integers(0, 6),
    st.sampled_from(["<f4", ">i2", "?"]),
)
_states = st.recursive(
    _scalars | _tensors | _arrays,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4) | st.integers(-3, 3), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_states)
def test_random_states_roundtrip(state: Any) -> None:
    packed = pack(state)
    assert isinstance(packed.layout, Layout)
    assert_same(state, unpack(packed.manifest, packed.data))
    assert plan(state, previous=packed.layout) is packed.layout


def test_two_storages_over_one_memory_are_one_region() -> None:
    base = np.arange(100, dtype=np.float32)
    state = {"head": torch.from_numpy(base[:10]), "all": torch.from_numpy(base)}
    layout = plan(state)
    assert len(layout.regions) == 1 and layout.regions[0].nbytes == 400
    (src,) = layout.sources(state)  # through the storage that holds all 400 bytes
    assert src.numel() == 400
    assert_same(state, roundtrip(state))


@pytest.mark.parametrize("kind", ["memoryview", "ndarray", "bytearray"])
def test_manifests_and_data_are_read_from_any_buffer(kind: str) -> None:
    """A restore reads both straight out of a slot (numpy views, memoryviews)."""
    state = _state()
    packed = pack(state)
    manifest: Any = {
        "memoryview": memoryview(packed.manifest),
        "ndarray": np.frombuffer(packed.manifest, dtype=np.uint8),
        "bytearray": bytearray(packed.manifest),
    }[kind]
    data = np.asarray(packed.data).data  # a memoryview of the array
    assert_same(state, unpack(manifest, data))
