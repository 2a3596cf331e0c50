"""The fast path: Reed-Solomon by ISA-L's ``ec_encode_data`` on the caller's buffers.

Everything is "apply a coefficient matrix to a list of sources": encoding
applies the m parity rows of the encode matrix E to the k data chunks;
rebuilding applies ``E[wanted] @ inverse(E[chosen])`` to k surviving chunks
(data rows of E are the identity, so the same formula yields data and parity
rows); an update applies one column of E to a delta and XORs the result in.

The encode matrices are exactly those liberasurecode builds for pyeclib's
``isa_l_rs_vand`` (``gf_gen_rs_matrix``) and ``isa_l_rs_cauchy``
(``gf_gen_cauchy1_matrix``), so the parity is byte for byte pyeclib's.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from snapstore.coding import gf256
from snapstore.coding._buffers import U8, address
from snapstore.coding._ragged import run_split, segments
from snapstore.coding.errors import CodingError
from snapstore.coding.isal import MAX_CALL_BYTES, Isal, MatrixKind, pointer_array
from snapstore.coding.xor import xor_into, xor_update

__all__ = ["XOR_PREFERRED", "IsalEngine"]

Matrix = npt.NDArray[np.uint8]

XOR_PREFERRED = False
"""Whether m = 1 codes whose parity row is all ones run on numpy XOR instead of ISA-L.

bench/codec.py measures both on one core. On 512 MiB stripes ISA-L's
``ec_encode_data`` was ahead in five of five runs for (3, 1) (17-21 GB/s
against 13-18) and four of five for (2, 1); on 64 MiB stripes the order
flipped between runs (docs/performance-codec.md). So m = 1 stays on ISA-L;
the XOR kernels remain public functions and the reference the tests hold
both against.
"""

# ec_encode_data computes up to 6 output rows per pass over the sources and
# repeats the pass for more rows; blocking keeps the sources in cache then.
_ROWS_PER_PASS = 6
_MULTI_PASS_BLOCK_BYTES = 1 << 20
# Decode-row and table caches: one entry per erasure pattern seen. Stripe
# groups have few patterns; the bound only stops pathological growth.
_CACHE_LIMIT = 1024
# How many other k-subsets of the present chunks to try when the first is
# singular (only possible with the Vandermonde matrix, see validate_matrix).
_MAX_SUBSET_TRIES = 256


class IsalEngine:
    """ISA-L engine for one (k, m, matrix kind). Thread-safe; caches are shared."""

    def __init__(
        self, isal: Isal, kind: MatrixKind, k: int, m: int, *, xor: bool | None = None
    ) -> None:
        self._isal = isal
        self._k = k
        self._m = m
        self.kind = kind
        self.matrix: Matrix = isal.gen_matrix(kind, k, m)
        self.parity_is_xor = m == 1 and bool(np.all(self.matrix[k] == 1))
        self.use_xor = self.parity_is_xor and (XOR_PREFERRED if xor is None else xor)
        self.word_size = 1  # GF(2^8): every byte is coded on its own
        self._lock = threading.Lock()
        self._tables: dict[bytes, U8] = {}
        self._decode: dict[
            tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], Matrix]
        ] = {}

    @property
    def name(self) -> str:
        path = "numpy XOR" if self.use_xor else "ctypes"
        return f"isa-l {self._isal.version} ({path})"

    # -- the Engine protocol -------------------------------------------------

    def encode_into(self, data: Sequence[U8], parity: Sequence[U8], threads: int) -> None:
        if self.use_xor:
            xor_into(data, parity[0], threads=threads)
        else:
            self._apply(self.matrix[self._k :], data, parity, threads)

    def reconstruct_into(
        self, present: Mapping[int, U8], out: Mapping[int, U8], threads: int
    ) -> None:
        wanted = tuple(sorted(out))
        chosen, rows = self.decode_rows(tuple(sorted(present)), wanted)
        srcs = [present[i] for i in chosen]
        dsts = [out[i] for i in wanted]
        if self.use_xor and len(wanted) == 1 and wanted[0] not in chosen:
            xor_into(srcs, dsts[0], threads=threads)
        else:
            self._apply(rows, srcs, dsts, threads)

    def update_parity_into(self, index: int, delta: U8, parity: Sequence[U8]) -> None:
        if self.use_xor:
            xor_update(delta, parity[0])
            return
        n = len(delta)
        if n == 0:
            return
        column = np.ascontiguousarray(self.matrix[self._k :, index : index + 1])
        tables = self._tables_for(column)
        dsts = pointer_array(parity)
        for a in range(0, n, MAX_CALL_BYTES):
            b = min(a + MAX_CALL_BYTES, n)
            self._isal.encode_update(b - a, 1, self._m, 0, tables, address(delta) + a, dsts + a)

    # -- matrices ------------------------------------------------------------

    def decode_rows(
        self, present: tuple[int, ...], wanted: tuple[int, ...]
    ) -> tuple[tuple[int, ...], Matrix]:
        """Pick k of the ``present`` chunks and the rows that rebuild ``wanted`` from them.

        Returns ``(chosen, rows)`` with ``rows`` of shape (len(wanted), k) such
        that chunk ``wanted[r]`` = sum_j rows[r, j] * chunk ``chosen[j]``.
        Cached per (present, wanted): a stripe group sees few erasure patterns.
        """
        key = (present, wanted)
        with self._lock:
            hit = self._decode.get(key)
        if hit is not None:
            return hit
        result = self._solve(present, wanted)
        with self._lock:
            if len(self._decode) >= _CACHE_LIMIT:
                self._decode.clear()
            self._decode[key] = result
        return result

    def _solve(
        self, present: tuple[int, ...], wanted: tuple[int, ...]
    ) -> tuple[tuple[int, ...], Matrix]:
        k = self._k
        subsets = itertools.islice(itertools.combinations(present, k), _MAX_SUBSET_TRIES)
        for chosen in subsets:
            inverse = self._isal.invert(self.matrix[list(chosen)])
            if inverse is not None:
                rows = gf256.matmul(self.matrix[list(wanted)], inverse)
                return chosen, np.ascontiguousarray(rows)
        raise CodingError(
            f"chunks {list(present)} of a {self.kind} RS({k},{self._m}) stripe cannot rebuild "
            f"{list(wanted)}: every tried {k}-subset gives a singular matrix. ISA-L's Vandermonde "
            "matrix is not invertible for every erasure pattern at this (k, m); use the "
            "isa_l_rs_cauchy backend, whose every square submatrix is invertible"
        )

    def _tables_for(self, coeffs: Matrix) -> U8:
        key = coeffs.shape[0].to_bytes(2, "little") + coeffs.tobytes()
        with self._lock:
            tables = self._tables.get(key)
        if tables is None:
            tables = self._isal.init_tables(coeffs)
            with self._lock:
                if len(self._tables) >= _CACHE_LIMIT:
                    self._tables.clear()
                self._tables[key] = tables
        return tables

    # -- bytes ---------------------------------------------------------------

    def _apply(self, coeffs: Matrix, srcs: Sequence[U8], dsts: Sequence[U8], threads: int) -> None:
        """``dsts[r] = sum_i coeffs[r, i] * srcs[i]`` on [0, len(dsts[0])), ragged sources."""
        length = len(dsts[0])
        lengths = [min(len(s), length) for s in srcs]
        rows = len(dsts)
        dst_ptrs = pointer_array(dsts)

        def work(start: int, stop: int) -> None:
            for a, b, live in segments(lengths, start, stop):
                if not live:
                    for d in dsts:
                        d[a:b] = 0
                    continue
                sub = np.ascontiguousarray(coeffs[:, list(live)])
                tables = self._tables_for(sub)
                src_ptrs = pointer_array([srcs[i] for i in live])
                block = MAX_CALL_BYTES
                if rows > _ROWS_PER_PASS:
                    block = max(64 * 1024, _MULTI_PASS_BLOCK_BYTES // len(live))
                for s in range(a, b, block):
                    e = min(s + block, b)
                    self._isal.encode(e - s, len(live), rows, tables, src_ptrs + s, dst_ptrs + s)

        run_split(work, length, threads)


def guaranteed_invertible(kind: MatrixKind, k: int, m: int) -> bool:
    """Whether ISA-L documents every erasure pattern of this matrix as recoverable.

    Cauchy: always. Vandermonde (``gf_gen_rs_matrix``), from ISA-L's
    erasure_code.h, in terms of data k and parity m: k <= 3; k = 4 and
    k + m <= 25; k = 5 and k + m <= 10; k <= 21 and m = 4; or m <= 3.
    """
    if kind == "cauchy":
        return True
    return (
        k <= 3
        or (k == 4 and k + m <= 25)
        or (k == 5 and k + m <= 10)
        or (k <= 21 and m == 4)
        or m <= 3
    )
