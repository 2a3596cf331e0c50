"""The control plane's agent on every node: between its trainers, its store and its leader.

One :class:`Member` per SMP. It

- takes its trainers' stagings (:meth:`staged`) and tells its group leader,
  one :class:`NodeNotice` per node per step (notices coalesce while one is
  in flight, and are re-sent until the step is decided, so a lost message
  or a new leader costs a second, not the step);
- applies the coordinator's decisions to its store in the order they
  arrive (:meth:`decide`) and answers its trainers' waits
  (:meth:`wait_outcome`) with the outcome and the next slot's lease: a
  trainer hears of its commit from its own node;
- hosts its group's :class:`snapstore.control.leader.Leader` when the
  membership names it leader;
- does the byte work leaders and the coordinator order (through its
  :class:`snapstore.node.api.NodeStore`), and heartbeats to its leader.

Whether a rank's step committed is decided by the bytes: the step committed
for the rank iff the committed record's piece checksums of that rank are
those its staging produced. A waiter whose node misses a decision asks the
coordinator (:meth:`CoordinatorLink.step_status`) after ``status_after``
seconds: every wait ends, committed, failed or timed out.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from snapstore.config import StoreConfig
from snapstore.control.leader import Leader
from snapstore.control.links import Fabric, NodeSnapshot
from snapstore.control.messages import (
    Decision,
    MemberBeat,
    NodeConfig,
    NodeInfo,
    NodeNotice,
    Outcome,
    OutcomeStatus,
    StagedEntry,
    term_of,
)
from snapstore.control.relay import Relay
from snapstore.control.runtime import Clock, Tasks
from snapstore.errors import SnapstoreError
from snapstore.format.record import StepRecord
from snapstore.format.work import (
    CommitResult,
    Lease,
    PersistOrder,
    PersistResult,
    RankStaged,
    VerifyReport,
    WorkOrder,
    WorkResult,
)
from snapstore.node.api import NodeStore

__all__ = ["Member", "Offload"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

Offload = Callable[..., Awaitable[Any]]
"""``await offload(fn, *args)``: run a blocking store call off the event loop."""

RPC_TIMEOUT = 30.0
DECIDED_KEPT = 16
"""Decisions remembered per job, for waits that arrive after them."""


@dataclass
class _Waiter:
    rank: int
    step: int
    session: str
    sums: tuple[int, ...]
    since: float
    future: asyncio.Future[Outcome]


@dataclass
class _Decided:
    """What a member knows was decided for one job."""

    committed_step: int | None = None
    committed_version: int = -1
    stats: dict[str, Any] = field(default_factory=dict)
    history: collections.OrderedDict[int, dict[int, tuple[int, ...]]] = field(
        default_factory=collections.OrderedDict
    )
    """Committed steps this node learned of: rank -> piece sums, for its ranks."""
    failed: collections.OrderedDict[int, list[tuple[frozenset[str], str, bool]]] = field(
        default_factory=collections.OrderedDict
    )


class Member:
    """The control-plane agent of one node. See the module docstring."""

    def __init__(
        self,
        store: NodeStore,
        fabric: Fabric,
        clock: Clock,
        cfg: StoreConfig,
        incarnation: str,
        offload: Offload,
        describe: Callable[[], NodeInfo],
    ) -> None:
        self.store = store
        self.node = store.node_id
        self.fabric = fabric
        self.clock = clock
        self.cfg = cfg
        self.incarnation = incarnation
        self.offload = offload
        self.describe = describe
        self.config: NodeConfig | None = None
        self.leader: Leader | None = None
        self.relay = Relay(fabric)
        """Forwards the reports of leaders whose relay this node is (any node may be)."""
        self.tasks = Tasks()
        self._staged: dict[tuple[str, int], dict[int, StagedEntry]] = {}
        self._staged_at: dict[tuple[str, int], float] = {}
        self._waiters: dict[tuple[str, int], list[_Waiter]] = {}
        self._decided: dict[str, _Decided] = {}
        self._order: dict[str, asyncio.Lock] = {}  # job -> decisions applied one at a time
        self._turns: dict[tuple[str, int], asyncio.Lock] = {}  # (job, rank): lease, stage
        self._seen = -1  # the newest epoch of a configure or decision that reached this node
        self._fence = -1  # decisions of this coordinator term or older are refused (snapshot)
        self._inflight: set[tuple[str, int]] = set()
        self._dirty: set[tuple[str, int]] = set()
        self._last_beat_ok = 0.0
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start heartbeats and re-sends (on the running loop)."""
        self._last_beat_ok = self.clock.now()
        self.tasks.spawn(self._beat_loop(), "member heartbeats")
        self.tasks.spawn(self._resend_loop(), "member re-sends")

    def stop(self) -> None:
        self._stopped = True
        self.tasks.cancel_all()
        self.relay.stop()
        if self.leader is not None:
            self.leader.stop()

    async def configure(self, config: NodeConfig) -> None:
        """A new membership epoch: this node's group and leader (maybe itself)."""
        self._seen = max(self._seen, config.epoch)
        if self.config is not None and config.epoch < self.config.epoch:
            return  # a late message from an older epoch
        if config.incarnation and config.incarnation != self.incarnation:
            return  # meant for this node's former SMP: the coordinator must hear of this one
        self.config = config
        if config.leader == self.node:
            if self.leader is None or self.leader.config.epoch != config.epoch:
                if self.leader is not None:
                    self.leader.stop()
                self.leader = Leader(
                    self.node, config, self.store, self.fabric, self.clock, self.cfg, local=self
                )
                self.leader.start()
        elif self.leader is not None:
            self.leader.stop()
            self.leader = None
        # The new leader knows nothing of steps in progress: tell it.
        for key in list(self._staged):
            self._notify(*key)

    # -- trainers -------------------------------------------------------------------

    async def lease(self, job: str, rank: int, nbytes: int) -> Lease:
        """A slot for ``rank``'s next step; slots of undecided steps are given up only once
        the coordinator has ended those steps.

        Leases and stagings of one rank take turns: the steps given up are judged
        while the coordinator is asked, and a staging in between (a restarted
        trainer's, while its predecessor's lease was on its way) would otherwise be
        given up with them."""
        async with self._rank_turn(job, rank):
            abandoned: list[int] = []
            for step in self.store.abandon_candidates(job, rank):
                if self._known(job, step, rank) is not None:
                    abandoned.append(step)
                    continue
                entry = self._staged.get((job, step), {}).get(rank)
                session = entry.session if entry is not None else ""
                reply = await asyncio.wait_for(
                    self.fabric.coordinator().abandon(job, rank, step, session), RPC_TIMEOUT
                )
                if reply.abandoned:
                    abandoned.append(step)
            lease: Lease = await self.offload(self.store.lease, job, rank, nbytes, abandoned)
            return lease

    def _rank_turn(self, job: str, rank: int) -> asyncio.Lock:
        return self._turns.setdefault((job, rank), asyncio.Lock())

    async def staged(
        self,
        job: str,
        rank: int,
        step: int,
        size: int,
        world_size: int,
        session: str,
        changed: list[list[int]] | None = None,
        base_step: int | None = None,
        client: dict[str, float] | None = None,
    ) -> RankStaged:
        """A trainer wrote ``step`` into its lease: checksum it and tell the leader.

        ``client``: what the trainer's client counted since its last save
        (waits, skipped saves, bytes copied), folded into the store's metrics.
        """
        async with self._rank_turn(job, rank):
            staged: RankStaged = await self.offload(
                self.store.stage, job, rank, step, size, changed, base_step
            )
        key = (job, step)
        entry = StagedEntry(staged, session, world_size, dict(client or {}))
        self._staged.setdefault(key, {})[rank] = entry
        self._staged_at.setdefault(key, self.clock.now())
        self._notify(job, step)
        return staged

    async def stage_and_wait(
        self,
        job: str,
        rank: int,
        step: int,
        size: int,
        world_size: int,
        session: str,
        changed: list[list[int]] | None,
        base_step: int | None,
        client: dict[str, float] | None,
        timeout: float,
        next_size: int = 0,
    ) -> Outcome:
        """:meth:`staged`, then :meth:`wait_outcome` in the same call: a trainer's save is one
        call to its node, not two (a Ray call costs the callee about a millisecond of CPU
        on a 2-core machine, bench.scale's "bare Ray call"; most of an SMP's CPU per save
        is Ray's, docs/performance-store.md). A staging that fails raises, as
        :meth:`staged` does; the wait never does: what keeps it from an outcome comes back
        PENDING, and the trainer waits again with :meth:`wait_outcome`."""
        await self.staged(job, rank, step, size, world_size, session, changed, base_step, client)
        try:
            return await self.wait_outcome(job, rank, step, session, timeout, next_size)
        except (SnapstoreError, asyncio.TimeoutError) as e:
            return Outcome(OutcomeStatus.PENDING, step, f"the wait after staging ended: {e}")

    async def wait_outcome(
        self,
        job: str,
        rank: int,
        step: int,
        session: str,
        timeout: float,
        next_size: int = 0,
    ) -> Outcome:
        """Wait until ``step`` of ``rank`` is decided (or ``timeout``); with ``next_size``, the
        outcome carries a lease of the next slot."""
        entry = self._staged.get((job, step), {}).get(rank)
        sums = entry.staged.sums if entry is not None and entry.session == session else ()
        outcome = self._known(job, step, rank, session, sums)
        if outcome is None:
            fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            w = _Waiter(rank, step, session, sums, self.clock.now(), fut)
            self._waiters.setdefault((job, step), []).append(w)
            d = self._decided.get(job)
            if d is not None and d.committed_step is not None and step <= d.committed_step:
                # Decided, but not in a way this node can tell: ask now.
                self.tasks.spawn(self._ask(job, step, w), f"status of {job!r} {step}")
            try:
                outcome = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                return Outcome(OutcomeStatus.PENDING, step, f"not decided within {timeout} s")
            finally:
                ws = self._waiters.get((job, step), [])
                if w in ws:
                    ws.remove(w)
                if not ws:
                    self._waiters.pop((job, step), None)
        if next_size > 0 and outcome.status in (OutcomeStatus.COMMITTED, OutcomeStatus.FAILED):
            try:
                lease = await self.lease(job, rank, next_size)
                outcome = msgspec.structs.replace(outcome, lease=lease)
            except (SnapstoreError, asyncio.TimeoutError) as e:
                logger.info("no lease ahead of the next step: %s", e, extra={"job": job})
        return outcome

    def _known(
        self, job: str, step: int, rank: int, session: str = "", sums: tuple[int, ...] = ()
    ) -> Outcome | None:
        """The outcome of ``rank``'s staging of ``step`` if this node knows it for sure;
        None when only the coordinator can tell (it is then asked)."""
        d = self._decided.get(job)
        if d is None:
            return None
        for sessions, reason, restore in d.failed.get(step, []):
            if not sessions or session in sessions:
                return Outcome(OutcomeStatus.FAILED, step, reason, restore=restore)
        if d.committed_step is None or step > d.committed_step:
            return None
        committed = d.history.get(step)
        if committed is None or rank not in committed:
            return None  # a decision this node missed, or a rank not homed here
        if not sums or committed[rank] == tuple(sums):
            stats = d.stats if step == d.committed_step else {}
            return Outcome(OutcomeStatus.COMMITTED, step, "", dict(stats))
        return Outcome(
            OutcomeStatus.FAILED, step, "the step committed with other bytes of this rank"
        )

    # -- decisions ----------------------------------------------------------------------

    async def decide(self, decision: Decision) -> CommitResult:
        """Apply a decision of the coordinator (relayed by the leader, or sent directly).

        A job's decisions apply one at a time, in the order they arrive: an
        abort's slots are spares before a later commit of the same step looks
        for them (and refuses). An abort is whole once it began: the stagings
        leave this node's table at once (never reported again) and the slots
        are freed even when the relay that carries the decision is cancelled
        (its leader stopped for a new epoch).
        """
        if self.fenced(decision):
            # The coordinator that sent it was replaced, and its successor recovered from
            # what this node held before it arrived: only the successor decides that step.
            return CommitResult(
                ok=False,
                reason=f"decision of epoch {decision.epoch}: its coordinator was replaced",
                fenced=True,
            )
        self._seen = max(self._seen, decision.epoch)
        lock = self._order.setdefault(decision.job, asyncio.Lock())
        async with lock:
            if decision.status is OutcomeStatus.COMMITTED:
                return await self._commit(decision)
            await self._abort(decision)
            return CommitResult(ok=True)

    def fenced(self, decision: Decision) -> bool:
        """Whether ``decision`` comes from a coordinator replaced since (see snapshot)."""
        return decision.epoch >= 0 and term_of(decision.epoch) <= self._fence

    async def _commit(self, decision: Decision) -> CommitResult:
        job, step = decision.job, decision.step
        d = self._decided.setdefault(job, _Decided())
        result: CommitResult = await self.offload(
            self.store.commit,
            job,
            step,
            decision.version,
            decision.hold,
            decision.hold_ttl,
        )
        rec = self.store.record(job)
        if rec is not None and (rec.step, rec.version) >= (step, decision.version):
            if d.committed_step is None or step >= d.committed_step:
                d.committed_step, d.committed_version = rec.step, rec.version
                if step == rec.step:
                    d.stats = dict(decision.stats)
            if rec.step == step:
                d.history[step] = {r: tuple(e.sums) for r, e in rec.ranks.items()}
                while len(d.history) > DECIDED_KEPT:
                    d.history.popitem(last=False)
            for key in [k for k in self._staged if k[0] == job and k[1] <= rec.step]:
                self._staged.pop(key, None)
                self._staged_at.pop(key, None)
            self._wake(job, rec.step)
            result = dataclasses.replace(result, holds=True)
        return result

    async def _abort(self, decision: Decision) -> None:
        job, step = decision.job, decision.step
        if decision.reprotect:
            # A new version of the committed step's parity failed, not its stagings: a slot
            # of that step here (its committed data, maybe adopted by a restarted SMP that
            # never heard of the commit) must not be taken for a failed staging's
            # (seed 33000383: a lease reused rank 1's only copy of committed step 3).
            return
        d = self._decided.setdefault(job, _Decided())
        sessions = frozenset(decision.sessions)
        d.failed.setdefault(step, []).append((sessions, decision.reason, decision.restore))
        while len(d.failed) > DECIDED_KEPT:
            d.failed.popitem(last=False)
        entries = self._staged.get((job, step), {})
        ranks = [r for r, e in entries.items() if not sessions or e.session in sessions]
        for r in ranks:
            entries.pop(r, None)
        if not entries:
            self._staged.pop((job, step), None)
            self._staged_at.pop((job, step), None)
        self._wake(job, step)
        if ranks:
            freeing = asyncio.ensure_future(self.offload(self.store.abort, job, step, ranks))
            try:
                await asyncio.shield(freeing)
            except asyncio.CancelledError:
                await freeing  # still in this job's order: later decisions find spares
                raise

    def _wake(self, job: str, upto: int) -> None:
        for key in [k for k in self._waiters if k[0] == job and k[1] <= upto]:
            for w in list(self._waiters.get(key, [])):
                if w.future.done():
                    continue
                outcome = self._known(job, w.step, w.rank, w.session, w.sums)
                if outcome is not None:
                    w.future.set_result(outcome)
                else:
                    self.tasks.spawn(self._ask(job, w.step, w), f"status of {job!r} {w.step}")

    def resolve(self, job: str, step: int, session: str, outcome: Outcome) -> None:
        """The coordinator answered a status query: end the waits it decides."""
        for w in list(self._waiters.get((job, step), [])):
            if w.session == session and not w.future.done():
                w.future.set_result(outcome)

    # -- notices to the leader --------------------------------------------------------

    def _notify(self, job: str, step: int) -> None:
        key = (job, step)
        if key in self._inflight:
            self._dirty.add(key)
            return
        self._inflight.add(key)
        self.tasks.spawn(self._send_notices(key), f"notice of {job!r} step {step}")

    async def _send_notices(self, key: tuple[str, int]) -> None:
        try:
            while not self._stopped:
                self._dirty.discard(key)
                entries = self._staged.get(key)
                config = self.config
                if not entries or config is None:
                    return
                notice = NodeNotice(
                    key[0], key[1], self.node, config.epoch, tuple(entries.values())
                )
                try:
                    await asyncio.wait_for(self._leader_notice(config, notice), RPC_TIMEOUT)
                except (SnapstoreError, asyncio.TimeoutError) as e:
                    logger.info("notice to leader %s failed: %s", config.leader[:12], e)
                    return  # the re-send loop tries again
                if key not in self._dirty:
                    return
        finally:
            self._inflight.discard(key)

    async def _leader_notice(self, config: NodeConfig, notice: NodeNotice) -> None:
        if config.leader == self.node and self.leader is not None:
            await self.leader.notice(notice)
        else:
            await self.fabric.leader(config.leader).notice(notice)

    # -- background -------------------------------------------------------------------

    async def _beat_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            config = self.config
            try:
                if config is None or self.clock.now() - self._last_beat_ok > self._rejoin_after:
                    new = await asyncio.wait_for(
                        self.fabric.coordinator().register(self.describe()), RPC_TIMEOUT
                    )
                    if new is not None:
                        await self.configure(new)
                    self._last_beat_ok = self.clock.now()
                    continue
                beat = MemberBeat(self.describe(), config.epoch)
                if config.leader == self.node and self.leader is not None:
                    await self.leader.beat(beat)
                else:
                    await asyncio.wait_for(
                        self.fabric.leader(config.leader).beat(beat), self.cfg.failure_timeout
                    )
                self._last_beat_ok = self.clock.now()
            except (SnapstoreError, asyncio.TimeoutError) as e:
                logger.debug("heartbeat failed: %s", e)

    @property
    def _rejoin_after(self) -> float:
        """Beats failing this long: ask the coordinator where the group is now."""
        return 3 * self.cfg.failure_timeout + self.cfg.reprotect_delay

    async def _resend_loop(self) -> None:
        interval = self.cfg.resend_interval
        while not self._stopped:
            await asyncio.sleep(interval)
            now = self.clock.now()
            for key, since in list(self._staged_at.items()):
                if now - since >= interval and key in self._staged:
                    self._notify(*key)
            for (job, step), waiters in list(self._waiters.items()):
                for w in waiters:
                    if now - w.since >= self.cfg.status_after and not w.future.done():
                        self.tasks.spawn(self._ask(job, step, w), f"status of {job!r} {step}")
                        w.since = now

    async def _ask(self, job: str, step: int, w: _Waiter) -> None:
        try:
            outcome = await asyncio.wait_for(
                self.fabric.coordinator().step_status(job, step, w.rank, w.sums, w.session),
                RPC_TIMEOUT,
            )
        except (SnapstoreError, asyncio.TimeoutError) as e:
            logger.info("status of %s step %d: %s", job, step, e)
            return
        decided = outcome.status in (OutcomeStatus.COMMITTED, OutcomeStatus.FAILED)
        if decided and not w.future.done():
            w.future.set_result(outcome)
        elif outcome.status is OutcomeStatus.UNKNOWN and (job, step) in self._staged:
            # The coordinator lost the step (it restarted): report it again.
            self._notify(job, step)

    # -- byte work ordered by the leader and the coordinator ------------------------

    async def build_parity(self, order: WorkOrder) -> WorkResult:
        result: WorkResult = await self.offload(self.store.build_parity, order)
        return result

    async def keep_prepared(self, record: bytes) -> None:
        await self.offload(self.store.keep_prepared, StepRecord.from_bytes(record))

    async def rebuild(self, order: WorkOrder) -> WorkResult:
        result: WorkResult = await self.offload(self.store.rebuild, order)
        return result

    async def verify(self, record: bytes) -> VerifyReport:
        report: VerifyReport = await self.offload(self.store.verify, StepRecord.from_bytes(record))
        return report

    async def hold(self, job: str, step: int, token: str, ttl: float) -> list[int]:
        held: list[int] = await self.offload(self.store.hold, job, step, token, ttl)
        return held

    async def release(self, token: str) -> None:
        await self.offload(self.store.release, token)

    async def persist(self, order: PersistOrder) -> PersistResult:
        result: PersistResult = await self.offload(self.store.persist, order)
        return result

    async def verify_persisted(self, path: str, ranks: list[int]) -> dict[int, str | None]:
        result: dict[int, str | None] = await self.offload(self.store.verify_persisted, path, ranks)
        return result

    async def forget(self, job: str) -> None:
        await self.offload(self.store.forget, job)
        self._decided.pop(job, None)

    async def drop_job(self, job: str) -> None:
        await self.offload(self.store.drop_job, job)
        self._decided.pop(job, None)
        self._order.pop(job, None)
        for key in [k for k in self._turns if k[0] == job]:
            del self._turns[key]
        for key in [k for k in self._staged if k[0] == job]:
            self._staged.pop(key, None)
            self._staged_at.pop(key, None)
        for key in [k for k in self._waiters if k[0] == job]:
            for w in self._waiters.pop(key):
                if not w.future.done():
                    w.future.set_result(Outcome(OutcomeStatus.FAILED, w.step, "job dropped"))

    async def snapshot(self, requester: str = "") -> NodeSnapshot:
        """What this node holds, for a restarted coordinator's recovery. From now on the
        decisions of the coordinator it replaced are refused -- those of every term this
        node has seen (the new coordinator starts a newer one): it decides every step from
        this state, and a late decision of the old one (a commit or an abort relayed by a
        stalled leader) must not contradict it.

        A snapshot that runs after its ``requester`` (a coordinator's identity) already
        configured this node -- the call timed out there, and that coordinator went on
        without it -- fences only the terms before the requester's own."""
        config = self.config
        if requester and config is not None and config.coordinator == requester:
            self._fence = max(self._fence, term_of(config.epoch) - 1)
        elif self._seen >= 0:
            self._fence = max(self._fence, term_of(self._seen))
        records = tuple(r.to_bytes() for r in self.store.records().values())
        prepared = tuple(r.to_bytes() for r in self.store.prepared())
        return NodeSnapshot(self.describe(), self.config, records, prepared, self._seen)
