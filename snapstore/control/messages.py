"""Control-plane messages: what members, group leaders, the coordinator and clients say.

Every message is a frozen msgspec Struct with the one wire encoding of
:mod:`snapstore.format.wire`. Step records travel as their own versioned
bytes (:meth:`snapstore.format.record.StepRecord.to_bytes`) inside them.

Who sends what (see docs/architecture.md, "The commit protocol"):

- member -> its group leader: :class:`NodeNotice` (ranks staged here),
  :class:`MemberBeat` (alive, and what it holds).
- leader -> coordinator: :class:`GroupReport` (ranks staged in the group,
  the group prepared, or failed), :class:`GroupBeat`.
- coordinator -> leaders: :class:`PrepareOrder`, :class:`Decision` (through their
  region's relay as one :class:`LeaderBatch`);
  -> every node: :class:`NodeConfig` (membership epoch, group, leader).
- node -> client: :class:`Outcome` of a step, with the rank's next lease.
- coordinator -> client: :class:`RestorePlan` or :class:`ErrorReply`.
- everyone -> the event log: :class:`Event`.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from snapstore.format.wire import message
from snapstore.format.work import Lease, PeerInfo, RankStaged

__all__ = [
    "TERM_BITS",
    "Decision",
    "ErrorKind",
    "ErrorReply",
    "Event",
    "GroupBeat",
    "GroupReport",
    "LeaderBatch",
    "MemberBeat",
    "NodeConfig",
    "NodeInfo",
    "NodeNotice",
    "Outcome",
    "OutcomeStatus",
    "PrepareOrder",
    "ReportBatch",
    "RestorePlan",
    "StagedEntry",
    "next_term",
    "term_of",
]

TERM_BITS = 16
"""Epochs of one coordinator term: 2**16 (see snapstore.control.membership)."""


def term_of(epoch: int) -> int:
    """The coordinator term an epoch belongs to."""
    return epoch >> TERM_BITS


def next_term(epoch: int) -> int:
    """The last epoch of ``epoch``'s term: a coordinator set to it starts the next term
    with its next :meth:`Membership.new_epoch`."""
    return ((term_of(epoch) + 1) << TERM_BITS) - 1


@message
class NodeInfo(msgspec.Struct, frozen=True):
    """Who and where an SMP is, and what it holds (sent when it registers and in beats)."""

    node: str
    incarnation: str
    peer: PeerInfo
    pid: int = 0
    started_at: float = 0.0
    budget: int = 0
    used: int = 0
    data_bytes: int = 0
    parity_bytes: int = 0
    spare_bytes: int = 0
    held: int = 0
    counters: dict[str, int] = msgspec.field(default_factory=dict)


@message
class NodeConfig(msgspec.Struct, frozen=True):
    """A node's place in the membership of one epoch: its group and that group's leader.

    ``group`` is empty for a node in no group (too few nodes to protect
    anything: its data is kept without parity). ``peers`` reach every member.
    ``incarnation``: the SMP process the coordinator configures; another
    process of the node (restarted before the coordinator heard) refuses it
    and registers.
    """

    epoch: int
    node: str
    group: tuple[str, ...]
    leader: str
    protected: bool
    k: int
    m: int
    backend: str
    peers: dict[str, PeerInfo] = msgspec.field(default_factory=dict)
    incarnation: str = ""
    relay: str = ""
    """The node the group's leader sends its reports and beats through ("": straight to
    the coordinator; see snapstore.control.relay)."""
    coordinator: str = ""
    """The identity of the coordinator process that sent it (ControlPlane.identity): a
    recovery snapshot that coordinator asked for and that ran late, after this
    configuration, must not fence its own term (Member.snapshot)."""
    groups: int = 0
    """How many groups the membership has: a leader spaces its members' usage figures by
    it (snapstore.control.leader.USAGE_BEATS_PER_INTERVAL)."""
    coordinator_address: str = ""
    coordinator_port: int = 0
    """Where the coordinator's control channel is (snapstore.node.channel; 0: it has none):
    its leaders' reports and beats, a relay's batches, abandons and step questions go
    there, past Ray's per-call cost."""


@message
class StagedEntry(msgspec.Struct, frozen=True):
    """One rank's staged step as its node reports it."""

    staged: RankStaged
    session: str
    world_size: int
    client: dict[str, float] = msgspec.field(default_factory=dict)
    """What the trainer's client counted since its last save (waits, skips, bytes)."""


@message
class NodeNotice(msgspec.Struct, frozen=True):
    """Member -> leader: ranks of ``job`` staged ``step`` on ``node`` (one notice per node
    per step, more only when ranks stage far apart)."""

    job: str
    step: int
    node: str
    epoch: int
    entries: tuple[StagedEntry, ...]


@message
class MemberBeat(msgspec.Struct, frozen=True):
    """Member -> leader, every heartbeat interval."""

    info: NodeInfo
    epoch: int


@message
class GroupReport(msgspec.Struct, frozen=True):
    """Leader -> coordinator about ``step`` (and record ``version``) of ``job`` in its group.

    ``sessions``: rank -> staging of the ranks staged in the group so far (a
    staged report's; prepared, failed and applied reports name the attempt by
    ``version`` and carry none). ``prepared``: the group's slice of the step
    record, parity computed and every alive member holding it (record bytes).
    ``failed``: why the group cannot prepare the step.

    ``early``: the leader prepared the step without a prepare order, under the
    ``ticket`` of the job's last commit (Decision.ticket), because every rank
    the group had then staged it again from the same processes: the report is
    a staged report (``sessions``) and a prepared or failed one in one.

    ``follows`` > 0 (an early report): ``sessions`` is left empty, because each
    rank's staging is its staging in the group's slice of the ticket's commit with
    the save number ``follows`` higher (:func:`snapstore.control.jobs.advanced`;
    the leader checked every rank). The coordinator holds that slice's stagings,
    so a group's report in steady training carries nothing per rank.
    """

    job: str
    step: int
    version: int
    epoch: int
    leader: str
    group: tuple[str, ...]
    world_size: int
    sessions: dict[int, str] = msgspec.field(default_factory=dict)
    prepared: bytes | None = None
    failed: str = ""
    stats: dict[str, Any] = msgspec.field(default_factory=dict)
    applied: bool = False
    """The leader applied a decision of this step to every alive member (an ack)."""
    early: bool = False
    holds: bool = False
    """An ack: some member holds the committed record of the step now (CommitResult.holds)."""
    quiet: bool = False
    """Every member of the group was heard from within ``failure_timeout`` when this was
    sent: the report stands for a beat saying so (the leader skips its next beat when
    that beat would say nothing more)."""
    follows: int = 0


@message
class GroupBeat(msgspec.Struct, frozen=True):
    """Leader -> coordinator: its members' latest beats and how long each has been silent."""

    epoch: int
    leader: str
    infos: tuple[NodeInfo, ...]
    silent: dict[str, float] = msgspec.field(default_factory=dict)


@message
class ReportBatch(msgspec.Struct, frozen=True):
    """Relay -> coordinator: the reports and beats of a region's leaders that reached the
    relay while its last batch was on its way (snapstore.control.relay)."""

    reports: tuple[GroupReport, ...] = ()
    beats: tuple[GroupBeat, ...] = ()


@message
class PrepareOrder(msgspec.Struct, frozen=True):
    """Coordinator -> leader: prepare the group's slice of ``step`` (version ``version``).

    For a new step the leader uses the ranks its members reported; for a
    re-protection (version > 0) ``ranks`` gives the record bytes of the
    ranks now homed in the group (their entries only, in a record).
    """

    job: str
    step: int
    version: int
    epoch: int
    world_size: int
    sessions: dict[int, str] = msgspec.field(default_factory=dict)
    """A new step: the staging (client session) of each of the group's ranks to use."""
    ranks: bytes | None = None


@message
class LeaderBatch(msgspec.Struct, frozen=True):
    """Coordinator -> relay: prepare orders and decisions for leaders of the relay's
    region, which the relay posts to each (snapstore.control.relay): one call for the
    region where the coordinator made one per group."""

    orders: tuple[tuple[str, PrepareOrder], ...] = ()
    """(leader, its order)."""
    decisions: tuple[Decision, ...] = ()
    leaders: tuple[tuple[str, ...], ...] = ()
    """The leaders ``decisions[i]`` goes to: a decision to every group is sent once."""


class OutcomeStatus(str, enum.Enum):
    COMMITTED = "committed"
    FAILED = "failed"
    PENDING = "pending"
    UNKNOWN = "unknown"


@message
class Decision(msgspec.Struct, frozen=True):
    """Coordinator -> leader -> members: ``step`` (record ``version``) of ``job`` committed,
    or failed (``reason``). ``hold``: a flush token; members hold their data slots of a
    committed step for it as they commit (``ttl`` seconds)."""

    job: str
    step: int
    version: int
    status: OutcomeStatus
    reason: str = ""
    hold: str = ""
    hold_ttl: float = 0.0
    stats: dict[str, Any] = msgspec.field(default_factory=dict)
    sessions: tuple[str, ...] = ()
    """FAILED: the stagings (by client session) that failed; empty means every one."""
    restore: bool = False
    """FAILED because those processes must restore first (the job restarted)."""
    epoch: int = -1
    """The sending coordinator's membership epoch, stamped as it sends (``-1``: none). A
    node that answered a restarted coordinator's recovery refuses decisions of epochs up to
    its own at that moment: those of the coordinator it replaced (see Member.snapshot)."""
    reprotect: bool = False
    """FAILED: a re-protection of the committed step (a new version of its parity) failed.
    No staging of the step failed with it (``sessions`` names none): a node that holds the
    step's data without knowing it committed (a missed decision, a restarted SMP) must not
    take it for a failed staging and reuse its slot."""
    ticket: int = -1
    """COMMITTED: the record version the job's next step may be prepared under by a
    leader without a prepare order, once every rank its group held in this step staged
    the next one from the same process (GroupReport.early); ``-1``: none."""


@message
class Outcome(msgspec.Struct, frozen=True):
    """Node -> client: what became of a saved step, and the slot to write the next one to."""

    status: OutcomeStatus
    step: int
    reason: str = ""
    stats: dict[str, Any] = msgspec.field(default_factory=dict)
    lease: Lease | None = None
    restore: bool = False
    """FAILED because this process must restore before it saves again."""


class ErrorKind(str, enum.Enum):
    NOT_FOUND = "not_found"
    UNRECOVERABLE = "unrecoverable"
    TIMEOUT = "timeout"
    STALE = "stale"
    REFUSED = "refused"
    MEMORY = "memory"
    OFF = "off"
    PERSIST_FAILED = "persist_failed"
    RETRY = "retry"


@message
class ErrorReply(msgspec.Struct, frozen=True):
    """The one error shape of the control plane: what kind, why, and who failed.

    ``lost`` names lost or corrupt chunks (UNRECOVERABLE); ``failures`` maps
    each party that failed (a node, a rank) to its error; ``fallback`` says
    the job restores from its persisted step.
    """

    kind: ErrorKind
    message: str
    lost: tuple[str, ...] = ()
    failures: dict[str, str] = msgspec.field(default_factory=dict)
    fallback: bool = False


@message
class RestorePlan(msgspec.Struct, frozen=True):
    """Where a rank reads its committed buffer: ``home`` (or the asking node when ``local``)."""

    step: int
    version: int
    size: int
    sums: tuple[int, ...]
    home: str
    home_peer: PeerInfo
    local: bool
    incarnation: int = 0


@message
class Event(msgspec.Struct, frozen=True):
    """One entry of the event log: failures, rebuilds, commits, errors."""

    seq: int
    time: float
    kind: str
    message: str
    fields: dict[str, Any] = msgspec.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {"seq": self.seq, "time": self.time, "kind": self.kind, "message": self.message}
        out.update(self.fields)
        return out
