"""Untrusted manifests and data: every malformation is a FormatError, never a crash.

Hand-forged manifests pin each check; hypothesis then throws random bytes,
mutated manifests and truncated data at unpack.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapstore.errors import FormatError
from snapstore.format.manifest import MAGIC, pack_value
from snapstore.format.pack import pack, read_manifest, unpack

Ext = msgpack.ExtType


def forge(
    nbytes: Any = 64,
    regions: Any = None,
    leaves: Any = None,
    tree: Any = None,
    *,
    magic: bytes = MAGIC,
    version: int = 1,
    flags: int = 0,
    extra: bytes = b"",
) -> bytes:
    """A manifest built by hand; defaults describe one float32[4] at path ['a']."""
    if regions is None:
        regions = [[0, 16]]
    if leaves is None:
        leaves = [leaf()]
    if tree is None:
        tree = {"a": Ext(1, b"\x00\x00\x00\x00")}
    body = pack_value([nbytes, regions, leaves, tree])  # ints beyond 64 bits as big-int exts
    return struct.pack("<8sHH", magic, version, flags) + body + extra


def leaf(**kw: Any) -> list[Any]:
    row = {
        "kind": 0,
        "dtype": "float32",
        "shape": [4],
        "strides": [1],
        "region": 0,
        "offset": 0,
        "flags": 0,
        "device": "cpu",
        "path": ["a"],
    }
    row.update(kw)
    return list(row.values())


DATA = bytes(range(64))


def test_forged_baseline_is_valid() -> None:
    state = unpack(forge(), DATA)
    assert torch.equal(state["a"], torch.frombuffer(bytearray(DATA[:16]), dtype=torch.float32))


def ref(i: int) -> Ext:
    return Ext(1, i.to_bytes(4, "big"))


def nested_tuples(depth: int) -> Ext:
    inner = msgpack.packb([])
    for _ in range(depth):
        inner = msgpack.packb([Ext(2, inner)])
    return Ext(2, inner)


BAD: dict[str, bytes] = {
    "empty": b"",
    "short prefix": MAGIC[:5],
    "prefix only": forge()[:12],
    "wrong magic": forge(magic=b"\x89PNG\r\n\x1a\n"),
    "future version": forge(version=2),
    "version zero": forge(version=0),
    "unknown flags": forge(flags=1),
    "body not an array": struct.pack("<8sHH", MAGIC, 1, 0) + msgpack.packb({"a": 1}),
    "body of 3 items": struct.pack("<8sHH", MAGIC, 1, 0) + msgpack.packb([64, [], []]),
    "trailing bytes": forge(extra=b"\x00"),
    "tree missing": forge()[:-8],
    "nbytes negative": forge(nbytes=-64),
    "nbytes unaligned": forge(nbytes=65),
    "nbytes huge": forge(nbytes=2**63),
    "nbytes string": forge(nbytes="64"),
    "region unaligned": forge(regions=[[8, 16]]),
    "region past data": forge(regions=[[0, 65]]),
    "region negative size": forge(regions=[[0, -16]]),
    "region bad row": forge(regions=[[0, 16, 1]]),
    "regions overlap": forge(
        nbytes=128, regions=[[0, 100], [64, 16]], leaves=[leaf(), leaf(region=1, path=["b"])]
    ),
    "region unused": forge(nbytes=128, regions=[[0, 16], [64, 16]]),
    "unknown torch dtype": forge(leaves=[leaf(dtype="float128")]),
    "quantized dtype": forge(leaves=[leaf(dtype="qint8")]),
    "numpy object dtype": forge(leaves=[leaf(kind=1, dtype="|O")]),
    "numpy void dtype": forge(leaves=[leaf(kind=1, dtype="|V16", shape=[1], strides=[16])]),
    "numpy str dtype": forge(leaves=[leaf(kind=1, dtype="<U1", strides=[4])]),
    "numpy unnormalized dtype": forge(leaves=[leaf(kind=1, dtype="=f4", strides=[4])]),
    "kind unknown": forge(leaves=[leaf(kind=2)]),
    "shape negative": forge(leaves=[leaf(shape=[-4])]),
    "shape float": forge(leaves=[leaf(shape=[4.0])]),
    "shape bool": forge(leaves=[leaf(shape=[True], strides=[1])]),
    "shape overflow": forge(leaves=[leaf(shape=[2**40, 2**40], strides=[0, 0])]),
    "ndim 65": forge(leaves=[leaf(shape=[1] * 65, strides=[1] * 65)]),
    "strides mismatch": forge(leaves=[leaf(strides=[1, 1])]),
    "tensor stride negative": forge(leaves=[leaf(strides=[-1], offset=12)]),
    "stride past region": forge(leaves=[leaf(strides=[2])]),
    "stride overflow": forge(leaves=[leaf(shape=[2, 2], strides=[2**61, 1])]),
    "offset past region": forge(leaves=[leaf(offset=4)]),
    "offset misaligned": forge(regions=[[0, 20]], leaves=[leaf(offset=2)]),
    "array before region": forge(leaves=[leaf(kind=1, dtype="<f4", strides=[-4], offset=8)]),
    "region index too big": forge(leaves=[leaf(region=1)]),
    "empty leaf with region": forge(leaves=[leaf(shape=[0])]),
    "leaf without region": forge(regions=[], leaves=[leaf(region=-1)]),
    "flags unknown": forge(leaves=[leaf(flags=4)]),
    "device path": forge(leaves=[leaf(device="../../x")]),
    "device long": forge(leaves=[leaf(device="a" * 100)]),
    "path float key": forge(leaves=[leaf(path=[1.5])]),
    "path not a list": forge(leaves=[leaf(path="a")]),
    "leaf row short": forge(leaves=[leaf()[:8]]),
    "leaf table not a list": forge(leaves={"a": 1}),
    "requires grad on ints": forge(leaves=[leaf(dtype="int32", flags=1)]),
    "ref out of range": forge(tree=[ref(1)]),
    "ref wrong length": forge(tree=[Ext(1, b"\x00")]),
    "ref in header": forge(leaves=[leaf(path=[ref(0)])]),
    "unknown ext": forge(tree=[Ext(99, b"")]),
    "empty bigint": forge(tree=[Ext(3, b"")]),
    "tuple not array": forge(tree=[Ext(2, msgpack.packb({"a": 1}))]),
    "tuple truncated": forge(tree=[Ext(2, msgpack.packb([1, 2, 3])[:-1])]),
    "tuple trailing": forge(tree=[Ext(2, msgpack.packb([1]) + b"\x01")]),
    "tuple bomb": forge(tree=nested_tuples(500)),
    "list bomb": forge(tree=msgpack.ExtType(2, b"\x91" * 5000 + b"\xc0")),
    "map float key": forge(tree={1.5: 1}),
    "map bytes key": forge(tree={b"k": 1}),
    "map none key": forge(tree={None: 1}),
    "odict not map": forge(tree=Ext(4, msgpack.packb([[1, 2]]))),
    "odict bad metadata": forge(tree=Ext(4, msgpack.packb([{}, 5]))),
    "npscalar short": forge(tree=Ext(5, msgpack.packb(["<f8", b"\x00"]))),
    "npscalar object": forge(tree=Ext(5, msgpack.packb(["|O", b"\x00" * 8]))),
    "dtype not a dtype": forge(tree=Ext(6, b"Tensor")),
    "dtype garbage": forge(tree=Ext(6, b"\xff\xfe")),
    "size of strings": forge(tree=Ext(7, msgpack.packb(["a"]))),
    "device garbage": forge(tree=Ext(8, b"not a device!")),
    "string bad utf8": forge(tree=Ext(2, b"\x91\xa2\xff\xfe")),
    "array header lies": forge(tree=Ext(2, b"\xdd\xff\xff\xff\xff")),
}


@pytest.mark.parametrize("manifest", list(BAD.values()), ids=list(BAD))
def test_malformed_manifests_raise_format_error(manifest: bytes) -> None:
    with pytest.raises(FormatError):
        unpack(manifest, DATA)


def test_messages_say_what_was_expected() -> None:
    with pytest.raises(FormatError, match=r"version 2.*reads version 1"):
        unpack(BAD["future version"], DATA)
    with pytest.raises(FormatError, match="not a snapstore manifest"):
        read_manifest(BAD["wrong magic"])
    with pytest.raises(FormatError, match=r"leaf 0: bytes \[0, 28\) lie outside its 16-byte"):
        unpack(BAD["stride past region"], DATA)


def test_short_data_is_refused_before_any_allocation() -> None:
    with pytest.raises(FormatError, match="data holds 63 bytes"):
        unpack(forge(), DATA[:63])
    huge = forge(nbytes=2**61, regions=[[0, 2**61 - 64]], leaves=[leaf(shape=[2**58])])
    with pytest.raises(FormatError, match="truncated data"):
        unpack(huge, DATA)
    with pytest.raises(TypeError):
        unpack(forge(), [1, 2, 3])


def test_msgpack_timestamps_decode_as_plain_ints() -> None:
    stamp = msgpack.Timestamp(5, 0)
    assert unpack(forge(tree={"a": ref(0), "t": stamp}), DATA)["t"] == 5_000_000_000


def _sample() -> tuple[bytes, bytes, Any]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "w": base,
        "wt": base.t(),
        "b": torch.ones(3, dtype=torch.bfloat16),
        "n": np.arange(5, dtype=">i4")[::-1],
        "e": torch.empty(0, 2),
        "meta": {"step": 7, "betas": (0.9, 0.99), "big": 2**80, "x": np.float32(1)},
    }
    packed = pack(state)
    return packed.manifest, np.asarray(packed.data).tobytes(), state


MANIFEST, SAMPLE_DATA, LIVE = _sample()


def test_every_truncation_of_a_manifest_is_refused() -> None:
    for n in range(len(MANIFEST)):
        with pytest.raises(FormatError):
            unpack(MANIFEST[:n], SAMPLE_DATA)


def test_every_truncation_of_the_data_is_refused() -> None:
    for n in range(0, len(SAMPLE_DATA), 7):
        with pytest.raises(FormatError):
            unpack(MANIFEST, SAMPLE_DATA[:n])


# SNAPSTORE_FUZZ_EXAMPLES=20000 fuzzes deeper than the suite's default.
_EXAMPLES = int(os.environ.get("SNAPSTORE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _survives(manifest: bytes, data: bytes) -> None:
    """Either a state or FormatError; nothing else may escape."""
    for kwargs in ({}, {"copy": False}, {"into": LIVE}):
        with contextlib.suppress(FormatError):
            unpack(manifest, data, **kwargs)
    with contextlib.suppress(FormatError):
        read_manifest(manifest)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(blob: bytes) -> None:
    with pytest.raises(FormatError):
        unpack(blob, SAMPLE_DATA)
    _survives(MANIFEST[:12] + blob, SAMPLE_DATA)


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(12, len(MANIFEST) - 1), st.integers(0, 255), st.sampled_from("sid")),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_manifests(edits: list[tuple[int, int, str]]) -> None:
    blob = bytearray(MANIFEST)
    for at, value, how in edits:
        at = min(at, len(blob) - 1)
        if how == "s":
            blob[at] = value
        elif how == "i":
            blob.insert(at, value)
        else:
            del blob[at]
    _survives(bytes(blob), SAMPLE_DATA)


_edgy = st.integers(-3, 70) | st.sampled_from([2**31, 2**62 - 1, 2**62, 2**63, -(2**62)])


@FUZZ
@given(st.integers(0, 6), _edgy | st.integers(-(2**64), 2**64), st.booleans())
def test_forged_numbers_anywhere_in_a_leaf(column: int, value: int, array: bool) -> None:
    row = leaf(kind=1, dtype="<f4", strides=[4]) if array else leaf()
    row[column] = [value] if column in (2, 3) else value  # shape and strides are lists
    _survives(forge(leaves=[row]), DATA)


_small = st.integers(-8, 16)
_rows = st.builds(
    lambda kind, dtype, dims, region, offset: leaf(
        kind=kind,
        dtype=dtype if kind == 0 else {"float32": "<f4", "bfloat16": ">i2", "bool": "|b1"}[dtype],
        shape=[n for n, _ in dims],
        strides=[s for _, s in dims],
        region=region,
        offset=offset,
    ),
    st.integers(0, 1),
    st.sampled_from(["float32", "bfloat16", "bool"]),
    st.lists(st.tuples(st.integers(0, 5), _small), max_size=3),
    st.integers(-1, 1),
    st.integers(0, 24),
)


@FUZZ
@given(
    st.lists(st.integers(0, 64), min_size=1, max_size=2),
    st.lists(_rows, min_size=1, max_size=3),
)
def test_forged_tables(sizes: list[int], rows: list[list[Any]]) -> None:
    """Small random geometry (edge values are the test above), to reach the view code."""
    regions = [[64 * i, n] for i, n in enumerate(sizes)]
    tree = [ref(i) for i in range(len(rows))]
    _survives(forge(nbytes=128, regions=regions, leaves=rows, tree=tree), bytes(range(128)))
