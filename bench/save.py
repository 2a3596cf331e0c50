"""What a save costs the training loop: client.save against memcpy, torch.save and DCP.

Run: ``python -m bench.save`` (default ``--sizes 64M,256M,512M,2G``);
``--quick`` for a smoke run on a 16 MiB state; ``--json FILE`` writes every
sample. Prints markdown tables (docs/performance-store.md quotes them).

Layout: an embedded store of 4 nodes, k = 3, m = 1, on this machine. One
rank -- this process -- saves through a Client pinned to the first store
node (its slots are shared-memory files on this host); its buffer is cut
into 3 pieces whose parity is computed by the SMPs of the other 3 nodes.
Every SMP, the coordinator and this process share the machine's cores, so
"committed" includes parity computed by other processes on the same CPUs.

Per state size, in one process and one run:

- memcpy: one contiguous copy of the state's bytes between two warm
  (pre-faulted) buffers, ``np.copyto`` (one thread: the baseline the targets
  are stated against) and torch ``copy_`` (torch's intra-op threads); timed
  before and after the store runs, pooled.
- client.save: blocking time per step in steady state (slots leased and
  mapped by earlier saves; every tensor changed since the last save, as
  after an optimizer step); the first save of a job, which allocates and
  maps its slot, separately; time until the step is committed (data and
  parity stored: ``fut.result()`` returns), measured from the call.
- lazy save: time until ``save(lazy=True)`` returns, and until
  ``wait_staged()`` returns when called right away (the copy itself).
- torch.save to local disk, without fsync (the file is unlinked after each
  run, which drops its dirty pages) and with fsync, where one run should
  take under ``--disk-budget`` seconds at the rate the disk wrote the
  previous size (the disk this machine shares wrote from 2 MB/s to over
  1 GB/s while these were developed);
  ``dcp.async_save``'s blocking time (default settings, single process),
  its future awaited outside the timed region. DCP writes its files into a
  temp dir on tmpfs: its blocking part is the staging copy, made before any
  file is written, and a disk this slow would only stretch the untimed wait.

A short pause after each commit stands for the step's compute, during which
the client leases its next slot; saves that still had to wait for the
previous commit are counted in the table.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

from snapstore.bench._common import (
    Table,
    add_disk_budget,
    bench_header,
    bench_parser,
    disk_dir,
    human,
    median,
    memcpy_seconds,
    parse_sizes,
    private_store,
    release,
    report,
    state_nbytes,
    tensors_of,
    touch,
    training_state,
)

DEFAULT_SIZES = "64M,256M,512M,2G"
QUICK_SIZES = "4M"
FAILURE_TIMEOUT = 5.0
GAP = 0.1
"""Seconds between a commit and the next save: stands for the step's compute."""


def _budget(sizes: Sequence[int]) -> int:
    """Per-node memory for the largest state: the rank's node holds two slots and two
    XOR-delta buffers, and needs room for one more slot while a spare is swapped in;
    the others hold two versions of a parity chunk (a third of the state)."""
    big = max(sizes)
    return 6 * big + (64 << 20)


def _timed_until(fn: Any, reps: int, budget: float, after: Any = None) -> list[float]:
    """Time ``fn`` up to ``reps`` times, stopping once ``budget`` seconds were spent
    (at least once); ``after`` runs untimed after each call (cleanup, waits)."""
    out: list[float] = []
    spent = 0.0
    while len(out) < reps and (not out or spent < budget):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        out.append(dt)
        if after is not None:
            after()
        spent += time.perf_counter() - t0
    return out


def snapstore_saves(
    store: Any, node: str, job: str, state: Any, reps: int, warmup: int
) -> dict[str, Any]:
    """Sync then lazy saves of ``state`` by one rank; every sample, in seconds.

    A save the store aborts (on a loaded machine a node may miss its
    heartbeats) is counted, not timed, and the run goes on with the next step.
    """
    from snapstore.clients import Client
    from snapstore.errors import SaveFailedError

    tensors = tensors_of(state)
    client = Client(job, 0, 1, store=store, node_id=node, timeout=600)
    out: dict[str, Any] = {
        "save": [],
        "committed": [],
        "lazy_return": [],
        "lazy_staged": [],
        "lazy_committed": [],
        "delta_commits": 0,
        "failed": 0,
    }
    step = 0

    def one(lazy: bool) -> tuple[list[float], Any] | None:
        """One save of the next step: [returned, staged, committed] from the call."""
        nonlocal step
        step += 1
        touch(tensors)
        t0 = time.perf_counter()
        fut = client.save(step, state, lazy=lazy)
        t1 = time.perf_counter()
        client.wait_staged()
        t2 = time.perf_counter()
        try:
            fut.result()
        except SaveFailedError as e:
            out["failed"] += 1
            print(f"  step {step} not committed ({e}); going on", flush=True)
            time.sleep(1.0)
            return None
        t3 = time.perf_counter()
        time.sleep(GAP)
        return [t1 - t0, t2 - t0, t3 - t0], fut

    def timed_saves(lazy: bool) -> tuple[list[tuple[list[float], Any]], int]:
        """``reps`` committed saves, and how many of them waited for the previous commit."""
        waits = client.metrics["waits"]
        got: list[tuple[list[float], Any]] = []
        while len(got) < reps and out["failed"] < reps:
            saved = one(lazy)
            if saved is not None:
                got.append(saved)
        return got, client.metrics["waits"] - waits

    try:
        t0 = time.perf_counter()
        fut = client.save(step, state)
        out["first_save"] = time.perf_counter() - t0
        fut.result()
        out["first_committed"] = time.perf_counter() - t0
        out["bytes_total"] = fut.stats["bytes_total"]
        for _ in range(warmup):
            one(lazy=False)
        sync, out["sync_waits"] = timed_saves(lazy=False)
        for (returned, _, committed), fut in sync:
            out["save"].append(returned)
            out["committed"].append(committed)
            out["delta_commits"] += bool(fut.stats.get("delta"))
            out["bytes_copied"] = fut.stats["bytes_copied"]
            out["peer_bytes"] = fut.stats.get("peer_bytes")
        lazy, out["lazy_waits"] = timed_saves(lazy=True)
        for (returned, staged, committed), _ in lazy:
            out["lazy_return"].append(returned)
            out["lazy_staged"].append(staged)
            out["lazy_committed"].append(committed)
    finally:
        client.close()
        with contextlib.suppress(Exception):
            store.call("drop_job", job, timeout=60)
    return out


def file_baselines(
    state: Any, nbytes: int, reps: int, budget: float, fsync: bool
) -> dict[str, list[float]]:
    """torch.save to local disk (without, and if ``fsync`` with, fsync); dcp.async_save's
    blocking time (its files go to a tmpfs dir: see the module docstring)."""
    import torch
    import torch.distributed.checkpoint as dcp

    scratch = tempfile.mkdtemp(prefix="bench-save-", dir=disk_dir())
    staging = tempfile.mkdtemp(prefix="bench-dcp-", dir=_tmpfs_dir())
    path = os.path.join(scratch, "state.pt")
    out: dict[str, list[float]] = {}
    try:

        def unlink() -> None:
            # Unlinking drops the file's dirty pages: the disk is not kept busy
            # writing them back under the next measurement.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

        def save_fsync() -> None:
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        out["torch_save"] = _timed_until(
            lambda: torch.save(state, path), reps, budget, after=unlink
        )
        if fsync:
            out["torch_save_fsync"] = _timed_until(save_fsync, reps, budget, after=unlink)

        futures: list[Any] = []
        dirs: list[str] = []

        def async_save() -> None:
            d = tempfile.mkdtemp(prefix="dcp-", dir=staging)
            dirs.append(d)
            futures.append(dcp.async_save(state, checkpoint_id=d))

        def finish() -> None:
            t0 = time.perf_counter()
            futures.pop().result()
            out.setdefault("dcp_persisted", []).append(time.perf_counter() - t0)
            shutil.rmtree(dirs.pop(), ignore_errors=True)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            out["dcp_async_save"] = _timed_until(async_save, max(reps, 3), budget, after=finish)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _tmpfs_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def run_size(
    store: Any,
    node: str,
    size: int,
    reps: int,
    disk_reps: int,
    disk: dict[str, float],
    index: int,
) -> dict[str, Any]:
    """One state size; ``disk`` carries the budget and the last measured fsync rate."""
    state = training_state(size, seed=index)
    nbytes = state_nbytes(state)
    res: dict[str, Any] = {
        "size": size,
        "tensor_bytes": nbytes,
        "tensors": len(tensors_of(state)),
    }
    first = memcpy_seconds(nbytes, reps)
    res["snapstore"] = snapstore_saves(store, node, f"save-{index}", state, reps, warmup=3)
    release()
    second = memcpy_seconds(nbytes, reps)
    res["memcpy_np"] = first["np"] + second["np"]
    res["memcpy_torch"] = first["torch"] + second["torch"]
    s = res["snapstore"]
    print(
        f"  save {median(s['save']) * 1e3:.1f} ms, committed {median(s['committed']) * 1e3:.1f}"
        f" ms, memcpy {median(res['memcpy_np']) * 1e3:.1f} ms",
        flush=True,
    )
    rate = disk.get("rate")
    fsync = rate is None or nbytes / rate <= disk["budget"]
    res["disk"] = file_baselines(state, nbytes, disk_reps, disk["budget"], fsync)
    if fsync:
        disk["rate"] = nbytes / median(res["disk"]["torch_save_fsync"])
    del state
    release()
    return res


def tables(results: list[dict[str, Any]]) -> list[Table]:
    out = []
    summary = Table(
        "Summary (medians; ratios to one memcpy, np.copyto, of the same run):",
        [
            "state",
            "memcpy",
            "save (sync)",
            "save/memcpy",
            "committed",
            "committed/memcpy",
            "lazy: returns",
            "lazy: staged",
            "first save",
            "torch.save",
            "torch.save+fsync",
            "dcp.async_save blocks",
        ],
    )
    for r in results:
        s, d = r["snapstore"], r["disk"]
        mc = median(r["memcpy_np"])
        summary.add(
            human(r["size"]),
            _ms(mc),
            _ms(median(s["save"])),
            f"{median(s['save']) / mc:.2f}x",
            _ms(median(s["committed"])),
            f"{median(s['committed']) / mc:.2f}x",
            _ms(median(s["lazy_return"])),
            _ms(median(s["lazy_staged"])),
            _ms(s["first_save"]),
            _ms(median(d["torch_save"])),
            _ms(median(d["torch_save_fsync"])) if "torch_save_fsync" in d else "not run",
            _ms(median(d["dcp_async_save"])),
        )
    out.append(summary)
    for r in results:
        s, d = r["snapstore"], r["disk"]
        mc = median(r["memcpy_np"])
        t = Table(
            f"{human(r['size'])} state: {r['tensors']} tensors, {r['tensor_bytes']} bytes "
            f"(buffer with manifest: {s['bytes_total']} bytes)",
            ["operation", "median", "x memcpy", "runs", "notes"],
            "lrrrl",
        )

        def row(name: str, xs: list[float], note: str = "", t: Table = t, mc: float = mc) -> None:
            t.add(name, _ms(median(xs)), f"{median(xs) / mc:.2f}x", len(xs), note)

        row("memcpy, np.copyto (1 thread)", r["memcpy_np"], _rate(r["tensor_bytes"], mc))
        row(
            "memcpy, torch copy_",
            r["memcpy_torch"],
            _rate(r["tensor_bytes"], median(r["memcpy_torch"])),
        )
        row(
            "client.save, sync (blocking)",
            s["save"],
            f"{s['sync_waits']} saves waited for the previous commit; "
            f"{human(s['bytes_copied'])} copied per save; {s['failed']} saves aborted",
        )
        row(
            "  ... committed (from the call)",
            s["committed"],
            f"{s['delta_commits']}/{len(s['committed'])} parity updated from XOR deltas; "
            f"{human(s['peer_bytes'] or 0)} read by parity holders",
        )
        row("client.save, first of a job", [s["first_save"]], "allocates and maps the slot")
        row("  ... committed", [s["first_committed"]], "")
        row("client.save(lazy=True) returns", s["lazy_return"], "")
        row(
            "  ... wait_staged() returns",
            s["lazy_staged"],
            f"{s['lazy_waits']} saves waited for the previous commit",
        )
        row("  ... committed", s["lazy_committed"], "")
        row("torch.save, local disk, no fsync", d["torch_save"], "")
        if "torch_save_fsync" in d:
            rate = r["tensor_bytes"] / median(d["torch_save_fsync"]) / 1e6
            row("torch.save, local disk, fsync", d["torch_save_fsync"], f"{rate:.0f} MB/s")
        else:
            t.add(
                "torch.save, local disk, fsync",
                "not run",
                "",
                0,
                "the disk wrote too slowly at the previous size (see --disk-budget)",
            )
        row(
            "dcp.async_save, blocking part",
            d["dcp_async_save"],
            f"then {_s(median(d.get('dcp_persisted', [])))} until its future resolved",
        )
        out.append(t)
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _s(seconds: float) -> str:
    return f"{seconds:.1f} s"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.1f} GB/s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("save", __doc__, f"{QUICK_SIZES} only, few runs")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"state sizes ({DEFAULT_SIZES})")
    parser.add_argument("--reps", type=int, default=7, help="timed saves per mode (median)")
    parser.add_argument(
        "--disk-reps", type=int, default=3, help="torch.save / DCP runs per size (at most)"
    )
    add_disk_budget(
        parser, "seconds after which no further torch.save / DCP run starts (at least one runs)"
    )
    args = parser.parse_args(argv)
    sizes = parse_sizes(QUICK_SIZES if args.quick else args.sizes)
    reps = 3 if args.quick else max(3, args.reps)
    disk_reps = 1 if args.quick else max(1, args.disk_reps)
    info = bench_header(
        "snapstore.bench.save",
        f"sizes {', '.join(human(s) for s in sizes)}; store: 4 nodes, k=3, m=1, one rank "
        "(this process) on node 1",
    )
    # The client imports torch.distributed.tensor on its first save (to unwrap
    # DTensors): a one-time cost per process, reported on its own so that the
    # first save of the first size is comparable with the others.
    t0 = time.perf_counter()
    import torch.distributed.tensor  # noqa: F401

    info["one_time_import_seconds"] = time.perf_counter() - t0
    print(
        f"one-time import of torch.distributed.tensor (the client's first save pays it): "
        f"{_ms(info['one_time_import_seconds'])}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    disk: dict[str, float] = {"budget": args.disk_budget}
    # Detection speed is bench.restore's business: here a longer failure
    # timeout keeps a loaded machine's late heartbeats from aborting saves.
    with private_store(
        nodes=4, k=3, m=1, memory_per_node=_budget(sizes), failure_timeout=FAILURE_TIMEOUT
    ) as store:
        from snapstore.ops import faults

        node = faults.store_nodes(store)[0]
        for i, size in enumerate(sizes):
            print(f"... {human(size)}", flush=True)
            results.append(run_size(store, node, size, reps, disk_reps, disk, i))
    report(tables(results), args.json, info=info, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
