"""The coordinator's bookkeeping: nodes, jobs, events, and redundancy of committed steps.

Pure data and pure functions; the coordinator actor owns the instances and
publishes :func:`snapshot`-style dicts of them for ``status`` and REST.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from snapstore.control.placement import chunk_extents, chunk_length, data_stripe, stripe_members
from snapstore.format.record import RankEntry, StepRecord

__all__ = [
    "EventLog",
    "JobState",
    "Metrics",
    "NodeState",
    "Pending",
    "rank_restorable",
    "stripe_health",
]

# Node statuses.
ALIVE = "alive"
SUSPECT = "suspect"  # heartbeats missed for failure_timeout: not read from
LOST = "lost"  # declared lost: its data was (or is being) rebuilt elsewhere


@dataclass
class NodeState:
    """What the coordinator knows of one SMP and its node."""

    node_id: str
    info: dict[str, Any]
    incarnation: str
    handle: Any
    status: str = ALIVE
    last_beat: float = field(default_factory=time.monotonic)
    last_beat_wall: float = field(default_factory=time.time)
    joined_at: float = field(default_factory=time.time)
    silent_since: float | None = None  # wall time of the last heartbeat before silence
    detected_at: float | None = None  # wall time the silence was noticed

    def beat_age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.last_beat

    def summary(self) -> dict[str, Any]:
        peer = self.info.get("peer", {})
        return {
            "node_id": self.node_id,
            "address": peer.get("address"),
            "status": self.status,
            "alive": self.status == ALIVE,
            "heartbeat_age": round(self.beat_age(), 3),
            "incarnation": self.incarnation,
            "pid": self.info.get("pid"),
            "budget": self.info.get("budget", 0),
            "used": self.info.get("used", 0),
            "data_bytes": self.info.get("data_bytes", 0),
            "parity_bytes": self.info.get("parity_bytes", 0),
            "detected_at": self.detected_at,
            "silent_since": self.silent_since,
        }


@dataclass
class Pending:
    """A step some ranks have staged and that is not committed yet."""

    step: int
    world_size: int
    staged: dict[int, RankEntry] = field(default_factory=dict)
    deltas: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    committing: bool = False


@dataclass
class JobState:
    """One job: its committed record, steps in progress, and who waits for what."""

    name: str
    world_size: int
    committed: StepRecord | None = None
    pending: dict[int, Pending] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    waiters: dict[int, list[asyncio.Future[dict[str, Any]]]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    status: str = "none"
    status_detail: str = ""
    unrecoverable: dict[int, list[str]] = field(default_factory=dict)
    preferred_home: dict[int, str] = field(default_factory=dict)
    # Ranks of the committed step whose data was rebuilt onto another node
    # after their home was lost, until a new record version homes them there.
    relocated: dict[int, str] = field(default_factory=dict)
    data_ready: asyncio.Event = field(default_factory=asyncio.Event)
    commits: int = 0
    committed_stats: dict[str, Any] = field(default_factory=dict)
    last_commit_latency: float | None = None
    protected_at: float | None = None

    def resolve(self, step: int, reply: dict[str, Any]) -> None:
        """Wake everyone waiting for ``step`` or an earlier one."""
        for s in [s for s in self.waiters if s <= step]:
            for fut in self.waiters.pop(s):
                if not fut.done():
                    fut.set_result(reply)


# Latency histograms kept from events: event kind -> (field, metric name).
_TIMED = {
    "commit": ("latency", "commit_seconds"),
    "restore": ("seconds", "restore_seconds"),
    "rebuild": ("duration", "rebuild_seconds"),
    "reprotected": ("duration", "reprotect_seconds"),
    "node_silent": ("detection_latency", "detection_seconds"),
    "persisted": ("duration", "persist_seconds"),
}
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Cumulative counters and histograms, fed by events, kept while the coordinator lives."""

    def __init__(self) -> None:
        self.counters: dict[str, float] = collections.defaultdict(float)
        self.histograms: dict[str, dict[str, Any]] = {}

    def observe(self, name: str, value: float) -> None:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = {
                "buckets": list(_BUCKETS),
                "counts": [0] * len(_BUCKETS),
                "sum": 0.0,
                "count": 0,
            }
        for i, b in enumerate(h["buckets"]):
            if value <= b:
                h["counts"][i] += 1
        h["sum"] += value
        h["count"] += 1

    def on_event(self, ev: dict[str, Any]) -> None:
        self.counters[f"events_total:{ev['kind']}"] += 1
        if ev["kind"] in ("rebuild", "repaired") and isinstance(ev.get("bytes"), int):
            self.counters["rebuilt_bytes_total"] += ev["bytes"]
        if ev["kind"] == "persisted" and isinstance(ev.get("bytes"), int):
            self.counters["persisted_bytes_total"] += ev["bytes"]
        timed = _TIMED.get(ev["kind"])
        if timed is not None and isinstance(ev.get(timed[0]), (int, float)):
            self.observe(timed[1], float(ev[timed[0]]))

    def snapshot(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "histograms": {
                k: dict(v, counts=list(v["counts"])) for k, v in self.histograms.items()
            },
        }


class EventLog:
    """The recent events (failures, rebuilds, commits, errors), newest last."""

    def __init__(self, maxlen: int = 2000) -> None:
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._seq = 0
        self.metrics = Metrics()

    def add(self, kind: str, message: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        ev = {"seq": self._seq, "time": time.time(), "kind": kind, "message": message}
        ev.update({k: v for k, v in fields.items() if v is not None})
        self._events.append(ev)
        self.metrics.on_event(ev)
        return ev

    def recent(self, limit: int = 200, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        want = set(kinds) if kinds else None
        out = [e for e in self._events if want is None or e["kind"] in want]
        return out[-limit:]


def stripe_health(record: StepRecord, alive: set[str]) -> list[dict[str, Any]]:
    """Per stripe with data: how many of its chunks are lost and how many more it can lose."""
    out = []
    k, m = record.k, record.m
    by_stripe: dict[tuple[int, int], list[Any]] = collections.defaultdict(list)
    for p in record.parity:
        by_stripe[(p.group, p.stripe)].append(p)
    for (gi, s), parity in sorted(by_stripe.items()):
        group = record.groups[gi]
        members = stripe_members(group, s, k, m)
        holders = [
            (mb.index, mb.node)
            for mb in members[:k]
            if chunk_length(record.ranks, mb.node, mb.index, k) > 0
        ]
        holders += [(p.index, p.node) for p in parity]
        lost = [(i, n) for i, n in holders if n not in alive]
        status = "healthy" if not lost else ("degraded" if len(lost) <= m else "lost")
        out.append(
            {
                "group": gi,
                "stripe": s,
                "status": status,
                "lost": [{"index": i, "node": n} for i, n in lost],
                "can_lose": max(0, m - len(lost)),
                "length": max(p.length for p in parity),
            }
        )
    return out


def rank_restorable(record: StepRecord, rank: int, alive: set[str]) -> bool:
    """Whether ``rank``'s buffer can be read or rebuilt with the nodes in ``alive``.

    Exact, per byte range: for each of the rank's pieces, the other members
    of its stripe are counted as available when their node is alive or when
    they hold no bytes in the piece's range (their zeros are known).
    """
    entry = record.ranks[rank]
    if entry.node in alive:
        return True
    gi = record.group_of(entry.node)
    if gi is None:
        return False
    group = record.groups[gi]
    k, m = record.k, record.m
    parity = {(p.stripe, p.index): p for p in record.parity if p.group == gi}
    for j in range(k):
        mine = [e for e in chunk_extents(record.ranks, entry.node, j, k) if e.rank == rank]
        if not mine:
            continue
        lo, hi = mine[0].chunk_offset, mine[0].chunk_offset + mine[0].length
        s = data_stripe(group, entry.node, j)
        available = 0
        for mb in stripe_members(group, s, k, m):
            if mb.node == entry.node:
                continue
            if mb.index < k:
                has = any(
                    e.chunk_offset < hi and lo < e.chunk_offset + e.length
                    for e in chunk_extents(record.ranks, mb.node, mb.index, k)
                )
            else:
                p = parity.get((s, mb.index))
                has = p is not None and lo < p.length
            if mb.node in alive or not has:
                available += 1
        if available < k:
            return False
    return True
