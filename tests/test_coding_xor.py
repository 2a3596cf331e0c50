"""XOR parity (m = 1) is Reed-Solomon parity byte for byte, and rebuilds any one lost chunk."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapstore import coding
from snapstore.coding import _ragged as ragged
from snapstore.coding import xor as xor_module
from tests.test_coding_support import padded, pyeclib_parity, random_chunks

XOR_BACKENDS = [
    b for b in ("isa_l_rs_vand", "liberasurecode_rs_vand") if b in coding.available_backends()
]

# Lengths around SIMD widths (16, 32, 64) and odd ones, plus a few larger.
lengths = st.one_of(st.integers(0, 200), st.sampled_from([255, 256, 257, 1000, 4095, 4097, 70000]))


@st.composite
def ragged_stripes(draw: st.DrawFn) -> tuple[int, list[int], int]:
    k = draw(st.integers(1, 10))
    chunk_lengths = draw(st.lists(lengths, min_size=k, max_size=k))
    seed = draw(st.integers(0, 2**32 - 1))
    return k, chunk_lengths, seed


@pytest.mark.parametrize("backend", XOR_BACKENDS)
@settings(max_examples=40, deadline=None)
@given(stripe=ragged_stripes())
def test_xor_parity_equals_pyeclib_parity(backend: str, stripe: tuple[int, list[int], int]) -> None:
    k, chunk_lengths, seed = stripe
    rng = np.random.default_rng(seed)
    data = random_chunks(rng, chunk_lengths)
    length = max(chunk_lengths)
    ours = coding.xor_parity(data)
    assert len(ours) == length
    if length:
        (theirs,) = pyeclib_parity(backend, k, 1, data, length)
        assert np.array_equal(ours, theirs)


@settings(max_examples=40, deadline=None)
@given(stripe=ragged_stripes(), lost_pick=st.integers(0, 10))
def test_xor_reconstruct_rebuilds_any_one_lost_chunk(
    stripe: tuple[int, list[int], int], lost_pick: int
) -> None:
    k, chunk_lengths, seed = stripe
    rng = np.random.default_rng(seed)
    data = random_chunks(rng, chunk_lengths)
    length = max(chunk_lengths)
    parity = coding.xor_parity(data)
    stripe_chunks = [*data, parity]
    lost = lost_pick % (k + 1)
    survivors = [c for i, c in enumerate(stripe_chunks) if i != lost]
    rebuilt = coding.xor_reconstruct(survivors, np.empty(length, dtype=np.uint8))
    assert np.array_equal(rebuilt, padded(stripe_chunks[lost], length))


@settings(max_examples=30, deadline=None)
@given(stripe=ragged_stripes(), start=st.integers(0, 5000), span=st.integers(0, 5000))
def test_xor_reconstruct_a_byte_range_from_the_same_range_of_survivors(
    stripe: tuple[int, list[int], int], start: int, span: int
) -> None:
    _, chunk_lengths, seed = stripe
    rng = np.random.default_rng(seed)
    data = random_chunks(rng, chunk_lengths)
    length = max(chunk_lengths)
    parity = coding.xor_parity(data)
    a = min(start, length)
    b = min(a + span, length)
    # Lose data chunk 0; survivors are sliced to [a, b) (shorter where they end).
    survivors = [c[a:b] for c in [*data[1:], parity]]
    out = np.empty(b - a, dtype=np.uint8)
    coding.xor_reconstruct(survivors, out)
    assert np.array_equal(out, padded(data[0], length)[a:b])


def test_blockwise_kernel_crosses_block_and_segment_boundaries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(xor_module, "XOR_BLOCK", 64)
    rng = np.random.default_rng(7)
    data = random_chunks(rng, [1000, 999, 130, 0, 1000])
    want = np.zeros(1000, dtype=np.uint8)
    for chunk in data:
        want[: len(chunk)] ^= chunk
    assert np.array_equal(coding.xor_parity(data), want)


def test_threads_split_gives_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ragged, "MIN_SPLIT_BYTES", 4096)  # split even small test stripes
    rng = np.random.default_rng(8)
    data = random_chunks(rng, [300_000, 250_001, 300_000])
    one = coding.xor_parity(data, threads=1)
    four = coding.xor_parity(data, threads=4)
    assert np.array_equal(one, four)


def test_xor_parity_writes_into_out_and_rejects_longer_inputs() -> None:
    out = np.full(8, 0xAA, dtype=np.uint8)
    result = coding.xor_parity([b"\x01\x02", bytearray(b"\x04")], out)
    assert result.base is out or result is out
    assert out.tolist() == [5, 2, 0, 0, 0, 0, 0, 0]
    with pytest.raises(coding.CodingError, match="longer than out"):
        coding.xor_parity([np.zeros(9, dtype=np.uint8)], out)
    with pytest.raises(coding.CodingError, match="writable"):
        coding.xor_parity([b"\x01"], b"\x00")


def test_codec_m1_vandermonde_parity_is_xor_and_cauchy_is_not() -> None:
    assert coding.ErasureCodec(4, 1).parity_is_xor
    assert not coding.ErasureCodec(4, 2).parity_is_xor
    if "isa_l_rs_cauchy" in coding.available_backends():
        assert not coding.ErasureCodec(4, 1, "isa_l_rs_cauchy").parity_is_xor
