"""Checksums: computed in place on any buffer; a corrupt chunk counts as lost."""

from __future__ import annotations

import itertools
import mmap

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from snapstore import coding
from snapstore.coding.checksum import check
from tests.test_coding_support import random_chunks


def test_checksum_is_xxh3_64_of_the_bytes_for_any_buffer() -> None:
    assert coding.CHECKSUM_NAME == "xxh3_64"
    raw = bytes(range(256)) * 5
    want = xxhash.xxh3_64_intdigest(raw)
    arr = np.frombuffer(raw, dtype=np.uint8)
    assert coding.checksum(raw) == want
    assert coding.checksum(arr) == want
    assert coding.checksum(memoryview(raw)) == want
    assert coding.checksum(arr.view(np.uint32)) == want
    assert coding.checksum(arr[100:200]) == xxhash.xxh3_64_intdigest(raw[100:200])
    assert 0 <= want < 2**64


def test_checksum_reads_shared_memory_in_place() -> None:
    with mmap.mmap(-1, 4096) as mem:
        mem[:5] = b"hello"
        view = np.frombuffer(mem, dtype=np.uint8)
        assert coding.checksum(view[:5]) == xxhash.xxh3_64_intdigest(b"hello")
        del view


def test_check_raises_checksum_mismatch_naming_the_chunk() -> None:
    with pytest.raises(coding.ChecksumMismatchError, match="chunk 3 of step 7"):
        check(b"abc", coding.checksum(b"abd"), "chunk 3 of step 7")
    check(b"abc", coding.checksum(b"abc"), "fine")


def test_verify_chunks_splits_good_from_bad() -> None:
    chunks = {0: b"aa", 1: b"bb", 2: b"cc"}
    sums = {i: coding.checksum(c) for i, c in chunks.items()}
    sums[1] ^= 1
    good, bad = coding.verify_chunks(chunks, sums)
    assert sorted(good) == [0, 2]
    assert bad == [1]
    with pytest.raises(coding.CodingError, match=r"no checksum recorded for chunks \[2\]"):
        coding.verify_chunks(chunks, {0: sums[0], 1: sums[1]})


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 6),
    m=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_corrupt_chunks_are_treated_as_lost(k: int, m: int, seed: int, data: st.DataObject) -> None:
    codec = coding.ErasureCodec(k, m)
    rng = np.random.default_rng(seed)
    chunks = random_chunks(rng, [257] * k)
    stripe = [*chunks, *codec.encode(chunks)]
    sums = {i: coding.checksum(c) for i, c in enumerate(stripe)}
    bad = sorted(data.draw(st.sets(st.integers(0, k + m - 1), min_size=1, max_size=m + 1)))
    damaged = [c.copy() for c in stripe]
    for i in bad:
        damaged[i][int(rng.integers(0, 257))] ^= 1 << int(rng.integers(0, 8))
    given_chunks = dict(enumerate(damaged))
    if len(bad) <= m:
        decoded = codec.decode(given_chunks, checksums=sums)
        for i in range(k + m):
            assert np.array_equal(decoded[i], stripe[i])
    else:
        with pytest.raises(coding.InsufficientChunksError) as info:
            codec.decode(given_chunks, checksums=sums)
        assert info.value.corrupt == bad
        assert info.value.missing == bad
        assert "failed their checksum" in str(info.value)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=6))
def test_checksummer_fed_in_pieces_equals_the_checksum_of_the_whole(
    data: bytes, cuts: list[int]
) -> None:
    arr = np.frombuffer(data, dtype=np.uint8)
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    h = coding.Checksummer()
    for a, b in itertools.pairwise(bounds):
        h.update(arr[a:b])
    assert h.value() == coding.checksum(data)


@pytest.mark.parametrize("sizes", [[], [0], [5, 0, 7], [3 << 20] * 4, [9 << 20, 1, 2 << 20]])
@pytest.mark.parametrize("threads", [None, 1, 3])
def test_checksums_hash_each_buffer_as_checksum_does(sizes: list[int], threads: int | None) -> None:
    """In order, whether hashed on the caller's thread (small) or on the pool (large)."""
    rng = np.random.default_rng(len(sizes))
    bufs = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    assert coding.checksums(bufs, threads) == tuple(coding.checksum(b) for b in bufs)
