"""A deterministic asyncio event loop on virtual time, and simulated processes.

Used by the control plane's simulation (``tests/sim``) and by ``bench.scale``.

The loop never sleeps: when nothing is ready, its selector advances the
virtual clock to the next timer. Every callback runs in the context of the
simulated process (:class:`Proc`) that scheduled it, so a process can be

- *crashed*: every task it owns is cancelled and its callbacks are dropped
  (an SMP's SIGKILL, a trainer's death, a lost node);
- *stalled*: its callbacks are held until the stall ends (SIGSTOP, a CPU
  hog): nothing it runs makes progress, messages to it wait.

Given the same seed and the same code, a schedule runs the same callbacks in
the same order at the same virtual times: a failing seed replays exactly
(with ``PYTHONHASHSEED=0``, which ``python -m tests.sim`` sets for itself).

CPU accounting (off by default; ``bench.scale`` turns it on for one process):
a process with ``accounted`` set adds the real CPU time
(``time.process_time``) of each of its callbacks to ``cpu``; with ``charged``
set too, that time also passes for it on the virtual clock: its callbacks
run one after another, each starting when the one before it would have
finished on a single thread, so a busy process delays its own messages.
Charging makes a run depend on the machine's speed: benchmarks only, never
the simulation's schedules. :data:`CAUSE` splits a process's CPU by what
caused it (the message a task serves).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import selectors
import time
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["CAUSE", "PROC", "Proc", "SimLoop", "Stalled"]

PROC: contextvars.ContextVar[Proc | None] = contextvars.ContextVar("sim_proc", default=None)
CAUSE: contextvars.ContextVar[str] = contextvars.ContextVar("sim_cause", default="")
"""What an accounted callback's CPU is for (its process's ``cpu_by``): a task serving a
message sets it; tasks it starts inherit it."""


class Stalled(Exception):
    """The simulation has nothing left to run (every process waits on something that
    never comes)."""


class Proc:
    """One simulated process: its tasks, and whether it is alive or stalled."""

    def __init__(self, loop: SimLoop, name: str) -> None:
        self.loop = loop
        self.name = name
        self.alive = True
        self.stalled_until = 0.0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.on_crash: list[Callable[[], None]] = []
        self.accounted = False
        """Count the CPU time of this process's callbacks in :attr:`cpu`."""
        self.charged = False
        """With ``accounted``: each callback keeps it busy for as long as it computed."""
        self.cpu = 0.0
        self.cpu_by: dict[str, float] = {}
        """``cpu`` by the :data:`CAUSE` of each callback."""
        self.callbacks = 0
        self.busy_until = 0.0
        self.queue: collections.deque[tuple[Callable[..., Any], tuple[Any, ...], Any]] = (
            collections.deque()
        )
        self.draining = False
        self.ctx = contextvars.copy_context()
        self.ctx.run(PROC.set, self)

    def __repr__(self) -> str:
        return f"Proc({self.name})"

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start a coroutine as a task of this process."""
        return self.loop.create_task(coro, context=self.ctx.copy())

    def crash(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for task in list(self.tasks):
            task.cancel()
        for fn in self.on_crash:
            fn()

    def stall(self, until: float) -> None:
        self.stalled_until = max(self.stalled_until, until)
        self.loop.stalls_until = max(self.loop.stalls_until, until)

    @property
    def stalled(self) -> bool:
        return self.stalled_until > self.loop.time()


class _Selector(selectors.BaseSelector):
    """Registers file objects (the loop's self-pipe) and, on select, advances time."""

    def __init__(self, loop: SimLoop) -> None:
        self._loop = loop
        self._map: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._map.pop(fd)

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise Stalled("no task is ready and no timer is set")
        if timeout > 0:
            self._loop.advance(timeout)
        return []

    def get_map(self) -> Any:
        return self._map

    def close(self) -> None:
        self._map.clear()


class SimLoop(asyncio.SelectorEventLoop):
    """An event loop whose time is virtual; see the module docstring."""

    def __init__(self) -> None:
        self._now = 0.0
        self.stalls_until = 0.0
        """Until then some process is stalled and callbacks are gated (else they run as is)."""
        super().__init__(_Selector(self))
        self.set_task_factory(self._task)
        self.steps = 0
        self.accounting = False
        """Some process is ``accounted``: callbacks look up their process (see the module
        docstring). Off, the loop costs nothing extra."""

    def time(self) -> float:
        return self._now

    def advance(self, dt: float) -> None:
        self._now += dt

    def _task(self, loop: Any, coro: Any, context: Any = None) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, context=context)
        proc = (context if context is not None else contextvars.copy_context()).get(PROC)
        if proc is not None:
            if not proc.alive:
                task.cancel()
            proc.tasks.add(task)
            task.add_done_callback(proc.tasks.discard)
        return task

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., Any], *args: Any, context: Any = None
    ) -> asyncio.Handle:
        if self.stalls_until <= self._now and not self.accounting:
            return super().call_soon(callback, *args, context=context)
        ctx = context if context is not None else contextvars.copy_context()
        proc = ctx.get(PROC)
        if proc is None:
            return super().call_soon(callback, *args, context=ctx)
        if self.stalls_until <= self._now:
            if not proc.accounted:
                return super().call_soon(callback, *args, context=ctx)
            return super().call_soon(self._timed, proc, callback, args, ctx, context=ctx)
        return super().call_soon(self._gated, proc, callback, args, ctx, context=ctx)

    def _timed(
        self, proc: Proc, callback: Callable[..., Any], args: tuple[Any, ...], context: Any
    ) -> None:
        """Run a callback of an accounted process now, or, if it is charged and still busy
        computing, after the callbacks it queued before (one at a time, as one thread)."""
        if proc.charged and proc.alive and (proc.busy_until > self._now or proc.queue):
            proc.queue.append((callback, args, context))
            self._drain_later(proc)
            return
        self._account(proc, callback, args)

    def _account(self, proc: Proc, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        t0 = time.process_time()
        try:
            callback(*args)
        finally:
            dt = time.process_time() - t0
            proc.cpu += dt
            cause = CAUSE.get()
            proc.cpu_by[cause] = proc.cpu_by.get(cause, 0.0) + dt
            proc.callbacks += 1
            if proc.charged:
                proc.busy_until = max(self._now, proc.busy_until) + dt

    def _drain_later(self, proc: Proc) -> None:
        if not proc.draining:
            proc.draining = True
            super().call_at(proc.busy_until, self._drain, proc)

    def _drain(self, proc: Proc) -> None:
        """The charged process is free: run the next callback it queued."""
        proc.draining = False
        if not proc.queue:
            return
        if proc.alive and proc.busy_until > self._now:
            self._drain_later(proc)
            return
        callback, args, context = proc.queue.popleft()
        context.run(self._account, proc, callback, args)
        if proc.queue:
            self._drain_later(proc)

    def _gated(
        self, proc: Proc, callback: Callable[..., Any], args: tuple[Any, ...], context: Any
    ) -> None:
        """Run a callback of ``proc`` now, or when its stall ends.

        A crashed process's callbacks still run: its tasks were cancelled and
        must unwind (new tasks it creates are cancelled at birth).
        """
        if proc.alive and proc.stalled:
            super().call_at(
                proc.stalled_until, self._gated, proc, callback, args, context, context=context
            )
            return
        self.steps += 1
        if proc.accounted:
            self._timed(proc, callback, args, context)
        else:
            callback(*args)
