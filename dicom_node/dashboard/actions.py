"""Operator actions: retry, rerun and discard.

Retry and rerun create a new job with :func:`dicom_node.lifecycle.queue_job`, exactly as
completeness does (outbox, superseding the study's previous job). Discard acknowledges a failed
job: it stays failed, is stamped ``discarded_at`` and its dead letters are removed from the
dead-letter queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import NodeConfig
from dicom_node.dashboard.queries import FAILED_STATES
from dicom_node.db import (
    Database,
    Job,
    Study,
    StudyState,
    utcnow,
)
from dicom_node.lifecycle import queue_job


class ActionError(Exception):
    """The action does not apply (``status`` is the HTTP status to answer)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ActionOutcome:
    """What an action did."""

    study_instance_uid: str
    job_id: str
    new_job_id: str | None
    detail: str


def _study(session: Session, study_uid: str) -> Study:
    study = session.scalar(
        select(Study).where(Study.study_instance_uid == study_uid).with_for_update()
    )
    if study is None:
        raise ActionError("no such study", status=404)
    return study


def _current_job(session: Session, study: Study) -> Job:
    job = session.get(Job, study.current_job_id) if study.current_job_id else None
    if job is None:
        raise ActionError("the study has no job yet")
    return job


def retry(db: Database, config: NodeConfig, study_uid: str) -> ActionOutcome:
    """Requeue a failed or rejected study as a new job."""
    with db.session() as session:
        study = _study(session, study_uid)
        previous = _current_job(session, study)
        if previous.state not in FAILED_STATES:
            raise ActionError(
                f"only a failed or rejected study can be retried (it is {study.state})"
            )
        new_id = queue_job(session, study, config).id
        return ActionOutcome(study_uid, previous.id, new_id, f"retry of {previous.state} job")


def rerun(db: Database, config: NodeConfig, study_uid: str) -> ActionOutcome:
    """Run the study again as a new job, whatever its current job's state."""
    with db.session() as session:
        study = _study(session, study_uid)
        if study.state == StudyState.RECEIVING:
            raise ActionError("the study is still receiving")
        previous = _current_job(session, study)
        new_id = queue_job(session, study, config).id
        return ActionOutcome(study_uid, previous.id, new_id, f"rerun of {previous.state} job")


def discard(db: Database, job_id: str) -> ActionOutcome:
    """Acknowledge a failed or rejected job: it is no longer listed as a failure."""
    with db.session() as session:
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None:
            raise ActionError("no such job", status=404)
        if job.state not in FAILED_STATES:
            raise ActionError(f"only a failed or rejected job can be discarded (it is {job.state})")
        job.discarded_at = utcnow()
        study = session.get(Study, job.study_id)
        uid = study.study_instance_uid if study is not None else ""
        return ActionOutcome(uid, job.id, None, f"discarded {job.state} job")
