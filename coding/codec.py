"""ErasureCodec: Reed-Solomon coding of one stripe of k data and m parity chunks.

Chunk indices: 0..k-1 are the data chunks, k..k+m-1 the parity chunks. The
codec never copies its inputs: it takes any C-contiguous buffer (numpy views
into shared memory, memoryviews, bytes) and writes results straight into the
caller's buffers (``*_into``) or into new arrays (``encode``, ``decode``).

Ragged stripes are first class: wherever a chunk is shorter than the output,
it counts as zero-padded to the output's length, without a padded copy.
That lets the store encode the short last chunk of a buffer, and rebuild just
a byte range of a lost chunk from the same range of the survivors.

Every method may be called from any thread, concurrently; ``threads > 1``
splits one call's byte range across a shared pool (ISA-L releases the GIL).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from snapstore.coding._buffers import U8, Buffer, as_u8, lengths_message
from snapstore.coding.backends import BACKENDS, DEFAULT_BACKEND, Implementation, make_engine
from snapstore.coding.checksum import verify_chunks
from snapstore.coding.errors import CodingError, InsufficientChunksError
from snapstore.coding.isal_engine import IsalEngine, guaranteed_invertible

__all__ = ["MAX_CHUNKS", "ErasureCodec"]

logger = logging.getLogger(__name__)

MAX_CHUNKS = 32
"""Upper bound on k + m (see :class:`ErasureCodec`)."""


class ErasureCodec:
    """Encode, decode and update one erasure-coded stripe layout (k data + m parity chunks).

    ``k >= 1``, ``m >= 1`` and ``k + m <= 32``. pyeclib 1.8 itself accepts up to
    k + m = 256 (the size of GF(2^8)) but declares 32 data and 32 parity
    fragments as its supported maximum (``PYECLIB_MAX_DATA``,
    ``PYECLIB_MAX_PARITY``); a stripe group spans k + m nodes, far below 32.

    ``isa_l_rs_vand`` is refused where ISA-L's Vandermonde matrix cannot
    decode every pattern of up to m losses
    (:func:`snapstore.coding.isal_engine.guaranteed_invertible`: m <= 3; m = 4 with
    k <= 21; k <= 3; k = 4 with k + m <= 25; k = 5 with m <= 5).
    Within k + m <= 32 that rule is exact for ISA-L 2.32 (checked by
    enumerating erasure patterns): every allowed (k, m) decodes every pattern,
    every refused one has patterns it cannot decode, the smallest being
    (5, 6) and (6, 5). The promise "any m of k + m chunks may be lost" would
    not hold there; ``isa_l_rs_cauchy`` decodes every pattern at every (k, m).

    ``backend`` names the code (pyeclib's ``ec_type``): one of
    :data:`snapstore.coding.backends.BACKENDS`. ``implementation`` picks the engine:
    ``"auto"`` (ISA-L through ctypes when loadable, else pyeclib), ``"isal"``
    or ``"pyeclib"`` (for tests and benchmarks). Both engines produce the same
    bytes for the same backend.
    """

    def __init__(
        self,
        k: int,
        m: int,
        backend: str = DEFAULT_BACKEND,
        *,
        implementation: Implementation = "auto",
    ) -> None:
        for name, value in (("k", k), ("m", m)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise CodingError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        k, m = int(k), int(m)
        if k < 1 or m < 1:
            raise CodingError(
                f"need k >= 1 data chunks and m >= 1 parity chunks, got k={k}, m={m}; "
                "with m = 0 there is nothing to code"
            )
        if k + m > MAX_CHUNKS:
            raise CodingError(
                f"k + m = {k + m} (k={k}, m={m}) exceeds {MAX_CHUNKS} chunks per stripe: "
                f"pyeclib declares {MAX_CHUNKS} data and {MAX_CHUNKS} parity fragments as its "
                "maximum, and Reed-Solomon Vandermonde matrices stop being invertible for "
                "every erasure pattern well before that; use smaller stripe groups"
            )
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise CodingError(
                f"unknown erasure-coding backend {backend!r}; valid choices: {', '.join(BACKENDS)}"
            )
        if backend == "isa_l_rs_vand" and not guaranteed_invertible("vandermonde", k, m):
            raise CodingError(
                f"isa_l_rs_vand cannot protect k={k}, m={m}: ISA-L's Vandermonde matrix has "
                "erasure patterns of m or fewer losses that it cannot decode at this (k, m) "
                "(the first appear at k=5, m=6 and k=6, m=5); use backend='isa_l_rs_cauchy', "
                "which decodes every pattern, or m <= 3"
            )
        self._k = k
        self._m = m
        self._backend = backend
        self._engine = make_engine(backend, k, m, implementation)

    @property
    def k(self) -> int:
        """Number of data chunks per stripe."""
        return self._k

    @property
    def m(self) -> int:
        """Number of parity chunks per stripe; any m chunks may be lost."""
        return self._m

    @property
    def backend(self) -> str:
        """The code, as a pyeclib ``ec_type`` name."""
        return self._backend

    @property
    def implementation(self) -> str:
        """Which engine runs the code, e.g. ``"isa-l 2.32.0 (ctypes)"`` or ``"pyeclib ..."``."""
        return self._engine.name

    @property
    def word_size(self) -> int:
        """Bytes per code symbol: 1 for the ISA-L codes, 2 for ``liberasurecode_rs_vand``.

        Output lengths must be multiples of it, and a rebuilt byte range must
        start at a multiple of it: that code mixes the two bytes of each
        16-bit word.
        """
        return self._engine.word_size

    @property
    def parity_is_xor(self) -> bool:
        """True when parity is the XOR of the data (m = 1 with the Vandermonde code)."""
        return isinstance(self._engine, IsalEngine) and self._engine.parity_is_xor

    def __repr__(self) -> str:
        return f"ErasureCodec(k={self._k}, m={self._m}, backend={self._backend!r})"

    # -- encode --------------------------------------------------------------

    def encode(self, data_chunks: Sequence[Buffer], *, threads: int = 1) -> list[U8]:
        """The m parity chunks of ``k`` equal-length data chunks, as new arrays.

        New arrays cost page faults on first write (more than the coding
        itself for large chunks); hot paths use :meth:`encode_into` with
        buffers that are reused.
        """
        data = self._data(data_chunks)
        lengths = {len(d) for d in data}
        if len(lengths) > 1:
            named = {f"data chunk {i}": len(d) for i, d in enumerate(data)}
            raise CodingError(
                f"encode needs equal-length data chunks, got {lengths_message(named)}; "
                "use encode_into for ragged chunks"
            )
        length = lengths.pop()
        self._whole_words(length, "data chunk length")
        parity = [np.empty(length, dtype=np.uint8) for _ in range(self._m)]
        self._engine.encode_into(data, parity, _threads(threads))
        return parity

    def encode_into(
        self, data_chunks: Sequence[Buffer], parity_out: Sequence[Buffer], *, threads: int = 1
    ) -> None:
        """Write the m parity chunks into ``parity_out``, allocating nothing.

        ``parity_out`` holds m writable buffers of one length L. Data chunks
        may be shorter than L (they count as zero-padded, without a copy) but
        not longer. Zero-length chunks are allowed.
        """
        data = self._data(data_chunks)
        parity = self._outputs(parity_out, "parity_out", self._m)
        length = len(parity[0])
        self._whole_words(length, "parity_out length")
        too_long = {f"data chunk {i}": len(d) for i, d in enumerate(data) if len(d) > length}
        if too_long:
            raise CodingError(
                f"data chunks longer than the parity ({length} bytes): "
                f"{lengths_message(too_long)}; parity must be at least as long as every data chunk"
            )
        _no_overlap(data, parity)
        self._engine.encode_into(data, parity, _threads(threads))

    # -- decode --------------------------------------------------------------

    def decode(
        self, chunks: Mapping[int, Buffer], *, checksums: Mapping[int, int] | None = None
    ) -> list[U8]:
        """All k + m chunks, in index order, from any k or more equal-length ones.

        Present chunks come back as views of the given buffers; missing ones
        are computed into new arrays. With ``checksums`` (index -> value of
        :func:`snapstore.coding.checksum`), every given chunk is verified first and one
        that fails is treated as lost. Raises :class:`InsufficientChunksError`
        (listing the missing and corrupt indices) when fewer than k remain.
        """
        present = self._present(chunks)
        corrupt: list[int] = []
        if checksums is not None:
            present, corrupt = verify_chunks(present, checksums)
        lengths = {len(c) for c in present.values()}
        if len(lengths) > 1:
            named = {f"chunk {i}": len(c) for i, c in sorted(present.items())}
            raise CodingError(
                f"decode needs equal-length chunks, got {lengths_message(named)}; "
                "use reconstruct_into for ragged chunks or sub-ranges"
            )
        self._require_k(present, corrupt)
        length = lengths.pop()
        self._whole_words(length, "chunk length")
        missing = {
            i: np.empty(length, dtype=np.uint8)
            for i in range(self._k + self._m)
            if i not in present
        }
        if missing:
            self._engine.reconstruct_into(present, missing, 1)
        return [present[i] if i in present else missing[i] for i in range(self._k + self._m)]

    def reconstruct_into(
        self, chunks: Mapping[int, Buffer], out: Mapping[int, Buffer], *, threads: int = 1
    ) -> None:
        """Compute exactly the chunks ``out`` names (data or parity) from k of ``chunks``.

        ``out`` maps indices to writable buffers of one length L; bytes
        [0, L) of each are computed. Given chunks may be shorter than L (they
        count as zero-padded) or longer (only [0, L) is read). To rebuild the
        byte range [a, b) of lost chunks, pass the [a, b) slices of the
        survivors and outputs of length b - a (a and b multiples of
        :attr:`word_size`). An index in ``out`` is never read from
        ``chunks``, so ``out`` may also recompute (scrub) a present chunk from
        the others.
        """
        if not out:
            raise CodingError(
                "reconstruct_into: out is empty; name at least one chunk index to compute"
            )
        wanted = {self._index(i, "out"): b for i, b in out.items()}
        targets = {i: as_u8(b, f"out[{i}]", writable=True) for i, b in wanted.items()}
        lengths = {len(t) for t in targets.values()}
        if len(lengths) > 1:
            named = {f"out[{i}]": len(t) for i, t in sorted(targets.items())}
            raise CodingError(
                f"reconstruct_into needs equal-length outputs, got {lengths_message(named)}"
            )
        self._whole_words(lengths.pop(), "out length")
        present = {i: c for i, c in self._present(chunks).items() if i not in targets}
        self._require_k(present, [])
        _no_overlap(list(present.values()), list(targets.values()))
        self._engine.reconstruct_into(present, targets, _threads(threads))

    def coefficient(self, present: Sequence[int], out_index: int, index: int) -> int | None:
        """The GF(2^8) factor chunk ``index`` is multiplied by in chunk ``out_index`` when
        that is computed from the chunks ``present`` (as :meth:`reconstruct_into` does).

        1 means: where every other present chunk is zero (ragged, or absent from
        a byte range), ``out_index`` is a plain copy of ``index``. None when the
        engine does not tell (pyeclib's interface): treat it as unknown.
        """
        engine = self._engine
        if not isinstance(engine, IsalEngine):
            return None
        have = tuple(sorted({self._index(i, "present") for i in present}))
        target = self._index(out_index, "out_index")
        if target in have:
            have = tuple(i for i in have if i != target)
        if len(have) < self._k:
            return None
        try:
            chosen, rows = engine.decode_rows(have, (target,))
        except CodingError:
            return None  # no k of them rebuild it: reconstruct_into says why
        if index not in chosen:
            return 0
        return int(rows[0, chosen.index(index)])

    # -- update --------------------------------------------------------------

    def update_parity_into(self, index: int, delta: Buffer, parity: Sequence[Buffer]) -> None:
        """Fold a change of data chunk ``index`` into the parity, in place.

        ``delta`` is old XOR new bytes of that chunk (from offset 0; shorter
        than the parity means no change beyond it). Each parity chunk j
        becomes ``P_j ^ g(j, index) * delta``, which equals re-encoding with the
        new data. Not idempotent: applying the same delta twice undoes it.
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self._k:
            raise CodingError(
                "update_parity_into: index must be a data chunk index "
                f"0..{self._k - 1}, got {index!r}"
            )
        change = as_u8(delta, "delta")
        targets = self._outputs(parity, "parity", self._m)
        if len(change) > len(targets[0]):
            raise CodingError(
                f"delta ({len(change)} bytes) is longer than the parity ({len(targets[0])} bytes)"
            )
        self._whole_words(len(targets[0]), "parity length")
        _no_overlap([change], targets)
        self._engine.update_parity_into(index, change, targets)

    # -- argument checks -----------------------------------------------------

    def _data(self, data_chunks: Sequence[Buffer]) -> list[U8]:
        if isinstance(data_chunks, Mapping) or len(data_chunks) != self._k:
            got = (
                f"a {type(data_chunks).__name__}"
                if isinstance(data_chunks, Mapping)
                else len(data_chunks)
            )
            raise CodingError(f"expected a sequence of k={self._k} data chunks, got {got}")
        return [as_u8(c, f"data chunk {i}") for i, c in enumerate(data_chunks)]

    def _outputs(self, buffers: Sequence[Buffer], what: str, count: int) -> list[U8]:
        if isinstance(buffers, Mapping) or len(buffers) != count:
            raise CodingError(
                f"{what}: expected a sequence of {count} writable buffers, got {len(buffers)}"
            )
        outs = [as_u8(b, f"{what}[{j}]", writable=True) for j, b in enumerate(buffers)]
        lengths = {len(o) for o in outs}
        if len(lengths) > 1:
            named = {f"{what}[{j}]": len(o) for j, o in enumerate(outs)}
            raise CodingError(f"{what} buffers must have one length, got {lengths_message(named)}")
        return outs

    def _index(self, i: object, what: str) -> int:
        n = self._k + self._m
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= int(i) < n:
            raise CodingError(
                f"{what}: chunk index {i!r} out of range; indices are 0..{self._k - 1} (data) and "
                f"{self._k}..{n - 1} (parity)"
            )
        return int(i)

    def _present(self, chunks: Mapping[int, Buffer]) -> dict[int, U8]:
        if not isinstance(chunks, Mapping):
            raise CodingError(f"chunks must map chunk index -> buffer, got {type(chunks).__name__}")
        return {self._index(i, "chunks"): as_u8(c, f"chunk {i}") for i, c in chunks.items()}

    def _whole_words(self, length: int, what: str) -> None:
        word = self._engine.word_size
        if length % word:
            raise CodingError(
                f"{what} {length} is not a multiple of {word} bytes: {self._backend} codes "
                f"{8 * word}-bit words; pad chunks (and align ranges) to {word} bytes"
            )

    def _require_k(self, present: Mapping[int, U8], corrupt: Sequence[int]) -> None:
        if len(present) >= self._k:
            return
        missing = [i for i in range(self._k + self._m) if i not in present]
        raise InsufficientChunksError(missing, sorted(present), self._k, corrupt=corrupt)


def _threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise CodingError(f"threads must be an int >= 1, got {threads!r}")
    return threads


def _no_overlap(inputs: Sequence[U8], outputs: Sequence[U8]) -> None:
    # A cheap bounds check (no element scan): an output that overlaps an input
    # would be read after being partly overwritten, and two overlapping outputs
    # would overwrite each other.
    for j, o in enumerate(outputs):
        if not len(o):
            continue
        for i, src in enumerate(inputs):
            if len(src) and np.may_share_memory(o, src):
                raise CodingError(f"output {j} overlaps input {i}; outputs must not alias inputs")
        for i, other in enumerate(outputs[:j]):
            if len(other) and np.may_share_memory(o, other):
                raise CodingError(f"outputs {i} and {j} overlap; each output needs its own buffer")
