"""Restore after a node loss: every rank's state back, against torch.load from local disk.

Run: ``python -m bench.restore`` (default ``--sizes 64M,1G``, the state of
all 4 ranks together); ``--quick`` for a smoke run on 4 MiB; ``--json
FILE`` writes every sample. Prints markdown tables
(docs/performance-store.md quotes them).

Layout: an embedded store of 4 nodes, k = 3, m = 1; 4 ranks, one Ray actor
per rank pinned to its own node, each with a transformer-shaped state of a
quarter of the size (640 tensors). Per size, in one run:

- torch.load: each rank loads its own ``torch.save`` file of the same state
  from local disk, all 4 in parallel, with a warm page cache: in processes
  that loaded it before (their allocator reuses memory it already faulted
  in), and in new processes, as a restarted trainer would (a tiny load
  first, so imports are not counted; restored ranks after a node loss are
  new processes too, with the client's imports done); and cold (the
  file's pages dropped with ``posix_fadvise(DONTNEED)`` after an fsync,
  which needs no privileges) where writing the files through to disk takes
  under ``--disk-budget`` seconds at the rate the disk wrote the previous
  size (a shared disk may write a few MB/s, or a GB/s).
- local restore (no failure): every rank restores from its own node's slot,
  into new tensors (``client.restore()``) and in place into a live state
  (``client.restore(into=...)``).
- node loss, ``--cycles`` times: a standby process for one rank waits on a
  surviving node; that rank's node is killed (``faults.kill_node``: its
  raylet, its processes and its shared memory); the coordinator's
  ``node_dead`` event (Ray reported its SMP dead) gives the detection time;
  then all 4 ranks restore
  in parallel (the standby's pieces are decoded from the surviving chunks of
  each stripe onto its node). Before the next cycle a replacement node is
  added (``faults.add_node``) and the lost rank's process moves onto it;
  every rank restores again there, as after a launcher's restart.

Restore time is from the restore call to the state in hand, measured in
each rank's process; the job's restore time is its slowest rank. Every
restored state is checked bitwise (a 128-bit hash of every tensor's bytes
and every plain value) against what was saved.

Detection is Ray's: the coordinator keeps a call pending on every SMP,
which fails when the SMP's process dies; heartbeats play no part (a node
silent past the failure timeout is only suspected, and nothing is aborted).
The "false deaths (suspicions)" column counts ``node_dead``/``node_lost``
events for nodes nobody killed (Ray stops a raylet whose health checks it
misses, as on an overloaded machine) and, in brackets, ``node_silent``
events for them; a restore that fails is the benchmark's failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from snapstore.bench._common import (
    Table,
    add_disk_budget,
    bench_header,
    bench_parser,
    deaths_of_others,
    disk_dir,
    human,
    job_status,
    mark_step,
    median,
    parse_sizes,
    private_store,
    report,
    state_digest,
    store_events,
    tensors_of,
    training_state,
    wait_node_dead,
    wait_until,
)

WORLD = 4
LOSS_MODES = ("on_demand", "after_rebuild")
DEFAULT_SIZES = "64M,1G"
QUICK_SIZES = "4M"


class RestoreRank:
    """One rank's process: holds a state, saves it, restores it, loads it with torch.load."""

    def __init__(
        self, job: str, rank: int, world: int, rundir: str, nbytes: int, scratch: str
    ) -> None:
        from snapstore.clients import Client

        self.rank = rank
        self.nbytes = nbytes
        self.client = Client(job, rank, world, rundir=rundir, timeout=300)
        self.path = os.path.join(scratch, f"rank{rank}.pt")
        self.state: Any = None
        self.live: Any = None
        # What a restarted trainer does before it restores: ask the store for
        # the latest step (this also looks up the coordinator once).
        self.client.latest_step()
        import snapstore.format.pack  # noqa: F401  (the restore's unpacker)

    def node(self) -> str:
        return str(self.client.node_id)

    def save(self, step: int) -> dict[str, Any]:
        """Save ``step`` of this rank's state (every tensor changed) and wait for its commit."""
        if self.state is None:
            self.state = training_state(self.nbytes, seed=self.rank)
        mark_step(tensors_of(self.state), step)
        self.state["step"] = step
        t0 = time.perf_counter()
        self.client.save(step, self.state).result(timeout=300)
        return {"seconds": time.perf_counter() - t0, "digest": state_digest(self.state)}

    def write_file(self, fsync: bool) -> float:
        """torch.save the state to local disk; with ``fsync``, through to the disk."""
        import torch

        t0 = time.perf_counter()
        with open(self.path, "wb") as f:
            torch.save(self.state, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        return time.perf_counter() - t0

    def drop_cache(self) -> None:
        """Evict the file's (clean) pages from the page cache: the next read is cold."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def torch_load(self, expect: str) -> dict[str, Any]:
        import torch

        t0 = time.perf_counter()
        state = torch.load(self.path, weights_only=True)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "ok": state_digest(state) == expect}

    def first_load(self, expect: str) -> dict[str, Any]:
        """torch.load in this new process: its allocator has not faulted in any memory yet,
        as in a restarted trainer. A tiny load first imports what torch.load needs."""
        import io

        import torch

        buf = io.BytesIO()
        torch.save({"x": torch.zeros(4)}, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
        return self.torch_load(expect)

    def restore(self, expect: str, into: bool = False) -> dict[str, Any]:
        """Restore the last committed step: seconds to state in hand, and whether bitwise right."""
        live = None
        if into:
            if self.live is None:
                # A live state of the same structure, pages written: what a
                # trainer that built its model before restoring holds.
                self.live = training_state(self.nbytes, seed=self.rank + 1000)
            live = self.live
        t0 = time.perf_counter()
        step, state = self.client.restore(into=live)
        seconds = time.perf_counter() - t0
        return {
            "seconds": seconds,
            "step": step,
            "ok": state_digest(state) == expect,
            "node": self.node(),
        }

    def remove_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _actor(node: str) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(RestoreRank).options(
        num_cpus=0,
        max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    )


def _get(refs: Any, timeout: float = 600) -> Any:
    import ray

    return ray.get(refs, timeout=timeout)


def _parallel(calls: list[Any]) -> tuple[float, list[Any]]:
    """Driver wall time of a set of remote calls issued together, and their results."""
    t0 = time.perf_counter()
    out = _get(calls)
    return time.perf_counter() - t0, out


def _local_round(ranks: list[Any], digests: list[str], into: bool) -> tuple[float, list[Any]]:
    """Every rank restores from its own node, all at once.

    No node is lost here. A node that is merely slow under load (silent past
    the failure timeout) is only suspected and fails nothing, so a failed
    round is the benchmark's failure, not retried.
    """
    return _parallel([r.restore.remote(d, into) for r, d in zip(ranks, digests, strict=True)])


def _save_all(ranks: list[Any], step: int, store: Any, job: str) -> tuple[int, list[str]]:
    """Save ``step`` on every rank; returns the step committed and each rank's digest.

    A save refused while the store re-protects after a loss is retried with
    the next step once the job is protected again.
    """
    for attempt in (1, 2, 3):
        try:
            res = _get([r.save.remote(step) for r in ranks])
            return step, [x["digest"] for x in res]
        except Exception as e:
            if attempt == 3:
                raise
            print(f"  save of step {step} failed ({type(e).__name__}); retrying", flush=True)
            wait_until(
                lambda: job_status(store, job).get("status") == "protected", 120, "protection"
            )
            step += 1
    raise AssertionError("unreachable")


def _node_loss(
    store: Any,
    job: str,
    ranks: list[Any],
    nodes: list[str],
    victim: int,
    mode: str,
    digests: list[str],
    per_rank: int,
    scratch: str,
) -> tuple[dict[str, Any], Any]:
    """Kill rank ``victim``'s node; restore every rank; return the timings and the
    process now holding the lost rank.

    ``on_demand``: a standby process for the lost rank already runs on a
    survivor and restores as soon as the loss is detected, so the decode is
    on its restore path. ``after_rebuild``: the lost rank's process starts
    only after the store has rebuilt the rank's data on its own (it does once
    the node is declared lost, ``reprotect_delay`` after Ray reported it
    dead), on the node it was rebuilt onto -- as a trainer that takes a few
    seconds to restart would find it.
    """
    from snapstore.ops import faults

    standby = None
    if mode == "on_demand":
        survivor = nodes[(victim + 1) % WORLD]
        standby = _actor(survivor).remote(job, victim, WORLD, store.rundir, per_rank, scratch)
        _get(standby.node.remote())  # its process is up, torch imported, client connected
    t_kill = faults.kill_node(nodes[victim], store)["killed_at"]
    ev = wait_node_dead(store, nodes[victim], t_kill, 30, "the coordinator to see the node dead")

    def rebuilt() -> list[dict[str, Any]]:
        return [
            e for e in store_events(store, "rebuild") if e.get("job") == job and e["time"] >= t_kill
        ]

    if mode == "after_rebuild":
        target = wait_until(rebuilt, 120, "the store to rebuild the lost rank", poll=0.05)[0]
        node = target["targets"][str(victim)]
        standby = _actor(node).remote(job, victim, WORLD, store.rundir, per_rank, scratch)
        _get(standby.node.remote())
    assert standby is not None
    wall, out = _parallel(
        [(standby if r == victim else ranks[r]).restore.remote(digests[r]) for r in range(WORLD)]
    )
    rebuild = rebuilt()
    return {
        "mode": mode,
        "victim_rank": victim,
        "detection": ev["time"] - t_kill,
        "detection_latency": ev.get("detection_latency"),
        "wall": wall,
        "ranks": [o["seconds"] for o in out],
        "lost_rank_seconds": out[victim]["seconds"],
        "ok": all(o["ok"] for o in out),
        "steps": [o["step"] for o in out],
        "rebuild_seconds": rebuild[0].get("duration") if rebuild else None,
        "rebuild_after_kill": rebuild[0]["time"] - t_kill if rebuild else None,
        "rebuilt_bytes": rebuild[0].get("bytes") if rebuild else None,
    }, standby


def run_size(
    store: Any,
    total: int,
    index: int,
    reps: int,
    cycles: int,
    disk: dict[str, float],
    scratch: str,
) -> dict[str, Any]:
    """One state size; ``disk`` carries the measured fsync write rate between sizes."""
    from snapstore.ops import faults

    job = f"restore-{index}"
    per_rank = total // WORLD
    nodes = faults.store_nodes(store)[:WORLD]
    ranks = [
        _actor(nodes[r]).remote(job, r, WORLD, store.rundir, per_rank, scratch)
        for r in range(WORLD)
    ]
    res: dict[str, Any] = {
        "size": total,
        "per_rank": per_rank,
        "started": time.time(),
        "killed": [],
    }
    spare: list[Any] = []
    try:
        step, digests = _save_all(ranks, 1, store, job)

        # torch.load baselines: the same states, from local disk, all ranks at once.
        _get([r.write_file.remote(False) for r in ranks])
        warm, cold_t = [], []
        # One untimed load first: the first in a process sets up torch's
        # unpickler, and the file is read into the page cache.
        _get([r.torch_load.remote(d) for r, d in zip(ranks, digests, strict=True)])
        for _ in range(reps):
            wall, out = _parallel(
                [r.torch_load.remote(d) for r, d in zip(ranks, digests, strict=True)]
            )
            assert all(o["ok"] for o in out), "torch.load returned other bytes than saved"
            warm.append({"wall": wall, "ranks": [o["seconds"] for o in out]})
        # The same, each rank in a new process (a restarted trainer): its
        # allocator has no memory faulted in yet.
        fresh_t = []
        for _ in range(reps):
            fresh = [
                _actor(nodes[r]).remote(job, r, WORLD, store.rundir, per_rank, scratch)
                for r in range(WORLD)
            ]
            try:
                _get([f.node.remote() for f in fresh])
                wall, out = _parallel(
                    [f.first_load.remote(d) for f, d in zip(fresh, digests, strict=True)]
                )
                assert all(o["ok"] for o in out), "torch.load returned other bytes than saved"
                fresh_t.append({"wall": wall, "ranks": [o["seconds"] for o in out]})
            finally:
                for f in fresh:
                    _kill_actor(f)
        res["torch_load_new_process"] = fresh_t
        rate = disk.get("rate")
        if rate is None or total / rate <= disk["budget"]:
            t0 = time.perf_counter()
            write = _get([r.write_file.remote(True) for r in ranks])
            res["fsync_write_seconds"] = time.perf_counter() - t0
            res["fsync_rank_seconds"] = write
            disk["rate"] = total / res["fsync_write_seconds"]
            for _ in range(reps):
                _get([r.drop_cache.remote() for r in ranks])
                wall, out = _parallel(
                    [r.torch_load.remote(d) for r, d in zip(ranks, digests, strict=True)]
                )
                assert all(o["ok"] for o in out), "torch.load returned other bytes than saved"
                cold_t.append({"wall": wall, "ranks": [o["seconds"] for o in out]})
        res["torch_load_warm"], res["torch_load_cold"] = warm, cold_t

        # Local restores: no failure, every rank from its own node.
        for mode, into in (("local_fresh", False), ("local_into", True)):
            samples = []
            _local_round(ranks, digests, into)
            for _ in range(reps):
                wall, out = _local_round(ranks, digests, into)
                assert all(o["ok"] and o["step"] == step for o in out), out
                samples.append({"wall": wall, "ranks": [o["seconds"] for o in out]})
            res[mode] = samples

        losses: dict[str, list[dict[str, Any]]] = {m: [] for m in LOSS_MODES}
        n = 0
        for mode in LOSS_MODES:
            for c in range(cycles):
                step, digests = _save_all(ranks, step + 1, store, job)
                victim = n % WORLD
                n += 1
                res["killed"].append(nodes[victim])
                loss, standby = _node_loss(
                    store, job, ranks, nodes, victim, mode, digests, per_rank, scratch
                )
                losses[mode].append(loss)
                print(
                    f"  node loss ({mode}) {c + 1}/{cycles}: detected in "
                    f"{loss['detection']:.2f} s, all ranks restored in "
                    f"{max(loss['ranks']):.3f} s, bitwise {'OK' if loss['ok'] else 'MISMATCH'}",
                    flush=True,
                )
                _kill_actor(standby)
                if n == len(LOSS_MODES) * cycles:
                    continue  # the last loss: no cycle after it needs four nodes
                # The next cycle again has 4 nodes: a replacement joins and the lost
                # rank moves onto it, in a new process. As after a launcher's restart,
                # that process restores before it saves, and every rank with it.
                replacement = faults.add_node(store)
                spare.append(ranks[victim])
                ranks[victim] = _actor(replacement).remote(
                    job, victim, WORLD, store.rundir, per_rank, scratch
                )
                _get(ranks[victim].node.remote())
                nodes[victim] = replacement
                wait_until(
                    lambda: job_status(store, job).get("status") == "protected",
                    120,
                    "the job to be protected again",
                    poll=0.2,
                )
                _, out = _local_round(ranks, digests, False)
                assert all(o["ok"] and o["step"] == step for o in out), out
        res["node_loss"] = losses
        killed = set(res.get("killed", []))
        res["false_deaths"] = deaths_of_others(store, res["started"], killed)
        res["suspicions"] = [
            e["node"]
            for e in store_events(store, "node_silent")
            if e["time"] >= res["started"] and e.get("node") not in killed
        ]
    finally:
        with contextlib.suppress(Exception):
            _get([r.remove_file.remote() for r in ranks], timeout=60)
        for r in ranks + spare:
            _kill_actor(r)
        with contextlib.suppress(Exception):
            store.call("drop_job", job, timeout=60)
    return res


def _kill_actor(actor: Any) -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)


def _budget(sizes: Sequence[int]) -> int:
    """Per node: two slots, two XOR-delta buffers, parity and one relocated rank."""
    per_rank = max(sizes) // WORLD
    return 6 * per_rank + (128 << 20)


def tables(results: list[dict[str, Any]]) -> list[Table]:
    summary = Table(
        "Summary (medians; a job's restore time is its slowest rank's, measured in each "
        "rank's process):",
        [
            "state (4 ranks)",
            "torch.load warm",
            "torch.load warm, new process",
            "torch.load cold",
            "local restore",
            "local restore, in place",
            "node loss: detection",
            "node loss: restore on demand",
            "/ torch.load warm (new process)",
            "node loss: restore after the store's rebuild",
            "/ torch.load warm (new process)",
            "bitwise",
            "false deaths (suspicions)",
        ],
    )
    detail = Table(
        "Per node loss (on demand: the lost rank's standby restores at once and the decode is "
        "on its path; after rebuild: it starts once the store rebuilt the rank on its own):",
        [
            "state",
            "mode",
            "lost rank",
            "detected (kill -> node_dead)",
            "heartbeat age at detection",
            "store's rebuild (starts after kill)",
            "lost rank restored",
            "slowest rank",
            "driver wall",
            "bitwise",
        ],
    )
    for r in results:
        warm = _job(r["torch_load_warm"])
        fresh = _job(r["torch_load_new_process"])
        cold = _job(r["torch_load_cold"]) if r["torch_load_cold"] else None
        losses = r.get("node_loss", {})
        every = [x for m in LOSS_MODES for x in losses.get(m, [])]
        restore = {m: median([max(x["ranks"]) for x in losses.get(m, [])]) for m in LOSS_MODES}
        summary.add(
            human(r["size"]),
            _ms(warm),
            _ms(_job(r["torch_load_new_process"])),
            _ms(cold) if cold is not None else "not run (disk too slow)",
            _ms(_job(r["local_fresh"])),
            _ms(_job(r["local_into"])),
            _ms(median([x["detection"] for x in every])) if every else "-",
            _ms(restore["on_demand"]),
            f"{restore['on_demand'] / warm:.2f}x ({restore['on_demand'] / fresh:.2f}x)",
            _ms(restore["after_rebuild"]),
            f"{restore['after_rebuild'] / warm:.2f}x ({restore['after_rebuild'] / fresh:.2f}x)",
            "OK" if every and all(x["ok"] for x in every) else "MISMATCH",
            f"{len(r['false_deaths'])} ({len(r['suspicions'])})",
        )
        for x in every:
            rebuild = "-"
            if x["rebuild_seconds"] is not None:
                started = x["rebuild_after_kill"] - x["rebuild_seconds"]
                rebuild = f"{_ms(x['rebuild_seconds'])} (+{_ms(started)})"
            detail.add(
                human(r["size"]),
                x["mode"].replace("_", " "),
                x["victim_rank"],
                _ms(x["detection"]),
                _ms(x["detection_latency"] or 0),
                rebuild,
                _ms(x["lost_rank_seconds"]),
                _ms(max(x["ranks"])),
                _ms(x["wall"]),
                "OK" if x["ok"] else "MISMATCH",
            )
    return [summary, detail]


def _job(samples: list[dict[str, Any]]) -> float:
    """Median over runs of the slowest rank's time."""
    return median([max(s["ranks"]) for s in samples])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("restore", __doc__, f"{QUICK_SIZES} only, one loss")
    parser.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"total state of the 4 ranks ({DEFAULT_SIZES})"
    )
    parser.add_argument("--reps", type=int, default=5, help="runs of each baseline (median)")
    parser.add_argument(
        "--cycles", type=int, default=3, help="node losses per size and mode (median)"
    )
    add_disk_budget(
        parser,
        "time torch.load cold only where writing the files through to disk should take "
        "under this many seconds",
    )
    args = parser.parse_args(argv)
    sizes = parse_sizes(QUICK_SIZES if args.quick else args.sizes)
    reps = 1 if args.quick else max(3, args.reps)
    cycles = 1 if args.quick else max(1, args.cycles)
    disk = {"budget": args.disk_budget}
    info = bench_header(
        "snapstore.bench.restore",
        f"sizes {', '.join(human(s) for s in sizes)} over {WORLD} ranks; store: 4 nodes, k=3, "
        "m=1, one rank per node",
    )
    # The classes the rank actors run must be importable by name in their
    # processes, not pickled from __main__.
    from snapstore.bench import restore as this

    results = []
    scratch = tempfile.mkdtemp(prefix="bench-restore-", dir=disk_dir())
    try:
        with private_store(nodes=WORLD, k=3, m=1, memory_per_node=_budget(sizes)) as store:
            info["failure_timeout"] = store.config.failure_timeout
            info["heartbeat_interval"] = store.config.heartbeat_interval
            info["reprotect_delay"] = store.config.reprotect_delay
            for i, size in enumerate(sizes):
                print(f"... {human(size)} ({human(size // WORLD)} per rank)", flush=True)
                results.append(this.run_size(store, size, i, reps, cycles, disk, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(tables(results), args.json, info=info, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
