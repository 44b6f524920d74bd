"""Reads behind the dashboard: stage durations, percentiles, throughput and the page data.

Stage durations come from the job's state timestamps (``ingest``: study received → job created;
``queue_wait``: queued → processing; ``processing``: processing → delivering; ``delivery``:
delivering → done; ``end_to_end``: queued → done) and from the worker's ``Job.timings`` (stage
name → milliseconds), so the dashboard and ``/metrics`` read the same truth as the API.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from dicom_node.dashboard.models import (
    DeliveryOut,
    FailureRow,
    JobOut,
    LatencyPoint,
    SeriesOut,
    StageStats,
    StudyRow,
    ThroughputPoint,
    Totals,
)
from dicom_node.db import (
    Database,
    Delivery,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    StudyState,
    utcnow,
)

DERIVED_STAGES = ("ingest", "queue_wait", "processing", "delivery", "end_to_end")
_SPANS = {
    "queue_wait": ("queued_at", "processing_at"),
    "processing": ("processing_at", "delivering_at"),
    "delivery": ("delivering_at", "done_at"),
    "end_to_end": ("queued_at", "done_at"),
}


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds() * 1000.0)


def job_durations(job: Job, received_at: datetime | None = None) -> dict[str, float]:
    """Stage name → milliseconds for ``job`` (derived spans, then the worker's timings)."""
    out: dict[str, float] = {}
    ingest = _ms(received_at, job.created_at) if job.supersedes is None else None
    if ingest is not None:
        out["ingest"] = ingest
    for stage, (start, end) in _SPANS.items():
        value = _ms(getattr(job, start), getattr(job, end))
        if value is not None:
            out[stage] = value
    for stage, value in (job.timings or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[str(stage)] = float(value)
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0–100) of already sorted values."""
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def stage_stats(samples: Iterable[dict[str, float]]) -> list[StageStats]:
    """p50/p95/p99 per stage over duration dicts, stages in flow order."""
    by_stage: dict[str, list[float]] = defaultdict(list)
    for durations in samples:
        for stage, value in durations.items():
            by_stage[stage].append(value)
    order = [s for s in DERIVED_STAGES if s in by_stage] + sorted(
        s for s in by_stage if s not in DERIVED_STAGES
    )
    result = []
    for stage in order:
        values = sorted(by_stage[stage])
        result.append(
            StageStats(
                stage=stage,
                count=len(values),
                p50=percentile(values, 50),
                p95=percentile(values, 95),
                p99=percentile(values, 99),
            )
        )
    return result


def jobs_with_received(
    session: Session, since: datetime | None = None
) -> list[tuple[Job, datetime]]:
    """Jobs (created since ``since``) with their study's first receive time."""
    query = select(Job, Study.received_at).join(Study, Study.id == Job.study_id)
    if since is not None:
        query = query.where(Job.created_at >= since)
    return [(job, received) for job, received in session.execute(query).all()]


def latency_series(db: Database, window: timedelta, buckets: int) -> list[LatencyPoint]:
    """Per-bucket stage percentiles of the jobs created within ``window`` (oldest bucket first)."""
    now = utcnow()
    start = now - window
    width = window / buckets
    grouped: dict[int, list[dict[str, float]]] = defaultdict(list)
    with db.session() as session:
        for job, received in jobs_with_received(session, start):
            index = min(buckets - 1, int((job.created_at - start) / width))
            grouped[index].append(job_durations(job, received))
    return [
        LatencyPoint(t=start + width * i, stages=stage_stats(grouped[i]))
        for i in range(buckets)
        if grouped.get(i)
    ]


def _bucket_counts(
    times: Iterable[datetime | None], start: datetime, width: timedelta, n: int
) -> list[int]:
    counts = [0] * n
    for t in times:
        if t is not None and t >= start:
            counts[min(n - 1, int((t - start) / width))] += 1
    return counts


def throughput_series(db: Database, window: timedelta, buckets: int) -> list[ThroughputPoint]:
    """Instances received and jobs queued/done/failed per time bucket within ``window``."""
    now = utcnow()
    start = now - window
    width = window / buckets
    with db.session() as session:
        received = session.scalars(
            select(Instance.received_at).where(Instance.received_at >= start)
        )
        instances = _bucket_counts(received, start, width, buckets)
        jobs = session.execute(
            select(Job.queued_at, Job.done_at, Job.failed_at).where(
                or_(Job.queued_at >= start, Job.done_at >= start, Job.failed_at >= start)
            )
        ).all()
    queued = _bucket_counts((j.queued_at for j in jobs), start, width, buckets)
    done = _bucket_counts((j.done_at for j in jobs), start, width, buckets)
    failed = _bucket_counts((j.failed_at for j in jobs), start, width, buckets)
    return [
        ThroughputPoint(
            t=start + width * i,
            instances=instances[i],
            jobs_queued=queued[i],
            jobs_done=done[i],
            jobs_failed=failed[i],
        )
        for i in range(buckets)
    ]


def totals(points: Sequence[ThroughputPoint]) -> Totals:
    """Sum of a throughput series."""
    return Totals(
        instances=sum(p.instances for p in points),
        jobs_queued=sum(p.jobs_queued for p in points),
        jobs_done=sum(p.jobs_done for p in points),
        jobs_failed=sum(p.jobs_failed for p in points),
    )


def counts_by(session: Session, column: object) -> dict[str, int]:
    """``SELECT column, count(*) GROUP BY column`` as a dict."""
    rows = session.execute(select(column, func.count()).group_by(column)).all()  # type: ignore[call-overload]
    return {str(key): int(count) for key, count in rows}


def study_row(study: Study, job: Job | None, series: int) -> StudyRow:
    """A studies-list row."""
    return StudyRow(
        study_instance_uid=study.study_instance_uid,
        state=study.state,
        instances=study.instances,
        series=series,
        calling_ae=study.calling_ae,
        received_at=study.received_at,
        updated_at=study.updated_at,
        job_id=job.id if job else None,
        attempts=job.attempts if job else 0,
        backend=job.backend if job else None,
        findings=job.findings if job else None,
        durations_ms=job_durations(job, study.received_at) if job else {},
        error_code=study.error_code,
        error=study.error,
    )


def _series_counts(session: Session, study_ids: list[int]) -> dict[int, int]:
    if not study_ids:
        return {}
    rows = session.execute(
        select(Series.study_id, func.count())
        .where(Series.study_id.in_(study_ids))
        .group_by(Series.study_id)
    ).all()
    return {int(sid): int(n) for sid, n in rows}


def search_studies(
    db: Database, state: str | None, q: str | None, limit: int, offset: int
) -> tuple[int, list[StudyRow]]:
    """Studies filtered by state and a search over study UID, calling AE and job id."""
    query = select(Study, Job).outerjoin(Job, Job.id == Study.current_job_id)
    if state:
        if state not in set(StudyState):
            return 0, []
        query = query.where(Study.state == StudyState(state))
    if q:
        pattern = f"%{q.strip()}%"
        query = query.where(
            or_(
                Study.study_instance_uid.like(pattern),
                Study.calling_ae.like(pattern),
                Study.current_job_id.like(pattern),
            )
        )
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.execute(
            query.order_by(Study.received_at.desc()).limit(limit).offset(offset)
        ).all()
        series = _series_counts(session, [s.id for s, _j in rows])
    return int(total), [study_row(s, j, series.get(s.id, 0)) for s, j in rows]


def job_out(job: Job, received_at: datetime) -> JobOut:
    """A job as the study page shows it."""
    return JobOut(
        id=job.id,
        state=job.state,
        attempts=job.attempts,
        instances=job.instances,
        error_code=job.error_code,
        error=job.error,
        supersedes=job.supersedes,
        created_at=job.created_at,
        queued_at=job.queued_at,
        published_at=job.published_at,
        processing_at=job.processing_at,
        delivering_at=job.delivering_at,
        done_at=job.done_at,
        rejected_at=job.rejected_at,
        failed_at=job.failed_at,
        superseded_at=job.superseded_at,
        discarded_at=job.discarded_at,
        timings=job.timings,
        backend=job.backend,
        findings=job.findings,
        durations_ms=job_durations(job, received_at),
    )


def study_parts(
    session: Session, study: Study
) -> tuple[list[SeriesOut], list[JobOut], list[DeliveryOut]]:
    """Series, jobs (newest first) and deliveries of ``study``."""
    series = session.scalars(select(Series).where(Series.study_id == study.id)).all()
    jobs = session.scalars(
        select(Job).where(Job.study_id == study.id).order_by(Job.created_at.desc())
    ).all()
    deliveries = session.scalars(
        select(Delivery).where(Delivery.job_id.in_([j.id for j in jobs])).order_by(Delivery.id)
    ).all()
    return (
        [
            SeriesOut(
                series_instance_uid=s.series_instance_uid,
                modality=s.modality,
                instances=s.instances,
            )
            for s in series
        ],
        [job_out(j, study.received_at) for j in jobs],
        [
            DeliveryOut(
                id=d.id,
                job_id=d.job_id,
                destination=d.destination,
                kind=d.kind,
                state=d.state,
                attempts=d.attempts,
                updated_at=d.updated_at,
                error_code=d.error_code,
                error=d.error,
            )
            for d in deliveries
        ],
    )


FAILED_STATES = (JobState.FAILED, JobState.REJECTED)


def failures(db: Database, include_history: bool, limit: int) -> list[FailureRow]:
    """Failed and rejected jobs, newest first, with their reasons.

    By default only those still current for their study and not discarded; with
    ``include_history`` also those retried since (superseded) or discarded.
    """
    query = (
        select(Job, Study)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state.in_(FAILED_STATES))
        .order_by(Job.created_at.desc())
        .limit(limit)
    )
    if not include_history:  # what still needs an operator: current and not discarded
        query = query.where(Job.discarded_at.is_(None), Study.current_job_id == Job.id)
    with db.session() as session:
        rows = session.execute(query).all()
    return [
        FailureRow(
            job_id=job.id,
            study_instance_uid=study.study_instance_uid,
            state=job.state,
            error_code=job.error_code,
            error=job.error,
            attempts=job.attempts,
            ended_at=job.failed_at or job.rejected_at,
            current=study.current_job_id == job.id,
            discarded_at=job.discarded_at,
        )
        for job, study in rows
    ]
