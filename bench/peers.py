"""snapstore against an in-memory peer that installs here: lm-resiliency's GEMINI.

Run: ``python -m bench.peers`` (default ``--size 256M`` per rank); ``--quick``
for a smoke run on 16 MiB; ``--json FILE`` writes every sample. Needs the
optional ``lm-resiliency`` package (``pip install -e '.[peers]'``; the test
extra includes it); without it only snapstore is measured, and it says so.

Two ranks, two processes, each with the same transformer-shaped state as
``snapstore.bench.save`` (every tensor changed before every save), measured in one
run, one system after the other:

- **GEMINI** (lm-resiliency 0.2, ``InMemoryCheckpointManager``): the two
  ranks form a gloo group on 127.0.0.1 and replicate to each other
  (``replication_jump=1``), the protection GEMINI gives against losing a
  node. ``save_tensors`` (its lowest-overhead path: tensor references, no
  state_dict walk) is timed until it returns, ``maybe_wait`` until the host
  copy is done, and ``finalize_replication`` until the peer holds the
  replica. Four buffer slots per rank are written in full before timing.
- **snapstore**: an embedded store of 4 nodes (k = 3, m = 1); each rank's
  process holds a ``Client`` pinned to its own store node. ``client.save``
  is timed until it returns (the staging copy) and until ``result()``
  (data and parity stored on other nodes: protected against a node loss).

Each rank also times one memcpy (``np.copyto``) of its state's bytes, right
after its saves, and every figure is a ratio to that, median over ranks and
repetitions. Both systems run two ranks on the same two cores.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from snapstore.bench._common import (
    Table,
    bench_header,
    bench_parser,
    human,
    median,
    memcpy_seconds,
    parse_size,
    private_store,
    tensors_of,
    touch,
    training_state,
    write_json,
)

WORLD = 2
WARMUP = 6
"""Saves before timing: GEMINI cycles through 4 buffer slots, each written in full once."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gemini_available() -> str | None:
    """None when lm-resiliency imports, else why not."""
    try:
        import lm_resiliency.checkpointing  # noqa: F401
    except ImportError as e:
        return f"lm-resiliency is not installed ({e}); pip install -e '.[peers]'"
    return None


def _gemini_rank(rank: int, port: int, nbytes: int, reps: int, scratch: str, queue: Any) -> None:
    import torch.distributed as dist
    from lm_resiliency import InMemoryCkptConfig
    from lm_resiliency.checkpointing import InMemoryCheckpointManager

    out: dict[str, Any] = {"rank": rank, "returns": [], "copied": [], "protected": []}
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
        )
        state = training_state(nbytes, seed=rank)
        tensors = tensors_of(state)
        manager = InMemoryCheckpointManager(
            InMemoryCkptConfig(
                interval=1,
                replication_jump=1,
                disk_flush_interval=0,
                disk_folder=scratch,  # its node-local tier (written only on exit without close)
                pin_memory=False,
                run_id="snapstore-bench-peers",
            )
        )
        for step in range(WARMUP + reps):
            touch(tensors)
            dist.barrier()
            t0 = time.perf_counter()
            manager.save_tensors(tensors, step)
            t1 = time.perf_counter()
            manager.maybe_wait()
            t2 = time.perf_counter()
            replicated = manager.finalize_replication()
            t3 = time.perf_counter()
            if step >= WARMUP:
                # (The first steps may report no aligned local/peer generation yet.)
                if not replicated:
                    raise RuntimeError(f"step {step}: GEMINI reports no complete replica")
                out["returns"].append(t1 - t0)
                out["copied"].append(t2 - t0)
                out["protected"].append(t3 - t0)
        dist.barrier()
        out["memcpy"] = memcpy_seconds(sum(t.numel() * t.element_size() for t in tensors), 5)["np"]
        with contextlib.suppress(Exception):
            manager.close()
        dist.destroy_process_group()
    except BaseException as e:
        out["error"] = repr(e)
    queue.put(out)


def _snapstore_rank(
    rank: int, rundir: str, node: str, nbytes: int, reps: int, start: Any, queue: Any
) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    out: dict[str, Any] = {"rank": rank, "returns": [], "protected": []}
    try:
        from snapstore.clients import Client

        client = Client("peers", rank, WORLD, rundir=rundir, node_id=node, timeout=300)
        state = training_state(nbytes, seed=rank)
        tensors = tensors_of(state)
        for step in range(WARMUP + reps):
            touch(tensors)
            start.wait(timeout=300)  # both ranks save together, as GEMINI's barrier
            t0 = time.perf_counter()
            fut = client.save(step, state)
            t1 = time.perf_counter()
            fut.result(timeout=300)
            t2 = time.perf_counter()
            if step >= WARMUP:
                out["returns"].append(t1 - t0)
                out["protected"].append(t2 - t0)
            time.sleep(0.1)  # the step's compute: the next lease is taken meanwhile
        start.wait(timeout=300)
        out["memcpy"] = memcpy_seconds(sum(t.numel() * t.element_size() for t in tensors), 5)["np"]
        client.close()
    except BaseException as e:
        out["error"] = repr(e)
    queue.put(out)


def _collect(procs: list[Any], queue: Any, what: str, timeout: float = 900) -> list[dict[str, Any]]:
    results = []
    deadline = time.monotonic() + timeout
    try:
        for _ in procs:
            results.append(queue.get(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{what}: a rank failed: {errors[0]}")
    return sorted(results, key=lambda r: r["rank"])


def run_gemini(nbytes: int, reps: int) -> list[dict[str, Any]]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    scratch = tempfile.mkdtemp(prefix="ssb-gemini-")
    try:
        procs = [
            ctx.Process(target=_gemini_rank, args=(r, port, nbytes, reps, scratch, queue))
            for r in range(WORLD)
        ]
        for p in procs:
            p.start()
        return _collect(procs, queue, "GEMINI")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_snapstore(nbytes: int, reps: int) -> list[dict[str, Any]]:
    import multiprocessing as mp

    from snapstore.ops import faults

    budget = max(256 << 20, 4 * nbytes + (64 << 20))
    with private_store(nodes=4, k=3, m=1, memory_per_node=budget) as store:
        nodes = faults.store_nodes(store)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        start = ctx.Barrier(WORLD)
        procs = [
            ctx.Process(
                target=_snapstore_rank,
                args=(r, store.rundir, nodes[r], nbytes, reps, start, queue),
            )
            for r in range(WORLD)
        ]
        for p in procs:
            p.start()
        return _collect(procs, queue, "snapstore")


def _ratios(ranks: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """Median seconds over ranks and reps, and the median of each sample over its rank's memcpy."""
    secs = [x for r in ranks for x in r[key]]
    ratios = [x / median(r["memcpy"]) for r in ranks for x in r[key]]
    return median(secs), median(ratios)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("peers", __doc__, "16 MiB per rank, 3 saves")
    parser.add_argument("--size", default="256M", help="state per rank (256M)")
    parser.add_argument("--reps", type=int, default=5, help="timed saves per rank (median)")
    args = parser.parse_args(argv)
    nbytes = parse_size("16M" if args.quick else args.size)
    reps = 3 if args.quick else args.reps
    info = bench_header(
        "snapstore.bench.peers",
        f"{WORLD} ranks of {human(nbytes)}; GEMINI replicating to its peer over gloo; "
        "snapstore on 4 nodes, k=3, m=1",
    )
    results: dict[str, Any] = {"info": info}
    why_not = gemini_available()
    if why_not is None:
        results["gemini"] = run_gemini(nbytes, reps)
        print("GEMINI done", flush=True)
    else:
        print(f"GEMINI skipped: {why_not}", flush=True)
    results["snapstore"] = run_snapstore(nbytes, reps)

    t = Table(
        f"{WORLD} ranks, {human(nbytes)} each; medians over ranks and {reps} saves; "
        "x memcpy = over one np.copyto of the rank's state in the same process",
        [
            "system",
            "save returns",
            "x memcpy",
            "protected against a node loss",
            "x memcpy",
            "extra memory for that protection",
        ],
        align="lrrrrl",
    )
    snap = results["snapstore"]
    systems = [
        (
            "gemini",
            "lm-resiliency GEMINI, save_tensors + replication to a peer",
            "a full replica of the peer's state (1x), 4 slots",
        ),
        (
            "snapstore",
            "snapstore client.save, parity on other nodes",
            "m/k of the state as parity (1/3), 2 slots",
        ),
    ]
    for key, name, memory in systems:
        if key not in results:
            continue
        ret, ret_x = _ratios(results[key], "returns")
        prot, prot_x = _ratios(results[key], "protected")
        t.add(
            name,
            f"{ret * 1e3:.1f} ms",
            f"{ret_x:.2f}x",
            f"{prot * 1e3:.1f} ms",
            f"{prot_x:.2f}x",
            memory,
        )
    mc = median([x for r in snap for x in r["memcpy"]])
    t.add("memcpy, np.copyto (snapstore run)", f"{mc * 1e3:.1f} ms", "1.00x", "-", "-", "-")
    t.print()
    results["tables"] = [t.as_dict()]
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
