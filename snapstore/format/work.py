"""Data-plane messages: byte-work orders and what nodes answer about their bytes.

The control plane decides *what* a node computes (:mod:`snapstore.control.orders`
derives orders from step records); the node does the byte work
(:mod:`snapstore.node.stripes`) and answers with these types. All are
frozen dataclasses with the wire encoding of :mod:`snapstore.format.wire`.

A :class:`Source` is one member of a stripe, read over the same range of the
stripe as the output: ``extents`` say where the member's bytes of the range
are (bytes of the range no extent covers are zeros: the member's chunk is
shorter); ``checks`` are whole pieces or parity chunks that must hash right
before the source is trusted. ``lost`` marks a member whose bytes are needed
but whose node is gone: listed so errors can name it, never read. A member
with no bytes in the range needs no peer at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from snapstore.format.wire import message

__all__ = [
    "Check",
    "CommitResult",
    "Delta",
    "DeltaUpdate",
    "Lease",
    "Opened",
    "Output",
    "PeerInfo",
    "PersistOrder",
    "PersistResult",
    "RankStaged",
    "RankWritten",
    "Source",
    "SourceExtent",
    "VerifyReport",
    "WorkKind",
    "WorkOrder",
    "WorkResult",
]


@message
@dataclass(frozen=True)
class PeerInfo:
    """How to reach one SMP: its node, host, segment directory, data server and control
    channel (``control_port``, 0: none; snapstore.node.channel)."""

    node_id: str
    host: str
    directory: str
    address: str
    port: int
    control_port: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "host": self.host,
            "directory": self.directory,
            "address": self.address,
            "port": self.port,
            "control_port": self.control_port,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeerInfo:
        return cls(
            str(d["node_id"]),
            str(d["host"]),
            str(d["directory"]),
            str(d["address"]),
            int(d["port"]),
            int(d.get("control_port", 0)),
        )


@message
@dataclass(frozen=True)
class SourceExtent:
    """``length`` bytes at ``offset`` of segment ``name``, at ``at`` in the coded range."""

    name: str
    offset: int
    length: int
    at: int


@message
@dataclass(frozen=True)
class Check:
    """Segment ``name`` bytes ``[offset, offset + length)`` must hash to ``sum``."""

    name: str
    offset: int
    length: int
    sum: int


@message
@dataclass(frozen=True)
class Source:
    """One stripe member as a source of a coded range (see the module docstring)."""

    index: int
    node: str
    peer: PeerInfo | None
    extents: tuple[SourceExtent, ...] = ()
    checks: tuple[Check, ...] = ()
    lost: bool = False


@message
@dataclass(frozen=True)
class DeltaUpdate:
    """Fold ``g * delta`` into parity: ``length`` bytes of delta segment ``name`` at ``src``
    (data index ``data_index``, on ``node``) go to ``at`` in the parity chunk."""

    data_index: int
    node: str
    peer: PeerInfo
    name: str
    src: int
    length: int
    at: int


@message
@dataclass(frozen=True)
class Output:
    """One coded range: RS index ``index`` written at ``offset`` of the order's file."""

    index: int
    offset: int
    length: int
    sources: tuple[Source, ...] = ()
    expect: int | None = None
    what: str = ""
    updates: tuple[DeltaUpdate, ...] = ()


class WorkKind(str, enum.Enum):
    PARITY = "parity"
    """Parity of a new step, encoded from its k data members (checked as they are read)."""
    PARITY_DELTA = "parity_delta"
    """Parity of a new step: the previous step's parity with the data deltas folded in."""
    REBUILD = "rebuild"
    """Lost or corrupt rank pieces or parity chunks, decoded from other stripe members."""


@message
@dataclass(frozen=True)
class WorkOrder:
    """Compute ``outputs`` into segment ``file`` (``file_size`` bytes) of ``job`` on ``target``.

    ``base`` (PARITY_DELTA): the previous parity segment the deltas fold into.
    ``pin`` (REBUILD): the output is a rank's committed data relocated onto
    this node; keep it until a newer record of the job homes it here.
    """

    kind: WorkKind
    job: str
    file: str
    file_size: int
    k: int
    m: int
    backend: str
    outputs: tuple[Output, ...]
    target: str = ""
    base: str = ""
    pin: bool = False


@message
@dataclass(frozen=True)
class WorkResult:
    """Checksums of an order's outputs in order, sources found bad, and bytes moved."""

    sums: tuple[int, ...] = ()
    bad_sources: tuple[str, ...] = ()
    bytes_read: int = 0
    bytes_written: int = 0
    peer_bytes: int = 0
    """Bytes read from other nodes: what crosses the network between hosts."""


# -- what a node says about a rank's bytes --------------------------------------------


@message
@dataclass(frozen=True)
class Delta:
    """The XOR delta of a rank's changed ranges against ``base_step``, kept in segment ``file``.

    ``ranges``: ``(offset in the buffer, length, offset in the delta segment)``.
    """

    file: str
    base_step: int
    ranges: tuple[tuple[int, int, int], ...]
    bytes: int


@message
@dataclass(frozen=True)
class RankStaged:
    """A rank staged ``size`` bytes of ``step`` on its node: the k piece checksums, and
    the delta against the previous step when the trainer said which bytes changed."""

    rank: int
    size: int
    sums: tuple[int, ...]
    delta: Delta | None = None


@message
@dataclass(frozen=True)
class Lease:
    """A slot a rank writes its next step into: its ``path``, ``capacity``, and the step
    whose bytes it still holds (``holds``), so unchanged tensors need not be copied."""

    path: str
    capacity: int
    holds: int | None = None


@message
@dataclass(frozen=True)
class Opened:
    """A rank's committed buffer on a node: its path (None if absent) and pieces that fail
    their checksums."""

    path: str | None
    bad: tuple[int, ...]
    name: str


@message
@dataclass(frozen=True)
class VerifyReport:
    """What a node holds of a record that fails its checksums: pieces per rank, parity
    chunks as ``(group, stripe, index)``."""

    bad_pieces: dict[int, tuple[int, ...]] = field(default_factory=dict)
    bad_parity: tuple[tuple[int, int, int], ...] = ()


@message
@dataclass(frozen=True)
class CommitResult:
    """What a node did with a commit: ``ok``, or the ranks homed here whose slots it no
    longer holds (``missing``: the record is refused); ``held``: ranks held for a flush."""

    ok: bool
    missing: tuple[int, ...] = ()
    held: tuple[int, ...] = ()
    reason: str = ""
    fenced: bool = False
    """Refused unapplied: its coordinator was replaced (the node answered a newer one)."""
    holds: bool = False
    """The node holds the committed record of that step (or a newer one) now: a restarted
    coordinator that reaches it recovers the step."""


@message
@dataclass(frozen=True)
class PersistOrder:
    """Write held ranks of a committed step into the step's partial directory ``dir``,
    then release hold ``token``. ``ranks``: ``(rank, size, piece sums)``."""

    job: str
    step: int
    k: int
    dir: str
    token: str
    ranks: tuple[tuple[int, int, tuple[int, ...]], ...]


@message
@dataclass(frozen=True)
class RankWritten:
    """One rank file written by a flush: its piece checksums, bytes and seconds."""

    sums: tuple[int, ...]
    bytes: int
    seconds: float


@message
@dataclass(frozen=True)
class PersistResult:
    """What a node wrote for a :class:`PersistOrder`."""

    ranks: dict[int, RankWritten]
    seconds: float
