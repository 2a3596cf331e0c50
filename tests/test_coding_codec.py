"""ErasureCodec: parity equals pyeclib's, any m losses are rebuilt bitwise, errors are clear.

One contract, every implementation: each property runs against every
available backend and, for the ISA-L backends, against both engines (the
ctypes fast path and pyeclib's interface as fallback).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapstore import coding
from snapstore.coding import _ragged as ragged
from snapstore.coding.isal import load
from snapstore.coding.isal_engine import IsalEngine, guaranteed_invertible
from tests.test_coding_support import U8, padded, pyeclib_parity, random_chunks

AVAILABLE = coding.available_backends()
VARIANTS = [(b, "auto") for b in AVAILABLE] + [
    (b, "pyeclib") for b in AVAILABLE if b.startswith("isa_l") and load() is not None
]
IDS = [f"{b}-{impl}" for b, impl in VARIANTS]


@st.composite
def layouts(draw: st.DrawFn, max_total: int = 10) -> tuple[int, int]:
    k = draw(st.integers(1, max_total - 1))
    m = draw(st.integers(1, min(max_total - k, 4)))
    return k, m


def make(backend: str, impl: str, k: int, m: int) -> coding.ErasureCodec:
    return coding.ErasureCodec(k, m, backend, implementation=impl)  # type: ignore[arg-type]


def even_for(codec: coding.ErasureCodec, n: int) -> int:
    return n - n % codec.word_size


lengths = st.one_of(st.integers(1, 130), st.sampled_from([255, 256, 1000, 4096, 65537]))


@pytest.mark.parametrize(("backend", "impl"), VARIANTS, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(layout=layouts(), length=lengths, seed=st.integers(0, 2**32 - 1))
def test_encode_equals_pyeclib_byte_for_byte(
    backend: str, impl: str, layout: tuple[int, int], length: int, seed: int
) -> None:
    k, m = layout
    codec = make(backend, impl, k, m)
    length = max(even_for(codec, length), codec.word_size)
    data = random_chunks(np.random.default_rng(seed), [length] * k)
    ours = codec.encode(data)
    theirs = pyeclib_parity(backend, k, m, data, length)
    for j in range(m):
        assert np.array_equal(ours[j], theirs[j]), f"parity {j} differs"


@pytest.mark.parametrize(("backend", "impl"), VARIANTS, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(layout=layouts(), length=lengths, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_decode_recovers_any_m_lost_chunks(
    backend: str, impl: str, layout: tuple[int, int], length: int, seed: int, data: st.DataObject
) -> None:
    k, m = layout
    codec = make(backend, impl, k, m)
    length = max(even_for(codec, length), codec.word_size)
    chunks = random_chunks(np.random.default_rng(seed), [length] * k)
    stripe = [*chunks, *codec.encode(chunks)]
    lost = data.draw(st.sets(st.integers(0, k + m - 1), max_size=m), label="lost")
    decoded = codec.decode({i: c for i, c in enumerate(stripe) if i not in lost})
    assert len(decoded) == k + m
    for i in range(k + m):
        assert np.array_equal(decoded[i], stripe[i]), f"chunk {i} differs (lost {sorted(lost)})"


@pytest.mark.parametrize(("backend", "impl"), VARIANTS, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(layout=layouts(), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_ragged_encode_and_range_rebuild(
    backend: str, impl: str, layout: tuple[int, int], seed: int, data: st.DataObject
) -> None:
    """Short chunks count as zero-padded; a byte range is rebuilt from the same range."""
    k, m = layout
    codec = make(backend, impl, k, m)
    word = codec.word_size
    length = data.draw(st.integers(0, 3000), label="length") // word * word
    chunk_lengths = data.draw(st.lists(st.integers(0, length), min_size=k, max_size=k))
    rng = np.random.default_rng(seed)
    chunks = random_chunks(rng, chunk_lengths)
    parity = [np.full(length, 0x5A, dtype=np.uint8) for _ in range(m)]
    codec.encode_into(chunks, parity)
    full = [padded(c, length) for c in chunks] + parity
    # Padded parity equals parity of padded data: compare with equal-length encode.
    if length:
        assert all(
            np.array_equal(p, q) for p, q in zip(parity, codec.encode(full[:k]), strict=True)
        )

    lost = sorted(data.draw(st.sets(st.integers(0, k + m - 1), min_size=1, max_size=m)))
    a = data.draw(st.integers(0, length), label="a") // word * word
    b = a + data.draw(st.integers(0, length - a), label="span") // word * word
    # Survivors are sliced to [a, b) in their own (ragged) lengths.
    originals: list[U8] = [*chunks, *parity]
    survivors = {i: originals[i][a:b] for i in range(k + m) if i not in lost}
    out = {i: np.full(b - a, 0xEE, dtype=np.uint8) for i in lost}
    codec.reconstruct_into(survivors, out)
    for i in lost:
        assert np.array_equal(out[i], full[i][a:b]), f"range [{a}, {b}) of chunk {i} differs"


@pytest.mark.parametrize(("backend", "impl"), VARIANTS, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(layout=layouts(), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_update_parity_equals_reencoding(
    backend: str, impl: str, layout: tuple[int, int], seed: int, data: st.DataObject
) -> None:
    k, m = layout
    codec = make(backend, impl, k, m)
    length = max(data.draw(st.integers(1, 2000), label="length") // codec.word_size, 1)
    length *= codec.word_size
    rng = np.random.default_rng(seed)
    chunks = random_chunks(rng, [length] * k)
    parity = codec.encode(chunks)
    index = data.draw(st.integers(0, k - 1), label="index")
    changed = data.draw(st.integers(0, length), label="changed bytes")  # any, even odd
    delta = rng.integers(0, 256, changed, dtype=np.uint8)
    chunks[index][:changed] ^= delta
    codec.update_parity_into(index, delta, parity)
    for got, want in zip(parity, codec.encode(chunks), strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize(("backend", "impl"), VARIANTS, ids=IDS)
def test_fewer_than_k_chunks_names_the_missing_indices(backend: str, impl: str) -> None:
    codec = make(backend, impl, 4, 2)
    chunks = random_chunks(np.random.default_rng(1), [64] * 4)
    stripe = [*chunks, *codec.encode(chunks)]
    present = {i: stripe[i] for i in (1, 4, 5)}
    with pytest.raises(coding.InsufficientChunksError) as info:
        codec.decode(present)
    assert info.value.missing == [0, 2, 3]
    assert info.value.present == [1, 4, 5]
    assert info.value.needed == 4
    assert "[0, 2, 3]" in str(info.value)
    out = {0: np.empty(64, dtype=np.uint8)}
    with pytest.raises(coding.InsufficientChunksError) as info:
        codec.reconstruct_into(present, out)
    assert info.value.missing == [0, 2, 3]


def test_threads_give_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ragged, "MIN_SPLIT_BYTES", 4096)  # split even small test stripes
    codec = coding.ErasureCodec(4, 2)
    rng = np.random.default_rng(3)
    chunks = random_chunks(rng, [400_000, 400_000, 123_457, 399_999])
    one = [np.empty(400_000, dtype=np.uint8) for _ in range(2)]
    two = [np.empty(400_000, dtype=np.uint8) for _ in range(2)]
    codec.encode_into(chunks, one, threads=1)
    codec.encode_into(chunks, two, threads=3)
    assert all(np.array_equal(x, y) for x, y in zip(one, two, strict=True))
    rebuilt = {0: np.empty(400_000, dtype=np.uint8), 2: np.empty(400_000, dtype=np.uint8)}
    codec.reconstruct_into({1: chunks[1], 3: chunks[3], 4: one[0], 5: one[1]}, rebuilt, threads=2)
    assert np.array_equal(rebuilt[0], chunks[0])
    assert np.array_equal(rebuilt[2], padded(chunks[2], 400_000))


def test_any_buffer_type_is_read_in_place() -> None:
    codec = coding.ErasureCodec(3, 2)
    rng = np.random.default_rng(4)
    arrays = random_chunks(rng, [96] * 3)
    as_bytes = [
        arrays[0].tobytes(),
        memoryview(bytearray(arrays[1].tobytes())),
        arrays[2].view(np.float32),
    ]
    assert all(
        np.array_equal(p, q)
        for p, q in zip(codec.encode(as_bytes), codec.encode(arrays), strict=True)
    )
    parity = [bytearray(96), memoryview(bytearray(96))]
    codec.encode_into(arrays, parity)
    assert bytes(parity[0]) == codec.encode(arrays)[0].tobytes()
    decoded = codec.decode({0: arrays[0], 1: arrays[1], 3: bytes(parity[0])})
    assert np.shares_memory(decoded[0], arrays[0])  # present chunks come back as views
    assert np.array_equal(decoded[2], arrays[2])


def test_zero_length_stripes() -> None:
    codec = coding.ErasureCodec(3, 2)
    empty = np.empty(0, dtype=np.uint8)
    assert [len(p) for p in codec.encode([empty] * 3)] == [0, 0]
    assert [len(p) for p in codec.encode([empty] * 3, threads=2)] == [0, 0]
    parity = [np.full(10, 9, dtype=np.uint8) for _ in range(2)]
    codec.encode_into([empty] * 3, parity)
    assert all(not p.any() for p in parity)


def test_reconstruct_can_recompute_a_present_chunk() -> None:
    """An index in out is never read from chunks: scrubbing parity against the data."""
    codec = coding.ErasureCodec(3, 2)
    chunks = random_chunks(np.random.default_rng(5), [50] * 3)
    parity = codec.encode(chunks)
    stale = parity[1].copy()
    stale[0] ^= 1
    fresh = {4: np.empty(50, dtype=np.uint8)}
    codec.reconstruct_into({0: chunks[0], 1: chunks[1], 2: chunks[2], 4: stale}, fresh)
    assert np.array_equal(fresh[4], parity[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 2), "k >= 1"),
        ((3, 0), "m >= 1"),
        ((30, 3), "exceeds 32"),
        ((2.0, 1), "k must be an int"),
        ((3, 2, "jerasure_rs_vand"), "valid choices: isa_l_rs_vand, isa_l_rs_cauchy"),
        ((6, 5), "isa_l_rs_cauchy"),
    ],
)
def test_bad_layouts_and_backends_are_refused_with_reasons(
    args: tuple[object, ...], message: str
) -> None:
    with pytest.raises(coding.CodingError, match=message):
        coding.ErasureCodec(*args)  # type: ignore[arg-type]


def test_bad_buffers_are_refused_with_reasons() -> None:
    codec = coding.ErasureCodec(3, 2)
    a = np.zeros(10, dtype=np.uint8)
    with pytest.raises(coding.CodingError, match=r"equal-length.*data chunk 2=9"):
        codec.encode([a, a, a[:9]])
    with pytest.raises(coding.CodingError, match="k=3 data chunks, got 2"):
        codec.encode([a, a])
    with pytest.raises(coding.CodingError, match="longer than the parity"):
        codec.encode_into([a, a, np.zeros(11, dtype=np.uint8)], [np.empty(10, np.uint8)] * 2)
    with pytest.raises(coding.CodingError, match="writable"):
        codec.encode_into([a, a, a], [bytes(10), bytes(10)])
    with pytest.raises(coding.CodingError, match="one length"):
        codec.encode_into([a, a, a], [np.empty(10, np.uint8), np.empty(11, np.uint8)])
    with pytest.raises(coding.CodingError, match="C-contiguous"):
        codec.encode([a, a, np.zeros(20, dtype=np.uint8)[::2]])
    with pytest.raises(coding.CodingError, match="overlaps"):
        codec.encode_into([a, a, a], [a, np.empty(10, np.uint8)])
    with pytest.raises(coding.CodingError, match=r"index 7 out of range.*3\.\.4 \(parity\)"):
        codec.decode({0: a, 1: a, 7: a})
    with pytest.raises(coding.CodingError, match="equal-length chunks"):
        codec.decode({0: a, 1: a, 2: a[:5]})
    with pytest.raises(coding.CodingError, match="equal-length outputs"):
        codec.reconstruct_into(
            {0: a, 1: a, 2: a}, {3: np.empty(4, np.uint8), 4: np.empty(5, np.uint8)}
        )
    with pytest.raises(coding.CodingError, match=r"data chunk index 0\.\.2"):
        codec.update_parity_into(3, a, [np.empty(10, np.uint8)] * 2)
    with pytest.raises(coding.CodingError, match="longer than the parity"):
        codec.update_parity_into(
            0, np.zeros(11, np.uint8), [np.empty(10, np.uint8), np.empty(10, np.uint8)]
        )
    with pytest.raises(coding.CodingError, match="threads"):
        codec.encode([a, a, a], threads=0)


def test_word_size_of_liberasurecode_rs_vand_is_enforced() -> None:
    if "liberasurecode_rs_vand" not in AVAILABLE:
        pytest.skip("liberasurecode_rs_vand not available")
    codec = coding.ErasureCodec(3, 2, "liberasurecode_rs_vand")
    assert codec.word_size == 2
    with pytest.raises(coding.CodingError, match="multiple of 2 bytes"):
        codec.encode([np.zeros(7, dtype=np.uint8)] * 3)


def test_unknown_backend_lists_available_ones() -> None:
    assert AVAILABLE[0] == "isa_l_rs_vand"
    assert set(AVAILABLE) <= set(coding.BACKENDS)


@pytest.mark.parametrize(("k", "m"), [(4, 2), (8, 2), (10, 4), (5, 5), (3, 8), (12, 3)])
def test_allowed_vandermonde_layouts_decode_every_erasure_pattern(k: int, m: int) -> None:
    assert guaranteed_invertible("vandermonde", k, m)
    isal = load()
    if isal is None:
        pytest.skip("ISA-L not loadable")
    engine = IsalEngine(isal, "vandermonde", k, m)
    for survivors in itertools.combinations(range(k + m), k):
        assert isal.invert(engine.matrix[list(survivors)]) is not None, survivors


def test_refused_vandermonde_layout_really_has_an_undecodable_pattern() -> None:
    isal = load()
    if isal is None:
        pytest.skip("ISA-L not loadable")
    engine = IsalEngine(isal, "vandermonde", 6, 5)
    singular = [
        s
        for s in itertools.combinations(range(11), 6)
        if isal.invert(engine.matrix[list(s)]) is None
    ]
    assert singular, "ISA-L's documented bound says (6, 5) has singular patterns"
    with pytest.raises(coding.CodingError, match="singular"):
        engine.decode_rows(singular[0], tuple(i for i in range(11) if i not in singular[0]))
    # With more than k survivors the engine tries another subset instead of failing.
    extra = next(i for i in range(11) if i not in singular[0])
    chosen, _ = engine.decode_rows(tuple(sorted((*singular[0], extra))), (singular[0][0],))
    assert isal.invert(engine.matrix[list(chosen)]) is not None
