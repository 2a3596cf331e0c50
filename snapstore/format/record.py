"""The record of one step of one job: where every byte is and what it must hash to.

A :class:`StepRecord` is what the coordinator commits and what every SMP of
the job keeps a copy of (so a restarted coordinator can rebuild its state
from the SMPs). It names, for each rank, the node holding its staged buffer
(its *home*), the buffer's size and the checksum of each of its k pieces; the
stripe groups of the step; and, for each parity chunk, its holder, where it
sits in the holder's parity file, and its checksum.

Records travel as msgpack (never pickle) with an explicit format version.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import operator
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from snapstore.errors import FormatError

__all__ = [
    "RECORD_VERSION",
    "ParityEntry",
    "RankEntry",
    "SliceHead",
    "StepRecord",
    "pack_ranks",
    "piece_bounds",
    "piece_len",
]

RECORD_VERSION = 2
"""2: ranks as a map of rank -> [node, size, sums] (1: a list of [rank, node, size, sums]
rows, still read)."""
_SIZE = operator.itemgetter(1)
"""A RankEntry's size."""
ALIGN = 64


def piece_len(size: int, k: int) -> int:
    """Length of each of the k pieces a rank buffer of ``size`` bytes is cut into.

    Pieces are 64-byte aligned; the last ones may be short or empty.
    """
    if size <= 0:
        return 0
    per = -(-size // k)
    return -(-per // ALIGN) * ALIGN


def piece_bounds(size: int, k: int, j: int) -> tuple[int, int]:
    """(offset, length) of piece ``j`` of a rank buffer of ``size`` bytes."""
    pl = piece_len(size, k)
    start = min(j * pl, size)
    return start, min(pl, size - start)


class RankEntry(NamedTuple):
    """One rank's staged buffer: on ``node``, ``size`` bytes, k piece checksums.

    The entries are named tuples, not dataclasses: a record holds one per rank and parity
    chunk, and a frozen dataclass costs three times as much to build."""

    node: str
    size: int
    sums: tuple[int, ...]


class ParityEntry(NamedTuple):
    """One parity chunk: stripe ``stripe`` of group ``group``, RS index ``index`` (k..k+m-1).

    It lives on ``node`` at ``offset`` in that node's parity file of the step,
    ``length`` bytes long, hashing to ``sum``.
    """

    group: int
    stripe: int
    index: int  # type: ignore[assignment]  # shadows tuple.index
    node: str
    offset: int
    length: int
    sum: int


_new_rank_entry = functools.partial(tuple.__new__, RankEntry)
"""A RankEntry from a decoded (node, size, sums) triple, built in C (no ``__new__`` call)."""


def pack_ranks(ranks: Iterable[int]) -> bytes:
    """``ranks`` sorted, as little-endian 32-bit numbers: a record's ``rank_ids``."""
    ids = array.array("I", sorted(ranks))
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tobytes()


class SliceHead(msgspec.Struct, frozen=True):
    """What a record says of itself without its entries: which step and version, which
    ranks (``rank_ids``, :func:`pack_ranks`), which groups (:meth:`StepRecord.head`);
    the entries and the parity are skipped in C, no object made for them. The
    coordinator checks a group's prepared slice by its head alone: the members that
    keep the slice decoded and validated the same bytes, ``rank_ids`` against the
    entries, before the leader reported it. Decoding every entry again was a third of
    the coordinator's cost per step at 4,096 nodes, and a map of rank -> raw entry
    still half of what was left of the head's (bench.scale)."""

    v: int
    job: str
    step: int
    version: int
    k: int
    m: int
    world_size: int
    groups: tuple[tuple[str, ...], ...]
    committed_at: float = 0.0
    early: bool = False
    rank_ids: bytes = b""
    """The ranks' numbers, sorted (:func:`pack_ranks`): empty in a record written before
    the field was (its head comes through a full decode)."""

    @property
    def rank_count(self) -> int:
        return len(self.rank_ids) // 4


class _Doc(SliceHead, frozen=True, kw_only=True):
    """A record as it is encoded, every field's type checked by msgspec's decoder in C:
    a record holds an entry per rank, and checking them in Python cost more than the
    rest of a group's report. The ranks map decodes straight into RankEntry tuples.
    The head's fields and the entries."""

    ranks: dict[int, RankEntry]
    parity: list[ParityEntry]


class _DocV1(_Doc, frozen=True, kw_only=True):
    """Version 1 of the record (ranks as ``[rank, node, size, sums]`` rows), still read:
    an SMP restarted onto a newer snapstore finds its predecessor's record files. Only
    ``ranks`` differs."""

    ranks: list[tuple[int, str, int, tuple[int, ...]]]  # type: ignore[assignment]


_DECODER = msgspec.msgpack.Decoder(_Doc)
_DECODER_V1 = msgspec.msgpack.Decoder(_DocV1)
_HEAD_DECODER = msgspec.msgpack.Decoder(SliceHead)
_ENCODER = msgspec.msgpack.Encoder()
_SUMS = operator.itemgetter(2)
"""A RankEntry's piece checksums."""


def _record_version(data: bytes) -> object:
    """The ``v`` of an encoded record that did not decode, to tell another version from a
    malformed record."""
    try:
        doc = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return None
    return doc.get("v") if isinstance(doc, dict) else type(doc).__name__


def _decode(data: bytes) -> _Doc:
    """The record's document, of this version or converted from version 1."""
    try:
        return _DECODER.decode(data)
    except msgspec.ValidationError as e:
        version = _record_version(data)
        if version == 1:
            return _decode_v1(data)
        if version != RECORD_VERSION:
            raise FormatError(
                f"step record version {version!r}, expected {RECORD_VERSION}"
            ) from None
        raise FormatError(f"step record is malformed: {e}") from None
    except msgspec.DecodeError as e:
        raise FormatError(f"step record is not valid msgpack: {e}") from None


def _decode_v1(data: bytes) -> _Doc:
    try:
        old = _DECODER_V1.decode(data)
    except msgspec.ValidationError as e:
        raise FormatError(f"step record (version 1) is malformed: {e}") from None
    ranks = {r: _new_rank_entry((n, s, sums)) for r, n, s, sums in old.ranks}
    if len(ranks) != len(old.ranks):
        raise FormatError("step record (version 1) lists a rank twice")
    return _Doc(**{**msgspec.structs.asdict(old), "v": RECORD_VERSION, "ranks": ranks})


@dataclass(frozen=True)
class StepRecord:
    """Everything needed to read, verify and rebuild one step of one job.

    ``version`` increases when the step is re-protected (data rebuilt onto
    another node, parity recomputed for new groups) without a new save.
    """

    job: str
    step: int
    version: int
    k: int
    m: int
    world_size: int
    ranks: Mapping[int, RankEntry]
    groups: tuple[tuple[str, ...], ...]
    parity: tuple[ParityEntry, ...]
    committed_at: float = 0.0
    early: bool = False
    """A slice its group's leader prepared without the coordinator's order, under the
    version the job's previous commit handed out (the coordinator checks its stagings
    only when the slice reaches it). A restarted coordinator does not commit a step from
    such slices alone (ControlPlane.recover). Encoded only when set: readers that predate
    the field ignore it."""

    # -- queries -------------------------------------------------------------

    def nodes(self) -> set[str]:
        """Every node holding data or parity of this step."""
        out = {e.node for e in self.ranks.values()}
        out.update(p.node for p in self.parity)
        return out

    def ranks_on(self, node: str) -> list[int]:
        return sorted(r for r, e in self.ranks.items() if e.node == node)

    def parity_on(self, node: str) -> list[ParityEntry]:
        return [p for p in self.parity if p.node == node]

    def parity_file_size(self, node: str) -> int:
        return max((p.offset + p.length for p in self.parity_on(node)), default=0)

    @property
    def rank_count(self) -> int:
        return len(self.ranks)

    def data_bytes(self) -> int:
        return sum(map(_SIZE, self.ranks.values()))

    def parity_bytes(self) -> int:
        return sum(p.length for p in self.parity)

    def group_of(self, node: str) -> int | None:
        for i, g in enumerate(self.groups):
            if node in g:
                return i
        return None

    def replace(self, **changes: Any) -> StepRecord:
        return dataclasses.replace(self, **changes)

    # -- wire format ---------------------------------------------------------

    def to_bytes(self) -> bytes:
        doc = {
            "v": RECORD_VERSION,
            "job": self.job,
            "step": self.step,
            "version": self.version,
            "k": self.k,
            "m": self.m,
            "world_size": self.world_size,
            "ranks": dict(sorted(self.ranks.items())),
            "groups": self.groups,
            "parity": self.parity,
            "committed_at": self.committed_at,
            "rank_ids": pack_ranks(self.ranks),
        }
        if self.early:
            doc["early"] = True
        return _ENCODER.encode(doc)

    @classmethod
    def from_bytes(cls, data: bytes) -> StepRecord:
        return cls._of(_decode(data))

    @classmethod
    def _of(cls, doc: _Doc) -> StepRecord:
        """The record a decoded document says, validated."""
        if doc.v != RECORD_VERSION:
            raise FormatError(f"step record version {doc.v!r}, expected {RECORD_VERSION}")
        rec = cls(
            job=doc.job,
            step=doc.step,
            version=doc.version,
            k=doc.k,
            m=doc.m,
            world_size=doc.world_size,
            ranks=doc.ranks,
            groups=tuple(doc.groups),
            parity=tuple(doc.parity),
            committed_at=doc.committed_at,
            early=doc.early,
        )
        rec.validate()
        if doc.rank_ids and doc.rank_ids != pack_ranks(doc.ranks):
            raise FormatError("record rank_ids do not list its ranks")
        return rec

    @staticmethod
    def head(data: bytes) -> SliceHead:
        """The head of an encoded record (its entries skipped, not decoded); FormatError
        when it is not a record of this version (an older one's head comes through a
        full decode)."""
        try:
            head = _HEAD_DECODER.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            head = None
        if head is None or head.v != RECORD_VERSION or not head.rank_ids:
            # What is wrong named, or version 1 converted, or the rank_ids of a record
            # written before them: through the whole document, checked.
            doc = _decode(data)
            StepRecord._of(doc)
            fields = msgspec.structs.asdict(doc)
            del fields["ranks"], fields["parity"]
            return SliceHead(**{**fields, "rank_ids": pack_ranks(doc.ranks)})
        return head

    def validate(self) -> None:
        """Check internal consistency; raise FormatError naming the first problem."""
        if self.k < 1 or self.m < 1:
            raise FormatError(f"record k={self.k}, m={self.m}: both must be >= 1")
        ranks = self.ranks
        if ranks and (
            min(ranks) >= 0
            and max(ranks) < self.world_size
            and min(map(_SIZE, ranks.values())) >= 0
            and set(map(len, map(_SUMS, ranks.values()))) == {self.k}
        ):
            ranks = {}  # every rank checked at C speed; one by one only to name a bad one
        for r, e in ranks.items():
            if not 0 <= r < self.world_size:
                raise FormatError(f"record rank {r} outside world size {self.world_size}")
            if e.size < 0 or len(e.sums) != self.k:
                raise FormatError(f"record rank {r}: size {e.size}, {len(e.sums)} sums, k={self.k}")
        seen: set[str] = set()
        for g in self.groups:
            if len(g) < self.k + self.m:
                raise FormatError(f"record group {list(g)} has fewer than k+m nodes")
            if len(set(g)) != len(g):
                raise FormatError(f"record group {list(g)} names a node twice")
            if seen & set(g):
                raise FormatError("record groups overlap")
            seen.update(g)
        for p in self.parity:
            if not (0 <= p.group < len(self.groups)) or not self.k <= p.index < self.k + self.m:
                raise FormatError(f"record parity entry out of range: {p}")
            if not 0 <= p.stripe < len(self.groups[p.group]):
                raise FormatError(f"record parity entry names stripe {p.stripe}: {p}")
            if p.offset < 0 or p.length < 0:
                raise FormatError(f"record parity entry with negative extent: {p}")
