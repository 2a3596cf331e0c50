"""The coordinator's event log and the metrics it feeds.

Events (failures, rebuilds, commits, errors) are what ``snapstore status``,
the REST server and tests read to learn what the store did and when;
counters and latency histograms are kept from them for Prometheus.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

__all__ = ["EVENT_KINDS", "EventKind", "EventLog", "Metrics"]

logger = logging.getLogger(__name__)

EventKind = Literal[
    "commit",
    "coordinator_recovered",
    "elastic",
    "error",
    "fallback",
    "groups",
    "incarnation",
    "job_dropped",
    "memory_dropped",
    "node_back",
    "node_dead",
    "node_joined",
    "node_lost",
    "node_silent",
    "persist_failed",
    "persisted",
    "persisted_corrupt",
    "readopted",
    "rebuild",
    "repaired",
    "reprotected",
    "restore",
    "restored",
    "save_failed",
    "smp_deployed",
    "smp_restarted",
    "unprotected",
    "unrecoverable",
]
"""Every kind of event the store logs (the REST API's ``kind`` filter accepts these)."""
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)

_WARN = frozenset(
    {"error", "save_failed", "node_dead", "node_lost", "unrecoverable", "persist_failed"}
)

# Latency histograms kept from events: event kind -> (field, metric name).
_TIMED = {
    "commit": ("latency", "commit_seconds"),
    "restore": ("seconds", "restore_seconds"),
    "rebuild": ("duration", "rebuild_seconds"),
    "reprotected": ("duration", "reprotect_seconds"),
    "node_dead": ("detection_latency", "detection_seconds"),
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

    def __init__(self, maxlen: int = 2000, wall: Callable[[], float] = time.time) -> None:
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._seq = 0
        self._wall = wall
        self.metrics = Metrics()

    def add(self, kind: EventKind, message: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        ev = {"seq": self._seq, "time": self._wall(), "kind": kind, "message": message}
        ev.update({k: v for k, v in fields.items() if v is not None})
        self._events.append(ev)
        self.metrics.on_event(ev)
        level = logging.WARNING if kind in _WARN else logging.INFO
        if logger.isEnabledFor(level):
            extra = {k: fields[k] for k in ("job", "step", "node") if fields.get(k) is not None}
            logger.log(level, "%s: %s", kind, message, extra={"event": kind, **extra})
        return ev

    def recent(
        self, limit: int = 200, kinds: Iterable[str] | None = None, job: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` events, of ``kinds`` and about ``job`` when given."""
        want = set(kinds) if kinds else None
        out = [
            e
            for e in self._events
            if (want is None or e["kind"] in want) and (job is None or e.get("job") == job)
        ]
        return out[-limit:]
