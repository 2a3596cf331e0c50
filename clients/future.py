"""The future of one saved step: staged, then committed (or failed, or skipped).

:class:`snapstore.clients.Client` creates one per ``save`` and resolves it from its
threads: the copier marks it staged, the follower resolves it when the
coordinator answers for the step.
"""

from __future__ import annotations

import threading
from typing import Any

from snapstore.errors import RestoreRequiredError, SaveFailedError, StoreTimeoutError

__all__ = ["DEFAULT_TIMEOUT", "SaveFuture"]

DEFAULT_TIMEOUT = 120.0
"""Seconds a client call waits unless told otherwise."""


class SaveFuture:
    """The commit of one saved step.

    ``result(timeout)`` waits until the step is committed and returns it, or
    raises SaveFailedError (the step will never commit; the previous one is
    intact), StoreTimeoutError, MemoryBudgetError (the node refused the
    staging for room), or ActorUnavailableError (this node's SMP died with
    the step in flight; a restarted SMP fails the steps in flight, and the
    next save goes to it). ``stats`` says what the save moved.
    """

    def __init__(self, job: str, step: int, skipped: bool = False) -> None:
        self.job = job
        self.step = step
        self.skipped = skipped
        self.staging = ""
        """``<client session>/<save number>``: how the store tells this staging apart."""
        self.stats: dict[str, Any] = {}
        self._staged = threading.Event()
        self._done = threading.Event()
        self._ready_next = threading.Event()
        self._error: BaseException | None = None
        self._outcome: dict[str, Any] | None = None
        if skipped:
            self._outcome = {"status": "skipped"}
            for e in (self._staged, self._done, self._ready_next):
                e.set()

    def staged(self) -> bool:
        """Whether the staging copy is done (always true for a synchronous save)."""
        return self._staged.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        if not self._done.wait(timeout):
            raise StoreTimeoutError(
                f"job {self.job!r} step {self.step} not committed within {timeout} s"
            )
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        if self._outcome["status"] == "skipped":
            raise SaveFailedError(
                f"job {self.job!r} step {self.step} was skipped: the previous save was "
                "still committing (policy 'skip')"
            )
        if self._outcome["status"] != "committed" and self._outcome.get("restore"):
            raise RestoreRequiredError(
                f"job {self.job!r} step {self.step} was not committed: "
                f"{self._outcome.get('reason', '')}; restore before saving again"
            )
        if self._outcome["status"] != "committed":
            raise SaveFailedError(
                f"job {self.job!r} step {self.step} was not committed: "
                f"{self._outcome.get('reason', self._outcome['status'])}; "
                "the previous committed step is intact"
            )
        return self.step

    # -- set by the client's threads --

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._staged.set()
        self._done.set()
        self._ready_next.set()

    def _resolve(self, outcome: dict[str, Any]) -> None:
        self._outcome = outcome
        self._done.set()
