"""The control plane: membership, jobs, commits, recovery, fallback and flushes together.

:class:`ControlPlane` is the whole coordinator without Ray: it takes a
:class:`Fabric` (how to reach nodes and leaders), a clock, and an offload
function for blocking file work, and is driven by calls and its own
timers. The Ray actor (:mod:`snapstore.control.coordinator`) only adapts
RPCs to it; the deterministic simulation (``tests/sim``) drives the same
object on a virtual clock against fake nodes.

It runs on one event loop: state needs no locks beyond the per-job ones
that order multi-step operations (relocation, re-protection, holds).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from snapstore.config import StoreConfig
from snapstore.control.commit import Commits
from snapstore.control.events import EventLog
from snapstore.control.fallback import Fallback
from snapstore.control.flush import Flusher
from snapstore.control.health import stripe_health
from snapstore.control.jobs import Job, JobRecord
from snapstore.control.links import AbandonReply, Fabric, NodeSnapshot, PerMessage
from snapstore.control.membership import Membership
from snapstore.control.messages import (
    Decision,
    ErrorReply,
    GroupBeat,
    GroupReport,
    LeaderBatch,
    NodeConfig,
    NodeInfo,
    Outcome,
    OutcomeStatus,
    PrepareOrder,
    ReportBatch,
    RestorePlan,
    next_term,
)
from snapstore.control.recovery import Recovery
from snapstore.control.runtime import Clock, Tasks
from snapstore.control.states import JobLife, JobPhase, NodeLife, NodePhase, Redundancy
from snapstore.errors import FormatError
from snapstore.format.record import StepRecord
from snapstore.format.work import PeerInfo
from snapstore.persist.backend import Tier
from snapstore.rpc import describe

__all__ = ["ControlPlane"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

TICK = 0.5
SNAPSHOT_TIMEOUT = 10.0
DROP_TIMEOUT = 30.0


class ControlPlane:
    """The store's control plane. See the module docstring."""

    def __init__(
        self,
        store_id: str,
        cfg: StoreConfig,
        fabric: Fabric,
        clock: Clock,
        offload: Callable[..., Awaitable[Any]],
        tier: Tier | None,
        config_dict: dict[str, Any] | None = None,
        identity: str = "",
    ) -> None:
        self.store_id = store_id
        self.identity = identity or secrets.token_hex(8)
        """This coordinator process, told to nodes with their configuration and their
        recovery snapshot (Member.snapshot)."""
        self.cfg = cfg
        self.config_dict = dict(config_dict or cfg.to_dict())
        self.fabric = fabric
        self.clock = clock
        self.offload = offload
        self.events = EventLog(wall=clock.wall)
        self.tasks = Tasks(self._task_failed)
        self.jobs: dict[str, Job] = {}
        self.membership = Membership(
            cfg,
            clock,
            self.events,
            fabric,
            self.tasks,
            self._on_epoch,
            self._on_restart,
            identity=self.identity,
        )
        self.commits = Commits(self)
        self.recovery = Recovery(self)
        self.fallback = Fallback(self)
        self.flusher = Flusher(self, tier)
        self.started_at = clock.wall()
        self._ready = False
        self._ready_event = asyncio.Event()

    # -- running ---------------------------------------------------------------------------

    async def start(self, discover: Callable[[], Awaitable[list[str]]] | None = None) -> None:
        """Rebuild state from running nodes (a restarted coordinator), then start timers."""
        if discover is not None:
            try:
                await self.recover(await discover())
            except Exception as e:
                logger.exception("recovery from the nodes failed")
                self.events.add("error", f"recovery from the nodes failed: {describe(e)}")
        await self.flusher.open()
        self.tasks.spawn(self._monitor(), "monitor")
        self._ready = True
        self._ready_event.set()

    async def _started(self) -> None:
        """Calls wait until the plane rebuilt its state from the nodes: a restarted
        coordinator answers nothing from a half-recovered view."""
        if not self._ready:
            await self._ready_event.wait()

    def stop(self) -> None:
        self.tasks.cancel_all()

    def _task_failed(self, what: str, e: BaseException) -> None:
        self.events.add("error", f"background {what} failed: {describe(e)}")

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.membership.tick()
            self.commits.tick()

    def _on_epoch(self, reason: str) -> None:
        """Groups or leaders changed: steps in flight under the old epoch cannot finish."""
        for job in list(self.jobs.values()):
            self.commits.fail_open(job, f"membership changed ({reason})")
            self.recovery.judge(job)
            job.touch()
            if job.record is not None and self.recovery.needs_reprotect(job):
                self.tasks.spawn(self.recovery.reprotect(job), f"re-protect {job.name!r}")

    def _on_restart(self, node: str, previous: NodePhase) -> None:
        if previous is not NodePhase.LOST:
            self.tasks.spawn(self.recovery.reconcile(node), f"reconcile {node[:12]}")

    # -- helpers for the parts ------------------------------------------------------------

    def job(self, name: str, world_size: int) -> Job:
        job = self.jobs.get(name)
        if job is None:
            job = self.jobs[name] = Job(name, world_size, JobLife(name))
        return job

    def peers(self) -> dict[str, PeerInfo]:
        return {n: info.peer for n, info in self.membership.infos.items()}

    def stamper(self) -> PerMessage[Decision, Decision]:
        """Decisions carry the epoch they are sent in (a restarted coordinator's recovery
        fences off its predecessor's decisions by term: Member.snapshot); one post stamps
        each distinct decision once."""
        epoch = self.membership.epoch
        return PerMessage(lambda d: msgspec.structs.replace(d, epoch=epoch))

    def send_leaders(
        self, posts: Iterable[tuple[str, PrepareOrder | Decision]], straight: bool = False
    ) -> None:
        """Orders and decisions to group leaders, one post (see Fabric.post_leaders);
        losing one is repaired by re-sends. Those to leaders with a relay go to it, one
        batch per region, unless ``straight`` (re-sends: a dead relay must not lose the
        same message twice)."""
        stamp = self.stamper()
        stamped = [
            (leader, msg if isinstance(msg, PrepareOrder) else stamp(msg)) for leader, msg in posts
        ]
        relay_of = {} if straight else self.membership.relay_of_leader
        direct, regions = _by_relay(stamped, [leader for leader, _ in stamped], relay_of)
        batches = [(relay, _leader_batch(region)) for relay, region in regions.items()]
        self._post(direct, batches, len(stamped) - len(direct))

    def send_decision(self, leaders: Iterable[str], decision: Decision) -> None:
        """One decision to many leaders (a commit's, to every group), as :meth:`send_leaders`
        sends it: stamped once, and each region's leaders named in one entry of its batch
        without a post per leader (a commit at 4,096 nodes tells a thousand groups)."""
        stamped = self.stamper()(decision)
        leaders = list(leaders)
        alone, regions = _by_relay(leaders, leaders, self.membership.relay_of_leader)
        batches = [
            (relay, LeaderBatch(decisions=(stamped,), leaders=(tuple(region),)))
            for relay, region in regions.items()
        ]
        direct: list[tuple[str, PrepareOrder | Decision]] = [(x, stamped) for x in alone]
        self._post(direct, batches, len(leaders) - len(alone))

    def _post(
        self,
        direct: list[tuple[str, PrepareOrder | Decision]],
        batches: list[tuple[str, LeaderBatch]],
        relayed: int,
    ) -> None:
        if direct:
            self.fabric.post_leaders(direct)
        if batches:
            counters = self.events.metrics.counters
            counters["relay_down_batches_total"] += len(batches)
            counters["relayed_down_messages_total"] += relayed
            self.fabric.post_relays(batches)

    def send_nodes(self, posts: Iterable[tuple[str, Decision]]) -> None:
        """Decisions to members past their leaders, one post."""
        stamp = self.stamper()
        self.fabric.post_nodes([(node, stamp(msg)) for node, msg in posts])

    # -- nodes ------------------------------------------------------------------------------------

    async def register(self, info: NodeInfo) -> NodeConfig | None:
        await self._started()
        return self.membership.register(info)

    async def report(self, report: GroupReport) -> None:
        await self._started()
        self.membership.heard_epoch(report.epoch, report.leader)
        self.commits.on_report(report)
        self.membership.quiet_report(report)

    async def group_beat(self, beat: GroupBeat) -> None:
        await self._started()
        self.membership.heard_epoch(beat.epoch, beat.leader)
        self.membership.group_beat(beat)

    async def batch(self, batch: ReportBatch) -> None:
        """A relay's batch (snapstore.control.relay): its beats, then its reports, each
        taken as if it came alone (one that raises is logged and recorded as an error
        event; the others are still taken)."""
        await self._started()
        counters = self.events.metrics.counters
        counters["relay_batches_total"] += 1
        counters["relayed_messages_total"] += len(batch.beats) + len(batch.reports)
        membership = self.membership
        # The epoch and quiet checks inline: a batch at 4,096 nodes is some 3,000 messages a
        # step, nearly all in the current epoch.
        for beat in batch.beats:
            try:
                if beat.epoch != membership.epoch:
                    membership.heard_epoch(beat.epoch, beat.leader)
                membership.group_beat(beat)
            except Exception as e:
                self._relayed_failed(f"beat of {beat.leader[:12]}", e)
        for report in batch.reports:
            try:
                if report.epoch != membership.epoch:
                    membership.heard_epoch(report.epoch, report.leader)
                self.commits.on_report(report)
                if report.quiet:
                    membership.quiet_report(report)
            except Exception as e:
                self._relayed_failed(f"report of {report.leader[:12]} on step {report.step}", e)

    def _relayed_failed(self, what: str, e: Exception) -> None:
        logger.exception("relayed %s failed", what)
        self.events.add("error", f"relayed {what} failed: {describe(e)}")

    async def abandon(self, job: str, rank: int, step: int, session: str) -> AbandonReply:
        await self._started()
        return self.commits.abandon(job, rank, step, session)

    async def step_status(
        self, job: str, step: int, rank: int, sums: tuple[int, ...], staging: str = ""
    ) -> Outcome:
        await self._started()
        return self.commits.step_status(job, step, rank, sums, staging)

    async def ready(self, min_nodes: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until ``min_nodes`` nodes registered and their groups are formed."""
        deadline = self.clock.now() + timeout
        while self.clock.now() < deadline:
            alive = self.membership.alive()
            width = self.cfg.k + self.cfg.m
            formed = bool(self.membership.groups) or len(alive) < width
            if self._ready and len(alive) >= min_nodes and formed:
                return {"nodes": len(alive), "groups": [list(g) for g in self.membership.groups]}
            await asyncio.sleep(0.05)
        return {
            "nodes": len(self.membership.alive()),
            "groups": [list(g) for g in self.membership.groups],
            "timeout": True,
        }

    # -- trainers and tools ---------------------------------------------------------------------

    async def restore_plan(
        self,
        job: str,
        rank: int,
        node: str,
        session: str,
        restarted: bool,
        world_size: int,
        timeout: float,
    ) -> RestorePlan | ErrorReply:
        await self._started()
        return await self.recovery.restore_plan(
            job, rank, node, session, restarted, world_size, timeout
        )

    async def repair(self, job: str, rank: int, step: int, bad: list[int]) -> int | ErrorReply:
        await self._started()
        return await self.recovery.repair(job, rank, step, bad)

    async def note_restore(self, job: str, rank: int, info: dict[str, Any]) -> None:
        await self._started()
        self.fallback.note_restore(job, rank, info)
        self.events.add(
            "restore",
            f"job {job!r} rank {rank} restored step {info.get('step')} from {info.get('source')}",
            job=job,
            rank=rank,
            **info,
        )

    async def latest(self, job: str) -> int | None:
        await self._started()
        js = self.jobs.get(job)
        return None if js is None or js.record is None else js.record.step

    async def abort_pending(self, job: str, reason: str) -> list[int]:
        """A controller ends the job's steps in flight; waiters learn at once."""
        await self._started()
        js = self.jobs.get(job)
        if js is None:
            return []
        return self.commits.fail_open(js, reason or "aborted by a job controller")

    async def drop_job(self, job: str) -> None:
        await self._started()
        js = self.jobs.pop(job, None)
        if js is not None:
            self.commits.fail_open(js, "job dropped")
            js.life.drop()
            js.touch()
        await asyncio.gather(
            *(
                asyncio.wait_for(self.fabric.node(n).drop_job(job), DROP_TIMEOUT)
                for n in self.membership.readable()
            ),
            return_exceptions=True,
        )
        self.events.add("job_dropped", f"job {job!r} dropped", job=job)

    async def persist(self, job: str, timeout: float) -> dict[str, Any] | ErrorReply:
        await self._started()
        return await self.flusher.persist(job, timeout)

    async def persisted_plan(
        self, job: str, rank: int, session: str, reason: str, restarted: bool, timeout: float
    ) -> dict[str, Any] | ErrorReply:
        await self._started()
        return await self.fallback.restore_plan(job, rank, session, reason, restarted, timeout)

    async def persisted_bad(self, job: str, path: str, problem: str) -> None:
        await self._started()
        self.fallback.mark_bad(job, path, problem)

    async def persisted(self, job: str) -> list[dict[str, Any]]:
        await self._started()
        await self.flusher.refresh(job)
        return list(self.flusher.job(job).steps)

    # -- observing ------------------------------------------------------------------------------

    async def record(self, job: str) -> bytes | None:
        await self._started()
        js = self.jobs.get(job)
        return None if js is None or js.record is None else js.record.merged.to_bytes()

    async def job_info(self, job: str, events: int = 50) -> dict[str, Any] | None:
        """A job's state for controllers: latest step, steps in flight, status, recent events."""
        await self._started()
        js = self.jobs.get(job)
        if js is None:
            return None
        entry = self._job_entry(js, set(self.membership.readable()))
        entry["events"] = self.events.recent(events, job=job)
        return entry

    def node_list(self) -> list[dict[str, Any]]:
        now = self.clock.now()
        ms = self.membership
        out = []
        for node, life in ms.nodes.items():
            group = ms.group_of(node)
            heard = ms.heard_at(node)
            out.append(
                node_summary(
                    life,
                    ms.infos.get(node),
                    round(now - (now if heard is None else heard), 3),
                    ms.groups.index(group) if group in ms.groups else None,
                    group is not None and ms.leader_of(group) == node,
                )
            )
        return out

    def _job_entry(self, js: Job, readable: set[str]) -> dict[str, Any]:
        rec = js.record
        entry: dict[str, Any] = {
            "job": js.name,
            "world_size": js.world_size,
            "status": js.redundancy.value,
            "status_detail": js.detail,
            "phase": js.life.phase.value,
            "incarnation": js.life.incarnation,
            "latest_step": None if rec is None else rec.step,
            "pending_steps": sorted(s for s, a in js.attempts.items() if not a.reprotect),
            "commits": js.commits,
            "last_commit_latency": js.last_commit_latency,
            "protected_at": js.protected_at,
            "unrecoverable": {str(r): v for r, v in js.unrecoverable.items()},
            "relocated": {str(r): n for r, n in js.relocated.items()},
            "pending": [
                {
                    "step": a.step,
                    "staged": sorted(a.ranks),
                    "world_size": a.world_size,
                    "started_at": a.wall_started,
                    "committing": a.life.phase.value == "preparing",
                }
                for a in sorted(js.attempts.values(), key=lambda a: a.step)
                if not a.reprotect
            ],
        }
        if rec is not None:
            entry["record"] = record_summary(rec, readable)
        entry.update(self.flusher.job_entry(js.name))
        return entry

    async def snapshot(self, events: int = 200) -> dict[str, Any]:
        """Everything ``status`` and the REST server show, computed without waiting on nodes."""
        await self._started()
        readable = set(self.membership.readable())
        jobs = [self._job_entry(js, readable) for js in self.jobs.values()]
        jobs.extend(self.flusher.disk_only_jobs(set(self.jobs)))
        return {
            "store_id": self.store_id,
            "time": self.clock.wall(),
            "started_at": self.started_at,
            "config": self.config_dict,
            "nodes": self.node_list(),
            "groups": [list(g) for g in self.membership.groups],
            "epoch": self.membership.epoch,
            "jobs": jobs,
            "events": self.events.recent(events),
            "metrics": self.events.metrics.snapshot(),
        }

    # -- a restarted coordinator --------------------------------------------------------------

    async def recover(self, nodes: list[str]) -> None:
        """Rebuild membership and jobs from what running nodes hold.

        Per job, the newest committed (step, version) any node holds wins: a
        commit is decided only after every group holding the step prepared
        it, so groups that did not hear of the decision hold the step as
        prepared, and the decision is sent to them again.

        A newer (step, version) that *every* node of every group holding it
        still keeps as prepared, covering every rank, is committed here too:
        the previous coordinator may have decided it with the decision still
        on its way (a stalled leader applies it after this recovery), and no
        node applied an abort of it (an abort drops the slice). Newer
        prepared slices short of that are left alone: no trainer heard of
        them, their stagings are reported again by their nodes and committed
        by a new attempt (another version), and the slices go with the next
        commit.

        Slices a leader prepared early (``StepRecord.early``) never count
        toward a wholly prepared step: their stagings may be ones the previous
        coordinator refused (a process of an ended incarnation). Nobody was
        told such a step committed before some group applied its decision
        (``Job.unconfirmed``), and a node that applied it holds it committed.
        """
        if not nodes:
            return
        results = await asyncio.gather(
            *(
                asyncio.wait_for(self.fabric.node(n).snapshot(self.identity), SNAPSHOT_TIMEOUT)
                for n in nodes
            ),
            return_exceptions=True,
        )
        snaps: list[NodeSnapshot] = []
        for n, res in zip(nodes, results, strict=True):
            if isinstance(res, BaseException):
                logger.info("node %s not reachable during recovery: %s", n[:12], describe(res))
            else:
                snaps.append(res)
        ms = self.membership
        best_epoch = max((s.config.epoch for s in snaps if s.config is not None), default=0)
        now = self.clock.now()
        for s in snaps:
            node = s.info.node
            ms.nodes[node] = NodeLife(node, s.info.incarnation, NodePhase.ALIVE, now)
            ms.infos[node] = s.info
            ms.heard[node] = now
            ms.joined[node] = self.clock.wall()
            config = s.config
            if (
                config is not None
                and config.epoch == best_epoch
                and config.protected
                and config.group not in ms.groups
            ):
                ms.groups.append(config.group)
            ms._watch(node, s.info.incarnation)
        # regroup below starts the term after every epoch the nodes saw
        ms.epoch = next_term(max([best_epoch, *(s.seen for s in snaps)]))
        recovered, posts = self._recover_jobs(snaps)
        ms.regroup("coordinator restarted")
        self.send_nodes(posts)  # stamped in the new term: the nodes it recovered from take it
        self.events.add(
            "coordinator_recovered",
            f"coordinator rebuilt its state from {len(snaps)} nodes: {recovered}",
        )

    def _recover_jobs(
        self, snaps: list[NodeSnapshot]
    ) -> tuple[dict[str, int], list[tuple[str, Decision]]]:
        """Jobs rebuilt from the snapshots: their steps, and the commits to send again."""
        committed: dict[str, list[tuple[str, StepRecord]]] = {}
        prepared: dict[str, list[tuple[str, StepRecord]]] = {}
        for s in snaps:
            for kind, blobs in ((committed, s.records), (prepared, s.prepared)):
                for data in blobs:
                    try:
                        rec = StepRecord.from_bytes(data)
                    except FormatError as e:
                        logger.warning("node %s holds a bad record: %s", s.info.node[:12], e)
                        continue
                    kind.setdefault(rec.job, []).append((s.info.node, rec))
        out = {}
        posts: list[tuple[str, Decision]] = []
        for name in sorted(set(committed) | set(prepared)):
            held = committed.get(name, [])
            newest = max(((r.step, r.version) for _, r in held), default=None)
            whole = _wholly_prepared(prepared.get(name, []), newest)
            if whole is not None:
                held = [(n, r) for n, r in prepared[name] if (r.step, r.version) == whole]
            if not held:
                continue
            top = max((r.step, r.version) for _, r in held)
            slices: dict[tuple[str, ...], StepRecord] = {}
            late: dict[tuple[str, ...], list[str]] = {}
            for _, rec in held:
                if (rec.step, rec.version) == top:
                    slices.setdefault(_key(rec), rec)
            for node, rec in prepared.get(name, []):
                if (rec.step, rec.version) == top and _key(rec) not in slices:
                    slices[_key(rec)] = rec
                if (rec.step, rec.version) == top:
                    late.setdefault(_key(rec), []).append(node)
            record = JobRecord.of(list(slices.values()))
            job = self.job(name, record.world_size)
            job.record = record
            job.life.phase = JobPhase.ACTIVE
            versions = [r.version for _, r in held] + [r.version for _, r in prepared.get(name, [])]
            job.next_version = max(versions) + 1
            job.redundancy = Redundancy.PROTECTED if record.protected else Redundancy.UNPROTECTED
            missing = set(range(record.world_size)) - set(record.ranks)
            for r in sorted(missing):
                job.unrecoverable[r] = [
                    f"no reachable node holds rank {r}'s record of step {top[0]}"
                ]
            if missing:
                job.redundancy = Redundancy.LOST
            decision = Decision(name, top[0], top[1], OutcomeStatus.COMMITTED)
            posts.extend((node, decision) for holders in late.values() for node in holders)
            for key in late:
                job.unacked[key] = (decision, self.clock.now())
            out[name] = top[0]
        return out, posts


def _wholly_prepared(
    prepared: list[tuple[str, StepRecord]], newer_than: tuple[int, int] | None
) -> tuple[int, int] | None:
    """The newest (step, version) after ``newer_than`` whose prepared slices cover every
    rank, each slice kept by every node of its group (each of them reached), none of them
    prepared early; or None."""
    by_version: dict[tuple[int, int], dict[tuple[str, ...], tuple[StepRecord, set[str]]]] = {}
    early = {(rec.step, rec.version) for _, rec in prepared if rec.early}
    for node, rec in prepared:
        sv = (rec.step, rec.version)
        if (newer_than is not None and sv <= newer_than) or sv in early:
            continue
        got = by_version.setdefault(sv, {}).setdefault(_key(rec), (rec, set()))
        got[1].add(node)
    for sv in sorted(by_version, reverse=True):
        slices = by_version[sv].values()
        ranks = [r for rec, _ in slices for r in rec.ranks]
        world = {rec.world_size for rec, _ in slices}
        if len(world) != 1 or sorted(ranks) != list(range(world.pop())):
            continue
        if all(set(_key(rec)) <= holders for rec, holders in slices):
            return sv
    return None


def _key(rec: StepRecord) -> tuple[str, ...]:
    if rec.groups:
        return tuple(rec.groups[0])
    return tuple(sorted(rec.nodes()))


def node_summary(
    life: NodeLife, info: NodeInfo | None, age: float, group: int | None, leader: bool
) -> dict[str, Any]:
    """One node as ``status`` and the REST server show it."""
    return {
        "node_id": life.node,
        "address": info.peer.address if info else None,
        "status": life.phase.value,
        "alive": life.phase is NodePhase.ALIVE,
        "heartbeat_age": age,
        "incarnation": life.incarnation,
        "pid": info.pid if info else None,
        "budget": info.budget if info else 0,
        "used": info.used if info else 0,
        "data_bytes": info.data_bytes if info else 0,
        "parity_bytes": info.parity_bytes if info else 0,
        "group": group,
        "leader": leader,
    }


def record_summary(rec: JobRecord, readable: set[str]) -> dict[str, Any]:
    """A committed record as ``status`` and the REST server show it."""
    merged = rec.merged
    ranks = {}
    for r, e in sorted(merged.ranks.items()):
        ranks[str(r)] = {"node": e.node, "size": e.size, "home_alive": e.node in readable}
    return {
        "step": rec.step,
        "version": rec.version,
        "k": rec.k,
        "m": rec.m,
        "committed_at": rec.committed_at,
        "data_bytes": rec.data_bytes(),
        "parity_bytes": rec.parity_bytes(),
        "groups": [list(g) for g in merged.groups],
        "ranks": ranks,
        "stripes": stripe_health(merged, readable),
    }


def _by_relay(
    items: Sequence[T], leaders: Sequence[str], relay_of: Mapping[str, str]
) -> tuple[list[T], dict[str, list[T]]]:
    """``items`` (for ``leaders[i]`` each) of leaders without a relay, and the others by
    the relay of their leader's region."""
    direct: list[T] = []
    regions: dict[str, list[T]] = {}
    for item, leader in zip(items, leaders, strict=True):
        relay = relay_of.get(leader)
        if relay is None:
            direct.append(item)
        else:
            regions.setdefault(relay, []).append(item)
    return direct, regions


def _leader_batch(posts: list[tuple[str, PrepareOrder | Decision]]) -> LeaderBatch:
    """A region's posts as one batch: each distinct decision once, with its leaders."""
    orders: list[tuple[str, PrepareOrder]] = []
    decisions: dict[int, tuple[Decision, list[str]]] = {}
    for leader, msg in posts:
        if isinstance(msg, PrepareOrder):
            orders.append((leader, msg))
        else:
            decisions.setdefault(id(msg), (msg, []))[1].append(leader)
    return LeaderBatch(
        orders=tuple(orders),
        decisions=tuple(d for d, _ in decisions.values()),
        leaders=tuple(tuple(leaders) for _, leaders in decisions.values()),
    )
