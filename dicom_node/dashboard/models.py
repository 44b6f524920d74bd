"""Response models of the dashboard's JSON API (they make its OpenAPI schema at ``/docs``).

Identifiers, states, counts and times only: no patient attributes, except in
:class:`PatientOut`, which is filled only when ``NODULEAI_SHOW_PATIENT_DATA`` allows it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class QueueOut(BaseModel):
    """A queue: messages waiting and consumers attached (``None`` when unknown)."""

    name: str
    role: str
    messages: int | None
    consumers: int | None
    error: str | None


class WorkerOut(BaseModel):
    """A worker and its last heartbeat."""

    id: str
    host: str
    backend: str | None
    started_at: datetime
    last_heartbeat: datetime
    age_seconds: float
    alive: bool
    current_job_id: str | None


class StageStats(BaseModel):
    """Latency percentiles of one stage, in milliseconds (nearest rank)."""

    stage: str
    count: int
    p50: float
    p95: float
    p99: float


class LatencyPoint(BaseModel):
    """Per-stage percentiles of the jobs created in one time bucket."""

    t: datetime
    stages: list[StageStats]


class ThroughputPoint(BaseModel):
    """What happened in one time bucket."""

    t: datetime
    instances: int
    jobs_queued: int
    jobs_done: int
    jobs_failed: int


class Totals(BaseModel):
    """Counts over the last hour."""

    instances: int
    jobs_queued: int
    jobs_done: int
    jobs_failed: int


class OverviewOut(BaseModel):
    """The overview page's data."""

    generated_at: datetime
    queue_backend: str
    queues: list[QueueOut]
    outbox: int
    studies_by_state: dict[str, int]
    jobs_by_state: dict[str, int]
    instances_total: int
    workers: list[WorkerOut]
    last_hour: Totals
    latency: list[StageStats]


class StudyRow(BaseModel):
    """A study in the studies list."""

    study_instance_uid: str
    state: str
    instances: int
    series: int
    calling_ae: str
    received_at: datetime
    updated_at: datetime
    job_id: str | None
    attempts: int
    backend: str | None
    findings: int | None
    durations_ms: dict[str, float]
    error_code: str | None
    error: str | None


class StudyPage(BaseModel):
    """A page of the studies list and the total matching the filter."""

    total: int
    items: list[StudyRow]


class SeriesOut(BaseModel):
    """A series of a study."""

    series_instance_uid: str
    modality: str | None
    instances: int


class JobOut(BaseModel):
    """A job with every state timestamp, its timings and derived stage durations."""

    id: str
    state: str
    attempts: int
    instances: int
    error_code: str | None
    error: str | None
    supersedes: str | None
    created_at: datetime
    queued_at: datetime | None
    published_at: datetime | None
    processing_at: datetime | None
    delivering_at: datetime | None
    done_at: datetime | None
    rejected_at: datetime | None
    failed_at: datetime | None
    superseded_at: datetime | None
    discarded_at: datetime | None
    timings: dict[str, float] | None
    backend: str | None
    findings: int | None
    durations_ms: dict[str, float]


class DeliveryOut(BaseModel):
    """A result delivery to one destination."""

    id: int
    job_id: str
    destination: str
    kind: str
    state: str
    attempts: int
    updated_at: datetime
    error_code: str | None
    error: str | None


class AuditOut(BaseModel):
    """One audit-log row."""

    at: datetime
    actor: str
    action: str
    target: str | None
    detail: str | None


class PatientOut(BaseModel):
    """Patient attributes read from the spool (only when the setting allows it)."""

    PatientName: str | None
    PatientID: str | None
    PatientBirthDate: str | None


class StudyDetail(BaseModel):
    """The study page's data."""

    study: StudyRow
    #: The current result's nodules as the findings API lists them
    #: (:meth:`dicom_node.results.ReportedNodule.to_json`).
    nodules: list[dict[str, Any]]
    #: The model that found them (``name version``), once the current job has a result.
    model: str | None
    #: The study's Lung-RADS v2022 category, once assessed.
    lung_rads: str | None
    #: The comparison with the prior CT or why there is none (``None``: no priors policy).
    prior: dict[str, Any] | None = None
    #: Why the series is outside what the detector was validated on (empty when it is not).
    input_review: list[str] = []
    #: The current result's files on the node (its DICOM objects and FHIR resources), for a
    #: study whose results went nowhere (no destination for its sender).
    result_files: list[str] = []
    series: list[SeriesOut]
    jobs: list[JobOut]
    deliveries: list[DeliveryOut]
    audit: list[AuditOut]
    patient: PatientOut | None
    patient_data_shown: bool


class FailureRow(BaseModel):
    """A failed or rejected job, with its reason."""

    job_id: str
    study_instance_uid: str
    state: str
    error_code: str | None
    error: str | None
    attempts: int
    ended_at: datetime | None
    current: bool
    discarded_at: datetime | None


class DeadLetterOut(BaseModel):
    """A message in the dead-letter queue."""

    job_id: str | None
    study_instance_uid: str | None
    redelivered: bool


class FailuresOut(BaseModel):
    """The failures page's data."""

    failures: list[FailureRow]
    dead_letters: list[DeadLetterOut]
    dead_letter_queue: QueueOut


class ActionOut(BaseModel):
    """The outcome of an action."""

    action: str
    study_instance_uid: str
    job_id: str
    new_job_id: str | None
    detail: str


class ConfigOut(BaseModel):
    """The configuration page's data: secrets masked."""

    settings: dict[str, Any]
    ae_policies: list[dict[str, Any]]
    destinations: list[dict[str, Any]]
    auth: dict[str, Any]


class SessionOut(BaseModel):
    """Who a request is signed in as: the actor (``token`` or a user name) and the role."""

    actor: str | None
    role: str
