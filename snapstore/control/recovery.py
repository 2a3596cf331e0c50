"""After failures: restore plans, repairs, re-protection and coordinator recovery.

Restore paths, fastest first (see docs/architecture.md):

1. The rank's home node is alive: the trainer's node reads the home slot
   (in place when it is the same node), every piece's checksum verified.
2. A piece fails its checksum, or the home's SMP restarted without its
   segments: the pieces are rebuilt in place from the stripe group
   (:func:`repair`, :func:`reconcile_node`).
3. The home node is silent or lost: the rank's pieces are decoded from k
   surviving chunks of each stripe onto the node the restarted trainer runs
   on (or a fresh node), and the step's parity is later recomputed over the
   new groups (:func:`reprotect`), so that a further failure is survivable.
4. More than m chunks of a stripe are lost: UnrecoverableError naming them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from snapstore.control import fallback
from snapstore.control.commit import abort, build_parity, publish
from snapstore.control.orders import parity_rebuild_orders, rank_rebuild_orders
from snapstore.control.placement import plan_parity
from snapstore.control.state import ALIVE, JobState, NodeState, rank_restorable
from snapstore.errors import UnrecoverableError
from snapstore.format.record import RankEntry, StepRecord
from snapstore.node.smp import smp_name
from snapstore.rpc import describe, root_cause

if TYPE_CHECKING:
    from snapstore.control.coordinator import Coordinator

__all__ = ["reconcile_node", "recover_from_smps", "repair", "reprotect", "restore_plan"]

logger = logging.getLogger(__name__)

REBUILD_TIMEOUT = 300.0


def _error(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": kind, "message": message, **extra}


def _lost_of(e: BaseException) -> list[str]:
    root = root_cause(e)
    if isinstance(root, UnrecoverableError):
        return list(root.lost)
    return [describe(root)]


# -- restore ------------------------------------------------------------------


async def restore_plan(
    coord: Coordinator, job: str, rank: int, node: str, timeout: float, restarted: bool = True
) -> dict[str, Any]:
    """Where rank ``rank`` of ``job`` should read its last committed step from.

    ``restarted``: the rank itself is restoring (not a peer reading its
    buffer, as data-parallel restores do), so steps it staged before are
    from a dead attempt and are aborted.
    """
    deadline = time.monotonic() + timeout
    js = coord.jobs.get(job)
    if js is not None and restarted:
        # This rank restarted: whatever it staged before is from a dead attempt.
        for step, p in list(js.pending.items()):
            if rank in p.staged:
                abort(coord, js, step, f"rank {rank} restarted and restored instead")
        # The job restarts from its committed step: failed steps may be saved again.
        js.failed.clear()
    while True:
        js = coord.jobs.get(job)
        if js is None or js.committed is None:
            return _error("not_found", f"job {job!r} has no committed step")
        rec = js.committed
        if rank not in rec.ranks:
            return _error(
                "not_found", f"job {job!r} has no rank {rank} (world size {rec.world_size})"
            )
        if rank in js.unrecoverable:
            return _error(
                "unrecoverable",
                f"rank {rank} of job {job!r} step {rec.step} cannot be rebuilt",
                lost=js.unrecoverable[rank],
            )
        if fallback.must_fall_back(coord, js):
            # Some rank cannot be rebuilt: all ranks must restore one step, from disk.
            bad = fallback.unservable_ranks(coord, js)
            return _error(
                "unrecoverable",
                f"job {job!r} step {rec.step}: ranks {bad} can be neither read nor rebuilt "
                "from memory; the job restores from its persisted step",
                lost=[f"node {n[:12]} (lost)" for n in sorted(rec.nodes() - set(coord.alive()))],
                fallback=True,
            )
        entry = rec.ranks[rank]
        where = js.relocated.get(rank, entry.node)
        home = coord.nodes.get(where)
        if home is not None and home.status == ALIVE:
            return {
                "ok": True,
                "step": rec.step,
                "version": rec.version,
                "size": entry.size,
                "sums": list(entry.sums),
                "home": where,
                "home_peer": home.info["peer"],
                "local": where == node,
            }
        alive = set(coord.alive())
        if not rank_restorable(rec, rank, alive):
            return _error(
                "unrecoverable",
                f"rank {rank} of job {job!r} step {rec.step}: more than m={rec.m} chunks "
                "of one of its stripes are on lost nodes",
                lost=[f"node {n[:12]} (lost)" for n in sorted(rec.nodes() - alive)],
            )
        # The home is silent or lost: rebuild onto the asking node, now.
        js.preferred_home.setdefault(rank, node)
        js.data_ready.clear()
        coord.spawn(reprotect(coord, job))
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(js.data_ready.wait(), max(0.0, remaining))
        except asyncio.TimeoutError:
            return _error("timeout", f"rank {rank}'s data was not rebuilt within {timeout} s")


async def repair(
    coord: Coordinator, job: str, rank: int, step: int, bad: list[int]
) -> dict[str, Any]:
    """Rebuild pieces of a rank that failed their checksum, in place where it lives."""
    js = coord.jobs.get(job)
    if js is None or js.committed is None or js.committed.step != step:
        return _error("stale", f"step {step} of job {job!r} is no longer the committed one")
    async with js.lock:
        rec = js.committed
        if rec is None or rec.step != step:
            return _error("stale", f"step {step} of job {job!r} is no longer the committed one")
        where = js.relocated.get(rank, rec.ranks[rank].node)
        if where not in coord.alive():
            return _error("stale", f"rank {rank}'s node {where[:12]} is not alive")
        order = rank_rebuild_orders(
            rec, rank, where, coord.peers(), coord.alive(), coord.cfg.backend, pieces=bad
        )
        try:
            res = await asyncio.wait_for(coord.handle(where).rebuild.remote(order), REBUILD_TIMEOUT)
        except Exception as e:
            coord.events.add(
                "error", f"repair of job {job!r} rank {rank} failed: {root_cause(e)}", job=job
            )
            if isinstance(root_cause(e), UnrecoverableError):
                # Memory cannot serve this rank's step (the job may fall back to disk).
                js.unrecoverable[rank] = _lost_of(e)
            return _error("unrecoverable", str(root_cause(e)), lost=_lost_of(e))
        coord.events.add(
            "repaired",
            f"job {job!r} rank {rank} step {step}: pieces {bad} failed their checksum "
            "and were rebuilt from the group",
            job=job,
            rank=rank,
            bytes=res["bytes_written"],
            bad_sources=res["bad_sources"] or None,
        )
        return {"ok": True, "bytes": res["bytes_written"]}


# -- re-protection --------------------------------------------------------------


def _choose_home(coord: Coordinator, js: JobState, rec: StepRecord, rank: int) -> str | None:
    alive = coord.alive()
    if not alive:
        return None
    pref = js.preferred_home.get(rank)
    if pref in alive:
        return pref
    load = dict.fromkeys(alive, 0)
    for r, e in rec.ranks.items():
        home = js.relocated.get(r, e.node)
        if home in load:
            load[home] += e.size
    # Fresh nodes (replacements) first: the restarted trainer likely runs there.
    holders = {e.node for e in rec.ranks.values()} | {p.node for p in rec.parity}
    fresh = [n for n in alive if n not in holders]
    return min(fresh or alive, key=lambda n: (load[n], coord.nodes[n].joined_at))


async def reprotect(coord: Coordinator, job: str) -> None:
    """Make a job's committed step whole again after node losses, in two phases.

    1. Relocate: rebuild every rank homed on a node that is not alive onto an
       alive node (decoding from its stripes); restores read it from there at
       once. The record is unchanged: its parity still describes the old
       homes, and is what the rebuild reads.
    2. Re-protect: once the current stripe groups consist of alive nodes,
       recompute the step's parity over them with the new homes and commit
       that as a new version of the record.
    """
    js = coord.jobs.get(job)
    if js is None:
        return
    async with js.lock:
        rec = js.committed
        if rec is None:
            return
        alive = set(coord.alive())
        for step in list(js.pending):
            p = js.pending[step]
            if any(e.node not in alive for e in p.staged.values()):
                abort(coord, js, step, "a node holding its data was lost")
        await _relocate(coord, js, rec, alive)
        js.data_ready.set()
        if js.unrecoverable:
            return
        groups = tuple(coord.groups)
        homes = {r: js.relocated.get(r, e.node) for r, e in rec.ranks.items()}
        intact = (
            not js.relocated
            and groups == rec.groups
            and all(n in alive for n in homes.values())
            and all(p.node in alive for p in rec.parity)
        )
        if intact:
            if rec.groups:
                js.status, js.status_detail = "protected", ""
            return
        if not groups or any(n not in alive for g in groups for n in g):
            js.status = "degraded" if rec.groups else "unprotected"
            js.status_detail = (
                f"{len(alive)} nodes alive; waiting for k + m = {rec.k + rec.m} to re-protect"
            )
            return
        await _reprotect_parity(coord, js, rec, homes, groups)


async def _relocate(coord: Coordinator, js: JobState, rec: StepRecord, alive: set[str]) -> None:
    lost = [
        r
        for r, e in rec.ranks.items()
        if js.relocated.get(r, e.node) not in alive and r not in js.unrecoverable
    ]
    if not lost:
        return
    t0 = time.time()
    plan: list[tuple[int, str]] = []
    coros = []
    for r in lost:
        target = _choose_home(coord, js, rec, r)
        if target is None:
            js.unrecoverable[r] = ["no alive node to rebuild onto"]
            continue
        order = rank_rebuild_orders(rec, r, target, coord.peers(), alive, coord.cfg.backend)
        order["pin"] = True
        plan.append((r, target))
        coros.append(asyncio.wait_for(coord.handle(target).rebuild.remote(order), REBUILD_TIMEOUT))
    results = await asyncio.gather(*coros, return_exceptions=True)
    rebuilt = 0
    retry = False
    for (r, target), res in zip(plan, results, strict=True):
        if isinstance(res, BaseException):
            if isinstance(root_cause(res), UnrecoverableError):
                home = rec.ranks[r].node
                js.unrecoverable[r] = [
                    f"rank {r}'s home node {home[:12]} is lost",
                    *_lost_of(res),
                ]
            else:
                # The target failed (it may have died unnoticed yet): try again.
                retry = True
                coord.events.add(
                    "error",
                    f"job {js.name!r}: rebuilding rank {r} on node {target[:12]} failed "
                    f"({_lost_of(res)[0]}); retrying",
                    job=js.name,
                )
        else:
            js.relocated[r] = target
            js.preferred_home.pop(r, None)
            rebuilt += int(res["bytes_written"])
    if retry:
        coord.spawn(_later(coord, js.name, 1.0))
    done = sorted(r for r, _ in plan if r in js.relocated)
    if done:
        coord.events.add(
            "rebuild",
            f"job {js.name!r} step {rec.step}: rebuilt ranks {done} from parity "
            f"({rebuilt} bytes) in {time.time() - t0:.3f} s",
            job=js.name,
            step=rec.step,
            bytes=rebuilt,
            duration=round(time.time() - t0, 4),
            targets={str(r): t for r, t in plan if r in js.relocated},
        )
    if js.unrecoverable:
        js.status = "lost"
        js.status_detail = f"ranks {sorted(js.unrecoverable)} cannot be rebuilt"
        coord.events.add(
            "unrecoverable",
            f"job {js.name!r} step {rec.step}: ranks {sorted(js.unrecoverable)} lost more "
            "than m chunks of a stripe",
            job=js.name,
            lost={str(r): v for r, v in js.unrecoverable.items()},
        )


async def _later(coord: Coordinator, job: str, delay: float) -> None:
    await asyncio.sleep(delay)
    await reprotect(coord, job)


async def _reprotect_parity(
    coord: Coordinator,
    js: JobState,
    rec: StepRecord,
    homes: dict[int, str],
    groups: tuple[tuple[str, ...], ...],
) -> None:
    t0 = time.time()
    ranks = {r: RankEntry(homes[r], e.size, e.sums) for r, e in rec.ranks.items()}
    new = StepRecord(
        job=rec.job,
        step=rec.step,
        version=rec.version + 1,
        k=rec.k,
        m=rec.m,
        world_size=rec.world_size,
        ranks=ranks,
        groups=groups,
        parity=tuple(plan_parity(ranks, groups, rec.k, rec.m)),
        committed_at=rec.committed_at,
    )
    try:
        new = await build_parity(coord, new, REBUILD_TIMEOUT)
    except Exception as e:
        js.status, js.status_detail = "degraded", f"re-protection failed: {root_cause(e)}"
        coord.events.add("error", f"job {js.name!r}: {js.status_detail}", job=js.name)
        return
    await publish(coord, new)
    js.committed = new
    js.relocated.clear()
    js.status, js.status_detail = "protected", ""
    js.protected_at = time.time()
    coord.events.add(
        "reprotected",
        f"job {js.name!r} step {rec.step} protected again (version {new.version}, groups "
        f"{[[n[:8] for n in g] for g in groups]}) in {time.time() - t0:.3f} s",
        job=js.name,
        step=rec.step,
        duration=round(time.time() - t0, 4),
    )


# -- a restarted SMP ------------------------------------------------------------


async def reconcile_node(coord: Coordinator, node: str) -> None:
    """An SMP restarted on its node: re-adopt what verifies, rebuild the rest in place."""
    for job in list(coord.jobs):
        js = coord.jobs[job]
        async with js.lock:
            rec = js.committed
            if rec is None or node not in rec.nodes():
                continue
            t0 = time.time()
            try:
                report = await asyncio.wait_for(
                    coord.handle(node).verify.remote(rec.to_bytes()), REBUILD_TIMEOUT
                )
            except Exception as e:
                coord.events.add(
                    "error", f"cannot verify node {node[:12]}: {root_cause(e)}", node=node
                )
                continue
            bad_pieces = {int(r): v for r, v in report["bad_pieces"].items()}
            if not bad_pieces and not report["bad_parity"]:
                coord.events.add(
                    "readopted",
                    f"restarted SMP on node {node[:12]} kept job {job!r} step {rec.step} intact",
                    node=node,
                    job=job,
                )
                continue
            alive = coord.alive()
            peers = coord.peers()
            orders = [
                rank_rebuild_orders(rec, r, node, peers, alive, coord.cfg.backend, pieces=bad)
                for r, bad in bad_pieces.items()
                if js.relocated.get(r, rec.ranks[r].node) == node
            ]
            if report["bad_parity"]:
                po = parity_rebuild_orders(rec, node, peers, alive, coord.cfg.backend)
                if po is not None:
                    orders.append(po)
            total = 0
            try:
                for order in orders:
                    res = await asyncio.wait_for(
                        coord.handle(node).rebuild.remote(order), REBUILD_TIMEOUT
                    )
                    total += int(res["bytes_written"])
            except Exception as e:
                js.status, js.status_detail = "degraded", f"rebuild on {node[:12]} failed"
                coord.events.add(
                    "error",
                    f"rebuild of node {node[:12]} for job {job!r} failed: {root_cause(e)}",
                    node=node,
                    job=job,
                    lost=_lost_of(e),
                )
                continue
            coord.events.add(
                "rebuild",
                f"restarted SMP on node {node[:12]}: rebuilt {total} bytes of job {job!r} "
                f"step {rec.step} from the group in {time.time() - t0:.3f} s",
                node=node,
                job=job,
                bytes=total,
                duration=round(time.time() - t0, 4),
            )


# -- a restarted coordinator ----------------------------------------------------


async def recover_from_smps(coord: Coordinator) -> None:
    """At coordinator start: find running SMPs and rebuild jobs from their records.

    For each job the newest (step, version) any SMP holds wins: a record
    reaches SMPs only after all its data and parity were stored, so a newer
    record that some SMPs have is complete even if the old coordinator died
    before telling the others.
    """
    import ray

    loop = asyncio.get_running_loop()
    named = await loop.run_in_executor(
        None, lambda: ray.util.list_named_actors(all_namespaces=True)
    )
    prefix = smp_name("")
    found = [
        str(n["name"])
        for n in named
        if isinstance(n, dict)
        and n.get("namespace") == coord.cfg.namespace
        and str(n.get("name", "")).startswith(prefix)
    ]
    if not found:
        return
    best: dict[str, StepRecord] = {}
    for name in found:
        node = name[len(prefix) :]
        try:
            handle = await loop.run_in_executor(
                None, functools.partial(ray.get_actor, name, namespace=coord.cfg.namespace)
            )
            info = await asyncio.wait_for(handle.info.remote(), 5)
            records = await asyncio.wait_for(handle.records.remote(), 5)
        except Exception as e:
            logger.info("SMP %s not reachable during recovery: %s", name, e)
            continue
        coord.nodes[node] = NodeState(node, info, info["incarnation"], handle)
        for job, data in records.items():
            rec = StepRecord.from_bytes(data)
            cur = best.get(job)
            if cur is None or (rec.step, rec.version) > (cur.step, cur.version):
                best[job] = rec
    for job, rec in best.items():
        js = coord.jobs[job] = JobState(job, rec.world_size)
        js.committed = rec
        js.status = "protected" if rec.groups else "unprotected"
        js.data_ready.set()
    newest = max(best.values(), key=lambda r: r.committed_at, default=None)
    if newest is not None and newest.groups:
        coord.groups = [tuple(g) for g in newest.groups]
    coord.regroup(reason="coordinator restarted")
    coord.events.add(
        "coordinator_recovered",
        f"coordinator rebuilt its state from {len(coord.nodes)} SMPs: "
        f"{ {j: r.step for j, r in best.items()} }",
    )
