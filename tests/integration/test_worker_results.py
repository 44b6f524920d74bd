"""The worker's typed result and its one retry policy, on a real database, spool and encoders.

The detector is the only stand-in (:class:`FixedDetector`): it returns chosen nodules (the LIDC
readers' nodule, and copies moved where no stored slice shows them) or raises, so that the
worker's handling of what the encoders can and cannot encode, and of faults, is tested exactly.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.config import NodeConfig, Settings
from dicom_node.db import Database, Job, JobState, Result, Study, utcnow
from dicom_node.errors import TransientError
from dicom_node.ingest import Ingest
from dicom_node.lifecycle import queue_job
from dicom_node.migrate import upgrade
from dicom_node.publisher import Publisher
from dicom_node.queues import EmbeddedQueue, Received
from dicom_node.results import ResultSet
from dicom_node.spool import LocalSpool
from pipelines.analysis import analyse
from pipelines.detect import Detection
from pipelines.findings import Nodule
from pipelines.lungrads import mean_diameter_mm, nodule_category
from pipelines.volume import Volume, build_volume
from pipelines.worker import Settle, Worker
from tests.helpers import sr_code, sr_items, wait_for
from tests.nodule_fixtures import FixedDetector, grid_mask_to_nodule, lidc_nodules

pytestmark = pytest.mark.integration

TRACKING_UID = "112040"  # DCM "Tracking Unique Identifier" (TID 1500)


def _off_frame(nodule: Nodule) -> Nodule:
    """The same nodule moved 500 mm beyond the scan: no stored slice shows it."""
    x, y, z = nodule.mask_origin_mm
    cx, cy, cz = nodule.center_mm
    return dataclasses.replace(
        nodule, mask_origin_mm=(x, y, z - 500.0), center_mm=(cx, cy, cz - 500.0)
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Database]]:
    settings = Settings(
        data_dir=tmp_path / "var",
        min_free_bytes=0,
        min_slices=10,
        max_attempts=3,
        retry_backoff_seconds=3.0,
        publish_retry_seconds=0.2,
    )
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.database_url)
    upgrade(db)
    yield settings, db
    db.dispose()


def _lidc_files(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "lidc-small").rglob("*.dcm"))


def _store_study(
    settings: Settings,
    db: Database,
    files: list[Path],
    new_uids: bool,
    header: dict[str, str] | None = None,
) -> str:
    """Ingest ``files`` as one study (under fresh UIDs with ``new_uids``, with ``header``'s
    attributes set); queue its job."""
    ingest = Ingest(db, LocalSpool(settings.spool_dir, 0))
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in (header or {}).items():
            setattr(ds, keyword, value)
        if new_uids:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = pydicom.filebase.DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        ingest.store(buffer.getvalue(), "ORTHANC")
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with db.session() as session:
        study = session.scalar(
            select(Study).where(Study.study_instance_uid == (study_uid if new_uids else uid))
        )
        assert study is not None
        return queue_job(session, study, NodeConfig()).id


def _readers_nodule(shared_data: Path, files: list[Path]) -> Nodule:
    volume = build_volume(files)
    (xml,) = (shared_data / "lidc-small").rglob("*.xml")
    return lidc_nodules(xml, volume)[0]


def _job(db: Database, job_id: str) -> Job:
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _sr_tracking_uids(ds: pydicom.Dataset) -> list[str]:
    """Every TID 1500 Tracking Unique Identifier in the SR, in content order, once each."""
    uids = [str(i.UID) for i in sr_items(ds.ContentSequence) if sr_code(i) == TRACKING_UID]
    return list(dict.fromkeys(uids))


def test_a_nodule_that_cannot_be_outlined_is_in_none_of_sr_seg_and_fhir(
    node: tuple[Settings, Database], shared_data: Path
) -> None:
    settings, db = node
    files = _lidc_files(shared_data)
    readers = _readers_nodule(shared_data, files)
    detector = FixedDetector([_off_frame(readers), readers])
    job_id = _store_study(settings, db, files, new_uids=False)
    worker = Worker(settings, db, NodeConfig(), detector=detector)  # type: ignore[arg-type]

    assert worker.handle(Received({"job_id": job_id}, 1, False)) is Settle.ACK

    assert _job(db, job_id).state == JobState.DONE
    with db.session() as session:
        row = session.scalar(select(Result).where(Result.job_id == job_id))
        assert row is not None
        result = ResultSet.from_json(row.detail)
    spool = LocalSpool(settings.spool_dir, 0)
    (nodule,) = result.nodules
    # the readers' lesion is about 34 mm long: a mass (pipelines.lesions)
    assert (nodule.number, nodule.tracking_id, result.not_encoded) == (1, "Mass 1", 1)
    assert row.nodules == [nodule.to_json()]
    paths = {o.modality: spool.path(o.path) for o in result.objects}
    sr, seg = pydicom.dcmread(paths["SR"]), pydicom.dcmread(paths["SEG"])
    fhir = json.loads(spool.path(result.fhir_path).read_text())
    assert _sr_tracking_uids(sr) == [nodule.tracking_uid]
    assert [s.TrackingUID for s in seg.SegmentSequence] == [nodule.tracking_uid]
    assert [o["identifier"][0]["value"] for o in fhir["observations"]] == [
        f"urn:oid:{nodule.tracking_uid}"
    ]
    assert [r["identifier"]["value"] for r in fhir["report"]["result"]] == [
        f"urn:oid:{nodule.tracking_uid}"
    ]
    (observation,) = fhir["observations"]
    lung_rads = [
        c for c in observation["component"] if c["code"]["coding"][0]["code"] == "lung-rads-v2022"
    ]
    assert [c["valueCodeableConcept"]["text"] for c in lung_rads] == [
        f"Lung-RADS v2022 category {nodule.lung_rads}"
    ]
    assert f"Lung-RADS v2022 category {result.lung_rads}" in fhir["report"]["conclusion"]
    assert result.lung_rads == nodule.lung_rads
    stored = json.loads(spool.path(f"results/{job_id}/1/resultset.json").read_text())
    assert stored == row.detail


def test_an_encoder_fault_fails_the_job_at_the_first_attempt_with_its_code(
    node: tuple[Settings, Database], shared_data: Path
) -> None:
    settings, db = node
    files = _lidc_files(shared_data)
    detector = FixedDetector([_off_frame(_readers_nodule(shared_data, files))])
    job_id = _store_study(settings, db, files, new_uids=False)
    worker = Worker(settings, db, NodeConfig(), detector=detector)  # type: ignore[arg-type]

    assert worker.handle(Received({"job_id": job_id}, 1, False)) is Settle.DEAD_LETTER

    job = _job(db, job_id)
    assert (job.state, job.attempts, job.error_code) == (JobState.FAILED, 1, "encoding_failed")
    assert "no nodule lies on a stored frame" in (job.error or "")
    with db.session() as session:
        study = session.get(Study, job.study_id)
        assert study is not None
        assert (study.state, study.error_code) == ("failed", "encoding_failed")


def test_a_transient_fault_is_retried_later_while_the_worker_takes_other_jobs(
    node: tuple[Settings, Database], shared_data: Path
) -> None:
    settings, db = node
    files = _lidc_files(shared_data)
    first = _store_study(settings, db, files, new_uids=True)
    second = _store_study(settings, db, files, new_uids=True)
    series_of_first = _series_uid(db, first)
    detector = FixedDetector([], fail={series_of_first: TransientError("GPU busy")})
    queue = EmbeddedQueue(db, settings.amqp_queue, settings.amqp_dead_letter_queue, 60)
    publisher = Publisher(db, queue, retry_seconds=settings.publish_retry_seconds)
    worker = Worker(settings, db, NodeConfig(), detector=detector)  # type: ignore[arg-type]
    publisher.start()
    publisher.wake()
    running = threading.Thread(target=worker.run, args=(queue, 0.2), daemon=True)
    running.start()
    try:
        wait_for(lambda: _job(db, first).state == JobState.DONE, timeout=60, interval=0.1)
    finally:
        worker.stop()
        running.join(timeout=30)
        publisher.stop()

    a, b = _job(db, first), _job(db, second)
    assert (a.state, a.attempts, a.error_code) == (JobState.DONE, 2, "transient")
    assert (b.state, b.attempts) == (JobState.DONE, 1)
    assert a.error == "attempt 1: GPU busy"
    assert detector.calls[:2] == [series_of_first, _series_uid(db, second)]
    assert b.done_at is not None and a.processing_at is not None and b.done_at < a.processing_at
    assert a.queued_at is not None  # stamped again when the failed attempt went back
    assert (a.processing_at - a.queued_at).total_seconds() >= settings.retry_backoff_seconds


def _series_uid(db: Database, job_id: str) -> str:
    from dicom_node.db import Series

    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        series = session.scalar(select(Series).where(Series.study_id == job.study_id))
        assert series is not None
        return series.series_instance_uid


class SupersedingDetector(FixedDetector):
    """While it runs, the study receives a new job (late instances, a rerun): the old one is
    superseded mid-run."""

    def __init__(self, db: Database, nodules: list[Nodule]) -> None:
        super().__init__(nodules)
        self.db = db

    def run(self, volume: Volume) -> Detection:
        with self.db.session() as session:
            study = session.scalar(select(Study))
            assert study is not None
            queue_job(session, study, NodeConfig())
        return super().run(volume)


def test_a_job_superseded_while_it_runs_is_abandoned_without_a_result(
    node: tuple[Settings, Database], shared_data: Path
) -> None:
    settings, db = node
    files = _lidc_files(shared_data)
    detector = SupersedingDetector(db, [_readers_nodule(shared_data, files)])
    job_id = _store_study(settings, db, files, new_uids=False)
    worker = Worker(settings, db, NodeConfig(), detector=detector)  # type: ignore[arg-type]

    assert worker.handle(Received({"job_id": job_id}, 1, False)) is Settle.ACK

    assert _job(db, job_id).state == JobState.SUPERSEDED
    with db.session() as session:
        assert session.scalar(select(Result).where(Result.job_id == job_id)) is None
    assert not LocalSpool(settings.spool_dir, 0).path(f"results/{job_id}").exists()


def test_a_redelivered_job_writes_byte_identical_objects(
    node: tuple[Settings, Database], shared_data: Path
) -> None:
    """The worker dies after encoding, before its result is saved; the job is delivered again
    (later: a clock would differ) and writes the same bytes under the same UIDs."""
    settings, db = node
    files = _lidc_files(shared_data)
    detector = FixedDetector([_readers_nodule(shared_data, files)])
    job_id = _store_study(settings, db, files, new_uids=False)
    worker = Worker(settings, db, NodeConfig(), detector=detector)  # type: ignore[arg-type]
    started = worker._start(job_id)
    assert not isinstance(started, Settle)
    files, study_uid, attempt = started
    analysis = analyse(worker._inputs(files), lambda: detector, 10)  # type: ignore[arg-type, return-value]
    first = worker._persist(job_id, study_uid, attempt, analysis)
    spool = LocalSpool(settings.spool_dir, 0)
    before = {Path(o.path).name: spool.path(o.path).read_bytes() for o in first.objects}
    time.sleep(1.1)

    assert worker.handle(Received({"job_id": job_id}, 2, True)) is Settle.ACK

    job = _job(db, job_id)
    assert (job.state, job.attempts) == (JobState.DONE, 2)
    with db.session() as session:
        row = session.scalar(select(Result).where(Result.job_id == job_id))
        assert row is not None
        stored = ResultSet.from_json(row.detail)
    assert {Path(o.path).name: spool.path(o.path).read_bytes() for o in stored.objects} == before


def test_a_job_leased_by_a_live_worker_is_not_run_twice_and_is_taken_over_after_its_lease(
    node: tuple[Settings, Database], shared_data: Path
) -> None:
    """Worker A runs a job; its broker connection drops and the message reaches worker B. While
    A's lease is live, B gives the message back; once the lease ran out (A died), B runs the job
    and commits; A's late result changes nothing and its files are apart from B's."""
    settings, db = node
    files = _lidc_files(shared_data)
    detector = FixedDetector([_readers_nodule(shared_data, files)])
    job_id = _store_study(settings, db, files, new_uids=False)
    a = Worker(settings, db, NodeConfig(), detector=detector)  # type: ignore[arg-type]
    b = Worker(settings, db, NodeConfig(), detector=detector)  # type: ignore[arg-type]
    message = Received({"job_id": job_id}, 1, True)
    started = a._start(job_id)
    assert not isinstance(started, Settle)
    files, study_uid, attempt = started
    late = a._persist(job_id, study_uid, attempt, analyse(a._inputs(files), lambda: detector, 10))  # type: ignore[arg-type, return-value]

    assert b.handle(message) is Settle.REQUEUE
    assert (_job(db, job_id).attempts, _job(db, job_id).lease_owner) == (1, a.worker_id)

    with db.session() as session:  # A died: its lease is not renewed and runs out
        job = session.get(Job, job_id)
        assert job is not None
        job.lease_until = utcnow() - timedelta(seconds=1)
    assert b.handle(message) is Settle.ACK
    job = _job(db, job_id)
    assert (job.state, job.attempts, job.lease_owner) == (JobState.DONE, 2, b.worker_id)

    a._save(job_id, late)  # A's late result: discarded
    with db.session() as session:
        (row,) = session.scalars(select(Result).where(Result.job_id == job_id)).all()
        committed = ResultSet.from_json(row.detail)
    assert all("/2/" in o.path for o in committed.objects)
    assert all("/1/" in o.path for o in late.objects)


def test_the_study_page_and_its_api_list_the_nodules_of_the_current_result(
    node: tuple[Settings, Database], shared_data: Path
) -> None:
    from fastapi.testclient import TestClient

    from dicom_node.api import create_app

    settings, db = node
    files = _lidc_files(shared_data)
    readers = _readers_nodule(shared_data, files)
    job_id = _store_study(settings, db, files, new_uids=False)
    worker = Worker(settings, db, NodeConfig(), detector=FixedDetector([readers]))  # type: ignore[arg-type]
    assert worker.handle(Received({"job_id": job_id}, 1, False)) is Settle.ACK
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    with TestClient(create_app(db, settings, NodeConfig())) as http:
        detail = http.get(f"/api/studies/{uid}").json()
        findings = http.get(f"/api/studies/{uid}/findings").json()
        page = http.get(f"/dashboard/studies/{uid}").text
    (nodule,) = detail["nodules"]
    assert nodule["number"] == 1 and nodule["type"] == readers.type
    # the axes are measured on the outline the SR draws, on the stored slice
    (sr,) = (o for o in ResultSet.from_json(_result_row(db, job_id)).objects if o.modality == "SR")
    values = _sr_items(pydicom.dcmread(LocalSpool(settings.spool_dir, 0).path(sr.path)))
    sr_axes = values["103339001"], values["103340004"]  # long and short axis
    assert (nodule["long_axis_mm"], nodule["short_axis_mm"]) == pytest.approx(sr_axes, abs=0.01)
    assert nodule["long_axis_mm"] == pytest.approx(readers.long_axis_mm, rel=0.15)
    assert (
        detail["model"] == "NoduleAI lung nodule detector stage1_screen-0.0.0+stage2_refine-0.0.0"
    )
    assert 'data-nodule="1"' in page and f"{nodule['long_axis_mm']:.1f} mm" in page
    assert "not for clinical use" in page
    mean = mean_diameter_mm(*sr_axes)
    solid = mean_diameter_mm(readers.solid_long_axis_mm, readers.solid_short_axis_mm)
    expected = nodule_category(readers.type, mean, solid).value
    assert (nodule["lung_rads"], nodule["mean_diameter_mm"]) == (expected, mean)
    assert detail["lung_rads"] == expected and findings["lung_rads"] == expected
    assert f"Lung-RADS v2022 category <strong>{expected}</strong>" in page


def _result_row(db: Database, job_id: str) -> dict[str, Any]:
    with db.session() as session:
        row = session.scalar(select(Result).where(Result.job_id == job_id))
        assert row is not None
        return dict(row.detail)


def test_lung_rads_and_risk_are_the_same_in_sr_fhir_json_and_the_study_page(
    node: tuple[Settings, Database], shared_data: Path
) -> None:
    """A 70-year-old woman (age and sex in the header), a 12 mm nodule in the upper zone (a
    sphere at the readers' lesion: the lesion itself is a mass, without a Brock risk)."""
    from fastapi.testclient import TestClient

    from dicom_node.api import create_app

    settings, db = node
    files = _lidc_files(shared_data)
    volume = build_volume(files)
    zz, yy, xx = np.indices(volume.hu.shape)
    cx, cy, cz = _readers_nodule(shared_data, files).center_mm
    ox, oy, oz = volume.origin_mm
    dz, dy, dx = volume.spacing_mm
    sphere = (
        (xx * dx + ox - cx) ** 2 + (yy * dy + oy - cy) ** 2 + (zz * dz + oz - cz) ** 2
    ) <= 6.0**2
    readers = dataclasses.replace(grid_mask_to_nodule(sphere, volume), upper_zone=True)
    job_id = _store_study(
        settings, db, files, new_uids=True, header={"PatientAge": "070Y", "PatientSex": "F"}
    )
    worker = Worker(settings, db, NodeConfig(), detector=FixedDetector([readers]))  # type: ignore[arg-type]
    assert worker.handle(Received({"job_id": job_id}, 1, False)) is Settle.ACK

    result = ResultSet.from_json(_result_row(db, job_id))
    (nodule,) = result.nodules
    assert nodule.malignancy_risk is not None and 0 < nodule.malignancy_risk < 1
    assert "assumed absent" in nodule.risk_note
    spool = LocalSpool(settings.spool_dir, 0)
    (sr_object,) = (o for o in result.objects if o.modality == "SR")
    sr = pydicom.dcmread(spool.path(sr_object.path))
    sr_values = _sr_items(sr)
    assert sr_values["NAI-0004"] == f"NAI-LR-{nodule.lung_rads}"
    assert sr_values["111047"] == pytest.approx(100 * nodule.malignancy_risk, abs=0.01)
    fhir = json.loads(spool.path(result.fhir_path).read_text())
    (observation,) = fhir["observations"]
    components = {c["code"]["coding"][0]["code"]: c for c in observation["component"]}
    assert components["111047"]["valueQuantity"]["value"] == pytest.approx(
        100 * nodule.malignancy_risk, abs=0.01
    )
    lung_rads = components["lung-rads-v2022"]["valueCodeableConcept"]["coding"][0]["code"]
    assert lung_rads == f"lung-rads-{nodule.lung_rads}"
    assert any("assumed absent" in n["text"] for n in observation["note"])
    with TestClient(create_app(db, settings, NodeConfig())) as http:
        uid = result.study_instance_uid
        findings = http.get(f"/api/studies/{uid}/findings").json()
        page = http.get(f"/dashboard/studies/{uid}").text
        thumbnail = http.get(f"/api/studies/{uid}/findings/1/thumbnail.png")
        missing = http.get(f"/api/studies/{uid}/findings/2/thumbnail.png")
    assert thumbnail.headers["content-type"] == "image/png"
    assert thumbnail.content.startswith(b"\x89PNG") and missing.status_code == 404
    assert f"/api/studies/{uid}/findings/1/thumbnail.png" in page
    (listed,) = findings["nodules"]
    assert (listed["lung_rads"], listed["malignancy_risk"]) == (
        nodule.lung_rads,
        round(nodule.malignancy_risk, 4),
    )
    assert f"{100 * nodule.malignancy_risk:.1f} %" in page
    assert "070Y" not in page and "070Y" not in json.dumps(result.to_json())


def _sr_items(sr: pydicom.Dataset) -> dict[str, Any]:
    """Code value of each concept name in the SR -> its coded value or numeric value."""
    found: dict[str, Any] = {}
    for item in sr_items(sr.ContentSequence):
        if item.get("ValueType") == "CODE":
            found[sr_code(item)] = str(item.ConceptCodeSequence[0].CodeValue)
        elif item.get("ValueType") == "NUM":
            found[sr_code(item)] = float(item.MeasuredValueSequence[0].NumericValue)
    return found
