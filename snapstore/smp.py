"""The snapshot management process (SMP): one Ray actor per node, owning its memory.

An SMP owns the shared-memory segments of its node (see
:mod:`snapstore.segments`): two slots per rank homed here (the last committed
step and the one in progress) and this node's parity chunks. It hands slots
to trainers, checksums what they staged, computes parity and rebuilds chunks
on the coordinator's orders, serves its bytes to peers, and heartbeats.

It never imports torch: it deals in bytes, and a restarted SMP must be back
within a heartbeat timeout or two.

Call protocol (who calls what):

1. trainer: :meth:`prepare` (a slot for a step), writes it, :meth:`staged`.
2. SMP -> coordinator: ``rank_staged`` with the size and piece checksums.
3. coordinator: :meth:`build_parity` on every parity holder of the step.
4. coordinator: :meth:`commit` on every SMP (the record of the step); only
   then is the older step's slot free for reuse. Or :meth:`abort`.
5. restore: :meth:`open_committed` (verify and return the local slot),
   :meth:`fetch` (copy a rank's buffer from another node), :meth:`rebuild`
   (decode lost pieces or parity on the coordinator's order).

Methods run on Ray's thread pool (a threaded actor); one lock guards the
segment table, and byte work runs outside it where it can.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from typing import Any

import numpy as np
import ray

from coding import checksum
from snapstore.config import StoreConfig, check_job_name
from snapstore.errors import MemoryBudgetError, SnapstoreError
from snapstore.record import StepRecord, piece_bounds
from snapstore.segments import (
    Segment,
    data_name,
    iter_dir,
    parity_name,
    parse_name,
    record_name,
    spare_name,
)
from snapstore.stripes import run_order
from snapstore.transport import ChunkUnavailableError, DataServer, PeerInfo, Transport, host_key

__all__ = ["SMP", "node_dir", "smp_name"]

logger = logging.getLogger(__name__)

COORDINATOR_NAME = "snapstore-coordinator"


def smp_name(node_id: str) -> str:
    return f"snapstore-smp-{node_id}"


def node_dir(shm_dir: str, store_id: str, node_id: str) -> str:
    return os.path.join(shm_dir, f"snapstore-{store_id}", node_id[:16])


def auto_budget(nodes_on_host: int) -> int:
    """Half of this machine's RAM, shared by the store nodes on it."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * 0.5) // max(1, nodes_on_host)


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
        self.dir = node_dir(shm_dir, store_id, node_id)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.incarnation = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.budget = self.cfg.memory_per_node or auto_budget(nodes_on_host)
        self._lock = threading.RLock()
        self._segments: dict[str, Segment] = {}
        self._records: dict[str, StepRecord] = {}
        self._pinned: dict[str, str] = {}  # segment name -> job (see rebuild)
        self._spare_seq = 0
        self._counters = {"saves": 0, "parity_bytes_built": 0, "rebuilt_bytes": 0, "fetches": 0}
        self._adopt()
        address = ray.util.get_node_ip_address()
        self.transport = Transport(host_key(), token, force_tcp=self.cfg.transport == "tcp")
        self.server = DataServer(address, token, self._resolve)
        self.peer = PeerInfo(node_id, host_key(), self.dir, address, self.server.port)
        self._stop = threading.Event()
        self._coordinator: Any = None
        self._beat = threading.Thread(
            target=self._heartbeat_loop, name="smp-heartbeat", daemon=True
        )
        self._beat.start()
        logger.info("SMP up", extra={"node": node_id, "incarnation": self.incarnation})

    # -- identity and stats ---------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Who and where this SMP is, and what it holds (small; sent with heartbeats)."""
        with self._lock:
            used = sum(s.size for s in self._segments.values())
            data = sum(s.size for n, s in self._segments.items() if n.startswith("d."))
            parity = sum(s.size for n, s in self._segments.items() if n.startswith("p."))
            spare = sum(s.size for n, s in self._segments.items() if n.startswith("x."))
        return {
            "peer": self.peer.to_dict(),
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "budget": self.budget,
            "used": used,
            "data_bytes": data,
            "parity_bytes": parity,
            "spare_bytes": spare,
            "counters": dict(self._counters),
        }

    def ping(self) -> str:
        return self.incarnation

    def records(self) -> dict[str, bytes]:
        """The last committed record of each job this SMP knows (for coordinator recovery)."""
        with self._lock:
            return {job: rec.to_bytes() for job, rec in self._records.items()}

    # -- saving ---------------------------------------------------------------

    def prepare(self, job: str, rank: int, step: int, nbytes: int) -> dict[str, Any]:
        """A writable slot of at least ``nbytes`` for ``step`` of ``rank``; returns its path.

        Never hands out a slot holding the job's committed step. Reuses the
        rank's other slot (or a spare) when it is large enough, so the
        trainer keeps writing into memory it has already mapped. A slot that
        holds a step in progress is given up only after the coordinator has
        aborted that step, so parity is never computed over bytes being
        overwritten.
        """
        check_job_name(job)
        name = data_name(job, rank, step)
        with self._lock:
            rec = self._records.get(job)
            if rec is not None and step <= rec.step:
                raise SnapstoreError(
                    f"job {job!r} already committed step {rec.step}; cannot save step {step} "
                    "(steps must increase)"
                )
            protected = self._protected(job)
            candidates = [
                n
                for n, p in self._parsed(job)
                if p.rank == rank and p.kind in ("data", "spare") and n not in protected
            ]
        for n in candidates:
            old = parse_name(n)
            if old is not None and old.kind == "data" and old.step is not None:
                self._abandon(job, rank, old.step)
        with self._lock:
            protected = self._protected(job)
            candidates = [n for n in candidates if n in self._segments and n not in protected]
            fits = sorted(
                (n for n in candidates if self._segments[n].size >= nbytes),
                key=lambda n: (n != name, self._segments[n].size),
            )
            path = os.path.join(self.dir, name)
            if fits:
                seg = self._segments.pop(fits[0])
                seg.rename(path)
                self._segments[name] = seg
                for n in candidates:
                    if n != fits[0]:
                        self._drop(n)
            else:
                self._check_budget(job, nbytes, freeable=candidates)
                for n in candidates:
                    self._drop(n)
                seg = self._create(job, name, nbytes)
            return {"path": seg.path, "capacity": seg.size, "name": name}

    def staged(self, job: str, rank: int, step: int, size: int, world_size: int) -> dict[str, Any]:
        """The trainer finished writing ``size`` bytes of ``step``: checksum and report it."""
        name = data_name(job, rank, step)
        with self._lock:
            seg = self._segments.get(name)
        if seg is None or seg.size < size:
            raise SnapstoreError(
                f"job {job!r} rank {rank} step {step}: staged {size} bytes but no such slot "
                f"on node {self.node_id[:12]} (call prepare first)"
            )
        k = self.cfg.k
        sums = []
        for j in range(k):
            off, ln = piece_bounds(size, k, j)
            sums.append(checksum(seg.view(off, ln)))
        self._counters["saves"] += 1
        reply = ray.get(
            self._coord().rank_staged.remote(job, step, rank, self.node_id, size, sums, world_size),
            timeout=30,
        )
        if not reply.get("ok"):
            raise SnapstoreError(str(reply.get("error")))
        return {"sums": sums}

    def build_parity(self, order: dict[str, Any]) -> dict[str, Any]:
        """Compute this node's parity chunks of a new step (order from the coordinator)."""
        job = str(order["job"])
        seg = self._output_segment(job, str(order["file"]), int(order["file_size"]))
        result = run_order(order, self.transport, seg.view)
        self._counters["parity_bytes_built"] += result.bytes_written
        return result.to_dict()

    def commit(self, record_bytes: bytes) -> None:
        """A step is committed: keep its slots, free older ones, remember the record."""
        rec = StepRecord.from_bytes(record_bytes)
        with self._lock:
            old = self._records.get(rec.job)
            if old is not None and (old.step, old.version) >= (rec.step, rec.version):
                return
            for n in [n for n, j in self._pinned.items() if j == rec.job]:
                del self._pinned[n]
            tmp = os.path.join(self.dir, record_name(rec.job) + ".new")
            with open(tmp, "wb") as f:
                f.write(record_bytes)
            os.replace(tmp, os.path.join(self.dir, record_name(rec.job)))
            self._records[rec.job] = rec
            for n, p in self._parsed(rec.job):
                if p.kind == "spare" or p.step is None:
                    continue
                if p.step > rec.step:
                    continue  # a newer step in progress
                if p.kind == "data":
                    keep = p.step == rec.step and (
                        p.rank in rec.ranks and rec.ranks[p.rank].node == self.node_id
                    )
                else:
                    keep = (p.step, p.version) == (rec.step, rec.version)
                if not keep:
                    self._retire(n)

    def abort(self, job: str, step: int) -> None:
        """A step will not commit: free its slots (they stay mapped as spares)."""
        with self._lock:
            protected = self._protected(job)
            for n, p in self._parsed(job):
                if p.step == step and p.kind in ("data", "parity") and n not in protected:
                    self._retire(n)

    # -- restoring ------------------------------------------------------------

    def open_committed(
        self, job: str, rank: int, step: int, size: int, sums: list[int]
    ) -> dict[str, Any]:
        """Verify this node's slot of a committed step; return its path and any bad pieces."""
        name = data_name(job, rank, step)
        with self._lock:
            seg = self._segments.get(name)
        if seg is None or seg.size < size:
            return {"path": None, "bad": list(range(len(sums))), "name": name}
        bad = []
        for j, want in enumerate(sums):
            off, ln = piece_bounds(size, len(sums), j)
            if checksum(seg.view(off, ln)) != want:
                bad.append(j)
        return {"path": seg.path, "bad": bad, "name": name}

    def fetch(
        self, job: str, rank: int, step: int, size: int, sums: list[int], peer: dict[str, Any]
    ) -> dict[str, Any]:
        """Copy a rank's committed buffer from its home node here; verify it."""
        name = data_name(job, rank, step)
        src = PeerInfo.from_dict(peer)
        seg = self._output_segment(job, name, size)
        block = 16 << 20
        for off in range(0, size, block):
            self.transport.read_into(src, name, off, seg.view(off, min(block, size - off)))
        self._counters["fetches"] += 1
        bad = []
        for j, want in enumerate(sums):
            off, ln = piece_bounds(size, len(sums), j)
            if checksum(seg.view(off, ln)) != want:
                bad.append(j)
        return {"path": seg.path, "bad": bad, "name": name}

    def rebuild(self, order: dict[str, Any]) -> dict[str, Any]:
        """Decode lost pieces or parity into a local segment (order from the coordinator).

        With ``pin`` set, the output is a rank's committed data relocated here
        after its home was lost: no record names this node as its home yet,
        so it is kept from reuse until a newer record of the job arrives.
        """
        job = str(order["job"])
        name = str(order["file"])
        seg = self._output_segment(job, name, int(order["file_size"]))
        if order.get("pin"):
            with self._lock:
                self._pinned[name] = job
        result = run_order(order, self.transport, seg.view)
        self._counters["rebuilt_bytes"] += result.bytes_written
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
        pname = parity_name(rec.job, rec.step, rec.version)
        with self._lock:
            pseg = self._segments.get(pname)
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
        with self._lock:
            for n, _ in self._parsed(job):
                self._drop(n)
            self._records.pop(job, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dir, record_name(job)))

    def destroy(self) -> None:
        """Delete every segment of this node and stop serving (``snapstore down``)."""
        self._stop.set()
        with self._lock:
            for n in list(self._segments):
                self._drop(n)
            self._records.clear()
            with contextlib.suppress(OSError):
                for f in os.listdir(self.dir):
                    os.unlink(os.path.join(self.dir, f))
                os.rmdir(self.dir)
        self.server.stop()
        self.transport.close()

    # -- internals ------------------------------------------------------------

    def _adopt(self) -> None:
        """After a restart: map the segments and records left by the previous incarnation."""
        for f in os.listdir(self.dir):
            path = os.path.join(self.dir, f)
            if f.endswith(".new"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            elif f.startswith("rec.") and f.endswith(".msgpack"):
                try:
                    with open(path, "rb") as fh:
                        rec = StepRecord.from_bytes(fh.read())
                    self._records[rec.job] = rec
                except (OSError, SnapstoreError) as e:
                    logger.warning("dropping unreadable record %s: %s", f, e)
                    with contextlib.suppress(OSError):
                        os.unlink(path)
        for name, _ in iter_dir(self.dir):
            try:
                self._segments[name] = Segment.open(os.path.join(self.dir, name), writable=True)
            except OSError as e:
                logger.warning("cannot re-adopt %s: %s", name, e)
        if self._segments:
            logger.info("re-adopted %d segments", len(self._segments))

    def _parsed(self, job: str) -> list[tuple[str, Any]]:
        out = []
        for n in list(self._segments):
            p = parse_name(n)
            if p is not None and p.job == job:
                out.append((n, p))
        return out

    def _protected(self, job: str) -> set[str]:
        """Names of this node's segments that hold the job's committed step."""
        names = {n for n, j in self._pinned.items() if j == job}
        rec = self._records.get(job)
        if rec is not None:
            names.update(data_name(job, r, rec.step) for r in rec.ranks_on(self.node_id))
            names.add(parity_name(job, rec.step, rec.version))
        return names

    def _used(self) -> int:
        return sum(s.size for s in self._segments.values())

    def _check_budget(self, job: str, size: int, freeable: list[str]) -> None:
        """Raise MemoryBudgetError, changing nothing, if ``size`` more bytes cannot fit
        even after dropping ``freeable`` segments and every spare."""
        drop = set(freeable) | {n for n in self._segments if n.startswith("x.")}
        used = self._used()
        after = used - sum(self._segments[n].size for n in drop if n in self._segments)
        if after + size > self.budget:
            raise MemoryBudgetError(job, self.node_id[:12], size, used, self.budget)

    def _create(self, job: str, name: str, size: int) -> Segment:
        """Create a segment within the budget, dropping spares first if that makes room."""
        if self._used() + size > self.budget:
            for n in sorted(self._segments, key=lambda n: -self._segments[n].size):
                if n.startswith("x."):
                    self._drop(n)
                    if self._used() + size <= self.budget:
                        break
        used = self._used()
        if used + size > self.budget:
            raise MemoryBudgetError(job, self.node_id[:12], size, used, self.budget)
        try:
            seg = Segment.create(os.path.join(self.dir, name), size)
        except MemoryError as e:
            raise MemoryBudgetError(job, self.node_id[:12], size, used, self.budget) from e
        self._segments[name] = seg
        return seg

    def _output_segment(self, job: str, name: str, size: int) -> Segment:
        """The segment ``name`` of at least ``size`` bytes, reusing a spare of the job."""
        with self._lock:
            seg = self._segments.get(name)
            if seg is not None and seg.size >= size:
                return seg
            if seg is not None:
                self._drop(name)
            want_parity = name.startswith("p.")
            spares = sorted(
                (
                    n
                    for n, p in self._parsed(job)
                    if p.kind == "spare"
                    and (p.rank is None) == want_parity
                    and self._segments[n].size >= size
                ),
                key=lambda n: self._segments[n].size,
            )
            if spares:
                seg = self._segments.pop(spares[0])
                seg.rename(os.path.join(self.dir, name))
                self._segments[name] = seg
                return seg
            return self._create(job, name, size)

    def _retire(self, name: str) -> None:
        """Turn a segment into a spare of its job (or drop it if the job has one already)."""
        p = parse_name(name)
        if p is None:
            return
        rank = p.rank if p.kind == "data" else None
        have = [n for n, q in self._parsed(p.job) if q.kind == "spare" and q.rank == rank]
        if have:
            self._drop(name)
            return
        self._spare_seq += 1
        seg = self._segments.pop(name)
        new = spare_name(p.job, rank, self._spare_seq)
        seg.rename(os.path.join(self.dir, new))
        self._segments[new] = seg

    def _drop(self, name: str) -> None:
        seg = self._segments.pop(name, None)
        if seg is not None:
            seg.unlink()

    def _resolve(self, name: str) -> np.ndarray:
        with self._lock:
            seg = self._segments.get(name)
        if seg is None:
            raise ChunkUnavailableError(f"no segment {name} on node {self.node_id[:12]}")
        return seg.array

    def _abandon(self, job: str, rank: int, step: int) -> None:
        """Tell the coordinator this rank gives up an older step before its slot is reused."""
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
