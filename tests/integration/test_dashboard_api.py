"""The dashboard JSON API, actions and /metrics against a real node (SQLite and PostgreSQL)."""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.db import AuditEntry, Job, Study, WorkerHeartbeat, utcnow
from dicom_node.errors import ErrorCode
from dicom_node.lifecycle import settle_failure
from dicom_node.node import Node
from dicom_node.retry import Decision, Verdict
from dicom_node.workers import record_heartbeat
from tests.helpers import storescu, wait_for

TOKEN = "test-token-0123456789"


def _client(node: Node, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", timeout=10, **kwargs)


def _send_study(node: Node, shared_data: Path) -> str:
    result = storescu(node.scp.port, shared_data / "lidc-small")
    assert result.returncode == 0, result.stderr
    with _client(node) as http:
        rows = wait_for(lambda: http.get("/api/studies", params={"state": "queued"}).json())
    return str(rows[0]["study_instance_uid"])


def _metrics(node: Node) -> dict[str, float]:
    """Every sample of ``/metrics`` as ``name{label=value,...}`` → value."""
    with _client(node) as http:
        text = http.get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def _fail(node: Node, study_uid: str, reason: str) -> str:
    with node.db.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert study is not None and study.current_job_id is not None
        job = session.get(Job, study.current_job_id)
        assert job is not None
        job.attempts = 3
        decision = Decision(Verdict.DEAD_LETTER, ErrorCode.INTERNAL, reason)
        settle_failure(session, job, decision, NodeConfig())
        return job.id


def _audit(node: Node) -> list[tuple[str, str, str | None]]:
    with node.db.session() as session:
        rows = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
        return [(a.actor, a.action, a.target) for a in rows]


def test_metrics_parse_and_move_as_a_study_flows(
    make_node: Callable[..., Node], shared_data: Path
) -> None:
    node = make_node(dashboard_token=TOKEN)
    before = _metrics(node)
    assert before["noduleai_instances_received_total{}"] == 0
    assert before["noduleai_queue_depth{queue=nodule.inference}"] == 0

    _send_study(node, shared_data)
    after = wait_for(lambda: (m := _metrics(node))["noduleai_studies{state=queued}"] == 1 and m)

    assert after["noduleai_instances_received_total{}"] == 16
    assert after["noduleai_jobs{state=queued}"] == 1
    assert after["noduleai_queue_depth{queue=nodule.inference}"] == 1
    assert after["noduleai_queue_depth{queue=nodule.dead}"] == 0
    assert after["noduleai_job_stage_duration_seconds_count{stage=ingest}"] == 1
    assert after["noduleai_job_stage_duration_seconds_bucket{le=+Inf,stage=ingest}"] == 1
    assert after["noduleai_delivery_failures_total{}"] == 0

    record_heartbeat(node.db, "host-a:1", "host-a", "onnx-cpu", None)
    assert _metrics(node)["noduleai_workers_alive{}"] == 1


def test_every_read_endpoint_answers_with_numbers_matching_the_database(
    make_node: Callable[..., Node], shared_data: Path
) -> None:
    node = make_node(dashboard_token=TOKEN)
    uid = _send_study(node, shared_data)
    record_heartbeat(node.db, "host-a:1", "host-a", "onnx-cpu", "job-x")
    record_heartbeat(node.db, "host-a:1", "host-a", "onnx-cpu", None)
    with _client(node) as http:
        overview = http.get("/api/overview").json()
        assert overview["instances_total"] == 16
        assert overview["studies_by_state"] == {"queued": 1}
        assert overview["queue_backend"] == "embedded"
        assert [q["messages"] for q in overview["queues"]] == [1, 0]
        assert overview["outbox"] == 0
        assert overview["last_hour"]["instances"] == 16
        assert [w["id"] for w in overview["workers"]] == ["host-a:1"]
        assert overview["workers"][0]["current_job_id"] is None
        # a worker killed mid-job: its row keeps the job, the dashboard shows it working on nothing
        record_heartbeat(node.db, "host-b:2", "host-b", "onnx-cpu", "job-y")
        with node.db.session() as session:
            dead = session.get(WorkerHeartbeat, "host-b:2")
            assert dead is not None
            dead.last_heartbeat = utcnow() - timedelta(minutes=5)
        (gone,) = [w for w in http.get("/api/workers").json() if w["id"] == "host-b:2"]
        assert (gone["alive"], gone["current_job_id"]) == (False, None)
        assert overview["latency"][0]["stage"] == "ingest"

        page = http.get("/api/dashboard/studies", params={"q": uid[-12:]}).json()
        assert page["total"] == 1 and page["items"][0]["instances"] == 16
        assert http.get("/api/dashboard/studies", params={"state": "done"}).json()["total"] == 0

        detail = http.get(f"/api/studies/{uid}").json()
        assert detail["study"]["state"] == "queued"
        assert detail["series"][0]["instances"] == 16
        assert detail["jobs"][0]["published_at"] is not None
        assert detail["patient"] is None and detail["patient_data_shown"] is False
        assert http.get("/api/studies/1.2.3.4").status_code == 404

        assert sum(p["instances"] for p in http.get("/api/throughput").json()) == 16
        assert http.get("/api/latency").json()[0]["stages"][0]["count"] == 1
        assert http.get("/api/failures").json()["failures"] == []
        config = http.get("/api/config").json()
        assert config["settings"]["dashboard_token"] == "**********"
        assert config["settings"]["db_url"] == "**********"
        assert TOKEN not in http.get("/dashboard/config").text
        assert http.get("/readyz").json()["status"] == "ok"
        assert http.get("/healthz").json()["status"] == "ok"
        paths = http.get("/openapi.json").json()["paths"]
        assert {"/api/overview", "/api/studies/{study_uid}/retry", "/metrics"} <= set(paths)
        for page_path in (
            "/dashboard",
            "/dashboard/studies",
            f"/dashboard/studies/{uid}",
            "/dashboard/failures",
            "/dashboard/config",
            "/docs",
        ):
            response = http.get(page_path)
            assert response.status_code == 200, page_path
            assert "text/html" in response.headers["content-type"]


def test_an_action_without_credentials_is_refused_and_audited_with_credentials_it_works(
    make_node: Callable[..., Node], shared_data: Path
) -> None:
    node = make_node(dashboard_token=TOKEN)
    uid = _send_study(node, shared_data)
    failed_job = _fail(node, uid, "stage 2 timed out")
    with _client(node) as http:
        assert http.post(f"/api/studies/{uid}/retry").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert http.post(f"/api/studies/{uid}/retry", headers=wrong).status_code == 401
        http.cookies.set("noduleai_session", TOKEN)  # a token is not a session id
        assert http.post(f"/api/studies/{uid}/retry").status_code == 401
        http.cookies.clear()
        assert http.get(f"/api/studies/{uid}").json()["study"]["state"] == "failed"
        failures = http.get("/api/failures").json()["failures"]
        assert [(f["job_id"], f["error"], f["attempts"]) for f in failures] == [
            (failed_job, "stage 2 timed out", 3)
        ]

        auth = {"Authorization": f"Bearer {TOKEN}"}
        done = http.post(f"/api/studies/{uid}/retry", headers=auth)
        assert done.status_code == 200, done.text
        new_job = done.json()["new_job_id"]
        detail = wait_for(
            lambda: (d := http.get(f"/api/studies/{uid}").json())["jobs"][0]["published_at"] and d
        )
        assert detail["study"]["state"] == "queued" and detail["study"]["job_id"] == new_job
        assert detail["jobs"][0]["supersedes"] == failed_job
        assert http.post(f"/api/studies/{uid}/retry", headers=auth).status_code == 409
        assert http.post(f"/api/jobs/{failed_job}/discard", headers=auth).status_code == 200
        assert http.get("/api/failures").json()["failures"] == []
        rerun = http.post(f"/api/studies/{uid}/rerun", headers=auth)
        assert rerun.status_code == 200 and rerun.json()["job_id"] == new_job

    assert _audit(node) == [
        ("anonymous", "retry.refused", uid),
        ("anonymous", "retry.refused", uid),
        ("anonymous", "retry.refused", uid),
        ("token", "retry", uid),
        ("token", "retry.rejected", uid),
        ("token", "discard", failed_job),
        ("token", "rerun", uid),
    ]


def test_basic_auth_users_can_act_and_reads_can_be_protected(
    make_node: Callable[..., Node], shared_data: Path
) -> None:
    node = make_node(dashboard_users="alice:s3cret,bob:other", dashboard_public_read=False)
    uid = _send_study(node, shared_data)  # /api/studies stays open: it is the stable ingest API
    with _client(node) as http:
        assert http.get("/api/overview").status_code == 401
        assert http.get("/metrics").status_code == 401
        assert http.get("/dashboard").status_code == 401
        assert http.get("/healthz").status_code == 200
        assert http.post(f"/api/studies/{uid}/rerun", auth=("alice", "wrong")).status_code == 401
    with _client(node, auth=("alice", "s3cret")) as http:
        assert http.get("/api/overview").status_code == 200
        assert http.post(f"/api/studies/{uid}/rerun").status_code == 200
    assert _audit(node)[-2:] == [("anonymous", "rerun.refused", uid), ("alice", "rerun", uid)]


def test_sign_in_gives_an_httponly_session_readers_cannot_act_and_failures_are_rate_limited(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(
        dashboard_token=TOKEN, dashboard_readers="carol:r3ad", dashboard_public_read=False
    )
    act = {"X-NoduleAI-Action": "1"}
    with _client(node) as http:
        signed = http.post("/api/session", auth=("carol", "r3ad"))
        assert signed.json() == {"actor": "carol", "role": "reader"}
        cookie = signed.headers["set-cookie"]
        assert "noduleai_session=" in cookie and "HttpOnly" in cookie
        assert "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/" in cookie
        assert "Secure" not in cookie  # plain HTTP here; over TLS it is set (below)
        assert http.get("/api/overview").status_code == 200  # the session reads
        refused = http.post("/api/jobs/none/discard", headers=act)
        assert refused.status_code == 403
        assert http.delete("/api/session").json()["role"] == "anonymous"
        assert http.get("/api/overview").status_code == 401

    with _client(node) as http:
        assert http.post("/api/session", headers={"Authorization": f"Bearer {TOKEN}"}).is_success
        assert http.get("/api/session").json() == {"actor": "token", "role": "operator"}
        # the cookie acts only together with the page's own header
        assert http.post("/api/jobs/none/discard").status_code == 401
        assert http.post("/api/jobs/none/discard", headers=act).status_code == 404

    with _client(node) as http:
        for _ in range(5):
            assert http.post("/api/session", auth=("carol", "guess")).status_code == 401
        limited = http.post("/api/session", auth=("carol", "r3ad"))
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    actions = [a[1] for a in _audit(node)]
    assert actions[:3] == ["signin", "discard.forbidden", "signin"]
    assert actions.count("signin.refused") == 5 and actions[-1] == "signin.limited"


def test_over_tls_the_session_cookie_is_secure(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from dicom_node.api import create_app
    from dicom_node.config import NodeConfig, Settings
    from dicom_node.db import Database
    from dicom_node.migrate import upgrade

    settings = Settings(data_dir=tmp_path, dashboard_token=TOKEN)
    db = Database(settings.database_url)
    upgrade(db)
    with TestClient(create_app(db, settings, NodeConfig()), base_url="https://node") as http:
        signed = http.post("/api/session", headers={"Authorization": f"Bearer {TOKEN}"})
        assert "Secure" in signed.headers["set-cookie"]
    db.dispose()


def test_without_configured_credentials_a_token_is_generated_once_and_kept_private(
    make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dicom_node.dashboard.auth"):
        node = make_node()
    token_file = node.settings.data_dir / "dashboard-token"
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token not in caplog.text and str(token_file) in caplog.text
    with _client(node) as http:
        response = http.post("/api/jobs/none/discard", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 404
    node.stop()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dicom_node.dashboard.auth"):
        again = make_node()
    assert again.settings.data_dir == node.settings.data_dir
    assert token not in caplog.text
