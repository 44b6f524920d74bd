"""The one owner of study, job and delivery state: every change goes through this module.

A job moves as :data:`TRANSITIONS` allows (DESIGN.md's data flow)::

    queued ──▶ processing ──▶ delivering ──▶ done
      ▲            │  │ │                 └─▶ failed
      └── retry ───┘  │ └─▶ done | rejected | failed
                      └─▶ processing (redelivered after a crash)
    queued | processing | delivering ──▶ superseded (a newer job of the same study)

Any other change raises :class:`IllegalTransition`. Each change stamps ``<state>_at`` and, while
the job is its study's current job, mirrors the state (and the failure) on the study. A superseded
job's unsent deliveries are cancelled: its results are never delivered.

The FHIR report never goes backwards: ``registered`` (a job queued) and ``cancelled`` (a job
rejected or failed) are published only while the study has no results yet; once it has, the
report keeps them until a newer job's results replace them. Failures
are recorded as ``(error_code, error)``. This module also creates the delivery rows: the result
objects to each DICOM destination, the FHIR report's status to each FHIR destination.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node.config import FhirDestination, NodeConfig, Retraction
from dicom_node.db import (
    Delivery,
    DeliveryKind,
    DeliveryState,
    Job,
    JobState,
    ReportStatus,
    Result,
    Study,
    StudyState,
    new_job_id,
    utcnow,
)
from dicom_node.errors import ErrorCode, FailureCode, NoduleAIError
from dicom_node.results import ObjectKind, ResultObject, ResultSet, nodules_json
from dicom_node.retry import Decision, Verdict


class IllegalTransition(NoduleAIError):
    """A state change the lifecycle does not allow (a bug in the caller)."""


#: The job state changes the lifecycle allows (``None``: a new job).
TRANSITIONS: dict[JobState | None, frozenset[JobState]] = {
    None: frozenset({JobState.QUEUED}),
    JobState.QUEUED: frozenset({JobState.PROCESSING, JobState.SUPERSEDED, JobState.FAILED}),
    JobState.PROCESSING: frozenset(
        {
            JobState.PROCESSING,
            JobState.QUEUED,
            JobState.DELIVERING,
            JobState.DONE,
            JobState.REJECTED,
            JobState.FAILED,
            JobState.SUPERSEDED,
        }
    ),
    JobState.DELIVERING: frozenset({JobState.DONE, JobState.FAILED, JobState.SUPERSEDED}),
    JobState.DONE: frozenset(),
    JobState.REJECTED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.SUPERSEDED: frozenset(),
}
#: States a job does not leave.
FINISHED = frozenset(s for s, targets in TRANSITIONS.items() if s is not None and not targets)
#: States in which a newer job of the study supersedes the job.
UNFINISHED = frozenset({JobState.QUEUED, JobState.PROCESSING, JobState.DELIVERING})


def _move(
    session: Session,
    job: Job,
    state: JobState,
    failure: tuple[FailureCode, str] | None = None,
) -> None:
    """Change ``job``'s state if :data:`TRANSITIONS` allows it."""
    if state not in TRANSITIONS[job.state]:
        raise IllegalTransition(f"job {job.id}: {job.state} -> {state} is not allowed")
    _enter(session, job, state, failure)


def _enter(
    session: Session,
    job: Job,
    state: JobState,
    failure: tuple[FailureCode, str] | None = None,
) -> None:
    """Put ``job`` in ``state``, stamp the time, mirror it on the study while it is current."""
    now = utcnow()
    job.state = state
    setattr(job, f"{state.value}_at", now)
    code, detail = (failure[0].value, failure[1]) if failure is not None else (None, None)
    if failure is not None:  # a job keeps its last failure (a retried attempt's) as history
        job.error_code, job.error = code, detail
    study = session.get(Study, job.study_id)
    if study is not None and study.current_job_id == job.id and state != JobState.SUPERSEDED:
        study.state = StudyState(state.value)
        study.error_code, study.error = code, detail
        study.updated_at = now


# ---------------------------------------------------------------------------------- studies


def reopen_study(study: Study) -> bool:
    """A new instance arrived: the study is ``receiving`` again; return whether it had moved on.

    Completing it again makes a new job that supersedes the previous one (:func:`queue_job`).
    A study retrieved as a prior stays ``prior``: its instances are never study input.
    """
    if study.state == StudyState.PRIOR:
        return False
    reopened = study.state != StudyState.RECEIVING
    study.state = StudyState.RECEIVING
    study.error_code, study.error = None, None
    return reopened


def queue_job(session: Session, study: Study, config: NodeConfig) -> Job:
    """Create the study's new ``queued`` job (the outbox row the publisher sends); return it.

    It supersedes the study's previous job if that one is unfinished, and the FHIR report goes
    ``registered`` at the FHIR destinations, unless an earlier job already gave it results.
    """
    previous = session.get(Job, study.current_job_id) if study.current_job_id else None
    job = Job(
        id=new_job_id(),
        study_id=study.id,
        state=JobState.QUEUED,
        attempts=0,
        instances=study.instances,
        supersedes=previous.id if previous is not None else None,
    )
    session.add(job)
    if previous is not None and previous.state in UNFINISHED:
        _move(session, previous, JobState.SUPERSEDED)
        _cancel_deliveries(session, previous.id)
    study.current_job_id = job.id
    session.flush()
    _enter(session, job, JobState.QUEUED)  # TRANSITIONS[None]: a new job starts queued
    if not _has_results(session, study.id):
        session.add_all(
            delivery_rows(config, study.calling_ae, job.id, (), ReportStatus.REGISTERED)
        )
    return job


def _has_results(session: Session, study_id: int) -> bool:
    """Whether a job of the study stored results (its FHIR report carries them, or will)."""
    found = session.scalar(
        select(Result.id).join(Job, Job.id == Result.job_id).where(Job.study_id == study_id)
    )
    return found is not None


def _cancel_deliveries(session: Session, job_id: str) -> None:
    """The superseded job's pending deliveries will not be sent."""
    session.execute(
        update(Delivery)
        .where(Delivery.job_id == job_id, Delivery.state == DeliveryState.PENDING)
        .values(state=DeliveryState.CANCELLED, updated_at=utcnow())
    )


def holds(job: Job | None, owner: str) -> bool:
    """Whether ``owner`` still runs the job: it is ``processing`` under ``owner``'s lease (not
    superseded, finished, or taken over after the lease ran out)."""
    return job is not None and job.state == JobState.PROCESSING and job.lease_owner == owner


def leased_elsewhere(job: Job, owner: str) -> bool:
    """Whether another worker's live lease holds the job (it is running it now)."""
    return (
        job.state == JobState.PROCESSING
        and job.lease_owner not in (None, owner)
        and job.lease_until is not None
        and job.lease_until > utcnow()
    )


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend ``owner``'s lease of a job it is running; ``False`` when it no longer holds it."""
    job = session.scalar(
        select(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.PROCESSING)
        .with_for_update()
    )
    if job is None:
        return False
    job.lease_until = utcnow() + timedelta(seconds=lease_seconds)
    return True


# ---------------------------------------------------------------------------------- jobs


def begin_attempt(session: Session, job: Job, owner: str, lease_seconds: float) -> None:
    """Worker ``owner`` took the job: count the attempt, lease it, move it to ``processing``.

    The lease (renewed by :func:`renew_lease` while the worker runs the job) is what owns the
    job, not the queue connection that delivered it: a redelivered message finds the job leased
    (:func:`leased_elsewhere`) and waits, and only after the lease ran out may another worker
    take it over.
    """
    job.attempts += 1
    job.retry_at = None
    job.lease_owner = owner
    job.lease_until = utcnow() + timedelta(seconds=lease_seconds)
    _move(session, job, JobState.PROCESSING)


def store_result(session: Session, job: Job, result: ResultSet, config: NodeConfig) -> int:
    """Persist ``result`` as the job's one result row, queue its deliveries, move the job on.

    Returns the number of delivery rows created; with none the job is ``done`` at once.
    """
    exists = session.scalar(select(Result.id).where(Result.job_id == job.id))
    if exists is None:
        session.add(
            Result(
                job_id=job.id,
                series_instance_uid=result.series_instance_uid,
                nodules=nodules_json(result.nodules),
                detail=result.to_json(),
            )
        )
    job.timings = {k: round(v, 1) for k, v in result.timings_ms.items()}
    job.backend = result.backend
    job.findings = len(result.nodules)
    study = session.get(Study, job.study_id)
    calling_ae = study.calling_ae if study is not None else ""
    rows = delivery_rows(
        config, calling_ae, job.id, result.objects, ReportStatus.PRELIMINARY, result.fhir_path
    )
    session.add_all(rows)
    _move(session, job, JobState.DELIVERING if rows else JobState.DONE)
    return len(rows)


def settle_failure(session: Session, job: Job, decision: Decision, config: NodeConfig) -> None:
    """Record a failed attempt as ``decision`` says: back to ``queued``, ``rejected`` or ``failed``.

    A retried job goes back to the outbox: unpublished, with ``retry_at`` after the decided
    delay (the publisher sends it then). A rejected or failed job's FHIR report goes
    ``cancelled`` with the reason, unless the study has results from an earlier job.
    """
    failure = (decision.code, decision.detail)
    if decision.verdict is Verdict.RETRY:
        job.published_at = None
        job.retry_at = utcnow() + timedelta(seconds=decision.delay_seconds)
        _move(
            session, job, JobState.QUEUED, (decision.code, f"attempt {job.attempts}: {failure[1]}")
        )
        return
    state = JobState.REJECTED if decision.verdict is Verdict.REJECT else JobState.FAILED
    _move(session, job, state, failure)
    study = session.get(Study, job.study_id)
    if study is not None and not _has_results(session, study.id):
        session.add_all(delivery_rows(config, study.calling_ae, job.id, (), ReportStatus.CANCELLED))


def settle_deliveries(session: Session, job_id: str) -> None:
    """Finish a ``delivering`` job: ``done`` when every delivery is, ``failed`` if one failed."""
    job = session.get(Job, job_id)
    if job is None or job.state != JobState.DELIVERING:
        return
    rows = session.scalars(select(Delivery).where(Delivery.job_id == job_id)).all()
    if any(row.state == DeliveryState.PENDING for row in rows):
        return
    failed = [row for row in rows if row.state == DeliveryState.FAILED]
    if not failed:
        _move(session, job, JobState.DONE)
        return
    reasons = sorted({f"{row.destination}: {row.error_code}: {row.error}" for row in failed})
    _move(session, job, JobState.FAILED, (ErrorCode.DELIVERY_FAILED, "; ".join(reasons)))


# ---------------------------------------------------------------------------------- deliveries


def delivery_rows(
    config: NodeConfig,
    calling_ae: str,
    job_id: str,
    objects: Sequence[ResultObject],
    report_status: ReportStatus | None,
    report_path: str | None = None,
) -> list[Delivery]:
    """The delivery rows of a job: each stored DICOM object to each DICOM destination of the
    calling AE (the rejection note as a retraction, none where ``retraction: none``), and the
    FHIR report's ``report_status`` (with the stored resources at ``report_path``, if any) to
    each FHIR destination."""
    rows = []
    for destination in config.destinations_for(calling_ae):
        if isinstance(destination, FhirDestination):
            if report_status is not None:
                rows.append(
                    Delivery(
                        job_id=job_id,
                        destination=destination.name,
                        kind=DeliveryKind.FHIR,
                        object_uid="",
                        report_status=report_status.value,
                        path=report_path,
                        attempts=0,
                        state=DeliveryState.PENDING,
                    )
                )
            continue
        rows += [
            Delivery(
                job_id=job_id,
                destination=destination.name,
                kind=_DELIVERY_KIND[obj.kind],
                object_uid=obj.sop_instance_uid,
                report_status="",
                path=obj.path,
                attempts=0,
                state=DeliveryState.PENDING,
            )
            for obj in objects
            if obj.kind is not ObjectKind.REJECTION or destination.retraction is not Retraction.NONE
        ]
    return rows


#: How each result object travels to a DICOM destination.
_DELIVERY_KIND = {
    ObjectKind.SEG: DeliveryKind.DICOM,
    ObjectKind.SR: DeliveryKind.DICOM,
    ObjectKind.GSPS: DeliveryKind.DICOM,
    ObjectKind.KEY_IMAGE: DeliveryKind.DICOM,
    ObjectKind.HEATMAP: DeliveryKind.DICOM,
    ObjectKind.REJECTION: DeliveryKind.RETRACTION,
}


def record_delivery(row: Delivery, failure: Decision | None) -> None:
    """Record one send attempt of ``row``: confirmed (``failure`` is ``None``), retried after the
    decided delay, or failed for good (the decision comes from the retry policy)."""
    if row.state != DeliveryState.PENDING:
        raise IllegalTransition(f"delivery {row.id} is {row.state}, not pending")
    row.attempts += 1
    if failure is None:
        row.state, row.error_code, row.error = DeliveryState.DONE, None, None
        return
    row.error_code, row.error = failure.code.value, failure.detail
    if failure.verdict is Verdict.RETRY:
        row.next_attempt_at = utcnow() + timedelta(seconds=failure.delay_seconds)
    else:
        row.state = DeliveryState.FAILED
