"""The SMP (snapshot management process): one Ray actor per node.

It composes the node's store (:class:`snapstore.node.store.ShmNodeStore`:
shared-memory segments and byte work) with the node's control-plane agent
(:class:`snapstore.control.member.Member`, which hosts the group's
:class:`snapstore.control.leader.Leader` when this node leads it). It is an
asyncio actor: control messages run on its event loop, byte work on a small
thread pool, so a trainer waiting for its commit costs no thread.

Methods take and return wire bytes (:mod:`snapstore.format.wire`) or plain
scalars; nothing is pickled but those. Call protocol:

- trainers: :meth:`lease`, :meth:`stage_and_wait` (the staging checksummed,
  then the step's outcome and the next slot's lease, from this node, in one
  call: no coordinator round trip), :meth:`wait_outcome` (waiting again), the
  two over the control channel once :meth:`channel_access` said where it is,
  :meth:`open_committed`, :meth:`fetch`;
- the group leader and the coordinator: the node link (:meth:`configure`,
  :meth:`build_parity`, :meth:`keep_prepared`, :meth:`decide`,
  :meth:`rebuild`, :meth:`verify`, holds, :meth:`persist`,
  :meth:`verify_persisted`, :meth:`forget`, :meth:`drop_job`,
  :meth:`snapshot`) and :meth:`watch`;
- members of its group when it leads: ``leader_*``;
- tools: :meth:`info`, :meth:`ping`, :meth:`set_fault`, :meth:`destroy`.

It never imports torch: a restarted SMP is back in about a second, re-adopts
the segments its predecessor left, and registers with the coordinator.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import time
import uuid
from typing import Any

from snapstore.config import StoreConfig
from snapstore.control.member import Member
from snapstore.control.messages import (
    Decision,
    GroupBeat,
    GroupReport,
    LeaderBatch,
    MemberBeat,
    NodeConfig,
    NodeInfo,
    NodeNotice,
    OutcomeStatus,
    PrepareOrder,
)
from snapstore.control.rayfabric import CHANNEL_METHODS, RayFabric
from snapstore.control.runtime import LoopClock
from snapstore.errors import SnapstoreError
from snapstore.format.wire import decode, encode
from snapstore.format.work import PeerInfo, PersistOrder, WorkOrder
from snapstore.node.channel import ChannelServer
from snapstore.node.store import ShmNodeStore, auto_budget, node_dir

__all__ = ["SMP"]

logger = logging.getLogger(__name__)

WORK_THREADS = 8
SERVED = CHANNEL_METHODS | {"stage_and_wait", "wait_outcome"}
"""What the control channel serves: the control plane's calls (CHANNEL_METHODS) and a
trainer's save (its one call, and waiting again), which clients make over it once
:meth:`SMP.channel_access` told them where it is."""


class SMP:
    """One node's snapshot manager. See the module docstring for the call protocol."""

    def __init__(
        self,
        node_id: str,
        store_id: str,
        config: dict[str, Any],
        token: str,
        shm_dir: str,
        nodes_on_host: int = 1,
    ) -> None:
        import ray

        self.cfg = StoreConfig.from_dict(config)
        self.node_id = node_id
        self.store_id = store_id
        self.incarnation = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        budget = self.cfg.memory_per_node or auto_budget(nodes_on_host)
        address = ray.util.get_node_ip_address()
        # The control channel (snapstore.node.channel): the control plane's calls to this
        # SMP, past Ray's per-call cost. Bound now so the store's PeerInfo names its port.
        self.channel = ChannelServer(address, token, node_id, self._serve_call)
        self._token = token
        self.store = ShmNodeStore(
            node_id,
            node_dir(shm_dir, store_id, node_id),
            self.cfg,
            token,
            address,
            budget,
            control_port=self.channel.port,
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(WORK_THREADS, "smp-work")
        self._stopped = asyncio.Event()
        fabric = RayFabric(self.cfg.namespace)
        fabric.use_channels(token, self._peer, self._coordinator)
        self.member = Member(
            self.store,
            fabric,
            LoopClock(),
            self.cfg,
            self.incarnation,
            self._offload,
            self._describe,
        )
        # Ray runs an asyncio actor's __init__ on its event loop.
        self._channel_started = asyncio.get_running_loop().create_task(self.channel.start())
        self.member.start()
        logger.info(
            "SMP up, %d segments re-adopted",
            self.store.adopted,
            extra={"node": node_id, "incarnation": self.incarnation},
        )

    async def _offload(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def _peer(self, node: str) -> PeerInfo | None:
        """Where ``node``'s SMP is, as this node's configuration says (its group's)."""
        config = self.member.config
        return None if config is None else config.peers.get(node)

    def _coordinator(self) -> tuple[str, str, int] | None:
        """The coordinator's control channel, as this node's configuration says: (its
        identity, address, port)."""
        config = self.member.config
        if config is None or not config.coordinator_port:
            return None
        return config.coordinator, config.coordinator_address, config.coordinator_port

    async def _serve_call(self, method: str, args: list[Any]) -> Any:
        """A call that came over the control channel: one of :data:`SERVED`, as Ray would
        have made it."""
        if method not in SERVED:
            raise SnapstoreError(f"{method!r:.40} is not served over the control channel")
        return await getattr(self, method)(*args)

    def _describe(self) -> NodeInfo:
        sizes = self.store.sizes()
        return NodeInfo(
            node=self.node_id,
            incarnation=self.incarnation,
            peer=self.store.peer,
            pid=os.getpid(),
            started_at=self.started_at,
            budget=sizes["budget"],
            used=sizes["used"],
            data_bytes=sizes["data"],
            parity_bytes=sizes["parity"],
            spare_bytes=sizes["spare"] + sizes["work"] + sizes["delta"],
            held=sizes["held"],
            counters={**self.store.counters(), "channel_calls": self.channel.calls},
        )

    # -- identity -------------------------------------------------------------------------

    async def info(self) -> bytes:
        return encode(self._describe())

    async def ping(self) -> str:
        return self.incarnation

    async def watch(self) -> None:
        """Never returns while this SMP lives (the coordinator's death watch)."""
        await self._stopped.wait()

    # -- trainers -------------------------------------------------------------------------

    async def channel_access(self) -> list[Any]:
        """[node, address, port, token] of this SMP's control channel, for a trainer's
        client to save over it (:data:`SERVED`). The caller holds the Ray cluster's
        token already, which lets it call anything here; this gives it nothing more
        (docs/operating.md, Security)."""
        return [self.node_id, self.channel.address, self.channel.port, self._token]

    async def lease(self, job: str, rank: int, nbytes: int) -> bytes:
        return encode(await self.member.lease(job, rank, nbytes))

    async def stage_and_wait(
        self,
        job: str,
        rank: int,
        step: int,
        size: int,
        world_size: int,
        session: str,
        changed: list[list[int]] | None,
        base_step: int | None,
        client: dict[str, float] | None,
        timeout: float,
        next_size: int = 0,
    ) -> bytes:
        outcome = await self.member.stage_and_wait(
            job,
            rank,
            step,
            size,
            world_size,
            session,
            changed,
            base_step,
            client,
            timeout,
            next_size,
        )
        return encode(outcome)

    async def wait_outcome(
        self, job: str, rank: int, step: int, session: str, timeout: float, next_size: int = 0
    ) -> bytes:
        outcome = await self.member.wait_outcome(job, rank, step, session, timeout, next_size)
        return encode(outcome)

    async def open_committed(
        self, job: str, rank: int, step: int, size: int, sums: list[int]
    ) -> bytes:
        opened = await self._offload(self.store.open_committed, job, rank, step, size, tuple(sums))
        return encode(opened)

    async def fetch(
        self, job: str, rank: int, step: int, size: int, sums: list[int], peer: bytes
    ) -> bytes:
        src = decode(peer, PeerInfo)
        opened = await self._offload(self.store.fetch, job, rank, step, size, tuple(sums), src)
        return encode(opened)

    # -- the node link ---------------------------------------------------------------------

    async def configure(self, config: bytes) -> None:
        await self.member.configure(decode(config, NodeConfig))

    async def build_parity(self, order: bytes) -> bytes:
        return encode(await self.member.build_parity(decode(order, WorkOrder)))

    async def keep_prepared(self, record: bytes) -> None:
        await self.member.keep_prepared(record)

    async def decide(self, decision: bytes) -> bytes:
        return encode(await self.member.decide(decode(decision, Decision)))

    async def rebuild(self, order: bytes) -> bytes:
        return encode(await self.member.rebuild(decode(order, WorkOrder)))

    async def verify(self, record: bytes) -> bytes:
        return encode(await self.member.verify(record))

    async def hold(self, job: str, step: int, token: str, ttl: float) -> list[int]:
        return await self.member.hold(job, step, token, ttl)

    async def release(self, token: str) -> None:
        await self.member.release(token)

    async def persist(self, order: bytes) -> bytes:
        return encode(await self.member.persist(decode(order, PersistOrder)))

    async def verify_persisted(self, path: str, ranks: list[int]) -> dict[int, str | None]:
        return await self.member.verify_persisted(path, [int(r) for r in ranks])

    async def forget(self, job: str) -> None:
        await self.member.forget(job)

    async def drop_job(self, job: str) -> None:
        await self.member.drop_job(job)

    async def snapshot(self, requester: str = "") -> bytes:
        return encode(await self.member.snapshot(str(requester)))

    # -- the group leader hosted here --------------------------------------------------------

    def _leader(self) -> Any:
        leader = self.member.leader
        if leader is None:
            raise SnapstoreError(f"node {self.node_id[:12]} does not lead a group now")
        return leader

    async def leader_notice(self, notice: bytes) -> None:
        await self._leader().notice(decode(notice, NodeNotice))

    async def leader_beat(self, beat: bytes) -> None:
        await self._leader().beat(decode(beat, MemberBeat))

    async def leader_prepare(self, order: bytes) -> None:
        await self._leader().prepare(decode(order, PrepareOrder))

    # -- the relay hosted here (any node's, for the leaders that name it) ---------------------

    async def relay_report(self, report: bytes) -> None:
        await self.member.relay.report(decode(report, GroupReport))

    async def relay_beat(self, beat: bytes) -> None:
        await self.member.relay.group_beat(decode(beat, GroupBeat))

    async def relay_down(self, batch: bytes) -> None:
        await self.member.relay.down(decode(batch, LeaderBatch))

    async def leader_decide(self, decision: bytes) -> None:
        leader = self.member.leader
        msg = decode(decision, Decision)
        if leader is None:
            # Not (or no longer) a leader: apply it here, as a member.
            await self.member.decide(msg)
            return
        await leader.decide(msg)

    # -- tools ---------------------------------------------------------------------------------

    async def held(self) -> dict[str, list[str]]:
        return self.store.slots.held()

    async def set_fault(self, name: str, value: Any) -> None:
        self.store.set_fault(name, value)

    async def destroy(self) -> None:
        """Delete every segment of this node and stop (``snapstore down``)."""
        self.member.stop()
        self.channel.close()
        self._stopped.set()
        await self._offload(self.store.destroy)


_ = OutcomeStatus
