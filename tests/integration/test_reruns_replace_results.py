"""Results replace results in a real PACS: a late slice makes a rerun whose objects are the next
revision, and the replaced ones are retracted as the destination is configured to.

Orthanc is the PACS (Debian package, our node's DICOM destination). The node's parts run in this
process on a real database and spool: ingest, the lifecycle, the worker with the real encoders
(the detector is :class:`FixedDetector`, returning the LIDC readers' nodule) and the delivery
loop. ``retraction: orthanc`` deletes the replaced SEG, SR and GSPS through Orthanc's REST API,
so the study holds one current set; ``retraction: iocm`` stores the IHE IOCM rejection note, which
Orthanc (no IOCM support) keeps beside the objects it lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydantic import SecretStr
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.config import (
    DimseDestination,
    FhirDestination,
    NodeConfig,
    OrthancRest,
    Retraction,
    Settings,
)
from dicom_node.db import Database, Delivery, DeliveryKind, DeliveryState, Job, JobState, Study
from dicom_node.delivery import DeliveryLoop, rejected_instances
from dicom_node.fhir_resources import report_identifier
from dicom_node.ingest import Ingest
from dicom_node.lifecycle import queue_job
from dicom_node.migrate import upgrade
from dicom_node.queues import Received
from dicom_node.spool import LocalSpool
from pipelines.volume import build_volume
from pipelines.worker import Settle, Worker
from tests.fhir_peer import FhirServer
from tests.helpers import sr_code, sr_items
from tests.nodule_fixtures import FixedDetector, lidc_nodules
from tests.peers import Orthanc

pytestmark = pytest.mark.integration


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Database]]:
    settings = Settings(data_dir=tmp_path / "var", min_free_bytes=0, min_slices=10)
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.database_url)
    upgrade(db)
    yield settings, db
    db.dispose()


def _slice_position(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def _fresh_uids(files: list[Path], folder: Path) -> list[Path]:
    """Copies of ``files`` as a study of their own: new study, series and instance UIDs (same
    geometry and pixels, so the readers' nodule stays where it is)."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(folder / f"{k:03d}.dcm")
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def _run_job(settings: Settings, db: Database, worker: Worker, files: list[Path]) -> str:
    """Ingest ``files`` as ORTHANC sent them, queue the study's job, run it; return its id."""
    ingest = Ingest(db, LocalSpool(settings.spool_dir, 0))
    for path in files:
        ingest.store(path.read_bytes(), "ORTHANC")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert study is not None
        job_id = queue_job(session, study, worker.config).id
    assert worker.handle(Received({"job_id": job_id}, 1, False)) is Settle.ACK
    return job_id


def _results_in(orthanc: Orthanc) -> dict[str, list[dict[str, Any]]]:
    """The result instances Orthanc holds, by Modality, with their tags."""
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for instance in orthanc.get("/instances", expand=""):
        tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
        if tags["Modality"] != "CT":
            by_modality.setdefault(tags["Modality"], []).append({**tags, "ID": instance["ID"]})
    return by_modality


@pytest.mark.parametrize("retraction", [Retraction.ORTHANC, Retraction.IOCM])
def test_a_late_slice_replaces_the_results_in_the_pacs_with_the_next_revision(
    node: tuple[Settings, Database],
    orthanc: Orthanc,
    fhir_server: FhirServer,
    shared_data: Path,
    tmp_path: Path,
    retraction: Retraction,
) -> None:
    settings, db = node
    source = sorted((shared_data / "lidc-small").rglob("*.dcm"), key=_slice_position)
    files = _fresh_uids(source, tmp_path / "study")  # the FHIR server is shared by the tests
    (xml,) = (shared_data / "lidc-small").rglob("*.xml")
    detector = FixedDetector(lidc_nodules(xml, build_volume(source))[:1])
    pacs = DimseDestination(
        name="pacs",
        ae_title=orthanc.aet,
        host="127.0.0.1",
        port=orthanc.dicom_port,
        retraction=retraction,
        orthanc=OrthancRest(
            url=orthanc.url, username=orthanc.username, password=SecretStr(orthanc.password)
        ),
    )
    ehr = FhirDestination(name="ehr", url=fhir_server.url, token=SecretStr(fhir_server.token or ""))
    config = NodeConfig(destinations=[pacs, ehr])
    worker = Worker(settings, db, config, detector=detector)  # type: ignore[arg-type]
    delivery = DeliveryLoop(settings, db, config)

    first_job = _run_job(settings, db, worker, files[:-1])
    delivery.deliver_due()
    first = _results_in(orthanc)
    assert sorted(first) == ["OT", "PR", "SEG", "SR"]  # OT: the key image
    assert all(len(v) == 1 and v[0]["InstanceNumber"] == "1" for v in first.values())
    first_uids = {v[0]["SOPInstanceUID"] for v in first.values()}

    before = _report_statuses(fhir_server, files[0])
    assert before[-1] == "preliminary"
    # the late slice, at an end of the series
    second_job = _run_job(settings, db, worker, files[-1:])
    delivery.deliver_due()

    with db.session() as session:
        jobs = {j.id: j.state for j in session.scalars(select(Job))}
        rows = session.scalars(select(Delivery).where(Delivery.job_id == second_job)).all()
        assert {(r.kind, r.state) for r in rows} == {
            (DeliveryKind.DICOM, DeliveryState.DONE),
            (DeliveryKind.RETRACTION, DeliveryState.DONE),
            (DeliveryKind.FHIR, DeliveryState.DONE),
        }
    assert jobs == {first_job: JobState.DONE, second_job: JobState.DONE}
    now = _results_in(orthanc)
    current = {m: [i for i in now[m] if i["SOPInstanceUID"] not in first_uids] for m in now}
    assert all(len(current[m]) == 1 for m in ("SEG", "SR", "PR", "OT"))
    assert all(current[m][0]["InstanceNumber"] == "2" for m in ("SEG", "SR", "PR"))
    if retraction is Retraction.ORTHANC:
        assert sorted(now) == ["OT", "PR", "SEG", "SR"], "the replaced objects were deleted"
        assert {i["SOPInstanceUID"] for v in now.values() for i in v}.isdisjoint(first_uids)
    else:
        (note,) = now["KO"]
        raw = orthanc.client.get(f"/instances/{note['ID']}/file").content
        kos = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
        assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"
        assert set(rejected_instances(kos)) == first_uids
        assert all(len(now[m]) == 2 for m in ("SEG", "SR", "PR", "OT")), "Orthanc keeps both"
    # FHIR never went back: the report went from the first result straight to the second (the
    # server is shared by the tests: its history may hold earlier runs); the Observations are
    # the new SR's nodules, the replaced ones withdrawn.
    assert _report_statuses(fhir_server, files[0]) == [*before, "preliminary"]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    report = _report(fhir_server, study_uid)
    sr = pydicom.dcmread(
        pydicom.filebase.DicomBytesIO(
            orthanc.client.get(f"/instances/{current['SR'][0]['ID']}/file").content
        )
    )
    observations = [fhir_server.get(ref["reference"]) for ref in report["result"]]
    assert {o["identifier"][0]["value"] for o in observations} == {
        f"urn:oid:{uid}" for uid in _tracking_uids(sr)
    }
    assert {o["status"] for o in observations} == {"preliminary"}
    everything = fhir_server.get("Observation", _count="1000").get("entry", [])
    replaced = [
        e["resource"]
        for e in everything
        if e["resource"]["focus"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
        and e["resource"]["id"] not in {o["id"] for o in observations}
    ]
    assert replaced and {o["status"] for o in replaced} == {"entered-in-error"}


def _report(fhir_server: FhirServer, study_uid: str) -> dict[str, Any]:
    ident = report_identifier(study_uid)
    found = fhir_server.get("DiagnosticReport", identifier=f"{ident['system']}|{ident['value']}")
    (entry,) = found["entry"]
    return dict(entry["resource"])


def _report_statuses(fhir_server: FhirServer, path: Path) -> list[str]:
    """The study's DiagnosticReport statuses, oldest version first."""
    report = _report(
        fhir_server, str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    )
    history = fhir_server.get(f"DiagnosticReport/{report['id']}/_history")["entry"]
    return [e["resource"]["status"] for e in reversed(history)]


def _tracking_uids(sr: pydicom.Dataset) -> set[str]:
    """Every TID 1500 Tracking Unique Identifier (DCM 112040) in the SR."""
    return {str(i.UID) for i in sr_items(sr.ContentSequence) if sr_code(i) == "112040"}
