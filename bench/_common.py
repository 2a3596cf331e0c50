"""Helpers the store benchmarks share: a private store, medians, memcpy baselines, output.

Every benchmark starts its own embedded store in a short private runtime
directory (Ray's socket paths must fit 107 bytes) and stops it in a
``finally``, also on Ctrl-C or SIGTERM, so nothing it started outlives it.
Timings are medians of several runs; ratios divide by a baseline measured in
the same process and run, because the machine may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Table",
    "add_disk_budget",
    "bench_header",
    "cluster_messages_to",
    "disk_dir",
    "human",
    "job_status",
    "mark_step",
    "median",
    "memcpy_seconds",
    "parse_size",
    "parse_sizes",
    "prefaulted",
    "private_store",
    "ratio",
    "release",
    "report",
    "state_digest",
    "state_nbytes",
    "store_events",
    "tensors_of",
    "timed",
    "touch",
    "training_state",
    "wait_until",
    "write_json",
]

# Ray rewrites 127.0.0.1 to the machine's outward address unless this is 0
# when it is imported: set it before anything imports ray (benchmarks stay on
# loopback).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

U8 = npt.NDArray[np.uint8]
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"512M"`` / ``"2G"`` / ``"64MiB"`` -> bytes (binary units)."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def parse_sizes(text: str) -> list[int]:
    return [parse_size(s) for s in text.split(",") if s.strip()]


def human(n: float) -> str:
    """``268435456 -> '256 MiB'``: sizes in table rows."""
    for unit in ("G", "M", "K"):
        if n >= _UNITS[unit]:
            v = n / _UNITS[unit]
            return f"{v:.0f} {unit}iB" if v == int(v) else f"{v:.1f} {unit}iB"
    return f"{int(n)} B"


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def timed(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def prefaulted(nbytes: int, value: int = 1) -> U8:
    """A buffer of ``nbytes`` with every page written once (first touch costs ~30x a copy)."""
    out = np.empty(nbytes, dtype=np.uint8)
    out.fill(value)
    return out


def memcpy_seconds(nbytes: int, reps: int) -> dict[str, list[float]]:
    """One contiguous copy of ``nbytes`` between two warm buffers, timed ``reps`` times.

    ``np.copyto`` is one memcpy on one thread (the baseline the targets are
    stated against); torch ``copy_`` splits it over torch's intra-op threads,
    as a trainer's own copy would, and is reported beside it.
    """
    import torch

    src, dst = prefaulted(nbytes, 1), prefaulted(nbytes, 2)
    ts, td = torch.from_numpy(src), torch.from_numpy(dst)
    out: dict[str, list[float]] = {"np": [], "torch": []}
    np.copyto(dst, src)
    td.copy_(ts)
    for _ in range(reps):  # round-robin, so drifting load hits both alike
        t0 = time.perf_counter()
        np.copyto(dst, src)
        out["np"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        td.copy_(ts)
        out["torch"].append(time.perf_counter() - t0)
    del src, dst, ts, td
    release()
    return out


def release() -> None:
    """Give freed buffers back now, so the next size starts from the same memory."""
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    return "?"


def bench_parser(name: str, doc: str | None, quick: str) -> argparse.ArgumentParser:
    """The command line every benchmark starts from: ``--quick`` (a smoke run;
    ``quick`` says what it runs) and ``--json FILE``; the module docstring's first
    line is the description."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{name}", description=(doc or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--json", metavar="FILE", help="write every sample as JSON")
    return parser


def bench_header(name: str, extra: str = "") -> dict[str, Any]:
    """Print and return what the numbers were measured on."""
    import torch

    info = {
        "bench": name,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_start": load_average(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(
        f"# {name}: torch {info['torch']} ({info['torch_threads']} threads), "
        f"{info['cpus']} CPUs, {info['ram_gib']} GiB RAM, python {info['python']}, "
        f"load average {info['load_average_start']}" + (f"; {extra}" if extra else ""),
        flush=True,
    )
    return info


class Table:
    """A markdown table printed as a whole (the docs quote these verbatim)."""

    def __init__(self, title: str, columns: Sequence[str], align: str = "") -> None:
        self.title = title
        self.columns = list(columns)
        self.align = align or "l" + "r" * (len(columns) - 1)
        self.rows: list[list[str]] = []

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def print(self) -> None:
        print()
        if self.title:
            print(f"{self.title}")
            print()
        print("| " + " | ".join(self.columns) + " |")
        print("| " + " | ".join("---:" if a == "r" else "---" for a in self.align) + " |")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")
        print(flush=True)

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


def add_disk_budget(parser: Any, meaning: str) -> None:
    """``--disk-budget SECONDS`` (default 60): how much a slow shared disk may cost a run."""
    parser.add_argument("--disk-budget", type=float, default=60.0, help=f"{meaning} (60)")


def report(tables: Sequence[Table], path: str | None, **payload: Any) -> None:
    """Print the tables, then write them with ``payload`` to ``path`` as JSON (if given)."""
    for t in tables:
        t.print()
    write_json(path, {**payload, "tables": [t.as_dict() for t in tables]})


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"results written to {path}")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM raises KeyboardInterrupt, so ``finally`` blocks stop what was started.

    A no-op off the main thread, where signals cannot be handled.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def private_store(prefix: str = "ssb-", **settings: Any) -> Iterator[Any]:
    """Start an embedded store in a private, short runtime dir; stop it whatever happens.

    The dir is ``/tmp/<prefix>...``; ``settings`` go to ``snapstore.up``. The
    demo, the benchmarks and their trainers all start stores through this.
    SIGTERM is turned into KeyboardInterrupt for the duration, so a killed
    benchmark still runs its ``finally`` and takes its Ray processes and
    shared memory with it.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import snapstore

    rundir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    stack = contextlib.ExitStack()
    stack.enter_context(_sigterm_as_interrupt())
    settings.setdefault("rest", False)
    settings.setdefault("failure_timeout", 1.0)
    t0 = time.perf_counter()
    try:
        for attempt in (1, 2):
            try:
                store = snapstore.up(rundir=rundir, **settings)
                # ray.init replaced our SIGTERM handler with one that ends the
                # process at once: take it back.
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGTERM, _raise_interrupt)
                break
            except snapstore.ClusterError as e:
                # A raylet that misses Ray's registration deadline on a loaded
                # machine: clean up and try once more.
                if attempt == 2:
                    raise
                print(f"store did not start ({e}); retrying once", flush=True)
                _kill_leftovers(rundir)
        store.rundir = rundir  # type: ignore[attr-defined]
        print(f"store up in {time.perf_counter() - t0:.1f} s ({store.store_id})", flush=True)
        yield store
    finally:
        try:
            with contextlib.suppress(Exception):
                snapstore.down(rundir=rundir)
            _kill_leftovers(rundir)
            if os.environ.get("SNAPSTORE_KEEP_LOGS"):
                print(f"kept the store's runtime dir and logs: {rundir}", flush=True)
            else:
                shutil.rmtree(rundir, ignore_errors=True)
        finally:
            stack.close()


@contextlib.contextmanager
def cluster_messages_to(path: str) -> Iterator[None]:
    """Within: what Ray and snapstore report on this driver goes to ``path``, not the terminal.

    A Ray driver prints the errors its cluster publishes -- a worker died
    ("A worker died or was killed ... OOM killer ..."), a node was marked
    dead -- on stdout, prefixed ``(raylet)``, from a background thread
    (``ray._private.worker.listen_error_messages`` calls the module's
    ``print_to_stdstream``). ``log_to_driver=False`` stops the workers' own
    output, not these, and ``RAY_DEDUP_LOGS`` only folds repeats. A
    benchmark that kills workers and nodes on purpose routes them to a log
    file: ``print_to_stdstream`` is swapped for a writer to ``path`` (Ray is
    pinned to one minor release, see pyproject.toml), and the ``ray`` and
    ``snapstore`` loggers (Ray's own stderr handler, Python's last-resort
    one) write there instead while it lasts.
    """
    import logging

    import ray._private.worker as ray_worker

    lock = threading.Lock()
    loggers = [logging.getLogger(name) for name in ("ray", "snapstore")]
    with open(path, "a", buffering=1) as log:

        def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
            with lock:
                for line in data.get("lines", []):
                    log.write(f"({data.get('pid', '?')}) {line}\n")

        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
        original = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = to_log
        for lg in loggers:
            lg.handlers[:] = [handler]  # Ray's own handler on "ray" writes to stderr
            lg.propagate = False
        try:
            yield
        finally:
            ray_worker.print_to_stdstream = original
            for lg, handlers, propagate in saved:
                lg.handlers[:] = handlers
                lg.propagate = propagate


def _kill_leftovers(rundir: str) -> None:
    """Kill, by pid, processes of ours that ``down`` could not know about.

    A raylet whose start timed out is not recorded in the store's state file,
    yet some of its processes (e.g. its runtime-env agent) may already run;
    every process of this store has the private runtime dir on its command
    line, so that finds exactly ours.
    """
    import psutil

    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and any(rundir in a for a in p.info["cmdline"] or ()):
                mine.append(p)
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(mine, timeout=10)


def disk_dir() -> str:
    """A directory on local disk (not a tmpfs, which is memory) for file baselines.

    ``$BENCH_DISK_DIR`` if set, else /var/tmp, else the temp dir.
    """
    for d in (os.environ.get("BENCH_DISK_DIR"), "/var/tmp", tempfile.gettempdir()):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


def _layer_shapes(dim: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("attn.qkv.weight", (3 * dim, dim)),
        ("attn.qkv.bias", (3 * dim,)),
        ("attn.out.weight", (dim, dim)),
        ("attn.out.bias", (dim,)),
        ("norm1.weight", (dim,)),
        ("norm1.bias", (dim,)),
        ("mlp.fc1.weight", (4 * dim, dim)),
        ("mlp.fc1.bias", (4 * dim,)),
        ("mlp.fc2.weight", (dim, 4 * dim)),
        ("mlp.fc2.bias", (dim,)),
        ("norm2.weight", (dim,)),
        ("norm2.bias", (dim,)),
    ]


def _elem_bytes(shape: tuple[int, ...]) -> int:
    # fp32 weight + AdamW exp_avg + exp_avg_sq (12 bytes), and a bf16 copy of matrices.
    return 12 + (2 if len(shape) == 2 else 0)


def training_state(nbytes: int, layers: int = 12, seed: int = 0) -> dict[str, Any]:
    """A transformer-shaped training state of about ``nbytes`` tensor bytes, every byte written.

    fp32 weights, bf16 copies of the matrices, AdamW ``exp_avg`` /
    ``exp_avg_sq`` / ``step`` per parameter, param groups, RNG states and a
    data position: 12 layers give 640 tensors (a few hundred, from 4 bytes
    to a few hundred MiB). The embedding's row count absorbs the rest of the
    byte budget, so the total is within one row of ``nbytes``.
    """
    import torch

    def block_bytes(dim: int) -> int:
        per = sum(int(np.prod(s)) * _elem_bytes(s) for _, s in _layer_shapes(dim))
        return layers * per + 2 * dim * 12

    dim = 16
    while block_bytes(dim + 16) + 64 * (dim + 16) * 14 <= nbytes:
        dim += 16
    vocab = max(16, (nbytes - block_bytes(dim)) // (14 * dim))
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, dim))]
    for i in range(layers):
        shapes += [(f"layers.{i}.{n}", s) for n, s in _layer_shapes(dim)]
    shapes += [("norm.weight", (dim,)), ("norm.bias", (dim,))]
    gen = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    half: dict[str, torch.Tensor] = {}
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for i, (name, shape) in enumerate(shapes):
        w = torch.empty(shape).uniform_(-0.1, 0.1, generator=gen)
        model[name] = w
        if len(shape) == 2:
            half[name] = w.to(torch.bfloat16)
        optim[i] = {
            "step": torch.tensor(float(seed)),
            "exp_avg": torch.empty(shape).normal_(0, 1e-3, generator=gen),
            "exp_avg_sq": torch.empty(shape).uniform_(0, 1e-6, generator=gen),
        }
    model["head.weight"] = model["embed.weight"]  # tied, as in a GPT's state_dict()
    return {
        "model": model,
        "model_bf16": half,
        "optim": {
            "state": optim,
            "param_groups": [
                {
                    "lr": 3e-4,
                    "betas": (0.9, 0.95),
                    "eps": 1e-8,
                    "weight_decay": 0.1,
                    "params": list(optim),
                }
            ],
        },
        "rng": {"torch": torch.get_rng_state()},
        "step": 1000 + seed,
        "data": {"epoch": 3, "sample": 123_456},
    }


def tensors_of(state: Any) -> list[Any]:
    """Every distinct tensor in a nested state (tied ones once)."""
    import torch

    out: dict[int, Any] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            out.setdefault(id(obj), obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(state)
    return list(out.values())


def state_nbytes(state: Any) -> int:
    """Tensor bytes of a state, each storage once (tied weights share one)."""
    seen: dict[int, int] = {}
    for t in tensors_of(state):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def touch(tensors: Sequence[Any]) -> None:
    """Mark tensors as changed, as an optimizer step would (bumps their version counters).

    An in-place op on a one-element view shares the tensor's version counter,
    so the client sees the whole tensor as changed, at a few microseconds
    per tensor instead of rewriting it.
    """
    import torch

    with torch.no_grad():
        for t in tensors:
            t.view(-1)[:1].mul_(1)


def mark_step(tensors: Sequence[Any], step: int) -> None:
    """Write ``step`` into the first element of every tensor: each changes, deterministically.

    The state after ``mark_step(training_state(n, seed=s) tensors, step)`` is a
    pure function of (n, s, step), so a process that never saw it can
    recompute what a restore must return.
    """
    import torch

    with torch.no_grad():
        for t in tensors:
            t.view(-1)[:1].fill_(float(step))


def state_digest(state: Any) -> str:
    """XXH3-128 of a nested state: every tensor's dtype, shape and bytes, every plain value."""
    import torch
    import xxhash

    h = xxhash.xxh3_128()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.view(-1).view(torch.uint8).numpy().data)
        elif isinstance(obj, np.ndarray):
            h.update(f"A{obj.dtype}{obj.shape}".encode())
            h.update(np.ascontiguousarray(obj).view(np.uint8).data)
        elif isinstance(obj, dict):
            h.update(b"{")
            for k, v in obj.items():
                h.update(repr(k).encode())
                walk(v)
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[" if isinstance(obj, list) else b"(")
            for v in obj:
                walk(v)
            h.update(b"]")
        else:
            h.update(f"{type(obj).__name__}:{obj!r}".encode())

    walk(state)
    return h.hexdigest()


def store_events(store: Any, kind: str | None = None, n: int = 2000) -> list[dict[str, Any]]:
    """The coordinator's recent events, oldest first (``kind`` filters)."""
    evs = store.status(events=n)["events"]
    return [e for e in evs if kind is None or e["kind"] == kind]


def job_status(store: Any, job: str) -> dict[str, Any]:
    for j in store.status(events=0)["jobs"]:
        if j["job"] == job:
            return dict(j)
    return {}


def wait_until(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
