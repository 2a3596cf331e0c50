"""One node's store in shared memory: the real :class:`snapstore.node.api.NodeStore`.

It owns the node's segments (a :class:`SlotTable`): two slots per rank homed
here (the last committed step and the next one) and this node's parity
chunks. It checksums what trainers staged, keeps XOR deltas, computes parity
and rebuilds chunks on orders (:mod:`snapstore.node.stripes`), serves its
bytes to peers (shared memory on one host, a token-checked TCP data server
otherwise), and writes rank files for the persisted tier.

No Ray, no torch: it deals in bytes. The SMP actor
(:mod:`snapstore.control.smp`) holds one and calls it from a thread pool;
every method is thread-safe (the slot table has its own lock; byte work
runs outside it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection
from typing import Any

import numpy as np

from snapstore import persist
from snapstore.coding import checksum, checksums
from snapstore.config import StoreConfig, check_job_name
from snapstore.errors import PersistFailedError, SnapstoreError
from snapstore.format.record import StepRecord, piece_bounds
from snapstore.format.work import (
    CommitResult,
    Delta,
    Lease,
    Opened,
    PeerInfo,
    PersistOrder,
    PersistResult,
    RankStaged,
    RankWritten,
    VerifyReport,
    WorkKind,
    WorkOrder,
    WorkResult,
)
from snapstore.node.segments import Segment, data_name, delta_name, parity_name
from snapstore.node.slots import SlotTable
from snapstore.node.stripes import apply_deltas, run_order
from snapstore.node.transport import ChunkUnavailableError, DataServer, Transport, host_key
from snapstore.persist.throttle import TokenBucket

__all__ = [
    "COORDINATOR_NAME",
    "DELTA_MAX_FRACTION",
    "ShmNodeStore",
    "auto_budget",
    "node_dir",
    "smp_name",
]

logger = logging.getLogger(__name__)

COORDINATOR_NAME = "snapstore-coordinator"
LEASE_HOLD_WAIT = 60.0
"""How long a lease short of memory waits for a flush to release its held slots."""
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


def _piece_sums(seg: Segment, size: int, k: int) -> tuple[int, ...]:
    """The k piece checksums of a slot, the pieces hashed in parallel (each is a stream
    of its own): on the path of every save, between the trainer's copy and its notice."""
    return checksums([seg.view(*piece_bounds(size, k, j)) for j in range(k)])


class ShmNodeStore:
    """One node's segments and byte work in shared memory (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        directory: str,
        cfg: StoreConfig,
        token: str,
        address: str,
        budget: int,
        serve: bool = True,
        control_port: int = 0,
    ) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.slots = SlotTable(directory, node_id, budget)
        self.adopted = self.slots.adopt()
        self._counters: dict[str, int] = {
            "saves": 0,
            "parity_bytes_built": 0,
            "parity_bytes_updated": 0,
            "peer_bytes_read": 0,
            "rebuilt_bytes": 0,
            "fetches": 0,
            "persisted_bytes": 0,
        }
        self._bucket = TokenBucket(cfg.persist_bandwidth)
        self._faults: dict[str, Any] = {}
        self._stop = threading.Event()
        self.transport = Transport(host_key(), token, force_tcp=cfg.transport == "tcp")
        # serve=False (the simulation, tests on one host): peers read shared memory only.
        self.server = DataServer(address, token, self._resolve) if serve else None
        port = self.server.port if self.server is not None else 0
        self.peer = PeerInfo(node_id, host_key(), self.slots.dir, address, port, control_port)

    # -- what it holds ------------------------------------------------------------------

    def sizes(self) -> dict[str, int]:
        out = dict(self.slots.sizes())
        out["budget"] = self.slots.budget
        out["held"] = len(self.slots.held())
        return out

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def record(self, job: str) -> StepRecord | None:
        return self.slots.record(job)

    def records(self) -> dict[str, StepRecord]:
        return self.slots.records()

    def prepared(self) -> list[StepRecord]:
        return self.slots.prepared()

    # -- saving -------------------------------------------------------------------------

    def abandon_candidates(self, job: str, rank: int) -> list[int]:
        return self.slots.abandon_candidates(job, rank)

    def lease(self, job: str, rank: int, nbytes: int, abandoned: Collection[int]) -> Lease:
        check_job_name(job)
        got = self.slots.lease(job, rank, nbytes, abandoned, hold_wait=LEASE_HOLD_WAIT)
        return Lease(str(got["path"]), int(got["capacity"]), got.get("holds"))

    def stage(
        self,
        job: str,
        rank: int,
        step: int,
        size: int,
        changed: list[list[int]] | None,
        base_step: int | None,
    ) -> RankStaged:
        """The trainer wrote ``size`` bytes of ``step`` into its lease: checksum and keep
        the XOR delta of ``changed`` ranges ``[offset, length]`` against ``base_step``."""
        seg = self.slots.stage(job, rank, step, size)
        sums = _piece_sums(seg, size, self.cfg.k)
        delta = None
        if changed is not None and base_step is not None:
            delta = self._delta(job, rank, step, seg, size, changed, base_step)
        self._counters["saves"] += 1
        return RankStaged(rank, size, sums, delta)

    def _delta(
        self,
        job: str,
        rank: int,
        step: int,
        seg: Segment,
        size: int,
        changed: list[list[int]],
        base_step: int,
    ) -> Delta | None:
        base = self.slots.get(data_name(job, rank, base_step))
        if base is None:
            return None
        ranges = []
        total = 0
        for off, ln in changed:
            off, ln = int(off), int(ln)
            if off < 0 or ln <= 0 or off + ln > size:
                raise SnapstoreError(f"changed range [{off}, {off + ln}) outside {size} bytes")
            ranges.append((off, ln, total))
            total += ln
        if any(off + ln > base.size for off, ln, _ in ranges):
            return None  # the buffer grew: the parity is rebuilt in full
        if total > DELTA_MAX_FRACTION * size:
            return None  # most bytes changed: encoding in full is cheaper
        name = delta_name(job, rank, step % 2)
        out = self.slots.output(job, name, max(total, 1))
        for off, ln, at in ranges:
            np.bitwise_xor(seg.view(off, ln), base.view(off, ln), out=out.view(at, ln))
        return Delta(name, base_step, tuple(ranges), total)

    def build_parity(self, order: WorkOrder) -> WorkResult:
        """This node's parity chunks of a step: encoded, or updated from deltas."""
        seg = self.slots.output(order.job, order.file, order.file_size)
        if order.kind is WorkKind.PARITY_DELTA:
            base = self.slots.get(order.base)
            if base is None:
                raise SnapstoreError(f"base parity {order.base} is gone; rebuild in full")
            n = order.file_size
            np.copyto(seg.view(0, n), base.view(0, n))
            result = apply_deltas(order, self.transport, seg.view, self.node_id)
            self._counters["parity_bytes_updated"] += result.bytes_written
        else:
            result = run_order(order, self.transport, seg.view, self.node_id)
            self._counters["parity_bytes_built"] += result.bytes_written
        self._counters["peer_bytes_read"] += result.peer_bytes
        return result

    def keep_prepared(self, record: StepRecord) -> None:
        self.slots.keep_prepared(record)

    def commit(self, job: str, step: int, version: int, hold: str, hold_ttl: float) -> CommitResult:
        with self.slots.lock:
            ok, missing, why = self.slots.commit_prepared(job, step, version)
            held: list[int] = []
            if ok and hold:
                rec = self.slots.record(job)
                if rec is not None and rec.step == step:
                    held = self.slots.hold(job, step, hold, hold_ttl)
        if not ok:
            logger.warning(
                "refused the commit of %s step %d: %s", job, step, why, extra={"job": job}
            )
        return CommitResult(ok, tuple(missing), tuple(held), why)

    def abort(self, job: str, step: int, ranks: Collection[int] | None) -> None:
        self.slots.abort(job, step, ranks)

    # -- restoring ----------------------------------------------------------------------

    def open_committed(
        self, job: str, rank: int, step: int, size: int, sums: tuple[int, ...]
    ) -> Opened:
        """Verify this node's slot of a committed step; its path and any bad pieces."""
        name = data_name(job, rank, step)
        seg = self.slots.get(name)
        if seg is None or seg.size < size:
            return Opened(None, tuple(range(len(sums))), name)
        got = _piece_sums(seg, size, len(sums))
        bad = tuple(j for j, (a, b) in enumerate(zip(got, sums, strict=True)) if a != b)
        return Opened(seg.path, bad, name)

    def fetch(
        self, job: str, rank: int, step: int, size: int, sums: tuple[int, ...], peer: PeerInfo
    ) -> Opened:
        """Copy a rank's committed buffer from its home node here; verify it."""
        name = data_name(job, rank, step)
        seg = self.slots.output(job, name, size)
        block = 16 << 20
        for off in range(0, size, block):
            self.transport.read_into(peer, name, off, seg.view(off, min(block, size - off)))
        self._counters["fetches"] += 1
        got = _piece_sums(seg, size, len(sums))
        bad = tuple(j for j, (a, b) in enumerate(zip(got, sums, strict=True)) if a != b)
        return Opened(seg.path, bad, name)

    def rebuild(self, order: WorkOrder) -> WorkResult:
        """Decode lost pieces or parity into a local segment.

        With ``pin``, the output is a rank's committed data relocated here
        after its home was lost: no record homes it here yet, so it is kept
        from reuse until a newer record of the job arrives.
        """
        seg = self.slots.output(order.job, order.file, order.file_size)
        if order.pin:
            self.slots.pin(order.job, order.file)
        result = run_order(order, self.transport, seg.view, self.node_id)
        self._counters["rebuilt_bytes"] += result.bytes_written
        self._counters["peer_bytes_read"] += result.peer_bytes
        return result

    def verify(self, record: StepRecord) -> VerifyReport:
        """What this node holds of a record that fails its checksums."""
        bad_pieces: dict[int, tuple[int, ...]] = {}
        for r in record.ranks_on(self.node_id):
            e = record.ranks[r]
            res = self.open_committed(record.job, r, record.step, e.size, tuple(e.sums))
            if res.bad:
                bad_pieces[r] = res.bad
        bad_parity = []
        pseg = self.slots.get(parity_name(record.job, record.step, record.version))
        for p in record.parity_on(self.node_id):
            intact = (
                pseg is not None
                and pseg.size >= p.offset + p.length
                and checksum(pseg.view(p.offset, p.length)) == p.sum
            )
            if not intact:
                bad_parity.append((p.group, p.stripe, p.index))
        return VerifyReport(bad_pieces, tuple(bad_parity))

    def forget(self, job: str) -> None:
        """The job restores from disk instead: drop its record, keep its slots as spares."""
        self.slots.forget(job)

    def drop_job(self, job: str) -> None:
        """Forget a job: delete its segments and records."""
        self.slots.drop_job(job)

    # -- the persisted tier -------------------------------------------------------------

    def hold(self, job: str, step: int, token: str, ttl: float) -> list[int]:
        """Hold this node's data slots of a committed step for a flush; the ranks held."""
        return self.slots.hold(job, step, token, ttl)

    def release(self, token: str) -> None:
        self.slots.release(token)

    def persist(self, order: PersistOrder) -> PersistResult:
        """Write held ranks of a committed step into its partial directory, then release.

        Each file is written in chunks paced by this node's token bucket,
        hashed as it is written and fsynced; a rank whose bytes do not hash to
        the record's sums is refused (memory went bad; the step must not reach
        disk).
        """
        out: dict[int, RankWritten] = {}
        failures: dict[str, str] = {}
        t0 = time.monotonic()
        try:
            persist.prepare_dir(order.dir)
            for rank, size, sums in order.ranks:
                name = data_name(order.job, rank, order.step)
                seg = self.slots.get(name)
                if seg is None or seg.size < size or name not in self.slots.held():
                    failures[f"rank {rank}"] = (
                        f"slot {name} is not held on node {self.node_id[:12]} "
                        "(released, expired, or the SMP restarted)"
                    )
                    continue
                t1 = time.monotonic()
                got = persist.write_rank(
                    os.path.join(order.dir, persist.rank_file(rank)),
                    seg.view(0, size),
                    order.k,
                    self._bucket,
                    hurry=lambda: self.slots.wanted(order.token),
                    cancelled=lambda: self._stop.is_set() or not self.slots.holding(order.token),
                    after_chunk=self._fault_hook(),
                )
                if tuple(got) != tuple(sums):
                    bad = [j for j, (a, b) in enumerate(zip(got, sums, strict=True)) if a != b]
                    failures[f"rank {rank}"] = (
                        f"its in-memory bytes fail the record's checksums (pieces {bad}); "
                        "not persisted (restore repairs them from parity)"
                    )
                    continue
                self._counters["persisted_bytes"] += size
                out[rank] = RankWritten(tuple(got), size, round(time.monotonic() - t1, 4))
        except (OSError, SnapstoreError) as e:
            failures[f"node {self.node_id[:12]}"] = f"{type(e).__name__}: {e}"
        finally:
            self.slots.release(order.token)
        if failures:
            raise PersistFailedError(
                f"node {self.node_id[:12]} could not persist job {order.job!r} step {order.step}",
                failures,
            )
        return PersistResult(out, round(time.monotonic() - t0, 4))

    def verify_persisted(self, path: str, ranks: list[int]) -> dict[int, str | None]:
        """Check persisted rank files of a step directory; per rank None or what is wrong."""
        out: dict[int, str | None] = {}
        try:
            man = persist.read_manifest(path)
        except SnapstoreError as e:
            return {int(r): str(e) for r in ranks}
        for r in ranks:
            try:
                persist.verify_rank(path, int(r), man)
                out[int(r)] = None
            except SnapstoreError as e:
                out[int(r)] = str(e)
        return out

    # -- failure injection and shutdown ---------------------------------------------------

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
        if self.server is not None:
            self.server.stop()
        self.transport.close()
        self.slots.destroy()

    def close(self) -> None:
        """Stop serving; keep the segments (a restarted SMP re-adopts them)."""
        self._stop.set()
        if self.server is not None:
            self.server.stop()
        self.transport.close()
        self.slots.close()

    def _resolve(self, name: str) -> np.ndarray:
        seg = self.slots.get(name)
        if seg is None:
            raise ChunkUnavailableError(f"no segment {name} on node {self.node_id[:12]}")
        return seg.array
