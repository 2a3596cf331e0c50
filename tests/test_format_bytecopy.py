"""copy_many: the host-copy engine under pack and unpack(into=)."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import numpy as np
import pytest
import torch

from snapstore.format.bytecopy import CHUNK, copy_many
from snapstore.format.pack import pack, unpack
from tests.test_format import assert_same


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_copy_many_copies_every_byte_exactly_once_in_place(threads: int) -> None:
    rng = np.random.default_rng(threads)
    sizes = [0, 1, 63, 4096, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 1000]
    src = rng.integers(0, 256, sum(sizes), dtype=np.uint8)
    dst = np.zeros(sum(sizes) + 64, dtype=np.uint8)
    copies, at = [], 0
    for n in sizes:
        copies.append((dst.ctypes.data + 64 + at, src.ctypes.data + at, n))
        at += n
    copy_many(copies, threads)
    assert not dst[:64].any()
    assert np.array_equal(dst[64:], src)


def test_unpack_into_strided_and_odd_targets() -> None:
    state: dict[str, torch.Tensor | np.ndarray] = {
        "bf16_t": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t(),
        "f8": torch.arange(6, dtype=torch.float32).to(torch.float8_e4m3fn),
        "c": torch.arange(4.0).to(torch.complex128) * (1 + 2j),
        "np_rev": np.arange(6, dtype="<f8")[::-1],
        "x": torch.arange(8.0),
    }
    packed = pack(state)
    live: dict[str, Any] = {
        "bf16_t": torch.zeros(3, 4, dtype=torch.bfloat16).t(),  # non-contiguous target
        "f8": torch.zeros(6, dtype=torch.float8_e4m3fn),
        "c": torch.zeros(8, dtype=torch.complex128)[::2],
        "np_rev": np.zeros(6, dtype="<f8")[::-1],
        "x": torch.zeros(1).expand(8),  # overlapping memory: not a valid target
    }
    back = unpack(packed.manifest, packed.data, into=live, threads=2)
    for key in ("bf16_t", "f8", "c", "np_rev"):
        assert back[key] is live[key], key
    assert back["x"] is not live["x"] and not live["x"].any()
    for key, want in state.items():
        got = back[key]
        if isinstance(want, np.ndarray):
            assert np.array_equal(got, want), key
        else:  # same values whatever the strides (compared as complex128)
            assert torch.equal(got.to(torch.complex128), want.to(torch.complex128)), key
    fresh = unpack(packed.manifest, packed.data, threads=1)
    assert_same(state, fresh)


def _copy_in_child(conn: Any) -> None:
    src = np.arange(3 * CHUNK, dtype=np.uint8)
    dst = np.zeros_like(src)
    copy_many([(dst.ctypes.data, src.ctypes.data, src.nbytes)], threads=2)
    conn.send(bool(np.array_equal(dst, src)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_copy_many_works_in_a_forked_child_after_the_parent_used_threads() -> None:
    buf, sink = np.ones(3 * CHUNK, dtype=np.uint8), np.zeros(3 * CHUNK, dtype=np.uint8)
    copy_many([(sink.ctypes.data, buf.ctypes.data, buf.nbytes)], threads=2)
    assert sink.all()
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_copy_in_child, args=(child,))
    proc.start()
    assert parent.poll(30), "the forked child did not finish its copy"
    assert parent.recv() is True
    proc.join(10)
    assert proc.exitcode == 0
