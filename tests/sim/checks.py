"""The invariants of the store, checked after every event of a simulated schedule.

(a) All ranks of a job that restore in one incarnation get the same step.
(b) A committed step stays restorable while at most m nodes of each of its
    groups lost their memory since it was committed (the nodes the record
    names hold the files it says they hold).
(c) No staging is both committed and failed: a trainer told its step
    failed never finds its bytes in a committed record, and no two trainers
    are told different things of one staging.
(d) The committed step never moves backward, except through a declared
    fallback to the persisted tier (or when more than m nodes of a group
    lost their memory).
(e) Every save ends (committed or failed) once faults stop; none hangs.
(f) Past m losses, the error names the missing chunks.

Plus what the store promises about stalls: a node that is stalled, not
crashed, is never declared dead.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from snapstore.control.health import rank_restorable
from snapstore.control.jobs import Attempt, JobRecord
from snapstore.control.states import StepPhase
from snapstore.node.segments import data_name, parity_name

if TYPE_CHECKING:
    from snapstore.control.plane import ControlPlane
    from tests.sim.world import World

__all__ = ["Checker", "Violation"]


class Violation(Exception):
    """An invariant failed; ``kind`` names which."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}")


class Checker:
    """Keeps what trainers were told and what the coordinator decided; checks invariants."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.violation: Violation | None = None
        self.told_committed: dict[tuple[str, int, int], tuple[int, ...]] = {}
        self.told_failed: dict[tuple[str, int, int], set[tuple[int, ...]]] = defaultdict(set)
        self.max_told: dict[str, int] = defaultdict(lambda: -1)
        self.restores: dict[tuple[str, str, int], set[int]] = defaultdict(set)
        self.seen: dict[str, tuple[int, int, float]] = {}
        self.last_step: dict[str, int] = {}
        self.fallbacks: set[str] = set()
        self.stalls: dict[str, float] = {}
        self.crashes: dict[str, list[float]] = {}
        self.events_seen = 0
        self.dirty = True
        """Something that can change restorability happened (a fault, a commit)."""
        self._events = 0
        self._records: dict[str, JobRecord] = {}
        self.first_saved: dict[tuple[str, int], float] = {}
        """When the first staging of each step began: memory lost after it counts
        against the step's m (a node may lose it between prepare and commit)."""
        self._failed: dict[int, tuple[str, Attempt]] = {}
        """Attempts the coordinator failed (by identity): none may ever open or commit."""

    def fail(self, kind: str, detail: str) -> None:
        if self.violation is None:
            self.violation = Violation(kind, detail)
            self.world.log(f"VIOLATION {kind}: {detail}")
        raise self.violation

    def new_plane(self, plane: ControlPlane) -> None:
        """A restarted coordinator: its record may be older than the dead one's when no
        node applied the newest decision (no trainer heard of it); what trainers were
        told is still checked."""
        self.events_seen = 0
        self.last_step.clear()
        self._records.clear()

    # -- what trainers report -----------------------------------------------------------

    def outcome(
        self, job: str, rank: int, step: int, sums: tuple[int, ...], committed: bool, why: str
    ) -> None:
        key = (job, rank, step)
        if not committed:
            rec = self._records.get(job)
            if rec is not None and rec.step == step:
                entry = rec.entry(rank)
                if entry is not None and tuple(entry.sums) == sums:
                    self.fail(
                        "c", f"{key}: its trainer was told failed ({why}), yet it is committed"
                    )
        if committed:
            prev = self.told_committed.get(key)
            if prev is not None and prev != sums:
                self.fail("c", f"{key}: two different stagings told committed")
            if sums in self.told_failed[key]:
                self.fail("c", f"{key}: a staging told failed is now told committed")
            self.told_committed[key] = sums
            self.max_told[job] = max(self.max_told[job], step)
        else:
            if self.told_committed.get(key) == sums:
                self.fail("c", f"{key}: a staging told committed is now told failed ({why})")
            self.told_failed[key].add(sums)
        self.after_event()

    def saving(self, job: str, step: int) -> None:
        """A trainer starts saving ``step``: its bytes are in memory from about now."""
        self.first_saved.setdefault((job, step), self.world.loop.time())

    def restored(self, job: str, rank: int, incarnation: int, step: int, plane: int) -> None:
        # Incarnations count per coordinator: a restarted one starts over.
        key = (job, str(incarnation), plane)
        self.restores[key].add(step)
        self.world.log(f"{job} rank {rank} restored step {step} (incarnation {incarnation})")
        if step < self.max_told[job] and self._too_many_lost(job):
            # Memory past what the store promises to survive is gone (no persisted step
            # newer than this one): the job saves the later steps anew.
            self._forget_told(job, step)
        if len(self.restores[key]) > 1:
            self.fail(
                "a",
                f"job {job} incarnation {incarnation}: ranks restored steps "
                f"{sorted(self.restores[key])}",
            )
        self.after_event()

    def unrecoverable(self, job: str, rank: int, lost: tuple[str, ...], message: str) -> None:
        self.world.log(f"{job} rank {rank} unrecoverable: {message}")
        if not lost:
            self.fail("f", f"job {job} rank {rank}: unrecoverable without naming chunks: {message}")

    def crashed(self, node: str) -> None:
        self.crashes.setdefault(node, []).append(self.world.loop.time())
        self.dirty = True

    def stalled(self, node: str, until: float) -> None:
        self.stalls[node] = max(self.stalls.get(node, 0.0), until)

    # -- after every event ----------------------------------------------------------------

    def after_event(self) -> None:
        if self.violation is not None:
            raise self.violation
        plane = self.world.plane
        if plane is None or not plane._ready:
            return
        self._stall_verdicts(plane)
        self._events += 1
        # Restorability reads the nodes' files: after what can change it, and every
        # few events besides (a store deleting a file it must keep shows there).
        full = self.dirty or self._events % 16 == 0
        for name, job in plane.jobs.items():
            self._failed_stays_failed(name, job.attempts.values())
            rec = job.record
            if rec is None:
                continue
            if self._records.get(name) is not rec:
                self._records[name] = rec
                full = True
                self._committed_not_failed(name, rec)
            self._not_backward(name, rec.step, plane)
            if full:
                self._restorable(name, rec, plane)
        if full:
            self.dirty = False

    def _stall_verdicts(self, plane: ControlPlane) -> None:
        log = plane.events._events
        if not log or log[-1]["seq"] <= self.events_seen:
            return
        fresh = [e for e in list(log)[-8:] if e["seq"] > self.events_seen]
        self.events_seen = log[-1]["seq"]
        for e in fresh:
            if e["kind"] == "memory_dropped":
                self._fell_back(str(e.get("job")), int(e.get("fallback_to", -1)))
            node = e.get("node")
            if e["kind"] != "node_dead" or node is None:
                continue
            smp = self.world.nodes.get(node)
            crashed = smp is None or smp.proc is None or not smp.proc.alive
            recently = any(t > self.world.loop.time() - 5.0 for t in self.crashes.get(node, []))
            if (
                not (crashed or recently)
                and self.stalls.get(node, -1.0) >= self.world.loop.time() - 2.0
            ):
                self.fail("stall", f"node {node[:3]} was stalled, not dead, and declared dead")

    def _fell_back(self, job: str, step: int) -> None:
        """A declared fallback to persisted ``step``: later steps are saved anew."""
        self.fallbacks.add(job)
        self._forget_told(job, step)
        self.last_step.pop(job, None)
        self._records.pop(job, None)

    def _forget_told(self, job: str, step: int) -> None:
        """The job resumes from ``step``: what trainers were told of later steps is history."""
        for table in (self.told_committed, self.told_failed):
            for key in [k for k in table if k[0] == job and k[2] > step]:
                del table[key]
        self.max_told[job] = min(self.max_told[job], step)
        for saved in [k for k in self.first_saved if k[0] == job and k[1] > step]:
            del self.first_saved[saved]

    def _failed_stays_failed(self, name: str, attempts: Iterable[Attempt]) -> None:
        """An attempt the coordinator failed never opens or commits again (it is watched
        after it leaves the job's attempts too: a commit removes it from there)."""
        for att in attempts:
            if att.life.phase is StepPhase.FAILED:
                self._failed[id(att)] = (name, att)
        for job, att in self._failed.values():
            if att.life.phase is not StepPhase.FAILED:
                self.fail(
                    "c",
                    f"job {job} step {att.step}: the coordinator failed it "
                    f"({att.life.reason}), then it was {att.life.phase.value} again",
                )

    def _committed_not_failed(self, name: str, rec: JobRecord) -> None:
        for r in rec.ranks:
            entry = rec.entry(r)
            assert entry is not None
            if tuple(entry.sums) in self.told_failed.get((name, r, rec.step), ()):
                self.fail(
                    "c",
                    f"job {name} step {rec.step} is committed with rank {r}'s staging that its "
                    "trainer was told failed",
                )

    def _not_backward(self, name: str, step: int, plane: ControlPlane) -> None:
        prev = self.last_step.get(name)
        self.last_step[name] = step
        if prev is not None and step < prev and not self._declared(name, plane):
            self.fail("d", f"job {name}: committed step moved back from {prev} to {step}")
        told = self.max_told.get(name, -1)
        if step < told and not self._declared(name, plane) and not self._too_many_lost(name):
            self.fail("d", f"job {name}: committed step {step} but a trainer was told {told}")

    def _declared(self, name: str, plane: ControlPlane) -> bool:
        if name in self.fallbacks:
            return True
        for _e in plane.events.recent(2000, kinds=("memory_dropped",), job=name):
            self.fallbacks.add(name)
            return True
        return False

    def _too_many_lost(self, name: str) -> bool:
        return any(smp.memory_lost_at for smp in self.world.nodes.values())

    def _restorable(self, name: str, rec: JobRecord, plane: ControlPlane) -> None:
        key = (rec.step, rec.version)
        seen = self.seen.get(name)
        if seen is None or seen[:2] != key:
            now = self.world.loop.time()
            since = min(now, self.first_saved.get((name, rec.step), now))
            self.seen[name] = (rec.step, rec.version, since)
        else:
            since = seen[2]
        world = self.world
        intact: set[str] = set()
        for node, smp in world.nodes.items():
            if smp.lost or any(t >= since for t in smp.memory_lost_at):
                continue
            intact.add(node)
        for piece in rec.slices:
            members = set(piece.groups[0]) if piece.groups else piece.nodes()
            gone = members - intact
            if len(gone) > rec.m or (not piece.groups and gone):
                return  # more than the store promises to survive
        job = plane.jobs[name]
        holding = {n for n in intact if self._holds(world, n, rec, job.relocated)}
        for r in rec.ranks:
            where = job.relocated.get(r)
            if where is not None and where in holding:
                continue
            held = rec.slice_of(r)
            assert held is not None
            if not rank_restorable(held, r, holding):
                self.fail(
                    "b",
                    f"job {name} step {rec.step} v{rec.version}: rank {r} cannot be restored "
                    f"with nodes {sorted(n[:3] for n in holding)} holding their chunks",
                )

    def _holds(self, world: World, node: str, rec: JobRecord, relocated: dict[int, str]) -> bool:
        """Whether the node still has every file of the record it should have."""
        directory = world.nodes[node].directory
        piece = rec.slice_on(node)
        if piece is None:
            return True
        for r in piece.ranks_on(node):
            if relocated.get(r, node) == node and not os.path.exists(
                os.path.join(directory, data_name(rec.job, r, rec.step))
            ):
                return False
        return not (
            piece.parity_on(node)
            and not os.path.exists(
                os.path.join(directory, parity_name(rec.job, rec.step, rec.version))
            )
        )

    # -- at the end -------------------------------------------------------------------------

    def check(self) -> None:
        self.after_event()

    def final(self) -> None:
        """Every save ended; every job's last restores agreed and matched their bytes."""
        self.after_event()
        for job in self.world.jobs.values():
            for t in job.all_trainers:
                if t.hung():
                    self.fail("e", f"{t.name}: a save of step {t.saving} never ended")

    def summary(self) -> dict[str, Any]:
        return {"restores": len(self.restores), "told": len(self.told_committed)}
