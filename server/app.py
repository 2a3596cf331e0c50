"""The FastAPI app: endpoints over the poller's cached snapshot, auth, dashboard files.

Every handler reads :meth:`snapstore.server.poller.Poller.state` (one attribute read)
and wraps the prepared view. Handlers are coroutines that await nothing: they
run on the event loop without a thread hop, and a slow or dead coordinator,
SMP or save never delays a response. JSON answers carry the
snapshot's age (``snapshot_age``, ``stale``, and the ``X-Snapshot-Age``
header) so a reader can tell old data from fresh.

Errors: unknown job or step → 404 with a message; malformed parameters →
422 (FastAPI's validation body); no snapshot taken yet → 503; a token in
force and missing or wrong → 401.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from prometheus_client import CollectorRegistry, generate_latest

from snapstore.config import JOB_NAME_RE
from snapstore.control.events import EVENT_KINDS
from snapstore.server.auth import HostCheck, check_bearer
from snapstore.server.metrics import CONTENT_TYPE, SnapshotCollector
from snapstore.server.models import (
    ErrorBody,
    EventList,
    Health,
    HealthCoordinator,
    HealthJobs,
    HealthSmps,
    JobList,
    NodeList,
    SnapshotDetail,
    SnapshotList,
    SnapshotSummary,
)
from snapstore.server.poller import EVENTS_KEPT, Poller, PollState
from snapstore.server.views import JobView, View

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_STEP_PATTERN = r"^(latest|[0-9]{1,18})$"
# Job names as the store accepts them (snapstore.config.check_job_name): any
# other name is malformed (422), not merely unknown (404).
_JOB_PATTERN = f"^{JOB_NAME_RE.pattern}$"
# Event kinds the store logs, one or several separated by commas: an unknown kind
# (a typo) is a 422 naming the pattern, not a quietly empty list.
_KIND = "|".join(sorted(EVENT_KINDS, key=len, reverse=True))
_KIND_PATTERN = f"^({_KIND})(,({_KIND}))*$"
_NODE_PATTERN = r"^[0-9a-f]{1,64}$"


def _asset(name: str) -> bytes:
    return importlib.resources.files("snapstore.server").joinpath("static", name).read_bytes()


def create_app(
    poller: Poller, token: str | None = None, hosts: Sequence[str] | None = None
) -> FastAPI:
    """The app serving ``poller``'s snapshots; with ``token``, every data endpoint needs it.

    ``hosts``: the Host header values answered (:func:`snapstore.server.auth.allowed_hosts`),
    400 for any other; None answers any (the server process always passes a list
    unless bound to a wildcard address).
    """
    app = FastAPI(
        title="snapstore",
        summary="Monitoring of an erasure-coded in-memory snapshot store",
        version="1",
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; the dashboard loads nothing
        redoc_url=None,
    )
    assets = {name: _asset(name) for name in _ASSETS}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(poller))

    bearer = HTTPBearer(
        auto_error=False, description="the server's token (`snapstore up` prints it)"
    )

    async def require_token(request: Request) -> None:
        assert token is not None
        if not check_bearer(request.headers.get("authorization"), token):
            raise HTTPException(
                401,
                "this server requires a bearer token: send `Authorization: Bearer <token>` "
                "(the token `snapstore up` printed; also in the store's state file)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # HTTPBearer only declares the scheme in the OpenAPI schema; require_token decides.
    deps = [Depends(bearer), Depends(require_token)] if token else []
    common: dict[int | str, dict[str, Any]] = {503: {"model": ErrorBody}}
    if token:
        common[401] = {"model": ErrorBody}
    api = APIRouter(dependencies=deps, responses=common)

    def current() -> tuple[View, PollState]:
        st = poller.state()
        if st.view is None:
            raise HTTPException(
                503,
                "the server has no snapshot of the store yet: the coordinator did not answer "
                f"({st.last_error}); see /healthz",
            )
        return st.view, st

    def envelope(view: View, st: PollState, response: Response) -> dict[str, Any]:
        age = poller.age(st) or 0.0
        response.headers["X-Snapshot-Age"] = f"{age:.3f}"
        response.headers["Cache-Control"] = "no-store"
        return {
            "store_id": view.store_id,
            "snapshot_time": view.time,
            "snapshot_age": round(age, 3),
            "stale": not poller.fresh(st),
        }

    def job_of(view: View, job: str) -> JobView:
        jv = view.jobs.get(job)
        if jv is None:
            known = ", ".join(repr(j) for j in sorted(view.jobs)[:20]) or "none"
            raise HTTPException(404, f"no job {job!r} in this store (jobs: {known})")
        return jv

    health_responses: dict[int | str, dict[str, Any]] = {
        503: {"model": Health, "description": "no fresh snapshot of the coordinator"}
    }

    @api.get("/healthz", response_model=Health, responses=health_responses, tags=["health"])
    async def healthz(response: Response) -> Any:
        """Coordinator reachability and snapshot age, SMPs by status, jobs protected or not."""
        st = poller.state()
        view = st.view
        fresh = poller.fresh(st)
        age = poller.age(st)
        nodes = view.nodes if view else []
        jobs = [jv.job for jv in view.jobs.values()] if view else []
        statuses = ("alive", "suspect", "dead", "lost")
        counts = {s: sum(1 for n in nodes if n.status == s) for s in statuses}
        committed = [j for j in jobs if j.latest_step is not None]
        protected = sum(1 for j in committed if j.status == "protected")
        if not fresh:
            status = "unavailable"
        elif counts["suspect"] or counts["dead"] or counts["lost"] or protected < len(committed):
            status = "degraded"
        else:
            status = "ok"
        body = Health(
            status=status,  # type: ignore[arg-type]
            store_id=view.store_id if view else None,
            coordinator=HealthCoordinator(
                reachable=st.ok,
                snapshot_age=None if age is None else round(age, 3),
                started_at=view.started_at if view else None,
                last_error=st.last_error,
            ),
            smps=HealthSmps(
                total=len(nodes),
                alive=counts["alive"],
                suspect=counts["suspect"],
                dead=counts["dead"],
                lost=counts["lost"],
                max_heartbeat_age=max((n.heartbeat_age for n in nodes), default=None),
            ),
            jobs=HealthJobs(
                total=len(jobs), protected=protected, unprotected=len(committed) - protected
            ),
        )
        response.headers["Cache-Control"] = "no-store"
        if not fresh:
            return JSONResponse(body.model_dump(mode="json"), status_code=503)
        return body

    @api.get("/v1/nodes", response_model=NodeList, tags=["store"])
    async def nodes(response: Response) -> Any:
        """Per node: id, address, alive, heartbeat age, memory used and budget, bytes, group."""
        view, st = current()
        return NodeList(**envelope(view, st, response), nodes=view.nodes, groups=view.groups)

    @api.get("/v1/jobs", response_model=JobList, tags=["store"])
    async def jobs(response: Response) -> Any:
        """Jobs with world size, latest committed step and redundancy state."""
        view, st = current()
        return JobList(
            **envelope(view, st, response),
            jobs=[jv.job for _, jv in sorted(view.jobs.items())],
        )

    not_found: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}}

    @api.get(
        "/v1/jobs/{job}/snapshots",
        response_model=SnapshotList,
        responses=not_found,
        tags=["store"],
    )
    async def snapshots(
        response: Response, job: Annotated[str, Path(pattern=_JOB_PATTERN, description="job name")]
    ) -> Any:
        """The job's latest committed step, its steps in progress, and its persisted steps."""
        view, st = current()
        jv = job_of(view, job)
        summary_fields = set(SnapshotSummary.model_fields)
        views = [] if jv.committed is None else [jv.committed]
        views += [jv.in_progress[s] for s in sorted(jv.in_progress)]
        views += [jv.persisted[s] for s in sorted(jv.persisted)]
        items = [SnapshotSummary(**{k: d[k] for k in summary_fields if k in d}) for d in views]
        return SnapshotList(
            **envelope(view, st, response),
            job=job,
            latest_step=jv.job.latest_step,
            snapshots=items,
        )

    @api.get(
        "/v1/jobs/{job}/snapshots/{step}",
        response_model=SnapshotDetail,
        responses=not_found,
        tags=["store"],
    )
    async def snapshot(
        response: Response,
        job: Annotated[str, Path(pattern=_JOB_PATTERN, description="job name")],
        step: Annotated[
            str,
            Path(pattern=_STEP_PATTERN, description="a step number, or `latest` (committed)"),
        ],
    ) -> Any:
        """One step: committed, in progress or persisted; ranks, bytes, redundancy, sources."""
        view, st = current()
        jv = job_of(view, job)
        detail = _find_step(jv, job, step)
        return SnapshotDetail(**envelope(view, st, response), **detail)

    @api.get(
        "/v1/events", response_model=EventList, response_model_exclude_none=True, tags=["store"]
    )
    async def events(
        response: Response,
        limit: Annotated[
            int, Query(ge=1, le=EVENTS_KEPT, description="newest events to return")
        ] = 100,
        kind: Annotated[
            list[Annotated[str, Query(pattern=_KIND_PATTERN, max_length=1000)]] | None,
            Query(description="only these kinds (repeat, or separate by commas)"),
        ] = None,
        since: Annotated[
            int | None, Query(ge=0, description="only events with seq > since")
        ] = None,
        job: Annotated[
            str | None, Query(pattern=_JOB_PATTERN, description="only events about this job")
        ] = None,
        node: Annotated[
            str | None,
            Query(pattern=_NODE_PATTERN, description="only events about this node (hex id)"),
        ] = None,
    ) -> Any:
        """Recent events, oldest first: failures (detection latency), rebuilds, commits, errors."""
        view, st = current()
        kinds = {k.strip() for ks in kind or [] for k in ks.split(",") if k.strip()}
        out = [
            e
            for e in view.events
            if (not kinds or e.kind in kinds)
            and (since is None or e.seq > since)
            and (job is None or e.job == job)
            and (node is None or e.node == node)
        ]
        return EventList(**envelope(view, st, response), events=out[-limit:])

    metrics_doc: dict[int | str, dict[str, Any]] = {
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format 0.0.4",
        }
    }

    @api.get("/metrics", response_class=Response, responses=metrics_doc, tags=["health"])
    async def metrics() -> Response:
        """Prometheus metrics of the last snapshot (see server.metrics for the families)."""
        return Response(
            generate_latest(registry),
            media_type=CONTENT_TYPE,
            headers={"Cache-Control": "no-store"},
        )

    app.include_router(api)

    def asset(name: str) -> Response:
        return Response(
            assets[name],
            media_type=_ASSETS[name],
            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"},
        )

    @app.get("/", response_class=HTMLResponse, tags=["dashboard"])
    async def dashboard() -> Response:
        """The dashboard page (static; it polls this API, with the token from `#token=`)."""
        return asset("index.html")

    @app.get("/dashboard.js", include_in_schema=False)
    async def dashboard_js() -> Response:
        return asset("dashboard.js")

    @app.get("/dashboard.css", include_in_schema=False)
    async def dashboard_css() -> Response:
        return asset("dashboard.css")

    if hosts is not None:
        app.add_middleware(HostCheck, allowed=hosts)
    return app


def _find_step(jv: JobView, job: str, step: str) -> dict[str, Any]:
    latest = jv.job.latest_step
    pending = ", ".join(map(str, sorted(jv.in_progress))) or "none"
    kept = (
        "the store keeps only the latest committed step "
        f"({'none' if latest is None else latest}) and steps in progress ({pending})"
    )
    if jv.persisted:
        kept += f" in memory, and persisted steps {sorted(jv.persisted)} on disk"
    if step == "latest":
        if jv.committed is None:
            raise HTTPException(404, f"job {job!r} has no committed step yet; {kept}")
        return jv.committed
    n = int(step)
    if jv.committed is not None and n == jv.committed["step"]:
        return jv.committed
    if n in jv.in_progress:
        return jv.in_progress[n]
    if n in jv.persisted:
        return jv.persisted[n]
    if latest is not None and n < latest:
        raise HTTPException(404, f"step {n} of job {job!r} is no longer kept: {kept}")
    raise HTTPException(
        404, f"step {n} of job {job!r} is neither committed nor in progress; {kept}"
    )
