"""What sealing the data servers' bytes costs: protocol 3 with and without AES-256-GCM.

Run: ``python -m bench.transport``; ``--quick`` for a smoke run; ``--json FILE``
writes every sample. Prints markdown tables (docs/operating.md, Security,
quotes them).

One :class:`~snapstore.node.transport.DataServer` and one
:class:`~snapstore.node.transport.Transport` in this process, on loopback,
over a segment of ``--size`` bytes in shared memory (as an SMP serves its
chunks to a peer on another host). Each rep reads the whole segment in
``--block``-sized requests (``read_into``, as a rebuild does), or asks for
checksums of 64 KiB ranges (``checksum``: small requests, where the
per-request cost would show). Two pairs run in round robin, so drifting load
hits both alike:

- **sealed**: the protocol as SMPs speak it (every request and reply,
  header and payload, encrypted and authenticated with AES-256-GCM, each
  side sealing what it sends and opening what it receives);
- **plaintext**: the same protocol, framing and threads with sealing
  replaced by nothing (a private constructor flag that only this benchmark
  and a control test set; payload bytes go from the segment to the socket
  and from the socket into place, as the data path did before any
  protection).

The baseline is ``np.copyto`` of the same bytes (one memcpy). Medians of
``--reps``; ratios are to the plaintext path of the same run. Loopback
has no network in the way and both ends share the machine's cores, so the
cipher's share (each byte encrypted once and decrypted once) is the
largest it can be.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import partial
from typing import Any

import numpy as np

from snapstore.bench._common import (
    Table,
    bench_header,
    bench_parser,
    human,
    median,
    parse_size,
    prefaulted,
    ratio,
    report,
    timed,
)
from snapstore.node.segments import Segment, data_name
from snapstore.node.transport import ChunkUnavailableError, DataServer, PeerInfo, Transport

TOKEN = "bench-token"
NAME = data_name("bench", 0, 1)
SUM_RANGE = 64 << 10


def _pair(directory: str, seal: bool) -> tuple[DataServer, Transport, PeerInfo]:
    # Mapped once, as an SMP's slot table holds its segments mapped.
    segment = Segment.open(os.path.join(directory, NAME))

    def resolve(name: str) -> np.ndarray:
        if name != NAME:
            raise ChunkUnavailableError(f"no segment {name}")
        return segment.array

    server = DataServer("127.0.0.1", TOKEN, resolve, _seal=seal)
    client = Transport("bench-client", TOKEN, force_tcp=True, _seal=seal)
    peer = PeerInfo("bench-node", "bench-server", directory, "127.0.0.1", server.port)
    return server, client, peer


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("transport", __doc__, "64 MiB, 3 reps")
    parser.add_argument("--size", default="512M", help="segment bytes read per rep [512M]")
    parser.add_argument("--block", default="8M", help="bytes per read request [8M]")
    parser.add_argument("--reps", type=int, default=7, help="timed reps per path [7]")
    args = parser.parse_args(argv)
    size = parse_size("64M" if args.quick else args.size)
    block = min(parse_size(args.block), size)
    reps = 3 if args.quick else args.reps
    info = bench_header("transport", f"segment {human(size)}, requests of {human(block)}")

    directory = tempfile.mkdtemp(prefix="ssb-transport-", dir="/dev/shm")
    pairs: dict[str, tuple[DataServer, Transport, PeerInfo]] = {}
    try:
        src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
        with open(os.path.join(directory, NAME), "wb") as f:
            f.write(src.tobytes())
        dest = prefaulted(size)
        pairs = {"plaintext": _pair(directory, False), "sealed": _pair(directory, True)}

        def read_all(path: str) -> None:
            _, client, peer = pairs[path]
            for at in range(0, size, block):
                client.read_into(peer, NAME, at, dest[at : at + block])

        def sums(path: str) -> None:
            _, client, peer = pairs[path]
            for at in range(0, min(size, 256 * SUM_RANGE), SUM_RANGE):
                client.checksum(peer, NAME, at, SUM_RANGE)

        samples: dict[str, list[float]] = {}
        for path in pairs:  # warm: connections, mappings, page cache
            read_all(path)
            assert np.array_equal(dest, src), f"{path}: bytes differ"
        for _ in range(reps):
            for path in pairs:
                samples.setdefault(f"read {path}", []).extend(timed(partial(read_all, path), 1, 0))
                samples.setdefault(f"sum {path}", []).extend(timed(partial(sums, path), 1, 0))
        samples["memcpy"] = timed(lambda: np.copyto(dest, src), reps)
        n_sums = len(range(0, min(size, 256 * SUM_RANGE), SUM_RANGE))

        reads = Table(
            f"Reading {human(size)} from a peer's data server over loopback TCP, "
            f"{human(block)} per request (median of {reps})",
            ["path", "seconds", "GB/s", "x plaintext", "x memcpy"],
        )
        base, mem = median(samples["read plaintext"]), median(samples["memcpy"])
        for path in ("plaintext", "sealed"):
            t = median(samples[f"read {path}"])
            reads.add(path, f"{t:.4f}", f"{size / t / 1e9:.2f}", ratio(t, base), ratio(t, mem))
        reads.add("memcpy (np.copyto)", f"{mem:.4f}", f"{size / mem / 1e9:.2f}", "-", "1.00x")

        small = Table(
            f"{n_sums} checksum requests of {human(SUM_RANGE)} each (median of {reps})",
            ["path", "ms per request", "x plaintext"],
        )
        sbase = median(samples["sum plaintext"])
        for path in ("plaintext", "sealed"):
            t = median(samples[f"sum {path}"])
            small.add(path, f"{t / n_sums * 1e3:.3f}", ratio(t, sbase))
        payload: dict[str, Any] = {"info": info, "samples": samples, "size": size, "block": block}
        report([reads, small], args.json, **payload)
    finally:
        for server, client, _ in pairs.values():
            client.close()
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
