"""The node interface: what the control plane asks of one node's memory.

:class:`NodeStore` is every operation on a node's segments and bytes that
the control plane (its member agent, its group leader, the coordinator)
needs. Two implementations keep one contract, checked by one test suite
(``tests/test_node_contract.py``):

- :class:`snapstore.node.store.ShmNodeStore` -- the real one: segments in
  shared memory, byte work through ISA-L, peers read over shared memory or
  TCP; it lives in the node's SMP actor;
- :class:`snapstore.bench.scale_store.MemNodeStore` -- bookkeeping without
  bytes (byte work as modelled time), for ``bench.scale``'s thousands of
  simulated nodes. (The deterministic simulation, ``tests/sim``, runs the
  real store on small buffers.)

Call protocol (who calls what, in which order; every method is
thread-safe and may be retried):

1. A trainer: :meth:`lease` (after the member asked the coordinator to
   abandon the steps :meth:`abandon_candidates` named), writes the slot,
   then :meth:`stage` (checksums, delta).
2. The group leader: :meth:`build_parity` on each parity holder, then
   :meth:`keep_prepared` (the group's slice of the record) on every member.
3. The member, on the coordinator's decision: :meth:`commit` of a prepared
   (step, version), or :meth:`abort` of a step's stagings. Commit and abort
   of one job are applied in the order they arrive, under the store's lock;
   a commit is refused (nothing changes) when a slot of a rank homed here is
   gone, and an abort never touches the committed step.
4. Restores: :meth:`open_committed`, :meth:`fetch`; the coordinator's
   :meth:`rebuild` and :meth:`verify` orders.
5. The persisted tier: :meth:`hold` / :meth:`release`, :meth:`persist`,
   :meth:`verify_persisted`; :meth:`forget` when the job restores from disk.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

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

__all__ = ["NodeStore"]


class NodeStore(Protocol):
    """One node's segments and byte work. See the module docstring for the protocol."""

    node_id: str
    peer: PeerInfo

    def sizes(self) -> dict[str, int]:
        """Bytes held by kind: used, data, parity, spare, work, delta; and the budget."""
        ...

    def counters(self) -> dict[str, int]: ...

    # -- saving ---------------------------------------------------------------------

    def abandon_candidates(self, job: str, rank: int) -> list[int]:
        """Steps in progress whose slot a lease of ``rank`` could reuse once abandoned."""
        ...

    def lease(self, job: str, rank: int, nbytes: int, abandoned: Collection[int]) -> Lease:
        """A slot of at least ``nbytes`` for ``rank``'s next step; never a committed one,
        and a slot of a step in progress only if that step is in ``abandoned``."""
        ...

    def stage(
        self,
        job: str,
        rank: int,
        step: int,
        size: int,
        changed: list[list[int]] | None,
        base_step: int | None,
    ) -> RankStaged:
        """The trainer wrote ``step`` into its lease: name the slot, checksum, keep a delta."""
        ...

    def build_parity(self, order: WorkOrder) -> WorkResult: ...

    def keep_prepared(self, record: StepRecord) -> None:
        """Remember a prepared slice of the record until it is committed or aborted."""
        ...

    def commit(self, job: str, step: int, version: int, hold: str, hold_ttl: float) -> CommitResult:
        """Commit the prepared (step, version): keep its slots, free older ones."""
        ...

    def abort(self, job: str, step: int, ranks: Collection[int] | None) -> None:
        """Step ``step`` of ``ranks`` (all if None) will not commit: free those slots and
        drop prepared slices of that step."""
        ...

    def record(self, job: str) -> StepRecord | None: ...

    def records(self) -> dict[str, StepRecord]: ...

    def prepared(self) -> list[StepRecord]: ...

    # -- restoring ------------------------------------------------------------------

    def open_committed(
        self, job: str, rank: int, step: int, size: int, sums: tuple[int, ...]
    ) -> Opened: ...

    def fetch(
        self, job: str, rank: int, step: int, size: int, sums: tuple[int, ...], peer: PeerInfo
    ) -> Opened: ...

    def rebuild(self, order: WorkOrder) -> WorkResult: ...

    def verify(self, record: StepRecord) -> VerifyReport: ...

    # -- the persisted tier ---------------------------------------------------------

    def hold(self, job: str, step: int, token: str, ttl: float) -> list[int]: ...

    def release(self, token: str) -> None: ...

    def persist(self, order: PersistOrder) -> PersistResult: ...

    def verify_persisted(self, path: str, ranks: list[int]) -> dict[int, str | None]: ...

    def forget(self, job: str) -> None: ...

    def drop_job(self, job: str) -> None: ...
