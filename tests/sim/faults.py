"""The faults a simulated schedule injects: every one the store claims to survive, and more.

``inject(world, kind)``:

- ``trainer``: one rank's process dies; the launcher restarts every rank.
- ``trainer_in_prepare``: the same, timed into a commit: once some job has a
  step whose groups are preparing (as the coordinator sees it), a rank of that
  job dies, so its restart's restore lands while the prepared reports are on
  their way.
- ``abort_in_prepare``: a controller ends a job's steps in flight (what
  ``JobControl.abort_pending`` does) the moment one of its steps is
  preparing: the commit/abort race of issue 11, aimed at its window.
- ``smp``: a node's SMP process dies with its memory kept; Ray restarts it.
- ``smp_wipe``: the same, and its memory is gone.
- ``node``: a node is lost for good (raylet, processes, memory); its ranks'
  processes die and the job restarts on the other nodes.
- ``node_replace``: as ``node``, and a replacement node joins a moment later.
- ``nodes2``: two nodes lost at once (more than m of a group when m = 1).
- ``stall``: a node's SMP stops for 1-4 s (SIGSTOP, a CPU hog), then goes on.
- ``coordinator``: the coordinator dies; a new one recovers from the nodes.
- ``corrupt``: one byte of a chunk in some node's memory flips.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.sim.world import World

__all__ = ["inject"]


def inject(world: World, kind: str) -> None:
    rng = world.rng
    up = sorted(n for n, s in world.nodes.items() if not s.lost)
    with_smp = [n for n in up if world.nodes[n].proc is not None]
    world.log(f"FAULT {kind}")
    world.checker.dirty = True
    if kind == "trainer":
        running = [t for j in world.jobs.values() for t in j.trainers if not t.done]
        if running:
            t = rng.choice(running)
            t.kill()
            t.job.died(t)
    elif kind in ("trainer_in_prepare", "abort_in_prepare"):
        kill = kind == "trainer_in_prepare"
        _later(world, 0.0, lambda: _in_prepare(world, kill, world.loop.time() + 3.0))
    elif kind in ("smp", "smp_wipe") and with_smp:
        node = rng.choice(with_smp)
        world.crash_smp(node, wipe=kind == "smp_wipe")
        _later(world, rng.uniform(0.5, 1.5), lambda: _restart(world, node))
    elif kind in ("node", "node_replace", "nodes2") and len(up) > 1:
        victims = rng.sample(up, 2 if kind == "nodes2" and len(up) > 2 else 1)
        for node in victims:
            world.lose_node(node)
            _kill_trainers_on(world, node)
        if kind == "node_replace":
            _later(world, rng.uniform(0.5, 3.0), lambda: world.start_smp(world.new_node()))
    elif kind == "stall" and with_smp:
        node = rng.choice(with_smp)
        smp = world.nodes[node]
        until = world.loop.time() + rng.uniform(1.0, 4.0)
        assert smp.proc is not None
        smp.proc.stall(until)
        world.checker.stalled(node, until)
        world.log(f"SMP {node[:3]} stalled until {until:.3f}")
    elif kind == "coordinator":
        world.crash_coordinator()
        _later(world, rng.uniform(0.5, 2.0), world.start_coordinator)
    elif kind == "corrupt" and with_smp:
        node = rng.choice(with_smp)
        smp = world.nodes[node]
        files = sorted(
            f for f in _listdir(smp.directory) if f.startswith(("d.", "p.")) and f.endswith(".seg")
        )
        if files:
            path = os.path.join(smp.directory, rng.choice(files))
            size = os.path.getsize(path)
            if size:
                at = rng.randrange(size)
                with open(path, "r+b") as f:
                    f.seek(at)
                    b = f.read(1)
                    f.seek(at)
                    f.write(bytes([b[0] ^ 0x40]))
                smp.memory_lost_at.append(world.loop.time())
                world.log(f"corrupted {os.path.basename(path)} on {node[:3]} at {at}")


def _in_prepare(world: World, kill: bool, give_up: float) -> None:
    """Once a job has a step in PREPARING: kill one of its ranks (``kill``), or have a
    controller abort its steps in flight. Look again shortly until ``give_up``."""
    from snapstore.control.states import StepPhase

    plane, proc = world.plane, world.coordinator_proc
    preparing = []
    if plane is not None:
        preparing = sorted(
            name
            for name, job in plane.jobs.items()
            if any(a.life.phase is StepPhase.PREPARING for a in job.attempts.values())
        )
    for name in preparing:
        job = world.jobs.get(name)
        running = [t for t in job.trainers if not t.done] if job is not None else []
        if kill and job is not None and running:
            t = world.rng.choice(running)
            world.log(f"rank {t.rank} of {name} dies while a step prepares")
            world.checker.dirty = True
            t.kill()
            job.died(t)
            return
        if not kill and plane is not None and proc is not None and proc.alive:
            world.log(f"a controller aborts the steps of {name} in flight")
            proc.spawn(plane.abort_pending(name, "preempted by a controller (simulated)"))
            return
    if world.loop.time() < give_up and not world.done:
        _later(world, 0.005, lambda: _in_prepare(world, kill, give_up))


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _restart(world: World, node: str) -> None:
    smp = world.nodes[node]
    if not smp.lost and smp.proc is None and not world.done:
        world.start_smp(node)


def _kill_trainers_on(world: World, node: str) -> None:
    for job in world.jobs.values():
        hit = [t for t in job.trainers if t.node == node and not t.done]
        for t in hit:
            t.kill()
        if hit:
            job.died(hit[0])


def _later(world: World, delay: float, fn: object) -> None:
    async def run() -> None:
        await asyncio.sleep(delay)
        fn()  # type: ignore[operator]

    world.loop.create_task(run(), context=contextvars.Context())
