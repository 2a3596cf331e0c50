"""Response models of the REST API: what every JSON endpoint returns, field by field.

These models are the contract the OpenAPI schema publishes (and that the
schemathesis tests check responses against). They are built by
:mod:`snapstore.server.views` from the coordinator's published snapshot; nothing here
talks to the store.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Envelope",
    "ErrorBody",
    "Event",
    "EventList",
    "Health",
    "HealthCoordinator",
    "HealthJobs",
    "HealthSmps",
    "Job",
    "JobList",
    "LastRestore",
    "LostChunk",
    "Node",
    "NodeList",
    "PersistedStep",
    "RankInfo",
    "Redundancy",
    "RestoreSource",
    "SnapshotDetail",
    "SnapshotList",
    "SnapshotSummary",
    "Stripe",
    "StripeMember",
]

NodeStatus = Literal["alive", "suspect", "dead", "lost"]
JobStatus = Literal["protected", "degraded", "unprotected", "lost", "none"]
StripeStatus = Literal["healthy", "degraded", "lost"]
SnapshotState = Literal["committed", "in_progress", "persisted"]
HealthStatus = Literal["ok", "degraded", "unavailable"]


class _Model(BaseModel):
    # Extra fields the coordinator may add later are dropped, not echoed:
    # the schema stays the contract.
    model_config = ConfigDict(extra="ignore")


class ErrorBody(_Model):
    """Any error this API returns on purpose (401, 404, 503)."""

    detail: str = Field(description="what was expected, what was found, what to do")


class Envelope(_Model):
    """How fresh the data of a response is.

    Every read is served from the last snapshot the server took of the
    coordinator's state (every ``poll_interval`` seconds); when the
    coordinator cannot be reached the last one is served, older and older.
    """

    store_id: str
    snapshot_time: float = Field(description="coordinator wall time of the snapshot (Unix s)")
    snapshot_age: float = Field(ge=0, description="seconds since the server took the snapshot")
    stale: bool = Field(description="true when the snapshot is older than the staleness limit")


# -- nodes ----------------------------------------------------------------------


class Node(_Model):
    node_id: str = Field(description="Ray node id (hex)")
    address: str | None = Field(description="the SMP's data address (IP)")
    status: NodeStatus
    alive: bool
    heartbeat_age: float = Field(description="seconds since its SMP's last heartbeat, at snapshot")
    incarnation: str = Field(description="changes when the SMP restarts")
    pid: int | None
    used_bytes: int = Field(ge=0, description="shared memory held by the SMP, all kinds")
    budget_bytes: int = Field(ge=0, description="the SMP's memory budget")
    data_bytes: int = Field(ge=0, description="bytes of staged data slots (committed and new)")
    parity_bytes: int = Field(ge=0, description="bytes of parity held")
    group: int | None = Field(description="index of its stripe group; null for a spare node")
    detected_at: float | None = Field(description="wall time its silence was noticed")
    silent_since: float | None = Field(description="wall time of its last heartbeat before silence")


class NodeList(Envelope):
    nodes: list[Node]
    groups: list[list[str]] = Field(description="current stripe groups, as node ids")


# -- jobs and snapshots ------------------------------------------------------------


class Redundancy(_Model):
    """How much of a committed step survives, over all its stripes."""

    status: StripeStatus = Field(description="the worst stripe's status")
    stripes: int = Field(ge=0)
    healthy: int = Field(ge=0)
    degraded: int = Field(ge=0)
    lost: int = Field(ge=0)
    can_lose: int = Field(
        ge=0, description="node losses the step survives now: the least of its stripes"
    )


class PersistedStep(_Model):
    """A complete step in the store's persist directory (it survives a store restart)."""

    step: int = Field(ge=0)
    time: float = Field(description="when it became complete (Unix s)")
    bytes: int = Field(ge=0, description="data bytes of all its ranks")
    path: str = Field(description="its directory")


class LastRestore(_Model):
    """Where the job's last restore (of any rank) read its step from."""

    source: Literal["memory", "persisted"] = Field(
        description="memory: the in-memory tier; persisted: the persist directory, because "
        "memory could not serve the job (too many losses, or the store was restarted)"
    )
    step: int | None
    rank: int | None
    time: float | None
    path: str | None = Field(description="persisted: the step's directory")
    read_from: str | None = Field(description="local, node <id>, or persisted")


class Job(_Model):
    job: str
    world_size: int = Field(ge=0)
    status: JobStatus = Field(
        description="redundancy state of the job's committed step: the coordinator's, except "
        "that a step with stripes on nodes not alive is never reported protected"
    )
    status_detail: str
    latest_step: int | None = Field(description="last committed step; null before the first")
    pending_steps: list[int] = Field(description="steps staged or committing, not committed yet")
    commits: int = Field(ge=0)
    last_commit_latency: float | None = Field(description="seconds from first stage to commit")
    protected_at: float | None
    redundancy: Redundancy | None = Field(description="null before the first commit")
    persisted: list[PersistedStep] = Field(
        default_factory=list, description="complete persisted steps, oldest first"
    )
    persisting: int | None = Field(default=None, description="step being flushed to disk now")
    persist_error: str | None = Field(
        default=None, description="why the last flush failed; null after a success"
    )
    last_restore: LastRestore | None = Field(
        default=None, description="where the last restore came from; null before one"
    )


class JobList(Envelope):
    jobs: list[Job]


class StripeMember(_Model):
    index: int = Field(ge=0, description="RS index: < k data, >= k parity")
    role: Literal["data", "parity"]
    node: str
    alive: bool


class LostChunk(_Model):
    index: int = Field(ge=0)
    node: str


class Stripe(_Model):
    group: int = Field(ge=0)
    stripe: int = Field(ge=0)
    status: StripeStatus
    lost: list[LostChunk] = Field(description="chunks on nodes that are not alive")
    can_lose: int = Field(ge=0, description="how many more chunks it can lose and be rebuilt")
    length: int = Field(ge=0, description="bytes per chunk")
    members: list[StripeMember]


class RestoreSource(_Model):
    """Where a restore of one rank would read from now."""

    kind: Literal["home", "relocated", "rebuild", "unrecoverable"] = Field(
        description="home: its node holds it; relocated: rebuilt onto another node; "
        "rebuild: decoded from k surviving chunks of each of its stripes; "
        "unrecoverable: more than m chunks of one of its stripes are lost"
    )
    nodes: list[str] = Field(description="nodes the bytes would be read from")


class RankInfo(_Model):
    rank: int = Field(ge=0)
    node: str = Field(description="the rank's home node in the record")
    size: int = Field(ge=0)
    home_alive: bool
    restore_from: RestoreSource


class SnapshotSummary(_Model):
    step: int = Field(ge=0)
    state: SnapshotState
    version: int | None = Field(description="record version: grows on re-protection")
    committed_at: float | None
    data_bytes: int | None
    parity_bytes: int | None
    redundancy: Redundancy | None
    path: str | None = Field(default=None, description="persisted: the step's directory")


class SnapshotList(Envelope):
    job: str
    latest_step: int | None
    snapshots: list[SnapshotSummary] = Field(
        description="the latest committed step, then steps in progress (older steps are gone "
        "from memory), then the persisted steps on disk, oldest first"
    )


class SnapshotDetail(SnapshotSummary, Envelope):
    job: str
    world_size: int = Field(ge=0)
    k: int | None
    m: int | None
    groups: list[list[str]] = Field(description="the step's stripe groups, as node ids")
    ranks: list[RankInfo]
    stripes: list[Stripe]
    staged_ranks: list[int] | None = Field(
        description="in progress: ranks that staged, when the coordinator reports them"
    )


# -- events -------------------------------------------------------------------------


class Event(_Model):
    model_config = ConfigDict(extra="allow")

    seq: int = Field(ge=0, description="increases by one per event; restarts with the coordinator")
    time: float
    kind: str = Field(
        description="node_dead, node_silent, node_lost, rebuild, reprotected, commit, error…"
    )
    message: str
    node: str | None = None
    job: str | None = None
    step: int | None = None
    detection_latency: float | None = Field(
        default=None,
        description="node_dead, node_silent: seconds from its last sign of life to detection",
    )
    duration: float | None = None
    bytes: int | None = None


class EventList(Envelope):
    events: list[Event] = Field(description="oldest first")


# -- health --------------------------------------------------------------------------


class HealthCoordinator(_Model):
    reachable: bool = Field(description="the last poll of the coordinator succeeded")
    snapshot_age: float | None = Field(description="null when no snapshot was ever taken")
    started_at: float | None
    last_error: str | None


class HealthSmps(_Model):
    total: int = Field(ge=0)
    alive: int = Field(ge=0)
    suspect: int = Field(ge=0, description="silent, still read from: nothing is aborted")
    dead: int = Field(ge=0, default=0, description="Ray says the SMP died; not yet lost")
    lost: int = Field(ge=0)
    max_heartbeat_age: float | None


class HealthJobs(_Model):
    total: int = Field(ge=0)
    protected: int = Field(ge=0)
    unprotected: int = Field(ge=0, description="jobs not protected: degraded, unprotected, lost")


class Health(_Model):
    status: HealthStatus = Field(
        description="ok: fresh snapshot, every SMP alive, every committed job protected; "
        "degraded: fresh but something is not; unavailable: no fresh snapshot (HTTP 503)"
    )
    store_id: str | None
    coordinator: HealthCoordinator
    smps: HealthSmps
    jobs: HealthJobs
