"""The ctypes binding to ISA-L: the facts coding/isal.py relies on, checked on this machine."""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapstore.coding import gf256
from snapstore.coding.isal import Isal, MatrixKind, load, pointer_array

U8 = npt.NDArray[np.uint8]


@pytest.fixture(scope="module")
def isal() -> Isal:
    lib = load()
    if lib is None:
        pytest.skip("ISA-L library not bundled with this pyeclib install")
    return lib


def reference_apply(coeffs: U8, srcs: list[U8]) -> list[U8]:
    """``out[r] = XOR_i coeffs[r, i] * srcs[i]`` with the numpy multiplication table."""
    outs = []
    for row in coeffs:
        acc = np.zeros(len(srcs[0]), dtype=np.uint8)
        for c, src in zip(row, srcs, strict=True):
            acc ^= gf256.MUL[c][src]
        outs.append(acc)
    return outs


def test_library_loads_with_a_version(isal: Isal) -> None:
    assert os.path.basename(isal.path).startswith("libisal")
    assert isal.version[0].isdigit()


def test_numpy_field_table_matches_isal_gf_mul(isal: Isal) -> None:
    ours = gf256.MUL
    theirs = np.array([[isal.gf_mul(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)
    assert np.array_equal(ours, theirs)


KINDS: tuple[MatrixKind, ...] = ("vandermonde", "cauchy")


@pytest.mark.parametrize("kind", KINDS)
def test_encode_matrix_is_systematic(isal: Isal, kind: MatrixKind) -> None:
    mat = isal.gen_matrix(kind, 5, 3)
    assert mat.shape == (8, 5)
    assert np.array_equal(mat[:5], np.eye(5, dtype=np.uint8))


def test_vandermonde_first_parity_row_is_all_ones(isal: Isal) -> None:
    # This is why m = 1 Vandermonde parity is plain XOR.
    for k in range(1, 20):
        assert np.all(isal.gen_matrix("vandermonde", k, 1)[k] == 1)


def test_invert_gives_inverse_and_reports_singular(isal: Isal) -> None:
    mat = isal.gen_matrix("cauchy", 4, 4)[[1, 4, 5, 7]]
    inv = isal.invert(mat)
    assert inv is not None
    assert np.array_equal(gf256.matmul(mat, inv), np.eye(4, dtype=np.uint8))
    singular = np.array([[1, 2], [1, 2]], dtype=np.uint8)
    assert isal.invert(singular) is None


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 10),
    rows=st.integers(1, 8),
    length=st.integers(1, 300),
    offset=st.integers(0, 63),
    seed=st.integers(0, 2**32 - 1),
)
def test_ec_encode_data_any_length_and_alignment(
    isal: Isal, k: int, rows: int, length: int, offset: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    coeffs = rng.integers(0, 256, (rows, k), dtype=np.uint8)
    window = slice(offset, offset + length)
    srcs = [rng.integers(0, 256, length + 64, dtype=np.uint8)[window] for _ in range(k)]
    outs = [np.zeros(length + 64, dtype=np.uint8)[offset : offset + length] for _ in range(rows)]
    isal.encode(length, k, rows, isal.init_tables(coeffs), pointer_array(srcs), pointer_array(outs))
    for got, want in zip(outs, reference_apply(coeffs, srcs), strict=True):
        assert np.array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 10),
    rows=st.integers(1, 8),
    length=st.integers(1, 300),
    offset=st.integers(0, 63),
    seed=st.integers(0, 2**32 - 1),
)
def test_ec_encode_data_update_accumulates_one_source(
    isal: Isal, k: int, rows: int, length: int, offset: int, seed: int
) -> None:
    # ISA-L documents len >= 64 for the underlying gf_vect_mad; the dispatcher
    # handles short lengths itself. Checked here down to one byte.
    rng = np.random.default_rng(seed)
    coeffs = rng.integers(0, 256, (rows, k), dtype=np.uint8)
    vec_i = int(rng.integers(0, k))
    src = rng.integers(0, 256, length + 64, dtype=np.uint8)[offset : offset + length]
    start = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(rows)]
    outs = [np.zeros(length + 64, dtype=np.uint8)[offset : offset + length] for _ in range(rows)]
    for out, s in zip(outs, start, strict=True):
        out[:] = s
    tables = isal.init_tables(coeffs)
    isal.encode_update(length, k, rows, vec_i, tables, src.ctypes.data, pointer_array(outs))
    for r in range(rows):
        assert np.array_equal(outs[r], start[r] ^ gf256.MUL[coeffs[r, vec_i]][src])


def test_crc32_iscsi_is_crc32c(isal: Isal) -> None:
    # CRC-32C check value: crc of b"123456789" is 0xE3069283. ISA-L's
    # crc32_iscsi takes and returns the register without the final inversion.
    data = np.frombuffer(b"123456789", dtype=np.uint8)
    assert isal.crc32_iscsi(data, 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283
