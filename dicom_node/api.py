"""The HTTP API: ``/healthz``, ``/readyz`` and ``/api/studies`` (stable), plus the dashboard and
the workers' ``/spool`` (:mod:`dicom_node.remote_spool`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import __version__
from dicom_node.config import NodeConfig, Settings
from dicom_node.db import Database, Job, Study, StudyState
from dicom_node.remote_spool import spool_router
from dicom_node.results import stored_result
from dicom_node.scp import Refusals
from dicom_node.spool import LocalSpool

LOGGER = logging.getLogger(__name__)


class StudyOut(BaseModel):
    """One study as the API shows it: identifiers, state and times, no patient attributes."""

    study_instance_uid: str
    state: str
    instances: int
    calling_ae: str
    received_at: datetime
    last_received_at: datetime
    queued_at: datetime | None
    updated_at: datetime
    job_id: str | None
    attempts: int
    timings_ms: dict[str, float] | None
    backend: str | None
    error_code: str | None
    error: str | None


class FindingsOut(BaseModel):
    """The nodules of a study's current job (empty until its results are stored)."""

    study_instance_uid: str
    state: str
    job_id: str | None
    series_instance_uid: str | None
    nodules: list[dict[str, Any]]
    models: dict[str, str] | None
    #: Lung-RADS v2022 category of the study (not for clinical use).
    lung_rads: str | None
    #: The comparison with the prior CT, or why there is none
    #: (:meth:`dicom_node.results.PriorComparison.to_json`); ``None`` without a priors policy.
    prior: dict[str, Any] | None = None
    #: Why the series is outside what the detector was validated on (every finding then needs
    #: review); empty when it is not.
    input_review: list[str] = []


def create_app(
    db: Database,
    settings: Settings | None = None,
    config: NodeConfig | None = None,
    on_job: Callable[[], None] | None = None,
    refusals: Refusals | None = None,
) -> FastAPI:
    """Build the app over ``db``; with ``settings``, mount the dashboard and ``/metrics`` too.

    Parameters
    ----------
    db : Database
        The service database.
    settings : Settings, optional
        Enables the dashboard (pages, JSON API, actions, ``/metrics``) and queue checks in
        ``/readyz``; with ``spool_token``, the spool for workers on other hosts (``/spool``).
    config : NodeConfig, optional
        The node configuration read at start (empty if not given).
    on_job : callable, optional
        Called after a dashboard action committed a new job (wakes the publisher).
    refusals : Refusals, optional
        The DICOM listener's refusal counts (``noduleai_association_refusals_total``).
    """
    # /docs and /redoc with their assets served by the node (hospital networks often have no
    # internet access; FastAPI's own pages load them from a CDN)
    app = FastAPIOffline(title="NoduleAI", version=__version__)
    app.middleware("http")(_security_headers)
    dashboard = None
    if settings is not None:
        from dicom_node.dashboard import mount_dashboard

        dashboard = mount_dashboard(
            app, db, settings, config or NodeConfig(), on_job, refusals=refusals
        )
        if settings.spool_token is not None:  # workers on other hosts reach the spool here
            spool = LocalSpool(settings.spool_dir, settings.min_free_bytes)
            app.include_router(spool_router(spool, settings.spool_token))

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """Liveness and database reachability: healthy or not, no internals (no host, no error)."""
        try:
            with db.session() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            LOGGER.warning("health check: database unavailable (%s)", type(exc).__name__)
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: the database answers and, with the dashboard, the job queue is reachable."""
        checks: dict[str, str] = {}
        try:
            with db.session() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except SQLAlchemyError as exc:
            checks["database"] = type(exc).__name__
        if dashboard is not None:
            checks["queue"] = dashboard.queues.ping() or "ok"
        ready = all(value == "ok" for value in checks.values())
        body = {"status": "ok" if ready else "unavailable", "checks": checks}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/api/studies", response_model=list[StudyOut])
    def studies(
        state: StudyState | None = None, limit: int = Query(default=500, ge=1, le=5000)
    ) -> list[StudyOut]:
        """Studies, newest first, with their current job."""
        query = (
            select(Study, Job)
            .outerjoin(Job, Job.id == Study.current_job_id)
            .order_by(Study.received_at.desc())
            .limit(limit)
        )
        if state is not None:
            query = query.where(Study.state == state)
        with db.session() as session:
            rows = session.execute(query).all()
        return [_study_out(study, job) for study, job in rows]

    @app.get("/api/studies/{study_uid}/findings", response_model=FindingsOut)
    def findings(study_uid: str) -> FindingsOut:
        """The current job's nodules (centre mm, long/short axis, probability, ...); read-only."""
        with db.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if study is None:
                raise HTTPException(status_code=404, detail="unknown study")
            result = stored_result(session, study.current_job_id)
            return FindingsOut(
                study_instance_uid=study.study_instance_uid,
                state=study.state,
                job_id=study.current_job_id,
                series_instance_uid=result.series_instance_uid if result else None,
                nodules=[n.to_json() for n in result.nodules] if result else [],
                models=result.model_versions if result else None,
                lung_rads=(result.lung_rads or None) if result else None,
                prior=result.prior.to_json() if result and result.prior else None,
                input_review=list(result.input_review) if result else [],
            )

    return app


#: Headers every answer carries (OWASP secure headers): no framing, no type sniffing, no referrer.
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: The dashboard's pages load only the node's own scripts, styles and data (its assets are
#: served by the node; nothing comes from a CDN) and may not be framed.
DASHBOARD_CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


async def _security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)
    if request.url.path.startswith("/dashboard"):
        response.headers["Content-Security-Policy"] = DASHBOARD_CSP
    return response


def _study_out(study: Study, job: Job | None) -> StudyOut:
    return StudyOut(
        study_instance_uid=study.study_instance_uid,
        state=study.state,
        instances=study.instances,
        calling_ae=study.calling_ae,
        received_at=study.received_at,
        last_received_at=study.last_received_at,
        queued_at=job.queued_at if job else None,
        updated_at=study.updated_at,
        job_id=job.id if job else None,
        attempts=job.attempts if job else 0,
        timings_ms=job.timings if job else None,
        backend=job.backend if job else None,
        error_code=study.error_code,
        error=study.error,
    )
