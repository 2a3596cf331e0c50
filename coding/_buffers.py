"""Zero-copy views of caller buffers as flat uint8 numpy arrays.

Every entry point of the coding layer accepts "a buffer": a numpy array (any
dtype, C-contiguous), a memoryview, bytes, bytearray, an mmap — anything that
speaks the buffer protocol. The store passes views into mmapped shared-memory
files, so nothing here may copy: a non-contiguous buffer is rejected rather
than silently gathered into a temporary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from snapstore.coding.errors import CodingError

__all__ = ["U8", "Buffer", "address", "as_u8", "lengths_message"]

# Anything with the buffer protocol. typing.Buffer (PEP 688) needs 3.12, and
# numpy arrays of any dtype are accepted too, so the annotation stays open.
Buffer = Any

U8 = npt.NDArray[np.uint8]


def as_u8(buf: Buffer, what: str, *, writable: bool = False) -> U8:
    """Return ``buf`` as a 1-D uint8 array sharing its memory.

    ``what`` names the buffer in error messages ("data chunk 2", "parity_out[0]").
    Raises :class:`CodingError` if the buffer is not contiguous, or not
    writable when ``writable`` is set.
    """
    if isinstance(buf, np.ndarray):
        arr: np.ndarray[Any, Any] = buf
        if arr.dtype == np.uint8 and arr.ndim == 1 and arr.flags.c_contiguous:
            out: U8 = arr
        elif arr.flags.c_contiguous:
            out = arr.reshape(-1).view(np.uint8)
        else:
            raise CodingError(
                f"{what}: expected a C-contiguous buffer, got an array with strides "
                f"{arr.strides}; pass a contiguous slice (the codec never gathers a copy)"
            )
    else:
        try:
            view = memoryview(buf)
        except TypeError as exc:
            raise CodingError(
                f"{what}: expected a buffer (numpy array, memoryview, bytes, bytearray), "
                f"got {type(buf).__name__}"
            ) from exc
        if not view.c_contiguous:
            raise CodingError(f"{what}: expected a C-contiguous buffer, got a strided memoryview")
        out = np.frombuffer(
            view.cast("B") if view.ndim != 1 or view.format != "B" else view, np.uint8
        )
    if writable and not out.flags.writeable:
        raise CodingError(
            f"{what}: expected a writable buffer, got a read-only {type(buf).__name__}; "
            "pass a numpy array, bytearray or writable memoryview"
        )
    return out


def address(arr: U8) -> int:
    """The address of the first byte of ``arr`` (valid while ``arr`` is alive)."""
    data: int = arr.__array_interface__["data"][0]
    return data


def lengths_message(lengths: dict[str, int]) -> str:
    """Render ``{"data chunk 0": 10, ...}`` as ``"data chunk 0=10, ..."`` for errors."""
    return ", ".join(f"{name}={n}" for name, n in lengths.items())
