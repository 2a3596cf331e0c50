"""The server's only link to the store: a thread that polls the coordinator's snapshot.

Call protocol:

1. ``__main__`` builds a :class:`CoordinatorSource` (Ray connected on the main
   thread) and a :class:`Poller` over it, calls :meth:`Poller.start`, and
   may wait for the first snapshot with :meth:`Poller.wait_first`.
2. The poller's thread calls :meth:`SnapshotSource.fetch` every
   ``interval`` seconds, each call bounded by ``timeout``; it derives the
   endpoints' data (:func:`snapstore.server.views.build_view`) and swaps the new
   :class:`PollState` in with one assignment.
3. Request handlers, on the event loop, only call :meth:`Poller.state`: it
   never blocks and never reaches the store, so no request waits on the
   coordinator, an SMP or a save. When fetches fail the last good view stays
   and its age grows; ``/healthz`` turns 503 once it is older than
   ``stale_after``.
4. :meth:`Poller.stop` ends the thread (on server shutdown).

Tests drive a Poller over a fake source with :meth:`Poller.poll_once`,
without the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from snapstore.server.views import View, build_view

__all__ = ["CoordinatorSource", "PollState", "Poller", "SnapshotSource"]

logger = logging.getLogger(__name__)

EVENTS_KEPT = 500  # events asked for per poll: the most /v1/events can return


class SnapshotSource(Protocol):
    """Where snapshots come from; called from the poller's thread only."""

    def fetch(self, events: int, timeout: float) -> dict[str, Any]:
        """The coordinator's snapshot with its last ``events`` events; raise on failure."""
        ...


class CoordinatorSource:
    """Snapshots from the store's coordinator actor, through Ray.

    The actor handle is looked up once and again after a failure (the
    coordinator may have restarted, or the store gone).
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self._handle: Any = None

    def fetch(self, events: int, timeout: float) -> dict[str, Any]:
        from snapstore.rpc import call

        if self._handle is None:
            self._handle = self.store.coordinator()
        try:
            return dict(call(self._handle.snapshot.remote(events), timeout, "coordinator.snapshot"))
        except Exception:
            self._handle = None
            raise


@dataclass(frozen=True)
class PollState:
    """What the poller last saw. ``view`` is the last good one (None before any)."""

    view: View | None
    fetched_at: float | None  # monotonic time the view was fetched
    ok: bool  # the last poll succeeded
    last_error: str | None
    polls: int
    failures: int  # consecutive failed polls


class Poller:
    """Keeps the last snapshot of the store; see the module docstring for the protocol."""

    def __init__(
        self,
        source: SnapshotSource,
        interval: float = 1.0,
        timeout: float = 2.0,
        stale_after: float = 5.0,
        events: int = EVENTS_KEPT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.interval = interval
        self.timeout = timeout
        self.stale_after = stale_after
        self.events = events
        self.clock = clock
        self._state = PollState(None, None, False, "no snapshot taken yet", 0, 0)
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread: threading.Thread | None = None

    def state(self) -> PollState:
        """The current state; never blocks (one attribute read)."""
        return self._state

    def age(self, state: PollState | None = None) -> float | None:
        """Seconds since the last good snapshot was fetched; None if there is none."""
        st = state or self._state
        return None if st.fetched_at is None else max(0.0, self.clock() - st.fetched_at)

    def fresh(self, state: PollState | None = None) -> bool:
        age = self.age(state)
        return age is not None and age <= self.stale_after

    def poll_once(self) -> bool:
        """Fetch one snapshot and publish it; False (state keeps the old view) on failure."""
        st = self._state
        try:
            snap = self.source.fetch(self.events, self.timeout)
            view = build_view(snap)
        except Exception as e:
            err = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            if st.ok or st.last_error != err:
                logger.warning("cannot get the coordinator's snapshot: %s", err)
            self._state = PollState(
                st.view, st.fetched_at, False, err, st.polls + 1, st.failures + 1
            )
            return False
        if not st.ok and st.polls:
            logger.info("coordinator snapshot available again")
        self._state = PollState(view, self.clock(), True, None, st.polls + 1, 0)
        self._first.set()
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="snapshot-poller", daemon=True)
        self._thread.start()

    def wait_first(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the first good snapshot; whether there is one."""
        return self._first.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = self.clock()
            try:
                self.poll_once()
            except Exception:  # poll_once catches fetch errors; this is a bug, keep polling
                logger.exception("snapshot poller failed")
            self._stop.wait(max(0.0, self.interval - (self.clock() - t0)))
