"""Arithmetic in GF(2^8) with ISA-L's field polynomial, for small coefficient matrices.

Only the k x k matrices of the code go through here (building decode rows);
the bulk bytes go through ISA-L. ISA-L's ``gf_mul`` reduces by
x^8 + x^4 + x^3 + x^2 + 1 (0x11d) with generator 2; the tests check this table
against ISA-L's ``gf_mul`` for every pair.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["MUL", "matmul"]

_POLY = 0x11D


def _mul_table() -> npt.NDArray[np.uint8]:
    exp = np.zeros(510, dtype=np.int64)
    log = np.zeros(256, dtype=np.int64)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= _POLY
    exp[255:510] = exp[0:255]
    a = np.arange(256)
    table = exp[log[a][:, None] + log[a][None, :]]
    table[0, :] = 0
    table[:, 0] = 0
    return table.astype(np.uint8)


MUL: npt.NDArray[np.uint8] = _mul_table()
"""``MUL[a, b]`` is the product of a and b in GF(2^8)."""


def matmul(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The matrix product ``a @ b`` over GF(2^8): (r x n) @ (n x c) -> (r x c)."""
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"cannot multiply {a.shape} by {b.shape}")
    products = MUL[a[:, :, None], b[None, :, :]]
    out: npt.NDArray[np.uint8] = np.bitwise_xor.reduce(products, axis=1)
    return out
