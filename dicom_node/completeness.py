"""Study completeness: when a study has stopped arriving, turn it into a job.

DICOM has no "end of study" message, so completeness is a policy per calling AE (DESIGN.md):
``quiet`` (no new instance for N seconds) or ``release`` (the association that brought it was
released). Quiet applies to every study as the fallback (an aborted association, a study spread
over several associations). A study whose instances failed to commit (database unavailable:
the sender was answered 0xA700, retry later) is held back for :data:`HOLD_SECONDS` after the
last failure, so that a partial study does not become a job before the sender's resend.
Instances that arrive after a study was queued reopen it
(:func:`dicom_node.lifecycle.reopen_study`); completing it again makes a new job that supersedes
the previous one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

from sqlalchemy import select

from dicom_node.config import AEPolicy, Completeness
from dicom_node.db import (
    Database,
    Study,
    StudyState,
    utcnow,
)
from dicom_node.lifecycle import queue_job
from dicom_node.policy import AssociationPolicy

LOGGER = logging.getLogger(__name__)

#: A study one of whose instances failed to commit (the database was unavailable, the sender was
#: told to retry later) is not complete until this long after the last such failure.
HOLD_SECONDS = 60.0


class CompletenessTracker:
    """Decides when studies are complete and creates their jobs.

    Parameters
    ----------
    db : Database
        Where studies and jobs live.
    policy : AssociationPolicy
        Per-AE completeness rules.
    on_job : callable
        Called (without arguments) after new jobs were committed; wakes the publisher.
    """

    def __init__(
        self,
        db: Database,
        policy: AssociationPolicy,
        on_job: Callable[[], None],
        hold_seconds: float = HOLD_SECONDS,
    ) -> None:
        self.db = db
        self.policy = policy
        self.on_job = on_job
        self.hold_seconds = hold_seconds
        self._held: dict[str, float] = {}
        self._lock = threading.Lock()

    def hold(self, study_uid: str) -> None:
        """An instance of the study failed to commit: it is not complete for ``hold_seconds``
        (from this failure on), so a sender told to retry later can send it again first."""
        with self._lock:
            self._held[study_uid] = time.monotonic() + self.hold_seconds

    def _is_held(self, study_uid: str) -> bool:
        with self._lock:
            until = self._held.get(study_uid)
            if until is not None and until <= time.monotonic():
                del self._held[study_uid]
                until = None
        return until is not None

    def association_released(self, calling_ae: str, study_uids: Iterable[str]) -> None:
        """Complete the studies of a released association when the AE's policy says so."""
        if self.policy.for_ae(calling_ae).completeness != Completeness.RELEASE:
            return
        created = [uid for uid in study_uids if self.complete(uid) is not None]
        if created:
            self.on_job()

    def sweep(self) -> int:
        """Complete every receiving study that has been quiet long enough; return how many."""
        now = utcnow()
        with self.db.session() as session:
            rows = session.execute(
                select(Study.study_instance_uid, Study.calling_ae, Study.last_received_at).where(
                    Study.state == StudyState.RECEIVING
                )
            ).all()
        due = [uid for uid, ae, last in rows if last + timedelta(seconds=self._quiet(ae)) <= now]
        created = sum(self.complete(uid) is not None for uid in due)
        if created:
            self.on_job()
        return created

    def _quiet(self, calling_ae: str) -> float:
        policy: AEPolicy = self.policy.for_ae(calling_ae)
        return policy.quiet_seconds or self.policy.default_quiet_seconds

    def complete(self, study_uid: str) -> str | None:
        """Create the job of a receiving study; return its id (``None`` if not receiving, or
        held because its instances failed to commit lately)."""
        if self._is_held(study_uid):
            return None
        with self.db.session() as session:
            study = session.scalar(
                select(Study).where(Study.study_instance_uid == study_uid).with_for_update()
            )
            if study is None or study.state != StudyState.RECEIVING:
                return None
            job = queue_job(session, study, self.policy.config)
            job_id, instances, superseded = job.id, study.instances, job.supersedes
        LOGGER.info(
            "job %s queued: %d instances%s",
            job_id,
            instances,
            f", supersedes job {superseded}" if superseded else "",
        )
        return job_id


class CompletenessLoop(threading.Thread):
    """Runs :meth:`CompletenessTracker.sweep` every ``interval`` seconds until stopped."""

    def __init__(self, tracker: CompletenessTracker, interval: float = 0.5) -> None:
        super().__init__(name="completeness", daemon=True)
        self.tracker = tracker
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.tracker.sweep()
            except Exception:
                LOGGER.exception("completeness sweep failed; trying again")

    def stop(self) -> None:
        """Stop after the current sweep."""
        self._stop_event.set()
        self.join(timeout=10)
