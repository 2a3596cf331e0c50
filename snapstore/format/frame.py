"""What a rank's staged buffer holds: tensor bytes, then the manifest, then a trailer.

::

    [ data: layout.nbytes ][ manifest: msgpack ][ trailer: 32 bytes ]

The trailer (magic, data length, manifest length, step) makes a buffer
self-describing: restore splits it without asking anyone, and rejects one
whose trailer does not fit. The whole buffer, manifest included, is what is
checksummed and erasure-coded, so a rebuilt rank gets its manifest back too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from snapstore.errors import FormatError

__all__ = ["TRAILER_SIZE", "Framed", "frame_size", "read_frame", "write_trailer"]

_MAGIC = b"SNAPSLT1"
_TRAILER = struct.Struct("<8sQQQ")
TRAILER_SIZE = _TRAILER.size


def frame_size(data_nbytes: int, manifest_nbytes: int) -> int:
    return data_nbytes + manifest_nbytes + TRAILER_SIZE


def write_trailer(buf: np.ndarray, data_nbytes: int, manifest: bytes, step: int) -> int:
    """Write the manifest and trailer after ``data_nbytes`` of data; return the total size."""
    end = data_nbytes + len(manifest)
    size = end + TRAILER_SIZE
    if len(buf) < size:
        raise ValueError(f"slot of {len(buf)} bytes cannot hold a {size}-byte snapshot")
    buf[data_nbytes:end] = np.frombuffer(manifest, dtype=np.uint8)
    buf[end:size] = np.frombuffer(
        _TRAILER.pack(_MAGIC, data_nbytes, len(manifest), step), dtype=np.uint8
    )
    return size


@dataclass(frozen=True)
class Framed:
    """A split staged buffer: ``data`` and ``manifest`` views, and the step it holds."""

    data: np.ndarray
    manifest: bytes
    step: int


def read_frame(buf: np.ndarray, size: int) -> Framed:
    """Split the first ``size`` bytes of ``buf``; FormatError if they are not a snapshot."""
    if size < TRAILER_SIZE or size > len(buf):
        raise FormatError(
            f"staged buffer of {size} bytes (slot {len(buf)}) has no room for a trailer"
        )
    magic, dn, mn, step = _TRAILER.unpack(bytes(buf[size - TRAILER_SIZE : size]))
    if magic != _MAGIC:
        raise FormatError("staged buffer has no snapstore trailer (wrong magic)")
    if dn + mn + TRAILER_SIZE != size:
        raise FormatError(
            f"staged buffer trailer says {dn} data + {mn} manifest bytes, but it is {size} bytes"
        )
    return Framed(buf[:dn], bytes(buf[dn : dn + mn]), int(step))
