"""Comparison with the prior CT against a real PACS: Orthanc holds two studies of one patient.

The prior is LIDC-IDRI-0001 (StudyDate 2000-01-01); the current study is the same scan with the
patient moved (rotated 2-3 degrees about each axis, shifted 6-10 mm; :mod:`models.followup`) 200
days later, pushed to ``noduleai serve`` by Orthanc. The node must find the prior by C-FIND,
retrieve it by C-MOVE (Orthanc knows the node as a modality), never make a job of it, detect its
nodules, align it and report the readers' nodule as stable, in the SR (with the prior study
referenced; dciodvfy without errors), in FHIR and in the API. With Orthanc refusing the node's
queries the same study completes as a baseline with the reason, at once. A prior that carries
our SR is fetched by C-GET and its findings are read from the SR, not detected again.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from sqlalchemy import func, select

from dicom_node.config import NodeConfig
from dicom_node.db import Database, Job, Study, StudyState
from dicom_node.fhir_resources import report_identifier
from dicom_node.migrate import upgrade
from dicom_node.results import ModelIdentity
from dicom_node.spool import LocalSpool
from models.followup import LIDC_TEST_MOTION, write_moved_copy
from pipelines.detect import Detector
from pipelines.outputs import encode_results
from pipelines.priors import PriorFindings, PriorLocator
from pipelines.registration import RigidTransform
from pipelines.volume import build_volume
from tests.fhir_peer import FhirServer
from tests.helpers import (
    Service,
    dciodvfy,
    free_port,
    node_api,
    node_healthy,
    sr_code,
    sr_items,
    wait_for,
)
from tests.nodule_fixtures import lidc_nodules
from tests.peers import Orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "priors-test-token"
#: The LIDC readers' nodule in the prior (LPS mm; ../shared/data/README.md).
READERS_NODULE_MM = np.array([55.5, 85.6, -116.1])
DAYS = 200


def _api(port: int, path: str, method: str = "GET") -> Any:
    return node_api(port, path, TOKEN, method)


def _page(port: int, study_uid: str) -> str:
    """The dashboard's study page as the server renders it."""
    url = f"http://127.0.0.1:{port}/dashboard/studies/{study_uid}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _healthy(port: int) -> bool:
    return node_healthy(port, TOKEN)


def _settled(port: int, study_uid: str, after_job: str | None = None) -> dict[str, Any] | None:
    try:
        found = _api(port, f"/api/studies/{study_uid}/findings")
    except OSError:
        return None
    if found["state"] not in ("done", "failed", "rejected") or found["job_id"] == after_job:
        return None
    return dict(found)


def _sr(orthanc: Orthanc, study_uid: str, job_prior: str) -> Any:
    """The SR of the current study in Orthanc that names ``job_prior`` (the prior's UID)."""
    orthanc_id = orthanc.lookup_study(study_uid)
    for series in orthanc.get(f"/studies/{orthanc_id}/series"):
        if series["MainDicomTags"]["Modality"] != "SR":
            continue
        for instance_id in series["Instances"]:
            raw = orthanc.client.get(f"/instances/{instance_id}/file").content
            if job_prior.encode() in raw:
                return dcmread(DicomBytesIO(raw)), raw
    return None


@pytest.fixture
def studies(shared_data: Path, tmp_path: Path) -> tuple[list[Path], list[Path], RigidTransform]:
    prior = sorted((shared_data / "lidc-idri-0001").rglob("*.dcm"))
    truth = LIDC_TEST_MOTION
    current = write_moved_copy(prior, tmp_path / "current", truth, DAYS, salt="priors-test")
    return prior, current, truth


@pytest.mark.timeout(900)  # two jobs, three detections on a 2-core machine
def test_the_prior_is_found_retrieved_aligned_and_the_readers_nodule_reported_stable(
    orthanc: Orthanc,
    fhir_server: FhirServer,
    studies: tuple[list[Path], list[Path], RigidTransform],
    tmp_path: Path,
) -> None:
    prior_paths, current_paths, truth = studies
    for path in [*prior_paths, *current_paths]:
        orthanc.upload(path)
    prior_uid = str(dcmread(prior_paths[0], stop_before_pixels=True).StudyInstanceUID)
    current_uid = str(dcmread(current_paths[0], stop_before_pixels=True).StudyInstanceUID)

    dicom_port, http_port = free_port(), free_port()
    config = tmp_path / "node.yaml"
    config.write_text(
        "ae_policies:\n"
        f"  - ae_title: {orthanc.aet}\n"
        "    hosts: [127.0.0.1]\n"
        "    completeness: release\n"
        "    priors: {source: pacs, timeout_seconds: 60, max_age_days: 365}\n"
        "destinations:\n"
        f"  - {{name: pacs, type: dimse, ae_title: {orthanc.aet}, host: 127.0.0.1, "
        f"port: {orthanc.dicom_port}}}\n"
        f"  - {{name: ehr, type: fhir, url: '{fhir_server.url}', token: '{fhir_server.token}'}}\n"
    )
    env = {
        "NODULEAI_DATA_DIR": str(tmp_path / "var"),
        "NODULEAI_DICOM_HOST": "127.0.0.1",
        "NODULEAI_DICOM_PORT": str(dicom_port),
        "NODULEAI_HTTP_PORT": str(http_port),
        "NODULEAI_MIN_FREE_BYTES": "0",
        "NODULEAI_CONFIG": str(config),
        "NODULEAI_DASHBOARD_TOKEN": TOKEN,
        "NODULEAI_INFERENCE_THREADS": "2",
        "NODULEAI_DELIVERY_BACKOFF_SECONDS": "0.5",
    }
    modality = {"AET": "NODULEAI", "Host": "127.0.0.1", "Port": dicom_port}
    serve = Service(["serve"], env, tmp_path / "serve.log")
    try:
        wait_for(lambda: _healthy(http_port), timeout=60)
        # Orthanc refuses the node's C-FIND and C-MOVE: the study is a baseline, with the reason
        orthanc.client.put(
            "/modalities/noduleai",
            json={**modality, "AllowFind": False, "AllowMove": False, "AllowGet": False},
        ).raise_for_status()
        orthanc.push_study("noduleai", orthanc.lookup_study(current_uid))
        baseline = wait_for(lambda: _settled(http_port, current_uid), timeout=600, interval=1.0)
        assert baseline["state"] == "done", serve.output()[-4000:]
        assert baseline["prior"]["outcome"] == "baseline"
        assert baseline["prior"]["reason"] == "query_refused", baseline["prior"]
        detail = _api(http_port, f"/api/studies/{current_uid}")
        timings = detail["study"]["durations_ms"]
        assert timings["prior_retrieve"] < 10_000, timings  # refused at once, not timed out
        page = _page(http_port, current_uid)
        assert "Baseline: no comparison with a prior CT (<code>query_refused</code>" in page

        # Allowed: the rerun finds the prior, retrieves it, compares
        orthanc.add_modality("noduleai", "NODULEAI", "127.0.0.1", dicom_port)
        rerun = _api(http_port, f"/api/studies/{current_uid}/rerun", method="POST")
        found = wait_for(
            lambda: _settled(http_port, current_uid, baseline["job_id"]),
            timeout=900,
            interval=1.0,
        )
        assert found["job_id"] == rerun["new_job_id"] and found["state"] == "done"
        prior = found["prior"]
        assert prior["outcome"] == "compared", prior
        assert prior["study_instance_uid"] == prior_uid
        assert prior["study_date"] == "2000-01-01" and prior["interval_days"] == DAYS
        assert prior["findings_from"] == "detector"

        # the readers' nodule, where the motion put it, stable within 10 % of its volume
        expected = truth.to_current(READERS_NODULE_MM)
        nearest = min(
            found["nodules"],
            key=lambda n: float(np.linalg.norm(np.array(n["center_mm"]) - expected)),
        )
        distance = float(np.linalg.norm(np.array(nearest["center_mm"]) - expected))
        print(f"\nreaders' nodule: {distance:.1f} mm from truth, {json.dumps(nearest)}")
        print("prior:", json.dumps(prior))
        assert distance < 10.0
        assert nearest["change"] == "stable", nearest
        assert abs(nearest["volume_change_percent"]) <= 10.0, nearest

        # the prior is stored as a prior: no job of its own
        prior_study = _api(http_port, f"/api/studies/{prior_uid}")
        assert prior_study["study"]["state"] == "prior" and not prior_study["jobs"]
        detail = _api(http_port, f"/api/studies/{current_uid}")
        assert detail["prior"]["study_instance_uid"] == prior_uid
        print("timings:", detail["study"]["durations_ms"])
        assert "prior_retrieve" in detail["study"]["durations_ms"]
        page = _page(http_port, current_uid)
        assert "Compared with the prior CT of <strong>2000-01-01</strong> (200 days" in page
        assert f'<td data-col="change">stable ({nearest["volume_change_percent"]:+.0f} %' in page

        # the SR in the PACS: the change per nodule, the prior referenced; dciodvfy clean
        sr, raw = wait_for(lambda: _sr(orthanc, current_uid, prior_uid), timeout=120)
        other = sr.PertinentOtherEvidenceSequence
        assert [str(s.StudyInstanceUID) for s in other] == [prior_uid]
        changes = [
            str(item.ConceptCodeSequence[0].CodeValue)
            for item in sr_items(sr.ContentSequence)
            if sr_code(item) == "111424"
        ]
        assert "129723006" in changes, f"no 'stable' comparison in the SR: {changes}"
        path = tmp_path / "sr.dcm"
        path.write_bytes(raw)
        errors, _warnings = dciodvfy(path)
        assert not errors, errors

        # FHIR: the conclusion names the comparison, the Observation carries the change
        ident = report_identifier(current_uid)
        reports = fhir_server.get(
            "DiagnosticReport", identifier=f"{ident['system']}|{ident['value']}"
        )
        report = reports["entry"][0]["resource"]
        assert "Compared with the prior CT of 2000-01-01" in report["conclusion"], report
        assert any(prior_uid in json.dumps(s) for s in report["imagingStudy"])
        observations = [fhir_server.get(r["reference"]) for r in report["result"]]
        components = [
            c["code"]["coding"][0]["code"] for o in observations for c in o.get("component", [])
        ]
        assert "111424" in components and "volume-change" in components
    finally:
        serve.stop()


def test_a_prior_carrying_our_report_is_fetched_by_c_get_and_its_findings_read_not_detected(
    orthanc: Orthanc,
    studies: tuple[list[Path], list[Path], RigidTransform],
    tmp_path: Path,
) -> None:
    prior_paths, current_paths, truth = studies
    prior_volume = build_volume(prior_paths)
    xml = next(prior_paths[0].parent.glob("*.xml"))
    readers = lidc_nodules(xml, prior_volume)
    model = ModelIdentity("noduleai-detector", "1.0.0")
    for ds in encode_results(prior_paths, prior_volume, readers, model).datasets:
        path = tmp_path / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        orthanc.upload(path)
    for path in [*prior_paths, *current_paths]:
        orthanc.upload(path)
    orthanc.client.put(
        "/modalities/noduleai",
        json={"AET": "NODULEAI", "Host": "127.0.0.1", "Port": free_port(), "AllowGet": True},
    ).raise_for_status()
    config = NodeConfig.model_validate(
        {
            "ae_policies": [{"ae_title": "CT1", "priors": {"source": "pacs", "retrieve": "get"}}],
            "destinations": [
                {
                    "name": "pacs",
                    "type": "dimse",
                    "ae_title": orthanc.aet,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                }
            ],
        }
    )
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(db)

    def no_detector() -> Detector:
        raise AssertionError("the prior's findings must be read from its SR, not detected")

    locator = PriorLocator(
        db, LocalSpool(tmp_path / "spool", 0), config, "NODULEAI", no_detector, 20
    )
    header = dcmread(current_paths[0], stop_before_pixels=True)
    timings: dict[str, float] = {}
    located = locator.locate("CT1", header, build_volume(current_paths), timings)

    assert isinstance(located, PriorFindings), located
    assert located.findings_from == "report"
    assert len(located.evidence) == len(prior_paths)  # every CT instance came, by C-GET
    # the readers' nodules, read back from the SR, where they are in the prior
    assert len(located.nodules) == len(readers)
    for nodule in readers:
        nearest = min(
            located.nodules,
            key=lambda m: float(np.linalg.norm(np.subtract(m.centre_mm, nodule.center_mm))),
        )
        # the SR's centre is its outline's, on the slice of largest extent: within 3 mm, or a
        # fifth of the long axis for a large irregular lesion
        bound = max(3.0, 0.2 * nearest.long_axis_mm)
        assert np.linalg.norm(np.subtract(nearest.centre_mm, nodule.center_mm)) < bound
    # aligned: the readers' nodule maps to where the motion put it
    moved = located.registration.transform.to_current(READERS_NODULE_MM)
    assert np.linalg.norm(moved - truth.to_current(READERS_NODULE_MM)) < 1.5
    with db.session() as session:
        states = dict(session.execute(select(Study.study_instance_uid, Study.state)).all())
        jobs = session.scalar(select(func.count(Job.id)))
    assert states == {located.study_instance_uid: StudyState.PRIOR} and jobs == 0
    db.dispose()
