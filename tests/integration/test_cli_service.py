"""``noduleai serve`` as an operator runs it: CLI, embedded queue, HTTP API, logs without PHI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.db import Database
from dicom_node.queues import EmbeddedQueue
from tests.helpers import free_port, storescu, wait_for

PATIENT = {"PatientName": "Doe^Janet", "PatientID": "PID-778899", "PatientBirthDate": "19450317"}


def _noduleai(*args: str, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def service_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {
        "NODULEAI_DATA_DIR": str(tmp_path / "var"),
        "NODULEAI_DB_URL": database_url,
        "NODULEAI_DICOM_HOST": "127.0.0.1",
        "NODULEAI_DICOM_PORT": str(free_port()),
        "NODULEAI_HTTP_PORT": str(free_port()),
        "NODULEAI_QUIET_SECONDS": "1",
        "NODULEAI_MIN_FREE_BYTES": "0",
        # No workers in-process: the test itself consumes the embedded queue, as a worker would.
        "NODULEAI_WORKERS": "0",
    }


@pytest.fixture
def serve(service_env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    process = _noduleai("serve", env=service_env)
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def _patient_study(source: Path, out: Path) -> Path:
    out.mkdir()
    study, series = generate_uid(), generate_uid()
    for path in sorted(source.rglob("*.dcm"))[:6]:
        ds = pydicom.dcmread(path)
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / path.name)
    return out


def test_serve_receives_a_study_queues_one_job_on_the_embedded_queue_and_logs_no_patient_data(
    serve: subprocess.Popen[str], service_env: dict[str, str], shared_data: Path, tmp_path: Path
) -> None:
    http = f"http://127.0.0.1:{service_env['NODULEAI_HTTP_PORT']}"
    wait_for(lambda: _try(lambda: _get(f"{http}/healthz")["status"] == "ok"), timeout=30)
    folder = _patient_study(shared_data / "lidc-small", tmp_path / "study")
    result = storescu(int(service_env["NODULEAI_DICOM_PORT"]), folder)
    assert result.returncode == 0, result.stderr

    studies = wait_for(lambda: [s for s in _get(f"{http}/api/studies") if s["state"] == "queued"])
    assert len(studies) == 1
    study = studies[0]
    assert study["instances"] == 6
    assert study["queued_at"] >= study["received_at"]
    assert study["error"] is None
    assert {"study_instance_uid", "state", "instances", "received_at", "queued_at", "error"} <= set(
        study
    )

    db = Database(service_env["NODULEAI_DB_URL"])
    queue = EmbeddedQueue(db, "nodule.inference", "nodule.dead")
    message = wait_for(lambda: queue.receive(timeout=0.5), timeout=30)
    assert message.body["study_instance_uid"] == study["study_instance_uid"]
    assert message.body["job_id"] == study["job_id"]
    queue.ack(message)
    assert queue.receive(timeout=1.5) is None
    db.dispose()

    serve.send_signal(signal.SIGTERM)
    output, _ = serve.communicate(timeout=30)
    assert serve.returncode == 0, output
    assert "job " in output and "published" in output
    for value in (*PATIENT.values(), "Doe", "Janet", "778899"):
        assert value not in output
    assert str(json.dumps(message.body)).find("Doe") < 0


def _try(check: Any) -> Any:
    try:
        return check()
    except OSError:
        return False


def test_an_invalid_setting_stops_the_start_with_a_message_naming_it(
    service_env: dict[str, str],
) -> None:
    process = _noduleai("serve", env={**service_env, "NODULEAI_DICOM_PORT": "eleven"})
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "NODULEAI_DICOM_PORT" in output


def test_an_invalid_ae_policy_file_stops_the_start_with_a_message_naming_the_field(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("ae_policies:\n  - ae_title: MODALITY\n    completeness: sometimes\n")
    process = _noduleai("serve", env={**service_env, "NODULEAI_CONFIG": str(config)})
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "ae_policies.0.completeness" in output


def test_db_upgrade_creates_the_schema_and_is_idempotent(service_env: dict[str, str]) -> None:
    for _ in range(2):
        process = _noduleai("db", "upgrade", env=service_env)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
