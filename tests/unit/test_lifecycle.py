"""The one owner of job state: the transition table, enforced, and the study mirroring its job."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import NodeConfig
from dicom_node.db import (
    Database,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    Study,
    StudyState,
)
from dicom_node.errors import ErrorCode
from dicom_node.lifecycle import (
    FINISHED,
    TRANSITIONS,
    IllegalTransition,
    _move,
    begin_attempt,
    delivery_rows,
    queue_job,
    reopen_study,
    settle_failure,
)
from dicom_node.migrate import upgrade
from dicom_node.results import ObjectKind, ResultObject
from dicom_node.retry import Decision, Verdict


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    db = Database(f"sqlite:///{tmp_path / 'lifecycle.db'}")
    upgrade(db)
    with db.session() as session:
        yield session
    db.dispose()


def _job(session: Session, state: JobState) -> Job:
    study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", calling_ae="CT", instances=1)
    session.add(study)
    session.flush()
    job = queue_job(session, study, NodeConfig())
    job.state = state
    return job


def _object(uid: str) -> ResultObject:
    return ResultObject(ObjectKind.SEG, "SEG", "1.2.840.10008.5.1.4.1.1.66.4", uid, "2", "1", uid)


@pytest.mark.parametrize("source", list(JobState))
@pytest.mark.parametrize("target", list(JobState))
def test_only_the_listed_transitions_are_allowed(
    session: Session, source: JobState, target: JobState
) -> None:
    job = _job(session, source)
    if target in TRANSITIONS[source]:
        _move(session, job, target)
        assert job.state == target and getattr(job, f"{target.value}_at") is not None
    else:
        with pytest.raises(IllegalTransition, match=f"{source} -> {target}"):
            _move(session, job, target)
        assert job.state == source


def test_finished_states_are_the_ones_without_a_way_out() -> None:
    assert {JobState.DONE, JobState.REJECTED, JobState.FAILED, JobState.SUPERSEDED} == FINISHED


def test_the_study_mirrors_its_current_job_and_its_failure(session: Session) -> None:
    job = _job(session, JobState.QUEUED)
    study = session.get(Study, job.study_id)
    assert study is not None and study.state == StudyState.QUEUED
    begin_attempt(session, job, "w1", 30.0)
    assert (job.attempts, study.state) == (1, StudyState.PROCESSING)
    retry = Decision(Verdict.RETRY, ErrorCode.TRANSIENT, "GPU busy", 5.0)
    settle_failure(session, job, retry, NodeConfig())
    assert (job.state, job.published_at, job.error) == (
        JobState.QUEUED,
        None,
        "attempt 1: GPU busy",
    )
    assert job.retry_at is not None and study.error_code == "transient"
    begin_attempt(session, job, "w1", 30.0)
    settle_failure(
        session, job, Decision(Verdict.DEAD_LETTER, ErrorCode.ENCODING_FAILED, "no"), NodeConfig()
    )
    assert (study.state, study.error_code, study.error) == (
        StudyState.FAILED,
        "encoding_failed",
        "no",
    )
    assert reopen_study(study) and study.state == StudyState.RECEIVING and study.error is None


def test_a_newer_job_supersedes_an_unfinished_one_and_the_study_follows_the_newer(
    session: Session,
) -> None:
    first = _job(session, JobState.QUEUED)
    begin_attempt(session, first, "w1", 30.0)
    study = session.get(Study, first.study_id)
    assert study is not None
    second = queue_job(session, study, NodeConfig())
    assert first.state == JobState.SUPERSEDED and second.supersedes == first.id
    assert study.current_job_id == second.id and study.state == StudyState.QUEUED


def test_a_superseded_job_delivers_nothing_more(session: Session) -> None:
    config = NodeConfig.model_validate(
        {
            "destinations": [
                {"name": "pacs", "type": "dimse", "ae_title": "CT", "host": "h", "port": 4}
            ]
        }
    )
    first = _job(session, JobState.DELIVERING)
    rows = delivery_rows(config, "CT", first.id, [_object("1.2.1"), _object("1.2.2")], None)
    session.add_all(rows)
    session.flush()
    rows[0].state = DeliveryState.DONE
    study = session.get(Study, first.study_id)
    assert study is not None
    queue_job(session, study, config)
    session.flush()
    for row in rows:
        session.refresh(row)
    assert [r.state for r in rows] == [DeliveryState.DONE, DeliveryState.CANCELLED]


FHIR = NodeConfig.model_validate(
    {"destinations": [{"name": "ehr", "type": "fhir", "url": "http://ehr.example/fhir"}]}
)


def _report_statuses(session: Session, job: Job) -> list[str]:
    rows = session.scalars(select(Delivery).where(Delivery.job_id == job.id)).all()
    return [r.report_status for r in rows]


def test_the_fhir_report_never_goes_back_once_the_study_has_results(session: Session) -> None:
    study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", calling_ae="CT", instances=1)
    session.add(study)
    session.flush()
    first = queue_job(session, study, FHIR)
    begin_attempt(session, first, "w1", 30.0)
    fail = Decision(Verdict.DEAD_LETTER, ErrorCode.INTERNAL, "crashed")
    settle_failure(session, first, fail, FHIR)
    session.flush()
    assert _report_statuses(session, first) == ["registered", "cancelled"]

    second = queue_job(session, study, FHIR)  # a retry: still no results, so registered again
    begin_attempt(session, second, "w1", 30.0)
    session.add(Result(job_id=second.id, series_instance_uid="1.2", nodules=[], detail={}))
    session.flush()
    assert _report_statuses(session, second) == ["registered"]

    rerun = queue_job(session, study, FHIR)  # the study has results now
    begin_attempt(session, rerun, "w1", 30.0)
    settle_failure(session, rerun, fail, FHIR)
    session.flush()
    assert _report_statuses(session, rerun) == []
