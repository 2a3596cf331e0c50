"""Snapshot format speed: pack and unpack(into=) of a training state vs one memcpy.

Run: ``python -m bench.pack`` (default ``--size 1G``); ``--quick`` for a
64 MiB smoke run. Prints a markdown table (docs/performance-format.md quotes
it).

The state is shaped like a transformer's training state: fp32 master
weights (embedding tied to the output projection), bf16 copies of the
matrices, AdamW ``exp_avg``/``exp_avg_sq`` and ``step`` per parameter,
param groups, RNG states, counters -- several hundred tensors from a few
bytes to tens of MiB.

Method. Every buffer is written before timing (pre-faulted: the first write
into fresh pages costs far more than a warm copy) and reused. Each figure is
the median of ``--reps`` timed runs after one warm-up run. The baseline is
one copy of the same number of bytes (the layout's ``nbytes``) between two
warm contiguous buffers, with torch ``copy_`` (what ``pack`` uses, on
torch's intra-op threads) and with ``np.copyto`` (one thread). The machine
may be shared: compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from snapstore.bench._common import parse_size
from snapstore.format.pack import pack, plan, unpack


def medians(fns: Sequence[Callable[[], object]], reps: int) -> list[float]:
    """Median seconds of each function, run round-robin so drifting load hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _shapes(dim: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, dim))]
    for i in range(layers):
        p = f"layers.{i}."
        shapes += [
            (p + "attn.qkv.weight", (3 * dim, dim)),
            (p + "attn.qkv.bias", (3 * dim,)),
            (p + "attn.out.weight", (dim, dim)),
            (p + "attn.out.bias", (dim,)),
            (p + "norm1.weight", (dim,)),
            (p + "norm1.bias", (dim,)),
            (p + "mlp.fc1.weight", (4 * dim, dim)),
            (p + "mlp.fc1.bias", (4 * dim,)),
            (p + "mlp.fc2.weight", (dim, 4 * dim)),
            (p + "mlp.fc2.bias", (dim,)),
            (p + "norm2.weight", (dim,)),
            (p + "norm2.bias", (dim,)),
        ]
    return [*shapes, ("norm.weight", (dim,)), ("norm.bias", (dim,))]


def _state_bytes(dim: int, layers: int) -> int:
    # fp32 weights + fp32 exp_avg + fp32 exp_avg_sq (12 bytes/param) + bf16 matrices.
    total = 0
    for _, shape in _shapes(dim, layers, 8 * dim):
        n = int(np.prod(shape))
        total += 12 * n + (2 * n if len(shape) == 2 else 0)
    return total


def build_state(size: int, layers: int = 12, seed: int = 0) -> dict[str, Any]:
    """A training state of about ``size`` tensor bytes, every byte written."""
    dim = 64
    while _state_bytes(dim + 64, layers) <= size:
        dim += 64
    gen = torch.Generator().manual_seed(seed)
    model: OrderedDict[str, torch.Tensor] = OrderedDict()
    half: dict[str, torch.Tensor] = {}
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for i, (name, shape) in enumerate(_shapes(dim, layers, 8 * dim)):
        weight = torch.empty(shape).uniform_(-0.1, 0.1, generator=gen)
        model[name] = weight
        if len(shape) == 2:
            half[name] = weight.to(torch.bfloat16)
        optim_state[i] = {
            "step": torch.tensor(1000.0),
            "exp_avg": torch.empty(shape).normal_(0, 1e-3, generator=gen),
            "exp_avg_sq": torch.empty(shape).uniform_(0, 1e-6, generator=gen),
        }
    model["head.weight"] = model["embed.weight"].view(8 * dim, dim)  # tied, as in state_dict()
    return {
        "model": model,
        "model_bf16": half,
        "optim": {
            "state": optim_state,
            "param_groups": [
                {
                    "lr": 3e-4,
                    "betas": (0.9, 0.95),
                    "eps": 1e-8,
                    "weight_decay": 0.1,
                    "amsgrad": False,
                    "foreach": None,
                    "params": list(optim_state),
                }
            ],
        },
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        "step": 1000,
        "data": {"epoch": 3, "sample": 123_456},
    }


def _warm(n: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    out = np.empty(n, dtype=np.uint8)
    out.fill(1)
    return out


def run(size: int, reps: int) -> list[tuple[str, float, str]]:
    state = build_state(size)
    layout = plan(state)
    n = layout.nbytes
    out, dst = _warm(n), _warm(n)
    src_t, dst_t = torch.from_numpy(out), torch.from_numpy(dst)
    live = build_state(size, seed=1)  # the trainer's tensors a restore copies into
    packed = pack(state, out=out, layout=layout)
    threads = torch.get_num_threads()

    torch_copy, np_copy, pack_time, pack_one, into, into_one = medians(
        [
            lambda: dst_t.copy_(src_t),
            lambda: np.copyto(dst, out),
            lambda: pack(state, out=out, layout=layout),
            lambda: pack(state, out=out, layout=layout, threads=1),
            lambda: unpack(packed.manifest, packed.data, into=live),
            lambda: unpack(packed.manifest, packed.data, into=live, threads=1),
        ],
        reps,
    )
    plan_cold, check, manifest, views = medians(
        [
            lambda: plan(state),
            lambda: plan(state, previous=layout),
            lambda: layout.manifest(state),
            lambda: unpack(packed.manifest, packed.data, copy=False),
        ],
        reps,
    )

    def vs(seconds: float) -> str:
        return f"{seconds / torch_copy:.2f}x torch copy_, {seconds / np_copy:.2f}x np.copyto"

    leaves = len(layout.leaves)
    return [
        (
            f"memcpy, torch copy_ ({threads} threads)",
            torch_copy,
            f"{n / torch_copy / 1e9:.1f} GB/s",
        ),
        ("memcpy, np.copyto (1 thread)", np_copy, f"{n / np_copy / 1e9:.1f} GB/s"),
        (f"pack(state, out=warm, layout=cached), {threads} threads", pack_time, vs(pack_time)),
        ("pack(...), threads=1", pack_one, vs(pack_one)),
        (f"unpack(manifest, data, into=live), {threads} threads", into, vs(into)),
        ("unpack(..., into=live), threads=1", into_one, vs(into_one)),
        ("unpack(manifest, data, copy=False)", views, f"{leaves} leaves viewed, no copy"),
        ("plan(state) cold", plan_cold, f"{leaves} leaves, {len(layout.regions)} regions"),
        ("plan(state, previous=layout) cached", check, "returns the same layout"),
        ("layout.manifest(state)", manifest, f"{len(packed.manifest)} bytes of manifest"),
    ]


def many_small(count: int, reps: int) -> list[tuple[str, float, str]]:
    """Per-step costs that grow with the number of tensors, not their bytes."""
    state: dict[str, Any] = {
        "model": {f"p{i}": torch.zeros(64) for i in range(count // 3)},
        "optim": {
            i: {
                "step": torch.tensor(1.0),
                "exp_avg": torch.zeros(64),
                "exp_avg_sq": torch.zeros(64),
            }
            for i in range(count // 3)
        },
        "step": 1,
    }
    layout = plan(state)
    out = _warm(layout.nbytes)
    cold, check, manifest, packing = medians(
        [
            lambda: plan(state),
            lambda: plan(state, previous=layout),
            lambda: layout.manifest(state),
            lambda: pack(state, out=out, layout=layout),
        ],
        reps,
    )
    leaves = f"{len(layout.leaves)} tensors"
    return [
        ("plan(state) cold", cold, leaves),
        ("plan(state, previous=layout) cached", check, leaves),
        ("layout.manifest(state)", manifest, leaves),
        ("pack(state, out=warm, layout=cached)", packing, f"{leaves}, {layout.nbytes} bytes"),
    ]


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.1f} GB/s"


def _table(rows: Sequence[tuple[str, float, str]]) -> None:
    print("| operation | median | notes |")
    print("| --- | ---: | --- |")
    for name, seconds, note in rows:
        print(f"| {name} | {seconds * 1e3:.1f} ms | {note} |", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    summary = (__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m bench.pack", description=summary)
    parser.add_argument("--size", default="1G", help="tensor bytes in the state (default 1G)")
    parser.add_argument("--quick", action="store_true", help="64 MiB state (smoke run)")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per figure (median)")
    args = parser.parse_args(argv)
    size = parse_size("64M" if args.quick else args.size)
    reps = max(args.reps, 5)
    print(
        f"# bench.pack: state of ~{size / 2**20:.0f} MiB, reps={reps}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}"
    )
    print()
    _table(run(size, reps))
    print()
    print("Per-step overhead with many small tensors:")
    print()
    _table(many_small(1000, reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
