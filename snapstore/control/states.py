"""Lifecycles of the control plane as explicit states, one method per transition.

Three machines (docs/architecture.md draws them):

- :class:`NodeLife` -- one store node as the coordinator sees it:
  ``ALIVE -> SUSPECT`` (silent: logged, never acted on), ``-> DEAD`` (Ray
  confirms its SMP process or node died), ``DEAD -> LOST`` (dead for
  ``reprotect_delay``: its data is rebuilt elsewhere), and back to
  ``ALIVE`` when it is heard again or its SMP restarts.
- :class:`StepLife` -- one step (and record version) of one job:
  ``COLLECTING -> PREPARING -> COMMITTED``, or ``FAILED``. The commit point
  is the single transition to ``COMMITTED``; failing a committed step is a
  no-op that says so.
- :class:`JobLife` -- one job: ``EMPTY`` (nothing in memory) ``-> ACTIVE``
  (a committed step) ``<-> RESTORING`` (a restarted rank opened a new
  incarnation, or memory was given up for the persisted step; every rank
  restores one pinned step, and only ranks that did may save, until all
  of them have), and ``DROPPED``.

An illegal transition raises :class:`snapstore.errors.IllegalTransitionError`
naming the machine, its state and the transition refused.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from snapstore.errors import IllegalTransitionError

__all__ = [
    "JobLife",
    "JobPhase",
    "NodeLife",
    "NodePhase",
    "Redundancy",
    "StepLife",
    "StepPhase",
]


class NodePhase(str, enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    """Silent for ``failure_timeout``: logged; nothing is aborted or rolled back."""
    DEAD = "dead"
    """Its SMP process or Ray node died (Ray says so): not read from; steps on it abort."""
    LOST = "lost"
    """Dead for ``reprotect_delay``: its data is rebuilt elsewhere and groups re-formed."""


class StepPhase(str, enum.Enum):
    COLLECTING = "collecting"
    PREPARING = "preparing"
    COMMITTED = "committed"
    FAILED = "failed"


class JobPhase(str, enum.Enum):
    EMPTY = "empty"
    ACTIVE = "active"
    RESTORING = "restoring"
    DROPPED = "dropped"


class Redundancy(str, enum.Enum):
    """How well a job's committed step is protected (shown by status and REST)."""

    NONE = "none"
    PROTECTED = "protected"
    DEGRADED = "degraded"
    UNPROTECTED = "unprotected"
    LOST = "lost"


def _refuse(machine: str, state: enum.Enum, transition: str) -> IllegalTransitionError:
    return IllegalTransitionError(machine, str(state.value), transition)


@dataclass
class NodeLife:
    """The lifecycle of one store node, as the coordinator sees it."""

    node: str
    incarnation: str
    phase: NodePhase = NodePhase.ALIVE
    since: float = 0.0
    """Clock time of the last transition."""

    @property
    def name(self) -> str:
        return f"node {self.node[:12]}"

    @property
    def readable(self) -> bool:
        """Its SMP may be read from and given work (alive, or merely silent)."""
        return self.phase in (NodePhase.ALIVE, NodePhase.SUSPECT)

    def silent(self, now: float) -> None:
        if self.phase is not NodePhase.ALIVE:
            raise _refuse(self.name, self.phase, "be marked silent")
        self.phase, self.since = NodePhase.SUSPECT, now

    def heard(self, now: float) -> bool:
        """Heard from again; True if it was suspect (it is alive again)."""
        if self.phase is NodePhase.SUSPECT:
            self.phase, self.since = NodePhase.ALIVE, now
            return True
        if self.phase is NodePhase.ALIVE:
            return False
        raise _refuse(self.name, self.phase, "be heard from (a dead SMP re-registers)")

    def died(self, now: float) -> None:
        if self.phase not in (NodePhase.ALIVE, NodePhase.SUSPECT):
            raise _refuse(self.name, self.phase, "die")
        self.phase, self.since = NodePhase.DEAD, now

    def declare_lost(self, now: float) -> None:
        if self.phase is not NodePhase.DEAD:
            raise _refuse(self.name, self.phase, "be declared lost")
        self.phase, self.since = NodePhase.LOST, now

    def restarted(self, incarnation: str, now: float) -> NodePhase:
        """Its SMP registered with a new incarnation; returns the phase it left."""
        if incarnation == self.incarnation:
            raise _refuse(self.name, self.phase, "restart with the same incarnation")
        previous = self.phase
        self.incarnation, self.phase, self.since = incarnation, NodePhase.ALIVE, now
        return previous


@dataclass
class StepLife:
    """The lifecycle of one step (record version) of one job at the coordinator."""

    job: str
    step: int
    version: int = 0
    phase: StepPhase = StepPhase.COLLECTING
    reason: str = ""
    """Why it failed."""

    @property
    def name(self) -> str:
        v = f" version {self.version}" if self.version else ""
        return f"job {self.job!r} step {self.step}{v}"

    @property
    def open(self) -> bool:
        return self.phase in (StepPhase.COLLECTING, StepPhase.PREPARING)

    def all_staged(self) -> None:
        if self.phase is not StepPhase.COLLECTING:
            raise _refuse(self.name, self.phase, "start preparing")
        self.phase = StepPhase.PREPARING

    def commit(self) -> None:
        """The commit point: from here on the step is committed, whatever happens."""
        if self.phase is not StepPhase.PREPARING:
            raise _refuse(self.name, self.phase, "commit")
        self.phase = StepPhase.COMMITTED

    def fail(self, reason: str) -> bool:
        """Fail the step; False (and nothing changes) when it is already committed or failed."""
        if not self.open:
            return False
        self.phase, self.reason = StepPhase.FAILED, reason
        return True


@dataclass
class JobLife:
    """The lifecycle of one job at the coordinator."""

    job: str
    phase: JobPhase = JobPhase.EMPTY
    incarnation: int = 0
    """Counts restore windows: a restarted rank opens a new incarnation of the job."""
    pinned: int | None = None
    """While RESTORING: the step every rank of this incarnation restores (None: none in
    memory; the first persisted plan pins its step)."""
    restored: set[int] = field(default_factory=set)
    """While RESTORING: ranks that restored in this incarnation."""

    @property
    def name(self) -> str:
        return f"job {self.job!r}"

    def committed(self) -> None:
        if self.phase is JobPhase.DROPPED:
            raise _refuse(self.name, self.phase, "commit a step")
        if self.phase is JobPhase.RESTORING:
            raise _refuse(self.name, self.phase, "commit a step before every rank restored")
        self.phase = JobPhase.ACTIVE

    def begin_restore(self, step: int | None) -> None:
        """A restarted rank restores: a new incarnation; every rank of it gets ``step``
        (None: nothing is in memory, every rank starts over or from the persisted tier)."""
        if self.phase not in (JobPhase.ACTIVE, JobPhase.EMPTY):
            raise _refuse(self.name, self.phase, "begin a restore")
        self.phase, self.pinned = JobPhase.RESTORING, step
        self.incarnation += 1
        self.restored = set()

    def rank_restored(self, rank: int, world_size: int) -> bool:
        """Rank ``rank`` restored in this incarnation; True when that closed the window."""
        if self.phase is not JobPhase.RESTORING:
            raise _refuse(self.name, self.phase, f"record rank {rank}'s restore")
        self.restored.add(rank)
        if len(self.restored) >= world_size:
            self.end_restore()
            return True
        return False

    def end_restore(self) -> None:
        if self.phase is not JobPhase.RESTORING:
            raise _refuse(self.name, self.phase, "end a restore")
        self.phase, self.pinned = JobPhase.ACTIVE, None
        self.restored = set()

    def memory_dropped(self, step: int) -> None:
        """The in-memory step was given up: a new incarnation in which every rank restores
        persisted step ``step`` (a declared fallback)."""
        if self.phase is JobPhase.DROPPED:
            raise _refuse(self.name, self.phase, "drop its memory")
        self.phase, self.pinned = JobPhase.RESTORING, step
        self.restored = set()
        self.incarnation += 1

    def drop(self) -> None:
        self.phase, self.pinned = JobPhase.DROPPED, None
