"""What ``wait_commit`` answers, whether a rank asks before or after the commit.

Ranks of one step ask the coordinator at different times; one whose question
arrives after the commit must get the same answer, stats included, as one
that was already waiting (a rank once saw ``stats`` empty when it was late).
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

from snapstore.control import commit
from snapstore.control.state import JobState, Pending


def _coord(js: JobState) -> Any:
    return types.SimpleNamespace(jobs={js.name: js})


def test_late_and_waiting_ranks_get_the_same_stats() -> None:
    async def run() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        js = JobState("j", world_size=2)
        js.pending[4] = Pending(step=4, world_size=2)
        coord = _coord(js)
        early = asyncio.create_task(commit.wait_commit(coord, "j", 4, 5.0))
        await asyncio.sleep(0)
        stats = {"delta": True, "peer_bytes": 123}
        js.pending.pop(4)
        js.committed = types.SimpleNamespace(step=4)  # type: ignore[assignment]
        js.committed_stats = stats
        js.resolve(4, {"status": "committed", "step": 4, "stats": stats})
        late = await commit.wait_commit(coord, "j", 4, 5.0)
        older = await commit.wait_commit(coord, "j", 3, 5.0)
        return await early, late, older

    early, late, older = asyncio.run(run())
    assert (
        early
        == late
        == {"status": "committed", "step": 4, "stats": {"delta": True, "peer_bytes": 123}}
    )
    # An older step is covered by the newer commit, but its stats are not these.
    assert older == {"status": "committed", "step": 4, "stats": {}}


def test_pending_and_unknown_steps() -> None:
    async def run() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        js = JobState("j", world_size=2)
        js.pending[1] = Pending(step=1, world_size=2)
        js.failed[2] = "rank 1 lost"
        coord = _coord(js)
        pending = await commit.wait_commit(coord, "j", 1, 0.01)
        failed = await commit.wait_commit(coord, "j", 2, 0.01)
        nojob = await commit.wait_commit(coord, "nope", 1, 0.01)
        return pending, failed, nojob

    pending, failed, nojob = asyncio.run(run())
    assert pending == {"status": "pending", "staged_ranks": [], "world_size": 2}
    assert failed == {"status": "failed", "reason": "rank 1 lost", "step": 2}
    assert nojob["status"] == "unknown" and "'nope'" in nojob["reason"]
