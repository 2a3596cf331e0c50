"""Reed-Solomon through pyeclib's own interface: correct everywhere, not fast.

Used for ``liberasurecode_rs_vand`` (liberasurecode's own matrix) and as the
fallback for the ISA-L backends when the ISA-L library cannot be loaded.

pyeclib encodes one contiguous object into k data fragments plus m parity
fragments, each an 80-byte header followed by the payload; its decode and
reconstruct want fragments *with* headers. To code chunks that live in
separate buffers, each block of the k chunks is gathered into one staging
buffer (data fragment i of a k*F-byte object is bytes [i*F, (i+1)*F), so the
data payloads are the chunks themselves). Headers carry no content checksum
(``chksum_type="none"``), so a header depends only on the fragment index and
the block length: one set, obtained by encoding zeros of that length, serves
every block of that length (tests check that pyeclib rebuilds from them).

The ISA-L codes work byte by byte in GF(2^8). ``liberasurecode_rs_vand``
works on 16-bit little-endian words in GF(2^16): a parity byte depends on
both bytes of its word (a 0x80 in data byte 0 shows up in parity bytes 0 and
1). Its :attr:`PyeclibEngine.word_size` is therefore 2, and the codec insists
that output lengths (and rebuilt ranges) are whole words: with an odd-length
parity chunk the second byte of the last word, which a decode needs, would be
lost.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from snapstore.coding._buffers import U8
from snapstore.coding._ragged import segments
from snapstore.coding.errors import BackendUnavailableError, CodingError

__all__ = ["PyeclibEngine", "make_driver"]

# Bytes per chunk per pyeclib call: bounds the staging buffer and the fresh
# fragments pyeclib allocates, at no cost in speed (pyeclib copies anyway).
_BLOCK = 4 << 20
_TEMPLATE_LIMIT = 64


def make_driver(ec_type: str, k: int, m: int) -> Any:
    """A pyeclib ECDriver, or :class:`BackendUnavailableError` saying why not."""
    try:
        from pyeclib.ec_iface import ECDriver
    except ImportError as exc:  # pragma: no cover - pyeclib is a dependency
        raise BackendUnavailableError(f"pyeclib is not importable: {exc}") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return ECDriver(k=k, m=m, ec_type=ec_type, chksum_type="none")
    except Exception as exc:  # pyeclib raises its own ECDriverError tree
        raise BackendUnavailableError(
            f"pyeclib cannot start {ec_type} with k={k}, m={m}: {exc}; "
            "snapstore.coding.available_backends() lists the backends that work here"
        ) from exc


class PyeclibEngine:
    """Engine on top of one pyeclib ECDriver.

    Thread-safe: calls into the driver are serialised by a lock. ``threads``
    is accepted and ignored; pyeclib's cost is copies and allocation, which
    more threads would not remove.
    """

    def __init__(self, ec_type: str, k: int, m: int) -> None:
        self._ec_type = ec_type
        self._k = k
        self._m = m
        self._driver = make_driver(ec_type, k, m)
        self._lock = threading.Lock()
        # block length -> (payload length after padding, header size, k + m headers)
        self._templates: dict[int, tuple[int, int, list[bytes]]] = {}
        self.word_size = self._template(1)[0]

    @property
    def name(self) -> str:
        return f"pyeclib {self._ec_type}"

    def _call(self, method: str, *args: Any) -> Any:
        try:
            with self._lock:
                return getattr(self._driver, method)(*args)
        except Exception as exc:
            raise CodingError(f"pyeclib {self._ec_type} {method} failed: {exc}") from exc

    def _template(self, length: int) -> tuple[int, int, list[bytes]]:
        """Padded payload length, header size and per-index headers for ``length``-byte chunks."""
        hit = self._templates.get(length)
        if hit is not None:
            return hit
        fragments = self._call("encode", np.zeros(self._k * length, dtype=np.uint8))
        padded = len(fragments[0]) - self._header_size(fragments)
        if padded != length:
            # Not a multiple of liberasurecode's word: the split of k*length
            # bytes would not fall on chunk boundaries. Use the padded length.
            result = self._template(padded)
        else:
            header = len(fragments[0]) - length
            result = (length, header, [bytes(f[:header]) for f in fragments])
        if len(self._templates) >= _TEMPLATE_LIMIT:
            self._templates.clear()
        self._templates[length] = result
        return result

    def _header_size(self, fragments: list[bytes]) -> int:
        info = self._call("get_metadata", fragments[0], True)
        size = int(info["size"])
        return len(fragments[0]) - size

    def _stage(self, srcs: Sequence[U8], a: int, b: int, padded: int) -> U8:
        """Gather bytes [a, b) of each source into one k*padded buffer, zero-padded."""
        staging = np.zeros(len(srcs) * padded, dtype=np.uint8)
        for i, src in enumerate(srcs):
            n = max(0, min(len(src), b) - a)
            staging[i * padded : i * padded + n] = src[a : a + n]
        return staging

    def encode_into(self, data: Sequence[U8], parity: Sequence[U8], threads: int) -> None:
        length = len(parity[0])
        for a in range(0, length, _BLOCK):
            b = min(a + _BLOCK, length)
            padded, header, _ = self._template(b - a)
            fragments = self._call("encode", self._stage(data, a, b, padded))
            for j, out in enumerate(parity):
                payload = np.frombuffer(fragments[self._k + j], np.uint8, b - a, header)
                out[a:b] = payload

    def reconstruct_into(
        self, present: Mapping[int, U8], out: Mapping[int, U8], threads: int
    ) -> None:
        length = len(next(iter(out.values())))
        chosen = sorted(present)[: self._k]
        missing = [i for i in sorted(out) if i not in chosen]
        for i in sorted(out):
            if i in chosen:
                _copy_padded(present[i], out[i], 0, length)
        if not missing:
            return
        for a in range(0, length, _BLOCK):
            b = min(a + _BLOCK, length)
            padded, header, headers = self._template(b - a)
            fragments = [
                headers[i] + self._stage([present[i]], a, b, padded).tobytes() for i in chosen
            ]
            rebuilt = self._call("reconstruct", fragments, list(missing))
            for i, fragment in zip(missing, rebuilt, strict=True):
                out[i][a:b] = np.frombuffer(fragment, np.uint8, b - a, header)

    def update_parity_into(self, index: int, delta: U8, parity: Sequence[U8]) -> None:
        # pyeclib has no update call; the code is linear, so the parity of
        # (0, ..., delta, ..., 0) is exactly what must be XORed in. The range
        # ends on a whole word: an odd-length delta still changes both bytes
        # of its last parity word.
        n = min(-(-len(delta) // self.word_size) * self.word_size, len(parity[0]))
        for a in range(0, n, _BLOCK):
            b = min(a + _BLOCK, n)
            padded, header, _ = self._template(b - a)
            staging = np.zeros(self._k * padded, dtype=np.uint8)
            part = delta[a : min(b, len(delta))]
            staging[index * padded : index * padded + len(part)] = part
            fragments = self._call("encode", staging)
            for j, out in enumerate(parity):
                contribution = np.frombuffer(fragments[self._k + j], np.uint8, b - a, header)
                np.bitwise_xor(out[a:b], contribution, out=out[a:b])


def _copy_padded(src: U8, dst: U8, a: int, b: int) -> None:
    for s, e, live in segments([len(src)], a, b):
        if live:
            np.copyto(dst[s:e], src[s:e])
        else:
            dst[s:e] = 0
