"""The fabric of ``bench.scale``: the control plane's links with a modelled network latency.

Every call is a message to the callee's simulated process after
:attr:`NetModel.latency` seconds of virtual time, run there as a task of
that process, and its reply after as long again, as a Ray actor call is; a
trainer's calls to its own node's SMP take :attr:`NetModel.local`. A dead
callee raises :class:`snapstore.errors.ActorUnavailableError`, as Ray does.

What crosses to or from the coordinator is encoded with
:mod:`snapstore.format.wire` by the sender and decoded by the receiver, in
their own processes, as over Ray: the coordinator's CPU includes decoding
every report and beat and encoding every order. Messages between members
and their leader are passed as objects (their cost is not what the
benchmark measures). Calls to the coordinator are counted by method.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from snapstore.bench.vloop import CAUSE, Proc
from snapstore.control.links import (
    AbandonReply,
    LeaderPost,
    NodePost,
    NodeSnapshot,
    PerMessage,
    Poster,
    RelayPost,
)
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
    from snapstore.bench.scale_sim import ScaleWorld

__all__ = ["NetModel", "ScaleFabric", "call"]

T = TypeVar("T")


@dataclass(frozen=True)
class NetModel:
    """One-way delays: ``latency`` between processes on different hosts (a Ray actor
    call's share of a round trip), ``local`` between a trainer and its own node's SMP,
    ``death`` from an SMP's death until Ray fails the coordinator's watch on it."""

    latency: float = 0.0005
    local: float = 0.0001
    death: float = 0.02


async def call(
    world: ScaleWorld,
    callee: Proc | None,
    work: Callable[[], Coroutine[Any, Any, T]],
    what: str,
    delay: float,
) -> T:
    """Deliver a call to ``callee`` after ``delay``, run ``work`` there, and return its reply
    after ``delay`` more."""
    await asyncio.sleep(delay)
    if callee is None or not callee.alive:
        raise ActorUnavailableError(f"{what}: actor unavailable (dead)")
    task = callee.spawn(work())
    task.add_done_callback(_retrieve)
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
    await asyncio.sleep(delay)
    return result


async def delivered(
    callee: Proc | None, work: Callable[[], Coroutine[Any, Any, Any]], what: str, delay: float
) -> None:
    """One message of a post, as its sender sees a Ray call it submitted and does not
    await on its own: the message travels and runs in timers and the callee's process, and
    the sender only wakes for the reply (see :meth:`ScaleFabric.post_leaders`)."""
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[None] = loop.create_future()

    def settle(task: asyncio.Task[Any] | None) -> None:
        if reply.done():
            return
        if task is None or task.cancelled():
            reply.set_exception(ActorUnavailableError(f"{what}: actor unavailable"))
        elif (e := task.exception()) is not None:
            reply.set_exception(e)
        else:
            reply.set_result(None)

    def arrive() -> None:
        if callee is None or not callee.alive:
            loop.call_later(delay, settle, None)
            return
        task = callee.spawn(work())
        task.add_done_callback(lambda t: loop.call_later(delay, settle, t), context=callee.ctx)

    loop.call_later(delay, arrive)
    await reply


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A call whose caller went away: its error is nobody's to see."""
    if not task.cancelled():
        task.exception()


class _NodeLink:
    """A node (its member agent) as the coordinator (``wire``) or a leader reaches it."""

    def __init__(self, world: ScaleWorld, node: str, wire: bool) -> None:
        self.world = world
        self.node = node
        self.wire = wire

    def _call(self, what: str, work: Callable[[Any], Awaitable[T]]) -> Awaitable[T]:
        world, node = self.world, self.node
        target = world.nodes.get(node)

        async def run() -> T:
            current = world.nodes.get(node)
            if current is None or current.member is None:
                raise ActorUnavailableError(f"SMP {node[:8]}.{what}: no SMP")
            return await work(current.member)

        if self.wire:
            world.sent[what] += 1
        proc = target.proc if target is not None else None
        return call(world, proc, run, f"SMP {node[:8]}.{what}", world.net.latency)

    def _msg(self, msg: Any) -> Any:
        """What the callee decodes: the message's bytes from the coordinator, else itself."""
        return encode(msg) if self.wire else msg

    def _read(self, data: Any, cls: type[T]) -> T:
        out: T = decode(data, cls) if self.wire else data
        return out

    async def configure(self, config: NodeConfig) -> None:
        data = self._msg(config)
        await self._call("configure", lambda m: m.configure(self._read(data, NodeConfig)))

    async def build_parity(self, order: WorkOrder) -> WorkResult:
        data = self._msg(order)

        async def work(m: Any) -> Any:
            return self._msg(await m.build_parity(self._read(data, WorkOrder)))

        return self._read(await self._call("build_parity", work), WorkResult)

    async def keep_prepared(self, record: bytes) -> None:
        await self._call("keep_prepared", lambda m: m.keep_prepared(record))

    async def decide(self, decision: Decision) -> CommitResult:
        data = self._msg(decision)

        async def work(m: Any) -> Any:
            return self._msg(await m.decide(self._read(data, Decision)))

        return self._read(await self._call("decide", work), CommitResult)

    async def rebuild(self, order: WorkOrder) -> WorkResult:
        data = self._msg(order)

        async def work(m: Any) -> Any:
            return self._msg(await m.rebuild(self._read(data, WorkOrder)))

        return self._read(await self._call("rebuild", work), WorkResult)

    async def verify(self, record: bytes) -> VerifyReport:
        async def work(m: Any) -> Any:
            return self._msg(await m.verify(record))

        return self._read(await self._call("verify", work), VerifyReport)

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
        async def work(m: Any) -> Any:
            return self._msg(await m.snapshot(requester))

        return self._read(await self._call("snapshot", work), NodeSnapshot)


class _LeaderLink:
    """The leader a node hosts (its SMP refuses when it does not lead, as the real one)."""

    def __init__(self, node: _NodeLink) -> None:
        self.node = node.node
        self._n = node

    def _lead(self, what: str, work: Callable[[Any], Awaitable[None]]) -> Awaitable[None]:
        async def run(member: Any) -> None:
            if member.leader is None:
                raise SnapstoreError(f"node {self.node[:12]} does not lead a group now")
            await work(member.leader)

        return self._n._call(what, run)

    async def notice(self, notice: NodeNotice) -> None:
        await self._lead("leader_notice", lambda ld: ld.notice(notice))

    async def beat(self, beat: MemberBeat) -> None:
        await self._lead("leader_beat", lambda ld: ld.beat(beat))


class _RelayLink:
    """The relay on a node, as leaders reach it (node to node: no wire, not counted)."""

    def __init__(self, node: _NodeLink) -> None:
        self.node = node.node
        self._n = node

    async def report(self, report: GroupReport) -> None:
        await self._n._call("relay_report", lambda m: m.relay.report(report))

    async def group_beat(self, beat: GroupBeat) -> None:
        await self._n._call("relay_beat", lambda m: m.relay.group_beat(beat))

    async def down(self, batch: LeaderBatch) -> None:
        await self._n._call("relay_down", lambda m: m.relay.down(batch))


def report_kind(report: GroupReport) -> str:
    """What a report says, for the coordinator's CPU by cause."""
    if report.applied:
        return "applied"
    if report.failed:
        return "failed"
    return "prepared" if report.version >= 0 else "staged"


class _CoordinatorLink:
    """The coordinator as nodes reach it: every message as wire bytes, counted."""

    def __init__(self, world: ScaleWorld) -> None:
        self.world = world

    def _call(self, what: str, work: Callable[[Any], Awaitable[T]], kind: str = "") -> Awaitable[T]:
        world = self.world
        cause = f"{what} ({kind})" if kind else what
        world.received[cause] += 1

        async def run() -> T:
            CAUSE.set(cause)
            plane = world.plane
            if plane is None:
                raise ActorUnavailableError(f"coordinator.{what}: no coordinator")
            return await work(plane)

        return call(world, world.coordinator_proc, run, f"coordinator.{what}", world.net.latency)

    async def register(self, info: NodeInfo) -> NodeConfig | None:
        data = encode(info)

        async def work(p: Any) -> bytes | None:
            config = await p.register(decode(data, NodeInfo))
            return None if config is None else encode(config)

        got = await self._call("register", work)
        return None if got is None else decode(got, NodeConfig)

    async def report(self, report: GroupReport) -> None:
        data = encode(report)
        kind = report_kind(report)
        await self._call("report", lambda p: p.report(decode(data, GroupReport)), kind)

    async def batch(self, batch: ReportBatch) -> None:
        data = encode(batch)
        received = self.world.received
        for report in batch.reports:
            received[f"batched report ({report_kind(report)})"] += 1
        received["batched group_beat"] += len(batch.beats)
        await self._call("batch", lambda p: p.batch(decode(data, ReportBatch)))

    async def group_beat(self, beat: GroupBeat) -> None:
        data = encode(beat)
        await self._call("group_beat", lambda p: p.group_beat(decode(data, GroupBeat)))

    async def abandon(self, job: str, rank: int, step: int, session: str) -> AbandonReply:
        async def work(p: Any) -> bytes:
            return encode(await p.abandon(job, rank, step, session))

        return decode(await self._call("abandon", work), AbandonReply)

    async def step_status(
        self, job: str, step: int, rank: int, sums: tuple[int, ...], staging: str = ""
    ) -> Outcome:
        async def work(p: Any) -> bytes:
            return encode(await p.step_status(job, step, rank, sums, staging))

        return decode(await self._call("step_status", work), Outcome)


class ScaleFabric:
    """The fabric the coordinator (``coordinator=True``: it encodes what it sends) or the
    nodes use to reach the others."""

    def __init__(self, world: ScaleWorld, coordinator: bool) -> None:
        self.world = world
        self.wire = coordinator
        self._poster = Poster()

    def node(self, node: str) -> _NodeLink:
        return _NodeLink(self.world, node, self.wire)

    def leader(self, node: str) -> _LeaderLink:
        return _LeaderLink(_NodeLink(self.world, node, self.wire))

    def coordinator(self) -> _CoordinatorLink:
        return _CoordinatorLink(self.world)

    def relay(self, node: str) -> _RelayLink:
        return _RelayLink(_NodeLink(self.world, node, False))

    def post_leaders(self, posts: Sequence[LeaderPost]) -> None:
        """Each message encoded once by the coordinator, decoded by each receiver."""
        wire, sends = self._wire(), []
        for node, msg in posts:
            if isinstance(msg, PrepareOrder):
                work = _prepare_on(wire(msg), self.wire)
                sends.append(self._post_one(node, "leader_prepare", work))
            else:
                sends.append(
                    self._post_one(node, "leader_decide", _decide_on(wire(msg), self.wire))
                )
        self._poster.post(sends)

    def post_nodes(self, posts: Sequence[NodePost]) -> None:
        wire = self._wire()
        self._poster.post(
            [
                self._post_one(node, "decide", _member_decide(wire(msg), self.wire))
                for node, msg in posts
            ]
        )

    def post_relays(self, posts: Sequence[RelayPost]) -> None:
        wire = self._wire()
        self._poster.post(
            [
                self._post_one(node, "relay_down", _relay_down(wire(batch), self.wire))
                for node, batch in posts
            ]
        )

    def _wire(self) -> PerMessage[Any, Any]:
        """What receivers decode: a message's bytes from the coordinator, else itself."""
        return PerMessage(encode if self.wire else (lambda msg: msg))

    def _post_one(
        self, node: str, what: str, work: Callable[[Any], Coroutine[Any, Any, Any]]
    ) -> tuple[str, Awaitable[None]]:
        world = self.world
        target = world.nodes.get(node)

        async def run() -> None:
            current = world.nodes.get(node)
            if current is None or current.member is None:
                raise ActorUnavailableError(f"SMP {node[:8]}.{what}: no SMP")
            await work(current.member)

        if self.wire:
            world.sent[what] += 1
        proc = target.proc if target is not None else None
        label = f"SMP {node[:8]}.{what}"
        return label, delivered(proc, run, label, world.net.latency)

    def watch(self, node: str) -> Awaitable[None]:
        """Fails ``death`` seconds after the node's current SMP process dies."""
        world = self.world
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        target = world.nodes.get(node)
        proc = target.proc if target is not None else None
        if proc is None or not proc.alive:
            fut.set_exception(ActorUnavailableError(f"SMP {node[:8]}: dead"))
            return fut

        def died() -> None:
            def report() -> None:
                if not fut.done():
                    fut.set_exception(ActorUnavailableError(f"SMP {node[:8]}.watch: actor died"))

            world.loop.call_later(world.net.death, report)

        proc.on_crash.append(died)
        return fut

    async def discover(self) -> list[str]:
        return sorted(n for n, s in self.world.nodes.items() if s.proc is not None and s.proc.alive)


def _read(data: Any, cls: type[T], wire: bool) -> T:
    out: T = decode(data, cls) if wire else data
    return out


def _prepare_on(data: Any, wire: bool) -> Callable[[Any], Coroutine[Any, Any, None]]:
    async def work(member: Any) -> None:
        if member.leader is None:
            raise SnapstoreError(f"node {member.node[:12]} does not lead a group now")
        await member.leader.prepare(_read(data, PrepareOrder, wire))

    return work


def _decide_on(data: Any, wire: bool) -> Callable[[Any], Coroutine[Any, Any, None]]:
    async def work(member: Any) -> None:
        msg = _read(data, Decision, wire)
        if member.leader is None:
            await member.decide(msg)  # as the real SMP does
        else:
            await member.leader.decide(msg)

    return work


def _relay_down(data: Any, wire: bool) -> Callable[[Any], Coroutine[Any, Any, None]]:
    async def work(member: Any) -> None:
        await member.relay.down(_read(data, LeaderBatch, wire))

    return work


def _member_decide(data: Any, wire: bool) -> Callable[[Any], Coroutine[Any, Any, None]]:
    async def work(member: Any) -> None:
        await member.decide(_read(data, Decision, wire))

    return work
