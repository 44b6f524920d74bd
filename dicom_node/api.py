"""The HTTP API: ``/healthz`` and ``/api/studies`` (stable; the dashboard builds on them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import __version__
from dicom_node.db import Database, Job, Study


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
    timings_ms: dict[str, Any] | None
    backend: str | None
    error: str | None


def create_app(db: Database) -> FastAPI:
    """Build the app over ``db``."""
    app = FastAPI(title="NoduleAI", version=__version__)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """Liveness and database reachability."""
        try:
            with db.session() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            return JSONResponse({"status": "error", "database": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/api/studies", response_model=list[StudyOut])
    def studies(
        state: str | None = None, limit: int = Query(default=500, ge=1, le=5000)
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

    return app


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
        error=study.error,
    )
