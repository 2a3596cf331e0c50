"""The coordinator actor: the control plane (:mod:`snapstore.control.plane`) behind Ray.

One detached, named, restartable asyncio actor per store, on the head node.
It keeps no bytes, only what :class:`ControlPlane` keeps; a restarted one
rebuilds it from the nodes. This class only adapts Ray calls to the plane
(decoding and encoding wire messages) and deploys an SMP on every Ray node
that should have one.

Call protocol:

- nodes: :meth:`register`, :meth:`report`, :meth:`group_beat`, :meth:`batch`,
  :meth:`abandon`, :meth:`step_status` (wire bytes), over Ray or the
  coordinator's control channel (:mod:`snapstore.node.channel`, its address
  in every node's configuration);
- trainers: :meth:`restore_plan`, :meth:`repair`, :meth:`note_restore`,
  :meth:`latest`, :meth:`persist`, :meth:`persisted_plan`,
  :meth:`persisted_bad`, :meth:`persisted`;
- controllers and tools: :meth:`abort_pending`, :meth:`job_info`,
  :meth:`drop_job`, :meth:`record`, :meth:`snapshot`, :meth:`node_list`,
  :meth:`ready`, :meth:`shutdown`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from snapstore.config import StoreConfig
from snapstore.control.messages import ErrorReply, GroupBeat, GroupReport, NodeInfo, ReportBatch
from snapstore.control.plane import ControlPlane
from snapstore.control.rayfabric import COORDINATOR_CHANNEL_METHODS, RayFabric
from snapstore.control.runtime import LoopClock
from snapstore.errors import SnapstoreError
from snapstore.format.wire import decode, encode
from snapstore.format.work import PeerInfo
from snapstore.node.channel import ChannelServer
from snapstore.node.store import COORDINATOR_NAME, smp_name
from snapstore.persist.backend import FilesTier

__all__ = ["CONTROL_RESOURCE", "COORDINATOR_NAME", "Coordinator"]

logger = logging.getLogger(__name__)

CONTROL_RESOURCE = "snapstore_control"
RAY_NODES_INTERVAL = 2.0
"""Seconds between looks at Ray's node table for nodes that need an SMP."""


class Coordinator:
    """The store's coordinator actor. See the module docstring for the call protocol."""

    def __init__(self, store_id: str, config: dict[str, Any], token: str, shm_dir: str) -> None:
        self.cfg = StoreConfig.from_dict(config)
        self.config_dict = dict(config)
        self.store_id = store_id
        self.token = token
        self.shm_dir = shm_dir
        self.fabric = RayFabric(self.cfg.namespace)
        tier = FilesTier(self.cfg.persist_dir) if self.cfg.persist_dir else None
        self.plane = ControlPlane(
            store_id, self.cfg, self.fabric, LoopClock(), self._offload, tier, self.config_dict
        )
        self.fabric.use_channels(token, self._peer)
        # The control channel (snapstore.node.channel): nodes' reports, beats and questions,
        # past Ray's per-call cost; its hello names this coordinator process, so a node
        # never reports to another coordinator that took the port after a restart.
        import ray

        self.channel = ChannelServer(
            ray.util.get_node_ip_address(), token, self.plane.identity, self._serve_call
        )
        self.plane.membership.channel = (self.channel.address, self.channel.port)
        self._deploying: set[str] = set()
        loop = asyncio.get_running_loop()
        self._channel_started = loop.create_task(self.channel.start())
        self._started: asyncio.Task[None] | None = loop.create_task(self._start())

    async def _serve_call(self, method: str, args: list[Any]) -> Any:
        """A call that came over the control channel: one of COORDINATOR_CHANNEL_METHODS, as
        Ray would have made it."""
        if method not in COORDINATOR_CHANNEL_METHODS:
            raise SnapstoreError(f"{method!r:.40} is not served over the control channel")
        self.plane.events.metrics.counters["channel_calls_total"] += 1
        return await getattr(self, method)(*args)

    def _peer(self, node: str) -> PeerInfo | None:
        """Where ``node``'s SMP is, as it last registered or beat (its control channel)."""
        info = self.plane.membership.infos.get(node)
        return None if info is None else info.peer

    async def _offload(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(fn, *args))

    async def _start(self) -> None:
        await self.plane.start(self.fabric.discover)
        self.plane.tasks.spawn(self._watch_ray_nodes(), "deploy SMPs")

    async def _ready(self) -> None:
        if self._started is not None:
            await asyncio.shield(self._started)

    # -- nodes ----------------------------------------------------------------------------

    async def register(self, info: bytes) -> bytes | None:
        await self._ready()
        config = await self.plane.register(decode(info, NodeInfo))
        return None if config is None else encode(config)

    async def report(self, report: bytes) -> None:
        await self._ready()
        await self.plane.report(decode(report, GroupReport))

    async def group_beat(self, beat: bytes) -> None:
        await self._ready()
        await self.plane.group_beat(decode(beat, GroupBeat))

    async def batch(self, batch: bytes) -> None:
        await self._ready()
        await self.plane.batch(decode(batch, ReportBatch))

    async def abandon(self, job: str, rank: int, step: int, session: str) -> bytes:
        await self._ready()
        return encode(await self.plane.abandon(job, int(rank), int(step), str(session)))

    async def step_status(
        self, job: str, step: int, rank: int, sums: list[int], staging: str = ""
    ) -> bytes:
        await self._ready()
        outcome = await self.plane.step_status(job, int(step), int(rank), tuple(sums), str(staging))
        return encode(outcome)

    # -- trainers --------------------------------------------------------------------------

    async def restore_plan(
        self,
        job: str,
        rank: int,
        node: str,
        session: str,
        restarted: bool,
        world_size: int,
        timeout: float,
    ) -> bytes:
        await self._ready()
        plan = await self.plane.restore_plan(
            job, int(rank), node, session, bool(restarted), int(world_size), float(timeout)
        )
        return encode(plan)

    async def repair(self, job: str, rank: int, step: int, bad: list[int]) -> bytes | int:
        await self._ready()
        got = await self.plane.repair(job, int(rank), int(step), [int(b) for b in bad])
        return encode(got) if isinstance(got, ErrorReply) else int(got)

    async def note_restore(self, job: str, rank: int, info: dict[str, Any]) -> None:
        await self._ready()
        await self.plane.note_restore(job, int(rank), dict(info))

    async def latest(self, job: str) -> int | None:
        await self._ready()
        return await self.plane.latest(job)

    async def persist(self, job: str, timeout: float) -> dict[str, Any] | bytes:
        await self._ready()
        got = await self.plane.persist(job, float(timeout))
        return encode(got) if isinstance(got, ErrorReply) else got

    async def persisted_plan(
        self, job: str, rank: int, session: str, reason: str, restarted: bool, timeout: float
    ) -> dict[str, Any] | bytes:
        await self._ready()
        got = await self.plane.persisted_plan(
            job, int(rank), session, reason, bool(restarted), float(timeout)
        )
        return encode(got) if isinstance(got, ErrorReply) else got

    async def persisted_bad(self, job: str, path: str, problem: str) -> None:
        await self._ready()
        await self.plane.persisted_bad(job, path, problem)

    async def persisted(self, job: str) -> list[dict[str, Any]]:
        await self._ready()
        return await self.plane.persisted(job)

    # -- controllers and tools -----------------------------------------------------------

    async def abort_pending(self, job: str, reason: str) -> list[int]:
        await self._ready()
        return await self.plane.abort_pending(job, reason)

    async def job_info(self, job: str, events: int = 50) -> dict[str, Any] | None:
        await self._ready()
        return await self.plane.job_info(job, int(events))

    async def drop_job(self, job: str) -> dict[str, Any]:
        await self._ready()
        await self.plane.drop_job(job)
        return {"ok": True}

    async def record(self, job: str) -> bytes | None:
        await self._ready()
        return await self.plane.record(job)

    async def node_list(self) -> list[dict[str, Any]]:
        await self._ready()
        return self.plane.node_list()

    async def snapshot(self, events: int = 200) -> dict[str, Any]:
        await self._ready()
        return await self.plane.snapshot(int(events))

    async def ready(self, min_nodes: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        await self._ready()
        return await self.plane.ready(int(min_nodes), float(timeout))

    async def shutdown(self) -> None:
        """Stop background work (``snapstore down`` kills the actor next)."""
        self.plane.stop()
        self.channel.close()

    # -- deploying SMPs ------------------------------------------------------------------------

    async def _watch_ray_nodes(self) -> None:
        """Deploy an SMP on every alive Ray node that should have one and has none."""
        import ray

        loop = asyncio.get_running_loop()
        while True:
            try:
                ray_nodes = await loop.run_in_executor(None, ray.nodes)
            except Exception as e:
                logger.info("cannot list Ray nodes: %s", e)
                await asyncio.sleep(RAY_NODES_INTERVAL)
                continue
            on_host: dict[str, int] = {}
            for rn in ray_nodes:
                if rn.get("Alive") and not rn.get("Resources", {}).get(CONTROL_RESOURCE):
                    ip = rn.get("NodeManagerAddress", "")
                    on_host[ip] = on_host.get(ip, 0) + 1
            for rn in ray_nodes:
                nid = str(rn.get("NodeID"))
                if not rn.get("Alive") or rn.get("Resources", {}).get(CONTROL_RESOURCE):
                    continue
                if nid in self.plane.membership.nodes or nid in self._deploying:
                    continue
                self._deploying.add(nid)
                hosts = on_host.get(rn.get("NodeManagerAddress", ""), 1)
                try:
                    await loop.run_in_executor(None, self._deploy_smp, nid, hosts)
                except Exception as e:
                    # Not swallowed: recorded, and tried again on the next pass.
                    self._deploying.discard(nid)
                    self.plane.events.add(
                        "error", f"deploying an SMP on node {nid[:12]} failed: {e}", node=nid
                    )
            await asyncio.sleep(RAY_NODES_INTERVAL)

    def _deploy_smp(self, node_id: str, nodes_on_host: int) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from snapstore.control.smp import SMP

        try:
            ray.get_actor(smp_name(node_id), namespace=self.cfg.namespace)
            return
        except ValueError:
            pass
        ray.remote(SMP).options(
            name=smp_name(node_id),
            namespace=self.cfg.namespace,
            lifetime="detached",
            max_restarts=-1,
            max_concurrency=1000,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(node_id, self.store_id, self.config_dict, self.token, self.shm_dir, nodes_on_host)
        self.plane.events.add("smp_deployed", f"SMP deployed on node {node_id[:12]}", node=node_id)
        logger.info("deployed SMP on %s at %.0f", node_id[:12], time.time())
