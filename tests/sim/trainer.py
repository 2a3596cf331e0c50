"""Simulated trainers: each saves every step and restores after a restart, as a client does.

A :class:`SimJob` is one job's ranks and its launcher: when a rank dies (it
crashed, or its node was lost), every rank of the job is restarted after a
moment, each as a new process that restores first, as torchrun and Ray
Train restart a worker group. A :class:`SimTrainer` is one process of one
rank; it calls its node's SMP and the coordinator through the simulated
network exactly as :class:`snapstore.clients.Client` calls them over Ray:
lease a slot, write its bytes, stage, wait for the outcome (with the next
lease), and on restart ask for a restore plan, read (or fetch, or have
repaired) its buffer and check every byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import TYPE_CHECKING, Any

from snapstore.bench.vloop import Proc
from snapstore.coding import checksum
from snapstore.control.messages import ErrorKind, ErrorReply, Outcome, OutcomeStatus, RestorePlan
from snapstore.errors import SnapstoreError
from snapstore.format.record import piece_bounds
from snapstore.persist import read_rank
from tests.sim.net import rpc

if TYPE_CHECKING:
    from tests.sim.world import World

__all__ = ["SimJob", "SimTrainer"]

WAIT = 8.0


def _sums(data: bytes, k: int) -> tuple[int, ...]:
    import numpy as np

    buf = np.frombuffer(data, dtype=np.uint8)
    return tuple(checksum(buf[slice(*_bounds(len(data), k, j))]) for j in range(k))


def _bounds(size: int, k: int, j: int) -> tuple[int, int]:
    off, ln = piece_bounds(size, k, j)
    return off, off + ln


class SimJob:
    """One job: its ranks' current processes, placement, and launcher."""

    def __init__(self, world: World, name: str, size: int, steps: int) -> None:
        self.world = world
        self.name = name
        self.size = size
        self.steps = steps
        self.gen = 0
        self.trainers: list[SimTrainer] = []
        self.all_trainers: list[SimTrainer] = []
        self.restarting = False
        self.gave_up = ""
        self.final = False
        self._reached: dict[tuple[int, int], set[int]] = {}

    def placement(self) -> list[str]:
        up = [n for n, s in self.world.nodes.items() if not s.lost]
        return [up[r % len(up)] for r in range(self.size)]

    def start(self, restore: bool = False, steps: int | None = None) -> None:
        self.gen += 1
        nodes = self.placement()
        self.trainers = [
            SimTrainer(
                self, r, nodes[r], self.gen, restore, steps if steps is not None else self.steps
            )
            for r in range(self.size)
        ]
        self.all_trainers.extend(self.trainers)
        for t in self.trainers:
            t.start()

    async def barrier(self, trainer: SimTrainer, iteration: int) -> None:
        """Ranks of one generation move from iteration to iteration together, as DDP's
        all-reduce makes them; a rank whose generation is being replaced waits to be killed.

        Iterations, not step numbers: collectives match by their order, so a rank that
        restored another step than its peers (it restored the pinned step, then the job
        fell back to disk) trains along with them until its save is refused.
        """
        key = (trainer.gen, iteration)
        reached = self._reached.setdefault(key, set())
        reached.add(trainer.rank)
        alone_since: float | None = None
        while len(reached) < self.size or self.restarting:
            await asyncio.sleep(0.05)
            # Peers that exited (they restored the last step and had nothing to train)
            # never join: the collective fails after its timeout, the process exits with
            # an error, and the launcher restarts every rank.
            gone = [t.rank for t in self.trainers if t.done and t.rank not in reached]
            if not gone or self.restarting:
                alone_since = None
                continue
            now = self.world.loop.time()
            alone_since = now if alone_since is None else alone_since
            if now - alone_since >= COLLECTIVE_TIMEOUT:
                self.world.log(f"{self.name}: rank {trainer.rank}'s collective failed: {gone} left")
                trainer.kill()
                self.died(trainer)
                raise asyncio.CancelledError

    def died(self, trainer: SimTrainer) -> None:
        """A rank died: the launcher restarts every rank of the job shortly."""
        if self.restarting or self.final:
            return
        self.restarting = True
        self.world.log(f"{self.name}: rank {trainer.rank} died; restarting every rank")

        async def relaunch() -> None:
            await asyncio.sleep(self.world.rng.uniform(0.3, 2.0))
            for t in self.trainers:
                t.kill()
            self.restarting = False
            self.start(restore=True)

        # The launcher is its own process, not the dying rank's.
        self.world.loop.create_task(relaunch(), context=contextvars.Context())

    def final_restore(self) -> None:
        """After the faults: every rank restores once more (a last incarnation)."""
        for t in self.trainers:
            t.kill()
        self.final = True
        self.restarting = False
        self.start(restore=True, steps=0)

    def finished(self) -> bool:
        if self.gave_up:
            return True
        return not self.restarting and all(t.done for t in self.trainers)

    def describe(self) -> str:
        states = ", ".join(f"r{t.rank}:{t.state}" for t in self.trainers)
        return f"{self.name} gen {self.gen} [{states}]"


COLLECTIVE_TIMEOUT = 2.0
"""Seconds a rank waits in a collective for peers that exited before it fails."""


class SimTrainer:
    """One process of one rank. See the module docstring."""

    def __init__(
        self, job: SimJob, rank: int, node: str, gen: int, restore: bool, steps: int
    ) -> None:
        self.job = job
        self.world = job.world
        self.rank = rank
        self.node = node
        self.gen = gen
        self.restore_first = restore
        self.steps = steps
        self.name = f"{job.name}.r{rank}.g{gen}"
        self.session = f"{job.name}r{rank}g{gen}"
        self.proc = Proc(self.world.loop, self.name)
        self.data = self.world.rng.randbytes(self.world.spec.nbytes)
        self.committed: tuple[int, bytes] | None = None
        self.saves = 0
        self.done = False
        self.state = "new"
        self.saving: int | None = None
        self.plane_seen = 0
        self.saving_since = 0.0

    def start(self) -> None:
        self.proc.spawn(self.run())

    def kill(self) -> None:
        self.proc.crash()
        self.done = True
        self.saving = None

    def hung(self) -> bool:
        return self.saving is not None and self.world.loop.time() - self.saving_since > 120.0

    def _smp(self) -> Any:
        return self.world.nodes[self.node]

    async def _call_smp(self, what: str, fn: Any) -> Any:
        smp = self._smp()

        async def work() -> Any:
            current = self.world.nodes[self.node]
            if current.member is None:
                raise SnapstoreError("no SMP")
            return await fn(current.member, current.store)

        return await rpc(self.world, smp.proc, work, f"{self.name} SMP.{what}")

    async def _call_coord(self, what: str, fn: Any) -> Any:
        async def work() -> Any:
            plane = self.world.plane
            if plane is None:
                raise SnapstoreError("no coordinator")
            # The coordinator that answers, which is the one current when the call arrives,
            # not when it was sent: incarnations count per coordinator (Checker.restored).
            self.plane_seen = self.world.planes
            return await fn(plane)

        return await rpc(self.world, self.world.coordinator_proc, work, f"{self.name} coord.{what}")

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self.world.checker.fail("trainer", f"{self.name} died of {e!r} ({self.state})")

    async def _run(self) -> None:
        try:
            start = 0
            if self.restore_first:
                self.state = "restoring"
                got = await self.restore()
                if got is None:
                    self.done = True
                    self.state = "gave up"
                    return
                start = got
            for step in range(start + 1, self.steps + 1):
                self.state = f"at {step}"
                await self.job.barrier(self, step - start)
                self.state = f"saving {step}"
                await self.save(step)
                await asyncio.sleep(self.world.rng.uniform(0.01, 0.2))
            self.state = "done"
            self.done = True
        except asyncio.CancelledError:
            self.state = "killed"
            raise

    # -- saving -----------------------------------------------------------------------------

    def _next_bytes(self) -> tuple[bytes, list[list[int]] | None, int | None]:
        rng = self.world.rng
        data = bytearray(self.data)
        size = len(data)
        if self.world.spec.deltas and self.committed is not None and rng.random() < 0.7:
            at = rng.randrange(size)
            ln = min(size - at, rng.randint(1, max(1, size // 8)))
            data[at : at + ln] = rng.randbytes(ln)
            base_step, base = self.committed
            changed = _diff(base, bytes(data))
            return bytes(data), changed or [[0, 1]], base_step
        return rng.randbytes(size), None, None

    async def save(self, step: int) -> None:
        k = self.world.cfg.k
        job = self.job.name
        data, changed, base_step = self._next_bytes()
        size = len(data)
        self.saves += 1
        staging = f"{self.session}/{self.saves}"
        self.saving, self.saving_since = step, self.world.loop.time()
        self.world.checker.saving(job, step)
        try:
            lease = await self._call_smp("lease", lambda m, s: m.lease(job, self.rank, size))
            with open(lease.path, "r+b") as f:
                f.write(data)
            sums = _sums(data, k)
            # As the client does: one call stages and waits a first time.
            outcome: Outcome = await self._call_smp(
                "stage_and_wait",
                lambda m, s: m.stage_and_wait(
                    job,
                    self.rank,
                    step,
                    size,
                    self.job.size,
                    staging,
                    changed,
                    base_step,
                    None,
                    WAIT,
                    size,
                ),
            )
        except (SnapstoreError, OSError) as e:
            # The step cannot be saved here (the SMP is down, the step refused): the
            # trainer's future fails and training goes on; as the client does, it tells
            # the coordinator, so the other ranks' waits end now.
            self.world.log(f"{self.name} step {step}: staging failed: {e}")
            self.saving = None
            self.data = data
            with contextlib.suppress(SnapstoreError):
                await self._call_coord(
                    "abandon", lambda p: p.abandon(job, self.rank, step, staging)
                )
            return
        self.data = data
        while True:
            if outcome.status is OutcomeStatus.PENDING:
                try:
                    outcome = await self._call_smp(
                        "wait_outcome",
                        lambda m, s: m.wait_outcome(job, self.rank, step, staging, WAIT, size),
                    )
                except SnapstoreError as e:
                    # Its SMP died while it waited: the save fails, as a client's future would.
                    self.world.log(f"{self.name} step {step}: wait failed: {e}")
                    break
                continue
            committed = outcome.status is OutcomeStatus.COMMITTED
            self.world.checker.outcome(job, self.rank, step, sums, committed, outcome.reason)
            if committed:
                self.committed = (step, data)
            if outcome.restore:
                # RestoreRequiredError at the next save: the process fails and the
                # launcher restarts every rank.
                self.world.log(f"{self.name}: must restore ({outcome.reason})")
                self.saving = None
                self.kill()
                self.job.died(self)
                return
            break
        self.saving = None

    # -- restoring ----------------------------------------------------------------------------

    async def restore(self) -> int | None:
        """Restore the job's committed step; None if it cannot be (the job gives up)."""
        job = self.job.name
        for _attempt in range(40):
            try:
                reply = await self._call_coord(
                    "restore_plan",
                    lambda p: p.restore_plan(
                        job, self.rank, self.node, self.session, True, self.job.size, 30.0
                    ),
                )
            except SnapstoreError:
                await asyncio.sleep(0.5)
                continue
            if isinstance(reply, RestorePlan):
                got = await self._read(reply)
                if got is not None:
                    return got
                continue
            assert isinstance(reply, ErrorReply)
            if reply.kind is ErrorKind.NOT_FOUND:
                persisted = await self._persisted(reply.message)
                if persisted is not None:
                    return persisted
                plane = self.world.plane
                js = plane.jobs.get(job) if plane is not None else None
                self.world.checker.restored(
                    job,
                    self.rank,
                    js.life.incarnation if js is not None else -1,
                    0,
                    self.plane_seen,
                )
                return 0  # nothing committed: start over
            if reply.kind is ErrorKind.UNRECOVERABLE:
                if not reply.fallback:
                    self.world.checker.unrecoverable(job, self.rank, reply.lost, reply.message)
                persisted = await self._persisted(reply.message)
                if persisted is not None:
                    return persisted
                self.job.gave_up = reply.message
                return None
            await asyncio.sleep(0.5)
        self.job.gave_up = f"{self.name}: restore kept failing"
        return None

    async def _read(self, plan: RestorePlan) -> int | None:
        job = self.job.name
        try:
            if plan.local:
                opened = await self._call_smp(
                    "open_committed",
                    lambda m, s: _now(
                        s.open_committed(job, self.rank, plan.step, plan.size, plan.sums)
                    ),
                )
            else:
                opened = await self._call_smp(
                    "fetch",
                    lambda m, s: _now(
                        s.fetch(job, self.rank, plan.step, plan.size, plan.sums, plan.home_peer)
                    ),
                )
        except (SnapstoreError, OSError) as e:
            self.world.log(f"{self.name}: reading step {plan.step} failed: {e}")
            await asyncio.sleep(0.3)
            return None
        if opened.path is None or opened.bad:
            try:
                await self._call_coord(
                    "repair", lambda p: p.repair(job, self.rank, plan.step, list(opened.bad))
                )
            except SnapstoreError:
                await asyncio.sleep(0.3)
            return None
        try:
            with open(opened.path, "rb") as f:
                data = f.read(plan.size)
        except OSError:
            return None  # the copy was retired before it was read (a newer record): again
        if _sums(data, self.world.cfg.k) != tuple(plan.sums):
            return None  # it changed while read (a newer step reused the slot): ask again
        self._restored(data, plan.step, plan.incarnation)
        return plan.step

    async def _persisted(self, reason: str) -> int | None:
        job = self.job.name
        if not self.world.spec.persist_every:
            return None
        try:
            plan = await self._call_coord(
                "persisted_plan",
                lambda p: p.persisted_plan(job, self.rank, self.session, reason, True, 30.0),
            )
        except SnapstoreError:
            return None
        if isinstance(plan, ErrorReply):
            return None
        try:
            buf = read_rank(str(plan["path"]), self.rank)
        except SnapstoreError as e:
            self.world.log(f"{self.name}: persisted read failed: {e}")
            return None
        self._restored(bytes(buf), int(plan["step"]), int(plan.get("incarnation", 0)))
        return int(plan["step"])

    def _restored(self, data: bytes, step: int, incarnation: int) -> None:
        self.data = data
        self.committed = None
        self.world.checker.restored(self.job.name, self.rank, incarnation, step, self.plane_seen)


async def _now(value: Any) -> Any:
    return value


def _diff(a: bytes, b: bytes) -> list[list[int]]:
    out: list[list[int]] = []
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            if out and out[-1][0] + out[-1][1] == i:
                out[-1][1] += 1
            else:
                out.append([i, 1])
    return out
