"""Restoring from the persisted tier when memory cannot serve a job.

Memory cannot serve a job when it has no committed step in memory (the
store was restarted: ``down``, then ``up`` with the same persist directory)
or when some rank of its committed step can be neither read nor rebuilt
because more than m chunks of a stripe are on *lost* nodes. Nodes that are
merely silent, or dead but not yet lost (their SMP may be back in a
second, with its memory), never cause a fallback: restores wait for them.
Ranks of one job must all resume from one step, so the decision is the
job's, not the rank's:

1. :meth:`Fallback.must_fall_back` (asked by the restore plan for every
   rank): a persisted step exists and memory cannot serve every rank; then
   every rank is told "unrecoverable", even one whose own bytes are intact.
2. The client then asks :meth:`Fallback.restore_plan`: the first time, the
   newest complete persisted step whose rank files all verify is chosen
   (files checked by readable nodes in parallel; verdicts cached per step
   directory); newer steps that fail are skipped, reported as
   ``persisted_corrupt`` events and listed in the plan. The plan is kept so
   that every rank gets the same one, until the job commits a new step.
3. When a restoring rank (not a read-only peek) takes the plan, the job's
   unusable in-memory step is dropped (a declared fallback: the job's
   committed step moves back to the persisted one, with an event saying
   so); the job then saves steps after the persisted one as usual.
4. A rank whose file fails its checksum after the choice reports it
   (:meth:`Fallback.mark_bad`); the next restore of the job chooses an older
   step.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from snapstore.control.health import rank_restorable
from snapstore.control.jobs import Job
from snapstore.control.messages import ErrorKind, ErrorReply
from snapstore.control.states import JobPhase, Redundancy
from snapstore.rpc import describe

if TYPE_CHECKING:
    from snapstore.control.plane import ControlPlane

__all__ = ["Fallback"]

VERIFY_TIMEOUT = 600.0
FORGET_TIMEOUT = 30.0


class Fallback:
    """Falling back to the persisted tier, for every rank of a job alike."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def unservable_ranks(self, job: Job) -> list[int]:
        """Ranks of the committed step that cannot be served even if every node that is not
        lost came back."""
        rec = job.record
        if rec is None:
            return []
        present = set(self.plane.membership.present())
        bad = set(job.unrecoverable)
        for r, home in rec.homes().items():
            where = job.relocated.get(r, home)
            piece = rec.slice_of(r)
            if (
                where not in present
                and piece is not None
                and not rank_restorable(piece, r, present)
            ):
                bad.add(r)
        return sorted(bad)

    def must_fall_back(self, job: Job) -> bool:
        """A persisted step exists, and memory cannot serve every rank of the job."""
        fl = self.plane.flusher
        return (
            fl.enabled
            and job.record is not None
            and fl.newest(job.name) is not None
            and bool(self.unservable_ranks(job))
        )

    async def restore_plan(
        self, name: str, rank: int, session: str, reason: str, restarted: bool, timeout: float
    ) -> dict[str, Any] | ErrorReply:
        """The persisted step every rank of ``name`` restores from when memory cannot.

        Returns ``{"ok": True, "step", "path", "world_size", "skipped"}``, or an
        ErrorReply: MEMORY (memory serves the job: read it there) or NOT_FOUND.
        """
        plane = self.plane
        fl = plane.flusher
        if not fl.enabled:
            return ErrorReply(ErrorKind.NOT_FOUND, "this store has no persist directory")
        jp = fl.job(name)
        async with jp.plan_lock:
            job = plane.jobs.get(name)
            if job is not None and job.record is not None and not self.unservable_ranks(job):
                return ErrorReply(
                    ErrorKind.MEMORY,
                    f"job {name!r} step {job.record.step} is restorable from memory",
                )
            plan = jp.plan
            if plan is None:
                chosen = await asyncio.wait_for(self._choose(name), timeout)
                if isinstance(chosen, ErrorReply):
                    return chosen
                plan = chosen
                plan["reason"] = reason
                jp.plan = plan
                plane.events.add(
                    "fallback",
                    f"job {name!r} restores from persisted step {plan['step']} "
                    f"({plan['path']}): {reason}",
                    job=name,
                    step=plan["step"],
                    path=plan["path"],
                    skipped=plan["skipped"] or None,
                )
            if restarted and job is not None:
                if job.record is not None:
                    await self._reset(job, int(plan["step"]))
                if job.life.phase is JobPhase.RESTORING and job.life.pinned is None:
                    job.life.pinned = int(plan["step"])
                if job.life.phase is JobPhase.RESTORING and job.life.pinned == plan["step"]:
                    previous = job.sessions.get(rank)
                    if previous is not None and previous[0] != session:
                        job.retired.add(previous[0])
                    job.restore_seq += 1
                    job.sessions[rank] = (session, job.restore_seq)
                    job.life.rank_restored(rank, int(plan["world_size"]))
            return dict(plan, incarnation=job.life.incarnation if job is not None else 0)

    async def _choose(self, name: str) -> dict[str, Any] | ErrorReply:
        plane = self.plane
        fl = plane.flusher
        tier = fl.tier
        assert tier is not None
        try:
            candidates = await plane.offload(tier.newest_first, name)
        except OSError as e:  # an unreachable mount or object store
            return ErrorReply(
                ErrorKind.NOT_FOUND, f"cannot list persisted steps in {tier.job_dir(name)}: {e}"
            )
        jp = fl.job(name)
        skipped: list[dict[str, Any]] = []
        for step, path in candidates:
            if path in jp.verdicts:
                problem = jp.verdicts[path]
            else:
                problem = jp.verdicts[path] = await self._verify(path)
                if problem is not None:
                    plane.events.add(
                        "persisted_corrupt",
                        f"job {name!r} persisted step {step} fails verification: {problem}",
                        job=name,
                        step=step,
                        path=path,
                    )
            if problem is None:
                man = await plane.offload(tier.read_manifest, path)
                return {
                    "ok": True,
                    "step": step,
                    "path": path,
                    "world_size": man.world_size,
                    "skipped": skipped,
                }
            skipped.append({"step": step, "reason": problem})
        detail = "; ".join(f"step {s['step']}: {s['reason']}" for s in skipped)
        return ErrorReply(
            ErrorKind.NOT_FOUND,
            f"no complete persisted step of job {name!r} in {tier.job_dir(name)}"
            + (f" verifies ({detail})" if skipped else ""),
        )

    async def _verify(self, path: str) -> str | None:
        """Check every rank file of a step, spread over readable nodes; None if all pass."""
        plane = self.plane
        tier = plane.flusher.tier
        assert tier is not None
        try:
            man = await plane.offload(tier.read_manifest, path)
        except Exception as e:
            return str(e)
        ranks = sorted(man.ranks)
        readable = plane.membership.readable()
        if not readable:  # nobody to spread the reads over: read here
            try:
                for r in ranks:
                    await plane.offload(tier.verify_rank, path, r, man)
            except Exception as e:
                return str(e)
            return None
        share: dict[str, list[int]] = {}
        for i, r in enumerate(ranks):
            share.setdefault(readable[i % len(readable)], []).append(r)
        nodes = list(share)
        results = await asyncio.gather(
            *(
                asyncio.wait_for(
                    plane.fabric.node(n).verify_persisted(path, share[n]), VERIFY_TIMEOUT
                )
                for n in nodes
            ),
            return_exceptions=True,
        )
        problems = []
        for n, res in zip(nodes, results, strict=True):
            if isinstance(res, BaseException):
                problems.append(f"node {n[:12]} could not verify: {describe(res)}")
            else:
                problems.extend(str(v) for v in res.values() if v)
        return "; ".join(problems) if problems else None

    def mark_bad(self, name: str, path: str, problem: str) -> None:
        """A rank found a file of a planned step corrupt after it was verified."""
        jp = self.plane.flusher.job(name)
        jp.verdicts[path] = problem
        jp.plan = None
        self.plane.events.add(
            "persisted_corrupt",
            f"job {name!r}: {problem}; the next restore uses an older step",
            job=name,
            path=path,
        )

    async def _reset(self, job: Job, step: int) -> None:
        """Drop the job's in-memory step: it cannot be served and the job resumes from disk."""
        plane = self.plane
        async with job.lock:
            rec = job.record
            if rec is None:
                return
            plane.commits.fail_open(job, "the job restores from its persisted step")
            job.record = None
            job.unrecoverable.clear()
            job.relocated.clear()
            job.preferred_home.clear()
            job.unacked.clear()
            if job.life.phase is not JobPhase.DROPPED:
                job.life.memory_dropped(step)
            job.redundancy = Redundancy.NONE
            job.detail = f"restored from persisted step {step}; memory held step {rec.step}"
            await asyncio.gather(
                *(
                    asyncio.wait_for(plane.fabric.node(n).forget(job.name), FORGET_TIMEOUT)
                    for n in plane.membership.readable()
                ),
                return_exceptions=True,
            )
            job.touch()
        plane.events.add(
            "memory_dropped",
            f"job {job.name!r}: in-memory step {rec.step} dropped (declared fallback); the job "
            f"resumes from persisted step {step}",
            job=job.name,
            step=rec.step,
            fallback_to=step,
        )

    def note_restore(self, name: str, rank: int, info: dict[str, Any]) -> None:
        """Remember where the job's last restore came from (for the snapshot and REST)."""
        tier = "persisted" if info.get("tier") == "persisted" else "memory"
        self.plane.flusher.job(name).last_restore = {
            "source": tier,
            "step": info.get("step"),
            "rank": rank,
            "time": self.plane.clock.wall(),
            "path": info.get("path"),
            "read_from": info.get("source"),
        }
