"""The dashboard's reads and actions as plain functions, shared by the JSON API and the pages."""

from __future__ import annotations

import io
from datetime import timedelta

from PIL import Image
from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.dashboard.actions import ActionError, ActionOutcome, discard, rerun, retry
from dicom_node.dashboard.auth import audit
from dicom_node.dashboard.context import Dashboard, mask_secrets
from dicom_node.dashboard.models import (
    AuditOut,
    ConfigOut,
    DeadLetterOut,
    FailuresOut,
    OverviewOut,
    QueueOut,
    StudyDetail,
    WorkerOut,
)
from dicom_node.dashboard.patient import read_patient
from dicom_node.dashboard.queries import (
    counts_by,
    failures,
    job_durations,
    jobs_with_received,
    stage_stats,
    study_parts,
    study_row,
    throughput_series,
    totals,
)
from dicom_node.db import AuditEntry, Instance, Job, JobState, Study, utcnow
from dicom_node.results import ObjectKind, ResultSet, stored_result
from dicom_node.workers import is_alive, list_workers

ROLES = ("work", "dead letters")


def queues_out(dash: Dashboard) -> list[QueueOut]:
    """Depth and consumers of the work and dead-letter queues."""
    return [
        QueueOut(name=q.name, role=role, messages=q.messages, consumers=q.consumers, error=q.error)
        for role, q in zip(ROLES, dash.queues.depths(), strict=True)
    ]


def workers_out(dash: Dashboard) -> list[WorkerOut]:
    """Every worker with the age of its last heartbeat. A worker whose heartbeat went stale is
    working on nothing (its job's lease runs out and another worker takes the job over): its
    current job is shown as none, not as the one it held when it died."""
    now = utcnow()
    workers = []
    for w in list_workers(dash.db):
        alive = is_alive(w, now)
        workers.append(
            WorkerOut(
                id=w.id,
                host=w.host,
                backend=w.backend,
                started_at=w.started_at,
                last_heartbeat=w.last_heartbeat,
                age_seconds=(now - w.last_heartbeat).total_seconds(),
                alive=alive,
                current_job_id=w.current_job_id if alive else None,
            )
        )
    return workers


def overview(dash: Dashboard, window: timedelta) -> OverviewOut:
    """The overview: queues, outbox, states, workers, last-hour totals, latency over ``window``."""
    with dash.db.session() as session:
        studies = counts_by(session, Study.state)
        jobs = counts_by(session, Job.state)
        instances = session.scalar(select(func.count()).select_from(Instance)) or 0
        outbox = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.state == JobState.QUEUED, Job.published_at.is_(None))
        )
        since = utcnow() - window
        latency = stage_stats(job_durations(j, r) for j, r in jobs_with_received(session, since))
    return OverviewOut(
        generated_at=utcnow(),
        queue_backend=dash.queues.kind,
        queues=queues_out(dash),
        outbox=outbox or 0,
        studies_by_state=studies,
        jobs_by_state=jobs,
        instances_total=instances,
        workers=workers_out(dash),
        last_hour=totals(throughput_series(dash.db, timedelta(hours=1), 12)),
        latency=latency,
    )


def _files(dash: Dashboard, result: ResultSet | None) -> list[str]:
    """Where the result's files lie on the node (absolute paths)."""
    if result is None:
        return []
    root = dash.settings.spool_dir.resolve()
    return [str(root / o.path) for o in result.objects] + [str(root / result.fhir_path)]


def study_detail(dash: Dashboard, study_uid: str) -> StudyDetail | None:
    """Everything the study page shows, or ``None`` for an unknown study."""
    with dash.db.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        if study is None:
            return None
        series, jobs, deliveries = study_parts(session, study)
        targets = [study_uid, *(j.id for j in jobs)]
        audit_rows = session.scalars(
            select(AuditEntry)
            .where(AuditEntry.target.in_(targets))
            .order_by(AuditEntry.at.desc())
            .limit(100)
        ).all()
        current = session.get(Job, study.current_job_id) if study.current_job_id else None
        result = stored_result(session, study.current_job_id)
        show = dash.settings.show_patient_data
        patient = read_patient(session, study, dash.settings.spool_dir) if show else None
        return StudyDetail(
            study=study_row(study, current, len(series)),
            nodules=[n.to_json() for n in result.nodules] if result else [],
            model=result.model.display if result else None,
            lung_rads=(result.lung_rads or None) if result else None,
            prior=result.prior.to_json() if result and result.prior else None,
            input_review=list(result.input_review) if result else [],
            result_files=_files(dash, result),
            series=series,
            jobs=jobs,
            deliveries=deliveries,
            audit=[_audit_out(a) for a in audit_rows],
            patient=patient,
            patient_data_shown=show,
        )


#: Longest side of a finding's thumbnail on the study page (pixels).
THUMBNAIL_PX = 256


def finding_thumbnail(dash: Dashboard, study_uid: str, number: int) -> bytes | None:
    """PNG of finding ``number``'s key image in the study's current result (``None``: no such
    study, result or finding): the stored Secondary Capture (lung window, outline, finding
    burned in, nothing of the patient), scaled to :data:`THUMBNAIL_PX`."""
    with dash.db.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        result = stored_result(session, study.current_job_id) if study is not None else None
    if result is None:
        return None
    image = next(
        (o for o in result.objects if o.kind is ObjectKind.KEY_IMAGE and o.finding == number), None
    )
    if image is None:  # no such finding, or one without a key image (diffuse disease)
        return None
    ds = dcmread(dash.settings.spool_dir / image.path)
    thumbnail = Image.fromarray(ds.pixel_array, mode="RGB")
    thumbnail.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG")
    return buffer.getvalue()


def _audit_out(entry: AuditEntry) -> AuditOut:
    return AuditOut(
        at=entry.at,
        actor=entry.actor,
        action=entry.action,
        target=entry.target,
        detail=entry.detail,
    )


def audit_log(dash: Dashboard, limit: int) -> list[AuditOut]:
    """The newest audit rows."""
    with dash.db.session() as session:
        rows = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))
        return [_audit_out(a) for a in rows]


def failures_out(dash: Dashboard, include_history: bool, limit: int) -> FailuresOut:
    """Failed/rejected jobs, the dead letters, and the dead-letter queue's depth."""
    dead = dash.queues.dead_letters(limit)
    return FailuresOut(
        failures=failures(dash.db, include_history, limit),
        dead_letters=[
            DeadLetterOut(
                job_id=d.job_id, study_instance_uid=d.study_instance_uid, redelivered=d.redelivered
            )
            for d in dead
        ],
        dead_letter_queue=queues_out(dash)[1],
    )


def config_out(dash: Dashboard) -> ConfigOut:
    """Settings, AE policies and destinations, secrets masked."""
    node = dash.config
    return ConfigOut(
        settings=mask_secrets(dash.settings.effective()),
        ae_policies=[p.model_dump(mode="json") for p in node.ae_policies],
        destinations=mask_secrets([d.model_dump(mode="json") for d in node.destinations]),
        auth={
            "token": dash.creds.token is not None,
            "basic_users": sorted(dash.creds.users),
            "read_only_users": sorted(dash.creds.readers),
            "public_read": dash.creds.public_read,
            "show_patient_data": dash.settings.show_patient_data,
        },
    )


def act(dash: Dashboard, actor: str, action: str, target: str) -> ActionOutcome:
    """Run ``action`` on ``target`` (a study UID; a job id for discard), audit it, wake the outbox.

    Raises
    ------
    ActionError
        When the action does not apply; the refusal is audited too.
    """
    try:
        if action == "discard":
            outcome = discard(dash.db, target)
            removed = dash.queues.discard_dead_letters(target)
            outcome = ActionOutcome(
                outcome.study_instance_uid,
                outcome.job_id,
                None,
                f"{outcome.detail}; {removed} dead letter(s) removed",
            )
        else:
            outcome = (retry if action == "retry" else rerun)(dash.db, dash.config, target)
    except ActionError as exc:
        audit(dash.db, actor, f"{action}.rejected", target, str(exc))
        raise
    detail = outcome.detail + (f"; new job {outcome.new_job_id}" if outcome.new_job_id else "")
    audit(dash.db, actor, action, target, detail)
    if outcome.new_job_id:
        dash.on_job()
    return outcome
