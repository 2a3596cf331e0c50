"""What the coordinator keeps per job: its committed record (by group), attempts in flight.

A committed step's record is kept as one *slice* per stripe group
(:class:`JobRecord`): each slice is a :class:`StepRecord` of the ranks homed
in that group, its parity, and the group alone (group index 0). That is the
record the group's nodes keep, what group leaders prepare, and what orders
are derived from: no per-step work of the coordinator grows with the number
of ranks. A whole-job view (:meth:`JobRecord.merged`) is built on demand
for status, flushes and export.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from snapstore.config import MAX_WORLD_SIZE
from snapstore.control.states import JobLife, Redundancy, StepLife
from snapstore.format.record import ParityEntry, RankEntry, SliceHead, StepRecord, pack_ranks

__all__ = [
    "Attempt",
    "Job",
    "JobRecord",
    "NextSaves",
    "PreparedSlice",
    "SessionTable",
    "TicketBase",
    "advanced",
    "follows_by",
    "session_of",
]

FAILED_KEPT = 64
HISTORY_KEPT = 16

Group = tuple[str, ...]
"""A stripe group: its nodes, in order."""


class PreparedSlice(NamedTuple):
    """A group's prepared slice as its leader sent it: the head the coordinator checked,
    and the bytes, decoded the first time the committed record is read (see SliceHead).
    A named tuple: one is made per group per step, and a frozen dataclass's fields are
    set one by one through ``object.__setattr__``."""

    head: SliceHead
    data: bytes


def _head(piece: StepRecord | PreparedSlice) -> StepRecord | SliceHead:
    return piece.head if isinstance(piece, PreparedSlice) else piece


@dataclass(frozen=True, eq=False)
class JobRecord:
    """The committed (step, version) of a job, as one slice per group.

    ``pieces`` are the slices, decoded or as prepared: a commit does not decode them
    (nothing on the path of a step reads their entries); :attr:`slices` decodes them
    when first asked for."""

    job: str
    step: int
    version: int
    k: int
    m: int
    world_size: int
    pieces: tuple[StepRecord | PreparedSlice, ...]
    committed_at: float = 0.0

    @functools.cached_property
    def slices(self) -> tuple[StepRecord, ...]:
        return tuple(
            StepRecord.from_bytes(p.data) if isinstance(p, PreparedSlice) else p
            for p in self.pieces
        )

    @functools.cached_property
    def _heads(self) -> tuple[StepRecord | SliceHead, ...]:
        """Each slice's head, or the slice itself where it is decoded (it has the same
        fields): what is read of the record without decoding it."""
        return tuple(_head(p) for p in self.pieces)

    @functools.cached_property
    def _index(self) -> dict[int, int]:
        return {r: i for i, s in enumerate(self.slices) for r in s.ranks}

    def slice_of(self, rank: int) -> StepRecord | None:
        i = self._index.get(rank)
        return None if i is None else self.slices[i]

    def entry(self, rank: int) -> RankEntry | None:
        s = self.slice_of(rank)
        return None if s is None else s.ranks[rank]

    @property
    def ranks(self) -> list[int]:
        return sorted(self._index)

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        return tuple(g for s in self.slices for g in s.groups)

    @property
    def protected(self) -> bool:
        return all(h.groups for h in self._heads)

    @property
    def rank_count(self) -> int:
        """How many ranks the slices hold (read from their heads: nothing decoded)."""
        return sum(h.rank_count for h in self._heads)

    def nodes(self) -> set[str]:
        out: set[str] = set()
        for s in self.slices:
            out |= s.nodes()
        return out

    def homes(self) -> dict[int, str]:
        return {r: e.node for s in self.slices for r, e in s.ranks.items()}

    def data_bytes(self) -> int:
        return sum(s.data_bytes() for s in self.slices)

    def parity_bytes(self) -> int:
        return sum(s.parity_bytes() for s in self.slices)

    def slice_on(self, node: str) -> StepRecord | None:
        """The slice a node holds: of the group it is in, or the one homing its ranks."""
        for s in self.slices:
            if any(node in g for g in s.groups) or any(e.node == node for e in s.ranks.values()):
                return s
        return None

    @functools.cached_property
    def merged(self) -> StepRecord:
        """The whole record: every rank, every group, parity re-indexed by group."""
        ranks: dict[int, RankEntry] = {}
        groups: list[tuple[str, ...]] = []
        parity: list[ParityEntry] = []
        for s in self.slices:
            base = len(groups)
            ranks.update(s.ranks)
            groups.extend(s.groups)
            for p in s.parity:
                parity.append(
                    ParityEntry(
                        base + p.group, p.stripe, p.index, p.node, p.offset, p.length, p.sum
                    )
                )
        return StepRecord(
            job=self.job,
            step=self.step,
            version=self.version,
            k=self.k,
            m=self.m,
            world_size=self.world_size,
            ranks=ranks,
            groups=tuple(groups),
            parity=tuple(parity),
            committed_at=self.committed_at,
        )

    @classmethod
    def of(cls, pieces: Sequence[StepRecord | PreparedSlice]) -> JobRecord:
        heads = [_head(p) for p in pieces]
        first = heads[0]
        return cls(
            job=first.job,
            step=first.step,
            version=first.version,
            k=first.k,
            m=first.m,
            world_size=first.world_size,
            pieces=tuple(pieces),
            committed_at=max(h.committed_at for h in heads),
        )


class StagedRanks(Mapping[int, tuple[str, Group]]):
    """rank -> (staging, group) of an attempt: the stagings kept by group (``by_group``:
    group -> rank -> staging), and each rank's group in a list indexed by rank
    (``owner``). A group's report touches its own ranks' slots of that list, next to
    each other, and nothing else: a rank index kept as a dict made a thousand groups'
    reports a step probe a dict of 32,768 entries 32 times each, and indexing the ranks
    as they arrived was a tenth of the coordinator's cost per step at 4,096 nodes
    (bench.scale). Ranks are in ``0 .. world_size - 1`` (the coordinator refuses others).

    Groups that follow the ticket's commit (:meth:`join_following`) are joined without
    touching their ranks' slots: their ranks are that commit's ranks of the group, so
    no two of them share a rank. Their slots are written the first time anything asks
    by rank or another group joins (:meth:`_fill`); a report whose ranks are the same
    as last step's does no work per rank."""

    __slots__ = ("_ids", "base", "by_group", "count", "owner", "unfilled")

    def __init__(self, world_size: int) -> None:
        self.by_group: dict[Group, Mapping[int, str]] = {}
        self.owner: list[Group | None] = [None] * min(max(world_size, 0), MAX_WORLD_SIZE)
        self.count = 0
        self.unfilled: list[Group] = []
        """Groups joined by :meth:`join_following` whose ranks' slots are not written."""
        self.base: StagedRanks | None = None
        """The commit's stagings those groups follow (all of them the same one's)."""
        self._ids: dict[Group, bytes] = {}
        """group -> its ranks packed (:meth:`rank_ids`), as they were asked for."""

    def _fill(self) -> None:
        """Write the slots of the groups joined without them."""
        if not self.unfilled:
            return
        owner, by_group = self.owner, self.by_group
        for group in self.unfilled:
            for rank in by_group[group]:
                owner[rank] = group
        self.unfilled.clear()

    def _group(self, rank: object) -> Group | None:
        self._fill()
        owner = self.owner
        return owner[rank] if isinstance(rank, int) and 0 <= rank < len(owner) else None

    def rank_ids(self, group: Group) -> bytes:
        """``group``'s ranks as a slice head names them (:func:`pack_ranks`): those of a
        group following ``base`` are the ones ``base`` packed for it, so a group reporting
        the same ranks as last step is checked with no work per rank."""
        ids = self._ids.get(group)
        if ids is None:
            mine = self.by_group.get(group, {})
            base = self.base
            if base is not None and isinstance(mine, NextSaves):
                theirs = base.by_group.get(group)
                if theirs is mine.base or (
                    isinstance(theirs, NextSaves) and theirs.base is mine.base
                ):
                    ids = base._ids.get(group)  # the same ranks (NextSaves never chains)
            if ids is None:
                ids = pack_ranks(mine)
            self._ids[group] = ids
        return ids

    def committed(self) -> None:
        """The attempt committed: it is a base now, and what it followed is not needed
        (its groups' rank ids are packed; kept, every commit in a row that followed the
        one before it would be kept too)."""
        self.base = None

    def _own(self, group: Group) -> dict[int, str]:
        """``group``'s stagings as a dict of its own, to change."""
        self._ids.pop(group, None)
        mine = self.by_group.get(group)
        if not isinstance(mine, dict):
            mine = self.by_group[group] = dict(mine or {})
        return mine

    def __getitem__(self, rank: int) -> tuple[str, Group]:
        group = self._group(rank)
        if group is None:
            raise KeyError(rank)
        return self.by_group[group][rank], group

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(self.by_group.values())

    def __len__(self) -> int:
        return self.count

    def __contains__(self, rank: object) -> bool:
        return self._group(rank) is not None

    def add(self, rank: int, staging: str, group: Group) -> None:
        """Rank ``rank`` staged as ``staging`` in ``group`` (moved from another group)."""
        if not 0 <= rank < len(self.owner):
            raise ValueError(f"rank {rank} outside world size {len(self.owner)}")
        self._fill()
        prev = self.owner[rank]
        if prev is None:
            self.count += 1
        elif prev != group:
            self._own(prev).pop(rank, None)
        self.owner[rank] = group
        self._own(group)[rank] = staging

    def add_group(self, group: Group, stagings: Mapping[int, str]) -> None:
        """Ranks ``stagings`` (rank -> staging) staged in ``group``, moved from any other."""
        for rank, staging in stagings.items():
            self.add(rank, staging, group)

    def join(self, group: Group, stagings: Mapping[int, str]) -> bool:
        """``group``'s first stagings, none of a rank another group staged: kept, each rank's
        slot checked in C; False (nothing done) otherwise."""
        if not stagings or group in self.by_group or min(stagings) < 0:
            return False
        self._fill()
        owner = self.owner
        try:
            if any(map(owner.__getitem__, stagings)):
                return False
        except IndexError:  # a rank past the world size
            return False
        for rank in stagings:  # a loop: mapping __setitem__ over them takes five times longer
            owner[rank] = group
        self.by_group[group] = dict(stagings)
        self.count += len(stagings)
        return True

    def join_following(self, group: Group, stagings: NextSaves, base: StagedRanks) -> bool:
        """``group``'s first stagings, following its stagings in ``base`` (the ticket's
        commit; ``stagings.base`` is ``base.by_group[group]``), joined without touching
        a slot per rank when every group joined so far followed ``base`` too (no two of
        them share a rank); as :meth:`join` otherwise."""
        if group in self.by_group or not stagings:
            return False
        if self.count and (self.base is not base or len(self.unfilled) != len(self.by_group)):
            return self.join(group, stagings)
        self.base = base
        self.by_group[group] = stagings
        self.unfilled.append(group)
        self.count += len(stagings)
        return True


class NextSaves(Mapping[int, str]):
    """rank -> staging of a group that follows its stagings of the ticket's commit
    (``GroupReport.follows``): each rank's staging in ``base`` with its save number
    ``by`` higher (:func:`advanced`), made when asked for. Iterating it, its length and
    its keys are ``base``'s, with no staging made."""

    __slots__ = ("base", "by")
    base: Mapping[int, str]
    by: int

    def __init__(self, base: Mapping[int, str], by: int) -> None:
        if isinstance(base, NextSaves):  # never a chain: one step's advance over the last
            by += base.by
            base = base.base
        self.base = base
        self.by = by

    def __getitem__(self, rank: int) -> str:
        return advanced(self.base[rank], self.by)

    def __iter__(self) -> Iterator[int]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, rank: object) -> bool:
        return rank in self.base

    def keys(self) -> Any:
        return self.base.keys()  # a dict's: compared with another's in C


@dataclass
class Attempt:
    """One attempt at committing a step (or a new version of the committed one).

    ``ranks``: rank -> (staging, group it was staged in), kept by group
    (:class:`StagedRanks`); ``leaders``: group -> the leader that reported it;
    ``prepared``: group -> its prepared slice. A re-protection (``reprotect``) has no
    sessions: its ranks are the committed record's, given to each group's leader.
    """

    life: StepLife
    world_size: int
    epoch: int
    started_at: float
    wall_started: float
    leaders: dict[Group, str] = field(default_factory=dict)
    prepared: dict[Group, PreparedSlice] = field(default_factory=dict)
    stats: dict[Group, dict[str, Any]] = field(default_factory=dict)
    orders: dict[Group, Any] = field(default_factory=dict)
    reprotect: bool = False
    prepare_sent: float = 0.0
    table_version: int = -1
    """The job's :attr:`SessionTable.version` when the attempt opened (:class:`TicketBase`)."""
    ranks: StagedRanks = field(init=False)

    def __post_init__(self) -> None:
        self.ranks = StagedRanks(self.world_size)

    @property
    def by_group(self) -> dict[Group, Mapping[int, str]]:
        """group -> rank -> staging: ``ranks`` by group."""
        return self.ranks.by_group

    def add(self, rank: int, session: str, group: Group) -> None:
        """Rank ``rank`` staged this attempt as ``session`` in ``group``."""
        self.ranks.add(rank, session, group)

    def add_group(self, group: Group, stagings: Mapping[int, str]) -> None:
        """Ranks ``stagings`` (rank -> staging) staged this attempt in ``group``."""
        self.ranks.add_group(group, stagings)

    def join(self, group: Group, stagings: Mapping[int, str]) -> bool:
        """``group``'s first report of the attempt, with no rank another group staged,
        joins it (:meth:`StagedRanks.join`); False (nothing done) otherwise."""
        return self.ranks.join(group, stagings)

    @property
    def step(self) -> int:
        return self.life.step

    @property
    def version(self) -> int:
        return self.life.version

    def sessions(self) -> set[str]:
        return {s for s, _ in self.ranks.values()}

    def groups(self) -> set[Group]:
        return set(self.leaders)

    def group_sessions(self, group: Group) -> dict[int, str]:
        return dict(self.by_group.get(group, {}))


class SessionTable(dict[int, tuple[str, int]]):
    """rank -> (client session, ``restore_seq`` of its last restore, -1 if it never did),
    with each session's staging prefix (``<session>/``, :attr:`prefixes`, a list indexed
    by rank) kept in step by every way of changing it: a group's stagings are matched to
    their ranks' sessions in one pass in C (:func:`snapstore.control.commit._sessions_known`),
    reading the group's ranks' slots of one list, next to each other, where a dict by rank
    was probed once per rank (bench.scale, 4,096 nodes: the match took 22 us a group in
    place against 5 us in a loop of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.prefixes: list[str | None] = []
        self.version = 0
        """Counts changes: stagings that agreed with the table still do while it stays."""

    def _prefix(self, rank: int, prefix: str | None) -> None:
        self.version += 1
        if not 0 <= rank < MAX_WORLD_SIZE:
            return  # no staging of such a rank is ever known (_sessions_known)
        prefixes = self.prefixes
        if rank >= len(prefixes):
            if prefix is None:
                return
            prefixes.extend([None] * (rank + 1 - len(prefixes)))
        prefixes[rank] = prefix

    def __setitem__(self, rank: int, value: tuple[str, int]) -> None:
        super().__setitem__(rank, value)
        # A session with a "/" is no staging's (``session_of`` cuts at the first): None
        # matches nothing, and its rank is checked one by one.
        self._prefix(rank, None if "/" in value[0] else value[0] + "/")

    def __delitem__(self, rank: int) -> None:
        super().__delitem__(rank)
        self._prefix(rank, None)

    def pop(self, rank: int, *default: Any) -> Any:
        self._prefix(rank, None)
        return super().pop(rank, *default)

    def popitem(self) -> tuple[int, tuple[str, int]]:
        rank, value = super().popitem()
        self._prefix(rank, None)
        return rank, value

    def clear(self) -> None:
        super().clear()
        self.prefixes.clear()
        self.version += 1

    def update(self, *args: Any, **kwargs: Any) -> None:
        for rank, value in dict(*args, **kwargs).items():
            self[rank] = value

    def setdefault(self, rank: int, default: Any = None) -> Any:
        if rank not in self:
            self[rank] = default
        return self[rank]


@dataclass
class Job:
    """One job at the coordinator: lifecycle, committed record, attempts, recovery state."""

    name: str
    world_size: int
    life: JobLife
    redundancy: Redundancy = Redundancy.NONE
    detail: str = ""
    record: JobRecord | None = None
    attempts: dict[int, Attempt] = field(default_factory=dict)
    failed: collections.OrderedDict[int, list[tuple[int, frozenset[str], str]]] = field(
        default_factory=collections.OrderedDict
    )
    sessions: SessionTable = field(default_factory=SessionTable)
    """rank -> (client session, ``restore_seq`` of its last restore, -1 if it never did)."""
    restore_seq: int = 0
    """Counts restores of the job: a staging of a failed step is refused unless its
    client restored after the failure."""
    history: collections.OrderedDict[int, tuple[JobRecord, Mapping[int, Any]]] = field(
        default_factory=collections.OrderedDict
    )
    """The last committed steps: their record, and rank -> (staging, group) committed
    (kept by reference: no per-rank work per commit)."""
    commit_seq: int = 0
    """``restore_seq`` at the last commit: ranks that restored after it hold that step."""
    retired: set[str] = field(default_factory=set)
    """Client sessions replaced by a restarted process of their rank: never saved from again."""
    next_version: int = 0
    ticket: int | None = None
    """The version the last commit handed its groups' leaders for the next step (taken by
    the next attempt, whichever way its stagings arrive; see snapstore.control.leader)."""
    ticket_base: TicketBase | None = None
    """The stagings of the commit that handed out a ticket, which reports following it
    name by ``GroupReport.follows``."""
    unconfirmed: bool = False
    """The committed record's step was committed from slices prepared early and no group
    acknowledged its decision yet: nobody is told it committed until one does (a
    restarted coordinator would not commit it from the slices alone)."""
    relocated: dict[int, str] = field(default_factory=dict)
    preferred_home: dict[int, str] = field(default_factory=dict)
    unrecoverable: dict[int, list[str]] = field(default_factory=dict)
    unacked: dict[tuple[str, ...], tuple[Any, float]] = field(default_factory=dict)
    applied: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once every group acknowledged the last commit decision (a flush holding the
    step's slots waits for it: the holds travel with the decision)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    commits: int = 0
    last_commit_latency: float | None = None
    protected_at: float | None = None
    committed_stats: dict[str, Any] = field(default_factory=dict)

    def take_version(self) -> int:
        v = self.next_version
        self.next_version += 1
        return v

    def note_failed(self, step: int, stagings: frozenset[str], reason: str) -> None:
        self.failed.setdefault(step, []).append((self.restore_seq, stagings, reason))
        while len(self.failed) > FAILED_KEPT:
            self.failed.popitem(last=False)

    def failed_since(self, step: int, since: int) -> str | None:
        """Why ``step`` failed after restore number ``since``, or None."""
        for seq, _stagings, reason in self.failed.get(step, []):
            if since <= seq:
                return reason
        return None

    def note_committed(self, record: JobRecord, stagings: Mapping[int, Any]) -> None:
        self.history[record.step] = (record, stagings)
        self.history.move_to_end(record.step)
        while len(self.history) > HISTORY_KEPT:
            self.history.popitem(last=False)

    def touch(self) -> None:
        """Wake everyone waiting for this job to change (restores waiting on a rebuild)."""
        self.changed.set()
        self.changed = asyncio.Event()


class TicketBase(NamedTuple):
    """What a commit handed out with its ticket: the ticket (``version``), the commit's
    stagings (rank -> (staging, group)), and the job's :attr:`SessionTable.version` at
    the commit if every one of those stagings is of the session the table names for its
    rank (-1 if that is not known): while the table has not changed since, a group's
    stagings that follow them (``GroupReport.follows``) are known sessions with no
    check per rank."""

    version: int
    ranks: StagedRanks
    agreed: int


def advanced(staging: str, by: int) -> str:
    """``staging`` (``<session>/<save number>``) with its save number ``by`` higher;
    ValueError if it has no save number."""
    session, _, number = staging.rpartition("/")
    if not session or not number.isdigit():
        raise ValueError(f"staging {staging!r} has no save number")
    return f"{session}/{int(number) + by}"


def follows_by(base: Mapping[int, str], stagings: Mapping[int, str]) -> int:
    """``n`` > 0 when ``stagings`` has ``base``'s ranks and each is its staging in ``base``
    with the save number ``n`` higher (GroupReport.follows); 0 otherwise."""
    if not stagings or stagings.keys() != base.keys():
        return 0
    rank = next(iter(stagings))
    try:
        by = int(stagings[rank].rpartition("/")[2]) - int(base[rank].rpartition("/")[2])
        if by <= 0 or any(advanced(base[r], by) != s for r, s in stagings.items()):
            return 0
    except ValueError:
        return 0
    return by


def session_of(staging: str) -> str:
    """The client session of a staging id (``<session>/<save number>``)."""
    return staging.partition("/")[0]
