"""``/metrics``: the cached snapshot in Prometheus text format, through prometheus-client.

A custom collector reads the poller's current state at scrape time; nothing
is registered globally and nothing is counted here: counters and histograms
are the coordinator's (kept from its events since it started, so they reset
when it restarts, which Prometheus' ``rate()`` handles as a counter reset).

Metric families (labels in braces):

- ``snapstore_up`` 1 when the snapshot is fresh; ``snapstore_snapshot_age_seconds``.
- ``snapstore_saves_total``, ``snapstore_save_failures_total``,
  ``snapstore_restores_total``; ``snapstore_commit_seconds``,
  ``snapstore_restore_seconds``, ``snapstore_rebuild_seconds``,
  ``snapstore_reprotect_seconds``, ``snapstore_failure_detection_seconds``
  (histograms); ``snapstore_events_total{kind}``, ``snapstore_rebuilt_bytes_total``.
- ``snapstore_save_waits_total``, ``snapstore_save_wait_seconds_total``: saves
  that waited for a free slot (backpressure), as clients report them to the
  coordinator; 0 until it publishes them.
- Per node ``{node}``: ``snapstore_node_up``, ``snapstore_node_heartbeat_age_seconds``,
  ``snapstore_node_used_bytes``, ``snapstore_node_budget_bytes``,
  ``snapstore_node_staged_bytes`` (data slots, committed and in progress),
  ``snapstore_node_parity_bytes``; totals ``snapstore_staged_bytes``,
  ``snapstore_parity_bytes``; ``snapstore_nodes{status}``.
- Per job ``{job}``: ``snapstore_job_latest_step``, ``snapstore_job_protected``,
  ``snapstore_job_status{job,status}`` (1 for the current status),
  ``snapstore_job_committed_bytes``, ``snapstore_job_parity_bytes``,
  ``snapstore_job_pending_steps``, ``snapstore_job_can_lose``,
  ``snapstore_degraded_stripes``, ``snapstore_lost_stripes``; total
  ``snapstore_committed_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from snapstore.server.poller import Poller
from snapstore.server.views import View

__all__ = ["CONTENT_TYPE", "SnapshotCollector", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# coordinator histogram name -> (metric name, help)
_HISTOGRAMS = {
    "commit_seconds": (
        "snapstore_commit_seconds",
        "Seconds from a step's first staged rank to its commit (data and parity in memory).",
    ),
    "restore_seconds": ("snapstore_restore_seconds", "Seconds a rank's restore took."),
    "rebuild_seconds": (
        "snapstore_rebuild_seconds",
        "Seconds to rebuild a node's chunks from its stripe group.",
    ),
    "reprotect_seconds": (
        "snapstore_reprotect_seconds",
        "Seconds to re-protect a job's committed step after a node loss.",
    ),
    "detection_seconds": (
        "snapstore_failure_detection_seconds",
        "Seconds from a node's last heartbeat to the coordinator noticing its silence.",
    ),
    "persist_seconds": (
        "snapstore_persist_seconds",
        "Seconds a flush of a committed step to the persist directory took.",
    ),
}
_JOB_STATUSES = ("protected", "degraded", "unprotected", "lost", "none")
_NODE_STATUSES = ("alive", "suspect", "dead", "lost")


class SnapshotCollector(Collector):
    """Prometheus collector over a :class:`Poller`'s cached snapshot."""

    def __init__(self, poller: Poller) -> None:
        self.poller = poller

    def collect(self) -> Iterator[Metric]:
        st = self.poller.state()
        up = GaugeMetricFamily(
            "snapstore_up", "1 when the server has a fresh coordinator snapshot."
        )
        up.add_metric([], 1.0 if self.poller.fresh(st) else 0.0)
        yield up
        age = self.poller.age(st)
        g = GaugeMetricFamily(
            "snapstore_snapshot_age_seconds",
            "Seconds since the server last got the coordinator's snapshot.",
        )
        g.add_metric([], math.nan if age is None else age)
        yield g
        if st.view is None:
            return
        snap = st.view.snapshot
        yield from _counters(snap.get("metrics") or {})
        yield from _histograms(snap.get("metrics") or {})
        yield from _nodes(snap)
        yield from _jobs(st.view)


def _counters(metrics: Mapping[str, Any]) -> Iterator[Metric]:
    counters: Mapping[str, float] = metrics.get("counters") or {}

    def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc)
        c.add_metric([], float(counters.get(key, 0)))
        return c

    yield counter(
        "snapstore_saves", "Steps committed (all ranks of a job saved).", "events_total:commit"
    )
    yield counter(
        "snapstore_save_failures", "Steps aborted before their commit.", "events_total:save_failed"
    )
    yield counter("snapstore_restores", "Rank restores served.", "events_total:restore")
    yield counter(
        "snapstore_relay_batches",
        "Batches of leaders' reports and beats the coordinator took from relays.",
        "relay_batches_total",
    )
    yield counter(
        "snapstore_relayed_messages",
        "Reports and beats that reached the coordinator in relays' batches.",
        "relayed_messages_total",
    )
    yield counter(
        "snapstore_relay_down_batches",
        "Batches of prepare orders and decisions the coordinator sent to relays.",
        "relay_down_batches_total",
    )
    yield counter(
        "snapstore_relayed_down_messages",
        "Orders and decisions for leaders that went out in relays' batches.",
        "relayed_down_messages_total",
    )
    yield counter(
        "snapstore_channel_calls",
        "Nodes' calls the coordinator took over its control channel rather than through Ray.",
        "channel_calls_total",
    )
    yield counter(
        "snapstore_early_commits",
        "Steps committed from slices their groups' leaders prepared without a prepare order.",
        "early_commits_total",
    )
    yield counter(
        "snapstore_rebuilt_bytes",
        "Bytes rebuilt from stripe groups (lost nodes, corrupt chunks).",
        "rebuilt_bytes_total",
    )
    yield counter(
        "snapstore_persisted_steps",
        "Steps flushed to the persist directory (complete on disk).",
        "events_total:persisted",
    )
    yield counter(
        "snapstore_persist_failures",
        "Flushes to the persist directory that failed (the previous persisted step is intact).",
        "events_total:persist_failed",
    )
    yield counter(
        "snapstore_persisted_bytes",
        "Bytes flushed to the persist directory.",
        "persisted_bytes_total",
    )
    yield counter(
        "snapstore_disk_fallbacks",
        "Jobs restored from a persisted step because memory could not serve them.",
        "events_total:fallback",
    )
    yield counter(
        "snapstore_save_waits",
        "Saves that waited for a free staging slot (backpressure).",
        "save_waits_total",
    )
    yield counter(
        "snapstore_save_wait_seconds",
        "Seconds saves spent waiting for a free staging slot (backpressure).",
        "save_wait_seconds_total",
    )
    events = CounterMetricFamily("snapstore_events", "Coordinator events by kind.", labels=["kind"])
    for key, value in sorted(counters.items()):
        if key.startswith("events_total:"):
            events.add_metric([key.split(":", 1)[1]], float(value))
    yield events


def _histograms(metrics: Mapping[str, Any]) -> Iterator[Metric]:
    hists: Mapping[str, Any] = metrics.get("histograms") or {}
    for key, (name, doc) in _HISTOGRAMS.items():
        h = hists.get(key)
        if h is None:
            buckets: list[tuple[str, float]] = [("+Inf", 0.0)]
            total = 0.0
        else:
            # The coordinator's counts are already cumulative per upper bound.
            buckets = [(_le(b), float(c)) for b, c in zip(h["buckets"], h["counts"], strict=True)]
            buckets.append(("+Inf", float(h["count"])))
            total = float(h["sum"])
        yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


def _le(bound: float) -> str:
    return repr(float(bound))


def _nodes(snap: Mapping[str, Any]) -> Iterator[Metric]:
    labels = ["node"]
    fams = {
        "up": GaugeMetricFamily(
            "snapstore_node_up", "1 while the node's SMP heartbeats.", labels=labels
        ),
        "heartbeat_age": GaugeMetricFamily(
            "snapstore_node_heartbeat_age_seconds",
            "Seconds since the node's SMP last heartbeated, at snapshot time.",
            labels=labels,
        ),
        "used": GaugeMetricFamily(
            "snapstore_node_used_bytes", "Shared memory the SMP holds.", labels=labels
        ),
        "budget": GaugeMetricFamily(
            "snapstore_node_budget_bytes", "The SMP's memory budget.", labels=labels
        ),
        "data_bytes": GaugeMetricFamily(
            "snapstore_node_staged_bytes",
            "Bytes of staged data slots on the node (committed and in progress).",
            labels=labels,
        ),
        "parity_bytes": GaugeMetricFamily(
            "snapstore_node_parity_bytes", "Bytes of parity on the node.", labels=labels
        ),
    }
    by_status = dict.fromkeys(_NODE_STATUSES, 0)
    staged = parity = 0
    for n in snap.get("nodes", []):
        lv = [str(n["node_id"])]
        fams["up"].add_metric(lv, 1.0 if n.get("alive") else 0.0)
        for key in ("heartbeat_age", "used", "budget", "data_bytes", "parity_bytes"):
            fams[key].add_metric(lv, float(n.get(key) or 0))
        by_status[n["status"]] = by_status.get(n["status"], 0) + 1
        staged += int(n.get("data_bytes") or 0)
        parity += int(n.get("parity_bytes") or 0)
    yield from fams.values()
    count = GaugeMetricFamily("snapstore_nodes", "Store nodes by status.", labels=["status"])
    for status, c in by_status.items():
        count.add_metric([status], float(c))
    yield count
    yield _gauge("snapstore_staged_bytes", "Bytes of staged data slots on all nodes.", staged)
    yield _gauge("snapstore_parity_bytes", "Bytes of parity on all nodes.", parity)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], float(value))
    return g


def _jobs(view: View) -> Iterator[Metric]:
    labels = ["job"]

    def fam(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=labels)

    latest = fam("snapstore_job_latest_step", "The job's last committed step.")
    protected = fam("snapstore_job_protected", "1 when the job's committed step is protected.")
    status = GaugeMetricFamily(
        "snapstore_job_status",
        "1 for the job's current redundancy status.",
        labels=["job", "status"],
    )
    committed = fam("snapstore_job_committed_bytes", "Data bytes of the job's committed step.")
    parity = fam("snapstore_job_parity_bytes", "Parity bytes of the job's committed step.")
    pending = fam("snapstore_job_pending_steps", "Steps of the job staged and not committed yet.")
    can_lose = fam("snapstore_job_can_lose", "Node losses the job's committed step survives now.")
    degraded = fam("snapstore_degraded_stripes", "Stripes that lost chunks and can be rebuilt.")
    lost = fam("snapstore_lost_stripes", "Stripes that lost more chunks than they have parity.")
    total_committed = 0
    for name, jv in sorted(view.jobs.items()):
        job = jv.job
        lv = [name]
        protected.add_metric(lv, 1.0 if job.status == "protected" else 0.0)
        for s in _JOB_STATUSES:
            status.add_metric([name, s], 1.0 if job.status == s else 0.0)
        pending.add_metric(lv, float(len(job.pending_steps)))
        if jv.committed is None:
            continue
        c = jv.committed
        total_committed += c["data_bytes"]
        latest.add_metric(lv, float(c["step"]))
        committed.add_metric(lv, float(c["data_bytes"]))
        parity.add_metric(lv, float(c["parity_bytes"]))
        can_lose.add_metric(lv, float(c["redundancy"].can_lose))
        degraded.add_metric(lv, float(c["redundancy"].degraded))
        lost.add_metric(lv, float(c["redundancy"].lost))
    yield from (latest, protected, status, committed, parity, pending, can_lose, degraded, lost)
    yield _gauge(
        "snapstore_committed_bytes", "Data bytes of every job's committed step.", total_committed
    )


def render(poller: Poller) -> bytes:
    """The Prometheus text exposition of ``poller``'s current snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(poller))
    return generate_latest(registry)
