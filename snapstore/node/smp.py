"""The snapshot management process (SMP): one Ray actor per node, owning its memory.

An SMP owns the shared-memory segments of its node (a :class:`SlotTable`):
two slots per rank homed here (the last committed step and the next one) and
this node's parity chunks. It leases slots to trainers, checksums what they
staged, computes parity and rebuilds chunks on the coordinator's orders,
serves its bytes to peers, and heartbeats.

It never imports torch: it deals in bytes, and a restarted SMP must be back
within a heartbeat timeout or two.

Call protocol (who calls what):

1. trainer: :meth:`lease` (a slot to write; usually fetched ahead of time,
   off the training path), writes it, then :meth:`staged` (asynchronously).
2. SMP -> coordinator: ``rank_staged`` with the size, piece checksums, and
   the XOR delta against the previous step when the trainer said which
   bytes changed.
3. coordinator: :meth:`build_parity` on every parity holder of the step
   (computed from the data, or updated from the deltas).
4. coordinator: :meth:`commit` on every SMP (the record of the step); only
   then is the older step's slot free for reuse. Or :meth:`abort`.
5. restore: :meth:`open_committed` (verify and return the local slot),
   :meth:`fetch` (copy a rank's buffer from another node), :meth:`rebuild`
   (decode lost pieces or parity on the coordinator's order).
6. flush to disk (see :mod:`snapstore.control.flush`): the coordinator holds a
   committed step's data slots (with the record in :meth:`commit`, or by
   :meth:`hold`), then :meth:`persist` writes them into the step's partial
   directory and releases them; :meth:`release` ends a hold early.
   :meth:`verify_persisted` checks persisted files before a restore uses them.

Methods run on Ray's thread pool (a threaded actor); the slot table has its
own lock, and byte work runs outside it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

import numpy as np
import ray

from snapstore import persist
from snapstore.coding import checksum
from snapstore.config import StoreConfig, check_job_name
from snapstore.errors import PersistFailedError, SnapstoreError
from snapstore.format.record import StepRecord, piece_bounds
from snapstore.node.segments import data_name, delta_name, parity_name
from snapstore.node.slots import SlotTable
from snapstore.node.stripes import apply_deltas, run_order
from snapstore.node.transport import (
    ChunkUnavailableError,
    DataServer,
    PeerInfo,
    Transport,
    host_key,
)
from snapstore.persist.throttle import TokenBucket

__all__ = ["COORDINATOR_NAME", "SMP", "node_dir", "smp_name"]

logger = logging.getLogger(__name__)

COORDINATOR_NAME = "snapstore-coordinator"
# How long a lease short of memory waits for a flush to release its held slots.
LEASE_HOLD_WAIT = 60.0
DELTA_MAX_FRACTION = 0.5
"""Above this fraction of a rank's bytes changed, parity is re-encoded in full.

Updating parity from deltas costs an XOR of old and new data here, a copy of
the old parity and a read of the delta by each parity holder: about twice
the memory traffic of encoding from the data, for the same bytes. It pays
when few bytes changed (the delta crosses nodes instead of the data) and
not when most did, as after every full optimizer step."""


def smp_name(node_id: str) -> str:
    return f"snapstore-smp-{node_id}"


def node_dir(shm_dir: str, store_id: str, node_id: str) -> str:
    return os.path.join(shm_dir, f"snapstore-{store_id}", node_id[:16])


def auto_budget(nodes_on_host: int) -> int:
    """Half of this machine's RAM, shared by the store nodes on it."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * 0.5) // max(1, nodes_on_host)


def _piece_sums(seg: Any, size: int, k: int) -> list[int]:
    return [checksum(seg.view(*piece_bounds(size, k, j))) for j in range(k)]


class SMP:
    """One node's snapshot manager. See the module docstring for the call protocol."""

    def __init__(
        self,
        node_id: str,
        store_id: str,
        config: dict[str, Any],
        token: str,
        shm_dir: str,
        nodes_on_host: int = 1,
    ) -> None:
        self.cfg = StoreConfig.from_dict(config)
        self.node_id = node_id
        self.store_id = store_id
        self.incarnation = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        budget = self.cfg.memory_per_node or auto_budget(nodes_on_host)
        self.slots = SlotTable(node_dir(shm_dir, store_id, node_id), node_id, budget)
        adopted = self.slots.adopt()
        self._counters: dict[str, int] = {
            "saves": 0,
            "parity_bytes_built": 0,
            "parity_bytes_updated": 0,
            "peer_bytes_read": 0,
            "rebuilt_bytes": 0,
            "fetches": 0,
            "persisted_bytes": 0,
            "persist_throttled_seconds": 0,
        }
        self._bucket = TokenBucket(self.cfg.persist_bandwidth)
        self._faults: dict[str, Any] = {}
        address = ray.util.get_node_ip_address()
        self.transport = Transport(host_key(), token, force_tcp=self.cfg.transport == "tcp")
        self.server = DataServer(address, token, self._resolve)
        self.peer = PeerInfo(node_id, host_key(), self.slots.dir, address, self.server.port)
        self._stop = threading.Event()
        self._coordinator: Any = None
        self._beat = threading.Thread(
            target=self._heartbeat_loop, name="smp-heartbeat", daemon=True
        )
        self._beat.start()
        logger.info(
            "SMP up, %d segments re-adopted",
            adopted,
            extra={"node": node_id, "incarnation": self.incarnation},
        )

    # -- identity and stats ---------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Who and where this SMP is, and what it holds (small; sent with heartbeats)."""
        sizes = self.slots.sizes()
        return {
            "peer": self.peer.to_dict(),
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "budget": self.slots.budget,
            "used": sizes["used"],
            "data_bytes": sizes["data"],
            "parity_bytes": sizes["parity"],
            "spare_bytes": sizes["spare"] + sizes["work"] + sizes["delta"],
            "held": len(self.slots.held()),
            "counters": dict(self._counters),
        }

    def ping(self) -> str:
        return self.incarnation

    def records(self) -> dict[str, bytes]:
        """The last committed record of each job this SMP knows (for coordinator recovery)."""
        return {job: rec.to_bytes() for job, rec in self.slots.records().items()}

    # -- saving ---------------------------------------------------------------

    def lease(self, job: str, rank: int, nbytes: int) -> dict[str, Any]:
        """The slot ``rank`` writes its next step into: ``path``, ``capacity``, ``holds``.

        Never a slot holding the job's committed step. A slot holding a step
        in progress is given up only after the coordinator has aborted that
        step, so parity is never computed over bytes being overwritten.
        """
        check_job_name(job)
        return self.slots.lease(job, rank, nbytes, self._abandon, hold_wait=LEASE_HOLD_WAIT)

    def staged(
        self,
        job: str,
        rank: int,
        step: int,
        size: int,
        world_size: int,
        changed: list[list[int]] | None = None,
        base_step: int | None = None,
        client: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The trainer wrote ``size`` bytes of ``step`` into its lease: checksum and report.

        ``changed`` lists the byte ranges ``[offset, length]`` that differ
        from step ``base_step``; with them, the XOR delta of those ranges
        against this node's copy of ``base_step`` is kept, so that parity can
        be updated from the changed bytes only.
        """
        seg = self.slots.stage(job, rank, step, size)
        sums = _piece_sums(seg, size, self.cfg.k)
        delta = None
        if changed is not None and base_step is not None:
            delta = self._delta(job, rank, step, seg, size, changed, base_step)
        self._counters["saves"] += 1
        reply = ray.get(
            self._coord().rank_staged.remote(
                job, step, rank, self.node_id, size, sums, world_size, delta, client
            ),
            timeout=30,
        )
        if not reply.get("ok"):
            raise SnapstoreError(str(reply.get("error")))
        return {"sums": sums, "delta": delta is not None}

    def _delta(
        self,
        job: str,
        rank: int,
        step: int,
        seg: Any,
        size: int,
        changed: list[list[int]],
        base_step: int,
    ) -> dict[str, Any] | None:
        base = self.slots.get(data_name(job, rank, base_step))
        if base is None:
            return None
        ranges = []
        total = 0
        for off, ln in changed:
            off, ln = int(off), int(ln)
            if off < 0 or ln <= 0 or off + ln > size:
                raise SnapstoreError(f"changed range [{off}, {off + ln}) outside {size} bytes")
            ranges.append([off, ln, total])
            total += ln
        if any(off + ln > base.size for off, ln, _ in ranges):
            return None  # the buffer grew: the parity is rebuilt in full
        if total > DELTA_MAX_FRACTION * size:
            return None  # most bytes changed: encoding in full is cheaper
        name = delta_name(job, rank, step % 2)
        out = self.slots.output(job, name, max(total, 1))
        for off, ln, at in ranges:
            np.bitwise_xor(seg.view(off, ln), base.view(off, ln), out=out.view(at, ln))
        return {"file": name, "base_step": base_step, "ranges": ranges, "bytes": total}

    def build_parity(self, order: dict[str, Any]) -> dict[str, Any]:
        """Compute this node's parity chunks of a step (order from the coordinator).

        A ``delta`` order copies the previous step's parity and folds in the
        data deltas; a full order encodes from the data members.
        """
        job = str(order["job"])
        seg = self.slots.output(job, str(order["file"]), int(order["file_size"]))
        if order.get("mode") == "delta":
            base = self.slots.get(str(order["base"]))
            if base is None:
                raise SnapstoreError(f"base parity {order['base']} is gone; rebuild in full")
            n = int(order["file_size"])
            np.copyto(seg.view(0, n), base.view(0, n))
            result = apply_deltas(order, self.transport, seg.view, self.node_id)
            self._counters["parity_bytes_updated"] += result.bytes_written
        else:
            result = run_order(order, self.transport, seg.view, self.node_id)
            self._counters["parity_bytes_built"] += result.bytes_written
        self._counters["peer_bytes_read"] += result.peer_bytes
        return result.to_dict()

    def commit(self, record_bytes: bytes, hold: dict[str, Any] | None = None) -> list[int]:
        """A step is committed: keep its slots, free older ones, remember the record.

        ``hold`` (``token``, ``ttl``): the step is to be flushed to disk; hold
        its data slots here in the same breath, so that no later commit can
        reuse them before :meth:`persist` has read them. Returns the ranks held.
        """
        rec = StepRecord.from_bytes(record_bytes)
        with self.slots.lock:
            self.slots.commit(rec, record_bytes)
            if hold is None:
                return []
            return self.slots.hold(rec.job, rec.step, str(hold["token"]), float(hold["ttl"]))

    def abort(self, job: str, step: int) -> None:
        """A step will not commit: free its slots (they stay mapped as spares)."""
        self.slots.abort(job, step)

    # -- restoring ------------------------------------------------------------

    def open_committed(
        self, job: str, rank: int, step: int, size: int, sums: list[int]
    ) -> dict[str, Any]:
        """Verify this node's slot of a committed step; return its path and any bad pieces."""
        name = data_name(job, rank, step)
        seg = self.slots.get(name)
        if seg is None or seg.size < size:
            return {"path": None, "bad": list(range(len(sums))), "name": name}
        got = _piece_sums(seg, size, len(sums))
        bad = [j for j, (a, b) in enumerate(zip(got, sums, strict=True)) if a != b]
        return {"path": seg.path, "bad": bad, "name": name}

    def fetch(
        self, job: str, rank: int, step: int, size: int, sums: list[int], peer: dict[str, Any]
    ) -> dict[str, Any]:
        """Copy a rank's committed buffer from its home node here; verify it."""
        name = data_name(job, rank, step)
        src = PeerInfo.from_dict(peer)
        seg = self.slots.output(job, name, size)
        block = 16 << 20
        for off in range(0, size, block):
            self.transport.read_into(src, name, off, seg.view(off, min(block, size - off)))
        self._counters["fetches"] += 1
        got = _piece_sums(seg, size, len(sums))
        bad = [j for j, (a, b) in enumerate(zip(got, sums, strict=True)) if a != b]
        return {"path": seg.path, "bad": bad, "name": name}

    def rebuild(self, order: dict[str, Any]) -> dict[str, Any]:
        """Decode lost pieces or parity into a local segment (order from the coordinator).

        With ``pin`` set, the output is a rank's committed data relocated here
        after its home was lost: no record names this node as its home yet,
        so it is kept from reuse until a newer record of the job arrives.
        """
        job = str(order["job"])
        name = str(order["file"])
        seg = self.slots.output(job, name, int(order["file_size"]))
        if order.get("pin"):
            self.slots.pin(job, name)
        result = run_order(order, self.transport, seg.view, self.node_id)
        self._counters["rebuilt_bytes"] += result.bytes_written
        self._counters["peer_bytes_read"] += result.peer_bytes
        return result.to_dict()

    def verify(self, record_bytes: bytes) -> dict[str, Any]:
        """Check what this node holds of a record: bad pieces per rank, bad parity chunks."""
        rec = StepRecord.from_bytes(record_bytes)
        bad_pieces: dict[int, list[int]] = {}
        for r in rec.ranks_on(self.node_id):
            e = rec.ranks[r]
            res = self.open_committed(rec.job, r, rec.step, e.size, list(e.sums))
            if res["bad"]:
                bad_pieces[r] = res["bad"]
        bad_parity = []
        pseg = self.slots.get(parity_name(rec.job, rec.step, rec.version))
        for p in rec.parity_on(self.node_id):
            intact = (
                pseg is not None
                and pseg.size >= p.offset + p.length
                and checksum(pseg.view(p.offset, p.length)) == p.sum
            )
            if not intact:
                bad_parity.append([p.group, p.stripe, p.index])
        return {"bad_pieces": bad_pieces, "bad_parity": bad_parity}

    def drop_job(self, job: str) -> None:
        """Forget a job: delete its segments and record."""
        self.slots.drop_job(job)

    def forget(self, job: str) -> None:
        """The job restores from disk instead: drop its record, keep its slots as spares."""
        self.slots.forget(job)

    # -- flushing to disk -------------------------------------------------------

    def hold(self, job: str, step: int, token: str, ttl: float) -> list[int]:
        """Hold this node's data slots of a committed step for a flush; the ranks held."""
        return self.slots.hold(job, step, token, ttl)

    def release(self, token: str) -> None:
        """End a hold (the flush failed or was abandoned); the slots may be reused."""
        self.slots.release(token)

    def persist(self, order: dict[str, Any]) -> dict[str, Any]:
        """Write held ranks of a committed step into its partial directory, then release.

        ``order``: ``job``, ``step``, ``k``, ``dir`` (the partial directory),
        ``token`` (the hold), ``ranks`` ([[rank, size, sums], ...]). Each file
        is written in chunks paced by this node's token bucket, hashed as it
        is written and fsynced; a rank whose bytes do not hash to the record's
        sums is refused (memory went bad; the step must not reach disk).
        Returns per rank its ``sums``, ``bytes`` and ``seconds``.
        """
        job, step, token = str(order["job"]), int(order["step"]), str(order["token"])
        k, directory = int(order["k"]), str(order["dir"])
        out: dict[str, Any] = {}
        failures: dict[str, str] = {}
        t0 = time.monotonic()
        try:
            persist.prepare_dir(directory)
            for rank, size, sums in order["ranks"]:
                rank, size = int(rank), int(size)
                name = data_name(job, rank, step)
                seg = self.slots.get(name)
                if seg is None or seg.size < size or name not in self.slots.held():
                    failures[f"rank {rank}"] = (
                        f"slot {name} is not held on node {self.node_id[:12]} "
                        "(released, expired, or the SMP restarted)"
                    )
                    continue
                t1 = time.monotonic()
                got = persist.write_rank(
                    os.path.join(directory, persist.rank_file(rank)),
                    seg.view(0, size),
                    k,
                    self._bucket,
                    hurry=lambda: self.slots.wanted(token),
                    cancelled=lambda: self._stop.is_set() or not self.slots.holding(token),
                    after_chunk=self._fault_hook(),
                )
                if list(got) != [int(x) for x in sums]:
                    bad = [j for j, (a, b) in enumerate(zip(got, sums, strict=True)) if a != b]
                    failures[f"rank {rank}"] = (
                        f"its in-memory bytes fail the record's checksums (pieces {bad}); "
                        "not persisted (restore repairs them from parity)"
                    )
                    continue
                self._counters["persisted_bytes"] += size
                out[str(rank)] = {
                    "sums": list(got),
                    "bytes": size,
                    "seconds": round(time.monotonic() - t1, 4),
                }
        except (OSError, SnapstoreError) as e:
            failures[f"node {self.node_id[:12]}"] = f"{type(e).__name__}: {e}"
        finally:
            self.slots.release(token)
        if failures:
            raise PersistFailedError(
                f"node {self.node_id[:12]} could not persist job {job!r} step {step}", failures
            )
        return {"ranks": out, "seconds": round(time.monotonic() - t0, 4)}

    def verify_persisted(self, path: str, ranks: list[int]) -> dict[str, str | None]:
        """Check persisted rank files of a step directory; per rank None or what is wrong."""
        out: dict[str, str | None] = {}
        try:
            man = persist.read_manifest(path)
        except SnapstoreError as e:
            return {str(r): str(e) for r in ranks}
        for r in ranks:
            try:
                persist.verify_rank(path, int(r), man)
                out[str(r)] = None
            except SnapstoreError as e:
                out[str(r)] = str(e)
        return out

    def set_fault(self, name: str, value: Any) -> None:
        """Failure injection (see :mod:`snapstore.ops.faults`): ``persist_fail_after`` (bytes
        written before an I/O error), ``persist_stall_after`` ([bytes, seconds]: stop
        writing that long once that many bytes are written, or until cleared), or None
        to clear."""
        if name not in ("persist_fail_after", "persist_stall_after"):
            raise SnapstoreError(f"unknown fault {name!r}")
        if value is None:
            self._faults.pop(name, None)
        else:
            self._faults[name] = value

    def _fault_hook(self) -> Any:
        fail_after = self._faults.get("persist_fail_after")
        stall = self._faults.get("persist_stall_after")
        if fail_after is None and stall is None:
            return None

        def hook(written: int) -> None:
            if stall is not None and written >= int(stall[0]):
                end = time.monotonic() + float(stall[1])
                # Until the time is up, the SMP stops, or the fault is cleared.
                while (
                    time.monotonic() < end
                    and not self._stop.is_set()
                    and self._faults.get("persist_stall_after") is not None
                ):
                    time.sleep(0.05)
            if fail_after is not None and written >= int(fail_after):
                raise OSError(5, f"injected write failure after {written} bytes")

        return hook

    def destroy(self) -> None:
        """Delete every segment of this node and stop serving (``snapstore down``)."""
        self._stop.set()
        self.slots.destroy()
        self.server.stop()
        self.transport.close()

    # -- internals ------------------------------------------------------------

    def _resolve(self, name: str) -> np.ndarray:
        seg = self.slots.get(name)
        if seg is None:
            raise ChunkUnavailableError(f"no segment {name} on node {self.node_id[:12]}")
        return seg.array

    def _abandon(self, job: str, rank: int, step: int) -> None:
        """Tell the coordinator this rank gives up a step before its slot is reused."""
        reply = ray.get(self._coord().abandon.remote(job, rank, step), timeout=30)
        rec = reply.get("record")
        if rec:
            self.commit(rec)

    def _coord(self) -> Any:
        if self._coordinator is None:
            self._coordinator = ray.get_actor(COORDINATOR_NAME, namespace=self.cfg.namespace)
        return self._coordinator

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat_interval):
            try:
                ray.get(
                    self._coord().heartbeat.remote(self.node_id, self.incarnation, self.info()),
                    timeout=max(1.0, self.cfg.failure_timeout),
                )
            except Exception as e:  # the coordinator may be restarting: look it up again
                logger.debug("heartbeat failed: %s", e)
                self._coordinator = None
