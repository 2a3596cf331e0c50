"""Bugs planted on purpose, to show the simulation finds them.

- ``commit-after-abort``: the commit skips its abort check -- a step failed
  while its groups prepared is committed anyway when their reports arrive
  (the race issue 11 found in the old coordinator: waiters told "failed",
  yet the step committed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PLANTS", "plant"]


def _commit_after_abort() -> Callable[[], None]:
    from snapstore.control import commit as commit_mod
    from snapstore.control.states import StepLife, StepPhase

    orig_commit = StepLife.commit
    orig_fail = commit_mod.Commits.fail
    orig_prepared = commit_mod.Commits._prepared

    def commit(self: StepLife) -> None:
        self.phase = StepPhase.COMMITTED  # no check of the phase it was in

    def fail(self: Any, job: Any, att: Any, reason: str) -> bool:
        ok = orig_fail(self, job, att, reason)
        if ok:
            job.attempts.setdefault(att.step, att)  # still found by late reports
        return ok

    def prepared(self: Any, r: Any) -> None:
        job = self.plane.jobs.get(r.job)
        att = job.attempts.get(r.step) if job is not None else None
        if att is not None and att.life.phase is StepPhase.FAILED:
            att.life.phase = StepPhase.PREPARING  # the abort check skipped
        orig_prepared(self, r)

    StepLife.commit = commit  # type: ignore[method-assign]
    commit_mod.Commits.fail = fail  # type: ignore[method-assign]
    commit_mod.Commits._prepared = prepared  # type: ignore[method-assign]

    def undo() -> None:
        StepLife.commit = orig_commit  # type: ignore[method-assign]
        commit_mod.Commits.fail = orig_fail  # type: ignore[method-assign]
        commit_mod.Commits._prepared = orig_prepared  # type: ignore[method-assign]

    return undo


PLANTS: dict[str, Callable[[], Callable[[], None]]] = {
    "commit-after-abort": _commit_after_abort,
}


def plant(name: str) -> Callable[[], None]:
    """Plant bug ``name``; returns the function that removes it."""
    try:
        return PLANTS[name]()
    except KeyError:
        raise SystemExit(f"unknown bug {name!r}; known: {sorted(PLANTS)}") from None
