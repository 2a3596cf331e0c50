"""The coordinator's side of the persisted tier: flushing committed steps to disk.

The bytes side (files, manifest, checksums) is :mod:`snapstore.persist`, run
by nodes for rank files and by the coordinator (off its event loop) for
manifests, publication and retention. One :class:`Flusher` per coordinator.

Call protocol of a flush:

1. Periodic: when a commit's step crosses a multiple of ``persist_every``,
   :meth:`Flusher.hold_for` gives a hold token that travels with the
   commit's decision: each node holds its data slots of the step as it
   commits it, so no later commit can reuse them before they are read.
   Then :meth:`Flusher.start`. On demand (:meth:`Flusher.persist`, from
   ``Client.persist``): the committed step is held with ``hold`` calls under
   the job's lock, so no re-protection interleaves.
2. :meth:`Flusher._flush` (a background task; at most one per job) orders
   every node holding ranks of the step to write them into the step's
   partial directory; each paces itself, fsyncs, releases its hold and
   returns the checksums of what it wrote.
3. When every rank is written and its checksums equal the record's, the
   manifest is published; then retention deletes the oldest complete steps
   beyond ``persist_keep``.
4. A failure before 3 releases the holds, leaves the partial directory for
   the next flush of the job to delete, and adds a ``persist_failed`` event;
   the previous persisted step is untouched. Training is never blocked.

Restoring from disk when memory cannot serve a job is
:mod:`snapstore.control.fallback`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from snapstore.control.jobs import Job, JobRecord
from snapstore.control.messages import ErrorKind, ErrorReply
from snapstore.errors import SnapstoreError
from snapstore.format.work import PersistOrder
from snapstore.persist import PersistedRank, PersistManifest, rank_file
from snapstore.persist.backend import Tier
from snapstore.rpc import describe

if TYPE_CHECKING:
    from snapstore.control.plane import ControlPlane

__all__ = ["Flusher", "JobPersist"]

logger = logging.getLogger(__name__)

INDEX_INTERVAL = 5.0  # seconds between listings of the persist directory
HOLD_TIMEOUT = 30.0  # for the hold and release calls themselves


@dataclass
class JobPersist:
    """What the coordinator knows of one job's persisted tier."""

    running: int | None = None  # step being flushed
    task: asyncio.Task[dict[str, Any]] | None = None
    again: bool = False  # a periodic flush came due while another ran
    steps: list[dict[str, Any]] = field(default_factory=list)  # complete steps, oldest first
    world_size: int = 0
    error: str | None = None  # of the last flush, if it failed
    last: dict[str, Any] | None = None  # the last successful flush
    last_restore: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None  # the fallback plan handed out, until a new commit
    verdicts: dict[str, str | None] = field(default_factory=dict)  # step dir -> problem
    plan_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _fail(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": kind, "message": message, **extra}


class Flusher:
    """Flushes of every job of one coordinator, and the index of what is on disk."""

    def __init__(self, plane: ControlPlane, tier: Tier | None) -> None:
        self.plane = plane
        self.cfg = plane.cfg
        self.tier = tier
        self.jobs: dict[str, JobPersist] = {}

    @property
    def enabled(self) -> bool:
        return self.tier is not None

    @property
    def root(self) -> str:
        return self.tier.root if self.tier is not None else ""

    def job(self, name: str) -> JobPersist:
        jp = self.jobs.get(name)
        if jp is None:
            jp = self.jobs[name] = JobPersist()
        return jp

    # -- the index of persisted steps -------------------------------------------------

    async def open(self) -> None:
        """List the persist directory once, then keep listing it in the background."""
        if self.tier is None:
            return
        try:
            await self.refresh()
        except Exception as e:
            logger.info("cannot list %s: %s", self.root, e)
        self.plane.tasks.spawn(self._index_loop(), "persisted index")

    async def _index_loop(self) -> None:
        while True:
            await asyncio.sleep(INDEX_INTERVAL)
            try:
                await self.refresh()
            except Exception as e:  # a vanished mount must not stop the loop
                logger.info("cannot list %s: %s", self.root, e)

    async def refresh(self, job: str | None = None) -> None:
        """Re-read the complete steps on disk (of ``job``, or of every job)."""
        tier = self.tier
        if tier is None:
            return

        def scan() -> dict[str, list[Any]]:
            names = [job] if job is not None else tier.list_jobs()
            return {n: tier.list_steps(n) for n in names}

        found = await self.plane.offload(scan)
        for name, steps in found.items():
            jp = self.job(name)
            jp.steps = [s.to_dict() for s in steps]
            if steps:
                jp.world_size = steps[-1].world_size

    def newest(self, job: str, intact: bool = False) -> int | None:
        """The job's newest complete persisted step; with ``intact``, the newest not
        found corrupt by a restore (a corrupt one is flushed again)."""
        jp = self.jobs.get(job)
        if jp is None:
            return None
        for s in reversed(jp.steps):
            if not intact or jp.verdicts.get(s["path"]) is None:
                return int(s["step"])
        return None

    # -- periodic flushes --------------------------------------------------------------

    def hold_for(
        self, job: Job, previous: JobRecord | None, record: JobRecord
    ) -> tuple[str, float] | None:
        """Whether committing ``record`` should hold its slots for a flush; (token, ttl).

        Due when the step crosses a multiple of ``persist_every`` since the
        job's previous committed step (the first commit: when the step is a
        multiple). At most one flush per job runs; one that comes due
        meanwhile is done after it, on the then latest step.
        """
        every = self.cfg.persist_every
        if not self.enabled or every <= 0:
            return None
        step = record.step
        prev = previous.step if previous is not None else None
        due = step % every == 0 if prev is None else step // every > prev // every
        if not due:
            return None
        jp = self.job(job.name)
        if jp.running is not None:
            jp.again = True
            return None
        jp.running = step
        return f"flush.{job.name}.{step}.{uuid.uuid4().hex[:8]}", self.cfg.persist_timeout

    def start(self, record: JobRecord, token: str) -> None:
        """The record was committed with hold ``token``: flush it in the background, once
        the nodes applied the decision (and with it, took the hold)."""
        jp = self.job(record.job)
        job = self.plane.jobs.get(record.job)
        applied = job.applied if job is not None else None
        jp.task = self.plane.tasks.spawn(
            self._flush(record, token, applied), f"flush {record.job!r}"
        )

    def on_commit(self, job: str) -> None:
        """A new step is in memory: a fallback plan handed out before is over."""
        jp = self.jobs.get(job)
        if jp is not None:
            jp.plan = None

    # -- one flush ----------------------------------------------------------------------------

    def _homes(self, record: JobRecord) -> dict[str, list[int]]:
        job = self.plane.jobs.get(record.job)
        relocated = job.relocated if job is not None else {}
        out: dict[str, list[int]] = {}
        for r, node in sorted(record.homes().items()):
            out.setdefault(relocated.get(r, node), []).append(r)
        return out

    async def _release(self, nodes: list[str], token: str) -> None:
        for n in nodes:
            with contextlib.suppress(SnapstoreError, asyncio.TimeoutError):
                await asyncio.wait_for(self.plane.fabric.node(n).release(token), HOLD_TIMEOUT)

    async def _flush(
        self, record: JobRecord, token: str, applied: asyncio.Event | None = None
    ) -> dict[str, Any]:
        """Write every rank of ``record``, then the manifest, then publish; never raises."""
        plane = self.plane
        job, step = record.job, record.step
        jp = self.job(job)
        jp.running = step
        homes = self._homes(record)
        t0 = plane.clock.now()
        if applied is not None:
            # A node that did not acknowledge holds nothing: its ranks fail the flush.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(applied.wait(), HOLD_TIMEOUT)
        try:
            result = await self._write(record, token, homes)
        except Exception as e:  # a bug must not leave `running` set forever
            logger.exception("flush of %s step %d failed", job, step)
            result = _fail("persist_failed", f"job {job!r} step {step}: {e!r}")
        finally:
            jp.running = None
        if result["ok"]:
            jp.error = None
            jp.last = result
            jp.verdicts.pop(result["path"], None)  # a corrupt copy was replaced
            plane.events.add(
                "persisted",
                f"job {job!r} step {step} persisted to {result['path']} "
                f"({result['bytes']} bytes in {result['duration']:.3f} s)",
                job=job,
                step=step,
                bytes=result["bytes"],
                duration=result["duration"],
                path=result["path"],
                throughput=result["throughput"],
                removed=result["removed"] or None,
            )
        else:
            await self._release(list(homes), token)
            jp.error = result["message"]
            plane.events.add(
                "persist_failed",
                f"job {job!r} step {step} was not persisted: {result['message']} (the previous "
                "persisted step is intact)",
                job=job,
                step=step,
                failures=result.get("failures") or None,
                duration=round(plane.clock.now() - t0, 4),
            )
        if jp.again:
            jp.again = False
            plane.tasks.spawn(self.persist(job, self.cfg.persist_timeout), f"flush {job!r}")
        return result

    async def _write(
        self, record: JobRecord, token: str, homes: dict[str, list[int]]
    ) -> dict[str, Any]:
        plane = self.plane
        tier = self.tier
        assert tier is not None
        job, step = record.job, record.step
        t0 = plane.clock.now()
        try:
            # No flush of the job runs now: leftovers of ones that died go too.
            partial = await plane.offload(tier.begin_step, job, step)
        except (OSError, SnapstoreError) as e:
            return _fail("persist_failed", f"cannot prepare {tier.step_dir(job, step)}: {e}")
        nodes = list(homes)
        calls = []
        for n in nodes:
            ranks = tuple(
                (r, record.entry(r).size, tuple(record.entry(r).sums))  # type: ignore[union-attr]
                for r in homes[n]
            )
            order = PersistOrder(job, step, record.k, partial, token, ranks)
            calls.append(
                asyncio.wait_for(plane.fabric.node(n).persist(order), self.cfg.persist_timeout)
            )
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures: dict[str, str] = {}
        written: dict[int, list[int]] = {}
        for n, res in zip(nodes, results, strict=True):
            if isinstance(res, BaseException):
                failures[f"node {n[:12]}"] = describe(res)
                continue
            for r, info in res.ranks.items():
                written[int(r)] = [int(x) for x in info.sums]
        for r in record.ranks:
            entry = record.entry(r)
            assert entry is not None
            if r not in written and not failures:
                failures[f"rank {r}"] = "no node wrote it"
            elif r in written and written[r] != list(entry.sums):
                failures[f"rank {r}"] = "written bytes do not hash to the record's checksums"
        if failures:
            return _fail("persist_failed", "writing the rank files failed", failures=failures)
        manifest = PersistManifest(
            job=job,
            step=step,
            world_size=record.world_size,
            k=record.k,
            ranks={
                r: PersistedRank(r, rank_file(r), entry.size, entry.sums)
                for r in record.ranks
                if (entry := record.entry(r)) is not None
            },
            created_at=plane.clock.wall(),
            committed_at=record.committed_at,
            store_id=plane.store_id,
            record_version=record.version,
        )

        def publish() -> tuple[str, list[int]]:
            path = tier.publish_step(manifest)
            return path, tier.retain(job, self.cfg.persist_keep)

        try:
            path, removed = await plane.offload(publish)
        except Exception as e:
            return _fail("persist_failed", f"publishing the manifest failed: {e}")
        await self.refresh(job)
        duration = plane.clock.now() - t0
        nbytes = manifest.data_bytes()
        return {
            "ok": True,
            "step": step,
            "path": path,
            "bytes": nbytes,
            "duration": round(duration, 4),
            "throughput": round(nbytes / duration) if duration > 0 else None,
            "removed": removed,
        }

    # -- on demand ------------------------------------------------------------------------------

    async def persist(self, name: str, timeout: float) -> dict[str, Any] | ErrorReply:
        """Flush the job's committed step now (or wait for the flush of it that runs).

        Returns ``{"ok": True, "step", "path"}`` or an ErrorReply (``off``,
        ``not_found``, ``persist_failed``, ``timeout``).
        """
        plane = self.plane
        if self.tier is None:
            return ErrorReply(ErrorKind.OFF, "this store has no persist directory")
        deadline = plane.clock.now() + timeout
        jp = self.job(name)
        while True:
            left = deadline - plane.clock.now()
            if left <= 0:
                return ErrorReply(
                    ErrorKind.TIMEOUT, f"job {name!r} not persisted within {timeout} s"
                )
            job = plane.jobs.get(name)
            if job is None or job.record is None:
                return ErrorReply(
                    ErrorKind.NOT_FOUND, f"job {name!r} has no committed step in memory"
                )
            target = job.record.step
            newest = self.newest(name, intact=True)
            if newest is not None and newest >= target:
                return {"ok": True, "step": newest, "path": self.tier.step_dir(name, newest)}
            if jp.running is not None and jp.task is not None:
                running = jp.running
                res = await _wait(jp.task, left)
                if res is None:
                    continue  # timed out: the loop reports it
                if running >= target and not res["ok"]:
                    return _as_error(res)
                continue
            task = await self._hold_and_start(job, target)
            if isinstance(task, ErrorReply):
                if task.kind is ErrorKind.RETRY:
                    continue
                return task
            res = await _wait(task, deadline - plane.clock.now())
            if res is None:
                continue
            if not res["ok"]:
                return _as_error(res)

    async def _hold_and_start(
        self, job: Job, target: int
    ) -> asyncio.Task[dict[str, Any]] | ErrorReply:
        plane = self.plane
        jp = self.job(job.name)
        async with job.lock:
            rec = job.record
            if rec is None or rec.step != target or jp.running is not None:
                return ErrorReply(ErrorKind.RETRY, "the job moved on, or a flush started meanwhile")
            token = f"flush.{job.name}.{rec.step}.{uuid.uuid4().hex[:8]}"
            homes = self._homes(rec)
            jp.running = rec.step
            nodes = list(homes)
            results = await asyncio.gather(
                *(
                    asyncio.wait_for(
                        plane.fabric.node(n).hold(
                            job.name, rec.step, token, self.cfg.persist_timeout
                        ),
                        HOLD_TIMEOUT,
                    )
                    for n in nodes
                ),
                return_exceptions=True,
            )
            missing = {}
            for n, res in zip(nodes, results, strict=True):
                if isinstance(res, BaseException):
                    missing[f"node {n[:12]}"] = describe(res)
                elif sorted(res) != sorted(homes[n]):
                    lost = sorted(set(homes[n]) - set(res))
                    missing[f"node {n[:12]}"] = f"does not hold ranks {lost} of step {rec.step}"
            if missing:
                jp.running = None
                await self._release(nodes, token)
                return ErrorReply(
                    ErrorKind.PERSIST_FAILED,
                    f"cannot hold step {rec.step} of job {job.name!r} for a flush",
                    failures=missing,
                )
            task = plane.tasks.spawn(self._flush(rec, token), f"flush {job.name!r}")
            jp.task = task
            return task

    # -- what the snapshot shows -------------------------------------------------------------

    def job_entry(self, job: str) -> dict[str, Any]:
        jp = self.jobs.get(job)
        if jp is None:
            return {
                "persisted": [],
                "persisting": None,
                "persist_error": None,
                "last_restore": None,
            }
        return {
            "persisted": [{k: s[k] for k in ("step", "time", "bytes", "path")} for s in jp.steps],
            "persisting": jp.running,
            "persist_error": jp.error,
            "last_restore": jp.last_restore,
        }

    def disk_only_jobs(self, known: set[str]) -> list[dict[str, Any]]:
        """Snapshot entries of jobs on disk but not in memory (e.g. after a restart)."""
        out = []
        for name, jp in sorted(self.jobs.items()):
            if name in known or not jp.steps:
                continue
            out.append(
                {
                    "job": name,
                    "world_size": jp.world_size,
                    "status": "none",
                    "status_detail": "no step in memory; persisted steps on disk",
                    "latest_step": None,
                    "pending_steps": [],
                    "commits": 0,
                    "last_commit_latency": None,
                    "protected_at": None,
                    "unrecoverable": {},
                    "relocated": {},
                    "pending": [],
                    **self.job_entry(name),
                }
            )
        return out


def _as_error(res: dict[str, Any]) -> ErrorReply:
    return ErrorReply(
        ErrorKind.PERSIST_FAILED, str(res.get("message", "")), failures=res.get("failures") or {}
    )


async def _wait(task: asyncio.Task[dict[str, Any]], timeout: float) -> dict[str, Any] | None:
    try:
        return await asyncio.wait_for(asyncio.shield(task), max(0.0, timeout))
    except asyncio.TimeoutError:
        return None
