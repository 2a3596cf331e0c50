"""The real control plane on simulated nodes, measured: the engine of ``bench.scale``.

A :class:`ScaleWorld` runs the real :class:`snapstore.control.plane.ControlPlane`,
one real :class:`snapstore.control.member.Member` per node (hosting the real
:class:`snapstore.control.leader.Leader` where the membership says so) and
one trainer process per node with its ranks, on the virtual-time loop of
:mod:`snapstore.bench.vloop`. Nodes keep no bytes
(:class:`snapstore.bench.scale_store.MemNodeStore`): byte work takes
modelled time; messages take modelled network time
(:mod:`snapstore.bench.scale_net`).

The coordinator's process is *accounted*: the real CPU time of each of its
callbacks is counted, and *charged* on the virtual clock (while it computes,
messages to it wait), so its per-step work shows up in commit latency as it
would on one busy core. Only the coordinator is measured; members, leaders
and trainers cost nothing in virtual time beyond their modelled byte work.

:func:`measure` runs one size through the phases ``bench.scale`` reports:
idle, steps saved back to back, then one node lost and a group losing m
nodes at once, each until the job's committed step is protected again.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import hashlib
import logging
import random
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from snapstore.bench.scale_net import NetModel, ScaleFabric, call, report_kind
from snapstore.bench.scale_store import ByteModel, MemNodeStore, OpSpan
from snapstore.bench.vloop import CAUSE, Proc, SimLoop
from snapstore.config import StoreConfig
from snapstore.control.member import Member
from snapstore.control.messages import NodeInfo, OutcomeStatus
from snapstore.control.plane import ControlPlane
from snapstore.control.runtime import LoopClock
from snapstore.control.states import Redundancy
from snapstore.format.work import PeerInfo

__all__ = ["ScaleWorld", "Shape", "SizeResult", "measure"]

WALL_EPOCH = 1_800_000_000.0
JOB = "train"
WAIT = 30.0
FREE = 3
"""Steps saved after the measured ones with the coordinator's CPU not charged (the first
is not counted): commit latency in message delays alone."""


@dataclass(frozen=True)
class Shape:
    """What one size runs: ``nodes`` x ``ranks`` ranks of ``rank_bytes`` each, k + m."""

    nodes: int
    ranks: int = 8
    rank_bytes: int = 512 << 20
    k: int = 2
    m: int = 2
    jitter: float = 0.002
    """Ranks start each save up to this many seconds apart."""
    relay_groups: int = StoreConfig.relay_groups
    """Groups per relay region (StoreConfig.relay_groups; 0: leaders report straight)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks


@dataclass
class SimNode:
    """One store node: its SMP process (store and member) and its trainers' process."""

    node: str
    index: int
    proc: Proc | None = None
    store: MemNodeStore | None = None
    member: Member | None = None
    trainers: Proc | None = None
    lost: bool = False


@dataclass
class StepLog:
    """What one step took, seen from the trainers and the coordinator."""

    staged: int = 0
    last_staged: float = 0.0
    cpu_staged: float = 0.0
    outcomes: int = 0
    committed: int = 0
    last_outcome: float = 0.0
    cpu_done: float = 0.0
    cpu_by: dict[str, float] = field(default_factory=dict)
    received: collections.Counter[str] = field(default_factory=collections.Counter)
    sent: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class Reprotect:
    """One loss and the job's way back to protected."""

    what: str
    nodes_lost: int
    seconds: float = float("nan")
    after_lost: float = float("nan")
    rebuild_bytes_seconds: float = 0.0
    parity_bytes_seconds: float = 0.0
    cpu: float = 0.0
    ok: bool = False
    note: str = ""


@dataclass
class SizeResult:
    """Everything ``bench.scale`` reports for one size."""

    shape: Shape
    groups: int = 0
    idle_cpu_per_s: float = 0.0
    idle_received_per_s: float = 0.0
    step_cpu: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    beyond: list[float] = field(default_factory=list)
    """Commit latency (last rank staged -> last rank's outcome) less the byte work."""
    busy: list[float] = field(default_factory=list)
    """Coordinator CPU within that window (on one thread, on the critical path)."""
    beyond_free: list[float] = field(default_factory=list)
    """The same with the coordinator's CPU not charged: message delays alone."""
    parity_seconds: list[float] = field(default_factory=list)
    cpu_by_per_step: dict[str, float] = field(default_factory=dict)
    """Coordinator CPU per step by the message that caused it ("" : its timers)."""
    idle_cpu_by: dict[str, float] = field(default_factory=dict)
    received_per_step: dict[str, float] = field(default_factory=dict)
    sent_per_step: dict[str, float] = field(default_factory=dict)
    memory_start: int = 0
    memory_end: int = 0
    memory_per_step: float = 0.0
    steps_measured: int = 0
    failed_steps: int = 0
    losses: list[Reprotect] = field(default_factory=list)
    wall_seconds: float = 0.0

    def median(self, xs: list[float]) -> float:
        return float(statistics.median(xs)) if xs else float("nan")


_OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CoroutineType,
    types.FrameType,
    asyncio.AbstractEventLoop,
    asyncio.Future,
    ScaleFabric,
    Proc,
)


def deep_size(root: object) -> int:
    """Bytes of ``root`` and everything it references, each object once; the loop, tasks,
    code and the simulation's fabric (the way to every other process) not included."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            stack.extend(obj)
        else:
            d = getattr(obj, "__dict__", None)
            if d is not None:
                stack.append(d)
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
    return total


def calls_in(received: collections.Counter[str]) -> int:
    """Calls the coordinator took: a relay's batch is one (the messages in it are counted
    as "batched ...")."""
    return sum(v for k, v in received.items() if not k.startswith("batched "))


def node_id(i: int) -> str:
    """A Ray-like node id (56 hex digits)."""
    return hashlib.sha256(f"node-{i}".encode()).hexdigest()[:56]


class ScaleWorld:
    """A simulated store of ``shape.nodes`` nodes (see the module docstring)."""

    def __init__(
        self, shape: Shape, net: NetModel, model: ByteModel, charged: bool, seed: int = 0
    ) -> None:
        self.shape = shape
        self.rng = random.Random(seed)
        self.net = net
        self.model = model
        self.loop = SimLoop()
        self.loop.accounting = True
        self.cfg = StoreConfig(
            k=shape.k,
            m=shape.m,
            nodes=shape.nodes,
            memory_per_node=1 << 40,
            persist_dir="",
            relay_groups=shape.relay_groups,
        )
        self.nodes: dict[str, SimNode] = {}
        self.spans: list[OpSpan] = []
        self.received: collections.Counter[str] = collections.Counter()
        self.sent: collections.Counter[str] = collections.Counter()
        self.node_fabric = ScaleFabric(self, coordinator=False)
        self.coord_fabric = ScaleFabric(self, coordinator=True)
        self.coordinator_proc = Proc(self.loop, "coordinator")
        self.coordinator_proc.accounted = True
        self.coordinator_proc.charged = charged
        self.plane: ControlPlane | None = None
        self.steps: dict[int, StepLog] = collections.defaultdict(StepLog)
        self.free_after = -1
        """After this step the coordinator's CPU is no longer charged (see ``measure``)."""

    # -- processes ------------------------------------------------------------------------

    def now(self) -> float:
        return self.loop.time()

    def start_node(self, i: int) -> None:
        node = node_id(i)
        sn = self.nodes.setdefault(node, SimNode(node, i))
        proc = Proc(self.loop, f"smp-{i}")
        sn.proc = proc
        incarnation = f"i{i}"
        peer = PeerInfo(node, f"host-{i}", f"/dev/shm/snapstore-scale/{node[:16]}", "10.0.0.1", 0)
        store = MemNodeStore(node, peer, self.shape.k, 1 << 40, self.model, self.now, self.spans)
        sn.store = store

        def describe() -> NodeInfo:
            sizes = store.sizes()
            return NodeInfo(
                node=node,
                incarnation=incarnation,
                peer=peer,
                pid=10_000 + i,
                started_at=WALL_EPOCH,
                budget=sizes["budget"],
                used=sizes["used"],
                data_bytes=sizes["data"],
                parity_bytes=sizes["parity"],
                spare_bytes=0,
                held=0,
                counters=store.counters(),
            )

        def make() -> None:
            sn.member = Member(
                store,
                self.node_fabric,
                LoopClock(WALL_EPOCH),
                self.cfg,
                incarnation,
                store.offload,
                describe,
            )
            sn.member.start()

        proc.ctx.run(make)

    def lose(self, node: str) -> None:
        """The node is gone, with its memory (a lost host)."""
        sn = self.nodes[node]
        if sn.proc is not None:
            sn.proc.crash()
        if sn.member is not None:
            sn.member.stop()
        if sn.trainers is not None:
            sn.trainers.crash()
        sn.proc, sn.member, sn.store, sn.lost = None, None, None, True

    def start_coordinator(self) -> None:
        async def offload(fn: Callable[..., Any], *args: Any) -> Any:
            return fn(*args)

        def make() -> ControlPlane:
            return ControlPlane(
                "scale",
                self.cfg,
                self.coord_fabric,
                LoopClock(WALL_EPOCH),
                offload,
                None,
                identity="scale",
            )

        self.plane = self.coordinator_proc.ctx.run(make)
        self._split_batches(self.plane)
        self.coordinator_proc.spawn(self.plane.start(self.coord_fabric.discover))

    def _split_batches(self, plane: ControlPlane) -> None:
        """A relay's batch is one call ("batch"): the CPU of each report and beat in it
        moves to that message's own cause, "batch" keeping the decode and the rest. The
        split reads the wall clock (``perf_counter``, a read of memory) around each
        message: its handlers compute without waiting, so wall time is their CPU time,
        and the CPU clock (a system call each, about a microsecond) would add about 5 ms per
        step at 4,096 nodes to the coordinator's CPU that is the benchmark's own."""
        proc = self.coordinator_proc
        by = proc.cpu_by

        def timed(fn: Callable[[Any], None], kind: Callable[[Any], str]) -> Callable[[Any], None]:
            def run(msg: Any) -> None:
                if CAUSE.get() != "batch":
                    fn(msg)
                    return
                t0 = time.perf_counter()
                try:
                    fn(msg)
                finally:
                    dt = time.perf_counter() - t0
                    cause = kind(msg)
                    by["batch"] = by.get("batch", 0.0) - dt
                    by[cause] = by.get(cause, 0.0) + dt

            return run

        commits, membership = plane.commits, plane.membership
        commits.on_report = timed(  # type: ignore[method-assign,assignment]
            commits.on_report, lambda r: f"report ({report_kind(r)})"
        )
        membership.group_beat = timed(  # type: ignore[method-assign,assignment]
            membership.group_beat, lambda b: "group_beat"
        )

    # -- trainers -------------------------------------------------------------------------

    def start_trainers(self, first: int, last: int) -> None:
        for sn in self.nodes.values():
            if sn.lost:
                continue
            sn.trainers = Proc(self.loop, f"trainers-{sn.index}")
            for j in range(self.shape.ranks):
                rank = sn.index * self.shape.ranks + j
                sn.trainers.spawn(self._rank(sn, rank, first, last))

    async def _local(self, sn: SimNode, method: str, *args: Any) -> Any:
        """A trainer's call to its own node's SMP (the member's ``method``)."""

        async def run() -> Any:
            if sn.member is None:
                raise RuntimeError("no SMP")
            return await getattr(sn.member, method)(*args)

        return await call(self, sn.proc, run, method, self.net.local)

    async def _rank(self, sn: SimNode, rank: int, first: int, last: int) -> None:
        """One rank saving steps ``first..last`` back to back, as a client does."""
        size = self.shape.rank_bytes
        world = self.shape.world_size
        session = f"r{rank}-{hashlib.sha256(str(rank).encode()).hexdigest()[:12]}"
        await self._local(sn, "lease", JOB, rank, size)
        for step in range(first, last + 1):
            staging = f"{session}/{step}"
            # Ranks reach their save within a few milliseconds of each other (the step's
            # all-reduce lines them up).
            await asyncio.sleep(self.rng.uniform(0.0, self.shape.jitter))
            await self._local(sn, "staged", JOB, rank, step, size, world, staging)
            log = self.steps[step]
            log.staged += 1
            log.last_staged = max(log.last_staged, self.now())
            if log.staged == world:
                log.cpu_staged = self.coordinator_proc.cpu
            while True:
                outcome = await self._local(
                    sn, "wait_outcome", JOB, rank, step, staging, WAIT, size
                )
                if outcome.status is not OutcomeStatus.PENDING:
                    break
            log.outcomes += 1
            log.committed += outcome.status is OutcomeStatus.COMMITTED
            log.last_outcome = max(log.last_outcome, self.now())
            if log.outcomes == world:
                if step == self.free_after:
                    self.coordinator_proc.charged = False
                log.cpu_done = self.coordinator_proc.cpu
                log.cpu_by = dict(self.coordinator_proc.cpu_by)
                log.received = collections.Counter(self.received)
                log.sent = collections.Counter(self.sent)

    # -- waiting ------------------------------------------------------------------------------

    async def until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = self.now() + timeout
        while not cond():
            if self.now() > deadline:
                raise TimeoutError(f"{what}: not within {timeout} virtual seconds")
            await asyncio.sleep(0.05)

    def configured(self) -> bool:
        plane = self.plane
        if plane is None or not plane.membership.groups:
            return False
        epoch = plane.membership.epoch
        return all(
            sn.member is not None
            and sn.member.config is not None
            and sn.member.config.epoch == epoch
            for sn in self.nodes.values()
            if not sn.lost
        )

    def protected_again(self, version: int) -> bool:
        plane = self.plane
        assert plane is not None
        job = plane.jobs.get(JOB)
        if job is None or job.record is None:
            return False
        alive = {n for n, sn in self.nodes.items() if not sn.lost}
        return (
            job.record.version > version
            and job.redundancy is Redundancy.PROTECTED
            and not job.relocated
            and job.record.nodes() <= alive
        )

    def plane_size(self) -> int:
        assert self.plane is not None
        return deep_size(self.plane)


async def _phases(
    w: ScaleWorld, res: SizeResult, warmup: int, steps: int, idle: float, losses: bool
) -> None:
    shape = w.shape
    w.start_coordinator()
    for i in range(shape.nodes):
        w.start_node(i)
    await w.until(w.configured, 120.0, "groups formed and every node configured")
    assert w.plane is not None
    res.groups = len(w.plane.membership.groups)
    await asyncio.sleep(3.0)  # first beats, leaders settled

    # Idle: no job, only liveness.
    gc.collect()
    cpu0, got0 = w.coordinator_proc.cpu, calls_in(w.received)
    by0 = dict(w.coordinator_proc.cpu_by)
    await asyncio.sleep(idle)
    res.idle_cpu_per_s = (w.coordinator_proc.cpu - cpu0) / idle
    by1 = dict(w.coordinator_proc.cpu_by)
    res.idle_cpu_by = {k: (v - by0.get(k, 0.0)) / idle for k, v in sorted(by1.items())}
    res.idle_received_per_s = (calls_in(w.received) - got0) / idle

    # Steps saved back to back; then FREE more with the coordinator's CPU not charged.
    last = warmup + steps
    charged = w.coordinator_proc.charged
    w.free_after = last if charged else -1
    w.start_trainers(1, last + (FREE if charged else 0))
    await w.until(lambda: w.steps[warmup].outcomes == shape.world_size, 600.0, "warm-up steps")
    res.memory_start = w.plane_size()
    await w.until(lambda: w.steps[last].outcomes == shape.world_size, 600.0, "measured steps")
    res.memory_end = w.plane_size()
    res.memory_per_step = (res.memory_end - res.memory_start) / steps
    res.steps_measured = steps
    by_step = parity_by_step(w)
    received: collections.Counter[str] = collections.Counter()
    sent: collections.Counter[str] = collections.Counter()
    for s in range(warmup + 1, last + 1):
        log, prev = w.steps[s], w.steps[s - 1]
        res.failed_steps += log.committed < shape.world_size
        res.step_cpu.append(log.cpu_done - prev.cpu_done)
        res.step_seconds.append(log.last_outcome - prev.last_outcome)
        latency = log.last_outcome - log.last_staged
        res.parity_seconds.append(by_step.get(s, 0.0))
        res.beyond.append(latency - by_step.get(s, 0.0))
        res.busy.append(log.cpu_done - log.cpu_staged)
        received.update(log.received - prev.received)
        sent.update(log.sent - prev.sent)
    res.received_per_step = {k: v / steps for k, v in sorted(received.items())}
    first, end = w.steps[warmup].cpu_by, w.steps[last].cpu_by
    res.cpu_by_per_step = {k: (v - first.get(k, 0.0)) / steps for k, v in sorted(end.items())}
    if charged:
        done = last + FREE
        await w.until(lambda: w.steps[done].outcomes == shape.world_size, 600.0, "free steps")
        w.coordinator_proc.charged = True
        by_step = parity_by_step(w)
        for s in range(last + 2, done + 1):  # the first one straddles the switch
            log = w.steps[s]
            res.beyond_free.append(log.last_outcome - log.last_staged - by_step.get(s, 0.0))
    res.sent_per_step = {k: v / steps for k, v in sorted(sent.items())}
    await asyncio.sleep(3.0)  # acks and the last decisions settle

    if not losses:
        return
    res.losses.append(await _lose(w, "one node", 1))
    res.losses.append(await _lose(w, f"a group loses m = {shape.m} nodes at once", shape.m))


def parity_by_step(w: ScaleWorld) -> dict[int, float]:
    """Each step's slowest parity build: the byte work on its commit's critical path."""
    out: dict[int, float] = {}
    for sp in w.spans:
        if sp.kind == "parity" and sp.job == JOB:
            out[sp.step] = max(out.get(sp.step, 0.0), sp.seconds)
    return out


def _victims(w: ScaleWorld, count: int) -> list[str]:
    """``count`` members of one group of the current membership, not its leader."""
    assert w.plane is not None
    ms = w.plane.membership
    for g in sorted(ms.groups, key=len):
        leader = ms.leader_of(g)
        others = [n for n in g if n != leader and not w.nodes[n].lost]
        if len(others) >= count:
            return others[:count]
    return []


async def _lose(w: ScaleWorld, what: str, count: int) -> Reprotect:
    assert w.plane is not None
    out = Reprotect(what, count)
    alive = sum(not sn.lost for sn in w.nodes.values())
    width = w.shape.k + w.shape.m
    victims = _victims(w, count)
    if alive - count < width or not victims:
        out.note = f"{alive - count} nodes would be left, fewer than k + m = {width}"
        return out
    job = w.plane.jobs[JOB]
    assert job.record is not None
    version = job.record.version
    t0, cpu0, spans0 = w.now(), w.coordinator_proc.cpu, len(w.spans)
    events0 = w.plane.events.recent(1)[-1]["seq"] if w.plane.events.recent(1) else 0
    for n in victims:
        w.lose(n)
    try:
        await w.until(lambda: w.protected_again(version), 300.0, f"re-protection after {what}")
    except TimeoutError as e:
        out.note = str(e)
        return out
    out.ok = True
    out.seconds = w.now() - t0
    out.cpu = w.coordinator_proc.cpu - cpu0
    lost_at = [
        e["time"] - WALL_EPOCH
        for e in w.plane.events.recent(500)
        if e["seq"] > events0 and e["kind"] == "node_lost"
    ]
    if lost_at:
        out.after_lost = w.now() - max(lost_at)
    for sp in w.spans[spans0:]:
        if sp.kind == "rebuild":
            out.rebuild_bytes_seconds = max(out.rebuild_bytes_seconds, sp.seconds)
        elif sp.kind == "parity":
            out.parity_bytes_seconds = max(out.parity_bytes_seconds, sp.seconds)
    await asyncio.sleep(3.0)
    return out


def measure(
    shape: Shape,
    net: NetModel,
    model: ByteModel,
    warmup: int = 2,
    steps: int = 5,
    idle: float = 10.0,
    losses: bool = True,
    charged: bool = True,
) -> SizeResult:
    """Run one size through every phase (see the module docstring); virtual seconds."""
    import time

    res = SizeResult(shape)
    w = ScaleWorld(shape, net, model, charged)
    asyncio.set_event_loop(w.loop)
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    gc.collect()
    gc.disable()
    try:
        w.loop.run_until_complete(_phases(w, res, warmup, steps, idle, losses))
    finally:
        pending = [t for t in asyncio.all_tasks(w.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            w.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        w.loop.close()
        asyncio.set_event_loop(None)
        logging.disable(logging.NOTSET)
        gc.enable()
        gc.collect()
    res.wall_seconds = time.perf_counter() - t0
    return res
