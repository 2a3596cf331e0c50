"""Erasure coding of stripes: Reed-Solomon through ISA-L and pyeclib, XOR for m = 1, checksums."""

from coding.errors import (
    BackendUnavailableError,
    ChecksumMismatchError,
    CodingError,
    InsufficientChunksError,
    SnapstoreError,
)

__all__ = [
    "BackendUnavailableError",
    "ChecksumMismatchError",
    "CodingError",
    "InsufficientChunksError",
    "SnapstoreError",
]
