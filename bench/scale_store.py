"""An in-memory node store for ``bench.scale``: bookkeeping of the real one, bytes as time.

:class:`MemNodeStore` keeps the :class:`snapstore.node.api.NodeStore`
contract the control plane relies on while it saves and re-protects: slots
per rank (a committed step and steps in progress), prepared slices of step
records, committed records and what a commit supersedes. It holds no bytes.
Each byte operation instead costs *modelled* time on the simulation's
virtual clock (:class:`ByteModel`): checksumming a staged rank, encoding
parity from the k data chunks of each stripe (read from peers over the
network), rebuilding a lost rank's pieces. Operations running at once on a
node share its bandwidth equally (:class:`_Shared`), as its work threads
share its memory bandwidth.

Checksums are stand-ins derived from (job, rank, step, piece): the control
plane only compares them. What is not modelled (restores read no bytes, the
persisted tier, holds, corrupt chunks, slots lost to a crash) raises
:class:`snapstore.errors.SnapstoreError` saying so; ``bench.scale`` never
asks for it. Where it keeps the contract is checked against the real store by
``tests/test_node_contract.py`` (:meth:`MemNodeStore.standalone` builds one
outside a simulation, :meth:`MemNodeStore.holds` says whether a slot is held).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from snapstore.errors import SnapstoreError
from snapstore.format.record import StepRecord
from snapstore.format.work import (
    CommitResult,
    Lease,
    Opened,
    PeerInfo,
    PersistOrder,
    PersistResult,
    RankStaged,
    VerifyReport,
    WorkOrder,
    WorkResult,
)
from snapstore.node.segments import parse_name

__all__ = ["ByteModel", "MemNodeStore", "OpSpan"]


@dataclass(frozen=True)
class ByteModel:
    """How long byte work takes on one node.

    ``mem_bw``: bytes per second a node checksums, encodes and writes (its
    ISA-L threads together); ``net_bw``: bytes per second it reads from other
    nodes. Defaults: 10 GB/s and 12.5 GB/s (a 100 Gb/s NIC).
    """

    mem_bw: float = 10e9
    net_bw: float = 12.5e9

    def seconds(self, local: int, peer: int) -> float:
        return local / self.mem_bw + peer / self.net_bw


@dataclass(frozen=True)
class OpSpan:
    """One byte operation on one node: what it was for, when it was asked, when it ended."""

    kind: str
    job: str
    step: int
    version: int
    asked: float
    ended: float

    @property
    def seconds(self) -> float:
        return self.ended - self.asked


@dataclass
class _Rank:
    committed: int | None = None
    staged: set[int] = field(default_factory=set)
    size: int = 0


class _Shared:
    """One node's bandwidth, shared equally by the operations running on it (processor
    sharing): each op is its seconds of work at full bandwidth, done at 1/n of it while
    n run."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._ops: list[list[Any]] = []  # [work seconds left, future]
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def run(self, seconds: float) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self._advance()
        fut: asyncio.Future[None] = loop.create_future()
        self._ops.append([seconds, fut])
        self._schedule(loop)
        return fut

    def _advance(self) -> None:
        now = self._now()
        if self._ops:
            share = (now - self._last) / len(self._ops)
            for op in self._ops:
                op[0] -= share
        self._last = now

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ops:
            first = min(op[0] for op in self._ops)
            self._timer = loop.call_later(max(0.0, first) * len(self._ops), self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._advance()
        done = [op for op in self._ops if op[0] <= 1e-9]
        self._ops = [op for op in self._ops if op[0] > 1e-9]
        for _, fut in done:
            if not fut.done():
                fut.set_result(None)
        self._schedule(loop)


def _sum(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


class MemNodeStore:
    """One node's store without bytes (see the module docstring)."""

    @classmethod
    def standalone(cls, node_id: str, k: int, m: int, budget: int) -> MemNodeStore:
        """A store outside any simulation (byte work at the default model's speed, on the
        monotonic clock): what the contract tests use. ``m`` is accepted for symmetry with
        the real store's config; bookkeeping does not depend on it."""
        if k < 1 or m < 0:
            raise ValueError(f"k must be >= 1 and m >= 0, not k={k} m={m}")
        peer = PeerInfo(node_id, "localhost", f"mem://{node_id[:12]}", "127.0.0.1", 0)
        return cls(node_id, peer, k, budget, ByteModel(), time.monotonic)

    def __init__(
        self,
        node_id: str,
        peer: PeerInfo,
        k: int,
        budget: int,
        model: ByteModel,
        now: Callable[[], float],
        spans: list[OpSpan] | None = None,
    ) -> None:
        self.node_id = node_id
        self.peer = peer
        self.k = k
        self.budget = budget
        self.model = model
        self._now = now
        self.spans = spans if spans is not None else []
        """Every byte operation's span (shared by all nodes of a world)."""
        self._ranks: dict[tuple[str, int], _Rank] = {}
        self._records: dict[str, StepRecord] = {}
        self._prepared: dict[tuple[str, int, int], StepRecord] = {}
        self._parity: dict[tuple[str, int, int], int] = {}
        self._pinned: set[tuple[str, int, int]] = set()
        """(job, rank, step) rebuilt here: kept by a commit of that step (see the real
        store's pin)."""
        self._bandwidth = _Shared(now)
        self._cost: tuple[str, str, int, int, float] | None = None
        self._counters = {"saves": 0, "parity_bytes_built": 0, "peer_bytes_read": 0}

    # -- modelled time ---------------------------------------------------------------------

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a store call (the member's offload): its result arrives once the node has
        done its byte work, sharing the node's bandwidth with the work running beside it."""
        self._cost = None
        result = fn(*args)
        cost = self._cost
        if cost is None:
            await asyncio.sleep(0)
            return result
        kind, job, step, version, seconds = cost
        asked = self._now()
        await self._bandwidth.run(seconds)
        self.spans.append(OpSpan(kind, job, step, version, asked, self._now()))
        return result

    def _charge(self, kind: str, job: str, step: int, version: int, local: int, peer: int) -> None:
        self._cost = (kind, job, step, version, self.model.seconds(local, peer))

    # -- what it holds -------------------------------------------------------------------------

    def sizes(self) -> dict[str, int]:
        data = 0
        for r in self._ranks.values():
            data += r.size * (len(r.staged) + (r.committed is not None))
        parity = sum(self._parity.values())
        return {
            "used": data + parity,
            "data": data,
            "parity": parity,
            "spare": 0,
            "work": 0,
            "delta": 0,
            "budget": self.budget,
            "held": 0,
        }

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def record(self, job: str) -> StepRecord | None:
        return self._records.get(job)

    def records(self) -> dict[str, StepRecord]:
        return dict(self._records)

    def prepared(self) -> list[StepRecord]:
        return list(self._prepared.values())

    def holds(self, job: str, rank: int, step: int) -> bool:
        """Whether this node holds the data slot of ``rank``'s ``step`` (staged or
        committed)."""
        r = self._ranks.get((job, rank))
        return r is not None and (step in r.staged or r.committed == step)

    def _missing(self, rec: StepRecord) -> list[int]:
        """Ranks the record homes here whose slot of its step this node does not hold."""
        out = []
        for rank in rec.ranks_on(self.node_id):
            r = self._ranks.get((rec.job, rank))
            if not self.holds(rec.job, rank, rec.step) or (
                r is not None and r.size < rec.ranks[rank].size
            ):
                out.append(rank)
        return out

    # -- saving ---------------------------------------------------------------------------------

    def _rank(self, job: str, rank: int) -> _Rank:
        r = self._ranks.get((job, rank))
        if r is None:
            r = self._ranks[(job, rank)] = _Rank()
        return r

    def abandon_candidates(self, job: str, rank: int) -> list[int]:
        r = self._ranks.get((job, rank))
        return sorted(r.staged) if r is not None else []

    def lease(self, job: str, rank: int, nbytes: int, abandoned: Collection[int]) -> Lease:
        r = self._rank(job, rank)
        r.staged -= set(abandoned)
        r.size = max(r.size, nbytes)
        return Lease(f"mem://{self.node_id[:12]}/{job}/{rank}", nbytes, r.committed)

    def stage(
        self,
        job: str,
        rank: int,
        step: int,
        size: int,
        changed: list[list[int]] | None,
        base_step: int | None,
    ) -> RankStaged:
        rec = self._records.get(job)
        if rec is not None and step <= rec.step:
            raise SnapstoreError(
                f"job {job!r} already committed step {rec.step}; cannot save step {step}"
            )
        r = self._rank(job, rank)
        r.staged.add(step)
        r.size = max(r.size, size)
        self._counters["saves"] += 1
        self._charge("stage", job, step, -1, size, 0)
        sums = tuple(_sum(job, rank, step, j) for j in range(self.k))
        return RankStaged(rank, size, sums, None)

    def build_parity(self, order: WorkOrder) -> WorkResult:
        return self._work("parity", order)

    def _work(self, kind: str, order: WorkOrder) -> WorkResult:
        """An order's byte work: each output reads k sources (peers over the network)."""
        p = parse_name(order.file)
        step = p.step if p is not None and p.step is not None else -1
        version = p.version if p is not None and p.version is not None else -1
        local = peer = written = 0
        sums = []
        for out in order.outputs:
            used = [s for s in out.sources if s.extents and not s.lost][: order.k]
            for s in used:
                n = sum(e.length for e in s.extents)
                if s.node == self.node_id:
                    local += n
                else:
                    peer += n
            written += out.length
            sums.append(out.expect if out.expect is not None else _sum(order.file, out.index))
        self._charge(kind, order.job, step, version, local + written, peer)
        self._counters["parity_bytes_built"] += written if kind == "parity" else 0
        self._counters["peer_bytes_read"] += peer
        if kind == "parity":
            self._parity[(order.job, step, version)] = order.file_size
        elif order.pin and p is not None and p.rank is not None:
            r = self._rank(order.job, p.rank)
            r.committed, r.size = step, max(r.size, order.file_size)
            self._pinned.add((order.job, p.rank, step))
        return WorkResult(tuple(sums), (), local + peer, written, peer)

    def keep_prepared(self, record: StepRecord) -> None:
        current = self._records.get(record.job)
        if current is not None and (current.step, current.version) >= (
            record.step,
            record.version,
        ):
            return
        missing = self._missing(record)
        if missing:
            raise SnapstoreError(
                f"node {self.node_id[:12]} does not hold ranks {missing} of job "
                f"{record.job!r} step {record.step} that the prepared record homes here"
            )
        self._prepared[(record.job, record.step, record.version)] = record

    def commit(self, job: str, step: int, version: int, hold: str, hold_ttl: float) -> CommitResult:
        current = self._records.get(job)
        if current is not None and (current.step, current.version) >= (step, version):
            return CommitResult(True)
        rec = self._prepared.get((job, step, version))
        if rec is None:
            # Nothing of the step here: the job's older steps go.
            if current is not None and current.step >= step:
                return CommitResult(True)
            self._records.pop(job, None)
            self._pinned = {p for p in self._pinned if p[0] != job}
            self._drop_parity(job, lambda s, v: s < step)
            for (j, _), r in self._ranks.items():
                if j == job:
                    r.staged = {s for s in r.staged if s >= step}
                    if r.committed is not None and r.committed < step:
                        r.committed = None
            self._drop_prepared(job, lambda s, v: s <= step)
            return CommitResult(True)
        missing = self._missing(rec)
        if missing:
            return CommitResult(False, tuple(missing), (), f"slots of ranks {missing} are gone")
        self._records[job] = rec
        self._drop_prepared(job, lambda s, v: (s, v) <= (step, version))
        self._drop_parity(job, lambda s, v: (s, v) != (step, version) and s <= step)
        mine = set(rec.ranks_on(self.node_id))
        pinned = {p[1] for p in self._pinned if p[0] == job and p[2] == step}
        self._pinned = {p for p in self._pinned if p[0] != job or p[2] >= step}
        for (j, rank), r in self._ranks.items():
            if j != job:
                continue
            r.staged = {s for s in r.staged if s > step}
            r.committed = step if rank in mine or rank in pinned else None
        return CommitResult(True)

    def _drop_prepared(self, job: str, which: Callable[[int, int], bool]) -> None:
        for key in [k for k in self._prepared if k[0] == job and which(k[1], k[2])]:
            del self._prepared[key]

    def _drop_parity(self, job: str, which: Callable[[int, int], bool]) -> None:
        for key in [k for k in self._parity if k[0] == job and which(k[1], k[2])]:
            del self._parity[key]

    def abort(self, job: str, step: int, ranks: Collection[int] | None) -> None:
        self._drop_prepared(job, lambda s, v: s == step)
        rec = self._records.get(job)
        self._drop_parity(job, lambda s, v: s == step and (rec is None or rec.version != v))
        for (j, rank), r in self._ranks.items():
            if j == job and (ranks is None or rank in ranks):
                r.staged.discard(step)

    # -- restoring and re-protecting -----------------------------------------------------------

    def open_committed(
        self, job: str, rank: int, step: int, size: int, sums: tuple[int, ...]
    ) -> Opened:
        raise SnapstoreError("bench.scale's node store reads no bytes (restores not modelled)")

    def fetch(
        self, job: str, rank: int, step: int, size: int, sums: tuple[int, ...], peer: PeerInfo
    ) -> Opened:
        raise SnapstoreError("bench.scale's node store reads no bytes (restores not modelled)")

    def rebuild(self, order: WorkOrder) -> WorkResult:
        return self._work("rebuild", order)

    def verify(self, record: StepRecord) -> VerifyReport:
        return VerifyReport()

    # -- the persisted tier (not modelled) -------------------------------------------------------

    def hold(self, job: str, step: int, token: str, ttl: float) -> list[int]:
        return []

    def release(self, token: str) -> None:
        return None

    def persist(self, order: PersistOrder) -> PersistResult:
        raise SnapstoreError("bench.scale's node store has no persisted tier")

    def verify_persisted(self, path: str, ranks: list[int]) -> dict[int, str | None]:
        raise SnapstoreError("bench.scale's node store has no persisted tier")

    def forget(self, job: str) -> None:
        self._records.pop(job, None)
        self._pinned = {p for p in self._pinned if p[0] != job}
        self._drop_prepared(job, lambda s, v: True)
        self._drop_parity(job, lambda s, v: True)
        for (j, _), r in self._ranks.items():
            if j == job:
                r.committed = None
                r.staged.clear()

    def drop_job(self, job: str) -> None:
        self.forget(job)
        for key in [key for key in self._ranks if key[0] == job]:
            del self._ranks[key]
