"""XOR parity, the m = 1 code: parity = d_0 ^ d_1 ^ ... ^ d_{k-1}.

ISA-L's Vandermonde matrix (``gf_gen_rs_matrix``) has an all-ones first parity
row, and so has liberasurecode's, so with one parity chunk Reed-Solomon parity
*is* XOR, byte for byte (tests/test_coding_xor.py checks it against pyeclib).
XOR is its own inverse: any one lost chunk, data or parity, is the XOR of the
other k.

The kernels run blockwise so that the partial result stays in cache while
the next input is folded in, and they accept ragged inputs like the rest of
the codec (a short input counts as zero-padded).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from snapstore.coding._buffers import U8, Buffer, as_u8
from snapstore.coding._ragged import run_split, segments
from snapstore.coding.errors import CodingError

__all__ = ["xor_into", "xor_parity", "xor_reconstruct", "xor_update"]

# Per-input block: the running parity block plus one input block stay in cache
# while the next input is folded in. Below ~512 KiB the Python loop overhead
# per block shows; 512 KiB-4 MiB measured alike (bench/codec.py --xor-blocks).
XOR_BLOCK = 1 << 20


def xor_into(srcs: Sequence[U8], out: U8, *, threads: int = 1) -> None:
    """``out[:] = XOR of srcs``, each source zero-padded or truncated to ``len(out)``."""
    lengths = [min(len(s), len(out)) for s in srcs]

    def work(start: int, stop: int) -> None:
        for a, b, live in segments(lengths, start, stop):
            if not live:
                out[a:b] = 0
            elif len(live) == 1:
                np.copyto(out[a:b], srcs[live[0]][a:b])
            else:
                _xor_blocks([srcs[i] for i in live], out, a, b)

    run_split(work, len(out), threads)


def _xor_blocks(srcs: Sequence[U8], out: U8, start: int, stop: int) -> None:
    first, second, rest = srcs[0], srcs[1], srcs[2:]
    for a in range(start, stop, XOR_BLOCK):
        b = min(a + XOR_BLOCK, stop)
        block = out[a:b]
        np.bitwise_xor(first[a:b], second[a:b], out=block)
        for src in rest:
            np.bitwise_xor(block, src[a:b], out=block)


def xor_update(delta: U8, parity: U8) -> None:
    """``parity ^= delta`` on the first ``len(delta)`` bytes (delta zero beyond)."""
    n = len(delta)
    np.bitwise_xor(parity[:n], delta, out=parity[:n])


def xor_parity(data_chunks: Sequence[Buffer], out: Buffer | None = None, *, threads: int = 1) -> U8:
    """The XOR of ``data_chunks``, written into ``out`` (allocated if None) and returned.

    Chunks may differ in length; each is treated as zero-padded to the output
    length, which is ``len(out)`` or else the longest chunk. A chunk longer
    than ``out`` is an error: its tail would be silently unprotected.
    """
    srcs = [as_u8(c, f"data chunk {i}") for i, c in enumerate(data_chunks)]
    if out is None:
        dst: U8 = np.empty(max((len(s) for s in srcs), default=0), dtype=np.uint8)
    else:
        dst = as_u8(out, "out", writable=True)
        too_long = {i: len(s) for i, s in enumerate(srcs) if len(s) > len(dst)}
        if too_long:
            raise CodingError(
                f"data chunks {too_long} (index: length) are longer than out ({len(dst)} bytes); "
                "parity must be at least as long as every data chunk"
            )
    xor_into(srcs, dst, threads=threads)
    return dst


def xor_reconstruct(
    surviving: Sequence[Buffer], out: Buffer | None = None, *, threads: int = 1
) -> U8:
    """Rebuild the one lost chunk of an XOR stripe from the other k chunks.

    The lost chunk may be data or parity: it is the XOR of all the others.
    Inputs may be ragged (short ones count as zero-padded) and may be longer
    than ``out``, in which case only ``[0, len(out))`` is computed; this is how
    a byte range of a lost chunk is rebuilt from the same range of the
    survivors. Without ``out`` the result has the length of the longest input.
    """
    srcs = [as_u8(c, f"surviving chunk {i}") for i, c in enumerate(surviving)]
    if out is None:
        dst: U8 = np.empty(max((len(s) for s in srcs), default=0), dtype=np.uint8)
    else:
        dst = as_u8(out, "out", writable=True)
    xor_into(srcs, dst, threads=threads)
    return dst
