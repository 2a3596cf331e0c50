"""How the parts of the control plane reach each other: one interface per role.

- :class:`NodeLink` -- a node as the coordinator and group leaders see it
  (the node interface of docs/architecture.md): its member agent and its
  store.
- :class:`LeaderLink` -- the group leader hosted by a node.
- :class:`RelayLink` -- the relay on a node, as the leaders of its region see it.
- :class:`CoordinatorLink` -- the coordinator as nodes see it.
- :class:`Fabric` -- finds the links, and watches nodes die.

Two fabrics implement them: :mod:`snapstore.control.rayfabric` over Ray
actor calls (every message encoded with :mod:`snapstore.format.wire`), and
the simulation's, which delivers the same objects through a seeded network
with delays, reordering, stalls and crashes (``tests/sim``). The control
plane's code is the same in both.

Every call may raise :class:`snapstore.errors.ActorUnavailableError` (the
peer is dead or restarting) and is bounded by the caller's timeout
(``asyncio.wait_for``). Casts (``notice``, ``beat``, ``report``...) return
when sent; their loss is repaired by the sender re-sending.

The coordinator's orders and decisions to many leaders go as *posts*
(:meth:`Fabric.post_leaders`, :meth:`Fabric.post_nodes`): one call for a
batch, returning at once, with no task or timeout per message on the
coordinator's side (1,024 groups get one post per step, not 1,024 awaited
calls: measured by ``bench.scale``). A post is not confirmed; a failed
delivery is logged and, like a lost cast, repaired by the coordinator's
re-sends. Where groups have relays, the coordinator's post to a region's
leaders goes to the relay as one :class:`LeaderBatch`
(:meth:`Fabric.post_relays`), which the relay posts on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from snapstore.control.messages import (
    Decision,
    GroupBeat,
    GroupReport,
    LeaderBatch,
    MemberBeat,
    NodeConfig,
    NodeInfo,
    NodeNotice,
    Outcome,
    PrepareOrder,
    ReportBatch,
)
from snapstore.control.runtime import Tasks
from snapstore.errors import SnapstoreError
from snapstore.format.wire import message
from snapstore.format.work import (
    CommitResult,
    PersistOrder,
    PersistResult,
    VerifyReport,
    WorkOrder,
    WorkResult,
)

__all__ = [
    "POST_TIMEOUT",
    "AbandonReply",
    "CoordinatorLink",
    "Fabric",
    "LeaderLink",
    "LeaderPost",
    "NodeLink",
    "NodePost",
    "NodeSnapshot",
    "PerMessage",
    "Poster",
    "RelayLink",
    "RelayPost",
]

logger = logging.getLogger(__name__)

M = TypeVar("M")
R = TypeVar("R")

POST_TIMEOUT = 30.0
"""Seconds a post's deliveries are waited for before their failures are logged."""

LeaderPost = tuple[str, PrepareOrder | Decision]
"""(node whose group leader gets it, the order or decision)."""
NodePost = tuple[str, Decision]
RelayPost = tuple[str, LeaderBatch]
"""(the relay's node, what it posts on to the leaders of its region)."""


@message
@dataclass(frozen=True)
class NodeSnapshot:
    """Everything a node knows that a restarted coordinator rebuilds its state from."""

    info: NodeInfo
    config: NodeConfig | None
    records: tuple[bytes, ...] = ()
    prepared: tuple[bytes, ...] = ()
    seen: int = -1
    """The newest epoch that reached the node (a configure, or a decision: one may arrive
    before its configure); the new coordinator's term starts past it."""


@message
@dataclass(frozen=True)
class AbandonReply:
    """Whether the step a lease wants to reuse is over: failed (``abandoned``), or
    committed (its slot must be kept)."""

    abandoned: bool
    committed: bool = False
    reason: str = ""
    failed_sessions: tuple[str, ...] = field(default_factory=tuple)


class NodeLink(Protocol):
    """A node as the coordinator and its group leader reach it."""

    node: str

    async def configure(self, config: NodeConfig) -> None: ...

    async def build_parity(self, order: WorkOrder) -> WorkResult: ...

    async def keep_prepared(self, record: bytes) -> None: ...

    async def decide(self, decision: Decision) -> CommitResult: ...

    async def rebuild(self, order: WorkOrder) -> WorkResult: ...

    async def verify(self, record: bytes) -> VerifyReport: ...

    async def hold(self, job: str, step: int, token: str, ttl: float) -> list[int]: ...

    async def release(self, token: str) -> None: ...

    async def persist(self, order: PersistOrder) -> PersistResult: ...

    async def verify_persisted(self, path: str, ranks: list[int]) -> dict[int, str | None]: ...

    async def forget(self, job: str) -> None: ...

    async def drop_job(self, job: str) -> None: ...

    async def snapshot(self, requester: str = "") -> NodeSnapshot:
        """What the node holds (``requester``: the asking coordinator's identity)."""
        ...


class LeaderLink(Protocol):
    """The group leader hosted by a node, as its members reach it (the coordinator posts
    to it: :meth:`Fabric.post_leaders`)."""

    node: str

    async def notice(self, notice: NodeNotice) -> None: ...

    async def beat(self, beat: MemberBeat) -> None: ...


class RelayLink(Protocol):
    """The relay on a node, as the leaders of its region reach it
    (snapstore.control.relay): casts, forwarded to the coordinator in batches."""

    async def report(self, report: GroupReport) -> None: ...

    async def group_beat(self, beat: GroupBeat) -> None: ...

    async def down(self, batch: LeaderBatch) -> None:
        """The coordinator's orders and decisions for leaders of the region: a cast; the
        relay posts each on (Fabric.post_leaders)."""
        ...


class CoordinatorLink(Protocol):
    """The coordinator as nodes reach it."""

    async def register(self, info: NodeInfo) -> NodeConfig | None: ...

    async def report(self, report: GroupReport) -> None: ...

    async def group_beat(self, beat: GroupBeat) -> None: ...

    async def batch(self, batch: ReportBatch) -> None: ...

    async def abandon(self, job: str, rank: int, step: int, session: str) -> AbandonReply: ...

    async def step_status(
        self, job: str, step: int, rank: int, sums: tuple[int, ...], staging: str = ""
    ) -> Outcome: ...


class Fabric(Protocol):
    """Finds the links to other parts; watches nodes."""

    def node(self, node: str) -> NodeLink: ...

    def leader(self, node: str) -> LeaderLink: ...

    def coordinator(self) -> CoordinatorLink: ...

    def relay(self, node: str) -> RelayLink: ...

    def watch(self, node: str) -> Awaitable[None]:
        """Completes (or raises) when the node's SMP process dies; never while it lives."""
        ...

    def post_leaders(self, posts: Sequence[LeaderPost]) -> None:
        """One-way: each order or decision to the group leader on its node; returns at once
        (see the module docstring). A node that leads no group applies a decision itself."""
        ...

    def post_nodes(self, posts: Sequence[NodePost]) -> None:
        """One-way: each decision to its node's member, past its leader."""
        ...

    def post_relays(self, posts: Sequence[RelayPost]) -> None:
        """One-way: each batch to the relay on its node, which posts it on to leaders."""
        ...


class PerMessage(Generic[M, R]):
    """``fn`` of each distinct message of one post, computed once: a decision to every
    leader is one object (encoded, or stamped, once). Keyed by identity, the message kept
    alive beside its result so that its id stays its own for the whole post."""

    def __init__(self, fn: Callable[[M], R]) -> None:
        self._fn = fn
        self._done: dict[int, tuple[M, R]] = {}

    def __call__(self, msg: M) -> R:
        got = self._done.get(id(msg))
        if got is None:
            got = self._done[id(msg)] = (msg, self._fn(msg))
        return got[1]


class Poster:
    """Posts for fabrics whose links are coroutines: one task per post awaits every
    delivery (at most :data:`POST_TIMEOUT` seconds) and logs the failed ones."""

    def __init__(self) -> None:
        self.tasks = Tasks()

    def post(self, sends: Sequence[tuple[str, Awaitable[None]]]) -> None:
        """``sends``: (what, the delivery) pairs."""
        if sends:
            self.tasks.spawn(self._all(sends), f"post of {len(sends)}")

    @staticmethod
    async def _all(sends: Sequence[tuple[str, Awaitable[None]]]) -> None:
        """A delivery that failed as deliveries do (the peer is gone or refused: a
        SnapstoreError) is logged; any other error is a bug, raised for the task's error
        log once every delivery ended."""
        futures = [asyncio.ensure_future(send) for _, send in sends]
        _, pending = await asyncio.wait(futures, timeout=POST_TIMEOUT)
        bug: BaseException | None = None
        for (what, _), fut in zip(sends, futures, strict=True):
            if fut in pending:
                fut.cancel()
                logger.info("%s: no answer within %.0f s", what, POST_TIMEOUT)
            elif not fut.cancelled() and (e := fut.exception()) is not None:
                if isinstance(e, SnapstoreError):
                    logger.info("%s failed: %s", what, e)
                elif bug is None:
                    bug = e
        if bug is not None:
            raise bug
