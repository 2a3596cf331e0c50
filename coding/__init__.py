"""Erasure coding of stripes: Reed-Solomon through ISA-L and pyeclib, XOR for m = 1, checksums.

A stripe is k equal-length data chunks (on k nodes) plus m parity chunks; any
m of the k + m may be lost. :class:`ErasureCodec` encodes, decodes, rebuilds
byte ranges and folds deltas into parity, in place on the caller's buffers.
The fast path calls ISA-L's ``ec_encode_data`` (the library pyeclib ships)
through ctypes; pyeclib's interface backs ``liberasurecode_rs_vand`` and the
fallback. :func:`checksum` guards every chunk.
"""

from snapstore.coding.backends import BACKENDS, DEFAULT_BACKEND, available_backends
from snapstore.coding.checksum import (
    CHECKSUM_NAME,
    Checksummer,
    checksum,
    checksums,
    verify_chunks,
)
from snapstore.coding.codec import MAX_CHUNKS, ErasureCodec
from snapstore.coding.errors import (
    BackendUnavailableError,
    ChecksumMismatchError,
    CodingError,
    InsufficientChunksError,
    SnapstoreError,
)
from snapstore.coding.xor import xor_parity, xor_reconstruct

__all__ = [
    "BACKENDS",
    "CHECKSUM_NAME",
    "DEFAULT_BACKEND",
    "MAX_CHUNKS",
    "BackendUnavailableError",
    "ChecksumMismatchError",
    "Checksummer",
    "CodingError",
    "ErasureCodec",
    "InsufficientChunksError",
    "SnapstoreError",
    "available_backends",
    "checksum",
    "checksums",
    "verify_chunks",
    "xor_parity",
    "xor_reconstruct",
]
