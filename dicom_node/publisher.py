"""The job publisher: the outbox of job rows, drained into the job queue.

The job row is committed first (by completeness); this thread then publishes every queued job
that has no confirmation yet (and whose ``retry_at``, if a retry set one, has come) and stamps
``published_at`` once the queue confirmed it. While the
broker is down, jobs simply wait in the outbox and the loop tries again, so a study received
during an outage is published once the broker is back. There is one mechanism for both the
first attempt and the retries.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import or_, select, update

from dicom_node.db import Database, Job, JobState, Study, utcnow
from dicom_node.errors import QueueUnavailableError
from dicom_node.queues import JobQueue
from dicom_node.spool import study_path

LOGGER = logging.getLogger(__name__)


def job_message(job: Job, study: Study) -> dict[str, Any]:
    """The queue message of a job: ids, UIDs and a spool-relative path; no patient data."""
    return {
        "job_id": job.id,
        "study_instance_uid": study.study_instance_uid,
        "instances": job.instances,
        "spool_path": study_path(study.study_instance_uid),
        "supersedes": job.supersedes,
    }


class Publisher(threading.Thread):
    """Publishes unconfirmed queued jobs; woken by :meth:`wake`, otherwise every ``retry`` s.

    Parameters
    ----------
    db : Database
        Holds the job rows (the outbox).
    queue : JobQueue
        Where messages go; owned by this thread (pika is not thread-safe).
    retry_seconds : float
        How long to wait before trying again after a failure, and the idle sweep interval.
    """

    def __init__(self, db: Database, queue: JobQueue, retry_seconds: float = 2.0) -> None:
        super().__init__(name="publisher", daemon=True)
        self.db = db
        self.queue = queue
        self.retry_seconds = retry_seconds
        self._wake = threading.Event()
        self._stopping = threading.Event()

    def wake(self) -> None:
        """Ask for a publishing pass now (called after jobs were committed)."""
        self._wake.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.retry_seconds)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.publish_pending()
            except QueueUnavailableError as exc:
                LOGGER.warning("job queue unavailable, will retry: %s", exc)
            except Exception:
                LOGGER.exception("publishing failed; will retry")
        self.queue.close()

    def stop(self) -> None:
        """Stop after the current pass and close the queue connection."""
        self._stopping.set()
        self._wake.set()
        self.join(timeout=30)

    def publish_pending(self) -> int:
        """Publish every due queued job without a confirmation, oldest first; return the count.

        Raises
        ------
        QueueUnavailableError
            When the queue refuses; jobs not yet confirmed stay in the outbox.
        """
        with self.db.session() as session:
            pending = session.execute(
                select(Job, Study)
                .join(Study, Study.id == Job.study_id)
                .where(
                    Job.state == JobState.QUEUED,
                    Job.published_at.is_(None),
                    or_(Job.retry_at.is_(None), Job.retry_at <= utcnow()),
                )
                .order_by(Job.created_at)
            ).all()
            messages = [(job.id, job.attempts, job_message(job, study)) for job, study in pending]
        for job_id, attempts, body in messages:
            self.queue.publish(body, message_id=job_id)
            with self.db.session() as session:
                # Not if a worker already began an attempt: it may have sent the job back to
                # the outbox for a retry, which must be published again.
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.attempts == attempts, Job.published_at.is_(None))
                    .values(published_at=utcnow())
                )
            LOGGER.info("job %s published", job_id)
        return len(messages)
