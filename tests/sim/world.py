"""One simulated store: real control plane and node stores, fake network, trainers and faults.

A :class:`World` is built from a seed. It runs the real
:class:`snapstore.control.plane.ControlPlane`, the real
:class:`snapstore.control.member.Member` and leaders, and the real
:class:`snapstore.node.store.ShmNodeStore` (small buffers in a private
shared-memory directory, peers read through shared memory), connected by
:mod:`tests.sim.net` on the virtual-time loop of :mod:`snapstore.bench.vloop`.
Trainers (:mod:`tests.sim.trainer`) save and restore through the same
calls a client makes; a launcher restarts every rank of a job when one
dies, as torchrun and Ray Train do.

Faults land at random times: trainer crashes, SMP crashes (memory kept, or
wiped), node losses (with or without a replacement), nodes stalled for a
few seconds, a coordinator restart, a corrupted chunk, and, always,
delayed and reordered messages. After every delivered message, fault and
trainer action the invariants of :mod:`tests.sim.checks` are checked; the
first violation ends the schedule with its trace.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from snapstore.bench.vloop import Proc, SimLoop, Stalled
from snapstore.config import StoreConfig
from snapstore.control.member import Member
from snapstore.control.messages import NodeInfo
from snapstore.control.plane import ControlPlane
from snapstore.control.runtime import LoopClock
from snapstore.node.store import ShmNodeStore
from snapstore.persist.backend import FilesTier
from tests.sim.checks import Checker, Violation
from tests.sim.net import SimFabric, roundtrip

__all__ = ["Spec", "World", "run_schedule"]

T = TypeVar("T")

WALL_EPOCH = 1_800_000_000.0
HORIZON = 240.0
"""Virtual seconds a schedule may run before it counts as hung."""


@dataclass
class Spec:
    """The random shape of one schedule."""

    seed: int
    k: int
    m: int
    nodes: int
    jobs: list[tuple[str, int, int]]  # (name, world size, steps)
    nbytes: int
    persist_every: int
    faults: list[tuple[float, str]]
    deltas: bool
    encode_share: float
    relay_groups: int = 0
    """StoreConfig.relay_groups: 0 (leaders report straight) or 1 (every group through a
    relay: a simulated store has one group or two, too few for larger regions)."""
    full_trace: bool = False

    @classmethod
    def random(cls, seed: int, relays: str = "random") -> Spec:
        """``relays``: "random" (half the schedules), "on" or "off". Drawn from a generator
        of its own: with relays off, a seed runs the schedule it ran before relays existed."""
        if relays == "random":
            relays = "on" if random.Random(seed * 104729 + 3).random() < 0.5 else "off"
        relay_groups = 1 if relays == "on" else 0
        rng = random.Random(seed * 7919 + 17)
        k, m = rng.choice([(2, 1), (3, 1), (2, 2)])
        nodes = rng.randint(k + m, k + m + 2)
        njobs = 1 if rng.random() < 0.75 else 2
        jobs = [
            (f"job{i}", rng.randint(1, min(2 * nodes, 5)), rng.randint(3, 7)) for i in range(njobs)
        ]
        kinds = [
            "trainer",
            "trainer_in_prepare",
            "abort_in_prepare",
            "smp",
            "smp_wipe",
            "node",
            "node_replace",
            "stall",
            "stall",
            "coordinator",
            "corrupt",
            "nodes2",
        ]
        nfaults = rng.randint(0, 4)
        faults = sorted(
            (round(rng.uniform(0.2, 4.0), 3), rng.choice(kinds)) for _ in range(nfaults)
        )
        return cls(
            seed=seed,
            k=k,
            m=m,
            nodes=nodes,
            jobs=jobs,
            nbytes=rng.choice([48, 64, 200, 1000]),
            persist_every=rng.choice([0, 0, 3, 5]),
            faults=faults,
            deltas=rng.random() < 0.5,
            encode_share=0.05,
            relay_groups=relay_groups,
        )


@dataclass
class SimSMP:
    """One store node: its directory, and its SMP process (store + member) when up."""

    node: str
    directory: str
    proc: Proc | None = None
    store: ShmNodeStore | None = None
    member: Member | None = None
    incarnation: int = 0
    lost: bool = False
    memory_lost_at: list[float] = field(default_factory=list)


class World:
    """A simulated store driven by a seed. See the module docstring."""

    def __init__(self, spec: Spec, plant: str | None = None, root: str | None = None) -> None:
        self.spec = spec
        self.plant = plant
        self.rng = random.Random(spec.seed)
        self.loop = SimLoop()
        self.root = tempfile.mkdtemp(prefix=f"sim{spec.seed}-", dir=root)
        self.persist_root = os.path.join(self.root, "persist")
        os.makedirs(self.persist_root)
        self.cfg = StoreConfig(
            k=spec.k,
            m=spec.m,
            nodes=spec.nodes,
            memory_per_node=1 << 30,
            heartbeat_interval=1.0,
            failure_timeout=2.0,
            reprotect_delay=2.0,
            save_timeout=60.0,
            persist_dir=self.persist_root if spec.persist_every else "",
            persist_every=spec.persist_every,
            persist_keep=2,
            persist_bandwidth=0,
            persist_timeout=60.0,
            relay_groups=spec.relay_groups,
        )
        self.fabric = SimFabric(self)
        self.nodes: dict[str, SimSMP] = {}
        self.coordinator_proc: Proc | None = None
        self.plane: ControlPlane | None = None
        self.planes: int = 0
        self._trace: collections.deque[tuple[float, str]] = collections.deque(
            maxlen=None if spec.full_trace else 400
        )
        self.checker = Checker(self)
        self.trainers: list[Any] = []
        self.jobs: dict[str, Any] = {}
        self._node_seq = 0
        self.done = False

    # -- randomness the parts ask for ---------------------------------------------------

    def latency(self) -> float:
        """One message's delay: usually a millisecond or two, sometimes much more."""
        r = self.rng.random()
        if r < 0.9:
            return self.rng.uniform(0.0002, 0.003)
        if r < 0.99:
            return self.rng.uniform(0.003, 0.05)
        return self.rng.uniform(0.05, 0.5)

    def death_report_delay(self) -> float:
        return self.rng.uniform(0.02, 1.0)

    def work_time(self) -> float:
        return self.rng.uniform(0.0001, 0.004)

    def wire(self, msg: T, cls: type[T]) -> T:
        """Some messages take the trip through their encoding, as over Ray."""
        if self.rng.random() < self.spec.encode_share:
            return roundtrip(msg, cls)
        return msg

    # -- tracing and checking --------------------------------------------------------------

    def log(self, what: str) -> None:
        self._trace.append((self.loop.time(), what))

    @property
    def trace(self) -> list[str]:
        return [f"{t:9.4f} {what}" for t, what in self._trace]

    def event(self, what: str) -> None:
        if not what.endswith(("leader_beat", "group_beat")):
            self._trace.append((self.loop.time(), what))
        self.checker.after_event()

    # -- processes -------------------------------------------------------------------------

    def _offload_for(self) -> Callable[..., Awaitable[Any]]:
        async def offload(fn: Callable[..., Any], *args: Any) -> Any:
            await asyncio.sleep(self.work_time())
            return fn(*args)

        return offload

    def new_node(self) -> str:
        self._node_seq += 1
        node = f"n{self._node_seq:02d}" + "0" * 30
        d = os.path.join(self.root, "shm", node[:16])
        self.nodes[node] = SimSMP(node, d)
        return node

    def start_smp(self, node: str) -> None:
        smp = self.nodes[node]
        smp.incarnation += 1
        proc = Proc(self.loop, f"smp-{node[:3]}.{smp.incarnation}")
        smp.proc = proc
        incarnation = f"{node[:3]}i{smp.incarnation}"

        def make() -> None:
            store = ShmNodeStore(node, smp.directory, self.cfg, "t", "127.0.0.1", 1 << 30, False)
            smp.store = store

            def describe() -> NodeInfo:
                sizes = store.sizes()
                return NodeInfo(
                    node, incarnation, store.peer, used=sizes["used"], budget=sizes["budget"]
                )

            smp.member = Member(
                store,
                self.fabric,
                LoopClock(WALL_EPOCH),
                self.cfg,
                incarnation,
                self._offload_for(),
                describe,
            )
            smp.member.start()

        proc.ctx.run(make)
        self.log(
            f"SMP {node[:3]} up ({incarnation}, {smp.store.adopted if smp.store else 0} adopted)"
        )

    def crash_smp(self, node: str, wipe: bool = False) -> None:
        smp = self.nodes[node]
        if smp.proc is None:
            return
        self.checker.crashed(node)
        smp.proc.crash()
        if smp.member is not None:
            smp.member.stop()
        if smp.store is not None:
            smp.store.close()
        smp.proc, smp.member, smp.store = None, None, None
        if wipe:
            shutil.rmtree(smp.directory, ignore_errors=True)
            smp.memory_lost_at.append(self.loop.time())
        self.log(f"SMP {node[:3]} crashed" + (" with its memory" if wipe else ""))

    def lose_node(self, node: str) -> None:
        self.crash_smp(node, wipe=True)
        self.nodes[node].lost = True
        self.log(f"node {node[:3]} lost")

    def start_coordinator(self) -> None:
        self.planes += 1
        proc = Proc(self.loop, f"coordinator.{self.planes}")
        self.coordinator_proc = proc
        tier = FilesTier(self.persist_root) if self.spec.persist_every else None

        def make() -> ControlPlane:
            return ControlPlane(
                "simstore",
                self.cfg,
                self.fabric,
                LoopClock(WALL_EPOCH),
                self._offload_for(),
                tier,
                identity=f"coordinator.{self.planes}",
            )

        self.plane = proc.ctx.run(make)
        self.checker.new_plane(self.plane)
        plane = self.plane
        proc.spawn(plane.start(self.fabric.discover))
        self.log(f"coordinator {self.planes} up")

    def crash_coordinator(self) -> None:
        if self.coordinator_proc is not None:
            self.coordinator_proc.crash()
        if self.plane is not None:
            self.plane.stop()
        self.coordinator_proc, self.plane = None, None
        self.log("coordinator crashed")

    # -- running a schedule -------------------------------------------------------------------

    def run(self) -> Violation | None:
        asyncio.set_event_loop(self.loop)
        logging.disable(logging.CRITICAL)
        try:
            self.loop.run_until_complete(asyncio.wait_for(self.main(), HORIZON + 200))
        except Violation as v:
            return v
        except Stalled as e:
            return Violation("liveness", f"the simulation stalled: {e}")
        except asyncio.TimeoutError:
            return Violation("liveness", f"the schedule did not finish in {HORIZON + 200} s")
        finally:
            self.teardown()
            logging.disable(logging.NOTSET)
        return self.checker.violation

    async def main(self) -> None:
        from tests.sim.trainer import SimJob

        self.start_coordinator()
        for _ in range(self.spec.nodes):
            self.start_smp(self.new_node())
        plane = self.plane
        assert plane is not None
        await self._until(lambda: bool(self.plane and self.plane.membership.groups), 30)
        for name, world, steps in self.spec.jobs:
            job = SimJob(self, name, world, steps)
            self.jobs[name] = job
            job.start()
        faults = asyncio.get_running_loop().create_task(self._faults())
        await self._until(lambda: all(j.finished() for j in self.jobs.values()), HORIZON)
        faults.cancel()
        self.checker.check()
        await self._heal()
        self.checker.final()
        self.done = True

    async def _until(self, cond: Callable[[], bool], timeout: float) -> None:
        deadline = self.loop.time() + timeout
        while not cond():
            if self.checker.violation is not None:
                raise self.checker.violation
            if self.loop.time() > deadline:
                raise Violation("liveness", f"not done after {timeout} s: {self.pending()}")
            await asyncio.sleep(0.25)

    def pending(self) -> str:
        return "; ".join(j.describe() for j in self.jobs.values() if not j.finished())

    async def _heal(self) -> None:
        """Bring crashed SMPs back, then let every job restore once more and compare."""
        for node, smp in self.nodes.items():
            if not smp.lost and smp.proc is None:
                self.start_smp(node)
        if self.plane is None:
            self.start_coordinator()
        await asyncio.sleep(3.0)
        for job in self.jobs.values():
            job.final_restore()
        await self._until(lambda: all(j.finished() for j in self.jobs.values()), 120)

    async def _faults(self) -> None:
        from tests.sim.faults import inject

        t0 = self.loop.time()
        for at, kind in self.spec.faults:
            await asyncio.sleep(max(0.0, t0 + at - self.loop.time()))
            inject(self, kind)
            self.checker.after_event()

    def teardown(self) -> None:
        """Cancel everything still running, close the stores, remove the files."""
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        for smp in self.nodes.values():
            if smp.store is not None:
                smp.store.close()
        shutil.rmtree(self.root, ignore_errors=True)
        self.loop.close()


def run_schedule(
    seed: int,
    plant: str | None = None,
    root: str | None = None,
    trace: bool = False,
    relays: str = "random",
) -> World:
    spec = Spec.random(seed, relays)
    spec.full_trace = trace
    world = World(spec, plant, root)
    world.violation = world.run()  # type: ignore[attr-defined]
    return world
