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
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["PROC", "Proc", "SimLoop", "Stalled"]

PROC: contextvars.ContextVar[Proc | None] = contextvars.ContextVar("sim_proc", default=None)


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
        if self.stalls_until <= self._now:
            return super().call_soon(callback, *args, context=context)
        proc = (context if context is not None else contextvars.copy_context()).get(PROC)
        if proc is None:
            return super().call_soon(callback, *args, context=context)
        return super().call_soon(self._gated, proc, callback, args, context, context=context)

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
        callback(*args)
