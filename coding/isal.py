"""ctypes binding to the ISA-L library that pyeclib's wheel ships.

pyeclib's Python interface copies every input into fresh aligned buffers,
allocates new output bytes and prepends 80-byte headers; that costs far more
than the arithmetic (see docs/performance-codec.md). The arithmetic itself is
ISA-L's ``ec_encode_data``, which this module calls directly on the caller's
buffers. ctypes releases the GIL around each call, so several threads can
encode disjoint byte ranges at once.

The library is ``<site-packages>/pyeclib.libs/libisal*.so*`` (auditwheel puts
the bundled libraries next to the package). :func:`load` returns ``None`` when
it or a needed symbol is missing; callers then fall back to pyeclib.

ISA-L facts this binding relies on (checked by tests/test_coding_isal.py):

- ``ec_encode_data(len, k, rows, tables, src**, dst**)`` accepts any length
  and any alignment; ``len`` is a C int, so callers split at 2^30.
- ``ec_encode_data_update(len, k, rows, vec_i, tables, src*, dst**)`` XORs
  the contribution of source ``vec_i`` into the outputs (``tables`` is built
  for all k sources).
- ISA-L picks its kernels at run time from the CPU's features. On a CPU with
  AVX-512 and GFNI (the development machine, an AMD EPYC) ``ec_encode_data``
  runs ``vgf2p8affineqb`` on zmm registers and ``ec_init_tables`` writes
  GFNI-format tables. Tables are therefore only valid inside the process that
  built them: they are cached in memory, never stored or sent.
- ``xor_gen(vects, len, array**)``: ``vects`` counts the destination too and
  the destination is the *last* pointer; ISA-L documents 32-byte alignment
  for the vectors and uses non-temporal stores. It is not used: numpy's XOR
  and ``ec_encode_data`` are as fast on this hardware (bench/codec.py), without
  an alignment contract.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from snapstore.coding._buffers import U8, address

__all__ = ["MAX_CALL_BYTES", "Isal", "MatrixKind", "find_library", "load", "pointer_array"]

logger = logging.getLogger(__name__)

MatrixKind = Literal["vandermonde", "cauchy"]

# ec_encode_data takes the length as a C int; stay well below 2^31.
MAX_CALL_BYTES = 1 << 30

_SYMBOLS = (
    "ec_encode_data",
    "ec_encode_data_update",
    "ec_init_tables",
    "gf_gen_rs_matrix",
    "gf_gen_cauchy1_matrix",
    "gf_invert_matrix",
    "gf_mul",
)

_c_int = ctypes.c_int
_c_ptr = ctypes.c_void_p
_PtrArray = npt.NDArray[np.uintp]


def find_library() -> str | None:
    """Path of the ISA-L shared library bundled with pyeclib, or None."""
    spec = importlib.util.find_spec("pyeclib")
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        site = os.path.dirname(package_dir)
        for libs_dir in (os.path.join(site, "pyeclib.libs"), package_dir):
            found = sorted(glob.glob(os.path.join(libs_dir, "libisal*.so*")))
            if found:
                return found[0]
    return None


@dataclass(frozen=True)
class Isal:
    """The loaded library with typed prototypes. Obtain it from :func:`load`."""

    path: str
    version: str
    _lib: ctypes.CDLL

    def gen_matrix(self, kind: MatrixKind, k: int, m: int) -> npt.NDArray[np.uint8]:
        """The (k + m) x k encode matrix: identity on top, m parity rows below.

        ``vandermonde`` is ``gf_gen_rs_matrix`` (pyeclib's ``isa_l_rs_vand``),
        ``cauchy`` is ``gf_gen_cauchy1_matrix`` (``isa_l_rs_cauchy``).
        """
        mat = np.zeros((k + m, k), dtype=np.uint8)
        gen = (
            self._lib.gf_gen_rs_matrix if kind == "vandermonde" else self._lib.gf_gen_cauchy1_matrix
        )
        gen(address(mat.reshape(-1)), k + m, k)
        return mat

    def invert(self, square: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8] | None:
        """The inverse of a square matrix over GF(2^8), or None if it is singular."""
        n = square.shape[0]
        scratch = np.ascontiguousarray(square, dtype=np.uint8).copy()  # destroyed by ISA-L
        out = np.zeros((n, n), dtype=np.uint8)
        rc = self._lib.gf_invert_matrix(address(scratch.reshape(-1)), address(out.reshape(-1)), n)
        return None if rc != 0 else out

    def gf_mul(self, a: int, b: int) -> int:
        """One product in GF(2^8), straight from ISA-L (checks :mod:`snapstore.coding.gf256`)."""
        product: int = self._lib.gf_mul(a, b)
        return product

    def init_tables(self, coeffs: npt.NDArray[np.uint8]) -> U8:
        """Expand a rows x k coefficient matrix into ISA-L's 32 * k * rows byte tables."""
        rows, k = coeffs.shape
        flat = np.ascontiguousarray(coeffs, dtype=np.uint8).reshape(-1)
        tables = np.zeros(32 * k * rows, dtype=np.uint8)
        self._lib.ec_init_tables(k, rows, address(flat), address(tables))
        return tables

    def encode(
        self, length: int, k: int, rows: int, tables: U8, srcs: _PtrArray, dsts: _PtrArray
    ) -> None:
        """``dsts[r][:length] = sum_i coeff[r, i] * srcs[i][:length]`` (pointer arrays)."""
        self._lib.ec_encode_data(length, k, rows, address(tables), _ptrs(srcs), _ptrs(dsts))

    def encode_update(
        self, length: int, k: int, rows: int, vec_i: int, tables: U8, src: int, dsts: _PtrArray
    ) -> None:
        """``dsts[r][:length] ^= coeff[r, vec_i] * src[:length]`` (``tables`` for all k)."""
        self._lib.ec_encode_data_update(length, k, rows, vec_i, address(tables), src, _ptrs(dsts))

    def crc32_iscsi(self, buf: U8, init: int = 0) -> int:
        """ISA-L's CRC-32C (Castagnoli), for the checksum benchmark."""
        crc = init
        for start in range(0, max(len(buf), 1), MAX_CALL_BYTES):
            part = buf[start : start + MAX_CALL_BYTES]
            if len(part):
                crc = self._lib.crc32_iscsi(address(part), len(part), crc)
        return int(crc)


def _ptrs(arr: _PtrArray) -> int:
    data: int = arr.__array_interface__["data"][0]
    return data


def pointer_array(arrays: Sequence[U8]) -> _PtrArray:
    """The addresses of ``arrays`` as a uintp array, to pass as ``unsigned char **``."""
    return np.fromiter((address(a) for a in arrays), dtype=np.uintp, count=len(arrays))


@functools.cache
def load() -> Isal | None:
    """Load ISA-L once; None (and a log line saying why) when it cannot be used."""
    path = find_library()
    if path is None:
        logger.info("ISA-L library not found next to pyeclib; using pyeclib's interface")
        return None
    try:
        lib = ctypes.CDLL(path)
        missing = [name for name in _SYMBOLS if not hasattr(lib, name)]
    except OSError as exc:
        logger.warning("cannot load ISA-L from %s (%s); using pyeclib's interface", path, exc)
        return None
    if missing:
        logger.warning("ISA-L at %s lacks %s; using pyeclib's interface", path, missing)
        return None
    _declare(lib)
    version = "unknown"
    if hasattr(lib, "isal_get_version_str"):
        lib.isal_get_version_str.argtypes = []
        lib.isal_get_version_str.restype = ctypes.c_char_p
        version = (lib.isal_get_version_str() or b"unknown").decode()
    return Isal(path=path, version=version, _lib=lib)


def _declare(lib: ctypes.CDLL) -> None:
    # Prototypes matter: without argtypes ctypes would pass Python ints as C
    # ints and truncate 64-bit addresses.
    lib.ec_encode_data.argtypes = [_c_int, _c_int, _c_int, _c_ptr, _c_ptr, _c_ptr]
    lib.ec_encode_data.restype = None
    lib.ec_encode_data_update.argtypes = [_c_int, _c_int, _c_int, _c_int, _c_ptr, _c_ptr, _c_ptr]
    lib.ec_encode_data_update.restype = None
    lib.ec_init_tables.argtypes = [_c_int, _c_int, _c_ptr, _c_ptr]
    lib.ec_init_tables.restype = None
    for gen in (lib.gf_gen_rs_matrix, lib.gf_gen_cauchy1_matrix):
        gen.argtypes = [_c_ptr, _c_int, _c_int]
        gen.restype = None
    lib.gf_invert_matrix.argtypes = [_c_ptr, _c_ptr, _c_int]
    lib.gf_invert_matrix.restype = _c_int
    lib.gf_mul.argtypes = [ctypes.c_ubyte, ctypes.c_ubyte]
    lib.gf_mul.restype = ctypes.c_ubyte
    if hasattr(lib, "crc32_iscsi"):
        lib.crc32_iscsi.argtypes = [_c_ptr, _c_int, ctypes.c_uint32]
        lib.crc32_iscsi.restype = ctypes.c_uint32
