"""Controlling a job from Python: its latest step, recent events, and ending steps in flight.

No launcher needs this: torchrun, Ray Train and the Hugging Face Trainer
restart workers, and the store ends a failed incarnation's steps itself when
the restarted ranks restore. A controller of its own (a scheduler, a
notebook, a test) may still want to::

    from snapstore.clients import JobControl

    job = JobControl("gpt")
    job.latest()                       # the last committed step, or None
    job.abort_pending("preempting")    # end the steps in flight now; their waiters hear why
    for e in job.events(20):           # what the store did for this job
        print(e["kind"], e["message"])
    job.info()["phase"]                # "active", or "restoring" while ranks restore

Every call waits at most ``timeout`` seconds.
"""

from __future__ import annotations

from typing import Any

from snapstore.config import check_job_name
from snapstore.control.handle import Store, connect
from snapstore.errors import SnapshotNotFoundError

__all__ = ["JobControl"]


class JobControl:
    """One job of the running store (found through its state file, or ``store``)."""

    def __init__(self, job: str, *, store: Store | None = None, rundir: str | None = None) -> None:
        self.job = check_job_name(job)
        self.store = store or connect(rundir)

    def latest(self, timeout: float = 30.0) -> int | None:
        """The job's last committed step, or None."""
        step = self.store.call("latest", self.job, timeout=timeout)
        return None if step is None else int(step)

    def info(self, events: int = 50, timeout: float = 30.0) -> dict[str, Any]:
        """The job as the coordinator sees it: ``latest_step``, ``phase`` (active,
        restoring...), ``incarnation``, ``status`` (protected, degraded...), ``pending``
        steps, the persisted steps, and its last ``events``. SnapshotNotFoundError when
        the store has never heard of the job."""
        got = self.store.call("job_info", self.job, events, timeout=timeout)
        if got is None:
            raise SnapshotNotFoundError(f"the store knows no job {self.job!r}")
        return dict(got)

    def events(
        self, limit: int = 50, kinds: list[str] | None = None, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """The job's most recent events, oldest first (optionally of some ``kinds``)."""
        evs = self.info(events=max(limit * 4, limit), timeout=timeout)["events"]
        if kinds:
            evs = [e for e in evs if e["kind"] in set(kinds)]
        return list(evs[-limit:])

    def abort_pending(self, reason: str, timeout: float = 30.0) -> list[int]:
        """End every step of the job in flight now; the steps ended.

        Ranks waiting for them get SaveFailedError with ``reason`` at once
        instead of waiting for a rank that is gone. A step past its commit
        point is not affected (it is committed).
        """
        if not reason.strip():
            raise ValueError("abort_pending needs a reason (the waiters are told it)")
        return [int(s) for s in self.store.call("abort_pending", self.job, reason, timeout=timeout)]

    def drop(self, timeout: float = 60.0) -> None:
        """Forget the job: its memory on every node is freed (persisted steps stay)."""
        self.store.call("drop_job", self.job, timeout=timeout)
