"""Restoring from the persisted tier when memory cannot serve a job.

Memory cannot serve a job when it has no committed step in memory (the
store was restarted: ``down``, then ``up`` with the same persist
directory) or when some rank of its committed step can be neither read nor
rebuilt (more than m chunks of a stripe lost). Ranks of one job must all
resume from one step, so the decision is the job's, not the rank's:

1. :func:`must_fall_back` (asked by :func:`snapstore.control.recovery.restore_plan`
   for every rank): a persisted step exists and memory cannot serve every
   rank; then every rank is told "unrecoverable", even one whose own bytes
   are intact.
2. The client then asks :func:`restore_plan`: the first time, the newest
   complete persisted step whose rank files all verify is chosen (files
   checked by the alive SMPs in parallel; verdicts cached per step
   directory); newer steps that fail are skipped, reported as
   ``persisted_corrupt`` events and listed in the plan. The plan is cached
   so that every rank gets the same one, until the job commits a new step.
3. When a restoring rank (not a read-only peek) takes the plan, the job's
   unusable in-memory step is dropped (:func:`_reset`): the job then saves
   steps after the persisted one as usual.
4. A rank whose file fails its checksum after the choice reports it
   (:func:`mark_bad`); the next restore of the job chooses an older step.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from snapstore import persist
from snapstore.control.commit import abort
from snapstore.control.state import JobState, rank_restorable
from snapstore.rpc import describe

if TYPE_CHECKING:
    from snapstore.control.coordinator import Coordinator

__all__ = ["mark_bad", "must_fall_back", "note_restore", "restore_plan", "unservable_ranks"]

VERIFY_TIMEOUT = 600.0
FORGET_TIMEOUT = 30.0


def _fail(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": kind, "message": message, **extra}


def unservable_ranks(coord: Coordinator, js: JobState) -> list[int]:
    """Ranks of the job's committed step that can be neither read nor rebuilt now."""
    rec = js.committed
    if rec is None:
        return []
    alive = set(coord.alive())
    bad = set(js.unrecoverable)
    for r, e in rec.ranks.items():
        if js.relocated.get(r, e.node) not in alive and not rank_restorable(rec, r, alive):
            bad.add(r)
    return sorted(bad)


def must_fall_back(coord: Coordinator, js: JobState) -> bool:
    """A persisted step exists, and memory cannot serve every rank of the job."""
    fl = coord.flusher
    return (
        fl.enabled
        and js.committed is not None
        and fl.newest(js.name) is not None
        and bool(unservable_ranks(coord, js))
    )


async def restore_plan(
    coord: Coordinator, job: str, rank: int, reason: str, restarted: bool, timeout: float
) -> dict[str, Any]:
    """The persisted step every rank of ``job`` restores from when memory cannot serve it.

    Returns ``ok``, ``step``, ``path``, ``world_size`` and ``skipped`` (newer
    steps that failed verification, with why); or ``error`` ``memory``
    (memory serves the job: read it there) or ``not_found``.
    """
    fl = coord.flusher
    if not fl.enabled:
        return _fail("not_found", "this store has no persist directory")
    jp = fl.job(job)
    async with jp.plan_lock:
        js = coord.jobs.get(job)
        if js is not None and js.committed is not None and not unservable_ranks(coord, js):
            return _fail(
                "memory", f"job {job!r} step {js.committed.step} is restorable from memory"
            )
        plan = jp.plan
        if plan is None:
            plan = await asyncio.wait_for(_choose(coord, job), timeout)
            if not plan["ok"]:
                return plan
            plan["reason"] = reason
            jp.plan = plan
            coord.events.add(
                "fallback",
                f"job {job!r} restores from persisted step {plan['step']} ({plan['path']}): "
                f"{reason}",
                job=job,
                step=plan["step"],
                path=plan["path"],
                skipped=plan["skipped"] or None,
            )
        if restarted and js is not None and js.committed is not None:
            await _reset(coord, js, plan["step"])
        return plan


async def _choose(coord: Coordinator, job: str) -> dict[str, Any]:
    fl = coord.flusher
    try:
        candidates = await fl.in_thread(persist.newest_first, fl.root, job)
    except OSError as e:  # an unreachable mount or object store
        where = persist.job_dir(fl.root, job)
        return _fail("not_found", f"cannot list persisted steps in {where}: {e}")
    jp = fl.job(job)
    skipped: list[dict[str, Any]] = []
    for step, path in candidates:
        if path in jp.verdicts:
            problem = jp.verdicts[path]
        else:
            problem = jp.verdicts[path] = await _verify(coord, path)
            if problem is not None:
                coord.events.add(
                    "persisted_corrupt",
                    f"job {job!r} persisted step {step} fails verification: {problem}",
                    job=job,
                    step=step,
                    path=path,
                )
        if problem is None:
            man = await fl.in_thread(persist.read_manifest, path)
            return {
                "ok": True,
                "step": step,
                "path": path,
                "world_size": man.world_size,
                "skipped": skipped,
            }
        skipped.append({"step": step, "reason": problem})
    where = persist.job_dir(fl.root, job)
    detail = "; ".join(f"step {s['step']}: {s['reason']}" for s in skipped)
    return _fail(
        "not_found",
        f"no complete persisted step of job {job!r} in {where}"
        + (f" verifies ({detail})" if skipped else ""),
        skipped=skipped,
    )


async def _verify(coord: Coordinator, path: str) -> str | None:
    """Check every rank file of a step, spread over the alive SMPs; None if all pass."""
    fl = coord.flusher
    try:
        man = await fl.in_thread(persist.read_manifest, path)
    except Exception as e:
        return str(e)
    ranks = sorted(man.ranks)
    alive = coord.alive()
    if not alive:  # nobody to spread the reads over: read here
        try:
            for r in ranks:
                await fl.in_thread(persist.verify_rank, path, r, man)
        except Exception as e:
            return str(e)
        return None
    share: dict[str, list[int]] = {}
    for i, r in enumerate(ranks):
        share.setdefault(alive[i % len(alive)], []).append(r)
    nodes = list(share)
    results = await asyncio.gather(
        *(
            asyncio.wait_for(
                coord.handle(n).verify_persisted.remote(path, share[n]), VERIFY_TIMEOUT
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


def mark_bad(coord: Coordinator, job: str, path: str, problem: str) -> None:
    """A rank found a file of a planned step corrupt after it was verified."""
    jp = coord.flusher.job(job)
    jp.verdicts[path] = problem
    jp.plan = None
    coord.events.add(
        "persisted_corrupt",
        f"job {job!r}: {problem}; the next restore uses an older step",
        job=job,
        path=path,
    )


async def _reset(coord: Coordinator, js: JobState, step: int) -> None:
    """Drop the job's in-memory step: it cannot be served and the job resumes from disk."""
    async with js.lock:
        rec = js.committed
        if rec is None:
            return
        for s in list(js.pending):
            abort(coord, js, s, "the job restores from its persisted step")
        js.committed = None
        js.unrecoverable.clear()
        js.relocated.clear()
        js.preferred_home.clear()
        js.status = "none"
        js.status_detail = f"restored from persisted step {step}; memory held step {rec.step}"
        await asyncio.gather(
            *(
                asyncio.wait_for(coord.handle(n).forget.remote(js.name), FORGET_TIMEOUT)
                for n in coord.alive()
            ),
            return_exceptions=True,
        )
    coord.events.add(
        "memory_dropped",
        f"job {js.name!r}: in-memory step {rec.step} dropped; the job resumes from "
        f"persisted step {step}",
        job=js.name,
        step=rec.step,
    )


def note_restore(coord: Coordinator, job: str, rank: int, info: dict[str, Any]) -> None:
    """Remember where the job's last restore came from (for the snapshot and REST)."""
    tier = "persisted" if info.get("tier") == "persisted" else "memory"
    coord.flusher.job(job).last_restore = {
        "source": tier,
        "step": info.get("step"),
        "rank": rank,
        "time": time.time(),
        "path": info.get("path"),
        "read_from": info.get("source"),
    }
