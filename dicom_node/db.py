"""Database: the schema (SQLAlchemy 2) and the engine.

Every state change of a study, a job or a delivery is a row update with a timestamp, made by
:mod:`dicom_node.lifecycle` (the one owner of those changes), so the dashboard, the metrics and the
API read the same truth. State columns hold the enums below; failures are ``(error_code, error)``.
The schema is created and migrated by Alembic (``noduleai db upgrade``); the same schema runs on
SQLite (WAL, the embedded default) and on PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

UID = String(64)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class StudyState(StrEnum):
    """Where a study is; see DESIGN.md's data flow."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    DELIVERING = "delivering"
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"
    #: Retrieved from a PACS as another study's prior (:mod:`pipelines.priors`): stored, never
    #: study input (instances arriving for it later neither reopen it nor make a job).
    PRIOR = "prior"


class JobState(StrEnum):
    """Where a job is; a job superseded by a newer job of the same study stops there."""

    QUEUED = "queued"
    PROCESSING = "processing"
    DELIVERING = "delivering"
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class DeliveryState(StrEnum):
    """Where a delivery is; ``cancelled``: its job was superseded before it was sent."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DeliveryKind(StrEnum):
    """What a delivery row carries: a DICOM result object, a FHIR report status, or the
    retraction of replaced results (the rejection note: stored, or carried out by deletion)."""

    DICOM = "dicom"
    FHIR = "fhir"
    RETRACTION = "retraction"


class ReportStatus(StrEnum):
    """The FHIR DiagnosticReport statuses the node publishes (R4 ``diagnostic-report-status``)."""

    REGISTERED = "registered"
    PRELIMINARY = "preliminary"
    CANCELLED = "cancelled"


def _state_column(enum: type[StrEnum]) -> Enum:
    """A column type that stores the enum's values (VARCHAR(16), as the migrations create)."""
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base of every table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class Study(Base):
    """A study as the node has received it."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[StudyState] = mapped_column(
        _state_column(StudyState), default=StudyState.RECEIVING, index=True
    )
    calling_ae: Mapped[str] = mapped_column(String(16))
    instances: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    current_job_id: Mapped[str | None] = mapped_column(String(36), default=None)
    error_code: Mapped[str | None] = mapped_column(String(32), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)


class Series(Base):
    """A series of a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16), default=None)
    instances: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    """One stored SOP instance; ``path`` is relative to the spool root."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(400))
    size: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """One inference job of a study; the outbox row for its queue message."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_unpublished", "state", "published_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    state: Mapped[JobState] = mapped_column(_state_column(JobState), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    instances: Mapped[int] = mapped_column(Integer)
    #: An :class:`~dicom_node.errors.ErrorCode` or :class:`~dicom_node.errors.RejectionCode` value.
    error_code: Mapped[str | None] = mapped_column(String(32), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    supersedes: Mapped[str | None] = mapped_column(String(36), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(default=None)
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    #: A retried job is published again (by the outbox) no earlier than this.
    retry_at: Mapped[datetime | None] = mapped_column(default=None)
    #: The worker running the job, and until when its lease holds (renewed while it runs).
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    processing_at: Mapped[datetime | None] = mapped_column(default=None)
    delivering_at: Mapped[datetime | None] = mapped_column(default=None)
    done_at: Mapped[datetime | None] = mapped_column(default=None)
    rejected_at: Mapped[datetime | None] = mapped_column(default=None)
    failed_at: Mapped[datetime | None] = mapped_column(default=None)
    superseded_at: Mapped[datetime | None] = mapped_column(default=None)
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON, default=None)
    backend: Mapped[str | None] = mapped_column(String(64), default=None)
    findings: Mapped[int | None] = mapped_column(Integer, default=None)
    discarded_at: Mapped[datetime | None] = mapped_column(default=None)


class Delivery(Base):
    """One result object, or one FHIR report status, on its way to one destination.

    DICOM objects get a row each (``object_uid`` is the SOP Instance UID, ``path`` the stored
    result file relative to the spool), so that only what a destination did not confirm is sent
    again. A FHIR row carries the report status to publish (``report_status``); the
    ``preliminary`` one also the stored FHIR resources (``path``). A retraction row carries the
    rejection note (``path``); it is sent only after the job's objects were confirmed there.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint(
            "job_id",
            "destination",
            "object_uid",
            "report_status",
            name="uq_deliveries_job_destination_object",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[DeliveryKind] = mapped_column(_state_column(DeliveryKind))
    object_uid: Mapped[str] = mapped_column(UID, default="")
    report_status: Mapped[str] = mapped_column(String(16), default="")
    path: Mapped[str | None] = mapped_column(String(400), default=None)
    state: Mapped[DeliveryState] = mapped_column(
        _state_column(DeliveryState), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(String(32), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)


class AuditEntry(Base):
    """Who did what, when: actions on jobs and configuration."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(128), default=None)
    detail: Mapped[str | None] = mapped_column(Text, default=None)


class WorkerHeartbeat(Base):
    """A worker process and its last heartbeat (upserted by :mod:`dicom_node.workers`)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    backend: Mapped[str | None] = mapped_column(String(64), default=None)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    current_job_id: Mapped[str | None] = mapped_column(String(36), default=None)


class QueueMessage(Base):
    """A message of the embedded durable queue (used when no AMQP URL is configured)."""

    __tablename__ = "queue_messages"
    __table_args__ = (Index("ix_queue_ready", "queue", "acked_at", "available_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    queue: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    available_at: Mapped[datetime] = mapped_column(default=utcnow)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    acked_at: Mapped[datetime | None] = mapped_column(default=None)


class ReturnedResult(Base):
    """One of our own result objects that a PACS sent back (with a study it forwards, say).

    Stored once, so the sender sees success, but never study input: it neither reopens a study
    nor counts among its instances. ``path`` is relative to the spool.
    """

    __tablename__ = "returned_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(400))
    size: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Result(Base):
    """The result set of one job: exactly one per job (the unique ``job_id``), written together
    with the job's move out of ``processing`` so that a redelivered job cannot add a second."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    nodules: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def new_job_id() -> str:
    """A fresh job id (a random UUID; it carries nothing about the patient)."""
    return str(uuid.uuid4())


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE (below) instead of pysqlite's
    # deferred BEGIN: a deferred read-then-write transaction fails at once with "database is
    # locked" when another connection wrote in between, whatever the busy timeout.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Create the engine for ``url``: SQLite gets WAL, full sync and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Database:
    """The engine and its session factory, passed down from start-up."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
