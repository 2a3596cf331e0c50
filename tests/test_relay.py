"""Relays (snapstore.control.relay), without Ray, on the simulation's virtual-time loop.

- the membership names one relay per region of ``relay_groups`` groups, a node of
  the region that leads no group, and none for a region of one group (unless
  ``relay_groups`` is 1) or with relays off;
- a relay forwards a burst after RELAY_LINGER and batches what arrives while a
  batch is on its way, in order; a batch the coordinator does not take is dropped and
  the next one still goes;
- a leader's uplink goes straight to the coordinator when its relay refuses or
  does not answer within RELAY_TIMEOUT;
- the coordinator takes a batch as it takes each of its reports and beats;
- the coordinator's posts to a region's leaders go to its relay as one batch
  (re-sends straight), which the relay posts on to each leader.

The simulation (``python -m tests.sim``) runs half its schedules with relays on,
crashing and stalling relay nodes among the rest.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from snapstore.config import StoreConfig
from snapstore.control.events import EventLog
from snapstore.control.membership import Membership
from snapstore.control.messages import (
    Decision,
    GroupBeat,
    GroupReport,
    LeaderBatch,
    NodeInfo,
    OutcomeStatus,
    PrepareOrder,
    ReportBatch,
)
from snapstore.control.relay import RELAY_BACKOFF, RELAY_LINGER, RELAY_TIMEOUT, Relay, Uplink
from snapstore.control.runtime import LoopClock, Tasks
from snapstore.errors import ActorUnavailableError
from snapstore.format.work import PeerInfo
from tests.test_control_plane import ScriptedFabric, on_sim_loop, run


def _membership(nodes: int, k: int, m: int, relay_groups: int) -> Membership:
    cfg = StoreConfig(k=k, m=m, nodes=nodes, relay_groups=relay_groups)
    ms = Membership(
        cfg,
        LoopClock(0.0),
        EventLog(),
        ScriptedFabric(),
        Tasks(),
        lambda reason: None,
        lambda node, phase: None,
    )
    for i in range(nodes):
        n = f"n{i:02d}" + "0" * 29
        ms.register(NodeInfo(n, "inc1", PeerInfo(n, "host", "/d", "127.0.0.1", 0)))
    return ms


def test_membership_names_one_relay_per_region_that_leads_no_group() -> None:
    async def main() -> None:
        ms = _membership(nodes=16, k=1, m=1, relay_groups=3)
        groups = ms.all_groups()
        assert len(groups) >= 6
        leaders = {ms.leader_of(g) for g in groups}
        regions = [groups[i : i + 3] for i in range(0, len(groups), 3)]
        if len(regions[-1]) == 1:
            assert regions[-1][0] not in ms.relays, "a region of one group sends straight"
            regions.pop()
        for region in regions:
            relays = {ms.relays[g] for g in region}
            assert len(relays) == 1, relays
            relay = relays.pop()
            assert relay in {n for g in region for n in g}, "a node of its own region"
            assert relay not in leaders, "a node that leads no group"
            for g in region:
                assert ms.config_for(g[1]).relay == relay
        assert len({ms.relays[r[0]] for r in regions}) == len(regions)
        ms.tasks.cancel_all()

    on_sim_loop(main)


def test_a_region_of_one_group_and_relays_off_send_straight() -> None:
    async def main() -> None:
        one = _membership(nodes=4, k=3, m=1, relay_groups=16)
        assert one.relays == {} and one.config_for(one.all_groups()[0][0]).relay == ""
        off = _membership(nodes=16, k=1, m=1, relay_groups=0)
        assert off.relays == {}
        each = _membership(nodes=4, k=3, m=1, relay_groups=1)  # for tests: a relay apiece
        (group,) = each.all_groups()
        assert each.relays[group] in group and each.relays[group] != each.leader_of(group)
        for ms in (one, off, each):
            ms.tasks.cancel_all()

    on_sim_loop(main)


class _Coordinator:
    """A coordinator link whose ``batch`` waits for ``release`` (a batch on its way)."""

    def __init__(self) -> None:
        self.batches: list[ReportBatch] = []
        self.straight: list[Any] = []
        self.release = asyncio.Event()
        self.refuse = False

    def coordinator(self) -> _Coordinator:
        return self

    async def batch(self, batch: ReportBatch) -> None:
        self.batches.append(batch)
        await self.release.wait()
        if self.refuse:
            raise ActorUnavailableError("coordinator.batch: actor unavailable (dead)")

    async def report(self, report: GroupReport) -> None:
        self.straight.append(report)

    async def group_beat(self, beat: GroupBeat) -> None:
        self.straight.append(beat)


def _report(step: int, leader: str = "L") -> GroupReport:
    return GroupReport("job", step, -1, 1, leader, (leader,), 8, {0: f"s/{step}"})


async def _settle() -> None:
    """What a relay holds has gone (its linger passed) as far as it can."""
    await asyncio.sleep(RELAY_LINGER)
    for _ in range(10):
        await asyncio.sleep(0)


def test_relay_forwards_a_burst_after_its_linger_then_batches_what_arrives_meanwhile() -> None:
    async def main() -> None:
        up = _Coordinator()
        relay = Relay(up)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await relay.report(_report(1, "X"))
        await asyncio.sleep(RELAY_LINGER / 2)
        await relay.report(_report(1, "Y"))
        assert up.batches == [], "an idle relay waits for the rest of the burst"
        await asyncio.sleep(RELAY_LINGER / 2)
        for _ in range(10):
            await asyncio.sleep(0)
        assert [[r.leader for r in b.reports] for b in up.batches] == [["X", "Y"]]
        assert loop.time() - t0 == RELAY_LINGER, "and no longer"
        await relay.report(_report(2, "A"))
        await relay.group_beat(GroupBeat(1, "B", (), {}))
        await relay.report(_report(2, "C"))
        await _settle()
        assert len(up.batches) == 1, "nothing else goes while a batch is on its way"
        up.release.set()
        await _settle()
        assert len(up.batches) == 2, "the coordinator took the last: the next goes at once"
        assert [r.leader for r in up.batches[1].reports] == ["A", "C"]
        assert [b.leader for b in up.batches[1].beats] == ["B"]
        assert relay.batches == 2 and relay.forwarded == 5
        relay.stop()

    on_sim_loop(main)


def test_a_batch_the_coordinator_refuses_is_dropped_and_the_next_still_goes() -> None:
    async def main() -> None:
        up = _Coordinator()
        up.refuse = True
        relay = Relay(up)  # type: ignore[arg-type]
        await relay.report(_report(1))
        await _settle()
        await relay.report(_report(2))
        up.release.set()
        await _settle()
        assert [[r.step for r in b.reports] for b in up.batches] == [[1], [2]]
        up.refuse = False
        await asyncio.sleep(RELAY_BACKOFF)
        await relay.report(_report(3))
        await _settle()
        assert [r.step for r in up.batches[-1].reports] == [3]
        relay.stop()

    on_sim_loop(main)


class _DeadRelay:
    async def report(self, report: GroupReport) -> None:
        raise ActorUnavailableError("SMP relay_report: actor unavailable (dead)")

    async def group_beat(self, beat: GroupBeat) -> None:
        raise ActorUnavailableError("SMP relay_beat: actor unavailable (dead)")


class _StalledRelay:
    async def report(self, report: GroupReport) -> None:
        await asyncio.sleep(3600)

    async def group_beat(self, beat: GroupBeat) -> None:
        await asyncio.sleep(3600)


def test_uplink_sends_straight_when_its_relay_is_dead_or_stalled() -> None:
    async def main() -> None:
        up = _Coordinator()
        dead = Uplink(up, _DeadRelay())  # type: ignore[arg-type]
        await dead.report(_report(1))
        await dead.group_beat(GroupBeat(1, "L", (), {}))
        assert [type(x).__name__ for x in up.straight] == ["GroupReport", "GroupBeat"]

        loop = asyncio.get_running_loop()
        stalled = Uplink(up, _StalledRelay())  # type: ignore[arg-type]
        t0 = loop.time()
        await stalled.report(_report(2))
        assert loop.time() - t0 == RELAY_TIMEOUT
        assert up.straight[-1].step == 2

        relay = Relay(up)  # type: ignore[arg-type]
        up.release.set()
        through = Uplink(up, relay)  # type: ignore[arg-type]
        await through.report(_report(3))
        await _settle()
        assert up.batches[-1].reports[0].step == 3 and up.straight[-1].step == 2
        relay.stop()

    on_sim_loop(main)


def test_the_coordinator_takes_a_batch_as_each_of_its_messages() -> None:
    async def test(plane: Any, fabric: ScriptedFabric) -> None:
        group = plane.membership.all_groups()[0]
        leader = plane.membership.leader_of(group)
        epoch = plane.membership.epoch
        sessions = {r: f"sess{r}/1" for r in range(4)}
        staged = GroupReport("job", 1, -1, epoch, leader, group, 4, sessions)
        silent = {group[1]: 2.5}
        await plane.batch(ReportBatch((staged,), (GroupBeat(epoch, leader, (), silent),)))
        orders = fabric.sent("prepare")
        assert len(orders) == 1 and orders[0].sessions == sessions, "staged: prepare ordered"
        assert plane.membership.phase(group[1]).value == "suspect", "the beat was taken"

    run(test)


def test_relay_groups_must_be_a_count() -> None:
    from snapstore.errors import ConfigError

    with pytest.raises(ConfigError, match="relay_groups must be an integer >= 0"):
        StoreConfig(relay_groups=-1)


def test_a_relay_whose_batch_was_dropped_refuses_until_its_backoff_ends() -> None:
    async def main() -> None:
        up = _Coordinator()
        up.refuse = True
        up.release.set()
        relay = Relay(up)  # type: ignore[arg-type]
        await relay.report(_report(1))
        await _settle()
        with pytest.raises(ActorUnavailableError, match="did not reach the coordinator"):
            await relay.report(_report(2))  # leaders send straight meanwhile
        await asyncio.sleep(RELAY_BACKOFF)
        up.refuse = False
        await relay.report(_report(3))
        await _settle()
        assert [[r.step for r in b.reports] for b in up.batches] == [[1], [3]]
        relay.stop()
        with pytest.raises(ActorUnavailableError, match="stopped"):
            await relay.report(_report(4))

    on_sim_loop(main)


def test_a_relay_stopped_before_its_flush_ran_is_not_left_busy() -> None:
    async def main() -> None:
        up = _Coordinator()
        relay = Relay(up)  # type: ignore[arg-type]
        await relay.report(_report(1))  # its flush task is spawned, not run yet
        relay.stop()
        await _settle()
        assert up.batches == [] and not relay._flushing

    on_sim_loop(main)


def test_after_its_relay_failed_a_leader_sends_straight_for_a_while() -> None:
    async def main() -> None:
        up = _Coordinator()
        loop = asyncio.get_running_loop()
        stalled = Uplink(up, _StalledRelay())  # type: ignore[arg-type]
        await stalled.report(_report(1))  # one timeout...
        t0 = loop.time()
        await stalled.report(_report(2))  # ...then straight at once
        await stalled.group_beat(GroupBeat(1, "L", (), {}))
        assert loop.time() == t0
        await asyncio.sleep(RELAY_BACKOFF)
        t1 = loop.time()
        await stalled.report(_report(3), relay_timeout=0.25)  # the relay is tried again
        assert loop.time() - t1 == 0.25
        assert [getattr(x, "step", None) for x in up.straight] == [1, 2, None, 3]

    on_sim_loop(main)


def test_the_coordinators_posts_to_a_region_go_through_its_relay_and_resends_straight() -> None:
    async def test(plane: Any, fabric: ScriptedFabric) -> None:
        groups = plane.membership.all_groups()
        assert len(groups) == 2 and groups[0] in plane.membership.relays
        relay = plane.membership.relays[groups[0]]
        leaders = [plane.membership.leader_of(g) for g in groups]
        order = PrepareOrder("job", 3, 0, plane.membership.epoch, 4, {0: "s0/1"})
        decision = Decision("job", 3, 0, OutcomeStatus.COMMITTED)
        fabric.calls.clear()
        plane.send_leaders([(leaders[0], order), (leaders[0], decision), (leaders[1], decision)])
        assert [(n, m) for n, m, _ in fabric.calls] == [(relay, "relay_down")]
        batch = fabric.calls[0][2][0]
        assert batch.orders == ((leaders[0], order),)
        assert len(batch.decisions) == 1, "a decision to every leader is sent once"
        assert batch.decisions[0].epoch == plane.membership.epoch, "stamped as it is sent"
        assert batch.leaders == (tuple(leaders),)
        counters = plane.events.metrics.counters
        assert counters["relay_down_batches_total"] == 1
        assert counters["relayed_down_messages_total"] == 3

        fabric.calls.clear()
        plane.send_leaders([(leaders[0], decision), (leaders[1], decision)], straight=True)
        assert sorted((n, m) for n, m, _ in fabric.calls) == sorted(
            (leader, "decide") for leader in leaders
        ), "a re-send goes straight to the leaders"

        fabric.calls.clear()
        plane.send_decision(leaders, decision)  # a commit's, to every group
        assert [(n, m) for n, m, _ in fabric.calls] == [(relay, "relay_down")]
        batch = fabric.calls[0][2][0]
        assert batch.orders == () and batch.leaders == (tuple(leaders),)
        assert batch.decisions[0].epoch == plane.membership.epoch
        assert counters["relay_down_batches_total"] == 2
        assert counters["relayed_down_messages_total"] == 5

    run(test, nodes=4, k=1, m=1, relay_groups=2)


def test_a_relay_posts_the_coordinators_batch_on_to_each_leader() -> None:
    async def main() -> None:
        fabric = ScriptedFabric()
        relay = Relay(fabric)
        order = PrepareOrder("job", 3, 0, 7, 4, {0: "s0/1"})
        decision = Decision("job", 2, 0, OutcomeStatus.COMMITTED)
        await relay.down(LeaderBatch(((("L1", order)),), (decision,), (("L1", "L2"),)))
        assert fabric.calls == [
            ("L1", "prepare", (order,)),
            ("L1", "decide", (decision,)),
            ("L2", "decide", (decision,)),
        ]
        assert relay.down_batches == 1
        relay.stop()
        with pytest.raises(ActorUnavailableError):
            await relay.down(LeaderBatch())

    on_sim_loop(main)


def test_a_leader_skips_the_beats_its_quiet_reports_stand_for() -> None:
    """A report sent while every member was heard from is quiet; a beat that would say no
    more is skipped while the coordinator took one within the beat interval. A member
    gone silent makes reports loud and brings the beats back, naming it."""
    from snapstore.control.leader import Leader
    from snapstore.control.messages import MemberBeat, NodeConfig, NodeInfo

    group = ("L", "a", "b", "c")

    async def main() -> None:
        up = _Coordinator()
        cfg = StoreConfig(k=3, m=1, nodes=4)
        config = NodeConfig(1, "L", group, "L", True, 3, 1, cfg.backend)
        leader = Leader("L", config, None, up, LoopClock(0.0), cfg)  # type: ignore[arg-type]
        beating = set(group)
        incarnation = [""]

        async def members() -> None:
            used = 0
            while True:
                used += 1
                for n in sorted(beating):
                    peer = PeerInfo(n, "", "", "", 0)
                    info = NodeInfo(n, incarnation[0], peer, used=used)
                    await leader.beat(MemberBeat(info, 1))
                await asyncio.sleep(0.25)

        async def reports(until: float) -> None:
            while loop.time() < until:
                await leader._up_report(msgspec.structs.replace(_report(1), quiet=leader._quiet()))
                await asyncio.sleep(0.4)

        def beats() -> list[GroupBeat]:
            return [x for x in up.straight if isinstance(x, GroupBeat)]

        loop = asyncio.get_running_loop()
        feeder = asyncio.ensure_future(members())
        leader.start()
        await asyncio.sleep(3.5)
        assert len(beats()) == 3  # no report: a beat a second
        await reports(loop.time() + 3.0)
        assert len(beats()) == 3  # quiet reports all along: no beat
        assert all(r.quiet for r in up.straight if isinstance(r, GroupReport))
        # Members that came up go with the next beat; their usage, which every step
        # changes, at most every USAGE_BEAT_EVERY intervals: quiet reports skip the rest.
        incarnation[0] = "i1"
        await reports(loop.time() + 7.0)
        told = beats()[3:]
        assert 2 <= len(told) <= 3, [len(b.infos) for b in told]
        assert all(b.infos for b in told)
        assert told[-1].infos[0].used > told[0].infos[0].used
        n_beats = len(beats())
        beating.discard("c")  # silent from here
        await reports(loop.time() + 4.0)
        loud = [r for r in up.straight if isinstance(r, GroupReport) and not r.quiet]
        assert loud, "reports while a member is silent are not quiet"
        assert any("c" in b.silent for b in beats()[n_beats:]), "beats name the silent member"
        leader.stop()
        feeder.cancel()

    on_sim_loop(main)


@pytest.mark.parametrize(("groups", "every"), [(1, 5), (1000, 10)])
def test_a_leader_spaces_its_members_usage_by_the_number_of_groups(groups: int, every: int) -> None:
    """Members whose usage alone changes (every step does) are told every 5th beat, or, with
    more groups than 500, every (groups / 100)th: about 100 groups' usage per interval
    reach the coordinator however many groups there are. A member that changed process
    goes with the next beat whatever the spacing."""
    from snapstore.control.leader import Leader
    from snapstore.control.messages import MemberBeat, NodeConfig, NodeInfo

    group = ("L", "a", "b", "c")

    async def main() -> None:
        up = _Coordinator()
        cfg = StoreConfig(k=3, m=1, nodes=4)
        config = NodeConfig(1, "L", group, "L", True, 3, 1, cfg.backend, groups=groups)
        leader = Leader("L", config, None, up, LoopClock(0.0), cfg)  # type: ignore[arg-type]
        incarnation = ["i1"]

        async def members() -> None:
            used = 0
            while True:
                used += 1
                for n in group:
                    info = NodeInfo(n, incarnation[0], PeerInfo(n, "", "", "", 0), used=used)
                    await leader.beat(MemberBeat(info, 1))
                await asyncio.sleep(0.25)

        def told() -> list[GroupBeat]:
            return [x for x in up.straight if isinstance(x, GroupBeat) and x.infos]

        feeder = asyncio.ensure_future(members())
        leader.start()
        await asyncio.sleep(18.5)  # beats at 1 s; the 0th and the 20th carry every info
        assert [len(b.infos) for b in told()] == [4] * (1 + (18 - 1) // every)
        incarnation[0] = "i2"  # a new process: told at once
        await asyncio.sleep(1.0)
        assert len(told()) == 2 + (18 - 1) // every
        leader.stop()
        feeder.cancel()

    on_sim_loop(main)
