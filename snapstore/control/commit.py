"""The commit protocol: a step becomes visible only when all of it is in memory.

1. Every rank stages its buffer on its node; its SMP checksums the k pieces
   and reports (:func:`rank_staged`).
2. When all ``world_size`` ranks have staged, the coordinator plans the
   step's parity over the current stripe groups and orders every parity
   holder to compute its chunks (:func:`commit_step`).
3. Only when every parity chunk is stored and checksummed is the record
   sent to the SMPs (each keeps a copy, so a restarted coordinator finds it)
   and the step declared committed; waiters are woken after that.
4. Any failure before 3 aborts the step: its slots are freed, the previous
   committed step is untouched and stays what restore returns.

The committed record of a job and its in-progress steps are changed only
under the job's lock, so a commit never interleaves with a re-protection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from snapstore.control.orders import parity_build_orders, parity_delta_orders, same_geometry
from snapstore.control.placement import plan_parity
from snapstore.control.state import ALIVE, JobState, Pending
from snapstore.format.record import RankEntry, StepRecord
from snapstore.rpc import describe

if TYPE_CHECKING:
    from snapstore.control.coordinator import Coordinator

__all__ = [
    "abandon",
    "abort",
    "abort_pending_on",
    "build_parity",
    "commit_step",
    "publish",
    "rank_staged",
    "wait_commit",
]

logger = logging.getLogger(__name__)

PARITY_TIMEOUT = 120.0
COMMIT_ACK_TIMEOUT = 30.0


def _job(coord: Coordinator, job: str, world_size: int) -> JobState:
    js = coord.jobs.get(job)
    if js is None:
        js = coord.jobs[job] = JobState(job, world_size)
    return js


def rank_staged(
    coord: Coordinator,
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
    js = _job(coord, job, world_size)
    if client:
        _count_client(coord, client)
    if world_size != js.world_size:
        if js.committed is None and not js.pending:
            js.world_size = world_size
        else:
            return {
                "ok": False,
                "error": f"job {job!r} has world size {js.world_size}; rank {rank} "
                f"staged step {step} with world size {world_size}",
            }
    if not 0 <= rank < world_size:
        return {"ok": False, "error": f"rank {rank} outside world size {world_size}"}
    if js.committed is not None and step <= js.committed.step:
        return {
            "ok": False,
            "error": f"job {job!r} already committed step {js.committed.step}; step {step} "
            "is not newer (steps must increase; drop the job to start over)",
        }
    for older in [s for s, p in js.pending.items() if s < step and rank in p.staged]:
        abort(coord, js, older, f"rank {rank} moved on to step {step}")
    if step in js.failed:
        # A rank late to a step the others gave up on: staging it would start a
        # step that can never complete. It is tried again only after a restore.
        return {
            "ok": False,
            "error": f"step {step} of job {job!r} was aborted ({js.failed[step]}); "
            "save the next step",
        }
    p = js.pending.get(step)
    if p is None:
        p = js.pending[step] = Pending(step, world_size)
    if p.committing:
        return {"ok": False, "error": f"step {step} of job {job!r} is already being committed"}
    p.staged[rank] = RankEntry(node, size, tuple(sums))
    p.deltas[rank] = delta
    if len(p.staged) == world_size:
        p.committing = True
        coord.spawn(commit_step(coord, job, step))
    return {"ok": True}


_CLIENT_COUNTERS = {
    "waits": "save_waits_total",
    "wait_seconds": "save_wait_seconds_total",
    "skipped": "saves_skipped_total",
    "bytes_copied": "staged_bytes_total",
}


def _count_client(coord: Coordinator, client: dict[str, Any]) -> None:
    """Fold what a trainer's client measured since its last save into the store's counters."""
    counters = coord.events.metrics.counters
    for key, name in _CLIENT_COUNTERS.items():
        value = client.get(key)
        if isinstance(value, (int, float)) and value > 0:
            counters[name] += value


def abandon(coord: Coordinator, job: str, rank: int, step: int) -> dict[str, Any]:
    """An SMP reuses rank ``rank``'s slot of ``step``: that step can no longer commit."""
    js = coord.jobs.get(job)
    if js is None:
        return {"aborted": False, "record": None}
    if js.committed is not None and js.committed.step >= step:
        return {"aborted": False, "record": js.committed.to_bytes()}
    p = js.pending.get(step)
    if p is not None and p.committing:
        # Parity may be reading that slot right now; fail the commit first.
        abort(coord, js, step, f"rank {rank} reused its slot for a newer step")
        return {"aborted": True, "record": None}
    if p is not None:
        abort(coord, js, step, f"rank {rank} reused its slot for a newer step")
    return {"aborted": p is not None, "record": None}


def abort(coord: Coordinator, js: JobState, step: int, reason: str) -> None:
    """Forget a step in progress, free its slots, and tell its waiters why."""
    p = js.pending.pop(step, None)
    if p is None:
        return
    js.failed[step] = reason
    if len(js.failed) > 64:
        js.failed.pop(min(js.failed))
    coord.events.add(
        "save_failed", f"job {js.name!r} step {step} aborted: {reason}", job=js.name, step=step
    )
    for n in coord.alive():
        coord.handle(n).abort.remote(js.name, step)
    for fut in js.waiters.pop(step, []):
        if not fut.done():
            fut.set_result({"status": "failed", "reason": reason, "step": step})


def abort_pending_on(coord: Coordinator, js: JobState, node: str, reason: str) -> None:
    """Abort every step in progress that has data on ``node`` or awaits a rank living there."""
    lives_there = js.committed is not None and any(
        e.node == node for e in js.committed.ranks.values()
    )
    for step, p in list(js.pending.items()):
        if lives_there or p.committing or any(e.node == node for e in p.staged.values()):
            abort(coord, js, step, f"{reason} (node {node[:12]})")


async def commit_step(coord: Coordinator, job: str, step: int) -> None:
    js = coord.jobs[job]
    async with js.lock:
        p = js.pending.get(step)
        if p is None:
            return
        t0 = time.time()
        stats: dict[str, Any] = {"wait_ranks_seconds": round(t0 - p.started_at, 6)}
        try:
            record = await _build(coord, js, p, stats)
        except Exception as e:
            logger.warning("commit of %s step %d failed: %s", job, step, e)
            abort(coord, js, step, str(e))
            return
        if js.pending.get(step) is not p:
            return  # aborted while parity was computed
        # A step due for flushing to disk is held by the SMPs as they commit it.
        hold = coord.flusher.hold_for(js, record)
        stats["parity_seconds"] = round(time.time() - t0, 6)
        # The commit point: every SMP learns the record before anyone is told.
        t1 = time.time()
        missing = await publish(coord, record, hold)
        stats["publish_seconds"] = round(time.time() - t1, 6)
        js.pending.pop(step, None)
        for older in [s for s in js.pending if s < step]:
            abort(coord, js, older, f"step {step} committed first")
        js.committed = record
        js.commits += 1
        js.last_commit_latency = time.time() - p.started_at
        js.status, js.status_detail = (
            ("protected", "")
            if record.groups
            else (
                "unprotected",
                "fewer than k + m nodes: data has no parity",
            )
        )
        js.protected_at = time.time()
        js.unrecoverable.clear()
        js.relocated.clear()
        js.preferred_home.clear()
        js.data_ready.set()
        coord.flusher.on_commit(job)
        if hold is not None:
            coord.flusher.start(record, hold)
        coord.events.add(
            "commit",
            f"job {job!r} committed step {step} ({record.data_bytes()} data bytes, "
            f"{record.parity_bytes()} parity bytes) in {time.time() - t0:.3f} s",
            job=job,
            step=step,
            latency=round(js.last_commit_latency, 4),
            unacked=missing or None,
            **stats,
        )
        counters = coord.events.metrics.counters
        counters["committed_bytes_total"] += record.data_bytes()
        counters["parity_network_bytes_total"] += stats.get("peer_bytes", 0)
        js.committed_stats = stats
        js.resolve(step, {"status": "committed", "step": step, "stats": stats})


async def _build(coord: Coordinator, js: JobState, p: Pending, stats: dict[str, Any]) -> StepRecord:
    cfg = coord.cfg
    for r, e in p.staged.items():
        ns = coord.nodes.get(e.node)
        if ns is None or ns.status != ALIVE:
            raise RuntimeError(f"rank {r}'s node {e.node[:12]} is not alive")
    groups = tuple(coord.groups)
    if any(coord.nodes[n].status != ALIVE for g in groups for n in g):
        raise RuntimeError("a node of the stripe groups is not alive; retry the save")
    grouped = {n for g in groups for n in g}
    if groups and any(e.node not in grouped for e in p.staged.values()):
        raise RuntimeError("a rank's node is in no stripe group yet; retry the save")
    record = StepRecord(
        job=js.name,
        step=p.step,
        version=0,
        k=cfg.k,
        m=cfg.m,
        world_size=p.world_size,
        ranks=dict(p.staged),
        groups=groups,
        parity=tuple(plan_parity(p.staged, groups, cfg.k, cfg.m) if groups else ()),
    )
    base = js.committed
    deltas = p.deltas
    if (
        base is not None
        and record.parity
        and all(d is not None and d.get("base_step") == base.step for d in deltas.values())
        and len(deltas) == record.world_size
        and not js.relocated
        and same_geometry(record, base)
    ):
        orders = parity_delta_orders(record, base, deltas, coord.peers(), cfg.backend)  # type: ignore[arg-type]
        stats["delta"] = True
        stats["delta_bytes"] = sum(int(d["bytes"]) for d in deltas.values() if d)
    else:
        orders = parity_build_orders(record, coord.peers(), cfg.backend)
        stats["delta"] = False
    record = await build_parity(coord, record, PARITY_TIMEOUT, orders, stats)
    return record.replace(committed_at=time.time())


async def build_parity(
    coord: Coordinator,
    record: StepRecord,
    timeout: float,
    orders: dict[str, dict[str, Any]] | None = None,
    stats: dict[str, Any] | None = None,
) -> StepRecord:
    """Have every parity holder of ``record`` compute its chunks; return it with their sums.

    ``orders`` default to computing parity from the data members; ``stats``
    gets the bytes the holders read from other nodes (``peer_bytes``).
    """
    if orders is None:
        orders = parity_build_orders(record, coord.peers(), coord.cfg.backend)
    nodes = list(orders)
    results = await asyncio.gather(
        *(asyncio.wait_for(coord.handle(n).build_parity.remote(orders[n]), timeout) for n in nodes),
        return_exceptions=True,
    )
    failures = {
        n[:12]: r for n, r in zip(nodes, results, strict=True) if isinstance(r, BaseException)
    }
    if failures:
        first = next(iter(failures.values()))
        detail = "; ".join(f"node {n}: {describe(e)}" for n, e in failures.items())
        raise RuntimeError(f"parity failed ({detail})") from first
    sums = {n: list(r["sums"]) for n, r in zip(nodes, results, strict=True) if isinstance(r, dict)}
    if stats is not None:
        stats["peer_bytes"] = sum(
            int(r.get("peer_bytes", 0)) for r in results if isinstance(r, dict)
        )
    filled = []
    cursor: dict[str, int] = {}
    for pe in record.parity:
        i = cursor.get(pe.node, 0)
        cursor[pe.node] = i + 1
        filled.append(dataclasses.replace(pe, sum=int(sums[pe.node][i])))
    return record.replace(parity=tuple(filled))


async def publish(
    coord: Coordinator, record: StepRecord, hold: dict[str, Any] | None = None
) -> list[str]:
    """Send a record to every alive SMP; return the nodes that did not acknowledge it.

    ``hold`` (see :mod:`snapstore.control.flush`): the SMPs also hold their data
    slots of the step for a flush, atomically with committing it.
    """
    data = record.to_bytes()
    targets = coord.alive()
    acks = await asyncio.gather(
        *(
            asyncio.wait_for(coord.handle(n).commit.remote(data, hold), COMMIT_ACK_TIMEOUT)
            for n in targets
        ),
        return_exceptions=True,
    )
    return [n[:12] for n, a in zip(targets, acks, strict=True) if isinstance(a, BaseException)]


async def wait_commit(coord: Coordinator, job: str, step: int, timeout: float) -> dict[str, Any]:
    js = coord.jobs.get(job)
    if js is None:
        return {"status": "unknown", "reason": f"no job {job!r} (was the coordinator restarted?)"}
    if js.committed is not None and js.committed.step >= step:
        # A rank that asks after the commit gets the same answer (stats
        # included) as one that was already waiting.
        stats = js.committed_stats if js.committed.step == step else {}
        return {"status": "committed", "step": js.committed.step, "stats": stats}
    if step not in js.pending and step in js.failed:
        return {"status": "failed", "reason": js.failed[step], "step": step}
    if step not in js.pending:
        return {
            "status": "unknown",
            "reason": f"step {step} of job {job!r} is neither pending nor committed "
            "(was the coordinator restarted?)",
        }
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    js.waiters.setdefault(step, []).append(fut)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout)
    except asyncio.TimeoutError:
        staged = sorted(js.pending[step].staged) if step in js.pending else []
        return {"status": "pending", "staged_ranks": staged, "world_size": js.world_size}
