"""Results back to the PACS and to FHIR: Orthanc pushes LIDC-IDRI-0001 to ``noduleai serve``,
the SEG, SR, GSPS, key images and screening heatmap come back into the same study; a FHIR server
holds one report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from pipelines.heatmap import HEATMAP_SERIES_NUMBER
from pipelines.keyimages import KEY_IMAGE_SERIES_NUMBER
from tests.conftest import REPO
from tests.fhir_peer import FhirServer
from tests.helpers import Service, free_port, node_api, node_healthy, wait_for
from tests.peers import Orthanc

TOKEN = "roundtrip-test-token"
ARTIFACTS = REPO / "test-artifacts" / "roundtrip"


def _api(port: str, path: str, method: str = "GET") -> Any:
    return node_api(port, path, TOKEN, method)


def _study(port: str) -> dict[str, Any] | None:
    try:
        studies = _api(port, "/api/studies")
    except OSError:
        return None
    return studies[0] if studies else None


def _settled(port: str, job_id: str | None = None) -> dict[str, Any] | None:
    study = _study(port)
    if study is None or study["state"] not in ("done", "failed", "rejected"):
        return None
    if job_id is not None and study["job_id"] == job_id:
        return None
    return study


def _series(orthanc: Orthanc, study_id: str) -> dict[str, list[dict[str, Any]]]:
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc.get(f"/studies/{study_id}/series"):
        by_modality.setdefault(series["MainDicomTags"]["Modality"], []).append(series)
    return by_modality


# This heavy test runs once, on the production database.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_results_return_to_the_same_study_once_and_fhir_holds_one_report(
    orthanc: Orthanc,
    fhir_server: FhirServer,
    shared_data: Path,
    tmp_path: Path,
    database_url: str,
) -> None:
    lidc = sorted((shared_data / "lidc-idri-0001").rglob("*.dcm"))
    for path in lidc:
        orthanc.upload(path)
    study_uid = str(dcmread(lidc[0], stop_before_pixels=True).StudyInstanceUID)
    ct_series_uid = str(dcmread(lidc[0], stop_before_pixels=True).SeriesInstanceUID)
    orthanc_study = orthanc.lookup_study(study_uid)

    dicom_port, http_port = free_port(), free_port()
    config = tmp_path / "node.yaml"
    config.write_text(
        "ae_policies:\n"
        f"  - {{ae_title: {orthanc.aet}, hosts: [127.0.0.1], completeness: release}}\n"
        "destinations:\n"
        f"  - {{name: pacs, type: dimse, ae_title: {orthanc.aet}, host: 127.0.0.1, "
        f"port: {orthanc.dicom_port}}}\n"
        f"  - {{name: ehr, type: fhir, url: '{fhir_server.url}', token: '{fhir_server.token}'}}\n"
    )
    env = {
        "NODULEAI_DATA_DIR": str(tmp_path / "var"),
        "NODULEAI_DB_URL": database_url,
        "NODULEAI_DICOM_HOST": "127.0.0.1",
        "NODULEAI_DICOM_PORT": str(dicom_port),
        "NODULEAI_HTTP_PORT": str(http_port),
        "NODULEAI_MIN_FREE_BYTES": "0",
        "NODULEAI_CONFIG": str(config),
        "NODULEAI_DASHBOARD_TOKEN": TOKEN,
        "NODULEAI_INFERENCE_THREADS": "2",
        "NODULEAI_DELIVERY_BACKOFF_SECONDS": "0.5",
        "NODULEAI_HEATMAP": "true",
    }
    serve = Service(["serve"], env, tmp_path / "serve.log")
    try:
        wait_for(lambda: _study(str(http_port)) is not None or _healthy(http_port), timeout=60)
        orthanc.add_modality("noduleai", "NODULEAI", "127.0.0.1", dicom_port)
        orthanc.push_study("noduleai", orthanc_study)

        first = wait_for(lambda: _settled(str(http_port)), timeout=600, interval=1.0)
        assert first["state"] == "done", (first, serve.output()[-4000:])
        series = _series(orthanc, orthanc_study)
        assert "SR" in series, series.keys()
        count = len(orthanc.get(f"/studies/{orthanc_study}/instances"))
        nodules = _nodules(database_url)
        assert len(series.get("SEG", [])) == (1 if nodules else 0)
        assert len(series.get("PR", [])) == (1 if nodules else 0)
        other = {int(s["MainDicomTags"]["SeriesNumber"]): s for s in series.get("OT", [])}
        assert sorted(other) == [KEY_IMAGE_SERIES_NUMBER, HEATMAP_SERIES_NUMBER], other.keys()
        key_images = other[KEY_IMAGE_SERIES_NUMBER]["Instances"]
        assert len(key_images) == nodules
        assert len(other[HEATMAP_SERIES_NUMBER]["Instances"]) == 1
        _check_objects(orthanc, series, ct_series_uid)
        # Orthanc renders each key image (its /preview PNG), kept for a look
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for k, instance_id in enumerate(key_images, start=1):
            png = orthanc.client.get(f"/instances/{instance_id}/preview").content
            assert png.startswith(b"\x89PNG"), png[:16]
            (ARTIFACTS / f"key-image-{k}.png").write_bytes(png)

        reports = fhir_server.get("DiagnosticReport", identifier=_report_identifier(study_uid))
        assert reports["total"] == 1 if "total" in reports else len(reports["entry"]) == 1
        report = reports["entry"][0]["resource"]
        assert report["status"] == "preliminary"
        history = fhir_server.get(f"DiagnosticReport/{report['id']}/_history")
        statuses = [e["resource"]["status"] for e in reversed(history["entry"])]
        assert statuses == ["registered", "preliminary"], statuses
        assert len(report.get("result", [])) == nodules

        # The same job again: the same objects (same UIDs), the PACS stores them once.
        rerun = _api(str(http_port), f"/api/studies/{study_uid}/rerun", method="POST")
        second = wait_for(
            lambda: _settled(str(http_port), first["job_id"]), timeout=600, interval=1.0
        )
        assert second["job_id"] == rerun["new_job_id"] and second["state"] == "done"
        assert len(orthanc.get(f"/studies/{orthanc_study}/instances")) == count
        reports = fhir_server.get("DiagnosticReport", identifier=_report_identifier(study_uid))
        assert len(reports["entry"]) == 1

        # The PACS sends the whole study again, our own SEG, SR and GSPS among it (Orthanc opens
        # an association per SOP class group): no instance is new, nothing reopens, no job.
        orthanc.push_study("noduleai", orthanc_study)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:  # a bounded look for a job that must not appear
            again = _study(str(http_port))
            assert again is not None and again["job_id"] == second["job_id"], again
            assert again["state"] == "done" and again["instances"] == len(lidc), again
            time.sleep(0.5)
        assert len(orthanc.get(f"/studies/{orthanc_study}/instances")) == count
        history = fhir_server.get(f"DiagnosticReport/{report['id']}/_history")
        statuses = [e["resource"]["status"] for e in reversed(history["entry"])]
        assert statuses == ["registered", "preliminary"], statuses
    finally:
        serve.stop()


def _healthy(port: int) -> bool:
    return node_healthy(port, TOKEN)


def _nodules(database_url: str) -> int:
    from sqlalchemy import select

    from dicom_node.db import Database, Result

    db = Database(database_url)
    with db.session() as session:
        results = session.scalars(select(Result)).all()
        count = len(results[-1].nodules) if results else 0
    db.dispose()
    return count


def _report_identifier(study_uid: str) -> str:
    from dicom_node.fhir_resources import report_identifier

    ident = report_identifier(study_uid)
    return f"{ident['system']}|{ident['value']}"


def _check_objects(
    orthanc: Orthanc, series: dict[str, list[dict[str, Any]]], ct_series_uid: str
) -> None:
    """Every result object references the CT series it was computed from (a key image: the
    CT slice it shows; the heatmap: the series and each slice)."""
    for modality in ("SEG", "SR", "PR", "OT"):
        for s in series.get(modality, []):
            for instance_id in s["Instances"]:
                raw = orthanc.client.get(f"/instances/{instance_id}/file").content
                if int(s["MainDicomTags"]["SeriesNumber"]) == KEY_IMAGE_SERIES_NUMBER:
                    shown = dcmread(DicomBytesIO(raw)).SourceImageSequence[0]
                    uid = str(shown.ReferencedSOPInstanceUID).encode()
                    (hit,) = orthanc.client.post("/tools/lookup", content=uid).json()
                    parent = orthanc.get(f"/instances/{hit['ID']}/series")
                    assert parent["MainDicomTags"]["SeriesInstanceUID"] == ct_series_uid
                    continue
                assert ct_series_uid.encode() in raw, (modality, "does not reference the CT")
