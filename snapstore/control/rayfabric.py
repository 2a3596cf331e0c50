"""The control plane's links over Ray actor calls (see :mod:`snapstore.control.links`).

Every message crosses as the bytes of :mod:`snapstore.format.wire` (Ray
pickles only those bytes and plain scalars); replies are decoded and
checked on arrival. Ray's errors become snapstore's: an actor that is dead
or restarting raises :class:`ActorUnavailableError`, an error raised in the
actor arrives as itself when it is a :class:`SnapstoreError`.

Calls to an SMP's :data:`CHANNEL_METHODS`, and to the coordinator's
:data:`COORDINATOR_CHANNEL_METHODS`, go over their control channels
(:mod:`snapstore.node.channel`: about 0.1 ms of CPU a side, where a Ray
actor call costs 1.7 ms of the callee's and 0.9 ms of the caller's) once
the process says where they are (:meth:`RayFabric.use_channels`), and
through Ray when no connection to the channel can be made.

A node's watch is one pending call to its SMP's ``watch`` method, which
never returns while the SMP lives: Ray fails it the moment the SMP's
process or node dies (measured here: 23 ms after a SIGKILL).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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
    PeerInfo,
    PersistOrder,
    PersistResult,
    VerifyReport,
    WorkOrder,
    WorkResult,
)
from snapstore.node.channel import Channels, ChannelUnreachable
from snapstore.node.store import COORDINATOR_NAME, smp_name
from snapstore.rpc import describe

__all__ = ["CHANNEL_METHODS", "COORDINATOR_CHANNEL_METHODS", "RayFabric", "await_ref"]

T = TypeVar("T")

CHANNEL_METHODS = frozenset(
    {
        "configure",
        "build_parity",
        "keep_prepared",
        "decide",
        "rebuild",
        "verify",
        "hold",
        "release",
        "persist",
        "verify_persisted",
        "forget",
        "drop_job",
        "snapshot",
        "leader_notice",
        "leader_beat",
        "leader_prepare",
        "leader_decide",
        "relay_report",
        "relay_beat",
        "relay_down",
    }
)
"""The SMP methods the control plane calls over an SMP's control channel (and the SMP
serves there): its node link, its leader's and its relay's. Not ``watch``, which must
fail through Ray the moment the SMP dies, nor trainers' calls or tools."""


COORDINATOR_CHANNEL_METHODS = frozenset(
    {"register", "report", "group_beat", "batch", "abandon", "step_status"}
)
"""The coordinator methods nodes call over its control channel (and it serves there)."""


_UNREACHED = object()
"""RayFabric.over_channel's answer when the call must go through Ray."""


def _nowhere(node: str) -> PeerInfo | None:
    return None


def _no_coordinator() -> tuple[str, str, int] | None:
    return None


async def await_ref(ref: Any, what: str) -> Any:
    """Await a Ray call, raising snapstore errors instead of Ray's wrappers."""
    import ray

    try:
        return await ref
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, SnapstoreError):
            raise cause from None
        raise SnapstoreError(f"{what} failed: {describe(cause or e)}") from None
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
        raise ActorUnavailableError(f"{what}: actor unavailable ({describe(e)})") from None


class _Handles:
    """Actor handles by name, looked up once (off the event loop) and kept."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._cache: dict[str, Any] = {}

    async def get(self, name: str) -> Any:
        handle = self._cache.get(name)
        if handle is None:
            import ray

            loop = asyncio.get_running_loop()
            try:
                handle = await loop.run_in_executor(
                    None, functools.partial(ray.get_actor, name, namespace=self.namespace)
                )
            except ValueError:
                raise ActorUnavailableError(f"no actor {name} (not started, or gone)") from None
            self._cache[name] = handle
        return handle

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)


class _RayNode:
    def __init__(self, fabric: RayFabric, node: str) -> None:
        self.node = node
        self._fabric = fabric
        self._handles = fabric._handles
        self._name = smp_name(node)

    async def _call(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on the node's SMP: over its control channel where this process
        has one and knows where the node's is, else (or when no connection can be made)
        as a Ray call."""
        if method in CHANNEL_METHODS:
            peer = self._fabric.locate(self.node)
            if peer is not None and peer.control_port:
                where = (self.node, peer.address, peer.control_port)
                got = await self._fabric.over_channel(where, method, args)
                if got is not _UNREACHED:
                    return got
        handle = await self._handles.get(self._name)
        try:
            return await await_ref(
                getattr(handle, method).remote(*args), f"SMP {self.node[:12]}.{method}"
            )
        except ActorUnavailableError:
            self._handles.forget(self._name)
            raise

    async def configure(self, config: NodeConfig) -> None:
        await self._call("configure", encode(config))

    async def build_parity(self, order: WorkOrder) -> WorkResult:
        return decode(await self._call("build_parity", encode(order)), WorkResult)

    async def keep_prepared(self, record: bytes) -> None:
        await self._call("keep_prepared", record)

    async def decide(self, decision: Decision) -> CommitResult:
        return decode(await self._call("decide", encode(decision)), CommitResult)

    async def rebuild(self, order: WorkOrder) -> WorkResult:
        return decode(await self._call("rebuild", encode(order)), WorkResult)

    async def verify(self, record: bytes) -> VerifyReport:
        return decode(await self._call("verify", record), VerifyReport)

    async def hold(self, job: str, step: int, token: str, ttl: float) -> list[int]:
        return [int(r) for r in await self._call("hold", job, step, token, ttl)]

    async def release(self, token: str) -> None:
        await self._call("release", token)

    async def persist(self, order: PersistOrder) -> PersistResult:
        return decode(await self._call("persist", encode(order)), PersistResult)

    async def verify_persisted(self, path: str, ranks: list[int]) -> dict[int, str | None]:
        got = await self._call("verify_persisted", path, ranks)
        return {int(r): (None if v is None else str(v)) for r, v in got.items()}

    async def forget(self, job: str) -> None:
        await self._call("forget", job)

    async def drop_job(self, job: str) -> None:
        await self._call("drop_job", job)

    async def snapshot(self, requester: str = "") -> NodeSnapshot:
        return decode(await self._call("snapshot", requester), NodeSnapshot)


class _RayLeader:
    def __init__(self, node: _RayNode) -> None:
        self.node = node.node
        self._n = node

    async def notice(self, notice: NodeNotice) -> None:
        await self._n._call("leader_notice", encode(notice))

    async def beat(self, beat: MemberBeat) -> None:
        await self._n._call("leader_beat", encode(beat))


class _RayRelay:
    def __init__(self, node: _RayNode) -> None:
        self.node = node.node
        self._n = node

    async def report(self, report: GroupReport) -> None:
        await self._n._call("relay_report", encode(report))

    async def group_beat(self, beat: GroupBeat) -> None:
        await self._n._call("relay_beat", encode(beat))

    async def down(self, batch: LeaderBatch) -> None:
        await self._n._call("relay_down", encode(batch))


class _RayCoordinator:
    def __init__(self, fabric: RayFabric) -> None:
        self._fabric = fabric
        self._handles = fabric._handles

    async def _call(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on the coordinator: over its control channel where this process
        knows where it is (and can connect), else as a Ray call."""
        if method in COORDINATOR_CHANNEL_METHODS:
            where = self._fabric.locate_coordinator()
            if where is not None:
                got = await self._fabric.over_channel(where, method, args)
                if got is not _UNREACHED:
                    return got
        handle = await self._handles.get(COORDINATOR_NAME)
        try:
            return await await_ref(getattr(handle, method).remote(*args), f"coordinator.{method}")
        except ActorUnavailableError:
            self._handles.forget(COORDINATOR_NAME)
            raise

    async def register(self, info: NodeInfo) -> NodeConfig | None:
        got = await self._call("register", encode(info))
        return None if got is None else decode(got, NodeConfig)

    async def report(self, report: GroupReport) -> None:
        await self._call("report", encode(report))

    async def group_beat(self, beat: GroupBeat) -> None:
        await self._call("group_beat", encode(beat))

    async def batch(self, batch: ReportBatch) -> None:
        await self._call("batch", encode(batch))

    async def abandon(self, job: str, rank: int, step: int, session: str) -> AbandonReply:
        return decode(await self._call("abandon", job, rank, step, session), AbandonReply)

    async def step_status(
        self, job: str, step: int, rank: int, sums: tuple[int, ...], staging: str = ""
    ) -> Outcome:
        got = await self._call("step_status", job, step, rank, list(sums), staging)
        return decode(got, Outcome)


class RayFabric:
    """Links to SMPs, their leaders and the coordinator, as named Ray actors; calls to an
    SMP's :data:`CHANNEL_METHODS` go over its control channel once :meth:`use_channels`
    says how to find it."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._handles = _Handles(namespace)
        self._nodes: dict[str, _RayNode] = {}
        self._poster = Poster()
        self.channels: Channels | None = None
        self.locate: Callable[[str], PeerInfo | None] = _nowhere
        self.locate_coordinator: Callable[[], tuple[str, str, int] | None] = _no_coordinator

    def use_channels(
        self,
        token: str,
        locate: Callable[[str], PeerInfo | None],
        locate_coordinator: Callable[[], tuple[str, str, int] | None] = _no_coordinator,
    ) -> None:
        """Call SMPs (and the coordinator) over their control channels
        (snapstore.node.channel), authenticated with the store's ``token``; ``locate(node)``:
        where the node's SMP is now, as this process last heard (its registration, a
        configuration's peers), or None; ``locate_coordinator()``: the coordinator's
        (identity, address, port), or None."""
        self.channels = Channels(token)
        self.locate = locate
        self.locate_coordinator = locate_coordinator

    async def over_channel(
        self, where: tuple[str, str, int], method: str, args: tuple[Any, ...]
    ) -> Any:
        """``method(*args)`` over the control channel at ``where`` (the server's identity,
        address, port); :data:`_UNREACHED` when this process uses no channels or none
        could be reached there (nothing was sent: the caller goes through Ray)."""
        if self.channels is None:
            return _UNREACHED
        try:
            return await self.channels.call(*where, method, *args)
        except ChannelUnreachable:
            return _UNREACHED

    def node(self, node: str) -> _RayNode:
        link = self._nodes.get(node)
        if link is None:
            link = self._nodes[node] = _RayNode(self, node)
        return link

    def leader(self, node: str) -> _RayLeader:
        return _RayLeader(self.node(node))

    def coordinator(self) -> _RayCoordinator:
        return _RayCoordinator(self)

    def relay(self, node: str) -> _RayRelay:
        return _RayRelay(self.node(node))

    def post_leaders(self, posts: Sequence[LeaderPost]) -> None:
        self._post(
            [
                (node, "leader_prepare" if isinstance(msg, PrepareOrder) else "leader_decide", msg)
                for node, msg in posts
            ]
        )

    def post_nodes(self, posts: Sequence[NodePost]) -> None:
        self._post([(node, "decide", msg) for node, msg in posts])

    def post_relays(self, posts: Sequence[RelayPost]) -> None:
        self._post([(node, "relay_down", batch) for node, batch in posts])

    def _post(self, sends: list[tuple[str, str, PrepareOrder | Decision | LeaderBatch]]) -> None:
        """One encoding per message however many nodes get it (a decision goes to every
        group's leader)."""
        wire = PerMessage(encode)
        self._poster.post(
            [
                (f"{method} to {node[:12]}", self.node(node)._call(method, wire(msg)))
                for node, method, msg in sends
            ]
        )

    async def watch(self, node: str) -> None:
        """Returns or raises when the node's SMP (this incarnation of it) is gone."""
        await self.node(node)._call("watch")

    async def discover(self) -> list[str]:
        """Nodes with a running SMP of this store's namespace (a restarted coordinator)."""
        import ray

        loop = asyncio.get_running_loop()
        named = await loop.run_in_executor(
            None, functools.partial(ray.util.list_named_actors, all_namespaces=True)
        )
        prefix = smp_name("")
        return sorted(
            str(n["name"])[len(prefix) :]
            for n in named
            if isinstance(n, dict)
            and n.get("namespace") == self.namespace
            and str(n.get("name", "")).startswith(prefix)
        )
