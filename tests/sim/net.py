"""The simulation's fabric: the control plane's links over a seeded, lossy-timed network.

A call is a message to the callee's process (after a random delay), run
there as a task of that process, and a reply back (another delay). If the
callee is dead, the caller gets ActorUnavailableError, as from Ray; if it
dies while handling the call, too; if it is stalled, the call waits. Delays
differ per message, so messages reorder. A few messages in each schedule
are round-tripped through the wire encoding, so the simulation also
exercises the messages' schema.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from snapstore.bench.vloop import Proc
from snapstore.control.links import AbandonReply, LeaderPost, NodePost, NodeSnapshot, RelayPost
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
from snapstore.errors import ActorUnavailableError, SnapstoreError
from snapstore.format.wire import decode, encode
from snapstore.format.work import (
    CommitResult,
    PersistOrder,
    PersistResult,
    VerifyReport,
    WorkOrder,
    WorkResult,
)
from snapstore.rpc import describe

if TYPE_CHECKING:
    from tests.sim.world import World

__all__ = ["SimFabric", "rpc"]

T = TypeVar("T")


async def rpc(
    world: World,
    callee: Proc | None,
    work: Callable[[], Awaitable[T]],
    what: str,
    oneway: bool = False,
) -> T:
    """Deliver a call to ``callee``, run ``work`` there, deliver the reply.

    ``oneway``: a notice nobody waits an answer for (a beat, a report, a
    relayed decision): the caller goes on once it is delivered.
    """
    await asyncio.sleep(world.latency())
    if callee is None or not callee.alive:
        raise ActorUnavailableError(f"{what}: actor unavailable (dead)")
    task = callee.spawn(_run(work))
    task.add_done_callback(_retrieve)
    if oneway:
        world.event(what)
        return None  # type: ignore[return-value]
    try:
        result = await asyncio.shield(task)
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if task.cancelled() and (me is None or me.cancelling() == 0):
            raise ActorUnavailableError(f"{what}: actor unavailable (it died)") from None
        raise
    except SnapstoreError:
        raise
    except Exception as e:
        raise SnapstoreError(f"{what} failed: {describe(e)}") from None
    world.event(what)
    await asyncio.sleep(world.latency())
    return result


async def _run(work: Callable[[], Awaitable[T]]) -> T:
    return await work()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A call whose caller went away: its error is nobody's to see."""
    if not task.cancelled():
        task.exception()


class _Link:
    def __init__(self, world: World, node: str) -> None:
        self.world = world
        self.node = node

    def _call(
        self, what: str, work: Callable[[Any], Awaitable[T]], oneway: bool = False
    ) -> Awaitable[T]:
        world = self.world
        smp = world.nodes.get(self.node)
        proc = smp.proc if smp is not None else None

        async def run() -> T:
            current = world.nodes.get(self.node)
            if current is None or current.member is None:
                raise ActorUnavailableError(f"{what}: no SMP")
            return await work(current.member)

        return rpc(world, proc, run, f"SMP {self.node[:8]}.{what}", oneway)


class SimNode(_Link):
    """A node as the coordinator and leaders reach it."""

    async def configure(self, config: NodeConfig) -> None:
        config = self.world.wire(config, NodeConfig)
        await self._call("configure", lambda m: m.configure(config))

    async def build_parity(self, order: WorkOrder) -> WorkResult:
        order = self.world.wire(order, WorkOrder)
        return await self._call("build_parity", lambda m: m.build_parity(order))

    async def keep_prepared(self, record: bytes) -> None:
        await self._call("keep_prepared", lambda m: m.keep_prepared(record))

    async def decide(self, decision: Decision) -> CommitResult:
        decision = self.world.wire(decision, Decision)
        return await self._call("decide", lambda m: m.decide(decision))

    async def rebuild(self, order: WorkOrder) -> WorkResult:
        return await self._call("rebuild", lambda m: m.rebuild(order))

    async def verify(self, record: bytes) -> VerifyReport:
        return await self._call("verify", lambda m: m.verify(record))

    async def hold(self, job: str, step: int, token: str, ttl: float) -> list[int]:
        return await self._call("hold", lambda m: m.hold(job, step, token, ttl))

    async def release(self, token: str) -> None:
        await self._call("release", lambda m: m.release(token))

    async def persist(self, order: PersistOrder) -> PersistResult:
        return await self._call("persist", lambda m: m.persist(order))

    async def verify_persisted(self, path: str, ranks: list[int]) -> dict[int, str | None]:
        return await self._call("verify_persisted", lambda m: m.verify_persisted(path, ranks))

    async def forget(self, job: str) -> None:
        await self._call("forget", lambda m: m.forget(job))

    async def drop_job(self, job: str) -> None:
        await self._call("drop_job", lambda m: m.drop_job(job))

    async def snapshot(self, requester: str = "") -> NodeSnapshot:
        return await self._call("snapshot", lambda m: m.snapshot(requester))


class SimLeader(_Link):
    """The leader hosted by a node (its SMP refuses when it does not lead)."""

    def _lead(self, what: str, work: Callable[[Any], Awaitable[None]]) -> Awaitable[None]:
        async def run(member: Any) -> None:
            if member.leader is None:
                raise SnapstoreError(f"node {self.node[:12]} does not lead a group now")
            await work(member.leader)

        # Notices and beats to a leader are the hot path; prepare orders too.
        return self._call(what, run, oneway=what != "leader_notice")

    async def notice(self, notice: NodeNotice) -> None:
        notice = self.world.wire(notice, NodeNotice)
        await self._lead("leader_notice", lambda ld: ld.notice(notice))

    async def beat(self, beat: MemberBeat) -> None:
        await self._lead("leader_beat", lambda ld: ld.beat(beat))

    async def prepare(self, order: PrepareOrder) -> None:
        order = self.world.wire(order, PrepareOrder)
        await self._lead("leader_prepare", lambda ld: ld.prepare(order))

    async def decide(self, decision: Decision) -> None:
        async def run(member: Any) -> None:
            if member.leader is None:
                await member.decide(decision)  # as the real SMP does
            else:
                await member.leader.decide(decision)

        await self._call("leader_decide", run, oneway=True)


class SimRelay(_Link):
    """The relay on a node (any node's member has one). A call, as over Ray: it returns
    once the relay queued the message, so a stalled relay holds its leaders up until
    their timeout, and a refusing one is heard."""

    async def report(self, report: GroupReport) -> None:
        report = self.world.wire(report, GroupReport)
        await self._call("relay_report", lambda m: m.relay.report(report))

    async def group_beat(self, beat: GroupBeat) -> None:
        await self._call("relay_beat", lambda m: m.relay.group_beat(beat))

    async def down(self, batch: LeaderBatch) -> None:
        batch = self.world.wire(batch, LeaderBatch)
        await self._call("relay_down", lambda m: m.relay.down(batch), oneway=True)


class SimCoordinator:
    def __init__(self, world: World) -> None:
        self.world = world

    def _call(
        self, what: str, work: Callable[[Any], Awaitable[T]], oneway: bool = False
    ) -> Awaitable[T]:
        world = self.world

        async def run() -> T:
            plane = world.plane
            if plane is None:
                raise ActorUnavailableError(f"{what}: no coordinator")
            return await work(plane)

        return rpc(world, world.coordinator_proc, run, f"coordinator.{what}", oneway)

    async def register(self, info: NodeInfo) -> NodeConfig | None:
        info = self.world.wire(info, NodeInfo)
        return await self._call("register", lambda p: p.register(info))

    async def report(self, report: GroupReport) -> None:
        report = self.world.wire(report, GroupReport)
        await self._call("report", lambda p: p.report(report), oneway=True)

    async def group_beat(self, beat: GroupBeat) -> None:
        await self._call("group_beat", lambda p: p.group_beat(beat), oneway=True)

    async def batch(self, batch: ReportBatch) -> None:
        batch = self.world.wire(batch, ReportBatch)
        await self._call("batch", lambda p: p.batch(batch), oneway=True)

    async def abandon(self, job: str, rank: int, step: int, session: str) -> AbandonReply:
        return await self._call("abandon", lambda p: p.abandon(job, rank, step, session))

    async def step_status(
        self, job: str, step: int, rank: int, sums: tuple[int, ...], staging: str = ""
    ) -> Outcome:
        return await self._call(
            "step_status", lambda p: p.step_status(job, step, rank, sums, staging)
        )


class SimFabric:
    """The fabric every simulated part uses to reach the others."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._tasks = Tasks()

    def node(self, node: str) -> SimNode:
        return SimNode(self.world, node)

    def leader(self, node: str) -> SimLeader:
        return SimLeader(self.world, node)

    def coordinator(self) -> SimCoordinator:
        return SimCoordinator(self.world)

    def relay(self, node: str) -> SimRelay:
        return SimRelay(self.world, node)

    def post_leaders(self, posts: Sequence[LeaderPost]) -> None:
        """Each message its own delivery, delayed and reordered like any other (one task
        each, as the coordinator's casts were before posts: the seeds found then replay)."""
        for node, msg in posts:
            link = self.leader(node)
            if isinstance(msg, PrepareOrder):
                self._send(link.prepare(msg), f"prepare order to {node[:12]}")
            else:
                self._send(link.decide(msg), f"decision to {node[:12]}")

    def post_nodes(self, posts: Sequence[NodePost]) -> None:
        for node, msg in posts:
            self._send(self.node(node).decide(msg), f"decision to {node[:12]}")

    def post_relays(self, posts: Sequence[RelayPost]) -> None:
        for node, batch in posts:
            self._send(self.relay(node).down(batch), f"leader batch to relay {node[:12]}")

    def _send(self, delivery: Awaitable[Any], what: str) -> None:
        async def send() -> None:
            # A lost message: the coordinator's re-sends repair it.
            with contextlib.suppress(SnapstoreError, asyncio.TimeoutError):
                await asyncio.wait_for(delivery, 30.0)

        self._tasks.spawn(send(), what)

    def watch(self, node: str) -> Awaitable[None]:
        """Fails when the node's current SMP process dies (Ray's report, after a delay)."""
        world = self.world
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        smp = world.nodes.get(node)
        proc = smp.proc if smp is not None else None
        if proc is None or not proc.alive:
            fut.set_exception(ActorUnavailableError(f"SMP {node[:8]}: dead"))
            return fut

        def died() -> None:
            def report() -> None:
                if not fut.done():
                    fut.set_exception(ActorUnavailableError(f"SMP {node[:8]}.watch: actor died"))

            world.loop.call_later(world.death_report_delay(), report)

        proc.on_crash.append(died)
        return fut

    async def discover(self) -> list[str]:
        return sorted(n for n, s in self.world.nodes.items() if s.proc is not None and s.proc.alive)


def roundtrip(msg: T, cls: type[T]) -> T:
    """A message through its wire encoding and back."""
    out: T = decode(encode(msg), cls)
    return out
