"""The coordinator actor: membership, stripe groups, commits, failure detection.

One detached, named, restartable Ray actor per store (on the head node). It
keeps no bytes: only nodes, groups, jobs and step records. Its state can be
rebuilt from the SMPs, which each keep the last committed record of every
job, so a restarted coordinator resumes where the old one left off (steps in
flight are aborted; their trainers see an error and save again).

Call protocol:

- SMPs call :meth:`heartbeat` every ``heartbeat_interval`` (it also registers
  a new SMP, or notices a restarted one) and :meth:`rank_staged` when a
  trainer staged a step; :meth:`abandon` before reusing an uncommitted slot.
- Clients call :meth:`wait_commit`, :meth:`latest`, :meth:`restore_plan`,
  :meth:`repair`, :meth:`persist`, :meth:`persisted_plan`; tools call
  :meth:`snapshot`, :meth:`nodes`.
- Committed steps are flushed to disk in the background (see
  :mod:`snapstore.control.flush`); the persist directory is listed every few seconds.
- A background task checks heartbeat ages every 100 ms and deploys SMPs on
  Ray nodes that have none; commits, re-protection and reconciliation run as
  tasks serialised per job by the job's lock (see :mod:`snapstore.control.commit` and
  :mod:`snapstore.control.recovery`).

It is an asyncio actor: every method runs on one event loop, so state needs
no locks beyond the per-job ones that order multi-step operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from snapstore.config import StoreConfig
from snapstore.control import commit, fallback, recovery
from snapstore.control.flush import Flusher
from snapstore.control.placement import form_groups, regroup
from snapstore.control.state import (
    ALIVE,
    LOST,
    SUSPECT,
    EventLog,
    JobState,
    NodeState,
    stripe_health,
)
from snapstore.errors import ConfigError
from snapstore.format.record import StepRecord
from snapstore.node.smp import COORDINATOR_NAME, SMP, smp_name
from snapstore.node.transport import PeerInfo

__all__ = ["COORDINATOR_NAME", "Coordinator"]

logger = logging.getLogger(__name__)

CONTROL_RESOURCE = "snapstore_control"


class Coordinator:
    """The store's control plane. See the module docstring for the call protocol."""

    def __init__(self, store_id: str, config: dict[str, Any], token: str, shm_dir: str) -> None:
        self.cfg = StoreConfig.from_dict(config)
        self.config_dict = dict(config)
        self.store_id = store_id
        self.token = token
        self.shm_dir = shm_dir
        self.nodes: dict[str, NodeState] = {}
        self.groups: list[tuple[str, ...]] = []
        self.jobs: dict[str, JobState] = {}
        self.events = EventLog()
        self.started_at = time.time()
        self._bg: list[asyncio.Task[Any]] = []
        self._ready: asyncio.Event | None = None
        self._deploying: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.flusher = Flusher(self)

    # -- startup and recovery -------------------------------------------------

    async def _ensure_started(self) -> None:
        if self._ready is None:
            self._ready = asyncio.Event()
            try:
                await recovery.recover_from_smps(self)
            except Exception as e:
                logger.exception("recovery from SMPs failed")
                self.events.add("error", f"recovery from SMPs failed: {e}")
            await self.flusher.open()
            self._ready.set()
            self._bg.append(asyncio.create_task(self._monitor()))
            self._bg.append(asyncio.create_task(self._watch_ray_nodes()))
        await self._ready.wait()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run a background task and keep a reference so it is not collected."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def ready(self, min_nodes: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until at least ``min_nodes`` SMPs heartbeat and groups are formed."""
        await self._ensure_started()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = self.alive()
            if len(alive) >= min_nodes and (self.groups or len(alive) < self.width):
                return {"nodes": len(alive), "groups": [list(g) for g in self.groups]}
            await asyncio.sleep(0.05)
        return {
            "nodes": len(self.alive()),
            "groups": [list(g) for g in self.groups],
            "timeout": True,
        }

    # -- membership -----------------------------------------------------------

    @property
    def width(self) -> int:
        return self.cfg.k + self.cfg.m

    def alive(self) -> list[str]:
        return [n for n, s in self.nodes.items() if s.status == ALIVE]

    def peers(self) -> dict[str, PeerInfo]:
        return {n: PeerInfo.from_dict(s.info["peer"]) for n, s in self.nodes.items()}

    def handle(self, node: str) -> Any:
        return self.nodes[node].handle

    async def heartbeat(
        self, node_id: str, incarnation: str, info: dict[str, Any]
    ) -> dict[str, Any]:
        await self._ensure_started()
        ns = self.nodes.get(node_id)
        now = time.monotonic()
        if ns is None:
            handle = await asyncio.get_running_loop().run_in_executor(
                None, lambda: ray.get_actor(smp_name(node_id), namespace=self.cfg.namespace)
            )
            ns = self.nodes[node_id] = NodeState(node_id, info, incarnation, handle)
            self.events.add("node_joined", f"node {node_id[:12]} joined", node=node_id)
            self.regroup(reason=f"node {node_id[:12]} joined")
        elif ns.incarnation != incarnation:
            previous = ns.status
            ns.incarnation, ns.info = incarnation, info
            ns.status, ns.last_beat, ns.last_beat_wall = ALIVE, now, time.time()
            self.events.add(
                "smp_restarted",
                f"SMP on node {node_id[:12]} restarted (was {previous})",
                node=node_id,
            )
            # Trainers on that node could not stage while it was down: steps in
            # progress of jobs living there will not complete.
            for job in self.jobs.values():
                rec = job.committed
                if rec is not None and node_id in rec.nodes():
                    for step in list(job.pending):
                        commit.abort(self, job, step, f"the SMP on node {node_id[:12]} restarted")
            if previous == LOST:
                self.regroup(reason=f"node {node_id[:12]} is back, empty")
            else:
                self.spawn(recovery.reconcile_node(self, node_id))
        elif ns.status != ALIVE:
            gap = now - ns.last_beat
            self.events.add(
                "node_back",
                f"node {node_id[:12]} heartbeats again after {gap:.1f} s",
                node=node_id,
            )
            was_lost = ns.status == LOST
            ns.status = ALIVE
            if was_lost:
                self.regroup(reason=f"node {node_id[:12]} is back")
            for job in list(self.jobs.values()):
                if job.committed is not None and job.status == "degraded":
                    self.spawn(recovery.reprotect(self, job.name))
        ns.info = info
        ns.last_beat, ns.last_beat_wall = now, time.time()
        return {"ok": True}

    def regroup(self, reason: str) -> None:
        alive = self.alive()
        try:
            new = (
                regroup(self.groups, alive, self.cfg.k, self.cfg.m)
                if self.groups
                else (form_groups(alive, self.cfg.k, self.cfg.m))
            )
        except ConfigError as e:
            if self.groups:
                self.events.add("unprotected", f"cannot form stripe groups ({reason}): {e}")
            self.groups = []
            return
        if new != self.groups:
            self.groups = new
            self.events.add(
                "groups",
                f"stripe groups: {[[n[:8] for n in g] for g in new]} ({reason})",
                groups=[list(g) for g in new],
            )
            for job in list(self.jobs.values()):
                if job.committed is not None and (job.status != "protected" or job.relocated):
                    job.unrecoverable.clear()  # membership changed: try again
                    self.spawn(recovery.reprotect(self, job.name))

    async def _monitor(self) -> None:
        """Heartbeat ages: silent -> suspect (not read from) -> lost (rebuilt elsewhere)."""
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            wall = time.time()
            for js in list(self.jobs.values()):
                for step, p in list(js.pending.items()):
                    if not p.committing and wall - p.started_at > self.cfg.save_timeout:
                        commit.abort(
                            self,
                            js,
                            step,
                            f"only ranks {sorted(p.staged)} of {p.world_size} staged it within "
                            f"{self.cfg.save_timeout:.0f} s",
                        )
            for ns in list(self.nodes.values()):
                age = ns.beat_age(now)
                if ns.status == ALIVE and age > self.cfg.failure_timeout:
                    ns.status = SUSPECT
                    ns.silent_since = ns.last_beat_wall
                    ns.detected_at = time.time()
                    self.events.add(
                        "node_silent",
                        f"node {ns.node_id[:12]} missed heartbeats for {age:.2f} s",
                        node=ns.node_id,
                        detection_latency=round(age, 3),
                        last_heartbeat=ns.last_beat_wall,
                    )
                    for job in self.jobs.values():
                        commit.abort_pending_on(self, job, ns.node_id, "node stopped heartbeating")
                        rec = job.committed
                        if (
                            rec is not None
                            and ns.node_id in rec.nodes()
                            and job.status == "protected"
                        ):
                            job.status = "degraded"
                            job.status_detail = f"node {ns.node_id[:12]} is silent"
                elif (
                    ns.status == SUSPECT
                    and age > self.cfg.failure_timeout + self.cfg.reprotect_delay
                ):
                    ns.status = LOST
                    self.events.add(
                        "node_lost",
                        f"node {ns.node_id[:12]} declared lost after {age:.1f} s of silence",
                        node=ns.node_id,
                    )
                    self.regroup(reason=f"node {ns.node_id[:12]} lost")
                    for name in list(self.jobs):
                        self.spawn(recovery.reprotect(self, name))

    async def _watch_ray_nodes(self) -> None:
        """Deploy an SMP on every alive Ray node that should have one and has none."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(Exception):
                ray_nodes = await loop.run_in_executor(None, ray.nodes)
                on_host: dict[str, int] = {}
                for rn in ray_nodes:
                    if rn.get("Alive") and not rn.get("Resources", {}).get(CONTROL_RESOURCE):
                        ip = rn.get("NodeManagerAddress", "")
                        on_host[ip] = on_host.get(ip, 0) + 1
                for rn in ray_nodes:
                    nid = rn.get("NodeID")
                    if not rn.get("Alive") or rn.get("Resources", {}).get(CONTROL_RESOURCE):
                        if nid in self.nodes and self.nodes[nid].status == SUSPECT:
                            # Ray agrees the node is dead: no point waiting for it.
                            self.nodes[nid].last_beat -= self.cfg.reprotect_delay
                        continue
                    if nid in self.nodes or nid in self._deploying:
                        continue
                    self._deploying.add(nid)
                    hosts = on_host.get(rn.get("NodeManagerAddress", ""), 1)
                    await loop.run_in_executor(None, self._deploy_smp, nid, hosts)
            await asyncio.sleep(1.0)

    def _deploy_smp(self, node_id: str, nodes_on_host: int) -> None:
        try:
            ray.get_actor(smp_name(node_id), namespace=self.cfg.namespace)
            return
        except ValueError:
            pass
        actor_cls = ray.remote(SMP)
        actor_cls.options(
            name=smp_name(node_id),
            namespace=self.cfg.namespace,
            lifetime="detached",
            max_restarts=-1,
            max_concurrency=32,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(node_id, self.store_id, self.config_dict, self.token, self.shm_dir, nodes_on_host)
        self.events.add("smp_deployed", f"SMP deployed on node {node_id[:12]}", node=node_id)

    # -- saving ---------------------------------------------------------------

    async def rank_staged(
        self,
        job: str,
        step: int,
        rank: int,
        node: str,
        size: int,
        sums: list[int],
        world_size: int,
        delta: dict[str, Any] | None = None,
        client: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        await self._ensure_started()
        return commit.rank_staged(
            self, job, step, rank, node, size, sums, world_size, delta, client
        )

    async def abandon(self, job: str, rank: int, step: int) -> dict[str, Any]:
        await self._ensure_started()
        return commit.abandon(self, job, rank, step)

    async def wait_commit(self, job: str, step: int, timeout: float) -> dict[str, Any]:
        await self._ensure_started()
        return await commit.wait_commit(self, job, step, timeout)

    async def abort_pending(self, job: str, reason: str) -> list[int]:
        """A job controller restarts the job: abort every step in progress now.

        Ranks waiting for those steps' commits get SaveFailedError at once
        instead of waiting for a rank that is gone.
        """
        await self._ensure_started()
        js = self.jobs.get(job)
        if js is None:
            return []
        steps = sorted(js.pending)
        for step in steps:
            commit.abort(self, js, step, reason)
        return steps

    async def latest(self, job: str) -> int | None:
        await self._ensure_started()
        js = self.jobs.get(job)
        return None if js is None or js.committed is None else js.committed.step

    async def drop_job(self, job: str) -> dict[str, Any]:
        await self._ensure_started()
        js = self.jobs.pop(job, None)
        for n in self.alive():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.handle(n).drop_job.remote(job), 30)
        if js is not None:
            js.resolve(1 << 62, {"status": "failed", "reason": "job dropped"})
        self.events.add("job_dropped", f"job {job!r} dropped", job=job)
        return {"ok": True}

    # -- restoring ------------------------------------------------------------

    async def restore_plan(
        self, job: str, rank: int, node: str, timeout: float, restarted: bool = True
    ) -> dict[str, Any]:
        await self._ensure_started()
        return await recovery.restore_plan(self, job, rank, node, timeout, restarted)

    async def repair(self, job: str, rank: int, step: int, bad: list[int]) -> dict[str, Any]:
        await self._ensure_started()
        return await recovery.repair(self, job, rank, step, bad)

    async def note_restore(self, job: str, rank: int, info: dict[str, Any]) -> None:
        fallback.note_restore(self, job, rank, info)
        self.events.add(
            "restore",
            f"job {job!r} rank {rank} restored step {info.get('step')} from {info.get('source')}",
            job=job,
            rank=rank,
            **info,
        )

    # -- the persisted tier (see snapstore.control.flush) ---------------------------------

    async def persist(self, job: str, timeout: float) -> dict[str, Any]:
        """Flush the job's committed step to the persist directory now; wait up to ``timeout``."""
        await self._ensure_started()
        return await self.flusher.persist(job, timeout)

    async def persisted_plan(
        self, job: str, rank: int, reason: str, restarted: bool, timeout: float
    ) -> dict[str, Any]:
        """The persisted step every rank restores from when memory cannot serve the job."""
        await self._ensure_started()
        return await fallback.restore_plan(self, job, rank, reason, restarted, timeout)

    async def persisted_bad(self, job: str, path: str, problem: str) -> None:
        """A rank found a file of a planned persisted step corrupt."""
        await self._ensure_started()
        fallback.mark_bad(self, job, path, problem)

    async def persisted(self, job: str) -> list[dict[str, Any]]:
        """The job's complete persisted steps, oldest first (as last listed)."""
        await self._ensure_started()
        await self.flusher.refresh(job)
        return list(self.flusher.job(job).steps)

    # -- observing ------------------------------------------------------------

    async def record(self, job: str) -> bytes | None:
        await self._ensure_started()
        js = self.jobs.get(job)
        return None if js is None or js.committed is None else js.committed.to_bytes()

    async def node_list(self) -> list[dict[str, Any]]:
        await self._ensure_started()
        out = []
        group_of = {n: i for i, g in enumerate(self.groups) for n in g}
        for ns in self.nodes.values():
            d = ns.summary()
            d["group"] = group_of.get(ns.node_id)
            out.append(d)
        return out

    async def snapshot(self, events: int = 200) -> dict[str, Any]:
        """Everything ``status`` and the REST server show, computed without waiting on SMPs."""
        await self._ensure_started()
        alive = set(self.alive())
        jobs = []
        for js in self.jobs.values():
            rec = js.committed
            j: dict[str, Any] = {
                "job": js.name,
                "world_size": js.world_size,
                "status": js.status,
                "status_detail": js.status_detail,
                "latest_step": None if rec is None else rec.step,
                "pending_steps": sorted(js.pending),
                "commits": js.commits,
                "last_commit_latency": js.last_commit_latency,
                "protected_at": js.protected_at,
                "unrecoverable": {str(r): v for r, v in js.unrecoverable.items()},
                "relocated": {str(r): n for r, n in js.relocated.items()},
                "pending": [
                    {
                        "step": p.step,
                        "staged": sorted(p.staged),
                        "world_size": p.world_size,
                        "started_at": p.started_at,
                        "committing": p.committing,
                    }
                    for p in sorted(js.pending.values(), key=lambda p: p.step)
                ],
            }
            if rec is not None:
                j["record"] = _record_summary(rec, alive)
            j.update(self.flusher.job_entry(js.name))
            jobs.append(j)
        jobs.extend(self.flusher.disk_only_jobs(set(self.jobs)))
        return {
            "store_id": self.store_id,
            "time": time.time(),
            "started_at": self.started_at,
            "config": self.config_dict,
            "nodes": await self.node_list(),
            "groups": [list(g) for g in self.groups],
            "jobs": jobs,
            "events": self.events.recent(events),
            "metrics": self.events.metrics.snapshot(),
        }

    async def shutdown(self) -> None:
        """Stop background work (``snapstore down`` kills the actor next)."""
        for t in self._bg + list(self._tasks):
            t.cancel()


def _record_summary(rec: StepRecord, alive: set[str]) -> dict[str, Any]:
    ranks = {}
    for r, e in sorted(rec.ranks.items()):
        ranks[str(r)] = {"node": e.node, "size": e.size, "home_alive": e.node in alive}
    return {
        "step": rec.step,
        "version": rec.version,
        "k": rec.k,
        "m": rec.m,
        "committed_at": rec.committed_at,
        "data_bytes": rec.data_bytes(),
        "parity_bytes": rec.parity_bytes(),
        "groups": [list(g) for g in rec.groups],
        "ranks": ranks,
        "stripes": stripe_health(rec, alive),
    }
