"""A token bucket: how fast a node's SMP may write while it flushes steps to disk.

A flush runs beside training and must not take all of a node's disk or
network bandwidth (data loading, logging and the next flush share it). Each
SMP owns one :class:`TokenBucket`; every write of a flush takes tokens for
its bytes first, so all flushes of a node together stay under the rate.

Pure logic with an injectable clock and sleep: tested without a cluster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]

# Longest single sleep, so a waiting writer notices ``interrupt`` soon.
_MAX_NAP = 0.25


class TokenBucket:
    """At most ``rate`` bytes per second on average, with bursts up to ``burst`` bytes.

    ``rate`` 0 means unlimited. A request larger than the bucket is allowed:
    it borrows (the level goes negative) and it, and the takers after it,
    wait until the debt is paid, so the long-run rate holds for any chunk
    size. Thread-safe: concurrent takers share the one rate.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0 bytes/s (0 = unlimited), got {rate}")
        self.rate = float(rate)
        # A tenth of a second of writing by default: smooth, without a sleep per chunk.
        self.burst = float(burst) if burst is not None else max(self.rate / 10, 1 << 20)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._level = self.burst
        self._last = clock()

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def take(self, n: int, interrupt: Callable[[], bool] | None = None) -> float:
        """Consume ``n`` tokens, sleeping until the rate allows them; return seconds slept.

        ``interrupt``: polled between naps (at most every 0.25 s); when it
        returns True the wait ends early, the tokens stay taken, and the
        caller goes on (e.g. a flush told to hurry because training needs
        its memory).
        """
        if self.unlimited or n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._level = min(self.burst, self._level + (now - self._last) * self.rate)
            self._last = now
            self._level -= n
            wait = -self._level / self.rate if self._level < 0 else 0.0
        slept = 0.0
        while slept < wait:
            if interrupt is not None and interrupt():
                break
            nap = min(_MAX_NAP, wait - slept)
            self._sleep(nap)
            slept += nap
        return slept
