"""A persisted step's manifest: what it holds, checked before anything is allocated.

``MANIFEST.msgpack`` (written last, see :mod:`snapstore.persist.tier`):
format version, job, step, world size, k, and per rank its file, size and
piece checksums (XXH3-64, pieces as in
:func:`snapstore.format.record.piece_bounds`). Whoever can write the persist
root is not trusted beyond that: every count is bounded
(:data:`MAX_WORLD_SIZE`, :data:`MAX_K`) and compared before a list the size
of one is built, and every failure is :class:`~snapstore.errors.FormatError`
naming it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from snapstore.config import JOB_NAME_RE, MAX_WORLD_SIZE
from snapstore.errors import FormatError

__all__ = [
    "CHECKSUM_NAME",
    "MAX_K",
    "MAX_MANIFEST_BYTES",
    "MAX_WORLD_SIZE",
    "PERSIST_VERSION",
    "PersistManifest",
    "PersistedRank",
    "rank_file",
]

PERSIST_VERSION = 1
MAX_K = 256
"""Most pieces (checksums) per rank a manifest may list."""
MAX_MANIFEST_BYTES = 128 << 20
"""Largest manifest read: about 1M ranks of k = 8 (a manifest is ~60 bytes + 9 per piece per
rank)."""
CHECKSUM_NAME = "xxh3_64"
_KIND = "snapstore-persisted-step"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.bin"


@dataclass(frozen=True)
class PersistedRank:
    """One rank's file: ``size`` bytes, k piece checksums (pieces as in :func:`piece_bounds`)."""

    rank: int
    file: str
    size: int
    sums: tuple[int, ...]


@dataclass(frozen=True)
class PersistManifest:
    """Everything needed to find and verify a persisted step; msgpack at rest."""

    job: str
    step: int
    world_size: int
    k: int
    ranks: Mapping[int, PersistedRank]
    created_at: float = 0.0
    committed_at: float = 0.0
    store_id: str = ""
    record_version: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def data_bytes(self) -> int:
        return sum(r.size for r in self.ranks.values())

    def to_bytes(self) -> bytes:
        doc = {
            "v": PERSIST_VERSION,
            "kind": _KIND,
            "checksum": CHECKSUM_NAME,
            "job": self.job,
            "step": self.step,
            "world_size": self.world_size,
            "k": self.k,
            "ranks": [
                [e.rank, e.file, e.size, list(e.sums)] for _, e in sorted(self.ranks.items())
            ],
            "created_at": self.created_at,
            "committed_at": self.committed_at,
            "store_id": self.store_id,
            "record_version": self.record_version,
            "extra": dict(self.extra),
        }
        return msgpack.packb(doc, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> PersistManifest:
        """Decode and validate; FormatError naming the first problem."""
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as e:
            raise FormatError(f"persisted manifest is not valid msgpack: {e}") from None
        if not isinstance(doc, dict) or doc.get("kind") != _KIND:
            raise FormatError("not a snapstore persisted-step manifest")
        if doc.get("v") != PERSIST_VERSION:
            raise FormatError(
                f"persisted manifest version {doc.get('v')!r}, this snapstore reads "
                f"{PERSIST_VERSION}"
            )
        if doc.get("checksum") != CHECKSUM_NAME:
            raise FormatError(f"persisted manifest checksum {doc.get('checksum')!r} is unknown")
        try:
            rows = doc["ranks"]
            if type(rows) is not list or len(rows) > MAX_WORLD_SIZE:
                raise ValueError(f"ranks must be a list of at most {MAX_WORLD_SIZE}")
            ranks = {}
            for r, f, size, sums in rows:
                if type(sums) is not list or len(sums) > MAX_K:
                    raise ValueError(f"a rank's sums must be a list of at most {MAX_K}")
                entry = PersistedRank(_int(r), _str(f), _int(size), tuple(_int(x) for x in sums))
                if entry.rank in ranks:
                    raise ValueError(f"rank {entry.rank} listed twice")
                ranks[entry.rank] = entry
            man = cls(
                job=_str(doc["job"]),
                step=_int(doc["step"]),
                world_size=_int(doc["world_size"]),
                k=_int(doc["k"]),
                ranks=ranks,
                created_at=_time(doc.get("created_at", 0.0)),
                committed_at=_time(doc.get("committed_at", 0.0)),
                store_id=_str(doc.get("store_id", "")),
                record_version=_int(doc.get("record_version", 0)),
                extra=dict(doc.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as e:
            raise FormatError(f"persisted manifest is malformed: {e!s:.200}") from None
        man.validate()
        return man

    def validate(self) -> None:
        """Check the manifest is consistent; FormatError naming the first problem.

        Counts are compared before any list the size of one is built: a
        forged ``world_size`` costs nothing.
        """
        if not JOB_NAME_RE.fullmatch(self.job):
            raise FormatError(f"persisted manifest names job {self.job!r:.80}, not a job name")
        if not 1 <= self.k <= MAX_K or self.step < 0 or not 1 <= self.world_size <= MAX_WORLD_SIZE:
            raise FormatError(
                f"persisted manifest k={self.k}, step={self.step}, world_size={self.world_size}: "
                f"k must be in [1, {MAX_K}], world_size in [1, {MAX_WORLD_SIZE}]"
            )
        if len(self.ranks) != self.world_size or not all(
            0 <= r < self.world_size for r in self.ranks
        ):
            raise FormatError(
                f"persisted manifest lists {len(self.ranks)} ranks, expected ranks 0.."
                f"{self.world_size - 1}"
            )
        for r, e in self.ranks.items():
            if e.file != rank_file(r) or e.size < 0 or len(e.sums) != self.k:
                raise FormatError(
                    f"persisted manifest rank {r}: file {e.file!r}, size {e.size}, "
                    f"{len(e.sums)} sums for k={self.k}"
                )


def _int(v: object) -> int:
    if type(v) is not int or not 0 <= v < 1 << 64:
        raise ValueError(f"expected a non-negative integer, found {v!r}")
    return v


def _time(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"expected a time in seconds, found {v!r:.40}")
    return float(v)


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, found {v!r}")
    return v
