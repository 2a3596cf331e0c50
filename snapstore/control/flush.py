"""The coordinator's side of the persisted tier: flushing steps to disk, restoring from disk.

The bytes side (files, manifest, checksums) is :mod:`snapstore.persist`,
run by the SMPs for rank files and by the coordinator (in a worker thread)
for manifests, renames and retention. One :class:`Flusher` per coordinator.

Call protocol of a flush:

1. Periodic: :func:`snapstore.control.commit.commit_step` asks :meth:`Flusher.hold_for`
   before publishing a record; when the step crosses a multiple of
   ``persist_every`` the record goes out with a hold, and each SMP holds
   its data slots of the step as it commits it, so no later commit can
   reuse them before they are read. Then :meth:`Flusher.start`. On demand
   (:meth:`Flusher.persist`, from ``Client.persist``): the committed step is
   held with :meth:`SMP.hold` under the job's lock, so no commit interleaves.
2. :meth:`Flusher._flush` (a background task; at most one per job) orders
   every node holding ranks of the step to write them
   (:meth:`SMP.persist`) into ``step-<N>.partial``; each SMP paces itself
   with its token bucket, fsyncs, releases its hold and returns the
   checksums of what it wrote.
3. When every rank is written and its checksums equal the record's, the
   manifest is written and the directory renamed to ``step-<N>``
   (:func:`snapstore.persist.publish_step`); then retention deletes the
   oldest complete steps beyond ``persist_keep``.
4. A failure before 3 releases the holds, leaves the ``.partial`` directory
   for the next flush of the job to delete, and adds a ``persist_failed``
   event; the previous persisted step is untouched. Training is never
   blocked: commits go on while a flush runs (the SMPs allocate the next
   slots beside the held ones).

Restoring from disk when memory cannot serve a job is :mod:`snapstore.control.fallback`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from snapstore import persist
from snapstore.control.state import JobState
from snapstore.errors import SnapstoreError
from snapstore.format.record import StepRecord
from snapstore.rpc import describe

if TYPE_CHECKING:
    from snapstore.control.coordinator import Coordinator

__all__ = ["Flusher"]

logger = logging.getLogger(__name__)

INDEX_INTERVAL = 5.0  # seconds between listings of the persist directory
HOLD_TIMEOUT = 30.0  # for the hold and release calls themselves

T = TypeVar("T")


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

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.cfg = coord.cfg
        self.root = coord.cfg.persist_dir
        self.jobs: dict[str, JobPersist] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.root)

    def job(self, name: str) -> JobPersist:
        jp = self.jobs.get(name)
        if jp is None:
            jp = self.jobs[name] = JobPersist()
        return jp

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking file work on the default executor: the event loop never waits on I/O."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(fn, *args))

    # -- the index of persisted steps -------------------------------------------------

    async def open(self) -> None:
        """List the persist directory once, then keep listing it in the background."""
        if not self.enabled:
            return
        with contextlib.suppress(Exception):
            await self.refresh()
        self.coord._bg.append(asyncio.create_task(self._index_loop()))

    async def _index_loop(self) -> None:
        while True:
            await asyncio.sleep(INDEX_INTERVAL)
            try:
                await self.refresh()
            except Exception as e:  # a vanished mount must not stop the loop
                logger.info("cannot list %s: %s", self.root, e)

    async def refresh(self, job: str | None = None) -> None:
        """Re-read the complete steps on disk (of ``job``, or of every job)."""

        def scan() -> dict[str, list[persist.PersistedStep]]:
            names = [job] if job is not None else persist.list_jobs(self.root)
            return {n: persist.list_steps(self.root, n) for n in names}

        found = await self.in_thread(scan)
        for name, listed in found.items():
            jp = self.job(name)
            self._corrupt_manifests(name, jp, listed)
            steps = [s for s in listed if s.problem is None]
            jp.steps = [s.to_dict() for s in steps]
            if steps:
                jp.world_size = steps[-1].world_size

    def _corrupt_manifests(self, job: str, jp: JobPersist, listed: list[Any]) -> None:
        """A step whose manifest is unusable is corrupt: a verdict and one event."""
        for s in listed:
            if s.problem is None or jp.verdicts.get(s.path) == s.problem:
                continue
            jp.verdicts[s.path] = s.problem
            self.coord.events.add(
                "persisted_corrupt",
                f"job {job!r} persisted step {s.step} is unusable: {s.problem}",
                job=job,
                step=s.step,
                path=s.path,
            )

    def newest(self, job: str, intact: bool = False) -> int | None:
        """The job's newest complete persisted step; with ``intact``, the newest
        not found corrupt by a restore (a corrupt one is flushed again)."""
        jp = self.jobs.get(job)
        if jp is None:
            return None
        for s in reversed(jp.steps):
            if not intact or jp.verdicts.get(s["path"]) is None:
                return int(s["step"])
        return None

    # -- periodic flushes --------------------------------------------------------------

    def hold_for(self, js: JobState, record: StepRecord) -> dict[str, Any] | None:
        """Whether committing ``record`` should hold its slots for a flush; the hold if so.

        Due when the step crosses a multiple of ``persist_every`` since the
        job's previous committed step (the first commit: when the step is a
        multiple). At most one flush per job runs; one that comes due
        meanwhile is done after it, on the then latest step.
        """
        every = self.cfg.persist_every
        if not self.enabled or every <= 0:
            return None
        prev = js.committed.step if js.committed is not None else None
        step = record.step
        due = step % every == 0 if prev is None else step // every > prev // every
        if not due:
            return None
        jp = self.job(js.name)
        if jp.running is not None:
            jp.again = True
            return None
        jp.running = step
        return {
            "token": f"flush.{js.name}.{step}.{uuid.uuid4().hex[:8]}",
            "ttl": self.cfg.persist_timeout,
        }

    def start(self, record: StepRecord, hold: dict[str, Any]) -> None:
        """The record was published with ``hold``: flush it in the background."""
        jp = self.job(record.job)
        jp.task = self.coord.spawn(self._flush(record, str(hold["token"])))

    def on_commit(self, job: str) -> None:
        """A new step is in memory: a fallback plan handed out before is over."""
        jp = self.jobs.get(job)
        if jp is not None:
            jp.plan = None

    # -- one flush -------------------------------------------------------------------------

    def _homes(self, js: JobState | None, record: StepRecord) -> dict[str, list[int]]:
        relocated = js.relocated if js is not None else {}
        out: dict[str, list[int]] = {}
        for r, e in sorted(record.ranks.items()):
            out.setdefault(relocated.get(r, e.node), []).append(r)
        return out

    def _release(self, nodes: list[str], token: str) -> None:
        for n in nodes:
            ns = self.coord.nodes.get(n)
            if ns is not None:
                with contextlib.suppress(Exception):
                    ns.handle.release.remote(token)

    async def _flush(self, record: StepRecord, token: str) -> dict[str, Any]:
        """Write every rank of ``record``, then the manifest, then rename; never raises."""
        job, step = record.job, record.step
        jp = self.job(job)
        jp.running = step
        homes = self._homes(self.coord.jobs.get(job), record)
        t0 = time.time()
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
            self.coord.events.add(
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
            self._release(list(homes), token)
            jp.error = result["message"]
            self.coord.events.add(
                "persist_failed",
                f"job {job!r} step {step} was not persisted: {result['message']} (the previous "
                "persisted step is intact)",
                job=job,
                step=step,
                failures=result.get("failures") or None,
                duration=round(time.time() - t0, 4),
            )
        if jp.again:
            jp.again = False
            self.coord.spawn(self.persist(job, self.cfg.persist_timeout))
        return result

    async def _write(
        self, record: StepRecord, token: str, homes: dict[str, list[int]]
    ) -> dict[str, Any]:
        job, step = record.job, record.step
        root = self.root
        t0 = time.monotonic()
        try:
            # No flush of the job runs now: leftovers of ones that died go too.
            partial = await self.in_thread(persist.begin_step, root, job, step)
        except (OSError, SnapstoreError) as e:
            where = persist.step_dir(root, job, step)
            return _fail("persist_failed", f"cannot prepare {where}: {e}")
        nodes = list(homes)
        calls = []
        for n in nodes:
            order = {
                "job": job,
                "step": step,
                "k": record.k,
                "dir": partial,
                "token": token,
                "ranks": [[r, record.ranks[r].size, list(record.ranks[r].sums)] for r in homes[n]],
            }
            ns = self.coord.nodes.get(n)
            if ns is None:
                calls.append(_missing(n))
            else:
                calls.append(
                    asyncio.wait_for(ns.handle.persist.remote(order), self.cfg.persist_timeout)
                )
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures: dict[str, str] = {}
        written: dict[int, list[int]] = {}
        for n, res in zip(nodes, results, strict=True):
            if isinstance(res, BaseException):
                failures[f"node {n[:12]}"] = describe(res)
                continue
            for r, info in res["ranks"].items():
                written[int(r)] = [int(x) for x in info["sums"]]
        for r, entry in record.ranks.items():
            if r not in written and not failures:
                failures[f"rank {r}"] = "no node wrote it"
            elif r in written and written[r] != list(entry.sums):
                failures[f"rank {r}"] = "written bytes do not hash to the record's checksums"
        if failures:
            return _fail("persist_failed", "writing the rank files failed", failures=failures)
        manifest = persist.PersistManifest(
            job=job,
            step=step,
            world_size=record.world_size,
            k=record.k,
            ranks={
                r: persist.PersistedRank(r, persist.rank_file(r), e.size, e.sums)
                for r, e in record.ranks.items()
            },
            created_at=time.time(),
            committed_at=record.committed_at,
            store_id=self.coord.store_id,
            record_version=record.version,
        )

        def publish() -> tuple[str, list[int]]:
            path = persist.publish_step(root, manifest)
            return path, persist.retain(root, job, self.cfg.persist_keep)

        try:
            path, removed = await self.in_thread(publish)
        except Exception as e:
            return _fail("persist_failed", f"publishing the manifest failed: {e}")
        await self.refresh(job)
        duration = time.monotonic() - t0
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

    # -- on demand --------------------------------------------------------------------------

    async def persist(self, job: str, timeout: float) -> dict[str, Any]:
        """Flush the job's committed step now (or wait for the flush of it that runs).

        Returns ``ok``, ``step``, ``path``, or an ``error`` (``off``, ``not_found``,
        ``persist_failed``, ``timeout``) with a ``message``.
        """
        if not self.enabled:
            return _fail("off", "this store has no persist directory")
        deadline = time.monotonic() + timeout
        jp = self.job(job)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return _fail("timeout", f"job {job!r} was not persisted within {timeout} s")
            js = self.coord.jobs.get(job)
            if js is None or js.committed is None:
                return _fail("not_found", f"job {job!r} has no committed step in memory")
            target = js.committed.step
            newest = self.newest(job, intact=True)
            if newest is not None and newest >= target:
                path = persist.step_dir(self.root, job, newest)
                return {"ok": True, "step": newest, "path": path}
            if jp.running is not None and jp.task is not None:
                running = jp.running
                res = await _wait(jp.task, left)
                if res is None:
                    continue  # timed out: the loop reports it
                if running >= target and not res["ok"]:
                    return res
                continue
            task = await self._hold_and_start(js, target)
            if isinstance(task, dict):
                if task["error"] == "retry":
                    continue
                return task
            res = await _wait(task, deadline - time.monotonic())
            if res is None:
                continue
            if not res["ok"]:
                return res

    async def _hold_and_start(
        self, js: JobState, target: int
    ) -> asyncio.Task[dict[str, Any]] | dict[str, Any]:
        jp = self.job(js.name)
        async with js.lock:
            rec = js.committed
            if rec is None or rec.step != target or jp.running is not None:
                return _fail("retry", "the job moved on, or a flush started meanwhile")
            token = f"flush.{js.name}.{rec.step}.{uuid.uuid4().hex[:8]}"
            homes = self._homes(js, rec)
            jp.running = rec.step
            nodes = list(homes)
            results = await asyncio.gather(
                *(
                    asyncio.wait_for(
                        self.coord.handle(n).hold.remote(
                            js.name, rec.step, token, self.cfg.persist_timeout
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
                self._release(nodes, token)
                return _fail(
                    "persist_failed",
                    f"cannot hold step {rec.step} of job {js.name!r} for a flush",
                    failures=missing,
                )
            task = self.coord.spawn(self._flush(rec, token))
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
        """Snapshot entries of jobs that are on disk but not in memory (e.g. after a restart)."""
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


async def _wait(task: asyncio.Task[dict[str, Any]], timeout: float) -> dict[str, Any] | None:
    try:
        return await asyncio.wait_for(asyncio.shield(task), max(0.0, timeout))
    except asyncio.TimeoutError:
        return None


async def _missing(node: str) -> dict[str, Any]:
    raise RuntimeError(f"node {node[:12]} is not a node of this store")
