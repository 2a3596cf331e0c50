"""The real coordinator actor over real Ray, driven by stand-ins for many nodes.

The coordinator is :class:`snapstore.control.coordinator.Coordinator` as a
Ray actor on a private head node (marked as the control node, so it deploys
no SMP), taking every call through its Ray methods with wire bytes. Its
links *to* nodes go to a few :class:`StandIn` actors instead of one SMP
actor per node (:class:`BenchCoordinator` only swaps the fabric); each
stand-in impersonates many nodes and their group leaders:

- it answers the coordinator's snapshot, configure, watch (a call that
  never returns while the node lives, one per node, as Ray's death watch),
  prepare and decide calls;
- for each group it leads it sends a :class:`GroupBeat` each heartbeat
  interval, with every member's :class:`NodeInfo` when they changed (the
  group saved since) at most every
  :data:`snapstore.control.leader.USAGE_BEAT_EVERY` intervals, or every
  :data:`snapstore.control.leader.FULL_BEAT_EVERY`; its reports are quiet
  (``GroupReport.quiet``) and a beat with no info is skipped within an
  interval of one, as the real leader does;
- on :meth:`StandIn.step`, one staged :class:`GroupReport` per group it
  leads (the fewest the real leaders send), then the prepared slice when
  ordered, then the decision's acknowledgement.

Before the coordinator, a bare actor (:class:`Sink`) takes the same beats
under the coordinator's name, from the same stand-ins at the same rate: its
CPU per call is Ray's own cost of a call, the floor under the coordinator's.

Nodes join as a restarted coordinator finds them (``discover``, one
snapshot each, one regrouping), not one registration at a time, which
regroups and reconfigures every node per join (see the README). What is
measured is the coordinator process's CPU (``psutil``) while idle (beats
only) and over steps saved back to back.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from snapstore.config import StoreConfig
from snapstore.control.coordinator import Coordinator
from snapstore.control.leader import FULL_BEAT_EVERY, USAGE_BEAT_EVERY
from snapstore.control.links import (
    LeaderPost,
    NodePost,
    NodeSnapshot,
    PerMessage,
    Poster,
    RelayPost,
)
from snapstore.control.messages import (
    Decision,
    GroupBeat,
    GroupReport,
    LeaderBatch,
    NodeConfig,
    NodeInfo,
    OutcomeStatus,
    PrepareOrder,
    ReportBatch,
)
from snapstore.control.placement import plan_parity
from snapstore.control.rayfabric import await_ref
from snapstore.control.relay import Relay
from snapstore.errors import ActorUnavailableError, SnapstoreError
from snapstore.format.record import RankEntry, StepRecord
from snapstore.format.wire import decode, encode
from snapstore.format.work import CommitResult, PeerInfo

__all__ = [
    "BenchCoordinator",
    "RayPoint",
    "Sink",
    "StandIn",
    "measure_ray",
    "node_of",
    "standin_of",
]

JOB = "train"
NAMESPACE = "snapstore-scale"


def node_of(standin: int, i: int) -> str:
    """Node ``i`` (global index) impersonated by stand-in ``standin``: a 56-hex-digit id."""
    return f"{standin:04x}{i:08x}".ljust(56, "0")


def standin_of(node: str) -> int:
    return int(node[:4], 16)


def index_of(node: str) -> int:
    return int(node[4:12], 16)


def info_of(node: str) -> NodeInfo:
    """What an SMP says of itself (as sized as the real one's)."""
    i = index_of(node)
    return NodeInfo(
        node=node,
        incarnation=f"i{i:08x}",
        peer=PeerInfo(node, f"host-{i}", f"/dev/shm/snapstore-scale/{node[:16]}", "10.0.0.1", 0),
        pid=10_000 + i,
        started_at=1_800_000_000.0,
        budget=64 << 30,
        used=8 << 30,
        data_bytes=4 << 30,
        parity_bytes=4 << 30,
        counters={"saves": 1000, "parity_bytes_built": 1 << 40, "peer_bytes_read": 1 << 40},
    )


class _StandinNode:
    """A node as the coordinator reaches it: through the stand-in that impersonates it."""

    def __init__(self, handle: Any, node: str) -> None:
        self.node = node
        self._h = handle

    async def _call(self, method: str, *args: Any) -> Any:
        ref = getattr(self._h, method).remote(*args)
        return await await_ref(ref, f"stand-in {self.node[:12]}.{method}")

    async def configure(self, config: NodeConfig) -> None:
        await self._call("configure", encode(config))

    async def decide(self, decision: Decision) -> CommitResult:
        return decode(await self._call("decide", self.node, encode(decision)), CommitResult)

    async def snapshot(self, requester: str = "") -> NodeSnapshot:
        return decode(await self._call("snapshot", self.node), NodeSnapshot)

    def __getattr__(self, name: str) -> Any:
        async def refused(*args: Any) -> Any:
            raise SnapstoreError(f"stand-in nodes do no {name} (not measured)")

        return refused


class _StandinLeader:
    def __init__(self, node: _StandinNode) -> None:
        self.node = node.node
        self._n = node

    async def notice(self, *args: Any) -> None:
        raise SnapstoreError("stand-in leaders take no notices")

    async def beat(self, *args: Any) -> None:
        raise SnapstoreError("stand-in leaders take no member beats")


class StandinFabric:
    """The coordinator's fabric: every node is one of the stand-ins' nodes."""

    def __init__(self, standins: list[Any], nodes: list[str]) -> None:
        self._standins = standins
        self._nodes = nodes
        self._poster = Poster()

    def node(self, node: str) -> _StandinNode:
        return _StandinNode(self._standins[standin_of(node)], node)

    def leader(self, node: str) -> _StandinLeader:
        return _StandinLeader(self.node(node))

    def coordinator(self) -> Any:
        raise ActorUnavailableError("the coordinator does not call itself")

    def relay(self, node: str) -> Any:
        raise ActorUnavailableError("the coordinator sends nothing through relays")

    def post_leaders(self, posts: Sequence[LeaderPost]) -> None:
        """As :class:`snapstore.control.rayfabric.RayFabric` posts: each message encoded
        once, one task awaiting every delivery."""
        wire = PerMessage(encode)
        sends = []
        for node, msg in posts:
            data = wire(msg)
            method = "leader_prepare" if isinstance(msg, PrepareOrder) else "leader_decide"
            sends.append((f"{method} to {node[:12]}", self.node(node)._call(method, node, data)))
        self._poster.post(sends)

    def post_relays(self, posts: Sequence[RelayPost]) -> None:
        """Each batch to the stand-in of its relay's node; a region whose leaders live in
        several stand-ins is split into one batch for each (what the relay would post
        on to the others, the coordinator sends: one call more per split region)."""
        sends = []
        for relay, batch in posts:
            for standin, part in _split(batch).items():
                node = relay if standin == standin_of(relay) else part[0]
                call = self.node(node)._call("relay_down", node, encode(part[1]))
                sends.append((f"relay_down to {node[:12]}", call))
        self._poster.post(sends)

    def post_nodes(self, posts: Sequence[NodePost]) -> None:
        wire = PerMessage(encode)
        sends = []
        for node, msg in posts:
            data = wire(msg)
            sends.append((f"decide to {node[:12]}", self.node(node)._call("decide", node, data)))
        self._poster.post(sends)

    async def watch(self, node: str) -> None:
        await self.node(node)._call("watch", node)

    async def discover(self) -> list[str]:
        return list(self._nodes)


class BenchCoordinator(Coordinator):
    """The real coordinator actor, its links to nodes going to the stand-ins."""

    def __init__(
        self,
        store_id: str,
        config: dict[str, Any],
        token: str,
        shm_dir: str,
        standins: list[Any],
        nodes: list[str],
    ) -> None:
        super().__init__(store_id, config, token, shm_dir)
        fabric = StandinFabric(standins, nodes)
        # Before _start runs (it is scheduled, not run, by the constructor).
        self.fabric = fabric  # type: ignore[assignment]
        self.plane.fabric = fabric
        self.plane.membership.fabric = fabric

    async def pid(self) -> int:
        return os.getpid()


@dataclass
class _Group:
    config: NodeConfig
    template: StepRecord


class StandIn:
    """Many nodes and their group leaders in one Ray actor (see the module docstring)."""

    def __init__(
        self,
        nodes: list[str],
        k: int,
        m: int,
        ranks: int,
        rank_bytes: int,
        world_size: int,
        interval: float,
    ) -> None:
        self.nodes = set(nodes)
        self.k, self.m = k, m
        self.ranks, self.rank_bytes, self.world_size = ranks, rank_bytes, world_size
        self.interval = interval
        self.configs: dict[str, NodeConfig] = {}
        self.groups: dict[str, _Group] = {}
        self.decided: dict[int, set[str]] = {}
        self.beats = 0
        self.changed: set[str] = set()
        """Leaders whose group saved since its last infos went (its members' infos changed)."""
        self.told_at: dict[str, int] = {}
        """Leader -> the beat interval its members' infos last went with."""
        self.reported: dict[str, float] = {}
        """Leader -> when its last report (quiet: it stands for a beat) was sent."""
        self.refs: list[Any] = []
        self.relays: dict[str, Relay] = {}
        self._never = asyncio.Event()
        self._beating: asyncio.Task[None] | None = None
        self._coord: Any = None

    def _coordinator(self) -> Any:
        if self._coord is None:
            import ray

            from snapstore.node.store import COORDINATOR_NAME

            self._coord = ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
        return self._coord

    def _send(self, method: str, msg: GroupReport | GroupBeat, relay: str = "") -> None:
        """A call to the coordinator; its reply is collected in bulk (see :meth:`reap`).
        With a ``relay`` (the group's NodeConfig.relay), through the real
        :class:`snapstore.control.relay.Relay` of that node, kept here."""
        if isinstance(msg, GroupReport):
            self.reported[msg.leader] = asyncio.get_running_loop().time()
        if relay:
            r = self.relays.get(relay)
            if r is None:
                r = self.relays[relay] = Relay(_Up(self))  # type: ignore[arg-type]
            r.forward(msg)
            return
        self.refs.append(getattr(self._coordinator(), method).remote(encode(msg)))
        if len(self.refs) > 4096:
            self.refs = self.refs[-1024:]

    # -- the node link ---------------------------------------------------------------------

    async def snapshot(self, node: str) -> bytes:
        return encode(NodeSnapshot(info_of(node), None))

    async def configure(self, data: bytes) -> None:
        config = decode(data, NodeConfig)
        self.configs[config.node] = config
        if config.leader == config.node and config.protected:
            self.groups[config.node] = _Group(config, self._template(config))
        else:
            self.groups.pop(config.node, None)

    async def watch(self, node: str) -> None:
        await self._never.wait()

    async def decide(self, node: str, data: bytes) -> bytes:
        return encode(CommitResult(True))

    # -- leaders -------------------------------------------------------------------------------

    def _template(self, config: NodeConfig) -> StepRecord:
        ranks = {
            index_of(n) * self.ranks + j: RankEntry(n, self.rank_bytes, tuple(range(self.k)))
            for n in config.group
            for j in range(self.ranks)
        }
        parity = tuple(plan_parity(ranks, (config.group,), self.k, self.m))
        return StepRecord(
            JOB, 0, 0, self.k, self.m, self.world_size, ranks, (config.group,), parity
        )

    async def relay_down(self, node: str, data: bytes) -> None:
        """The relay on ``node``: the coordinator's batch for its region's leaders (all of
        them stand-ins' nodes; those of this stand-in are served here, as a real relay's
        posts would reach them)."""
        batch = decode(data, LeaderBatch)
        for leader, order in batch.orders:
            self._prepare(leader, order)
        for decision, leaders in zip(batch.decisions, batch.leaders, strict=True):
            for leader in leaders:
                self._decide(leader, decision)

    async def leader_prepare(self, node: str, data: bytes) -> None:
        self._prepare(node, decode(data, PrepareOrder))

    def _prepare(self, node: str, order: PrepareOrder) -> None:
        g = self.groups.get(node)
        if g is None:
            return
        piece = g.template.replace(step=order.step, version=order.version)
        report = GroupReport(
            JOB,
            order.step,
            order.version,
            g.config.epoch,
            node,
            g.config.group,
            order.world_size,
            prepared=piece.to_bytes(),
            stats={"parity_seconds": 0.5, "peer_bytes": 1 << 30, "delta": False},
            quiet=True,
        )
        self._send("report", report, g.config.relay)

    async def leader_decide(self, node: str, data: bytes) -> None:
        self._decide(node, decode(data, Decision))

    def _decide(self, node: str, d: Decision) -> None:
        g = self.groups.get(node)
        if g is None:
            return
        if d.status is OutcomeStatus.COMMITTED:
            self.decided.setdefault(d.step, set()).add(node)
        ack = GroupReport(
            d.job,
            d.step,
            d.version,
            g.config.epoch,
            node,
            g.config.group,
            0,
            applied=True,
            quiet=True,
        )
        self._send("report", ack, g.config.relay)

    # -- driving ---------------------------------------------------------------------------------

    async def start(self) -> int:
        """Start the group beats; how many groups this stand-in leads."""
        if self._beating is None:
            self._beating = asyncio.get_running_loop().create_task(self._beat_loop())
        return len(self.groups)

    async def _beat_loop(self) -> None:
        tick = 0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            now = loop.time()
            full = tick % FULL_BEAT_EVERY == 0
            for leader, g in list(self.groups.items()):
                infos: tuple[NodeInfo, ...] = ()
                due = tick - self.told_at.get(leader, -USAGE_BEAT_EVERY) >= USAGE_BEAT_EVERY
                if full or (leader in self.changed and due):
                    infos = tuple(info_of(n) for n in g.config.group)
                    self.told_at[leader] = tick
                    self.changed.discard(leader)
                elif now - self.reported.get(leader, float("-inf")) < self.interval:
                    continue  # a quiet report stood for this beat
                beat = GroupBeat(g.config.epoch, leader, infos, {})
                self._send("group_beat", beat, g.config.relay)
                self.beats += 1
            tick += 1

    async def step(self, step: int) -> None:
        """Every group this stand-in leads reports its ranks staged ``step``."""
        self.changed.update(self.groups)
        for leader, g in self.groups.items():
            ranks = sorted(g.template.ranks)
            report = GroupReport(
                JOB,
                step,
                -1,
                g.config.epoch,
                leader,
                g.config.group,
                self.world_size,
                sessions={r: f"session{r:06d}/{step}" for r in ranks},
                quiet=True,
            )
            self._send("report", report, g.config.relay)

    async def wait_step(self, step: int, timeout: float) -> bool:
        """Whether every group this stand-in leads heard ``step`` committed within ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self.decided.get(step, ())) < len(self.groups):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def counts(self) -> dict[str, int]:
        return {"beats": self.beats, "groups": len(self.groups), "configs": len(self.configs)}

    async def reset(self) -> None:
        """Forget groups and the coordinator's handle (a new one takes the name)."""
        self.configs.clear()
        self.groups.clear()
        self._coord = None


def _split(batch: LeaderBatch) -> dict[int, tuple[str, LeaderBatch]]:
    """A region's batch by the stand-in holding each leader: (a leader there, its part)."""
    orders: dict[int, list[tuple[str, PrepareOrder]]] = {}
    decisions: dict[int, list[tuple[Decision, tuple[str, ...]]]] = {}
    for leader, order in batch.orders:
        orders.setdefault(standin_of(leader), []).append((leader, order))
    for decision, leaders in zip(batch.decisions, batch.leaders, strict=True):
        by: dict[int, list[str]] = {}
        for leader in leaders:
            by.setdefault(standin_of(leader), []).append(leader)
        for standin, some in by.items():
            decisions.setdefault(standin, []).append((decision, tuple(some)))
    out: dict[int, tuple[str, LeaderBatch]] = {}
    for standin in sorted(orders.keys() | decisions.keys()):
        o, d = orders.get(standin, []), decisions.get(standin, [])
        first = o[0][0] if o else d[0][1][0]
        part = LeaderBatch(tuple(o), tuple(x for x, _ in d), tuple(ls for _, ls in d))
        out[standin] = (first, part)
    return out


class _Up:
    """What a stand-in's relays forward through: the coordinator actor's ``batch``."""

    def __init__(self, standin: StandIn) -> None:
        self._standin = standin

    def coordinator(self) -> _Up:
        return self

    async def batch(self, batch: ReportBatch) -> None:
        ref = self._standin._coordinator().batch.remote(encode(batch))
        await await_ref(ref, "coordinator.batch")


class Sink:
    """A bare asyncio Ray actor that takes the coordinator's calls and does nothing with
    them: what one call costs Ray itself, the floor under the coordinator's cost."""

    async def group_beat(self, data: bytes) -> None:
        return None

    async def report(self, data: bytes) -> None:
        return None

    async def batch(self, data: bytes) -> None:
        return None

    async def pid(self) -> int:
        return os.getpid()


@dataclass
class RayPoint:
    """One size measured over Ray."""

    nodes: int
    groups: int
    idle_cpu_per_s: float
    beats_per_s: float
    step_cpu: float
    step_seconds: float
    steps: int
    startup_seconds: float
    bare_call_cpu: float
    """CPU of one beat in a bare Ray actor (:class:`Sink`), same senders, same rate."""
    bare_quiet_per_s: float
    """CPU per second of that bare actor taking no calls (Ray's own background work)."""


def _cpu(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _one(
    n: int, shape: Any, standins: int, idle: float, steps: int, rundir: str, log: Any
) -> RayPoint:
    import ray

    from snapstore.node.store import COORDINATOR_NAME

    cfg = StoreConfig(
        k=shape.k, m=shape.m, nodes=n, persist_dir="", relay_groups=shape.relay_groups
    )
    count = max(1, min(standins, n // (shape.k + shape.m)))
    blocks: list[list[str]] = [[] for _ in range(count)]
    for i in range(n):
        s = i * count // n
        blocks[s].append(node_of(s, i))
    nodes = [x for b in blocks for x in b]
    actors = [
        ray.remote(StandIn)
        .options(max_concurrency=len(b) + 1000, num_cpus=0)
        .remote(
            b,
            shape.k,
            shape.m,
            shape.ranks,
            shape.rank_bytes,
            n * shape.ranks,
            cfg.heartbeat_interval,
        )
        for b in blocks
    ]
    quiet, bare = _bare_call(nodes, actors, cfg, idle)
    t0 = time.monotonic()
    coord = (
        ray.remote(BenchCoordinator)
        .options(name=COORDINATOR_NAME, namespace=NAMESPACE, max_concurrency=1000, num_cpus=0)
        .remote("scale", cfg.to_dict(), "", rundir, actors, nodes)
    )
    try:
        got = ray.get(coord.ready.remote(n, 300.0), timeout=360)
        if got.get("timeout"):
            raise TimeoutError(f"{n} nodes: the coordinator saw {got.get('nodes')} within 300 s")
        pid = int(ray.get(coord.pid.remote(), timeout=60))
        ray.get([a.start.remote() for a in actors], timeout=120)
        startup = time.monotonic() - t0
        time.sleep(3.0)  # configures landed, beats flowing
        counts = ray.get([a.counts.remote() for a in actors], timeout=60)
        groups = sum(c["groups"] for c in counts)
        beats0 = sum(c["beats"] for c in counts)
        c0, w0 = _cpu(pid), time.monotonic()
        time.sleep(idle)
        c1, w1 = _cpu(pid), time.monotonic()
        beats1 = sum(c["beats"] for c in ray.get([a.counts.remote() for a in actors], timeout=60))
        idle_rate = (c1 - c0) / (w1 - w0)
        c0, w0 = _cpu(pid), time.monotonic()
        for step in range(1, steps + 1):
            ray.get([a.step.remote(step) for a in actors], timeout=120)
            ok = ray.get([a.wait_step.remote(step, 120.0) for a in actors], timeout=180)
            if not all(ok):
                raise TimeoutError(f"{n} nodes: step {step} was not committed within 120 s")
        c1, w1 = _cpu(pid), time.monotonic()
        step_cpu = max(0.0, (c1 - c0) - idle_rate * (w1 - w0)) / steps
        point = RayPoint(
            n,
            groups,
            idle_rate,
            (beats1 - beats0) / idle,
            step_cpu,
            (w1 - w0) / steps,
            steps,
            startup,
            bare,
            quiet,
        )
        log(
            f"ray: {n} nodes ({groups} groups): idle {idle_rate * 1e3:.1f} ms/s, "
            f"{point.beats_per_s:.0f} beats/s; {step_cpu * 1e3:.1f} ms CPU per step, "
            f"{point.step_seconds:.2f} s per step; up in {startup:.1f} s; a bare Ray call "
            f"{bare * 1e6:.0f} us ({quiet * 1e3:.1f} ms/s without calls)"
        )
        return point
    finally:
        for a in [coord, *actors]:
            ray.kill(a)
        _name_released()


def _name_released() -> None:
    import ray

    from snapstore.node.store import COORDINATOR_NAME

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)


def _bare_call(
    nodes: list[str], actors: list[Any], cfg: StoreConfig, idle: float
) -> tuple[float, float]:
    """A :class:`Sink` under the coordinator's name: its CPU per second with no calls, and
    per group beat once the same stand-ins beat for the same groups at the same rate."""
    import ray

    from snapstore.control.placement import form_groups
    from snapstore.node.store import COORDINATOR_NAME

    sink = (
        ray.remote(Sink)
        .options(name=COORDINATOR_NAME, namespace=NAMESPACE, max_concurrency=1000, num_cpus=0)
        .remote()
    )
    try:
        pid = int(ray.get(sink.pid.remote(), timeout=120))
        time.sleep(1.0)
        c0, w0 = _cpu(pid), time.monotonic()
        time.sleep(idle)
        quiet = (_cpu(pid) - c0) / (time.monotonic() - w0)
        configs = []
        for g in form_groups(nodes, cfg.k, cfg.m):
            config = NodeConfig(1, g[0], g, g[0], True, cfg.k, cfg.m, cfg.backend)
            configs.append(actors[standin_of(g[0])].configure.remote(encode(config)))
        ray.get(configs, timeout=120)
        ray.get([a.start.remote() for a in actors], timeout=120)
        time.sleep(2.0)
        b0 = sum(c["beats"] for c in ray.get([a.counts.remote() for a in actors], timeout=60))
        c0, w0 = _cpu(pid), time.monotonic()
        time.sleep(idle)
        c1, w1 = _cpu(pid), time.monotonic()
        b1 = sum(c["beats"] for c in ray.get([a.counts.remote() for a in actors], timeout=60))
        ray.get([a.reset.remote() for a in actors], timeout=60)
        return quiet, max(0.0, (c1 - c0) - quiet * (w1 - w0)) / max(1, b1 - b0)
    finally:
        ray.kill(sink)
        _name_released()


def measure_ray(
    sizes: list[int], shape: Any, standins: int, idle: float, steps: int, log: Any
) -> list[RayPoint]:
    """Each size on one private Ray head (loopback), stopped whatever happens."""
    import shutil
    import tempfile

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from snapstore.ops.cluster import kill_tree, start_head
    from snapstore.private import create_private

    scratch = tempfile.mkdtemp(prefix="ssb-scale-", dir="/tmp")  # 0700
    # Ray's directory inside it (Ray makes its own 0777); the token beside it, as
    # every store's cluster has one.
    rundir = os.path.join(scratch, "ray")
    token_file = os.path.join(scratch, "ray.token")
    head = None
    t0 = time.monotonic()
    try:
        create_private(token_file, secrets.token_hex(32).encode())
        gcs, head = start_head(rundir, 100 << 20, cpus=2, control=True, ray_token_file=token_file)
        ray.init(address=gcs, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
        log(f"Ray cluster up in {time.monotonic() - t0:.1f} s")
        return [_one(n, shape, standins, idle, steps, rundir, log) for n in sizes]
    finally:
        ray.shutdown()
        if head is not None:
            kill_tree(head.procs)
        shutil.rmtree(scratch, ignore_errors=True)
