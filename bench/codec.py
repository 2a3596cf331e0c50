"""Codec throughput on one core: ISA-L fast path vs pyeclib's interface vs memcpy.

Run: ``python -m bench.codec`` (defaults: ``--sizes 64M,512M``); ``--quick``
for a smoke run on tiny stripes. Sizes are total data bytes per stripe
(k chunks of size/k). Prints markdown tables (docs/performance-codec.md
quotes them).

Method. The process is pinned to one CPU and every codec call uses
``threads=1``. All buffers are allocated and written once before timing
(pre-faulted), then reused ("warm"), except where an interface allocates its
own outputs (pyeclib), which is the point of comparing it. Each figure is the
median of ``--reps`` runs. GB/s is stripe data bytes (k * chunk) per second
for every row, so a ratio to memcpy reads as "this costs N copies of the
data". The machine may be shared: compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from snapstore import coding
from snapstore.bench._common import human, parse_size
from snapstore.coding.isal import load as load_isal

U8 = npt.NDArray[np.uint8]

LAYOUTS: tuple[tuple[int, int], ...] = ((2, 1), (3, 1), (4, 2), (8, 2))


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: caches, decode tables, first-touch of anything lazily mapped
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def filled(n: int, seed: int) -> U8:
    """n bytes of incompressible-looking data, written (so pre-faulted)."""
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, min(n, 1 << 20), dtype=np.uint8)
    out = np.empty(n, dtype=np.uint8)
    for a in range(0, n, len(block)):
        part = out[a : a + len(block)]
        part[:] = block[: len(part)]
        block = np.roll(block, 7)
    return out


def warm(n: int) -> U8:
    out = np.empty(n, dtype=np.uint8)
    out.fill(0)
    return out


def fresh_pages(n: int) -> None:
    """Map n bytes of new anonymous memory and write them once, as a fresh malloc does.

    An mmap is fresh every time; malloc may recycle freed memory below its
    (adaptive, at most 32 MiB) mmap threshold and hide the faults.
    """
    with mmap.mmap(-1, n) as mem:
        view = np.frombuffer(mem, dtype=np.uint8)
        view.fill(1)
        del view


def pin_to_one_cpu(cpu: int | None) -> int:
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-1] if cpu is None else cpu
    os.sched_setaffinity(0, {chosen})
    return chosen


def pyeclib_driver(k: int, m: int, backend: str = "isa_l_rs_vand") -> Any:
    from pyeclib.ec_iface import ECDriver

    return ECDriver(k=k, m=m, ec_type=backend)


def row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def bench_layout(k: int, m: int, size: int, reps: int, pyeclib_reps: int) -> list[str]:
    chunk = size // k
    total = chunk * k
    data = [filled(chunk, seed=i) for i in range(k)]
    parity = [warm(chunk) for _ in range(m)]
    codec = coding.ErasureCodec(k, m)

    # memcpy baseline: the same bytes into warm preallocated buffers.
    copies = [warm(chunk) for _ in range(k)]

    def memcpy() -> None:
        for src, dst in zip(data, copies, strict=True):
            np.copyto(dst, src)

    t_copy = median_seconds(memcpy, reps)
    t_enc = median_seconds(lambda: codec.encode_into(data, parity, threads=1), reps)

    lost = list(range(m))  # worst case: data chunks lost, parity needed to rebuild
    survivors = {i: c for i, c in enumerate([*data, *parity]) if i not in lost}
    rebuilt = {i: warm(chunk) for i in lost}
    t_dec = median_seconds(lambda: codec.reconstruct_into(survivors, rebuilt, threads=1), reps)
    assert all(np.array_equal(rebuilt[i], data[i]) for i in lost)

    t_xor_enc = t_xor_dec = float("nan")
    if m == 1:
        t_xor_enc = median_seconds(lambda: coding.xor_parity(data, parity[0]), reps)
        others = [c for i, c in enumerate([*data, *parity]) if i != 0]
        t_xor_dec = median_seconds(lambda: coding.xor_reconstruct(others, rebuilt[0]), reps)
        assert np.array_equal(rebuilt[0], data[0])

    # pyeclib's own interface: one contiguous object in, fresh fragments out.
    driver = pyeclib_driver(k, m)
    whole = np.concatenate(data)
    t_py_enc = median_seconds(lambda: driver.encode(whole), pyeclib_reps)
    fragments = driver.encode(whole)
    kept = [f for i, f in enumerate(fragments) if i not in lost]
    t_py_dec = median_seconds(lambda: driver.reconstruct(kept, list(lost)), pyeclib_reps)

    copy_rate = rate(total, t_copy)

    def cell(seconds: float) -> str:
        if seconds != seconds:  # NaN: not applicable
            return "–"
        r = rate(total, seconds)
        return f"{r:.2f} ({r / copy_rate:.2f}x)"

    return [
        row(
            [
                f"({k},{m})",
                human(total),
                f"{copy_rate:.2f}",
                cell(t_enc),
                cell(t_xor_enc),
                cell(t_py_enc),
                cell(t_dec),
                cell(t_xor_dec),
                cell(t_py_dec),
            ]
        )
    ]


CODEC_HEADER = [
    row(
        [
            "(k,m)",
            "stripe data",
            "memcpy GB/s",
            "encode ISA-L",
            "encode XOR",
            "encode pyeclib",
            "decode ISA-L",
            "decode XOR",
            "decode pyeclib",
        ]
    ),
    row(["---"] * 9),
]


def checksum_functions() -> dict[str, Callable[[Any], object]]:
    """Name -> function; names ending in "*" need a bytes object (given pre-made)."""
    funcs: dict[str, Callable[[Any], object]] = {
        "xxh3_64 (xxhash, the codec's)": coding.checksum,
        "zlib.crc32": zlib.crc32,
    }
    try:
        import crc32c

        funcs["crc32c (crc32c package)"] = crc32c.crc32c
    except ImportError:
        pass
    try:
        import google_crc32c

        # Its C extension accepts only bytes objects: timed on a pre-made copy.
        funcs["crc32c (google-crc32c) *"] = google_crc32c.value
    except ImportError:
        pass
    isal = load_isal()
    if isal is not None:
        funcs["crc32_iscsi (ISA-L, ctypes)"] = isal.crc32_iscsi
    return funcs


def bench_checksums(size: int, reps: int) -> list[str]:
    buf = filled(size, seed=99)
    as_bytes: bytes | None = None
    lines = []
    for name, fn in checksum_functions().items():
        arg: Any = buf
        if name.endswith("*"):
            as_bytes = as_bytes if as_bytes is not None else buf.tobytes()
            arg = as_bytes
        seconds = median_seconds(lambda fn=fn, arg=arg: fn(arg), reps)  # type: ignore[misc]
        lines.append(row([name, human(size), f"{rate(size, seconds):.2f}"]))
    return lines


def pyeclib_breakdown(k: int, m: int, size: int, reps: int) -> list[str]:
    """Time the pieces pyeclib's encode is made of, to show where its time goes."""
    chunk = size // k
    total = chunk * k
    whole = filled(total, seed=5)
    driver = pyeclib_driver(k, m)
    codec = coding.ErasureCodec(k, m)
    data = [whole[i * chunk : (i + 1) * chunk] for i in range(k)]
    parity = [warm(chunk) for _ in range(m)]
    out_bytes = chunk * (k + m)

    def faults_of(fn: Callable[[], object]) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    t_total = median_seconds(lambda: driver.encode(whole), reps)
    faults = faults_of(lambda: driver.encode(whole))
    t_arith = median_seconds(lambda: codec.encode_into(data, parity), reps)
    dst = warm(total)
    t_copy_in = median_seconds(lambda: np.copyto(dst, whole), reps)
    t_fresh = median_seconds(lambda: fresh_pages(out_bytes), reps)
    fresh_faults = faults_of(lambda: fresh_pages(out_bytes))
    warm_out = warm(out_bytes)
    t_copy_out = median_seconds(lambda: warm_out.fill(1), reps)
    page = os.sysconf("SC_PAGE_SIZE")

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.1f} ms"

    return [
        row(["piece", "time", "note"]),
        row(["---", "---", "---"]),
        row(["pyeclib `encode` (whole call)", ms(t_total), f"{faults} minor page faults per call"]),
        row(["ISA-L arithmetic alone (`encode_into`)", ms(t_arith), "parity into warm buffers"]),
        row(["copy input into its buffers (warm memcpy)", ms(t_copy_in), human(total)]),
        row(
            [
                "fill fresh output pages (allocate + first touch)",
                ms(t_fresh),
                f"{human(out_bytes)}, {fresh_faults} faults ({page}-byte pages)",
            ]
        ),
        row(["fill the same bytes when warm", ms(t_copy_out), "what the faults add"]),
    ]


def xor_block_sweep(size: int, reps: int) -> list[str]:
    from snapstore.coding import xor as xor_module

    k = 3
    chunk = size // k
    data = [filled(chunk, seed=i) for i in range(k)]
    out = warm(chunk)
    saved = xor_module.XOR_BLOCK
    lines = [row(["XOR block", "GB/s (k=3)"]), row(["---", "---"])]
    try:
        for block in (64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20, 1 << 30):
            xor_module.XOR_BLOCK = block
            seconds = median_seconds(lambda: coding.xor_parity(data, out), reps)
            lines.append(row([human(block), f"{rate(chunk * k, seconds):.2f}"]))
    finally:
        xor_module.XOR_BLOCK = saved
    return lines


def bench_threads(k: int, m: int, size: int, threads: int, reps: int) -> list[str]:
    """The ``threads=`` split, unpinned: one call's byte range over several cores."""
    chunk = size // k
    data = [filled(chunk, seed=i) for i in range(k)]
    parity = [warm(chunk) for _ in range(m)]
    codec = coding.ErasureCodec(k, m)
    survivors = {i: c for i, c in enumerate([*data, *parity]) if i >= m}
    rebuilt = {i: warm(chunk) for i in range(m)}
    lines = [row(["threads", "encode GB/s", "decode GB/s"]), row(["---"] * 3)]
    for n in sorted({1, threads}):
        t_enc = median_seconds(lambda n=n: codec.encode_into(data, parity, threads=n), reps)  # type: ignore[misc]
        t_dec = median_seconds(
            lambda n=n: codec.reconstruct_into(survivors, rebuilt, threads=n),  # type: ignore[misc]
            reps,
        )
        lines.append(row([n, f"{rate(chunk * k, t_enc):.2f}", f"{rate(chunk * k, t_dec):.2f}"]))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    summary = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=summary)
    parser.add_argument("--sizes", default="64M,512M", help="stripe data sizes, e.g. 64M,512M")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few reps (smoke test)")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument("--pyeclib-reps", type=int, default=3, help="timed runs for pyeclib")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: last)")
    parser.add_argument("--xor-blocks", action="store_true", help="also sweep the XOR block size")
    parser.add_argument(
        "--threads", type=int, default=0, help="also time threads=N on all CPUs, (4,2), unpinned"
    )
    args = parser.parse_args(argv)

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    reps, pyeclib_reps = args.reps, args.pyeclib_reps
    if args.quick:
        sizes, reps, pyeclib_reps = [1 << 20, 4 << 20], 3, 2

    all_cpus = os.sched_getaffinity(0)
    cpu = pin_to_one_cpu(args.cpu)
    isal = load_isal()
    print(f"# bench.codec: pinned to CPU {cpu} of {os.cpu_count()}, threads=1")
    where = f"{isal.version} at {os.path.basename(isal.path)}" if isal else "not loaded"
    print(f"# ISA-L: {where}")
    print(f"# codec implementation: {coding.ErasureCodec(4, 2).implementation}")
    print(f"# python {sys.version.split()[0]}, numpy {np.__version__}, reps={reps}")
    print()
    print("Encode and decode, GB/s of stripe data (ratio to memcpy of the same bytes):")
    print()
    for line in CODEC_HEADER:
        print(line)
    for size in sizes:
        for k, m in LAYOUTS:
            for line in bench_layout(k, m, size, reps, pyeclib_reps):
                print(line, flush=True)
    print()
    print("Checksums, one core:")
    print()
    print(row(["function", "buffer", "GB/s"]))
    print(row(["---"] * 3))
    for line in bench_checksums(max(sizes), reps):
        print(line, flush=True)
    print()
    print(f"Where pyeclib's encode time goes, (4,2) on {human(max(sizes))}:")
    print()
    for line in pyeclib_breakdown(4, 2, max(sizes), pyeclib_reps):
        print(line, flush=True)
    if args.xor_blocks:
        print()
        for line in xor_block_sweep(min(sizes), reps):
            print(line, flush=True)
    if args.threads > 1:
        os.sched_setaffinity(0, all_cpus)
        print()
        print(f"(4,2) on {human(max(sizes))}, unpinned ({len(all_cpus)} CPUs):")
        print()
        for line in bench_threads(4, 2, max(sizes), args.threads, reps):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
