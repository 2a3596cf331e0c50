"""Membership: which store nodes there are, their lifecycles, groups, leaders, epochs.

Liveness is cheap and never guesses. Nodes heartbeat to their group's
leader; leaders send the coordinator one beat per group naming members it
has not heard from. Silence makes a node *suspect*: logged, shown, never
acted on. A node is *dead* only when Ray says so: the coordinator keeps one
pending watch call on every SMP (:meth:`Fabric.watch`), which fails the
moment the SMP's process or node dies. A dead node that does not come back
within ``reprotect_delay`` is *lost*: groups are re-formed without it and
its data rebuilt elsewhere.

Every change of groups or leaders starts a new *epoch*; each node gets its
:class:`NodeConfig` (group, leader, peers) for it, and steps in flight
under the old epoch are failed (their trainers save the next step).

A coordinator's epochs share their high bits, its *term*
(:func:`snapstore.control.messages.term_of`): a restarted coordinator starts
at the term after every epoch it found on the nodes. A node that answered
its recovery refuses decisions of the terms it had seen: whatever epochs the
replaced coordinator reached, even ones no node was configured with yet
(see :meth:`snapstore.control.member.Member.snapshot`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from snapstore.config import StoreConfig
from snapstore.control.events import EventLog
from snapstore.control.links import Fabric
from snapstore.control.messages import GroupBeat, GroupReport, NodeConfig, NodeInfo, next_term
from snapstore.control.placement import form_groups, regroup
from snapstore.control.runtime import Clock, Tasks
from snapstore.control.states import NodeLife, NodePhase
from snapstore.errors import ConfigError, SnapstoreError
from snapstore.rpc import describe

__all__ = ["Membership"]

logger = logging.getLogger(__name__)

CONFIGURE_TIMEOUT = 30.0


class Membership:
    """Nodes, groups and leaders of one store, by epoch. See the module docstring."""

    def __init__(
        self,
        cfg: StoreConfig,
        clock: Clock,
        events: EventLog,
        fabric: Fabric,
        tasks: Tasks,
        on_epoch: Callable[[str], None],
        on_restart: Callable[[str, NodePhase], None],
        identity: str = "",
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.clock = clock
        self.events = events
        self.fabric = fabric
        self.tasks = tasks
        self.on_epoch = on_epoch
        self.on_restart = on_restart
        self.nodes: dict[str, NodeLife] = {}
        self.infos: dict[str, NodeInfo] = {}
        self.joined: dict[str, float] = {}
        self.heard: dict[str, float] = {}
        """node -> when it was last heard from by itself (a registration, or through a
        leader whose group had someone silent or suspect); :meth:`heard_at` also reads
        ``_group_heard``."""
        self._group_heard: dict[tuple[str, ...], float] = {}
        """group -> when every member was last heard from through its leader, this epoch
        (a quiet report, or a beat naming no one silent, while no node is suspect): one
        write per message, where writing each member's stamp was, with the report's
        decode, the largest cost of a relayed message at 4,096 nodes (bench.scale).
        Folded into ``heard`` when the groups change (:meth:`new_epoch`)."""
        self.groups: list[tuple[str, ...]] = []
        self.unprotected: tuple[str, ...] = ()
        self.leaders: dict[tuple[str, ...], str | None] = {}
        self.relays: dict[tuple[str, ...], str] = {}
        """group -> the node its leader reports through (absent: straight)."""
        self.relay_of_leader: dict[str, str] = {}
        """Each group leader's relay: the coordinator's posts to a region go through it."""
        self.epoch = 0
        self.channel: tuple[str, int] = ("", 0)
        """Where the coordinator's control channel is, told to nodes in their configs."""
        self._group_of: dict[str, tuple[str, ...]] = {}
        self._resent: dict[str, int] = {}  # node -> epoch whose configure was sent again
        self._dead: dict[str, None] = {}
        """Nodes that died (in order), until lost or back: what a tick looks at, not every
        node (a dict, for a deterministic order)."""
        self._suspects: set[str] = set()
        """Nodes marked silent, and maybe since dead or back (pruned by a tick): while it is
        empty, a group's members heard from through their leader are noted in one update."""

    # -- queries ----------------------------------------------------------------------

    def phase(self, node: str) -> NodePhase | None:
        life = self.nodes.get(node)
        return None if life is None else life.phase

    def readable(self) -> list[str]:
        """Nodes whose SMPs may be read and given work: alive or merely silent."""
        return [n for n, life in self.nodes.items() if life.readable]

    def alive(self) -> list[str]:
        return [n for n, life in self.nodes.items() if life.phase is NodePhase.ALIVE]

    def present(self) -> list[str]:
        """Nodes not lost: their memory may still be (or come back) there."""
        return [n for n, life in self.nodes.items() if life.phase is not NodePhase.LOST]

    def group_of(self, node: str) -> tuple[str, ...] | None:
        return self._group_of.get(node)

    def heard_at(self, node: str) -> float | None:
        """When ``node`` was last heard from, by itself or through its leader (None: never)."""
        own = self.heard.get(node)
        group = self._group_of.get(node)
        via = self._group_heard.get(group) if group is not None else None
        if via is None or (own is not None and own >= via):
            return own
        return via

    def leader_of(self, group: tuple[str, ...]) -> str | None:
        return self.leaders.get(group)

    def all_groups(self) -> list[tuple[str, ...]]:
        return [*self.groups, *([self.unprotected] if self.unprotected else [])]

    def config_for(self, node: str) -> NodeConfig:
        group = self._group_of.get(node, ())
        peers = {n: self.infos[n].peer for n in group if n in self.infos}
        life = self.nodes.get(node)
        return NodeConfig(
            epoch=self.epoch,
            node=node,
            group=group,
            leader=self.leaders.get(group) or "",
            protected=bool(group) and group in self.groups,
            k=self.cfg.k,
            m=self.cfg.m,
            backend=self.cfg.backend,
            peers=peers,
            incarnation=life.incarnation if life is not None else "",
            relay=self.relays.get(group, ""),
            coordinator=self.identity,
            groups=len(self.groups) + bool(self.unprotected),
            coordinator_address=self.channel[0],
            coordinator_port=self.channel[1],
        )

    # -- what nodes say ----------------------------------------------------------------

    def register(self, info: NodeInfo) -> NodeConfig | None:
        """An SMP starts (or lost its configuration): the config of its node now."""
        node, now = info.node, self.clock.now()
        life = self.nodes.get(node)
        self.infos[node] = info
        self.heard[node] = now
        if life is None:
            self.nodes[node] = NodeLife(node, info.incarnation, NodePhase.ALIVE, now)
            self.joined[node] = self.clock.wall()
            self.events.add("node_joined", f"node {node[:12]} joined", node=node)
            self._watch(node, info.incarnation)
            self.regroup(f"node {node[:12]} joined")
        elif life.incarnation != info.incarnation:
            previous = life.restarted(info.incarnation, now)
            self.events.add(
                "smp_restarted",
                f"SMP on node {node[:12]} restarted (was {previous.value})",
                node=node,
            )
            self._watch(node, info.incarnation)
            if previous is NodePhase.LOST:
                self.regroup(f"node {node[:12]} is back, empty")
            else:
                self.new_epoch(f"SMP on node {node[:12]} restarted")
            self.on_restart(node, previous)
        elif life.phase is NodePhase.SUSPECT:
            self._back(life, now)
        return self.config_for(node)

    def group_beat(self, beat: GroupBeat) -> None:
        now = self.clock.now()
        for info in beat.infos:
            life = self.nodes.get(info.node)
            if life is None or info.incarnation != life.incarnation:
                continue
            self.infos[info.node] = info
        self._members_heard(beat.leader, beat.silent, now)
        for node, age in beat.silent.items():
            life = self.nodes.get(node)
            if life is not None and life.phase is NodePhase.ALIVE:
                self._silent(life, age, now)

    def quiet_report(self, report: GroupReport) -> None:
        """A report saying every member of the leader's group was heard from: a beat with
        nothing more to say (GroupReport.quiet)."""
        if report.quiet and report.epoch == self.epoch:
            self._members_heard(report.leader, {}, self.clock.now())

    def _members_heard(self, leader: str, silent: dict[str, float], now: float) -> None:
        """The members of ``leader``'s group but ``silent`` were heard from, through it."""
        heard, nodes = self.heard, self.nodes
        group = self._group_of.get(leader, ())
        if not silent and not self._suspects:
            if group:
                self._group_heard[group] = now  # no one to bring back: one stamp for all
            return
        for node in group:
            life = nodes.get(node)
            if life is None or node in silent:
                continue
            heard[node] = now
            if life.phase is NodePhase.SUSPECT:
                self._back(life, now)

    def died(self, node: str, incarnation: str, reason: str) -> None:
        """Ray says this incarnation of the node's SMP is dead."""
        life = self.nodes.get(node)
        if life is None or life.incarnation != incarnation or not life.readable:
            return
        heard = self.heard_at(node)
        silence = 0.0 if heard is None else self.clock.now() - heard
        life.died(self.clock.now())
        self._dead[node] = None
        self.events.add(
            "node_dead",
            f"node {node[:12]} is dead ({reason})",
            node=node,
            detection_latency=round(max(0.0, silence), 3),
        )
        leader_changed = any(self.leaders.get(g) == node for g in self.all_groups())
        if leader_changed or node in self._group_of:
            self.new_epoch(f"node {node[:12]} died")

    def tick(self) -> None:
        """Leaders that went silent become suspect; dead nodes past their delay are lost."""
        now = self.clock.now()
        stale = now - self.cfg.failure_timeout
        through = self._group_heard
        for group, leader in self.leaders.items():
            if leader is None or through.get(group, stale) > stale:
                continue  # its group stamped lately: nearly every one, every tick
            heard = self.heard_at(leader)
            if heard is None or heard >= stale:
                continue
            life = self.nodes.get(leader)
            if life is not None and life.phase is NodePhase.ALIVE:
                self._silent(life, now - heard, now)
        if self._suspects:
            self._suspects = {n for n in self._suspects if self.phase(n) is NodePhase.SUSPECT}
        lost = []
        for node in list(self._dead):
            life = self.nodes[node]
            if life.phase is not NodePhase.DEAD:
                del self._dead[node]  # back, or lost
            elif now - life.since >= self.cfg.reprotect_delay:
                del self._dead[node]
                dead_for = now - life.since
                life.declare_lost(now)
                lost.append(node)
                self.events.add(
                    "node_lost",
                    f"node {node[:12]} declared lost after {dead_for:.1f} s dead",
                    node=node,
                )
        if lost:
            self.regroup(f"nodes {[n[:12] for n in lost]} lost")

    def _silent(self, life: NodeLife, age: float, now: float) -> None:
        life.silent(now)
        self._suspects.add(life.node)
        self.events.add(
            "node_silent",
            f"node {life.node[:12]} silent for {age:.2f} s (suspect: nothing is aborted)",
            node=life.node,
            detection_latency=round(age, 3),
        )

    def _back(self, life: NodeLife, now: float) -> None:
        gap = now - life.since
        life.heard(now)
        self.events.add(
            "node_back",
            f"node {life.node[:12]} heard from again after {gap:.1f} s",
            node=life.node,
        )

    # -- groups and epochs ------------------------------------------------------------------

    def regroup(self, reason: str) -> None:
        """Groups for the nodes not lost, changing as few as possible; a new epoch."""
        present = self.present()
        k, m = self.cfg.k, self.cfg.m
        try:
            new = regroup(self.groups, present, k, m) if self.groups else form_groups(present, k, m)
            unprotected: tuple[str, ...] = ()
        except ConfigError as e:
            if self.groups:
                self.events.add("unprotected", f"cannot form stripe groups ({reason}): {e}")
            new, unprotected = [], tuple(present)
        if new != self.groups:
            self.events.add(
                "groups",
                f"stripe groups: {[[n[:8] for n in g] for g in new]} ({reason})",
                groups=[list(g) for g in new],
            )
        self.groups, self.unprotected = new, unprotected
        self.new_epoch(reason)

    def heard_epoch(self, epoch: int, node: str) -> None:
        """A node speaks in ``epoch``. One newer than ours came from a former coordinator
        (its configure arrived after this one read the nodes): nodes refuse older epochs,
        so move past it, and every node gets this coordinator's configuration again."""
        if epoch > self.epoch:
            self.epoch = next_term(epoch)
            self.new_epoch(
                f"node {node[:12]} was configured in epoch {epoch} by a former coordinator"
            )
        elif epoch < self.epoch and self._resent.get(node) != self.epoch:
            # Its configure was lost (or refused): once per epoch, send it again.
            life = self.nodes.get(node)
            if life is not None and life.readable:
                self._resent[node] = self.epoch
                self.tasks.spawn(self._configure(node), f"configure {node[:12]} again")

    def new_epoch(self, reason: str) -> None:
        self.epoch += 1
        heard = self.heard
        for group, at in self._group_heard.items():
            for node in group:
                if heard.get(node, at) <= at:
                    heard[node] = at
        self._group_heard = {}
        self._group_of = {n: g for g in self.all_groups() for n in g}
        self.leaders = {}
        for g in self.all_groups():
            self.leaders[g] = next((n for n in g if self.nodes[n].readable), None)
        self.relays = self._relays()
        self.relay_of_leader = {
            leader: self.relays[g]
            for g, leader in self.leaders.items()
            if leader is not None and g in self.relays
        }
        for node in self.readable():
            self.tasks.spawn(self._configure(node), f"configure {node[:12]}")
        self.on_epoch(reason)

    def _relays(self) -> dict[tuple[str, ...], str]:
        """Each region of ``relay_groups`` consecutive groups reports through one of its
        readable nodes: alive before suspect, and one that leads no group before a
        leader (see snapstore.control.relay). A region of one group sends straight,
        unless ``relay_groups`` is 1."""
        size = self.cfg.relay_groups
        groups = self.all_groups()
        relays: dict[tuple[str, ...], str] = {}
        if size <= 0:
            return relays
        leading = {n for n in self.leaders.values() if n}
        for i in range(0, len(groups), size):
            region = groups[i : i + size]
            if len(region) < min(size, 2):
                continue
            nodes = [n for g in region for n in g if self.nodes[n].readable]
            nodes.sort(key=lambda n: (self.nodes[n].phase is not NodePhase.ALIVE, n in leading))
            relay = nodes[0] if nodes else ""
            for g in region:
                if relay:
                    relays[g] = relay
        return relays

    async def _configure(self, node: str) -> None:
        config = self.config_for(node)
        try:
            await asyncio.wait_for(self.fabric.node(node).configure(config), CONFIGURE_TIMEOUT)
        except (SnapstoreError, asyncio.TimeoutError) as e:
            # It re-registers when it stops hearing from its leader, and gets it then.
            logger.info("configure of node %s failed: %s", node[:12], describe(e))

    def _watch(self, node: str, incarnation: str) -> None:
        self.tasks.spawn(self._watch_one(node, incarnation), f"watch {node[:12]}")

    async def _watch_one(self, node: str, incarnation: str) -> None:
        try:
            await self.fabric.watch(node)
            reason = "its SMP stopped"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = describe(e)
        self.died(node, incarnation, reason)
