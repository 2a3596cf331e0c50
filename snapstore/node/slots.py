"""One node's segment table: which segment holds what, the memory budget, reuse rules.

The SMP keeps its segments here (see :mod:`snapstore.node.segments` for the file
names). Rules this table enforces:

- A segment that holds a job's committed step (data of ranks homed here, the
  parity of that step, data relocated here after a node loss) is never
  handed out for writing, renamed or dropped until a newer record arrives.
- A rank has at most two data slots here: its committed step and one more
  (leased to its trainer, or holding a step in progress). Freed slots stay
  mapped as *spares* and remember which step their bytes are from, so the
  next lease can tell the trainer which tensors it need not copy again.
- Nothing is created beyond the node's budget; spares are dropped first to
  make room, and a request that cannot fit changes nothing.
- A *held* segment (a committed step a flush to disk is reading, see
  :meth:`SlotTable.hold`) is neither retired, renamed, dropped nor handed out
  until every hold on it is released or expires. A retire (or drop) asked
  for meanwhile is deferred and happens at release. Commits never wait for
  a hold: the rank's next slot is allocated beside it, within the budget;
  only a lease that cannot fit waits (bounded) for holds of its job, and
  marks them *wanted* so the flush stops pacing itself and finishes.

Pure bookkeeping and files: no Ray, so it is tested on its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Collection
from typing import Any

from snapstore.errors import MemoryBudgetError, SnapstoreError
from snapstore.format.record import StepRecord
from snapstore.node.segments import (
    Segment,
    SegmentName,
    data_name,
    iter_dir,
    parity_name,
    parse_name,
    prepared_name,
    record_name,
    spare_name,
    work_name,
)

__all__ = ["SlotTable"]

logger = logging.getLogger(__name__)


class SlotTable:
    """The segments of one node. Thread-safe: one re-entrant lock guards everything."""

    def __init__(self, directory: str, node_id: str, budget: int) -> None:
        self.dir = directory
        self.node_id = node_id
        self.budget = budget
        self.lock = threading.RLock()
        self._segments: dict[str, Segment] = {}
        self._records: dict[str, StepRecord] = {}
        self._prepared: dict[tuple[str, int, int], StepRecord] = {}
        self._pinned: dict[str, str] = {}  # name -> job: relocated data, see pin()
        self._content: dict[str, int] = {}  # spare/work name -> step its bytes are from
        self._seq = 0
        self._holds: dict[str, dict[str, float]] = {}  # name -> {token: expiry (monotonic)}
        self._deferred: dict[str, str] = {}  # held name -> "retire" | "drop", done at release
        self._wanted: set[str] = set()  # hold tokens whose memory a lease waits for
        self._released = threading.Condition(self.lock)
        os.makedirs(directory, mode=0o700, exist_ok=True)

    # -- state --------------------------------------------------------------------

    def adopt(self) -> int:
        """After an SMP restart: map the segments and records the last incarnation left."""
        for f in os.listdir(self.dir):
            path = os.path.join(self.dir, f)
            if f.endswith(".new"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            elif f.startswith(("rec.", "prep.")) and f.endswith(".msgpack"):
                try:
                    with open(path, "rb") as fh:
                        rec = StepRecord.from_bytes(fh.read())
                    if f.startswith("rec."):
                        self._records[rec.job] = rec
                    else:
                        self._prepared[(rec.job, rec.step, rec.version)] = rec
                except (OSError, SnapstoreError) as e:
                    logger.warning("dropping unreadable record %s: %s", f, e)
                    with contextlib.suppress(OSError):
                        os.unlink(path)
        for name, _ in iter_dir(self.dir):
            try:
                self._segments[name] = Segment.open(os.path.join(self.dir, name), writable=True)
            except OSError as e:
                logger.warning("cannot re-adopt %s: %s", name, e)
        return len(self._segments)

    def get(self, name: str) -> Segment | None:
        with self.lock:
            return self._segments.get(name)

    def record(self, job: str) -> StepRecord | None:
        with self.lock:
            return self._records.get(job)

    def records(self) -> dict[str, StepRecord]:
        with self.lock:
            return dict(self._records)

    def prepared(self) -> list[StepRecord]:
        with self.lock:
            return list(self._prepared.values())

    def sizes(self) -> dict[str, int]:
        """Bytes held, by kind: used (all), data, parity, spare, work, delta."""
        out = {"used": 0, "data": 0, "parity": 0, "spare": 0, "work": 0, "delta": 0}
        with self.lock:
            for name, seg in self._segments.items():
                p = parse_name(name)
                out["used"] += seg.size
                if p is not None:
                    out[p.kind] = out.get(p.kind, 0) + seg.size
        return out

    def _parsed(self, job: str) -> list[tuple[str, SegmentName]]:
        out = []
        for n in list(self._segments):
            p = parse_name(n)
            if p is not None and p.job == job:
                out.append((n, p))
        return out

    def protected(self, job: str) -> set[str]:
        """Names of segments holding the job's committed step (or relocated data), or held."""
        with self.lock:
            self._expire()
            names = {n for n, j in self._pinned.items() if j == job}
            names.update(n for n in self._holds if (p := parse_name(n)) and p.job == job)
            rec = self._records.get(job)
            if rec is not None:
                names.update(data_name(job, r, rec.step) for r in rec.ranks_on(self.node_id))
                names.add(parity_name(job, rec.step, rec.version))
            return names

    # -- saving -------------------------------------------------------------------

    def abandon_candidates(self, job: str, rank: int) -> list[int]:
        """Steps in progress whose data slot a lease of ``rank`` would give up."""
        with self.lock:
            out = []
            for n in self._reusable(job, rank):
                p = parse_name(n)
                if p is not None and p.kind == "data" and p.step is not None:
                    out.append(p.step)
            return sorted(out)

    def lease(
        self,
        job: str,
        rank: int,
        nbytes: int,
        abandoned: Collection[int] = (),
        hold_wait: float = 0.0,
    ) -> dict[str, Any]:
        """The slot ``rank``'s trainer writes its next step into, at least ``nbytes`` long.

        Returns ``path``, ``capacity`` and ``holds``: the step whose bytes the
        slot still holds (a trainer that wrote that step into it may skip
        unchanged tensors), or None when unknown.

        When the budget is short while a flush holds slots of the job, waits
        up to ``hold_wait`` seconds for them to be released (the flush is
        told to hurry), then raises MemoryBudgetError as usual.
        """
        deadline = time.monotonic() + hold_wait
        while True:
            try:
                return self._lease_once(job, rank, nbytes, abandoned)
            except MemoryBudgetError:
                with self.lock:
                    tokens = self._job_hold_tokens(job)
                    left = deadline - time.monotonic()
                    if not tokens or left <= 0:
                        raise
                    self._wanted.update(tokens)
                    logger.info(
                        "lease of %d bytes waits for a flush to release its slots",
                        nbytes,
                        extra={"job": job, "rank": rank, "node": self.node_id},
                    )
                    self._released.wait(min(left, 1.0))

    def _lease_once(
        self, job: str, rank: int, nbytes: int, abandoned: Collection[int]
    ) -> dict[str, Any]:
        work = work_name(job, rank)
        with self.lock:
            seg = self._segments.get(work)
            if seg is not None and seg.size >= nbytes:
                return self._leased(work, seg)
            # Slots of steps in progress are given up only once their step cannot
            # commit: the caller had the coordinator end the steps in ``abandoned``.
            candidates = [
                n
                for n in self._reusable(job, rank)
                if (p := parse_name(n)) is not None
                and (p.kind != "data" or p.step is None or p.step in abandoned)
            ]
            fits = sorted(
                (n for n in candidates if self._segments[n].size >= nbytes),
                key=lambda n: (n != work, self._segments[n].size),
            )
            if fits:
                chosen = fits[0]
                seg = self._rename(chosen, work)
                for n in candidates:
                    if n != chosen:
                        self._drop(n)
            else:
                self.check_budget(job, nbytes, freeable=candidates)
                for n in candidates:
                    self._drop(n)
                seg = self._create(job, work, nbytes)
            return self._leased(work, seg)

    def _leased(self, name: str, seg: Segment) -> dict[str, Any]:
        return {"path": seg.path, "capacity": seg.size, "holds": self._content.get(name)}

    def _reusable(self, job: str, rank: int) -> list[str]:
        protected = self.protected(job)
        return [
            n
            for n, p in self._parsed(job)
            if p.rank == rank and p.kind in ("data", "spare", "work") and n not in protected
        ]

    def stage(self, job: str, rank: int, step: int, size: int) -> Segment:
        """The trainer wrote ``step`` into its leased slot: name the slot for that step."""
        with self.lock:
            rec = self._records.get(job)
            if rec is not None and step <= rec.step:
                raise SnapstoreError(
                    f"job {job!r} already committed step {rec.step}; cannot save step {step} "
                    "(steps must increase)"
                )
            work = work_name(job, rank)
            seg = self._segments.get(work)
            if seg is None:
                raise SnapstoreError(
                    f"job {job!r} rank {rank}: no leased slot on node {self.node_id[:12]} "
                    f"for step {step} (lease one first)"
                )
            if seg.size < size:
                raise SnapstoreError(
                    f"job {job!r} rank {rank} step {step}: staged {size} bytes into a "
                    f"{seg.size}-byte slot"
                )
            name = data_name(job, rank, step)
            if name in self._holds:
                raise SnapstoreError(
                    f"job {job!r} rank {rank}: step {step}'s slot is being flushed to disk; "
                    "save a newer step"
                )
            if name in self._segments:
                self._drop(name)  # an earlier attempt at this step, already abandoned
            self._content.pop(work, None)
            return self._rename(work, name)

    def output(self, job: str, name: str, size: int) -> Segment:
        """Segment ``name`` with at least ``size`` bytes, reusing a spare of the job."""
        with self.lock:
            seg = self._segments.get(name)
            if seg is not None and seg.size >= size:
                return seg
            if name in self.protected(job):
                raise SnapstoreError(f"refusing to replace {name}: it holds a committed step")
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
                return self._rename(spares[0], name)
            return self._create(job, name, size)

    def pin(self, job: str, name: str) -> None:
        """Keep ``name`` (a rank's committed data rebuilt here) until a newer record arrives."""
        with self.lock:
            self._pinned[name] = job

    def keep_prepared(self, rec: StepRecord) -> None:
        """Keep a prepared slice of a step record (file first: it survives an SMP restart).

        Refused (SnapstoreError) when the slice homes a rank here whose data slot this
        node does not hold: a record must never describe bytes that are not there.
        """
        data = rec.to_bytes()
        with self.lock:
            key = (rec.job, rec.step, rec.version)
            committed = self._records.get(rec.job)
            if committed is not None and (committed.step, committed.version) >= key[1:]:
                return  # already committed (or superseded): nothing to prepare
            missing = [
                r
                for r in rec.ranks_on(self.node_id)
                if (seg := self._segments.get(data_name(rec.job, r, rec.step))) is None
                or seg.size < rec.ranks[r].size
            ]
            if missing:
                raise SnapstoreError(
                    f"node {self.node_id[:12]} does not hold ranks {missing} of job "
                    f"{rec.job!r} step {rec.step} that the prepared record homes here"
                )
            parity = rec.parity_on(self.node_id)
            if parity:
                seg = self._segments.get(parity_name(rec.job, rec.step, rec.version))
                if seg is None or seg.size < rec.parity_file_size(self.node_id):
                    raise SnapstoreError(
                        f"node {self.node_id[:12]} does not hold the parity of job {rec.job!r} "
                        f"step {rec.step} version {rec.version} that the prepared record "
                        "places here"
                    )
            self._write_file(prepared_name(*key), data)
            self._prepared[key] = rec

    def commit_prepared(self, job: str, step: int, version: int) -> tuple[bool, list[int], str]:
        """Commit the prepared (step, version): ``(ok, ranks missing here, why not)``.

        Refused, changing nothing, when a data slot of a rank homed here is
        gone (its bytes are not what the record says). A node with no slice of
        the step lets go of the job's older steps: the step is committed
        elsewhere and nothing of it is here.
        """
        with self.lock:
            current = self._records.get(job)
            if current is not None and (current.step, current.version) >= (step, version):
                return True, [], ""
            rec = self._prepared.get((job, step, version))
            if rec is None:
                self._supersede(job, step)
                return True, [], ""
            missing = [
                r
                for r in rec.ranks_on(self.node_id)
                if (seg := self._segments.get(data_name(job, r, step))) is None
                or seg.size < rec.ranks[r].size
            ]
            if missing:
                return False, missing, f"slots of ranks {missing} are gone"
            self._commit(rec, rec.to_bytes())
            return True, [], ""

    def commit(self, rec: StepRecord, record_bytes: bytes) -> bool:
        """Install a committed record directly (tests, tools). False if stale."""
        with self.lock:
            return self._commit(rec, record_bytes)

    def _commit(self, rec: StepRecord, record_bytes: bytes) -> bool:
        old = self._records.get(rec.job)
        if old is not None and (old.step, old.version) >= (rec.step, rec.version):
            return False
        # Relocated data of this very step stays pinned: a late commit of the record that
        # still homes the rank on its lost node must not free the only intact copy.
        for n in [n for n, j in self._pinned.items() if j == rec.job]:
            p = parse_name(n)
            if p is None or p.step is None or p.step < rec.step:
                del self._pinned[n]
        self._write_file(record_name(rec.job), record_bytes)
        self._records[rec.job] = rec
        self._drop_prepared(rec.job, lambda k: (k[1], k[2]) <= (rec.step, rec.version))
        for n, p in self._parsed(rec.job):
            if p.kind not in ("data", "parity") or p.step is None or p.step > rec.step:
                continue  # spares, leases, deltas, and newer steps in progress stay
            if p.kind == "data":
                home = rec.ranks.get(p.rank) if p.rank is not None else None
                here = home is not None and home.node == self.node_id
                keep = p.step == rec.step and (here or n in self._pinned)
            else:
                # A newer version of this step's parity is being prepared (a re-protection
                # whose parity was built before this older decision arrived): it stays.
                keep = (p.step, p.version or 0) >= (rec.step, rec.version)
            if not keep:
                self._retire(n, p)
        return True

    def _supersede(self, job: str, step: int) -> None:
        """The job committed ``step`` elsewhere: drop this node's older record and slots."""
        rec = self._records.pop(job, None)
        if rec is not None and rec.step >= step:
            self._records[job] = rec
            return
        for n in [n for n, j in self._pinned.items() if j == job]:
            del self._pinned[n]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.dir, record_name(job)))
        self._drop_prepared(job, lambda k: k[1] <= step)
        for n, p in self._parsed(job):
            if p.kind in ("data", "parity") and p.step is not None and p.step < step:
                self._retire(n, p)

    def abort(self, job: str, step: int, ranks: Collection[int] | None = None) -> None:
        """A step (of ``ranks``, or all) will not commit: its slots become spares and its
        prepared slices are dropped. The committed step is never touched."""
        with self.lock:
            protected = self.protected(job)
            self._drop_prepared(job, lambda k: k[1] == step)
            for n, p in self._parsed(job):
                if p.step != step or n in protected:
                    continue
                if (p.kind == "data" and (ranks is None or p.rank in ranks)) or p.kind == "parity":
                    self._retire(n, p)

    def _drop_prepared(self, job: str, which: Any) -> None:
        for key in [k for k in self._prepared if k[0] == job and which(k)]:
            del self._prepared[key]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dir, prepared_name(*key)))

    def _write_file(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.dir, name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.dir, name))

    def drop_job(self, job: str) -> None:
        with self.lock:
            self._drop_prepared(job, lambda k: True)
            for n, _ in self._parsed(job):
                if n in self._holds:
                    self._deferred[n] = "drop"
                else:
                    self._drop(n)
            self._records.pop(job, None)
            for n in [n for n, j in self._pinned.items() if j == job]:
                del self._pinned[n]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dir, record_name(job)))

    def forget(self, job: str) -> None:
        """The job's committed step is abandoned (it restores from disk instead):
        drop its record and turn its data and parity into spares."""
        with self.lock:
            self._records.pop(job, None)
            self._drop_prepared(job, lambda k: True)
            for n in [n for n, j in self._pinned.items() if j == job]:
                del self._pinned[n]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dir, record_name(job)))
            for n, p in self._parsed(job):
                if p.kind in ("data", "parity"):
                    self._retire(n, p)

    # -- holds (flushes reading committed slots) ------------------------------------

    def hold(
        self, job: str, step: int, token: str, ttl: float, ranks: list[int] | None = None
    ) -> list[int]:
        """Hold this node's data slots of ``step`` (of ``ranks``, or all it has) for a reader.

        Until :meth:`release` (or ``ttl`` seconds pass) they are not retired,
        renamed, dropped or handed out. Returns the ranks held.
        """
        with self.lock:
            self._expire()
            expiry = time.monotonic() + ttl
            held = []
            for n, p in self._parsed(job):
                if p.kind != "data" or p.step != step or p.rank is None:
                    continue
                if ranks is not None and p.rank not in ranks:
                    continue
                self._holds.setdefault(n, {})[token] = expiry
                held.append(p.rank)
            return sorted(held)

    def release(self, token: str) -> None:
        """End a hold; deferred retires and drops of segments no longer held happen now."""
        with self.lock:
            self._wanted.discard(token)
            for n in [n for n, tokens in self._holds.items() if token in tokens]:
                del self._holds[n][token]
                if not self._holds[n]:
                    self._unhold(n)
            self._released.notify_all()

    def holding(self, token: str) -> bool:
        """Whether ``token`` still holds something (False once released or expired)."""
        with self.lock:
            self._expire()
            return any(token in tokens for tokens in self._holds.values())

    def wanted(self, token: str) -> bool:
        """Whether a lease waits for the memory ``token`` holds (the reader should hurry)."""
        with self.lock:
            return token in self._wanted

    def held(self) -> dict[str, list[str]]:
        """Held segment names and their tokens (for info and tests)."""
        with self.lock:
            self._expire()
            return {n: sorted(t) for n, t in self._holds.items()}

    def _job_hold_tokens(self, job: str) -> set[str]:
        self._expire()
        out: set[str] = set()
        for n, tokens in self._holds.items():
            p = parse_name(n)
            if p is not None and p.job == job:
                out.update(tokens)
        return out

    def _expire(self) -> None:
        now = time.monotonic()
        for n in list(self._holds):
            tokens = self._holds[n]
            for t in [t for t, exp in tokens.items() if exp <= now]:
                logger.warning("hold %s on %s expired", t, n, extra={"node": self.node_id})
                del tokens[t]
                self._wanted.discard(t)
            if not tokens:
                self._unhold(n)
                self._released.notify_all()

    def _unhold(self, name: str) -> None:
        self._holds.pop(name, None)
        action = self._deferred.pop(name, None)
        if action == "drop":
            self._drop(name)
        elif action == "retire":
            p = parse_name(name)
            if p is not None and name in self._segments:
                self._retire(name, p)

    def close(self) -> None:
        """Unmap every segment and keep the files (a restarted SMP re-adopts them)."""
        with self.lock:
            for seg in self._segments.values():
                seg.close()
            self._segments.clear()

    def destroy(self) -> None:
        """Delete every segment and record of this node, and the directory."""
        with self.lock:
            self._holds.clear()
            self._deferred.clear()
            self._prepared.clear()
            for n in list(self._segments):
                self._drop(n)
            self._records.clear()
            with contextlib.suppress(OSError):
                for f in os.listdir(self.dir):
                    os.unlink(os.path.join(self.dir, f))
                os.rmdir(self.dir)

    # -- memory -------------------------------------------------------------------

    def used(self) -> int:
        with self.lock:
            return sum(s.size for s in self._segments.values())

    def check_budget(self, job: str, size: int, freeable: list[str]) -> None:
        """MemoryBudgetError, changing nothing, if ``size`` more bytes cannot fit even
        after dropping ``freeable`` segments and every spare."""
        with self.lock:
            drop = set(freeable) | {n for n in self._segments if n.startswith("x.")}
            used = self.used()
            after = used - sum(self._segments[n].size for n in drop if n in self._segments)
            if after + size > self.budget:
                raise MemoryBudgetError(job, self.node_id[:12], size, used, self.budget)

    def _create(self, job: str, name: str, size: int) -> Segment:
        """Create a segment within the budget, dropping spares first if that makes room."""
        if self.used() + size > self.budget:
            for n in sorted(self._segments, key=lambda n: -self._segments[n].size):
                if n.startswith("x."):
                    self._drop(n)
                    if self.used() + size <= self.budget:
                        break
        used = self.used()
        if used + size > self.budget:
            raise MemoryBudgetError(job, self.node_id[:12], size, used, self.budget)
        try:
            seg = Segment.create(os.path.join(self.dir, name), size)
        except MemoryError as e:
            raise MemoryBudgetError(job, self.node_id[:12], size, used, self.budget) from e
        self._segments[name] = seg
        return seg

    def _rename(self, old: str, new: str) -> Segment:
        seg = self._segments.pop(old)
        seg.rename(os.path.join(self.dir, new))
        self._segments[new] = seg
        if old in self._content:
            self._content[new] = self._content.pop(old)
        return seg

    def _retire(self, name: str, p: SegmentName) -> None:
        """Turn a segment into its job's spare (one spare per rank, one for parity): the
        segment replaces a spare no larger than it (its bytes are newer), and is dropped
        when a larger one stays. A spare too small for the slots now asked for (left by
        smaller steps) once stayed for good and made every later retire a drop, and every
        later slot a fresh segment whose first writes fault its pages in: half the parity
        slots of bench.overhead were.

        A held segment keeps its name until released; the retire happens then.
        """
        if name in self._holds:
            self._deferred.setdefault(name, "retire")
            return
        rank = p.rank if p.kind == "data" else None
        have = [n for n, q in self._parsed(p.job) if q.kind == "spare" and q.rank == rank]
        seg = self._segments.get(name)
        if seg is None:
            return
        if any(self._segments[n].size > seg.size for n in have):
            self._drop(name)
            return
        for n in have:
            self._drop(n)
        self._seq += 1
        new = spare_name(p.job, rank, self._seq)
        self._rename(name, new)
        if p.step is not None:
            self._content[new] = p.step

    def _drop(self, name: str) -> None:
        if name in self._holds:
            self._deferred[name] = "drop"
            return
        seg = self._segments.pop(name, None)
        self._content.pop(name, None)
        if seg is not None:
            seg.unlink()
