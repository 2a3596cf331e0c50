"""How the parts of the control plane reach each other: one interface per role.

- :class:`NodeLink` -- a node as the coordinator and group leaders see it
  (the node interface of docs/architecture.md): its member agent and its
  store.
- :class:`LeaderLink` -- the group leader hosted by a node.
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
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from snapstore.control.messages import (
    Decision,
    GroupBeat,
    GroupReport,
    MemberBeat,
    NodeConfig,
    NodeInfo,
    NodeNotice,
    Outcome,
    PrepareOrder,
)
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
    "AbandonReply",
    "CoordinatorLink",
    "Fabric",
    "LeaderLink",
    "NodeLink",
    "NodeSnapshot",
]


@message
@dataclass(frozen=True)
class NodeSnapshot:
    """Everything a node knows that a restarted coordinator rebuilds its state from."""

    info: NodeInfo
    config: NodeConfig | None
    records: tuple[bytes, ...] = ()
    prepared: tuple[bytes, ...] = ()


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

    async def snapshot(self) -> NodeSnapshot: ...


class LeaderLink(Protocol):
    """The group leader hosted by a node."""

    node: str

    async def notice(self, notice: NodeNotice) -> None: ...

    async def beat(self, beat: MemberBeat) -> None: ...

    async def prepare(self, order: PrepareOrder) -> None: ...

    async def decide(self, decision: Decision) -> None: ...


class CoordinatorLink(Protocol):
    """The coordinator as nodes reach it."""

    async def register(self, info: NodeInfo) -> NodeConfig | None: ...

    async def report(self, report: GroupReport) -> None: ...

    async def group_beat(self, beat: GroupBeat) -> None: ...

    async def abandon(self, job: str, rank: int, step: int, session: str) -> AbandonReply: ...

    async def step_status(
        self, job: str, step: int, rank: int, sums: tuple[int, ...]
    ) -> Outcome: ...


class Fabric(Protocol):
    """Finds the links to other parts; watches nodes."""

    def node(self, node: str) -> NodeLink: ...

    def leader(self, node: str) -> LeaderLink: ...

    def coordinator(self) -> CoordinatorLink: ...

    def watch(self, node: str) -> Awaitable[None]:
        """Completes (or raises) when the node's SMP process dies; never while it lives."""
        ...
