"""Shared helpers for the coding tests: pyeclib as the reference, stripe builders.

No tests live here. pyeclib's own encode is the oracle: the codec's parity
must equal it byte for byte. pyeclib codes one object split into k fragments
of a length it chooses (ceil(size / k), rounded up to its word size), so a
stripe of chunks of length L is compared by placing chunk i at fragment
offset i * F (zero-padded) and keeping the first L bytes of each parity
payload. All codes here are linear and work on independent symbols, so the
padding does not change those first L bytes.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]


@functools.cache
def driver(backend: str, k: int, m: int) -> Any:
    from pyeclib.ec_iface import ECDriver

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return ECDriver(k=k, m=m, ec_type=backend, chksum_type="none")


def pyeclib_parity(backend: str, k: int, m: int, chunks: list[U8], length: int) -> list[U8]:
    """pyeclib's m parity chunks of ``chunks`` (each zero-padded to ``length``)."""
    drv = driver(backend, k, m)
    probe = drv.encode(np.zeros(k * max(length, 1), dtype=np.uint8))
    frag = len(probe[0]) - _header(drv, probe[0])
    staging = np.zeros(k * frag, dtype=np.uint8)
    for i, chunk in enumerate(chunks):
        staging[i * frag : i * frag + len(chunk)] = chunk
    fragments = drv.encode(staging)
    header = _header(drv, fragments[0])
    return [np.frombuffer(f, np.uint8)[header : header + length].copy() for f in fragments[k:]]


def _header(drv: Any, fragment: bytes) -> int:
    return len(fragment) - int(drv.get_metadata(fragment, True)["size"])


def padded(chunk: U8, length: int) -> U8:
    out = np.zeros(length, dtype=np.uint8)
    out[: len(chunk)] = chunk[:length]
    return out


def random_chunks(rng: np.random.Generator, lengths: list[int]) -> list[U8]:
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in lengths]
