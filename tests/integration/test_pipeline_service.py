"""The pipeline inside the service: real studies through storescu, RabbitMQ, workers, the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicom_node.db import Database, Instance, Job, Result
from dicom_node.queues import declare_topology
from dicom_node.results import (
    COMPREHENSIVE_3D_SR,
    GSPS_STORAGE,
    PARAMETRIC_MAP,
    SECONDARY_CAPTURE,
    SEGMENTATION_STORAGE,
)
from pipelines.manifest import STAGE1_NAME, load_manifest
from tests.helpers import AMQP_URL, dciodvfy, service_env, storescu, wait_for
from tests.integration.conftest import StartService

READERS_NODULE_MM = np.array([55.5, 85.6, -116.1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _studies(env: dict[str, str]) -> list[dict[str, Any]]:
    try:
        return list(_get(f"http://127.0.0.1:{env['NODULEAI_HTTP_PORT']}/api/studies"))
    except OSError:
        return []


@pytest.fixture
def env(tmp_path: Path, database_url: str, amqp_queues: tuple[str, str]) -> dict[str, str]:
    return service_env(tmp_path / "var", database_url, AMQP_URL, amqp_queues)


def _ready(env: dict[str, str]) -> bool:
    try:
        return bool(_get(f"http://127.0.0.1:{env['NODULEAI_HTTP_PORT']}/healthz"))
    except OSError:
        return False


def _finished(env: dict[str, str], n: int = 1) -> list[dict[str, Any]]:
    done = [s for s in _studies(env) if s["state"] in ("done", "rejected", "failed")]
    return done if len(done) >= n else []


# The heavy end-to-end tests run once each: the production pair (PostgreSQL + RabbitMQ) or the
# embedded defaults (SQLite + the embedded queue); the ingest tests cover both databases.
PRODUCTION = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
EMBEDDED = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@PRODUCTION
def test_lidc_pushed_by_storescu_into_serve_with_rabbitmq_completes_with_the_readers_nodule(
    env: dict[str, str], services: StartService, shared_data: Path
) -> None:
    serve = services(["serve"], env, "serve")
    wait_for(lambda: _ready(env), timeout=60)
    result = storescu(int(env["NODULEAI_DICOM_PORT"]), shared_data / "lidc-idri-0001")
    assert result.returncode == 0, result.stderr

    (study,) = wait_for(lambda: _finished(env), timeout=600, interval=1.0)
    assert study["state"] == "done", (study, serve.output()[-3000:])
    timings = study["timings_ms"]
    assert {"load", "preprocess", "stage1", "stage2", "postprocess", "total"} <= set(timings)
    assert study["backend"] == "onnxruntime-cpu"

    db = Database(env["NODULEAI_DB_URL"])
    with db.session() as session:
        result_row = session.scalars(select(Result)).one()
    db.dispose()
    centres = [np.array(n["center_mm"]) for n in result_row.nodules]
    distances = [float(np.linalg.norm(c - READERS_NODULE_MM)) for c in centres]
    assert min(distances) < 10.0, result_row.nodules

    # The job's log at INFO names jobs, AE titles, SOP classes and counts: no source image UID
    # (the libraries that would log them run at WARNING) and no secret.
    log = serve.output()
    assert "job " in log and " done: " in log
    sources = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in (shared_data / "lidc-idri-0001").rglob("*.dcm")
    }
    assert not [uid for uid in sources if uid in log]
    assert "guest:guest" not in log


def _series(folder: Path, slices: list[pydicom.Dataset]) -> Path:
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for n, ds in enumerate(slices):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{n:03d}.dcm")
    return folder


def _bad_studies(shared_data: Path, out: Path) -> dict[str, Path]:
    """One study per way of being unusable, built from real slices."""
    lidc = [pydicom.dcmread(p) for p in sorted((shared_data / "lidc-small").rglob("*.dcm"))]
    lidc.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    cr = pydicom.dcmread(sorted((shared_data / "lidc-small").rglob("*.dcm"))[0])
    cr.Modality, cr.SOPClassUID = "CR", "1.2.840.10008.5.1.4.1.1.1"
    cr.file_meta.MediaStorageSOPClassUID = cr.SOPClassUID
    duplicate = [pydicom.dcmread(p) for p in sorted((shared_data / "lidc-small").rglob("*.dcm"))]
    clash = duplicate[5]
    clash.ImagePositionPatient = duplicate[6].ImagePositionPatient
    missing = [ds for i, ds in enumerate(lidc) if i != 7]
    studies = {
        "cr": _series(out / "cr", [cr]),
        "three": _series(out / "three", lidc[:3]),
        "duplicate": _series(out / "duplicate", duplicate),
        "missing": _series(out / "missing", missing),
    }
    studies["malformed"] = shared_data / "malformed"
    return studies


@EMBEDDED
def test_bad_studies_end_rejected_with_a_reason_and_nothing_crashes(
    env: dict[str, str], services: StartService, shared_data: Path, tmp_path: Path
) -> None:
    env = {**env, "NODULEAI_MIN_SLICES": "10"}
    del env["NODULEAI_AMQP_URL"]  # the embedded queue: the same worker code inside serve
    serve = services(["serve"], env, "serve")
    wait_for(lambda: _ready(env), timeout=60)
    studies = _bad_studies(shared_data, tmp_path / "bad")
    for name, folder in studies.items():
        assert storescu(int(env["NODULEAI_DICOM_PORT"]), folder).returncode == 0, name

    finished = wait_for(lambda: _finished(env, len(studies)), timeout=300, interval=1.0)
    assert [s["state"] for s in finished] == ["rejected"] * len(studies), serve.output()[-3000:]
    codes = sorted(s["error_code"] for s in finished)
    assert "no_eligible_series" in codes
    assert all(s["error_code"] and s["error"] for s in finished)
    assert serve.process.poll() is None
    assert "Traceback" not in serve.output()


@PRODUCTION
def test_a_worker_killed_mid_job_leaves_the_job_to_another_that_completes_it_once(
    env: dict[str, str], services: StartService, shared_data: Path
) -> None:
    services(["node"], env, "node")
    wait_for(lambda: _ready(env), timeout=60)
    workers = {w.pid: w for w in (services(["worker"], env, f"worker{i}") for i in range(2))}
    db = Database(env["NODULEAI_DB_URL"])
    assert storescu(int(env["NODULEAI_DICOM_PORT"]), shared_data / "lidc-idri-0001").returncode == 0

    def busy_worker() -> int | None:
        from dicom_node.db import WorkerHeartbeat

        with db.session() as session:
            row = session.scalars(
                select(WorkerHeartbeat).where(WorkerHeartbeat.current_job_id.is_not(None))
            ).first()
        return int(row.id.split(":")[1]) if row is not None else None

    victim = wait_for(busy_worker, timeout=120, interval=0.2)
    workers[victim].kill()
    killed = time.monotonic()

    (study,) = wait_for(lambda: _finished(env), timeout=600, interval=1.0)
    recovered_s = time.monotonic() - killed
    assert study["state"] == "done"
    with db.session() as session:
        job = session.scalars(select(Job)).one()
        results = session.scalar(select(func.count()).select_from(Result))
        stored = session.scalar(select(func.count()).select_from(Instance))
    db.dispose()
    print(
        f"\nworker killed mid-job: sent 133, stored {stored}, results {results}, duplicates "
        f"{results - 1}, attempts {job.attempts}, done {recovered_s:.1f} s after the kill"
    )
    assert results == 1
    assert job.attempts == 2


@EMBEDDED
def test_a_job_failing_on_every_attempt_is_dead_lettered_and_failed_with_its_reason(
    env: dict[str, str], services: StartService, shared_data: Path, tmp_path: Path
) -> None:
    env = {
        **env,
        "NODULEAI_MODELS_DIR": str(tmp_path / "no-models-here"),
        "NODULEAI_MAX_ATTEMPTS": "2",
        "NODULEAI_RETRY_BACKOFF_SECONDS": "0.2",
        "NODULEAI_MIN_SLICES": "10",
    }
    services(["serve"], env, "serve")
    wait_for(lambda: _ready(env), timeout=60)
    assert storescu(int(env["NODULEAI_DICOM_PORT"]), shared_data / "lidc-small").returncode == 0

    (study,) = wait_for(lambda: _finished(env), timeout=120, interval=0.5)
    assert study["state"] == "failed"
    assert study["attempts"] == 2
    assert study["error_code"] == "inference_failed"
    assert "no-models-here" in study["error"] and "gave up after 2 attempts" in study["error"]

    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    declare_topology(channel, env["NODULEAI_AMQP_QUEUE"], env["NODULEAI_AMQP_DEAD_LETTER_QUEUE"])
    method, _props, body = channel.basic_get(env["NODULEAI_AMQP_DEAD_LETTER_QUEUE"], auto_ack=True)
    connection.close()
    assert method is not None
    assert json.loads(body)["job_id"] == study["job_id"]


def assert_heatmap_peaks_at_the_nodules(pmap: pydicom.Dataset, nodules: list[Any]) -> None:
    """The heatmap has a frame per CT slice in increasing z, scores in [0, 1], and stage 1 scored
    every reported nodule: at least its candidate threshold within 5 mm of the nodule centre."""
    frames = pmap.pixel_array
    assert frames.shape == (133, 512, 512) and frames.dtype == np.float32
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    groups = pmap.PerFrameFunctionalGroupsSequence
    ipp = np.array(
        [[float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient] for g in groups]
    )
    assert (np.diff(ipp[:, 2]) > 0).all()
    shared = pmap.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    threshold = float(load_manifest(STAGE1_NAME)["candidate_threshold"])
    for nodule in nodules:
        x, y, z = nodule["center_mm"]
        near = np.abs(ipp[:, 2] - z) <= 5.0
        rows = np.abs(ipp[0, 1] + np.arange(pmap.Rows) * spacing[0] - y) <= 5.0
        cols = np.abs(ipp[0, 0] + np.arange(pmap.Columns) * spacing[1] - x) <= 5.0
        assert frames[np.ix_(near, rows, cols)].max() >= threshold, nodule["center_mm"]
    # nothing outside the lungs' box: the frames' borders are 0
    assert frames[:, :20, :].max() == 0.0 and frames[:, :, :20].max() == 0.0


def test_detect_writes_findings_json_for_a_folder_and_a_rejection_for_a_bad_one(
    tmp_path: Path, shared_data: Path
) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node.cli",
            "detect",
            str(shared_data / "lidc-idri-0001"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={
            **os.environ,
            "NODULEAI_INFERENCE_THREADS": "2",
            "NODULEAI_HEATMAP": "1",
        },
    )
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "findings.json").read_text())
    assert report["series_instance_uid"].startswith("1.3.6.1.4.1.14519")
    assert {"stage1", "stage2", "total"} <= set(report["timings_ms"])
    assert report["backend"] == "onnxruntime-cpu"
    for nodule in report["nodules"]:
        assert {
            "center_mm",
            "long_axis_mm",
            "short_axis_mm",
            "volume_mm3",
            "mean_hu",
            "type",
            "probability",
            "needs_review",
        } <= set(nodule)
    distances = [
        np.linalg.norm(np.array(n["center_mm"]) - READERS_NODULE_MM) for n in report["nodules"]
    ]
    assert min(distances) < 10.0
    objects = [pydicom.dcmread(out / name) for name in report["objects"]]
    # SEG, SR, GSPS, one key image (Secondary Capture) per nodule and the heatmap
    classes = sorted(str(ds.SOPClassUID) for ds in objects)
    expected = [SEGMENTATION_STORAGE, COMPREHENSIVE_3D_SR, GSPS_STORAGE, PARAMETRIC_MAP]
    assert classes == sorted(expected + [SECONDARY_CAPTURE] * len(report["nodules"]))
    name = next(
        n
        for n, ds in zip(report["objects"], objects, strict=True)
        if ds.SOPClassUID == PARAMETRIC_MAP
    )
    assert_heatmap_peaks_at_the_nodules(pydicom.dcmread(out / name), report["nodules"])
    errors, _ = dciodvfy(out / name)
    assert errors == [], errors

    bad = tmp_path / "bad"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node.cli",
            "detect",
            str(shared_data / "malformed"),
            "--out",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "rejected" in json.loads((bad / "findings.json").read_text())


def _detect(folder: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "detect", str(folder), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "NODULEAI_INFERENCE_THREADS": "2"},
    )


@pytest.mark.parametrize(
    ("folder", "outcome", "code"),
    [
        ("lidc-small", "rejected", "no_eligible_series"),
        ("malformed", "rejected", "no_eligible_series"),
        ("transfer-syntaxes", "rejected", "no_eligible_series"),
        # anonymised: the dataset's Study and Series UIDs are empty, nothing could reference them
        ("jpeg2000-ct", "rejected", "no_eligible_series"),
    ],
)
def test_detect_on_each_small_shared_folder_ends_with_a_reason_never_a_traceback(
    shared_data: Path, tmp_path: Path, folder: str, outcome: str, code: str
) -> None:
    run = _detect(shared_data / folder, tmp_path)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == (1 if outcome == "failed" else 0)
    report = json.loads((tmp_path / "findings.json").read_text())
    assert report[outcome]["code"] == code and report[outcome]["detail"]


def test_detect_references_instances_named_only_in_their_file_meta(
    shared_data: Path, tmp_path: Path
) -> None:
    """The JPEG 2000 slices with a study and series but an empty SOPInstanceUID in the dataset
    (their file meta names them): the SR references them by the file meta's UIDs."""
    source = tmp_path / "in"
    source.mkdir()
    study, series = generate_uid(), generate_uid()
    meta_uids = set()
    for path in sorted((shared_data / "jpeg2000-ct").iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        meta_uids.add(str(ds.file_meta.MediaStorageSOPInstanceUID))
        ds.save_as(source / path.name, enforce_file_format=True)
    run = _detect(source, tmp_path / "out")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "findings.json").read_text())
    (sr_name,) = [n for n in report["objects"] if n.startswith("SR-")]
    sr = pydicom.dcmread(tmp_path / "out" / sr_name)
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    (referenced,) = evidence.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedSOPSequence} == meta_uids
