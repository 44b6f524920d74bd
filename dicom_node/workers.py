"""Worker heartbeats: each worker upserts its row; the dashboard reads them.

A worker calls :func:`record_heartbeat` every few seconds (and when it takes or finishes a job),
so the dashboard shows which workers are alive, on which host and backend, and what they are
working on. Rows carry ids and host names only, never patient attributes.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from dicom_node.db import Database, WorkerHeartbeat, utcnow

#: A worker whose last heartbeat is older than this is shown as stale.
STALE_AFTER = timedelta(seconds=60)


def record_heartbeat(
    db: Database,
    worker_id: str,
    host: str,
    backend: str | None,
    current_job_id: str | None,
) -> None:
    """Insert or update the heartbeat row of ``worker_id``.

    Parameters
    ----------
    db : Database
        The service database.
    worker_id : str
        Stable id of the worker process (e.g. ``host:pid``), at most 128 characters.
    host : str
        Host name the worker runs on.
    backend : str or None
        Inference backend in use (``onnxruntime-cpu``, ``tensorrt``, ...).
    current_job_id : str or None
        The job being worked on, ``None`` when idle.
    """
    now = utcnow()
    with db.session() as session:
        worker = session.scalar(
            select(WorkerHeartbeat).where(WorkerHeartbeat.id == worker_id).with_for_update()
        )
        if worker is None:
            worker = WorkerHeartbeat(id=worker_id, host=host, started_at=now)
            session.add(worker)
        worker.host = host
        worker.backend = backend
        worker.current_job_id = current_job_id
        worker.last_heartbeat = now


def list_workers(db: Database) -> list[WorkerHeartbeat]:
    """Every worker row, most recent heartbeat first."""
    with db.session() as session:
        return list(
            session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.last_heartbeat.desc()))
        )


def is_alive(worker: WorkerHeartbeat, now: datetime | None = None) -> bool:
    """Whether ``worker`` sent a heartbeat within :data:`STALE_AFTER`."""
    return (now or utcnow()) - worker.last_heartbeat <= STALE_AFTER
