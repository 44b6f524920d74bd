"""Queueing a study's job: the one mechanism behind completeness and the retry/rerun actions.

The job row is committed in ``queued`` without ``published_at`` (the outbox; the publisher sends
it). It supersedes the study's previous job (which stops where it is if unfinished), and the
FHIR report of the study goes ``registered`` at the FHIR destinations.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from dicom_node.config import NodeConfig
from dicom_node.db import Job, JobState, Study, new_job_id, set_job_state
from dicom_node.export import delivery_rows

UNFINISHED = (JobState.QUEUED, JobState.PROCESSING, JobState.DELIVERING)


def queue_job(session: Session, study: Study, config: NodeConfig) -> Job:
    """Create the study's new queued job in ``session``; return it."""
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
        set_job_state(session, previous, JobState.SUPERSEDED)
    study.current_job_id = job.id
    session.flush()
    set_job_state(session, job, JobState.QUEUED)
    session.add_all(delivery_rows(config, study.calling_ae, job.id, [], "registered"))
    return job
