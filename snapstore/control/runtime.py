"""What the control plane runs on: a clock, and background tasks whose failures are seen.

Both are injected: the Ray actors use the real event loop and wall clock;
the deterministic simulation (``tests/sim``) runs the same code on a loop
whose time is virtual, so a schedule replays exactly from its seed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

__all__ = ["Clock", "LoopClock", "Tasks"]

logger = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds (the event loop's time: timeouts and sleeps use it)."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch, for events and records."""
        ...


class LoopClock:
    """The running event loop's time, and a wall clock that moves with it.

    Under the real loop ``wall`` is ``time.time()``; under the simulation's
    virtual loop it is a fixed epoch plus the loop's time, so it never
    depends on the machine running the simulation.
    """

    def __init__(self, wall_offset: float | None = None) -> None:
        self._offset = wall_offset

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        if self._offset is None:
            return time.time()
        return self._offset + asyncio.get_running_loop().time()


class Tasks:
    """Background tasks of one component: referenced until done, failures reported.

    A task that raises is logged with its traceback and handed to
    ``on_error(what, exception)`` (the coordinator records an ``error``
    event): no background failure goes unseen. Cancellation at shutdown is
    not a failure.
    """

    def __init__(self, on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self._tasks: dict[asyncio.Task[Any], str] = {}
        self._on_error = on_error
        self.failures = 0

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks[task] = what
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        what = self._tasks.pop(task, "task")
        if task.cancelled():
            return
        e = task.exception()
        if e is None:
            return
        self.failures += 1
        logger.error(
            "background %s failed: %s\n%s",
            what,
            e,
            "".join(traceback.format_exception(e)),
        )
        if self._on_error is not None:
            self._on_error(what, e)

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()
