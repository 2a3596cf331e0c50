"""Backend names, which of them work on this machine, and the engine behind each.

A backend name is pyeclib's ``ec_type`` and fixes the code (the encode matrix),
so parity written under one name can only be decoded under the same name:

- ``isa_l_rs_vand`` (default): ISA-L's Vandermonde matrix. Fast path: ISA-L
  through ctypes; fallback: pyeclib.
- ``isa_l_rs_cauchy``: ISA-L's Cauchy matrix, invertible for every erasure
  pattern at every (k, m). Same engines.
- ``liberasurecode_rs_vand``: liberasurecode's own Vandermonde code, through
  pyeclib only.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import numpy as np

from snapstore.coding.engine import Engine
from snapstore.coding.errors import BackendUnavailableError, CodingError
from snapstore.coding.isal import MatrixKind, load
from snapstore.coding.isal_engine import IsalEngine
from snapstore.coding.pyeclib_engine import PyeclibEngine

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "Implementation",
    "available_backends",
    "make_engine",
]

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "isa_l_rs_vand"
BACKENDS: tuple[str, ...] = ("isa_l_rs_vand", "isa_l_rs_cauchy", "liberasurecode_rs_vand")

_ISAL_KINDS: dict[str, MatrixKind] = {"isa_l_rs_vand": "vandermonde", "isa_l_rs_cauchy": "cauchy"}

Implementation = Literal["auto", "isal", "pyeclib"]
"""Which engine runs a backend: ``auto`` prefers ISA-L through ctypes."""


def make_engine(backend: str, k: int, m: int, implementation: Implementation = "auto") -> Engine:
    """The engine for ``backend``; :class:`CodingError` or :class:`BackendUnavailableError`."""
    if backend not in BACKENDS:
        raise CodingError(
            f"unknown erasure-coding backend {backend!r}; valid choices: {', '.join(BACKENDS)}"
        )
    if implementation not in ("auto", "isal", "pyeclib"):
        raise CodingError(
            f"unknown implementation {implementation!r}; valid choices: auto, isal, pyeclib"
        )
    kind = _ISAL_KINDS.get(backend)
    if implementation == "isal" and kind is None:
        raise CodingError(
            f"backend {backend!r} has no ISA-L implementation; use implementation='auto'"
        )
    if kind is not None and implementation != "pyeclib":
        isal = load()
        if isal is not None:
            return IsalEngine(isal, kind, k, m)
        if implementation == "isal":
            raise BackendUnavailableError(
                "the ISA-L library bundled with pyeclib (pyeclib.libs/libisal*.so*) cannot be "
                "loaded; reinstall pyeclib>=1.8 from its wheel or use implementation='auto'"
            )
        logger.info("ISA-L not loadable; %s runs through pyeclib's interface", backend)
    return PyeclibEngine(backend, k, m)


def available_backends() -> list[str]:
    """Backends that round-trip a small stripe on this machine (probed once, cached).

    A backend counts as available when its engine encodes a (2, 1) stripe and
    rebuilds a lost data chunk bitwise. The default comes first when present.
    """
    return list(_available())


@functools.cache
def _available() -> tuple[str, ...]:
    return tuple(name for name in BACKENDS if _probe(name))


def _probe(backend: str) -> bool:
    k, m, n = 2, 1, 100
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]
    parity = [np.empty(n, dtype=np.uint8) for _ in range(m)]
    try:
        engine = make_engine(backend, k, m)
        engine.encode_into(data, parity, 1)
        rebuilt = np.empty(n, dtype=np.uint8)
        engine.reconstruct_into({1: data[1], 2: parity[0]}, {0: rebuilt}, 1)
    except CodingError as exc:
        logger.info("backend %s unavailable: %s", backend, exc)
        return False
    return bool(np.array_equal(rebuilt, data[0]))
