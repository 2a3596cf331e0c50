"""From the coordinator's snapshot dict to the API's models: pure functions, no I/O.

The coordinator publishes one dict (:meth:`snapstore.control.coordinator.Coordinator.snapshot`);
:func:`build_view` turns it, once per poll, into the parts every endpoint
serves, so a request only picks and wraps (see :mod:`snapstore.server.app`). A snapshot
this module cannot read raises :class:`SnapshotFormatError`; the poller then
keeps serving the previous view and reports the error in ``/healthz``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from snapstore.control.placement import stripe_members
from snapstore.server.models import (
    Event,
    Job,
    LastRestore,
    LostChunk,
    Node,
    PersistedStep,
    RankInfo,
    Redundancy,
    RestoreSource,
    Stripe,
    StripeMember,
)

__all__ = ["JobView", "SnapshotFormatError", "View", "build_view", "redundancy_of"]

logger = logging.getLogger(__name__)


class SnapshotFormatError(Exception):
    """The coordinator's snapshot lacks a field this server needs, or has the wrong type."""


@dataclass(frozen=True)
class JobView:
    """One job: its summary, and the detail of its committed step and steps in progress.

    ``committed`` and each ``in_progress`` and ``persisted`` value are keyword
    arguments for :class:`snapstore.server.models.SnapshotDetail` without the envelope fields.
    """

    job: Job
    committed: dict[str, Any] | None
    in_progress: dict[int, dict[str, Any]]
    persisted: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class View:
    """Everything the endpoints serve, derived from one snapshot."""

    snapshot: Mapping[str, Any]
    store_id: str
    time: float
    started_at: float | None
    nodes: list[Node]
    groups: list[list[str]]
    jobs: dict[str, JobView]
    events: list[Event]
    alive: frozenset[str] = field(default_factory=frozenset)


def build_view(snap: Mapping[str, Any]) -> View:
    """Derive every endpoint's data from ``snap``; raise SnapshotFormatError if malformed."""
    try:
        nodes = [_node(n) for n in snap["nodes"]]
        # Suspect nodes are silent but still read from (the coordinator's rule).
        alive = frozenset(n.node_id for n in nodes if n.status in ("alive", "suspect"))
        jobs = {}
        for j in snap["jobs"]:
            jv = _job(j, alive)
            jobs[jv.job.job] = jv
        return View(
            snapshot=snap,
            store_id=str(snap["store_id"]),
            time=float(snap["time"]),
            started_at=_opt_float(snap.get("started_at")),
            nodes=nodes,
            groups=[[str(n) for n in g] for g in snap.get("groups", [])],
            jobs=jobs,
            events=[_event(e) for e in snap.get("events", [])],
            alive=alive,
        )
    except (KeyError, TypeError, ValueError, IndexError, ValidationError) as e:
        raise SnapshotFormatError(
            f"the coordinator's snapshot is not in the form this server reads "
            f"({type(e).__name__}: {e}); is the server from the same snapstore version?"
        ) from e


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _node(n: Mapping[str, Any]) -> Node:
    return Node(
        node_id=n["node_id"],
        address=n.get("address"),
        status=n["status"],
        alive=bool(n["alive"]),
        heartbeat_age=float(n["heartbeat_age"]),
        incarnation=str(n.get("incarnation", "")),
        pid=n.get("pid"),
        used_bytes=int(n.get("used") or 0),
        budget_bytes=int(n.get("budget") or 0),
        data_bytes=int(n.get("data_bytes") or 0),
        parity_bytes=int(n.get("parity_bytes") or 0),
        group=n.get("group"),
        detected_at=n.get("detected_at"),
        silent_since=n.get("silent_since"),
    )


def redundancy_of(stripes: Iterable[Stripe]) -> Redundancy:
    """Worst status and the fewest further losses over ``stripes``.

    A step without stripes (no group could be formed) has no parity: it can
    lose nothing, whatever its status says.
    """
    stripes = list(stripes)
    counts = {"healthy": 0, "degraded": 0, "lost": 0}
    for s in stripes:
        counts[s.status] += 1
    status = "lost" if counts["lost"] else ("degraded" if counts["degraded"] else "healthy")
    return Redundancy(
        status=status,  # type: ignore[arg-type]
        stripes=len(stripes),
        healthy=counts["healthy"],
        degraded=counts["degraded"],
        lost=counts["lost"],
        can_lose=min((s.can_lose for s in stripes), default=0),
    )


def _stripes(rec: Mapping[str, Any], alive: frozenset[str]) -> list[Stripe]:
    k, m = int(rec["k"]), int(rec["m"])
    groups = rec["groups"]
    out = []
    for s in rec["stripes"]:
        group = groups[int(s["group"])]
        members = [
            StripeMember(
                index=mb.index,
                role="data" if mb.index < k else "parity",
                node=mb.node,
                alive=mb.node in alive,
            )
            for mb in stripe_members(group, int(s["stripe"]), k, m)
        ]
        out.append(
            Stripe(
                group=s["group"],
                stripe=s["stripe"],
                status=s["status"],
                lost=[LostChunk(index=c["index"], node=c["node"]) for c in s["lost"]],
                can_lose=s["can_lose"],
                length=s["length"],
                members=members,
            )
        )
    return out


def _restore_source(
    node: str,
    rec: Mapping[str, Any],
    stripes: list[Stripe],
    alive: frozenset[str],
    relocated_to: str | None,
    unrecoverable: bool,
) -> RestoreSource:
    """Mirror of the restore plan (:meth:`snapstore.control.recovery.Recovery.restore_plan`)."""
    if unrecoverable:
        return RestoreSource(kind="unrecoverable", nodes=[])
    if relocated_to is not None and relocated_to != node and relocated_to in alive:
        return RestoreSource(kind="relocated", nodes=[relocated_to])
    if node in alive:
        return RestoreSource(kind="home", nodes=[node])
    groups = rec["groups"]
    gi = next((i for i, g in enumerate(groups) if node in g), None)
    if gi is None:
        return RestoreSource(kind="unrecoverable", nodes=[])
    group = groups[gi]
    q, n, k = group.index(node), len(group), int(rec["k"])
    # The node's chunk j is data of stripe (q - j) mod n; each such stripe
    # with data decodes from its surviving members.
    mine = {(gi, (q - j) % n) for j in range(k)}
    sources: set[str] = set()
    for s in stripes:
        if (s.group, s.stripe) not in mine:
            continue
        if s.status == "lost":
            return RestoreSource(kind="unrecoverable", nodes=[])
        sources.update(mb.node for mb in s.members if mb.alive)
    return RestoreSource(kind="rebuild", nodes=sorted(sources))


def _committed(
    j: Mapping[str, Any], rec: Mapping[str, Any], alive: frozenset[str]
) -> dict[str, Any]:
    stripes = _stripes(rec, alive)
    relocated = {str(r): str(n) for r, n in (j.get("relocated") or {}).items()}
    unrecoverable = {str(r) for r in (j.get("unrecoverable") or {})}
    ranks = []
    for r, e in sorted(rec["ranks"].items(), key=lambda kv: int(kv[0])):
        node = str(e["node"])
        ranks.append(
            RankInfo(
                rank=int(r),
                node=node,
                size=int(e["size"]),
                # The coordinator's own view when it gives one; ours otherwise.
                home_alive=bool(e.get("home_alive", node in alive)),
                restore_from=_restore_source(
                    node, rec, stripes, alive, relocated.get(str(r)), str(r) in unrecoverable
                ),
            )
        )
    return {
        "job": str(j["job"]),
        "step": int(rec["step"]),
        "state": "committed",
        "version": int(rec["version"]),
        "committed_at": _opt_float(rec.get("committed_at")),
        "data_bytes": int(rec["data_bytes"]),
        "parity_bytes": int(rec["parity_bytes"]),
        "redundancy": redundancy_of(stripes),
        "world_size": int(j["world_size"]),
        "k": int(rec["k"]),
        "m": int(rec["m"]),
        "groups": [[str(n) for n in g] for g in rec["groups"]],
        "ranks": ranks,
        "stripes": stripes,
        "staged_ranks": None,
    }


def _in_progress(j: Mapping[str, Any], step: int) -> dict[str, Any]:
    # The coordinator lists pending step numbers; when it also publishes
    # their details (``pending``: [{step, staged}]) the staged ranks show.
    detail = next(
        (p for p in j.get("pending") or [] if isinstance(p, Mapping) and p.get("step") == step),
        None,
    )
    staged = None if detail is None else sorted(int(r) for r in detail.get("staged", []))
    return _uncommitted(j, step, "in_progress", staged_ranks=staged)


def _uncommitted(j: Mapping[str, Any], step: int, state: str, **known: Any) -> dict[str, Any]:
    """A snapshot view of a step with no record in memory: only ``known`` fields are set."""
    view = {
        "job": str(j["job"]),
        "step": step,
        "state": state,
        "version": None,
        "committed_at": None,
        "data_bytes": None,
        "parity_bytes": None,
        "redundancy": None,
        "world_size": int(j["world_size"]),
        "k": None,
        "m": None,
        "groups": [],
        "ranks": [],
        "stripes": [],
        "staged_ranks": None,
    }
    view.update(known)
    return view


def _job(j: Mapping[str, Any], alive: frozenset[str]) -> JobView:
    rec = j.get("record")
    committed = None if rec is None else _committed(j, rec, alive)
    pending = sorted(int(s) for s in j.get("pending_steps", []))
    status, detail = str(j["status"]), str(j.get("status_detail") or "")
    red = None if committed is None else committed["redundancy"]
    if status == "protected" and red is not None and red.status != "healthy":
        # The coordinator re-labels a job only when it acts on a loss (after
        # reprotect_delay); its stripes are degraded from the first missed
        # heartbeats, and that is what an operator must see.
        status = "degraded" if red.status == "degraded" else "lost"
        bad = red.degraded + red.lost
        detail = (
            f"{bad} of {red.stripes} stripes have chunks on nodes that are not alive; "
            "re-protection has not started yet"
        )
    persisted = [PersistedStep.model_validate(p) for p in j.get("persisted") or []]
    restore = j.get("last_restore")
    job = Job(
        job=j["job"],
        world_size=j["world_size"],
        status=status,  # type: ignore[arg-type]
        status_detail=detail,
        latest_step=j.get("latest_step"),
        pending_steps=pending,
        commits=int(j.get("commits") or 0),
        last_commit_latency=_opt_float(j.get("last_commit_latency")),
        protected_at=_opt_float(j.get("protected_at")),
        redundancy=red,
        persisted=persisted,
        persisting=j.get("persisting"),
        persist_error=j.get("persist_error"),
        last_restore=None if restore is None else LastRestore.model_validate(restore),
    )
    on_disk = {p.step: _persisted(j, p) for p in persisted}
    return JobView(job, committed, {s: _in_progress(j, s) for s in pending}, on_disk)


def _persisted(j: Mapping[str, Any], p: PersistedStep) -> dict[str, Any]:
    return _uncommitted(j, p.step, "persisted", data_bytes=p.bytes, path=p.path)


_EVENT_BASE = ("seq", "time", "kind", "message")


def _event(e: Mapping[str, Any]) -> Event:
    try:
        return Event.model_validate(dict(e))
    except ValidationError:
        # A field of an unexpected type (a new event kind may reuse a name
        # differently): keep the event, with its extra fields as text.
        logger.warning("event %s has unexpected field types", e.get("seq"))
        base = {k: e[k] for k in _EVENT_BASE}
        extra = {k: str(v) for k, v in e.items() if k not in _EVENT_BASE}
        typed = set(Event.model_fields)
        return Event.model_validate(
            base | {k: v for k, v in extra.items() if k not in typed or k in ("node", "job")}
        )
