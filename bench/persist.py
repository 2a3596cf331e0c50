"""The persisted tier: how long a flush takes to a directory and to an fsspec URL.

Run: ``python -m bench.persist``; ``--quick`` for a smoke run on small
states; ``--json FILE`` writes every sample. Prints markdown tables
(docs/persistence.md quotes them).

Four ranks, one client each in this process pinned to its own node of an
embedded 4-node store (k = 3, m = 1), each saving a transformer-shaped
training state of ``--size`` bytes. Per target, a store of its own flushes
with ``persist_bandwidth`` unlimited and no periodic flushes; each rep saves
a step and times ``client.persist()`` (hold, every node writing its ranks in
parallel, checksums, manifest, publication: until the step is complete on
disk). Then the newest step is read back as a restore from disk does
(:func:`snapstore.persist.read_rank`: every piece checked), all four ranks
one after the other in this process.

Targets: a directory (fsync, ``.partial`` renamed at publication) and the
same disk as a ``file://`` URL (the object-store protocol of
:mod:`snapstore.persist.objstore`, through fsspec: what ``s3://`` runs, without a
network). Baselines, measured in the same run on the same disk: one
``write`` + ``fsync`` of all four ranks' bytes (the disk's speed), and
``torch.save`` of the four states with fsync, then ``torch.load``, one
after the other (what a synchronous checkpoint to disk costs).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from snapstore.bench._common import (
    Table,
    bench_header,
    bench_parser,
    disk_dir,
    human,
    mark_step,
    median,
    parse_size,
    private_store,
    ratio,
    report,
    state_nbytes,
    tensors_of,
    training_state,
)

WORLD = 4
JOB = "flush"


def _fsync_write(path: str, parts: Sequence[Any]) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for p in parts:
            view = memoryview(p).cast("B")
            while view.nbytes:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def baselines(states: list[dict[str, Any]], where: str, reps: int) -> dict[str, list[float]]:
    """write+fsync of the same bytes, and torch.save (fsynced) / torch.load of the states."""
    import torch

    raw = [t.contiguous().view(-1).view(torch.uint8).numpy() for s in states for t in tensors_of(s)]
    out: dict[str, list[float]] = {"write_fsync": [], "torch_save": [], "torch_load": []}
    d = tempfile.mkdtemp(prefix="bench-persist-base-", dir=where)
    try:
        for _ in range(reps):
            out["write_fsync"].append(_fsync_write(os.path.join(d, "raw.bin"), raw))
            os.unlink(os.path.join(d, "raw.bin"))
            t0 = time.perf_counter()
            for r, st in enumerate(states):
                path = os.path.join(d, f"rank{r}.pt")
                with open(path, "wb") as f:
                    torch.save(st, f)
                    f.flush()
                    os.fsync(f.fileno())
            out["torch_save"].append(time.perf_counter() - t0)
            _drop_cache(d)
            t0 = time.perf_counter()
            for r in range(len(states)):
                torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False)
            out["torch_load"].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out


def _drop_cache(d: str) -> None:
    """Ask the kernel to drop cached pages of the files in ``d`` (reads then hit the disk)."""
    for name in os.listdir(d):
        fd = os.open(os.path.join(d, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def flush_target(
    kind: str, root: str, states: list[dict[str, Any]], reps: int, budget: int
) -> dict[str, Any]:
    """Save and persist ``reps`` steps into ``root``; read the newest back, verified."""
    from snapstore import persist
    from snapstore.clients import Client
    from snapstore.ops import faults

    settings: dict[str, Any] = {
        "persist_dir": root,
        "persist_every": 0,
        "persist_bandwidth": 0,
        "persist_keep": 2,
        "failure_timeout": 5.0,
    }
    out: dict[str, Any] = {"kind": kind, "root": root, "flush": [], "read": []}
    with private_store(nodes=WORLD, k=3, m=1, memory_per_node=budget, **settings) as store:
        nodes = faults.store_nodes(store)[:WORLD]
        clients = [
            Client(JOB, r, WORLD, store=store, node_id=nodes[r], timeout=300) for r in range(WORLD)
        ]
        try:
            for step in range(reps + 1):  # the first flush creates the directories: warm-up
                for st in states:
                    mark_step(tensors_of(st), step)
                futs = [c.save(step, st) for c, st in zip(clients, states, strict=True)]
                for f in futs:
                    f.result()
                t0 = time.perf_counter()
                got = clients[0].persist(timeout=300)
                seconds = time.perf_counter() - t0
                if got != step:
                    raise RuntimeError(f"persist returned step {got}, expected {step}")
                if step:
                    out["flush"].append(seconds)
            path = persist.step_dir(root, JOB, reps)
            out["bytes"] = persist.read_manifest(path).data_bytes()
            for _ in range(reps):
                _drop_cache(path.removeprefix("file://"))  # both targets are this disk
                t0 = time.perf_counter()
                for r in range(WORLD):
                    persist.read_rank(path, r)
                out["read"].append(time.perf_counter() - t0)
            out["steps_on_disk"] = [s.step for s in persist.list_steps(root, JOB)]
        finally:
            for c in clients:
                c.close()
    return out


def tables(size: int, base: dict[str, list[float]], runs: list[dict[str, Any]]) -> list[Table]:
    total = WORLD * size
    w = median(base["write_fsync"])
    flush = Table(
        f"Flush of one step, 4 ranks x {human(size)} ({human(total)}), medians; "
        "ratios against one write + fsync of the same bytes on the same disk:",
        ["", "seconds", "rate", "x write+fsync"],
    )
    flush.add("write + fsync, one file (baseline)", f"{w:.3f}", f"{human(total / w)}/s", "1.00x")
    ts = median(base["torch_save"])
    flush.add("torch.save + fsync, 4 files, one after another", f"{ts:.3f}", "", ratio(ts, w))
    for run in runs:
        s = median(run["flush"])
        flush.add(
            f"snapstore flush to a {run['kind']}", f"{s:.3f}", f"{human(total / s)}/s", ratio(s, w)
        )
    read = Table(
        "Reading a persisted step back (all 4 ranks, in one process, page cache dropped "
        "first), medians:",
        ["", "seconds", "x torch.load"],
    )
    tl = median(base["torch_load"])
    read.add("torch.load of the 4 files (baseline)", f"{tl:.3f}", "1.00x")
    for run in runs:
        s = median(run["read"])
        read.add(f"read_rank, every piece checked, {run['kind']}", f"{s:.3f}", ratio(s, tl))
    return [flush, read]


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("persist", __doc__, "small states, few flushes, the URL target only")
    parser.add_argument("--size", default="32M", help="state bytes per rank (32M)")
    parser.add_argument("--reps", type=int, default=5, help="flushes per target (5)")
    args = parser.parse_args(argv)
    size = (4 << 20) if args.quick else parse_size(args.size)
    reps = 2 if args.quick else max(1, args.reps)
    where = disk_dir()
    info = bench_header(
        "snapstore.bench.persist",
        f"{WORLD} ranks x {human(size)}, {reps} flushes per target, disk at {where}; "
        "store: 4 nodes, k=3, m=1",
    )
    states = [training_state(size, seed=r) for r in range(WORLD)]
    per_rank = max(state_nbytes(s) for s in states)
    budget = 6 * per_rank + (64 << 20)
    base = baselines(states, where, reps)
    runs = []
    scratch = tempfile.mkdtemp(prefix="bench-persist-", dir=where)
    targets = [
        ("directory", os.path.join(scratch, "dir")),
        ("file:// URL", "file://" + os.path.join(scratch, "url")),
    ]
    if args.quick:
        # Each target takes a store of its own; a smoke run flushes to the URL
        # only (the same code: flush_target), and test_persist_cluster flushes
        # to and restores from a directory.
        targets = targets[1:]
    try:
        for kind, root in targets:
            runs.append(flush_target(kind, root, states, reps, budget))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ok = all(r["steps_on_disk"] == [reps - 1, reps] for r in runs)
    report(tables(size, base, runs), args.json, info=info, baselines=base, runs=runs)
    if not ok:
        print(f"steps on disk: {[r['steps_on_disk'] for r in runs]}, expected the last 2")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
