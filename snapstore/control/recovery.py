"""After failures: restore plans, repairs, relocation, re-protection, restarted SMPs.

Restore paths, fastest first (see docs/architecture.md):

1. The rank's home node is readable: the trainer reads the home slot (in
   place when it is the same node), every piece's checksum verified.
2. A piece fails its checksum, or a restarted SMP lost its segments: the
   pieces are rebuilt in place from the stripe group (:meth:`repair`,
   :meth:`reconcile`).
3. The home node is dead or lost: the rank's pieces are decoded from k
   readable chunks of each stripe onto the node the restarted trainer runs
   on (or another one) -- *relocation* -- and, once the node is lost and the
   groups re-formed, the step is re-protected as a new record version
   (:meth:`reprotect`), so a further failure is survivable.
4. More than m chunks of a stripe are gone: an error naming them, and the
   job falls back to its persisted step (:mod:`snapstore.control.fallback`).
   A dead node that is not yet lost may still come back: restores wait for
   it (within their timeout) rather than fall back.

Restores and incarnations: a rank that restores after its process restarted
(``restarted``) opens a new incarnation of the job if none is open: steps
in flight are failed, and every rank restores the same pinned step until
all of them have (:class:`snapstore.control.states.JobLife`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from snapstore.control.health import rank_restorable
from snapstore.control.jobs import Attempt, Job, JobRecord
from snapstore.control.messages import ErrorKind, ErrorReply, PrepareOrder, RestorePlan
from snapstore.control.orders import parity_rebuild_orders, rank_rebuild_orders
from snapstore.control.states import JobPhase, Redundancy, StepLife, StepPhase
from snapstore.errors import UnrecoverableError
from snapstore.format.record import RankEntry, StepRecord
from snapstore.rpc import describe, root_cause

if TYPE_CHECKING:
    from snapstore.control.plane import ControlPlane

__all__ = ["Recovery"]

logger = logging.getLogger(__name__)

REBUILD_TIMEOUT = 300.0
RETRY_DELAY = 1.0


def _lost_of(e: BaseException) -> list[str]:
    root = root_cause(e)
    if isinstance(root, UnrecoverableError):
        return list(root.lost)
    return [describe(root)]


class Recovery:
    """Restore plans and everything that makes a committed step whole again."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self._relocating: set[str] = set()

    # -- restore plans --------------------------------------------------------------------

    async def restore_plan(
        self,
        name: str,
        rank: int,
        node: str,
        session: str,
        restarted: bool,
        world_size: int,
        timeout: float,
    ) -> RestorePlan | ErrorReply:
        """Where rank ``rank`` of ``name`` reads its committed step (see the module docstring).

        ``restarted``: the rank itself restores (not a peer reading its
        buffer, as data-parallel restores and the DCP reader's peers do).
        """
        plane = self.plane
        deadline = plane.clock.now() + timeout
        job = plane.jobs.get(name)
        if job is None and restarted:
            job = plane.job(name, world_size)
        if job is None or job.record is None:
            if job is not None and restarted:
                # Nothing in memory: still a new incarnation, so that nothing staged by
                # the dead one commits while its ranks start over.
                self._join_incarnation(job, rank, session, world_size)
                if job.life.phase is JobPhase.RESTORING and plane.flusher.newest(name) is None:
                    job.life.rank_restored(rank, world_size)
            return ErrorReply(ErrorKind.NOT_FOUND, f"job {name!r} has no committed step in memory")
        if restarted:
            self._join_incarnation(job, rank, session, world_size)
        while True:
            rec = job.record
            if rec is None:
                return ErrorReply(ErrorKind.NOT_FOUND, f"job {name!r} has no committed step")
            entry = rec.entry(rank)
            if entry is None:
                return ErrorReply(
                    ErrorKind.NOT_FOUND,
                    f"job {name!r} step {rec.step} has no rank {rank} (world size "
                    f"{rec.world_size})",
                )
            lost_ranks = plane.fallback.unservable_ranks(job)
            if lost_ranks:
                # The job's decision, not the rank's: no rank resumes from memory when
                # some rank cannot (they fall back to disk together, or all fail).
                fallback = plane.fallback.must_fall_back(job)
                if restarted and job.life.phase is JobPhase.RESTORING and not fallback:
                    job.life.rank_restored(rank, world_size)  # the window must not wait
                lost = [c for r in lost_ranks for c in job.unrecoverable.get(r, [])]
                return ErrorReply(
                    ErrorKind.UNRECOVERABLE,
                    f"job {name!r} step {rec.step}: ranks {lost_ranks} can be neither read "
                    f"nor rebuilt from memory (more than m={rec.m} chunks of a stripe are on "
                    "lost nodes)"
                    + ("; the job restores from its persisted step" if fallback else ""),
                    lost=tuple(lost or self._lost_nodes(rec)),
                    fallback=fallback,
                )
            where = job.relocated.get(rank, entry.node)
            readable = set(plane.membership.readable())
            # A rank that needs a node that is dead but not lost makes every rank wait: the
            # node may come back with its memory, or be declared lost and the job fall
            # back to disk; either way all ranks resume from one step.
            blocked = self._blocked(rec, job, readable)
            if not blocked and where in readable and where in plane.membership.infos:
                if job.unconfirmed:
                    # A plan tells the step committed: not before a node holds it committed
                    # (Job.unconfirmed), normally one acknowledgement away. Answers that
                    # tell nothing of the step (it cannot be served, or waits) go as before.
                    if not await self._wait_change(job, deadline):
                        return ErrorReply(
                            ErrorKind.TIMEOUT,
                            f"job {name!r} step {rec.step}: no node acknowledged holding its "
                            f"commit within {timeout} s",
                        )
                    continue
                restoring = restarted and job.life.phase is JobPhase.RESTORING
                if restoring and job.life.rank_restored(rank, world_size):
                    plane.events.add(
                        "restored",
                        f"job {name!r}: every rank of incarnation {job.life.incarnation} "
                        f"restored step {rec.step}",
                        job=name,
                        step=rec.step,
                    )
                return RestorePlan(
                    step=rec.step,
                    version=rec.version,
                    size=entry.size,
                    sums=tuple(entry.sums),
                    home=where,
                    home_peer=plane.membership.infos[where].peer,
                    local=where == node,
                    incarnation=job.life.incarnation,
                )
            if not blocked:
                # The home is dead or lost: rebuild onto the asking node, now.
                job.preferred_home.setdefault(rank, node)
                self.start_relocation(job)
            # else: dead nodes that are not lost yet may come back; wait for news.
            if not await self._wait_change(job, deadline):
                return ErrorReply(
                    ErrorKind.TIMEOUT,
                    f"rank {rank}'s data was not readable or rebuilt within {timeout} s",
                )

    async def _wait_change(self, job: Job, deadline: float) -> bool:
        """Wait for news of ``job`` (at most a second); False when past ``deadline``."""
        left = deadline - self.plane.clock.now()
        if left <= 0:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(job.changed.wait(), min(left, 1.0))
        return True

    def _blocked(self, rec: JobRecord, job: Job, readable: set[str]) -> list[int]:
        """Ranks that can be neither read nor rebuilt from the readable nodes now."""
        out = []
        for r, home in rec.homes().items():
            if job.relocated.get(r, home) in readable:
                continue
            piece = rec.slice_of(r)
            if piece is not None and not rank_restorable(piece, r, readable):
                out.append(r)
        return out

    def _lost_nodes(self, rec: JobRecord) -> list[str]:
        readable = set(self.plane.membership.readable())
        return [f"node {n[:12]} ({self._phase(n)})" for n in sorted(rec.nodes() - readable)]

    def _phase(self, node: str) -> str:
        phase = self.plane.membership.phase(node)
        return "unknown" if phase is None else phase.value

    def _join_incarnation(self, job: Job, rank: int, session: str, world_size: int) -> None:
        """A rank restores. A new process of it (a session not seen for the rank) opens a
        new incarnation if none is open; a live process restoring in place does not."""
        plane = self.plane
        life = job.life
        rec = job.record
        pinned = rec.step if rec is not None else None
        mine = job.sessions.get(rank)
        fresh = mine is None or mine[0] != session
        if life.phase in (JobPhase.ACTIVE, JobPhase.EMPTY) and fresh:
            steps = plane.commits.fail_open(job, f"rank {rank} restarted and restores {pinned}")
            life.begin_restore(pinned)
            # Ranks that restored in place since the last commit hold this step already.
            for r, (_session, since) in job.sessions.items():
                if since > job.commit_seq and r != rank:
                    life.restored.add(r)
            if world_size != job.world_size:
                plane.events.add(
                    "elastic",
                    f"job {job.name!r} resumes with world size {world_size} (was {job.world_size})",
                    job=job.name,
                )
                job.world_size = world_size
            plane.events.add(
                "incarnation",
                f"job {job.name!r} incarnation {life.incarnation}: rank {rank} restarted; every "
                f"rank restores step {pinned}" + (f" (steps {steps} aborted)" if steps else ""),
                job=job.name,
                step=pinned,
                aborted=steps or None,
            )
        else:
            for att in list(job.attempts.values()):
                if rank in att.ranks:
                    plane.commits.fail(job, att, f"rank {rank} restores step {pinned}")
        if mine is not None and fresh:
            job.retired.add(mine[0])
        job.restore_seq += 1
        job.sessions[rank] = (session, job.restore_seq)

    # -- repairs in place -------------------------------------------------------------------

    async def repair(self, name: str, rank: int, step: int, bad: list[int]) -> ErrorReply | int:
        """Rebuild pieces of a rank that failed their checksum, in place; bytes written."""
        plane = self.plane
        job = plane.jobs.get(name)
        stale = ErrorReply(ErrorKind.STALE, f"step {step} of job {name!r} is no longer committed")
        if job is None or job.record is None or job.record.step != step:
            return stale
        async with job.lock:
            rec = job.record
            if rec is None or rec.step != step:
                return stale
            piece = rec.slice_of(rank)
            assert piece is not None
            where = job.relocated.get(rank, piece.ranks[rank].node)
            readable = plane.membership.readable()
            if where not in readable:
                return ErrorReply(ErrorKind.STALE, f"rank {rank}'s node {where[:12]} is not alive")
            order = rank_rebuild_orders(
                piece, rank, where, plane.peers(), readable, plane.cfg.backend, pieces=bad
            )
            try:
                res = await asyncio.wait_for(
                    plane.fabric.node(where).rebuild(order), REBUILD_TIMEOUT
                )
            except Exception as e:
                plane.events.add(
                    "error", f"repair of job {name!r} rank {rank} failed: {describe(e)}", job=name
                )
                if isinstance(root_cause(e), UnrecoverableError):
                    job.unrecoverable[rank] = _lost_of(e)
                return ErrorReply(ErrorKind.UNRECOVERABLE, describe(e), lost=tuple(_lost_of(e)))
            plane.events.add(
                "repaired",
                f"job {name!r} rank {rank} step {step}: pieces {bad} failed their checksum "
                "and were rebuilt from the group",
                job=name,
                rank=rank,
                bytes=res.bytes_written,
                bad_sources=list(res.bad_sources) or None,
            )
            return res.bytes_written

    # -- relocation and re-protection ---------------------------------------------------

    def start_relocation(self, job: Job) -> None:
        if job.name in self._relocating:
            return
        self._relocating.add(job.name)
        self.plane.tasks.spawn(self._relocate_task(job), f"relocate {job.name!r}")

    async def _relocate_task(self, job: Job) -> None:
        try:
            await self.relocate(job)
        finally:
            self._relocating.discard(job.name)
            job.touch()

    def _choose_home(
        self, job: Job, rank: int, load: dict[str, int], readable: list[str], holders: set[str]
    ) -> str | None:
        """Where to rebuild ``rank``: its preferred home, else the least loaded readable
        node (``load``: bytes homed per node, with this pass's earlier choices counted;
        ``holders``: the nodes holding some of the committed step)."""
        plane = self.plane
        if not readable:
            return None
        pref = job.preferred_home.get(rank)
        if pref is not None and pref in readable:
            return pref
        # Fresh nodes (replacements) first: the restarted trainer likely runs there.
        fresh = [n for n in readable if n not in holders]
        joined = plane.membership.joined
        return min(fresh or readable, key=lambda n: (load.get(n, 0), joined.get(n, 0)))

    def _load(self, job: Job, rec: JobRecord) -> dict[str, int]:
        """Bytes of the committed step homed on each node (relocated ranks where they are)."""
        load: dict[str, int] = {}
        for r, node in rec.homes().items():
            home = job.relocated.get(r, node)
            load[home] = load.get(home, 0) + rec.entry(r).size  # type: ignore[union-attr]
        return load

    async def relocate(self, job: Job) -> None:
        """Rebuild every rank homed on a node that is not readable onto one that is."""
        plane = self.plane
        async with job.lock:
            rec = job.record
            if rec is None:
                return
            readable = set(plane.membership.readable())
            lost = [
                r
                for r, home in sorted(rec.homes().items())
                if job.relocated.get(r, home) not in readable and r not in job.unrecoverable
            ]
            if not lost:
                return
            t0 = plane.clock.now()
            plan: list[tuple[int, str]] = []
            calls = []
            load = self._load(job, rec)
            choices, holders = plane.membership.readable(), rec.nodes()
            for r in lost:
                piece = rec.slice_of(r)
                assert piece is not None
                if not rank_restorable(piece, r, readable):
                    continue  # waits for its nodes (or falls back)
                target = self._choose_home(job, r, load, choices, holders)
                if target is None:
                    continue
                # Counted now, so that a lost node's ranks spread over several nodes.
                load[target] = load.get(target, 0) + piece.ranks[r].size
                order = rank_rebuild_orders(
                    piece, r, target, plane.peers(), readable, plane.cfg.backend, pin=True
                )
                plan.append((r, target))
                calls.append(
                    asyncio.wait_for(plane.fabric.node(target).rebuild(order), REBUILD_TIMEOUT)
                )
            results = await asyncio.gather(*calls, return_exceptions=True)
            rebuilt, retry = 0, False
            for (r, target), res in zip(plan, results, strict=True):
                if isinstance(res, BaseException):
                    if isinstance(root_cause(res), UnrecoverableError):
                        job.unrecoverable[r] = [
                            f"rank {r}'s home node {rec.homes()[r][:12]} is gone",
                            *_lost_of(res),
                        ]
                    else:
                        retry = True  # the target may have died unnoticed yet
                        plane.events.add(
                            "error",
                            f"job {job.name!r}: rebuilding rank {r} on node {target[:12]} "
                            f"failed ({describe(res)}); retrying",
                            job=job.name,
                        )
                else:
                    job.relocated[r] = target
                    job.preferred_home.pop(r, None)
                    rebuilt += res.bytes_written
            done = sorted(r for r, _ in plan if r in job.relocated)
            if done:
                plane.events.add(
                    "rebuild",
                    f"job {job.name!r} step {rec.step}: rebuilt ranks {done} from parity "
                    f"({rebuilt} bytes) in {plane.clock.now() - t0:.3f} s",
                    job=job.name,
                    step=rec.step,
                    bytes=rebuilt,
                    duration=round(plane.clock.now() - t0, 4),
                    targets={str(r): t for r, t in plan if r in job.relocated},
                )
            self.judge(job)
            if job.unrecoverable:
                plane.events.add(
                    "unrecoverable",
                    f"job {job.name!r} step {rec.step}: ranks {sorted(job.unrecoverable)} lost "
                    "more than m chunks of a stripe",
                    job=job.name,
                    lost={str(r): v for r, v in job.unrecoverable.items()},
                )
        if retry:
            await asyncio.sleep(RETRY_DELAY)
            self.start_relocation(job)

    def needs_reprotect(self, job: Job) -> bool:
        """The committed step must be committed again: a node holding it is lost, ranks were
        rebuilt elsewhere, or it has no parity while groups can be formed now."""
        rec = job.record
        if rec is None or job.unrecoverable:
            return False
        if any(a.reprotect and a.life.open for a in job.attempts.values()):
            return False
        present = set(self.plane.membership.present())
        unprotected = not rec.protected and bool(self.plane.membership.groups)
        return bool(rec.nodes() - present) or bool(job.relocated) or unprotected

    def judge(self, job: Job) -> None:
        """Set the job's redundancy from what is true now (shown by status and REST)."""
        rec = job.record
        readable = set(self.plane.membership.readable())
        if rec is None:
            job.redundancy, job.detail = Redundancy.NONE, job.detail
        elif job.unrecoverable:
            job.redundancy = Redundancy.LOST
            job.detail = f"ranks {sorted(job.unrecoverable)} cannot be rebuilt"
        elif not rec.protected:
            job.redundancy = Redundancy.UNPROTECTED
            job.detail = "fewer than k + m nodes: data has no parity"
        elif job.relocated:
            job.redundancy = Redundancy.DEGRADED
            job.detail = (
                f"ranks {sorted(job.relocated)} rebuilt onto other nodes; not yet re-protected"
            )
        elif not rec.nodes() <= readable:
            gone = sorted(n[:12] for n in rec.nodes() - readable)
            job.redundancy = Redundancy.DEGRADED
            job.detail = f"nodes {gone} holding it are not readable"
        else:
            job.redundancy, job.detail = Redundancy.PROTECTED, ""

    async def reprotect(self, job: Job) -> None:
        """Relocate what must be, then commit the step again over the current groups."""
        plane = self.plane
        await self.relocate(job)
        rec = job.record
        self.judge(job)
        if rec is None or not self.needs_reprotect(job):
            return
        readable = set(plane.membership.readable())
        homes = {r: job.relocated.get(r, n) for r, n in rec.homes().items()}
        if any(n not in readable for n in homes.values()):
            return  # relocation pending; retried when it is done
        membership = plane.membership
        groups = membership.all_groups()
        if any(n not in readable for g in membership.groups for n in g):
            return  # a member of the new groups is dead: re-protected once it is back or lost
        att = Attempt(
            StepLife(job.name, rec.step, job.take_version()),
            world_size=rec.world_size,
            epoch=membership.epoch,
            started_at=plane.clock.now(),
            wall_started=plane.clock.wall(),
            reprotect=True,
        )
        att.life.all_staged()
        # Each rank to the group of its home, in one pass (not one per group: O(groups x
        # ranks) at thousands of nodes).
        group_of = {n: g for g in groups for n in g}
        by_group: dict[tuple[str, ...], dict[int, RankEntry]] = {}
        for r in sorted(homes):
            g = group_of.get(homes[r])
            entry = rec.entry(r)
            if entry is None:  # homes are the record's own ranks: a bug if reached
                logger.error("re-protect of %s: rank %d has no record entry", att.life.name, r)
                return
            if g is not None:
                by_group.setdefault(g, {})[r] = RankEntry(homes[r], entry.size, entry.sums)
        for g in groups:
            ranks = by_group.get(g, {})
            leader = membership.leader_of(g)
            if not ranks or leader is None:
                continue
            carrier = StepRecord(
                job=job.name,
                step=rec.step,
                version=att.version,
                k=rec.k,
                m=rec.m,
                world_size=rec.world_size,
                ranks=ranks,
                groups=(),
                parity=(),
            )
            for r in ranks:
                att.add(r, "", g)
            att.leaders[g] = leader
            att.orders[g] = PrepareOrder(
                job.name,
                rec.step,
                att.version,
                membership.epoch,
                rec.world_size,
                ranks=carrier.to_bytes(),
            )
        if set(att.ranks) != set(homes):
            return  # some rank's home is in no group: wait for the next membership change
        stale = job.attempts.get(rec.step)
        if stale is not None:
            plane.commits.fail(job, stale, "re-protection of the committed step")
        job.attempts[rec.step] = att
        plane.commits.send_prepare(job, att)

    # -- a restarted SMP -------------------------------------------------------------------

    async def _recheck_relocated(self, job: Job, node: str) -> None:
        """Ranks rebuilt onto a node whose SMP restarted: keep those it still holds intact,
        rebuild the others again."""
        plane = self.plane
        rec = job.record
        moved = sorted(r for r, n in job.relocated.items() if n == node)
        if rec is None or not moved:
            return
        ranks = {}
        for r in moved:
            entry = rec.entry(r)
            if entry is not None:
                ranks[r] = RankEntry(node, entry.size, entry.sums)
        probe = StepRecord(
            job=rec.job,
            step=rec.step,
            version=rec.version,
            k=rec.k,
            m=rec.m,
            world_size=rec.world_size,
            ranks=ranks,
            groups=(),
            parity=(),
        )
        try:
            report = await asyncio.wait_for(
                plane.fabric.node(node).verify(probe.to_bytes()), REBUILD_TIMEOUT
            )
            bad = set(report.bad_pieces)
        except Exception as e:
            plane.events.add("error", f"cannot verify node {node[:12]}: {describe(e)}", node=node)
            bad = set(ranks)
        if bad:
            for r in bad:
                job.relocated.pop(r, None)
            plane.events.add(
                "error",
                f"job {job.name!r}: ranks {sorted(bad)} rebuilt onto node {node[:12]} are gone "
                "with its restart; rebuilding them again",
                job=job.name,
                node=node,
            )
            self.judge(job)
            self.start_relocation(job)

    async def reconcile(self, node: str) -> None:
        """An SMP restarted on its node: re-adopt what verifies, rebuild the rest in place."""
        plane = self.plane
        for job in list(plane.jobs.values()):
            await self._recheck_relocated(job, node)
            async with job.lock:
                rec = job.record
                piece = rec.slice_on(node) if rec is not None else None
                if rec is None or piece is None:
                    continue
                t0 = plane.clock.now()
                try:
                    report = await asyncio.wait_for(
                        plane.fabric.node(node).verify(piece.to_bytes()), REBUILD_TIMEOUT
                    )
                except Exception as e:
                    plane.events.add(
                        "error", f"cannot verify node {node[:12]}: {describe(e)}", node=node
                    )
                    continue
                if not report.bad_pieces and not report.bad_parity:
                    plane.events.add(
                        "readopted",
                        f"restarted SMP on node {node[:12]} kept job {job.name!r} step "
                        f"{rec.step} intact",
                        node=node,
                        job=job.name,
                    )
                    continue
                readable = plane.membership.readable()
                peers = plane.peers()
                ranks = [
                    r
                    for r in report.bad_pieces
                    if r in piece.ranks and job.relocated.get(r, piece.ranks[r].node) == node
                ]
                orders = [
                    rank_rebuild_orders(
                        piece, r, node, peers, readable, plane.cfg.backend, report.bad_pieces[r]
                    )
                    for r in ranks
                ]
                if report.bad_parity:
                    po = parity_rebuild_orders(piece, node, peers, readable, plane.cfg.backend)
                    if po is not None:
                        orders.append(po)
                total = done = 0
                try:
                    for order in orders:
                        res = await asyncio.wait_for(
                            plane.fabric.node(node).rebuild(order), REBUILD_TIMEOUT
                        )
                        total += res.bytes_written
                        done += 1
                except Exception as e:
                    if done < len(ranks) and isinstance(root_cause(e), UnrecoverableError):
                        # As a repair that cannot rebuild does: restores say so at once,
                        # and wait neither on the rank nor on a commit no node can confirm.
                        job.unrecoverable[ranks[done]] = _lost_of(e)
                    job.redundancy = Redundancy.DEGRADED
                    job.detail = f"rebuild on {node[:12]} failed"
                    plane.events.add(
                        "error",
                        f"rebuild of node {node[:12]} for job {job.name!r} failed: {describe(e)}",
                        node=node,
                        job=job.name,
                        lost=_lost_of(e),
                    )
                    continue
                plane.events.add(
                    "rebuild",
                    f"restarted SMP on node {node[:12]}: rebuilt {total} bytes of job "
                    f"{job.name!r} step {rec.step} from the group in "
                    f"{plane.clock.now() - t0:.3f} s",
                    node=node,
                    job=job.name,
                    bytes=total,
                    duration=round(plane.clock.now() - t0, 4),
                )


def attempt_open(job: Job, step: int) -> bool:
    att = job.attempts.get(step)
    return att is not None and att.life.phase in (StepPhase.COLLECTING, StepPhase.PREPARING)
