"""Splitting an output byte range over ragged inputs, and over threads.

A stripe's chunks are often not the same length: the last chunk of a node's
buffer is short, and the codec treats a short chunk as zero-padded to the
output length. Rather than copy it into a padded temporary, the output range
is cut at every input's end; on each piece only the inputs that still have
bytes take part (zero padding contributes nothing to a linear code), and a
piece with no live input is zero.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

__all__ = ["Segment", "run_split", "segments", "split_range"]

Segment = tuple[int, int, tuple[int, ...]]
"""``(start, stop, live)``: on bytes [start, stop) the inputs ``live`` have data."""

# Thread splits are cut at page multiples so that two threads never write the
# same cache line (and ISA-L's vector loops keep their alignment).
_SPLIT_ALIGN = 4096
# Below this many output bytes per thread, handing work to the pool costs more
# than it saves (bench/codec.py --threads: 4 MiB stripes ran slower split).
MIN_SPLIT_BYTES = 4 << 20

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def segments(lengths: Sequence[int], start: int, stop: int) -> list[Segment]:
    """Cut [start, stop) at each input's end; list the inputs live on each piece.

    ``lengths[i]`` is the length of input i. Input i is live on a piece
    [a, b) when ``lengths[i] >= b``; since the range is cut at every length,
    an input is either live on a whole piece or absent from all of it.
    """
    cuts = {start, stop}
    cuts.update(n for n in lengths if start < n < stop)
    ordered = sorted(cuts)
    out: list[Segment] = []
    for a, b in itertools.pairwise(ordered):
        live = tuple(i for i, n in enumerate(lengths) if n >= b)
        out.append((a, b, live))
    return out


def split_range(length: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, length) into at most ``parts`` contiguous, page-aligned pieces.

    No more pieces than ``length // MIN_SPLIT_BYTES``: small ranges stay whole.
    """
    parts = min(parts, length // MIN_SPLIT_BYTES)
    if parts <= 1:
        return [(0, length)]
    step = -(-length // parts)
    step = -(-step // _SPLIT_ALIGN) * _SPLIT_ALIGN
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(2, min(8, os.cpu_count() or 2))
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="coding")
        return _pool


def run_split(work: Callable[[int, int], None], length: int, threads: int) -> None:
    """Run ``work(start, stop)`` over [0, length), on up to ``threads`` threads.

    With ``threads == 1`` (the default everywhere) this is a plain call on the
    caller's thread. Otherwise the pieces run on a shared pool; the work must
    release the GIL (ISA-L through ctypes and large numpy ufuncs do) to gain
    anything. The first exception raised by a piece is re-raised here after
    every piece has finished, so no piece is still writing when the caller
    sees the error.
    """
    pieces = split_range(length, threads) if threads > 1 else [(0, length)]
    if len(pieces) == 1:
        work(*pieces[0])
        return
    pool = _executor()
    futures = [pool.submit(work, a, b) for a, b in pieces]
    errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
