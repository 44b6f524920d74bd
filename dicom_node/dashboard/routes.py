"""The dashboard's JSON API (every page reads one of these; OpenAPI at ``/docs``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from dicom_node.dashboard import operations
from dicom_node.dashboard.actions import ActionError
from dicom_node.dashboard.auth import (
    COOKIE,
    SESSION_SECONDS,
    audit,
    authenticate,
    client_of,
    from_header,
    refuse,
)
from dicom_node.dashboard.context import Dashboard
from dicom_node.dashboard.models import (
    ActionOut,
    AuditOut,
    ConfigOut,
    FailuresOut,
    LatencyPoint,
    OverviewOut,
    QueueOut,
    SessionOut,
    StudyDetail,
    StudyPage,
    ThroughputPoint,
    WorkerOut,
)
from dicom_node.dashboard.queries import latency_series, search_studies, throughput_series

Window = Annotated[int, Query(ge=1, le=7 * 24 * 60, description="window in minutes")]
Buckets = Annotated[int, Query(ge=1, le=200)]


def reader(dash: Dashboard) -> Callable[[Request], None]:
    """A dependency that lets reads through when public, else asks for credentials."""

    def check(request: Request) -> None:
        if dash.creds.public_read or authenticate(request, dash.creds, dash.sessions):
            return
        raise HTTPException(
            401, "authentication required", headers={"WWW-Authenticate": 'Basic realm="NoduleAI"'}
        )

    return check


def actor(dash: Dashboard, action: str) -> Callable[[Request], str]:
    """A dependency that returns the acting operator; a request without credentials is audited
    and answered 401, a read-only user's is audited and answered 403."""

    def check(request: Request) -> str:
        principal = authenticate(request, dash.creds, dash.sessions, acting=True)
        target = request.path_params.get("study_uid") or request.path_params.get("job_id")
        if principal is None:
            raise refuse(dash.db, request, action, target)
        if not principal.may_act:
            detail = f"{principal.role} {principal.actor} from {client_of(request)}"
            audit(dash.db, principal.actor, f"{action}.forbidden", target, detail)
            raise HTTPException(403, "this user may read, not act")
        return principal.actor

    return check


def _run(dash: Dashboard, who: str, action: str, target: str) -> ActionOut:
    try:
        outcome = operations.act(dash, who, action, target)
    except ActionError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    return ActionOut(
        action=action,
        study_instance_uid=outcome.study_instance_uid,
        job_id=outcome.job_id,
        new_job_id=outcome.new_job_id,
        detail=outcome.detail,
    )


def read_router(dash: Dashboard, registry: CollectorRegistry) -> APIRouter:
    """GET endpoints: overview, series, studies, failures, workers, queues, config, metrics."""
    router = APIRouter(dependencies=[Depends(reader(dash))])

    @router.get("/api/overview", response_model=OverviewOut, tags=["dashboard"])
    def overview(window: Window = 60) -> OverviewOut:
        """Queues, outbox, state counts, workers, last-hour totals and stage percentiles."""
        return operations.overview(dash, timedelta(minutes=window))

    @router.get("/api/throughput", response_model=list[ThroughputPoint], tags=["dashboard"])
    def throughput(window: Window = 60, buckets: Buckets = 30) -> list[ThroughputPoint]:
        """Instances received and jobs queued/done/failed per time bucket."""
        return throughput_series(dash.db, timedelta(minutes=window), buckets)

    @router.get("/api/latency", response_model=list[LatencyPoint], tags=["dashboard"])
    def latency(window: Window = 60, buckets: Buckets = 30) -> list[LatencyPoint]:
        """p50/p95/p99 per stage of the jobs created in each time bucket (ms)."""
        return latency_series(dash.db, timedelta(minutes=window), buckets)

    @router.get("/api/queues", response_model=list[QueueOut], tags=["dashboard"])
    def queues() -> list[QueueOut]:
        """Depth and consumers of the work queue and the dead-letter queue."""
        return operations.queues_out(dash)

    @router.get("/api/workers", response_model=list[WorkerOut], tags=["dashboard"])
    def workers() -> list[WorkerOut]:
        """Workers and their last heartbeat."""
        return operations.workers_out(dash)

    @router.get("/api/dashboard/studies", response_model=StudyPage, tags=["dashboard"])
    def studies(
        state: str | None = None,
        q: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> StudyPage:
        """Studies filtered by state and searched by study UID, calling AE or job id."""
        total, items = search_studies(dash.db, state, q, limit, offset)
        return StudyPage(total=total, items=items)

    @router.get("/api/studies/{study_uid}", response_model=StudyDetail, tags=["dashboard"])
    def study(study_uid: str) -> StudyDetail:
        """One study: series, jobs with stage timings, deliveries and its audit trail."""
        detail = operations.study_detail(dash, study_uid)
        if detail is None:
            raise HTTPException(404, "no such study")
        return detail

    @router.get(
        "/api/studies/{study_uid}/findings/{number}/thumbnail.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
        tags=["dashboard"],
    )
    def thumbnail(study_uid: str, number: int) -> Response:
        """Finding ``number``'s key image as a PNG thumbnail (lung window, outline)."""
        png = operations.finding_thumbnail(dash, study_uid, number)
        if png is None:
            raise HTTPException(404, "no such finding")
        return Response(png, media_type="image/png")

    @router.get("/api/failures", response_model=FailuresOut, tags=["dashboard"])
    def failures(
        include_history: bool = False, limit: Annotated[int, Query(ge=1, le=1000)] = 200
    ) -> FailuresOut:
        """Failed and rejected jobs with reason and attempts, and the dead letters.

        ``include_history`` adds failed jobs already retried (superseded) or discarded.
        """
        return operations.failures_out(dash, include_history, limit)

    @router.get("/api/config", response_model=ConfigOut, tags=["dashboard"])
    def config() -> ConfigOut:
        """Effective settings, AE policies and destinations, secrets masked."""
        return operations.config_out(dash)

    @router.get("/api/audit", response_model=list[AuditOut], tags=["dashboard"])
    def audit_log(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditOut]:
        """The newest audit-log entries."""
        return operations.audit_log(dash, limit)

    @router.get("/metrics", tags=["metrics"])
    def metrics() -> Response:
        """Prometheus text format, derived from the database at scrape time."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


def action_router(dash: Dashboard) -> APIRouter:
    """POST endpoints: retry, rerun, discard (authenticated and audited)."""
    router = APIRouter(tags=["actions"])

    @router.post("/api/studies/{study_uid}/retry", response_model=ActionOut)
    def retry(study_uid: str, who: str = Depends(actor(dash, "retry"))) -> ActionOut:
        """Requeue a failed or rejected study as a new job (through the outbox)."""
        return _run(dash, who, "retry", study_uid)

    @router.post("/api/studies/{study_uid}/rerun", response_model=ActionOut)
    def rerun(study_uid: str, who: str = Depends(actor(dash, "rerun"))) -> ActionOut:
        """Run a study again as a new job, even when it is done."""
        return _run(dash, who, "rerun", study_uid)

    @router.post("/api/jobs/{job_id}/discard", response_model=ActionOut)
    def discard(job_id: str, who: str = Depends(actor(dash, "discard"))) -> ActionOut:
        """Acknowledge a failed job and remove its dead letters."""
        return _run(dash, who, "discard", job_id)

    return router


def session_router(dash: Dashboard) -> APIRouter:
    """Sign in (``POST``), who am I (``GET``) and sign out (``DELETE``) at ``/api/session``."""
    router = APIRouter(tags=["session"])

    @router.post("/api/session", response_model=SessionOut)
    def sign_in(request: Request, response: Response) -> SessionOut:
        """Check the ``Authorization`` header's credentials; set the HttpOnly session cookie."""
        client = client_of(request)
        wait = dash.limiter.retry_after(client)
        if wait > 0:
            audit(dash.db, "anonymous", "signin.limited", None, f"from {client}")
            raise HTTPException(
                429, "too many failed sign-ins", headers={"Retry-After": str(int(wait) + 1)}
            )
        principal = from_header(request, dash.creds)
        if principal is None:
            dash.limiter.failed(client)
            audit(dash.db, "anonymous", "signin.refused", None, f"from {client}")
            raise HTTPException(401, "credentials rejected")
        response.set_cookie(
            COOKIE,
            dash.sessions.open(principal),
            max_age=SESSION_SECONDS,
            path="/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        audit(dash.db, principal.actor, "signin", None, f"{principal.role} from {client}")
        return SessionOut(actor=principal.actor, role=principal.role)

    @router.get("/api/session", response_model=SessionOut)
    def who(request: Request) -> SessionOut:
        """Who the request is signed in as (``anonymous`` without a session)."""
        principal = authenticate(request, dash.creds, dash.sessions)
        if principal is None:
            return SessionOut(actor=None, role="anonymous")
        return SessionOut(actor=principal.actor, role=principal.role)

    @router.delete("/api/session", response_model=SessionOut)
    def sign_out(request: Request, response: Response) -> SessionOut:
        """End the session and clear its cookie."""
        dash.sessions.close(request.cookies.get(COOKIE))
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return SessionOut(actor=None, role="anonymous")

    return router
