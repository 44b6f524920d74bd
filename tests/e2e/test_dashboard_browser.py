"""The dashboard in a real browser while real studies flow through ``noduleai serve`` with RabbitMQ.

Chromium (Debian's) is driven by ``playwright-core`` from ``dashboard_browser.mjs``; the script
reports what every page showed, and this test compares it with the JSON API and the database.
Screenshots land in ``test-artifacts/dashboard/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicom_node.config import NodeConfig
from dicom_node.db import Database, Instance, Job, Study
from dicom_node.errors import ErrorCode
from dicom_node.lifecycle import settle_failure
from dicom_node.retry import Decision, Verdict
from tests.conftest import REPO
from tests.helpers import AMQP_URL, Service, free_port, storescu, wait_for

E2E = Path(__file__).parent
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
TOKEN = "e2e-dashboard-token-42"
REASON = "synthetic failure for the e2e test: stage 2 timed out"


@pytest.fixture(scope="module")
def browser_driver() -> Path:
    """``playwright-core`` installed from the pinned lock file, and Debian's chromium."""
    chromium = shutil.which("chromium")
    if chromium is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and npm are needed; scripts/system-deps.sh installs them")
        pytest.skip("chromium or npm not installed")
    if not (E2E / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=E2E, check=True, timeout=300)
    return Path(chromium)


@pytest.fixture
def serve(tmp_path: Path, amqp_queues: tuple[str, str]) -> Iterator[dict[str, str]]:
    """``noduleai serve`` on free loopback ports with RabbitMQ and queues of this test's own."""
    env = {
        "NODULEAI_DATA_DIR": str(tmp_path / "var"),
        "NODULEAI_DICOM_HOST": "127.0.0.1",
        "NODULEAI_DICOM_PORT": str(free_port()),
        "NODULEAI_HTTP_PORT": str(free_port()),
        "NODULEAI_QUIET_SECONDS": "1",
        "NODULEAI_MIN_FREE_BYTES": "0",
        "NODULEAI_AMQP_URL": AMQP_URL,
        "NODULEAI_AMQP_QUEUE": amqp_queues[0],
        "NODULEAI_AMQP_DEAD_LETTER_QUEUE": amqp_queues[1],
        "NODULEAI_DASHBOARD_TOKEN": TOKEN,
        # No worker in serve while the pages are checked against a still picture of the queue;
        # the test starts one after the retry, and the retried study must then complete.
        "NODULEAI_WORKERS": "0",
        "NODULEAI_MIN_SLICES": "3",
    }
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve"],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env["base"] = f"http://127.0.0.1:{env['NODULEAI_HTTP_PORT']}"
    env["db"] = f"sqlite:///{(tmp_path / 'var' / 'noduleai.db').resolve()}"
    try:
        wait_for(lambda: _ready(env["base"], process), timeout=60)
        yield env
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


def _ready(base: str, process: subprocess.Popen[bytes]) -> bool:
    assert process.poll() is None, "noduleai serve exited"
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _copy_study(source: Path, out: Path, count: int) -> Path:
    """``count`` slices of ``source`` as a new study (new UIDs)."""
    out.mkdir()
    study, series = generate_uid(), generate_uid()
    for path in sorted(source.rglob("*.dcm"))[:count]:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / path.name)
    return out


def _published(base: str, count: int) -> list[dict[str, Any]]:
    studies: list[dict[str, Any]] = httpx.get(f"{base}/api/studies").json()
    if len(studies) < count or any(s["state"] == "receiving" for s in studies):
        return []
    details = [httpx.get(f"{base}/api/studies/{s['study_instance_uid']}").json() for s in studies]
    return studies if all(d["jobs"][0]["published_at"] for d in details) else []


def _fail_current_job(db: Database, uid: str) -> str:
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
        assert study is not None
        job = session.get(Job, study.current_job_id)
        assert job is not None
        job.attempts = 3
        decision = Decision(Verdict.DEAD_LETTER, ErrorCode.INTERNAL, REASON)
        settle_failure(session, job, decision, NodeConfig())
        return job.id


def _rabbit_depth(queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def _drive_browser(env: dict[str, str], failed_uid: str, uids: list[str]) -> dict[str, Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver_env = {
        **os.environ,
        "E2E_BASE": env["base"],
        "E2E_TOKEN": TOKEN,
        "E2E_OUT": str(ARTIFACTS),
        "E2E_FAILED_UID": failed_uid,
        "E2E_UIDS": json.dumps(uids),
    }
    result = subprocess.run(
        ["node", str(E2E / "dashboard_browser.mjs")],
        env=driver_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return dict(json.loads(result.stdout))


def assert_retried_study_completes(
    env: dict[str, str], uid: str, log: Path, timeout: float = 300.0
) -> None:
    """Start a worker (``noduleai worker``); the retried study reaches ``done``."""
    worker = Service(["worker"], env, log)
    try:
        wait_for(
            lambda: (
                httpx.get(f"{env['base']}/api/studies/{uid}").json()["study"]["state"] == "done"
            ),
            timeout=timeout,
            interval=1.0,
        )
    finally:
        worker.stop()


def test_every_page_shows_what_the_api_and_database_hold_and_retry_requeues_a_failed_study(
    browser_driver: Path, serve: dict[str, str], shared_data: Path, tmp_path: Path
) -> None:
    base, source = serve["base"], shared_data / "lidc-small"
    folders = [
        source,
        _copy_study(source, tmp_path / "b", 8),
        _copy_study(source, tmp_path / "c", 5),
    ]
    for folder in folders:
        sent = storescu(int(serve["NODULEAI_DICOM_PORT"]), folder)
        assert sent.returncode == 0, sent.stderr
    studies = wait_for(lambda: _published(base, 3), timeout=60)
    by_instances = {s["instances"]: s["study_instance_uid"] for s in studies}
    failed_uid = by_instances[5]
    db = Database(serve["db"])
    failed_job = _fail_current_job(db, failed_uid)
    api = httpx.get(f"{base}/api/overview").json()
    with db.session() as session:  # the truth the pages must show (before the retry)
        instances = session.scalar(select(func.count()).select_from(Instance))
        db_states = dict(session.execute(select(Study.study_instance_uid, Study.state)).all())
    assert instances == 29

    seen = _drive_browser(serve, failed_uid, [s["study_instance_uid"] for s in studies])
    assert seen["pageErrors"] == []

    shown = seen["overview"]["shown"]
    assert shown["queue-0-messages"] == str(api["queues"][0]["messages"]) == "3"
    assert shown["queue-1-messages"] == "0"
    assert shown["instances-total"] == str(api["instances_total"]) == "29"
    assert shown["studies-queued"] == "2" and shown["studies-failed"] == "1"
    assert shown["hour-instances"] == "29"
    assert seen["overview"]["latencySeries"] >= 1
    # 24-hour clock, as every time the pages render (the browser's locale would say "5:38 PM")
    assert re.fullmatch(r"updated \d\d:\d\d:\d\d", seen["overview"]["refreshedAt"])

    rows = {r["uid"]: r for r in seen["studies"]["rows"]}
    assert seen["studies"]["total"] == 3
    assert {uid: r["instances"] for uid, r in rows.items()} == {
        v: k for k, v in by_instances.items()
    }
    assert {uid: r["state"] for uid, r in rows.items()} == db_states
    assert seen["studies"]["failedTotal"] == 1 and seen["studies"]["searched"] == [failed_uid]
    for uid, page in seen["studyPages"].items():
        assert page["study-state"] == db_states[uid]
        assert page["study-instances"] == str(rows[uid]["instances"])
        assert page["study-uid"] == uid and "patient-hidden" in page

    failures = seen["failures"]
    assert failures["before"] == [
        {
            "job": failed_job,
            "uid": failed_uid,
            "code": "internal_error",
            "reason": REASON,
            "attempts": 3,
        }
    ]
    assert "401" in failures["refused"]
    assert "retry done" in failures["accepted"]
    # signed in by a server-set session cookie that scripts cannot read
    assert failures["session"] == [{"httpOnly": True, "sameSite": "Strict", "path": "/"}]
    assert "noduleai_session" not in failures["cookieFromScript"]
    assert seen["config"]["settings"]["amqp_url"] == "**********"
    assert seen["config"]["settings"]["dashboard_token"] == "**********"
    assert TOKEN not in seen["config"]["html"] and "guest:guest" not in seen["config"]["html"]
    # /docs: Swagger UI from the node's own assets, nothing fetched from elsewhere
    docs = seen["apiDocs"]
    assert docs["outside"] == [], docs["outside"]
    assert docs["title"].startswith("NoduleAI")
    assert "/api/studies/{study_uid}/findings" in docs["operations"], docs["operations"]

    detail = httpx.get(f"{base}/api/studies/{failed_uid}").json()
    assert detail["study"]["state"] == "queued" and detail["jobs"][0]["supersedes"] == failed_job
    assert detail["jobs"][0]["published_at"] is not None
    assert wait_for(lambda: _rabbit_depth(serve["NODULEAI_AMQP_QUEUE"]) == 4)
    audit = httpx.get(f"{base}/api/audit").json()
    assert [(a["actor"], a["action"]) for a in audit[:3]] == [
        ("token", "retry"),
        ("token", "signin"),
        ("anonymous", "retry.refused"),
    ]
    worker_env = {k: v for k, v in serve.items() if k.startswith("NODULEAI_")}
    assert_retried_study_completes(
        {**worker_env, "NODULEAI_DB_URL": serve["db"], "base": base},
        failed_uid,
        tmp_path / "worker.log",
    )
    db.dispose()
    screenshots = {p.name for p in ARTIFACTS.glob("*.png")}
    expected = {"overview.png", "studies.png", "failures.png", "study-after-retry.png"}
    assert expected | {"api-docs.png"} <= screenshots
