"""The seam between :class:`snapstore.coding.ErasureCodec` and the code that moves bytes.

:class:`ErasureCodec` validates and normalises every argument, then calls one
:class:`Engine`. Two engines exist: :class:`snapstore.coding.isal_engine.IsalEngine`
(ISA-L through ctypes, the fast path) and
:class:`snapstore.coding.pyeclib_engine.PyeclibEngine` (pyeclib's Python interface, for
``liberasurecode_rs_vand`` and as the fallback when ISA-L cannot be loaded).

Call protocol. The codec calls, from any thread, possibly concurrently:

1. ``encode_into(data, parity, threads)`` — ``parity`` holds m writable arrays
   of one length L; each of the k ``data`` arrays has length <= L and counts
   as zero-padded to L.
2. ``reconstruct_into(present, out, threads)`` — ``present`` maps at least k
   chunk indices (0..k-1 data, k..k+m-1 parity) to arrays; ``out`` maps the
   indices to compute to writable arrays of one length L. A present array
   shorter than L counts as zero-padded; a longer one is read on [0, L) only.
   No ``out`` array overlaps a ``present`` one.
3. ``update_parity_into(index, delta, parity)`` — ``parity`` holds the m
   parity arrays of length L, ``len(delta) <= L``; XORs data chunk
   ``index``'s contribution of ``delta`` into each parity array.

Output lengths (and so every L above) are multiples of ``word_size``.

All three may be retried: ``encode_into`` and ``reconstruct_into`` overwrite
their outputs completely, so a retry after an error leaves correct bytes.
``update_parity_into`` is not idempotent (it XORs): retrying it after it
completed undoes it. Engines raise :class:`snapstore.coding.CodingError` (never a bare
library error) and hold no per-call state, so one engine serves many threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from snapstore.coding._buffers import U8

__all__ = ["Engine"]


class Engine(Protocol):
    """What the codec needs from an implementation (see the module docstring)."""

    @property
    def name(self) -> str:
        """Short label for logs and benchmarks, e.g. ``"isa-l 2.32.0 (ctypes)"``."""
        ...

    @property
    def word_size(self) -> int:
        """Bytes per code symbol: output lengths and range offsets are multiples of it."""
        ...

    def encode_into(self, data: Sequence[U8], parity: Sequence[U8], threads: int) -> None: ...

    def reconstruct_into(
        self, present: Mapping[int, U8], out: Mapping[int, U8], threads: int
    ) -> None: ...

    def update_parity_into(self, index: int, delta: U8, parity: Sequence[U8]) -> None: ...
