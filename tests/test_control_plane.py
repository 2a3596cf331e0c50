"""The control plane driven one message at a time, without Ray (on the simulation's loop).

A scripted fabric records what the coordinator sends and answers at once;
the tests play leaders and nodes by hand, so each race of issue 11 is one
exact interleaving:

- an abort that lands while a step's groups prepare wins: the late prepared
  report commits nothing, and every waiter hears "failed" (the old
  coordinator installed such a step as committed after telling its
  waiters it failed);
- an abort after the commit point changes nothing;
- a restarted rank's restore during a prepare ends that step, and every
  rank of the restart restores the same step;
- after a coordinator restart, stagings of processes that ended are refused
  once other processes of their ranks restored;
- a node configured in a newer epoch (by a dead coordinator) moves the
  coordinator past it, and every node is configured again;
- fallback counts only lost nodes, never silent or merely dead ones;
- lifecycles refuse illegal transitions and say which;
- a restarted coordinator commits a step every node still keeps prepared (its
  predecessor may have decided it), and leaves one some node dropped.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapstore.bench.vloop import SimLoop
from snapstore.config import StoreConfig
from snapstore.control.commit import _sessions_known
from snapstore.control.jobs import (
    Attempt,
    Job,
    NextSaves,
    StagedRanks,
    advanced,
    follows_by,
    session_of,
)
from snapstore.control.links import LeaderPost, NodePost, NodeSnapshot, RelayPost
from snapstore.control.messages import (
    Decision,
    ErrorKind,
    ErrorReply,
    GroupReport,
    NodeConfig,
    NodeInfo,
    OutcomeStatus,
    PrepareOrder,
    RestorePlan,
    next_term,
    term_of,
)
from snapstore.control.placement import plan_parity
from snapstore.control.plane import ControlPlane
from snapstore.control.runtime import LoopClock
from snapstore.control.states import JobLife, NodeLife, NodePhase, StepLife
from snapstore.errors import IllegalTransitionError
from snapstore.format.record import RankEntry, StepRecord, pack_ranks
from snapstore.format.work import CommitResult, PeerInfo

NODES = [f"n{i}" + "0" * 30 for i in range(4)]
JOB = "race"
SUMS = (1, 2, 3)


class _Recorder:
    """Any link: records each call (method, argument) and answers at once."""

    def __init__(self, fabric: ScriptedFabric, node: str) -> None:
        self.fabric = fabric
        self.node = node

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any) -> Any:
            self.fabric.calls.append((self.node, method, args))
            if method == "decide":
                return CommitResult(ok=True)
            if method == "snapshot":
                raise AssertionError("no node snapshots in these tests")
            return None

        return call


class ScriptedFabric:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[Any, ...]]] = []
        self.deaths: dict[str, asyncio.Future[None]] = {}

    def node(self, node: str) -> Any:
        return _Recorder(self, node)

    def leader(self, node: str) -> Any:
        return _Recorder(self, node)

    def coordinator(self) -> Any:
        raise AssertionError("the coordinator does not call itself")

    def relay(self, node: str) -> Any:
        raise AssertionError("the coordinator sends nothing through relays")

    def watch(self, node: str) -> Awaitable[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.deaths[node] = fut
        return fut

    def post_leaders(self, posts: Sequence[LeaderPost]) -> None:
        for node, msg in posts:
            method = "prepare" if isinstance(msg, PrepareOrder) else "decide"
            self.calls.append((node, method, (msg,)))

    def post_nodes(self, posts: Sequence[NodePost]) -> None:
        for node, msg in posts:
            self.calls.append((node, "decide", (msg,)))

    def post_relays(self, posts: Sequence[RelayPost]) -> None:
        for node, batch in posts:
            self.calls.append((node, "relay_down", (batch,)))

    def sent(self, method: str) -> list[Any]:
        return [args[0] for _, m, args in self.calls if m == method]


def run(test: Callable[[ControlPlane, ScriptedFabric], Awaitable[None]], **cfg: Any) -> None:
    """Run ``test`` against a fresh plane with four registered nodes, on virtual time."""
    loop = SimLoop()

    async def main() -> None:
        fabric = ScriptedFabric()

        async def offload(fn: Callable[..., Any], *args: Any) -> Any:
            return fn(*args)

        settings = {"k": 3, "m": 1, "nodes": 4, **cfg}
        plane = ControlPlane("t", StoreConfig(**settings), fabric, LoopClock(0.0), offload, None)
        await plane.start()
        for n in NODES:
            await plane.register(NodeInfo(n, "inc1", PeerInfo(n, "host", "/d", "127.0.0.1", 0)))
        try:
            await test(plane, fabric)
        finally:
            plane.stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def _group(plane: ControlPlane) -> tuple[tuple[str, ...], str]:
    group = plane.membership.groups[0]
    leader = plane.membership.leader_of(group)
    assert leader is not None
    return group, leader


async def _staged(plane: ControlPlane, step: int, sessions: dict[int, str]) -> PrepareOrder:
    """Both ranks of the job staged ``step``: returns the prepare order the leader got."""
    group, leader = _group(plane)
    report = GroupReport(JOB, step, -1, plane.membership.epoch, leader, group, 2, dict(sessions))
    await plane.report(report)
    await asyncio.sleep(0.01)
    fabric = plane.fabric
    assert isinstance(fabric, ScriptedFabric)
    orders = [o for o in fabric.sent("prepare") if o.step == step]
    assert orders, "all ranks staged: the group must be told to prepare"
    return orders[-1]


async def _prepared(plane: ControlPlane, order: PrepareOrder) -> None:
    group, leader = _group(plane)
    ranks = {r: RankEntry(NODES[r], 1000, SUMS) for r in order.sessions}
    piece = StepRecord(
        JOB,
        order.step,
        order.version,
        3,
        1,
        order.world_size,
        ranks,
        (group,),
        tuple(plan_parity(ranks, (group,), 3, 1)),
    )
    report = GroupReport(
        JOB,
        order.step,
        order.version,
        order.epoch,
        leader,
        group,
        order.world_size,
        prepared=piece.to_bytes(),
    )
    await plane.report(report)
    await asyncio.sleep(0.01)


def _decisions(fabric: ScriptedFabric, step: int) -> list[Decision]:
    return [d for d in fabric.sent("decide") if d.step == step]


def test_an_abort_during_the_prepare_wins_and_the_late_report_commits_nothing() -> None:
    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        order = await _staged(plane, 1, {0: "a/1", 1: "b/1"})
        assert await plane.abort_pending(JOB, "a controller restarts the job") == [1]
        await _prepared(plane, order)  # the group's report arrives after the abort
        job = plane.jobs[JOB]
        assert job.record is None and not job.attempts
        decided = _decisions(fabric, 1)
        assert decided and all(d.status is OutcomeStatus.FAILED for d in decided)
        assert set(decided[0].sessions) == {"a/1", "b/1"}
        status = await plane.step_status(JOB, 1, 0, SUMS)
        assert status.status is OutcomeStatus.FAILED

    run(test)


def test_an_abort_after_the_commit_point_is_a_no_op() -> None:
    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        order = await _staged(plane, 1, {0: "a/1", 1: "b/1"})
        await _prepared(plane, order)
        assert plane.jobs[JOB].record is not None
        assert await plane.abort_pending(JOB, "too late") == []
        assert plane.jobs[JOB].record.step == 1  # type: ignore[union-attr]
        assert all(d.status is OutcomeStatus.COMMITTED for d in _decisions(fabric, 1))
        status = await plane.step_status(JOB, 1, 0, SUMS)
        assert status.status is OutcomeStatus.COMMITTED

    run(test)


def test_a_restore_during_a_prepare_ends_the_step_and_every_rank_gets_one_step() -> None:
    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        await _prepared(plane, await _staged(plane, 1, {0: "a/1", 1: "b/1"}))
        order = await _staged(plane, 2, {0: "a/2", 1: "b/2"})
        first = await plane.restore_plan(JOB, 0, NODES[0], "a2", True, 2, 5.0)
        await _prepared(plane, order)  # the late report of step 2
        second = await plane.restore_plan(JOB, 1, NODES[1], "b2", True, 2, 5.0)
        assert isinstance(first, RestorePlan) and isinstance(second, RestorePlan)
        assert first.step == second.step == 1
        assert plane.jobs[JOB].record.step == 1  # type: ignore[union-attr]
        assert all(d.status is OutcomeStatus.FAILED for d in _decisions(fabric, 2))
        # The dead incarnation's stagings of step 2, reported again, are refused...
        group, leader = _group(plane)
        late = GroupReport(JOB, 2, -1, plane.membership.epoch, leader, group, 2, {0: "a/2"})
        await plane.report(late)
        await asyncio.sleep(0.01)
        assert not plane.jobs[JOB].attempts
        # ... and the new processes save step 2 again.
        order = await _staged(plane, 2, {0: "a2/1", 1: "b2/1"})
        await _prepared(plane, order)
        assert plane.jobs[JOB].record.step == 2  # type: ignore[union-attr]

    run(test)


def test_a_process_that_did_not_restore_is_told_to() -> None:
    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        await _prepared(plane, await _staged(plane, 1, {0: "a/1", 1: "b/1"}))
        plan = await plane.restore_plan(JOB, 0, NODES[0], "a2", True, 2, 5.0)
        assert isinstance(plan, RestorePlan)
        group, leader = _group(plane)
        # Rank 1's old process saves on: refused, and told it must restore.
        stale = GroupReport(JOB, 2, -1, plane.membership.epoch, leader, group, 2, {1: "b/2"})
        await plane.report(stale)
        await asyncio.sleep(0.01)
        refused = [d for d in _decisions(fabric, 2) if "b/2" in d.sessions]
        assert refused and refused[0].restore and refused[0].status is OutcomeStatus.FAILED

    run(test)


def test_after_a_coordinator_restart_stagings_of_ended_processes_are_refused() -> None:
    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        await _prepared(plane, await _staged(plane, 1, {0: "a/1", 1: "b/1"}))
        # A restarted coordinator knows the committed step, not which processes saved it.
        job = plane.jobs[JOB]
        job.sessions.clear()
        job.retired.clear()
        for rank, session in ((0, "a2"), (1, "b2")):
            plan = await plane.restore_plan(JOB, rank, NODES[rank], session, True, 2, 5.0)
            assert isinstance(plan, RestorePlan) and plan.step == 1
        # The old processes' stagings of step 2, re-sent by their nodes: never a step
        # that the restored ranks did not take.
        group, leader = _group(plane)
        old = {0: "a/2", 1: "b/2"}
        late = GroupReport(JOB, 2, -1, plane.membership.epoch, leader, group, 2, old)
        await plane.report(late)
        await asyncio.sleep(0.01)
        assert not plane.jobs[JOB].attempts
        refused = [d for d in _decisions(fabric, 2) if d.status is OutcomeStatus.FAILED]
        assert refused and all(d.restore for d in refused)
        assert {s for d in refused for s in d.sessions} == {"a/2", "b/2"}
        order = await _staged(plane, 2, {0: "a2/1", 1: "b2/1"})
        await _prepared(plane, order)
        assert plane.jobs[JOB].record.step == 2  # type: ignore[union-attr]

    run(test)


def test_a_node_in_a_newer_epoch_moves_the_coordinator_past_it() -> None:
    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        group, leader = _group(plane)
        ahead = plane.membership.epoch + 5  # a dead coordinator's late configure
        await plane.report(GroupReport(JOB, 1, -1, ahead, leader, group, 2, {0: "a/1"}))
        await asyncio.sleep(0.01)
        # Past its term: the dead coordinator's decisions stay apart from this one's.
        assert plane.membership.epoch == next_term(ahead) + 1
        assert term_of(plane.membership.epoch) == term_of(ahead) + 1
        configs = [c for c in fabric.sent("configure") if c.epoch == plane.membership.epoch]
        assert {c.node for c in configs} == set(NODES)
        assert all(c.incarnation == "inc1" for c in configs)

    run(test)


def test_fallback_counts_only_lost_nodes() -> None:
    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        await _prepared(plane, await _staged(plane, 1, {0: "a/1", 1: "b/1"}))
        job = plane.jobs[JOB]
        ms = plane.membership
        for n in NODES[:2]:  # more than m = 1 of the group
            ms.nodes[n].silent(plane.clock.now())
        assert plane.fallback.unservable_ranks(job) == []  # silent: still readable
        for n in NODES[:2]:
            ms.died(n, "inc1", "its SMP process died")
        assert plane.fallback.unservable_ranks(job) == []  # dead, not lost: may come back
        reply = await plane.restore_plan(JOB, 0, NODES[2], "a2", True, 2, 1.0)
        assert isinstance(reply, ErrorReply) and reply.kind is ErrorKind.TIMEOUT
        for n in NODES[:2]:
            ms.nodes[n].declare_lost(plane.clock.now())
        assert plane.fallback.unservable_ranks(job) == [0, 1]
        reply = await plane.restore_plan(JOB, 0, NODES[2], "a3", True, 2, 1.0)
        assert isinstance(reply, ErrorReply) and reply.kind is ErrorKind.UNRECOVERABLE
        assert reply.lost and all("lost" in x for x in reply.lost)

    run(test)


def test_lifecycles_refuse_illegal_transitions_naming_state_and_transition() -> None:
    step = StepLife("j", 3)
    with pytest.raises(IllegalTransitionError, match="job 'j' step 3: cannot commit in state"):
        step.commit()
    step.all_staged()
    assert step.fail("a node died") and not step.fail("again")
    with pytest.raises(IllegalTransitionError, match="cannot commit in state failed"):
        step.commit()
    node = NodeLife("n1" + "0" * 20, "inc")
    with pytest.raises(IllegalTransitionError, match="cannot be declared lost in state alive"):
        node.declare_lost(0.0)
    node.died(1.0)
    with pytest.raises(IllegalTransitionError, match="be heard from"):
        node.heard(2.0)
    assert node.restarted("inc2", 3.0) is NodePhase.DEAD
    job = JobLife("j")
    with pytest.raises(IllegalTransitionError, match="cannot record rank 0's restore"):
        job.rank_restored(0, 2)
    job.committed()
    job.begin_restore(5)
    with pytest.raises(IllegalTransitionError, match="before every rank restored"):
        job.committed()
    assert not job.rank_restored(0, 2) and job.rank_restored(1, 2)
    job.committed()


def test_a_node_snapshot_round_trips_its_wire_encoding() -> None:
    from snapstore.format.wire import decode, encode

    info = NodeInfo("n", "i", PeerInfo("n", "h", "/d", "127.0.0.1", 7), counters={"saves": 3})
    snap = NodeSnapshot(info, None, (b"rec",), ())
    assert decode(encode(snap), NodeSnapshot) == snap


def _slice(step: int, version: int) -> StepRecord:
    group = tuple(NODES)
    ranks = {r: RankEntry(NODES[r], 1000, SUMS) for r in range(2)}
    parity = tuple(plan_parity(ranks, (group,), 3, 1))
    return StepRecord(JOB, step, version, 3, 1, 2, ranks, (group,), parity)


SEEN_AHEAD = next_term(0) + 5


class _Holding(_Recorder):
    """A node's link whose snapshot reports the (committed, prepared) records it holds."""

    def __init__(
        self, fabric: ScriptedFabric, node: str, held: tuple[list[StepRecord], list[StepRecord]]
    ) -> None:
        super().__init__(fabric, node)
        self.held = held

    async def snapshot(self, requester: str = "") -> NodeSnapshot:
        committed, prepared = self.held
        info = NodeInfo(self.node, "inc1", PeerInfo(self.node, "host", "/d", "127.0.0.1", 0))
        config = NodeConfig(3, self.node, tuple(NODES), NODES[0], True, 3, 1, "isa_l_rs_vand")
        return NodeSnapshot(
            info,
            config,
            tuple(r.to_bytes() for r in committed),
            tuple(r.to_bytes() for r in prepared),
            # One node heard a decision of term 1 before its configure (the coordinator
            # that sent it died): the new term must be past it too.
            SEEN_AHEAD if self.node == NODES[1] else 3,
        )


def _recover(held: dict[str, tuple[list[StepRecord], list[StepRecord]]]) -> tuple[Any, Any]:
    """A restarted coordinator recovering from nodes holding (committed, prepared) records:
    the job's recovered record and the decisions it sent."""
    loop = SimLoop()
    out: list[Any] = []

    class Fabric(ScriptedFabric):
        def node(self, node: str) -> Any:
            return _Holding(self, node, held[node]) if node in held else _Recorder(self, node)

    async def main() -> None:
        fabric = Fabric()

        async def offload(fn: Callable[..., Any], *args: Any) -> Any:
            return fn(*args)

        async def discover() -> list[str]:
            return list(NODES)

        cfg = StoreConfig(k=3, m=1, nodes=4)
        plane = ControlPlane("t", cfg, fabric, LoopClock(0.0), offload, None)
        await plane.start(discover)
        await asyncio.sleep(0.01)
        job = plane.jobs.get(JOB)
        out.extend([job.record if job else None, fabric.sent("decide")])
        plane.stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return out[0], out[1]


def test_a_restarted_coordinator_commits_a_step_every_node_still_holds_prepared() -> None:
    """The old coordinator committed step 2 and died with the decision on its way (a
    stalled leader applies it later): every node still keeps step 2 prepared, so the new
    coordinator commits it too, and the late decision agrees with it."""
    one, two = _slice(1, 0), _slice(2, 1)
    record, decided = _recover({n: ([one], [two]) for n in NODES})
    assert record is not None and (record.step, record.version) == (2, 1)
    assert {d.step for d in decided} == {2}
    assert all(d.status is OutcomeStatus.COMMITTED for d in decided)
    # Sent in the new term, past every epoch a node saw: the nodes it recovered from (and
    # so fenced the older terms) take them.
    assert {term_of(d.epoch) for d in decided} == {term_of(SEEN_AHEAD) + 1}


def test_a_restarted_coordinator_leaves_a_step_some_node_no_longer_holds() -> None:
    """One node dropped step 2's slice (it applied an abort, or never kept it): the step
    may have failed, so it stays uncommitted; so it does when a node is not reached."""
    one, two = _slice(1, 0), _slice(2, 1)
    held = {n: ([one], [two]) for n in NODES}
    held[NODES[3]] = ([one], [])
    record, decided = _recover(held)
    assert record is not None and (record.step, record.version) == (1, 0)
    assert not [d for d in decided if d.step == 2]
    del held[NODES[3]]
    held[NODES[2]] = ([one], [two])
    record, _ = _recover(held)
    assert record is not None and (record.step, record.version) == (1, 0)


def test_a_restarted_coordinator_never_commits_a_step_from_early_slices_alone() -> None:
    """Every node keeps step 2 prepared, but the slices were prepared early, under the
    ticket of step 1's commit: their stagings may be of processes the old coordinator
    refused (an ended incarnation), and it told nobody the step committed before a node
    held it committed. The new coordinator keeps step 1; a node holding step 2 committed
    makes it step 2."""
    one, two = _slice(1, 0), _slice(2, 1).replace(early=True)
    record, decided = _recover({n: ([one], [two]) for n in NODES})
    assert record is not None and (record.step, record.version) == (1, 0)
    assert not [d for d in decided if d.step == 2]
    held = {n: ([one], [two]) for n in NODES}
    held[NODES[2]] = ([two], [])
    record, decided = _recover(held)
    assert record is not None and (record.step, record.version) == (2, 1)
    assert {d.step for d in decided} == {2}


async def _early(
    plane: ControlPlane, step: int, version: int, sessions: dict[int, str], follows: int = 0
) -> GroupReport:
    """The group's leader prepared ``step`` under ticket ``version`` and reports it (with
    ``follows``: naming none of ``sessions``, each the next save of the commit's)."""
    group, leader = _group(plane)
    ranks = {r: RankEntry(NODES[r], 1000, SUMS) for r in sessions}
    piece = StepRecord(
        JOB, step, version, 3, 1, 2, ranks, (group,), tuple(plan_parity(ranks, (group,), 3, 1))
    )
    report = GroupReport(
        JOB,
        step,
        version,
        plane.membership.epoch,
        leader,
        group,
        2,
        {} if follows else dict(sessions),
        prepared=piece.replace(early=True).to_bytes(),
        early=True,
        follows=follows,
    )
    await plane.report(report)
    await asyncio.sleep(0.01)
    return report


def test_an_early_prepared_step_commits_without_an_order_and_is_told_once_held() -> None:
    """A commit hands the leaders a ticket; a group that prepared the next step under it
    commits it with no prepare order. Until a group says a member holds it committed,
    the coordinator tells nobody (status pending, restores wait)."""

    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        await _prepared(plane, await _staged(plane, 1, {0: "a/1", 1: "b/1"}))
        (decision,) = _decisions(fabric, 1)
        assert decision.ticket > decision.version
        orders = len(fabric.sent("prepare"))
        await _early(plane, 2, decision.ticket, {0: "a/2", 1: "b/2"})
        job = plane.jobs[JOB]
        assert job.record is not None and (job.record.step, job.record.version) == (
            2,
            decision.ticket,
        )
        assert len(fabric.sent("prepare")) == orders, "no order for an early slice"
        assert job.unconfirmed
        status = await plane.step_status(JOB, 2, 0, SUMS)
        assert status.status is OutcomeStatus.PENDING
        restore = asyncio.ensure_future(plane.restore_plan(JOB, 0, NODES[0], "a", True, 2, 5.0))
        await asyncio.sleep(0.5)
        assert not restore.done()
        group, leader = _group(plane)
        ack = GroupReport(
            JOB, 2, decision.ticket, plane.membership.epoch, leader, group, 0, applied=True
        )
        await plane.report(ack)  # applied, but no member holds a slice of it
        await asyncio.sleep(0.01)
        assert job.unconfirmed and not restore.done()
        held = msgspec.structs.replace(ack, holds=True)
        await plane.report(held)
        plan = await restore
        assert isinstance(plan, RestorePlan) and plan.step == 2
        status = await plane.step_status(JOB, 2, 0, SUMS)
        assert status.status is OutcomeStatus.COMMITTED

    run(test)


def test_an_early_slice_of_a_refused_staging_fails_its_attempt() -> None:
    """Rank 1's old process saves step 2 after a new process of it restored: the leader
    does not know and prepares early under its ticket; the coordinator refuses the
    staging and the attempt of that version fails, so the slice never commits."""

    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        await _prepared(plane, await _staged(plane, 1, {0: "a/1", 1: "b/1"}))
        (decision,) = _decisions(fabric, 1)
        plan = await plane.restore_plan(JOB, 1, NODES[1], "b2", True, 2, 5.0)
        assert isinstance(plan, RestorePlan) and plan.step == 1
        await _early(plane, 2, decision.ticket, {0: "a/2", 1: "b/2"})
        job = plane.jobs[JOB]
        assert job.record is not None and job.record.step == 1
        assert not job.attempts
        failed = [d for d in _decisions(fabric, 2) if d.status is OutcomeStatus.FAILED]
        assert any(d.restore and "b/2" in d.sessions for d in failed)
        # The next attempt takes another version: the early slice's is spent.
        plan = await plane.restore_plan(JOB, 0, NODES[0], "a2", True, 2, 5.0)
        assert isinstance(plan, RestorePlan) and plan.step == 1
        order = await _staged(plane, 3, {0: "a2/1", 1: "b2/1"})
        assert order.version != decision.ticket

    run(test)


def test_reports_following_the_tickets_commit_commit_steps_naming_no_staging() -> None:
    """In steady training a group's early report names no staging: each is the next save
    of the group's staging in the commit that handed out the ticket (follows). The
    coordinator knows them all the same: status, history and failures name them."""

    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        await _prepared(plane, await _staged(plane, 1, {0: "a/1", 1: "b/1"}))
        job = plane.jobs[JOB]
        for step in (2, 3, 4):
            (decision,) = [d for d in _decisions(fabric, step - 1) if d.ticket >= 0]
            await _early(plane, step, decision.ticket, {0: f"a/{step}", 1: f"b/{step}"}, 1)
            assert job.record is not None and job.record.step == step
            assert dict(job.history[step][1]) == {
                0: (f"a/{step}", job.history[step][1][0][1]),
                1: (f"b/{step}", job.history[step][1][1][1]),
            }
        # From step 3 on the stagings took no check per rank (the table agreed at step 2's
        # commit): the commit's stagings are the previous ones advanced, not a copy.
        assert job.ticket_base is not None and job.ticket_base.agreed == job.sessions.version
        # Nor does a commit keep the one it followed: each followed the one before it,
        # and a chain of them all was kept (a leak of an attempt's ranks a step).
        kept = [job.history[s][1] for s in (2, 3, 4)]
        assert all(isinstance(r, StagedRanks) and r.base is None for r in kept)
        assert job.ticket_base.ranks is kept[-1]
        status = await plane.step_status(JOB, 4, 1, SUMS, "b/4")
        assert status.status is OutcomeStatus.PENDING  # told once a member holds it
        # A report following a ticket this coordinator did not hand out is ignored.
        await _early(plane, 5, decision.ticket, {0: "a/5", 1: "b/5"}, 1)
        assert not job.attempts and job.record is not None and job.record.step == 4

    run(test)


def test_a_following_report_of_a_process_that_did_not_restore_is_refused() -> None:
    """Rank 1 restored in a new process after the commit: its old process's next save,
    reported as following the commit, is checked rank by rank and refused."""

    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        await _prepared(plane, await _staged(plane, 1, {0: "a/1", 1: "b/1"}))
        (decision,) = _decisions(fabric, 1)
        await _early(plane, 2, decision.ticket, {0: "a/2", 1: "b/2"}, 1)
        (decision,) = [d for d in _decisions(fabric, 2) if d.ticket >= 0]
        group, leader = _group(plane)
        held = GroupReport(
            JOB, 2, decision.version, plane.membership.epoch, leader, group, 0, applied=True
        )
        await plane.report(msgspec.structs.replace(held, holds=True))
        plan = await plane.restore_plan(JOB, 1, NODES[1], "b2", True, 2, 5.0)
        assert isinstance(plan, RestorePlan) and plan.step == 2
        await _early(plane, 3, decision.ticket, {0: "a/3", 1: "b/3"}, 1)
        job = plane.jobs[JOB]
        assert job.record is not None and job.record.step == 2 and not job.attempts
        failed = [d for d in _decisions(fabric, 3) if d.status is OutcomeStatus.FAILED]
        assert any(d.restore and "b/3" in d.sessions for d in failed)

    run(test)


def test_a_slice_that_is_not_the_attempts_fails_it_instead_of_committing() -> None:
    """Slices are checked by their heads when the last group prepared: one of another
    version, or of other ranks, or one that is no record, fails the attempt, and the
    previous committed step stays what restores get."""

    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        await _prepared(plane, await _staged(plane, 1, {0: "a/1", 1: "b/1"}))
        job = plane.jobs[JOB]
        group, leader = _group(plane)
        for step, bad in ((2, "version"), (3, "ranks"), (4, "bytes")):
            order = await _staged(plane, step, {0: f"a/{step}", 1: f"b/{step}"})
            ranks = {r: RankEntry(NODES[r], 1000, SUMS) for r in (0, 1, 2)}
            if bad != "ranks":
                del ranks[2]
            version = order.version + (bad == "version")
            piece = StepRecord(
                JOB,
                step,
                version,
                3,
                1,
                2,
                ranks,
                (group,),
                tuple(plan_parity(ranks, (group,), 3, 1)),
            )
            data = b"not a record" if bad == "bytes" else piece.to_bytes()
            report = GroupReport(
                JOB, step, order.version, order.epoch, leader, group, 2, prepared=data
            )
            await plane.report(report)
            await asyncio.sleep(0.01)
            assert job.record is not None and job.record.step == 1 and not job.attempts
            (failed,) = _decisions(fabric, step)
            assert failed.status is OutcomeStatus.FAILED
            assert ("malformed" if bad == "bytes" else "another slice") in failed.reason

    run(test)


def test_the_next_saves_of_a_commit_are_told_exactly() -> None:
    base = {3: "r3-ab/7", 9: "r9-cd/7", 4: "x/y/12"}
    assert follows_by(base, {3: "r3-ab/8", 9: "r9-cd/8", 4: "x/y/13"}) == 1
    assert follows_by(base, {3: "r3-ab/9", 9: "r9-cd/9", 4: "x/y/14"}) == 2
    assert follows_by(base, {3: "r3-ab/8", 9: "r9-cd/9", 4: "x/y/13"}) == 0  # not one step
    assert follows_by(base, {3: "r3-ab/8", 9: "new/8", 4: "x/y/13"}) == 0  # another process
    assert follows_by(base, {3: "r3-ab/8", 9: "r9-cd/8"}) == 0  # a rank fewer
    assert follows_by(base, {3: "r3-ab/7", 9: "r9-cd/7", 4: "x/y/12"}) == 0  # the same
    assert follows_by({1: "a/09"}, {1: "a/010"}) == 0  # not as advanced() writes it
    assert follows_by({1: "a/b"}, {1: "a/c"}) == 0
    with pytest.raises(ValueError, match="no save number"):
        advanced("nosave", 1)
    nxt = NextSaves(NextSaves(base, 1), 2)
    assert nxt.base is base and dict(nxt) == {3: "r3-ab/10", 9: "r9-cd/10", 4: "x/y/15"}
    assert nxt.keys() == base.keys() and len(nxt) == 3 and 9 in nxt and 5 not in nxt


def test_groups_following_a_commit_join_without_their_slots_until_asked() -> None:
    """Groups that follow the same commit join with no work per rank; another group
    staging one of their ranks, or a lookup by rank, writes their slots first."""
    base = StagedRanks(8)
    g1, g2, g3 = ("n1",), ("n2",), ("n3",)
    base.add_group(g1, {0: "a/1", 1: "b/1"})
    base.add_group(g2, {2: "c/1"})
    att = StagedRanks(8)
    assert att.join_following(g1, NextSaves(base.by_group[g1], 1), base)
    assert att.join_following(g2, NextSaves(base.by_group[g2], 1), base)
    assert att.unfilled == [g1, g2] and att.owner == [None] * 8 and len(att) == 3
    # A following group's ranks as its slice head names them are its base's, not packed
    # again; a group's own are packed, kept, and packed again once it changes.
    ids = base.rank_ids(g1)
    assert ids == pack_ranks([0, 1]) and att.rank_ids(g1) is ids
    assert base.rank_ids(g1) is ids and att.rank_ids(g2) == pack_ranks([2])
    assert not att.join(g3, {2: "c2/1"}), "rank 2 is staged in the following group g2"
    assert att.owner[:3] == [g1, g1, g2] and not att.unfilled
    assert att[1] == ("b/2", g1) and 2 in att and 3 not in att
    att.add(1, "b2/1", g3)  # a move: the following group's stagings become its own
    assert att.by_group[g1] == {0: "a/2"} and att[1] == ("b2/1", g3) and len(att) == 3
    other = StagedRanks(8)
    assert other.join_following(g1, NextSaves(base.by_group[g1], 1), base)
    # A group following another commit joins slot by slot.
    assert other.join_following(g2, NextSaves({2: "c/4"}, 1), StagedRanks(8))
    assert other.owner[2] == g2 and other.owner[0] == g1
    base.add(5, "f/1", g1)
    assert base.rank_ids(g1) == pack_ranks([0, 1, 5])


def _member(node: str) -> Any:
    """A real Member of ``node`` over a byte-free store, its fabric scripted."""
    from snapstore.bench.scale_store import MemNodeStore
    from snapstore.control.member import Member

    async def offload(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    return Member(
        MemNodeStore.standalone(node, 2, 1, budget=1 << 20),
        ScriptedFabric(),
        LoopClock(0.0),
        StoreConfig(k=2, m=1),
        "inc1",
        offload,
        lambda: NodeInfo(node, "inc1", PeerInfo(node, "", "", "", 0)),
    )


def on_sim_loop(main: Callable[[], Awaitable[None]]) -> None:
    loop = SimLoop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_node_that_answered_a_recovery_refuses_the_replaced_coordinators_decisions() -> None:
    """Seed 502557's rule, and past it: once a node answered a restarted coordinator's
    snapshot, decisions of every term it had seen are refused -- even of an epoch the old
    coordinator reached and never configured this node with -- and the new term's go."""

    async def main() -> None:
        node = NODES[0]
        member = _member(node)
        await member.configure(NodeConfig(3, node, (), "", False, 2, 1, "isa_l_rs_vand"))

        def abort(step: int, epoch: int) -> Decision:
            return Decision(JOB, step, 1, OutcomeStatus.FAILED, reason="x", epoch=epoch)

        assert (await member.decide(abort(1, 4))).ok  # before any recovery: taken
        await member.snapshot()  # a restarted coordinator recovers from this node
        late = await member.decide(abort(2, 7))  # the old one reached epoch 7, unconfigured
        assert not late.ok and "replaced" in late.reason
        assert (await member.decide(abort(3, next_term(7) + 1))).ok
        member.stop()

    on_sim_loop(main)


def test_a_late_snapshot_does_not_fence_the_term_of_the_coordinator_that_asked() -> None:
    """A recovery snapshot that timed out at its coordinator and ran on the node after
    that coordinator had configured it fences only the terms before the asker's: the
    asker's own decisions still go, the replaced coordinator's are refused. Asked by
    another coordinator, it fences every term the node saw."""

    async def main() -> None:
        node = NODES[0]
        member = _member(node)

        def abort(step: int, epoch: int) -> Decision:
            return Decision(JOB, step, 1, OutcomeStatus.FAILED, reason="x", epoch=epoch)

        old, new = 7, next_term(7) + 1  # the replaced coordinator's epoch, the new one's
        await member.configure(NodeConfig(old, node, (), "", False, 2, 1, "x", coordinator="A"))
        await member.configure(NodeConfig(new, node, (), "", False, 2, 1, "x", coordinator="B"))
        await member.snapshot("B")  # B's snapshot, late: B configured this node already
        assert (await member.decide(abort(1, new))).ok, "B's own term is not fenced"
        late = await member.decide(abort(2, old))
        assert not late.ok and "replaced" in late.reason, "A's term is"
        await member.snapshot("C")  # a coordinator that never configured it: all it saw
        fenced = await member.decide(abort(3, new))
        assert not fenced.ok and "replaced" in fenced.reason
        member.stop()

    on_sim_loop(main)


def test_a_post_logs_refused_deliveries_and_raises_a_bug() -> None:
    """A delivery refused as deliveries are (a SnapstoreError) is only logged, and the
    others still go; any other error reaches the post task's error log."""
    from snapstore.control.links import Poster
    from snapstore.errors import SnapstoreError

    loop = SimLoop()
    got: list[str] = []

    async def ok(name: str) -> None:
        await asyncio.sleep(0.01)
        got.append(name)

    async def refused() -> None:
        raise SnapstoreError("peer gone")

    async def bug() -> None:
        raise TypeError("not a message")

    async def main() -> tuple[int, int]:
        quiet, loud = Poster(), Poster()
        quiet.post([("a", ok("a")), ("refused", refused()), ("b", ok("b"))])
        loud.post([("bug", bug()), ("c", ok("c"))])
        await asyncio.sleep(0.1)
        return quiet.tasks.failures, loud.tasks.failures

    try:
        assert loop.run_until_complete(main()) == (0, 1)
    finally:
        loop.close()
    assert sorted(got) == ["a", "b", "c"]


def test_a_quiet_report_stands_for_a_beat_of_its_group() -> None:
    """GroupReport.quiet: every member was heard from; a suspect member is back. A report
    not quiet, or of another epoch, says nothing of the members."""

    async def test(plane: ControlPlane, fabric: ScriptedFabric) -> None:
        group, leader = _group(plane)
        membership = plane.membership
        await asyncio.sleep(5.0)  # nobody heard since: the tick finds the leader silent
        before = {n: membership.heard_at(n) for n in group}
        epoch = membership.epoch
        loud = GroupReport(JOB, 1, -1, epoch, leader, group, 2, {0: "a/1"})
        await plane.report(loud)
        assert {n: membership.heard_at(n) for n in group} == before
        stale = GroupReport(JOB, 1, -1, epoch - 1, leader, group, 2, {0: "a/1"}, quiet=True)
        await plane.report(stale)
        assert {n: membership.heard_at(n) for n in group} == before
        assert membership.nodes[leader].phase is NodePhase.SUSPECT
        quiet = GroupReport(JOB, 1, -1, epoch, leader, group, 2, {0: "a/1"}, quiet=True)
        await plane.report(quiet)
        now = plane.clock.now()
        assert all(membership.heard_at(n) == now for n in group)
        assert membership.nodes[leader].phase is NodePhase.ALIVE
        # The next quiet report (one stamp for the group once no one is suspect): a new
        # epoch keeps what it said of each member.
        await asyncio.sleep(0.5)
        await plane.report(quiet)
        later = plane.clock.now()
        assert not membership._suspects  # pruned by a tick: the group stamped once
        assert later > now and all(membership.heard_at(n) == later for n in group)
        membership.new_epoch("test")
        assert all(membership.heard[n] == later for n in group)

    run(test)


# -- a group's stagings matched to the job's sessions in C ----------------------------------

_SESSION = st.text(alphabet="ab/", min_size=0, max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    known=st.dictionaries(st.integers(0, 5), st.tuples(_SESSION, st.integers(-1, 3)), max_size=6),
    stagings=st.dictionaries(st.integers(-2, 6), _SESSION, max_size=6),
    changes=st.lists(
        st.tuples(st.sampled_from(["set", "del", "pop", "update", "clear"]), st.integers(0, 5)),
        max_size=4,
    ),
)
def test_stagings_match_the_known_sessions_exactly_as_one_by_one(
    known: dict[int, tuple[str, int]],
    stagings: dict[int, str],
    changes: list[tuple[str, int]],
) -> None:
    """The one pass over prefixes says what comparing each staging's session to its rank's
    does, after any change of the table (a session may be another's prefix: "a", "ab"). It
    may say no where that says yes only for what no client sends (a staging without "/",
    a session with one): those ranks are then checked one by one."""
    job = Job("j", 8, JobLife("j"))
    job.sessions.update(known)
    for what, rank in changes:
        if what == "set":
            job.sessions[rank] = (f"s{rank}", 0)
        elif what == "del" and rank in job.sessions:
            del job.sessions[rank]
        elif what == "pop":
            job.sessions.pop(rank, None)
        elif what == "update":
            job.sessions.update({rank: ("a", 1)})
        elif what == "clear":
            job.sessions.clear()
    one_by_one = all(
        rank in job.sessions and session_of(staging) == job.sessions[rank][0]
        for rank, staging in stagings.items()
    )
    fast = _sessions_known(job, stagings)
    assert one_by_one or not fast
    well_formed = all("/" in s for s in stagings.values()) and not any(
        "/" in session for session, _ in job.sessions.values()
    )
    if well_formed:
        assert fast == one_by_one
    prefixed = {r for r, p in enumerate(job.sessions.prefixes) if p is not None}
    assert prefixed == {r for r, (s, _) in job.sessions.items() if "/" not in s}
    assert all(job.sessions.prefixes[r] == s + "/" for r in prefixed for s in [job.sessions[r][0]])


_GROUPS = st.sampled_from([("a",), ("b",), ("c",), ("d",)])


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["join", "add_group", "add", "look"]),
            _GROUPS,
            st.dictionaries(st.integers(-1, 12), st.sampled_from(["s/1", "t/2"]), max_size=4),
        ),
        max_size=10,
    ),
)
def test_an_attempts_ranks_by_group_and_owner_say_what_one_index_by_rank_says(
    ops: list[tuple[str, tuple[str, ...], dict[int, str]]],
) -> None:
    """An attempt's ranks kept by group with each rank's group in a list (StagedRanks) say,
    after any mix of joins, moves between groups and single ranks, what a plain rank ->
    (staging, group) map kept one change at a time says. A join is taken only for a
    group not in the attempt yet whose ranks are in range and in no other group, and is
    refused, changing nothing, otherwise; a rank out of range is refused by name. Each
    group's rank_ids (a slice head's check) pack the ranks it holds."""
    world = 12
    att = Attempt(StepLife("j", 1, 0), world_size=world, epoch=0, started_at=0.0, wall_started=0.0)
    model: dict[int, tuple[str, tuple[str, ...]]] = {}
    for what, group, stagings in ops:
        in_range = all(0 <= r < world for r in stagings)
        if what == "join":
            can = (
                bool(stagings)
                and in_range
                # A group that held ranks, even if they all moved to others since, has
                # reported: a join is a group's first report, and refuses.
                and group not in att.by_group
                and all(g != group for _, g in model.values())
                and not model.keys() & stagings.keys()
            )
            assert att.join(group, stagings) == can
            if can:
                model.update((r, (s, group)) for r, s in stagings.items())
        elif what in ("add_group", "add") and not in_range:
            with pytest.raises(ValueError, match="outside world size 12"):
                att.add_group(group, stagings)
            model.update(  # the ranks before the first out of range were added
                (r, (s, group))
                for r, s in itertools.takewhile(lambda x: 0 <= x[0] < world, stagings.items())
            )
        elif what == "add_group":
            att.add_group(group, stagings)
            model.update((r, (s, group)) for r, s in stagings.items())
        elif what == "add" and stagings:
            rank, staging = next(iter(stagings.items()))
            att.add(rank, staging, group)
            model[rank] = (staging, group)
        else:
            assert dict(att.ranks.items()) == model
            assert all((r in att.ranks) == (r in model) for r in range(-1, world + 1))
            for g in att.by_group:  # asked for, then kept until the group changes
                held = [r for r, (_, o) in model.items() if o == g]
                assert att.ranks.rank_ids(g) == pack_ranks(held)
        assert len(att.ranks) == len(model)
    assert dict(att.ranks.items()) == model
    assert att.ranks.keys() & set(range(world)) == model.keys()
    by_group: dict[tuple[str, ...], dict[int, str]] = {}
    for rank, (staging, group) in model.items():
        by_group.setdefault(group, {})[rank] = staging
    assert {g: d for g, d in att.by_group.items() if d} == by_group
    for group in att.by_group:
        assert att.ranks.rank_ids(group) == pack_ranks(by_group.get(group, {}))


def test_a_world_size_past_the_largest_is_refused_by_name_and_nothing_is_sized_by_it() -> None:
    """A mistyped or forged world size: the client refuses it before anything starts, the
    coordinator refuses its stagings by name (the one-check path too), and the per-rank
    lists of an attempt and of a job's sessions are never sized by it."""
    from snapstore.clients import Client
    from snapstore.config import MAX_WORLD_SIZE
    from snapstore.control.commit import Commits

    huge = MAX_WORLD_SIZE * 1000
    with pytest.raises(ValueError, match=f"world size {huge} outside"):
        Client("j", 0, huge)
    job = Job("j", huge, JobLife("j"))
    commits = Commits(None)  # type: ignore[arg-type]
    assert not commits._unrefusable(job, {0: "s/1"}, 1, huge, known=True)
    assert commits._refusal(job, 0, "s/1", 1, huge) == (
        f"world size {huge} outside [1, {MAX_WORLD_SIZE}]"
    )
    att = Attempt(StepLife("j", 1, 0), world_size=huge, epoch=0, started_at=0.0, wall_started=0.0)
    assert len(att.ranks.owner) == MAX_WORLD_SIZE
    job.sessions[huge - 1] = ("s", -1)
    assert len(job.sessions.prefixes) < MAX_WORLD_SIZE
    assert not _sessions_known(job, {huge - 1: "s/1"})
