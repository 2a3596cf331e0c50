"""A stripe group's leader: the coordinator's delegate for one group.

The membership names one node of each group its leader (the first member
that is not dead); that node's :class:`snapstore.control.member.Member`
hosts a :class:`Leader`. It keeps the coordinator's work per step to a few
messages per *group*, whatever the number of ranks:

1. Members send it a notice per step of the ranks staged on them; it
   reports the group's staged ranks to the coordinator (coalesced, and
   re-sent until the step is decided). Once the group prepared a step of a
   job, the leader expects the same ranks at the next one and reports when
   all of them staged, or after :data:`REPORT_HOLD` at the latest: one
   report per group per step, whatever the order notices arrive in.
2. On the coordinator's :class:`PrepareOrder` (every rank of the step is
   staged somewhere) it plans the group's slice of the step record, orders
   the group's parity holders to compute parity (from the data, or from the
   deltas when only a few bytes changed), has every member keep the slice,
   and reports the group prepared -- or failed, naming why.

   *Early prepare.* A commit decision hands the leader a ticket: the version
   the job's next step may take. When every rank of the group's slice of that
   commit stages the next step from the same process, and no other rank
   does, the leader prepares at once under the ticket, without reporting the
   stagings and waiting for the order, and sends one report that is both
   (``GroupReport.early``). The coordinator checks the stagings as it would
   a staged report and takes the slice only if it accepts all of them (else
   the attempt fails, or the slice is ignored when the ticket no longer
   holds). In steady training that is one report per group per step instead
   of two and no prepare order: the coordinator's per-step work shrinks by
   about a third. The ticket serves once; any failed decision of the job, a
   new membership epoch (a new leader), or a step whose ranks changed ends
   it. The slice says it was prepared early (``StepRecord.early``): a
   restarted coordinator does not commit a step from such slices alone, and
   the coordinator tells nobody such a step committed before a member says
   it holds the committed record (``GroupReport.holds``). When each rank's
   staging is the next save of its staging in that commit (steady training),
   the report names none of them (``GroupReport.follows``): the coordinator
   kept the commit's stagings and works out the new ones.
3. It relays the coordinator's :class:`Decision` to every member and
   acknowledges once all alive members applied it.
4. It gathers its members' heartbeats and sends the coordinator one beat
   for the group, naming members it has not heard from. A beat carries the
   :class:`NodeInfo` of members that changed process or address since the
   last beat the coordinator took, of members whose usage alone changed at
   most every :data:`USAGE_BEAT_EVERY` beats (more where there are many groups:
   :data:`USAGE_BEATS_PER_INTERVAL`), and every member's every
   :data:`FULL_BEAT_EVERY` beats: an idle group's beat is a few bytes. A
   report sent while every member was heard from says so
   (``GroupReport.quiet``) and stands for a beat: a beat that would say no
   more is skipped when the coordinator took such a report within the beat
   interval, so a saving group sends its reports and next to no beats.

Reports and beats go through the region's relay when the membership names
one (:mod:`snapstore.control.relay`), straight to the coordinator otherwise.

A leader holds only soft state: when it dies the coordinator names another
member, members re-send their notices to it, and steps it was preparing are
failed and saved again by the trainers' next step.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from snapstore.config import StoreConfig
from snapstore.control.jobs import follows_by, session_of
from snapstore.control.links import Fabric, NodeLink, RelayLink
from snapstore.control.messages import (
    Decision,
    GroupBeat,
    GroupReport,
    MemberBeat,
    NodeConfig,
    NodeInfo,
    NodeNotice,
    OutcomeStatus,
    PrepareOrder,
    StagedEntry,
)
from snapstore.control.orders import parity_build_orders, parity_delta_orders, same_geometry
from snapstore.control.placement import plan_parity
from snapstore.control.relay import Uplink
from snapstore.control.runtime import Clock, Tasks
from snapstore.errors import SnapstoreError
from snapstore.format.record import RankEntry, StepRecord
from snapstore.format.work import CommitResult, Delta, PeerInfo
from snapstore.node.api import NodeStore
from snapstore.rpc import describe

if TYPE_CHECKING:
    from snapstore.control.member import Member

__all__ = ["Leader"]

logger = logging.getLogger(__name__)

PARITY_TIMEOUT = 120.0
KEEP_TIMEOUT = 30.0
RPC_TIMEOUT = 30.0
FULL_BEAT_EVERY = 20
"""Every this many beat intervals, a group beat carries every member's info, changed or
not (a beat a quiet report stood for is counted: this beat is not skipped)."""
USAGE_BEAT_EVERY = 5
"""A member's info whose usage figures alone changed (bytes held, counters: every step of
a training job changes them) goes at most every this many beat intervals; a change of who or
where it is (process, address, budget) goes with the next. bench.scale: while saving,
every beat carried every member's info, and decoding them was most of a beat's cost."""
USAGE_BEATS_PER_INTERVAL = 100
"""About how many groups' usage beats the coordinator takes per beat interval, all
groups together, at most: with more groups than ``USAGE_BEAT_EVERY`` times this, a group's
usage figures go every ``groups / USAGE_BEATS_PER_INTERVAL`` intervals instead. They are
only shown (status, the dashboard, metrics): at 4,096 nodes (1,024 groups, half-second
beats) each is at most about 5 s old, and the coordinator takes half the usage beats it took
while every job saves (bench.scale)."""
RESEND_BACKOFF_MAX = 8
"""A staged report the coordinator took is sent again after twice ``resend_interval``,
then four times, ... at most this many times it (one it did not take: after one
interval). The coordinator waits for every group's ranks and may take longer than an
interval to order the prepare; the re-send only repairs a lost answer (bench.scale,
4,096 nodes: 1.8 staged reports per group per step without the backoff)."""
REPORT_HOLD = 0.05
"""Seconds a staged report waits for the rest of the ranks the group had at its last
prepared step of the job (nothing waits on a partial report: the coordinator prepares a
step only once every rank staged; only a refusal reaches its trainer this much later)."""


SLICES_KEPT = 64
"""Prepared slices whose sessions the leader remembers, to take a ticket with a commit."""


@dataclass(frozen=True)
class _Ticket:
    """A commit's ticket (Decision.ticket): the group may prepare the job's next step
    under ``version`` if exactly ``sessions``' ranks stage it, from those sessions."""

    version: int
    after: int
    """The committed step: the ticket serves the first newer one."""
    world_size: int
    stagings: dict[int, str]
    """rank -> staging of the committed slice."""


@dataclass
class _GroupStep:
    """What the leader collected of one step of one job in its group."""

    entries: dict[int, tuple[str, StagedEntry]] = field(default_factory=dict)
    since: float = 0.0
    sent: float = 0.0
    """When the coordinator last took a staged report of this step."""
    taken: int = 0
    """Staged reports of this step the coordinator took (the re-send backs off)."""
    preparing: set[int] = field(default_factory=set)


class Leader:
    """The leader of one stripe group for one membership epoch. See the module docstring."""

    def __init__(
        self,
        node: str,
        config: NodeConfig,
        store: NodeStore,
        fabric: Fabric,
        clock: Clock,
        cfg: StoreConfig,
        local: Member | None = None,
    ) -> None:
        self.node = node
        self.config = config
        self.store = store
        self.fabric = fabric
        self.clock = clock
        self.cfg = cfg
        self.local = local
        self.up = Uplink(fabric, self._relay())
        """To the coordinator: through the region's relay (snapstore.control.relay)."""
        self.tasks = Tasks()
        self._steps: dict[tuple[str, int], _GroupStep] = {}
        self._beats: dict[str, tuple[NodeInfo, float]] = {}
        self._inflight: set[tuple[str, int]] = set()
        self._dirty: set[tuple[str, int]] = set()
        self._expect: dict[str, frozenset[int]] = {}
        """job -> the ranks of its last step this group was ordered to prepare."""
        self._held: set[tuple[str, int]] = set()
        self._told: dict[str, NodeInfo] = {}
        """The info of each member the coordinator took with the last beat."""
        self._quiet_taken = float("-inf")
        """When the last quiet report the coordinator took was sent (it stands for a beat)."""
        self._told_at: dict[str, int] = {}
        """member -> the beat interval its info last went with."""
        self._beat_ticks = 0
        """Beat intervals passed: infos fall due by them, beats sent or skipped alike."""
        self._closed: dict[tuple[str, int, int], str] = {}
        self._client: dict[str, dict[str, float]] = {}
        self._slices: dict[tuple[str, int, int], tuple[int, dict[int, str]]] = {}
        """(job, step, version) -> (world size, rank -> staging) of slices it prepared."""
        self._tickets: dict[str, _Ticket] = {}
        """job -> the ticket of its last commit, while it may serve (module docstring)."""
        self._stopped = False

    @property
    def group(self) -> tuple[str, ...]:
        return self.config.group

    def link(self, node: str) -> NodeLink:
        if node == self.node and self.local is not None:
            return self.local
        return self.fabric.node(node)

    def _relay(self) -> RelayLink | None:
        relay = self.config.relay
        if not relay:
            return None
        if relay == self.node and self.local is not None:
            return self.local.relay
        return self.fabric.relay(relay)

    def start(self) -> None:
        now = self.clock.now()
        for n in self.group:
            self._beats.setdefault(n, (_unknown(n), now))
        self.tasks.spawn(self._beat_loop(), "leader beats")
        self.tasks.spawn(self._resend_loop(), "leader re-sends")

    def stop(self) -> None:
        self._stopped = True
        self.tasks.cancel_all()

    # -- from members -----------------------------------------------------------------

    async def notice(self, notice: NodeNotice) -> None:
        if notice.epoch != self.config.epoch or notice.node not in self.group:
            return  # sent under another membership: the member re-sends to its new leader
        key = (notice.job, notice.step)
        gs = self._steps.get(key)
        if gs is None:
            gs = self._steps[key] = _GroupStep(since=self.clock.now())
        changed = False
        for e in notice.entries:
            prev = gs.entries.get(e.staged.rank)
            if prev is None or prev[1].session != e.session:
                counts = self._client.setdefault(notice.job, {})
                for name, value in e.client.items():
                    counts[name] = counts.get(name, 0.0) + float(value)
            if prev != (notice.node, e):
                changed = True
                gs.entries[e.staged.rank] = (notice.node, e)
        if changed:  # a notice sent again repeats a report only through the re-send loop
            self._report_soon(key)

    async def beat(self, beat: MemberBeat) -> None:
        if beat.info.node in self.group:
            self._beats[beat.info.node] = (beat.info, self.clock.now())

    # -- from the coordinator ------------------------------------------------------------

    async def prepare(self, order: PrepareOrder) -> None:
        if order.epoch != self.config.epoch or self._stopped:
            return
        if (order.job, order.step, order.version) in self._closed:
            return
        gs = self._steps.setdefault((order.job, order.step), _GroupStep(since=self.clock.now()))
        if order.version in gs.preparing:
            return  # a repeated order: already preparing
        gs.preparing.add(order.version)
        if order.ranks is None:
            self._expect[order.job] = frozenset(order.sessions)
        self.tasks.spawn(self._prepare(order), f"prepare {order.job!r} step {order.step}")

    async def decide(self, decision: Decision) -> None:
        if self.local is not None and self.local.fenced(decision):
            return  # a replaced coordinator's: this node answered a newer one (Member.snapshot)
        self._closed[(decision.job, decision.step, decision.version)] = decision.status.value
        while len(self._closed) > 256:
            self._closed.pop(next(iter(self._closed)))
        key = (decision.job, decision.step)
        if decision.status is OutcomeStatus.COMMITTED:
            for k in [k for k in self._steps if k[0] == decision.job and k[1] <= decision.step]:
                self._steps.pop(k, None)
            mine = self._slices.get((decision.job, decision.step, decision.version))
            if decision.ticket >= 0 and mine is not None:
                world, stagings = mine
                self._tickets[decision.job] = _Ticket(
                    decision.ticket, decision.step, world, stagings
                )
            else:
                self._tickets.pop(decision.job, None)
        else:
            self._tickets.pop(decision.job, None)
            gs = self._steps.get(key)
            if gs is not None and not decision.reprotect:
                failed = set(decision.sessions)
                for r, (_, e) in list(gs.entries.items()):
                    if not failed or e.session in failed:
                        del gs.entries[r]
                if not gs.entries:
                    self._steps.pop(key, None)
        self.tasks.spawn(self._apply(decision), f"decision {decision.job!r} {decision.step}")

    # -- preparing a step -------------------------------------------------------------------

    async def _prepare(self, order: PrepareOrder, early: bool = False, follows: int = 0) -> None:
        t0 = self.clock.now()
        try:
            record, deltas = self._slice(order, early)
            stats: dict[str, Any] = {}
            if record.parity:
                record = await self._parity(record, deltas, stats)
            data = record.to_bytes()
            await self._keep(record, data)
            stats["parity_seconds"] = round(self.clock.now() - t0, 6)
            stats["data_bytes"] = record.data_bytes()
            stats["parity_bytes"] = record.parity_bytes()
            if order.ranks is None:
                self._slices[(order.job, order.step, order.version)] = (
                    order.world_size,
                    dict(order.sessions),
                )
                while len(self._slices) > SLICES_KEPT:
                    self._slices.pop(next(iter(self._slices)))
            await self._report(order, prepared=data, stats=stats, early=early, follows=follows)
        except Exception as e:
            reason = describe(e)
            logger.info("prepare of %s step %d failed: %s", order.job, order.step, reason)
            failed = f"group of {self.node[:12]}: {reason}"
            await self._report(order, failed=failed, early=early, follows=follows)

    def _slice(
        self, order: PrepareOrder, early: bool = False
    ) -> tuple[StepRecord, dict[int, Delta | None]]:
        cfg = self.config
        deltas: dict[int, Delta | None] = {}
        if order.ranks is not None:
            ranks = dict(StepRecord.from_bytes(order.ranks).ranks)
        else:
            gs = self._steps.get((order.job, order.step))
            ranks = {}
            for rank, session in order.sessions.items():
                got = gs.entries.get(rank) if gs is not None else None
                if got is None or got[1].session != session:
                    raise SnapstoreError(
                        f"rank {rank}'s staging of step {order.step} (session {session[:8]}) "
                        "is not in this group"
                    )
                node, e = got
                ranks[rank] = RankEntry(node, e.staged.size, tuple(e.staged.sums))
                deltas[rank] = e.staged.delta
        groups = (cfg.group,) if cfg.protected else ()
        parity = tuple(plan_parity(ranks, groups, cfg.k, cfg.m)) if groups else ()
        record = StepRecord(
            job=order.job,
            step=order.step,
            version=order.version,
            k=cfg.k,
            m=cfg.m,
            world_size=order.world_size,
            ranks=ranks,
            groups=groups,
            parity=parity,
            early=early,
        )
        return record, deltas

    async def _parity(
        self, record: StepRecord, deltas: dict[int, Delta | None], stats: dict[str, Any]
    ) -> StepRecord:
        peers = self.config.peers
        base = self.store.record(record.job)
        full = [d for d in deltas.values() if d is not None]
        if (
            base is not None
            and deltas
            and len(full) == len(record.ranks)
            and all(d.base_step == base.step for d in full)
            and same_geometry(record, base)
        ):
            orders = parity_delta_orders(
                record, base, {r: d for r, d in deltas.items() if d}, peers, self.config.backend
            )
            stats["delta"] = True
            stats["delta_bytes"] = sum(d.bytes for d in full)
        else:
            orders = parity_build_orders(record, peers, self.config.backend)
            stats["delta"] = False
        nodes = list(orders)
        results = await asyncio.gather(
            *(
                asyncio.wait_for(self.link(n).build_parity(orders[n]), PARITY_TIMEOUT)
                for n in nodes
            ),
            return_exceptions=True,
        )
        failures = {
            f"node {n[:12]}": describe(r)
            for n, r in zip(nodes, results, strict=True)
            if isinstance(r, BaseException)
        }
        if failures:
            detail = "; ".join(f"{who}: {why}" for who, why in failures.items())
            raise SnapstoreError(f"parity failed ({detail})")
        sums = {n: list(r.sums) for n, r in zip(nodes, results, strict=True) if hasattr(r, "sums")}
        stats["peer_bytes"] = sum(
            int(r.peer_bytes) for r in results if not isinstance(r, BaseException)
        )
        filled = []
        cursor: dict[str, int] = {}
        for pe in record.parity:
            i = cursor.get(pe.node, 0)
            cursor[pe.node] = i + 1
            filled.append(
                type(pe)(
                    pe.group, pe.stripe, pe.index, pe.node, pe.offset, pe.length, sums[pe.node][i]
                )
            )
        return record.replace(parity=tuple(filled), committed_at=self.clock.wall())

    async def _keep(self, record: StepRecord, data: bytes) -> None:
        """Every member keeps the slice; one holding data of it must, the others may fail."""
        members = list(self.group) if self.group else sorted(record.nodes())
        results = await asyncio.gather(
            *(asyncio.wait_for(self.link(n).keep_prepared(data), KEEP_TIMEOUT) for n in members),
            return_exceptions=True,
        )
        needed = record.nodes()
        failures = {
            f"node {n[:12]}": describe(r)
            for n, r in zip(members, results, strict=True)
            if isinstance(r, BaseException) and n in needed
        }
        if failures:
            detail = "; ".join(f"{who}: {why}" for who, why in failures.items())
            raise SnapstoreError(f"members could not keep the prepared record ({detail})")

    # -- reports -----------------------------------------------------------------------------

    def _report_soon(self, key: tuple[str, int]) -> None:
        expected = self._expect.get(key[0])
        gs = self._steps.get(key)
        if expected and gs is not None and not expected <= gs.entries.keys():
            if key not in self._held:  # wait for the group's usual ranks, or REPORT_HOLD
                self._held.add(key)
                self.tasks.spawn(self._hold(key), f"hold the report of {key[0]!r} step {key[1]}")
            return
        self._held.discard(key)
        self._send_soon(key)

    async def _hold(self, key: tuple[str, int]) -> None:
        await asyncio.sleep(REPORT_HOLD)
        if key in self._held:
            self._held.discard(key)
            self._send_soon(key)

    def _send_soon(self, key: tuple[str, int]) -> None:
        if self._early(key):
            return
        if key in self._inflight:
            self._dirty.add(key)
            return
        self._inflight.add(key)
        self.tasks.spawn(self._send_staged(key), f"report of {key[0]!r} step {key[1]}")

    def _early(self, key: tuple[str, int]) -> bool:
        """Prepare ``key`` under the job's ticket if its ranks are the ticket's, staged from
        the same sessions (module docstring); the ticket is spent either way."""
        job, step = key
        ticket = self._tickets.get(job)
        if ticket is None or step <= ticket.after or self._stopped:
            return False
        del self._tickets[job]
        gs = self._steps.get(key)
        committed = ticket.stagings
        if gs is None or gs.entries.keys() != committed.keys() or gs.preparing:
            return False
        sessions = {r: e.session for r, (_, e) in gs.entries.items()}
        if any(session_of(s) != session_of(committed[r]) for r, s in sessions.items()) or any(
            e.world_size != ticket.world_size for _, e in gs.entries.values()
        ):
            return False
        # Each the next save of the committed one (as in steady training): the report
        # names none of them (GroupReport.follows).
        follows = follows_by(committed, sessions)
        order = PrepareOrder(
            job, step, ticket.version, self.config.epoch, ticket.world_size, sessions=sessions
        )
        gs.preparing.add(ticket.version)
        self._expect[job] = frozenset(sessions)
        self.tasks.spawn(
            self._prepare(order, early=True, follows=follows), f"prepare {job!r} step {step} early"
        )
        return True

    async def _send_staged(self, key: tuple[str, int]) -> None:
        try:
            while not self._stopped:
                self._dirty.discard(key)
                gs = self._steps.get(key)
                if gs is None or not gs.entries:
                    return
                world = max(e.world_size for _, e in gs.entries.values())
                client = self._client.pop(key[0], {})
                report = GroupReport(
                    job=key[0],
                    step=key[1],
                    version=-1,
                    epoch=self.config.epoch,
                    leader=self.node,
                    group=self.group,
                    world_size=world,
                    sessions={r: e.session for r, (_, e) in gs.entries.items()},
                    stats={"client": client} if client else {},
                    quiet=self._quiet(),
                )
                try:
                    await self._up_report(report)
                except (SnapstoreError, asyncio.TimeoutError) as e:
                    logger.info("report to the coordinator failed: %s", e)
                    return
                gs.sent = self.clock.now()
                gs.taken += 1
                if key not in self._dirty:
                    return
        finally:
            self._inflight.discard(key)

    async def _report(
        self,
        order: PrepareOrder,
        prepared: bytes | None = None,
        failed: str = "",
        stats: dict[str, Any] | None = None,
        early: bool = False,
        follows: int = 0,
    ) -> None:
        client = self._client.pop(order.job, {}) if early else {}
        if client:
            stats = {**(stats or {}), "client": client}
        report = GroupReport(
            job=order.job,
            step=order.step,
            version=order.version,
            epoch=self.config.epoch,
            leader=self.node,
            group=self.group,
            world_size=order.world_size,
            sessions=dict(order.sessions) if early and not follows else {},
            prepared=prepared,
            failed=failed,
            stats=stats or {},
            early=early,
            quiet=self._quiet(),
            follows=follows,
        )
        try:
            await self._up_report(report)
        except (SnapstoreError, asyncio.TimeoutError) as e:
            # The coordinator asks again (or fails the step by its timeout).
            logger.info("prepared report to the coordinator failed: %s", e)
        gs = self._steps.get((order.job, order.step))
        if gs is not None:
            gs.preparing.discard(order.version)
            if early:  # it stood for a staged report: re-sent as one only if not decided
                gs.sent = self.clock.now()
                gs.taken += 1

    async def _apply(self, decision: Decision) -> None:
        members = list(self.group) or [self.node]
        results = await asyncio.gather(
            *(asyncio.wait_for(self.link(n).decide(decision), RPC_TIMEOUT) for n in members),
            return_exceptions=True,
        )
        for n, r in zip(members, results, strict=True):
            if isinstance(r, BaseException):
                logger.info("member %s did not apply a decision: %s", n[:12], describe(r))
        if any(isinstance(r, CommitResult) and r.fenced for r in results):
            # Refused unapplied by a member that answered a newer coordinator: acknowledging
            # it would tell that coordinator its own decision of the step was applied here.
            return
        ack = GroupReport(
            job=decision.job,
            step=decision.step,
            version=decision.version,
            epoch=self.config.epoch,
            leader=self.node,
            group=self.group,
            world_size=0,
            applied=True,
            holds=any(isinstance(r, CommitResult) and r.holds for r in results),
            quiet=self._quiet(),
        )
        try:
            await self._up_report(ack)
        except (SnapstoreError, asyncio.TimeoutError) as e:
            logger.info("decision ack to the coordinator failed: %s", e)

    def _silent(self, now: float) -> dict[str, float]:
        """Members not heard from within ``failure_timeout``, and for how long."""
        return {
            n: round(now - heard, 3)
            for n, (_, heard) in self._beats.items()
            if now - heard > self.cfg.failure_timeout and n != self.node
        }

    def _quiet(self) -> bool:
        """Every member heard from within ``failure_timeout`` (GroupReport.quiet)."""
        return not self._silent(self.clock.now())

    async def _up_report(self, report: GroupReport) -> None:
        """A report to the coordinator; a quiet one it took stands for a beat."""
        sent = self.clock.now()
        await asyncio.wait_for(self.up.report(report), RPC_TIMEOUT)
        if report.quiet:
            self._quiet_taken = max(self._quiet_taken, sent)

    # -- background ---------------------------------------------------------------------------

    async def _beat_loop(self) -> None:
        interval = max(self.cfg.heartbeat_interval, 0.5)
        while not self._stopped:
            await asyncio.sleep(interval)
            now = self.clock.now()
            tick = self._beat_ticks
            self._beat_ticks += 1
            full = tick % FULL_BEAT_EVERY == 0
            infos = tuple(
                info
                for n, (info, _) in self._beats.items()
                if info.incarnation and (full or self._tell(n, info, tick))
            )
            silent = self._silent(now)
            if not infos and not silent and now - self._quiet_taken < interval:
                continue  # a quiet report the coordinator took since said all of it
            beat = GroupBeat(self.config.epoch, self.node, infos, silent)
            try:
                # A stalled relay may take a third of the beat's time, the coordinator the rest.
                up = self.up.group_beat(beat, relay_timeout=self.cfg.failure_timeout / 3)
                await asyncio.wait_for(up, self.cfg.failure_timeout)
            except (SnapstoreError, asyncio.TimeoutError) as e:
                logger.debug("group beat failed: %s", e)
                continue
            for info in infos:
                self._told[info.node] = info
                self._told_at[info.node] = tick

    def _tell(self, node: str, info: NodeInfo, tick: int) -> bool:
        """Whether the beat of interval ``tick`` carries ``info`` (:data:`USAGE_BEAT_EVERY`,
        :data:`USAGE_BEATS_PER_INTERVAL`)."""
        told = self._told.get(node)
        if told is None or _who(told) != _who(info):
            return True
        if told == info:
            return False
        every = max(USAGE_BEAT_EVERY, -(-self.config.groups // USAGE_BEATS_PER_INTERVAL))
        return tick - self._told_at.get(node, 0) >= every

    async def _resend_loop(self) -> None:
        interval = self.cfg.resend_interval
        while not self._stopped:
            await asyncio.sleep(interval)
            now = self.clock.now()
            for key, gs in list(self._steps.items()):
                # Not while a report is on its way, nor within an interval of the last
                # one the coordinator took: a coordinator slow to answer a large job is
                # not sent the same reports again.
                wait = interval * min(2**gs.taken, RESEND_BACKOFF_MAX)
                quiet = now - max(gs.since, gs.sent) >= wait
                if gs.entries and quiet and not gs.preparing and key not in self._inflight:
                    self._report_soon(key)


def _unknown(node: str) -> NodeInfo:
    """A member not heard from yet (its beat fills in the rest)."""
    return NodeInfo(node, "", PeerInfo(node, "", "", "", 0))


def _who(info: NodeInfo) -> tuple[Any, ...]:
    """What a member's info says about which process it is and where: not its usage."""
    return (info.incarnation, info.peer, info.pid, info.started_at, info.budget)
