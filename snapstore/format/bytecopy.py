"""Host-memory copies at memcpy speed, spread over a few threads.

Packing a snapshot and restoring one in place are many ``memmove`` calls
between host buffers whose addresses the format has already checked. This
module only runs them fast:

* ``ctypes.memmove`` releases the GIL, so helper threads copy in parallel
  and the trainer's other Python threads keep running.
* Not torch ``copy_``: it splits each copy over torch's intra-op threads and
  waits for all of them. On a busy host that wait costs milliseconds per
  tensor (a 1 MiB copy measured at 8 ms on two busy cores), more than the
  copy. Here, large copies are cut into chunks that idle threads pull from a
  shared counter, so a thread that is descheduled delays one chunk, not every
  tensor.

No torch import: the store's node actors may use it.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

__all__ = ["CHUNK", "copy_many"]

CHUNK = 4 << 20
"""Copies larger than this are split into pieces of this size for the helper threads."""

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _helpers() -> ThreadPoolExecutor:
    """The shared helper pool; a forked child, whose threads did not survive, gets its own.

    Threads start lazily, one per concurrently running helper, so the pool's
    ceiling costs nothing; callers bound their own parallelism.
    """
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max(os.cpu_count() or 1, 4), "snapstore-copy")
            _pool_pid = os.getpid()
        return _pool


def copy_many(copies: Sequence[tuple[int, int, int]], threads: int = 1) -> None:
    """``memmove(dst, src, n)`` for every ``(dst, src, n)``, on up to ``threads`` threads.

    The caller guarantees every range is valid, writable where written, and
    that destinations do not overlap sources or each other. Returns when all
    bytes are copied.
    """
    memmove = ctypes.memmove
    if threads <= 1:
        # Whole copies: glibc switches very large ones to non-temporal stores,
        # which a split into chunks would lose.
        for dst, src, n in copies:
            memmove(dst, src, n)
        return
    pieces: list[tuple[int, int, int]] = []
    small: list[tuple[int, int, int]] = []
    for dst, src, n in copies:
        if n <= CHUNK:
            small.append((dst, src, n))
            continue
        size = max(CHUNK, -(-n // (4 * threads)))  # enough pieces to balance, no more
        for at in range(0, n, size):
            pieces.append((dst + at, src + at, min(size, n - at)))
    if len(pieces) < 2:
        for dst, src, n in itertools.chain(pieces, small):
            memmove(dst, src, n)
        return
    counter = itertools.count()
    total = len(pieces)

    def drain() -> None:
        # next() on a shared count is atomic under the GIL: each piece is taken once.
        while (i := next(counter)) < total:
            dst, src, n = pieces[i]
            memmove(dst, src, n)

    pool = _helpers()
    helpers = [pool.submit(drain) for _ in range(min(threads - 1, total - 1))]
    for dst, src, n in small:  # the calling thread takes the small copies first
        memmove(dst, src, n)
    drain()
    for helper in helpers:
        if not helper.cancel():  # a helper still queued has nothing left to do
            helper.result()
