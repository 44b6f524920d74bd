"""Workers that share no filesystem with the node (issue 21, must-show 2).

``noduleai node`` and two ``noduleai worker`` processes on the real RabbitMQ and PostgreSQL, each
with a data folder of its own: the workers fetch the study's instances from the node over HTTP
(``NODULEAI_SPOOL_URL``, bearer token) and send their results back the same way. The worker that
takes LIDC-IDRI-0001 is killed while it fetches; the other takes the job over once the lease ran
out. The findings equal those of a rerun by a worker in the shared-folder mode.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.db import Database, Job, Result
from tests.helpers import AMQP_URL, node_api, node_healthy, service_env, storescu, wait_for
from tests.integration.conftest import StartService

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "dashboard-token-for-the-test"
SPOOL_TOKEN = "spool-token-for-the-test"


def _cached(worker_dir: Path) -> int:
    """How many instances a worker holds in its fetch cache now."""
    return sum(1 for _ in (worker_dir / "spool-cache").rglob("*.dcm"))


def _job(db: Database, job_id: str | None = None) -> Job | None:
    with db.session() as session:
        query = select(Job).order_by(Job.created_at.desc())
        if job_id is not None:
            query = query.where(Job.id == job_id)
        return session.scalars(query).first()


def _finished(db: Database, job_id: str | None = None) -> Job | None:
    job = _job(db, job_id)
    return job if job is not None and job.state in ("done", "failed", "rejected") else None


def _comparable(findings: dict[str, Any]) -> list[dict[str, Any]]:
    """The nodules without their UIDs (a rerun's objects are new ones)."""
    return [{k: v for k, v in n.items() if "uid" not in k} for n in findings["nodules"]]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_workers_without_a_shared_folder_fetch_over_http_and_recover_a_kill_mid_fetch(
    database_url: str,
    amqp_queues: tuple[str, str],
    services: StartService,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    node_env = {
        **service_env(tmp_path / "node", database_url, AMQP_URL, amqp_queues, 2),
        "NODULEAI_DASHBOARD_TOKEN": TOKEN,
        "NODULEAI_SPOOL_TOKEN": SPOOL_TOKEN,
        "NODULEAI_RETRY_BACKOFF_SECONDS": "2",
    }
    http_port = node_env["NODULEAI_HTTP_PORT"]
    services(["node"], node_env, "node")
    wait_for(lambda: node_healthy(http_port, TOKEN), timeout=60)
    worker_dirs = [tmp_path / f"worker{i}" for i in range(2)]
    workers = [
        services(
            ["worker"],
            {
                **node_env,
                "NODULEAI_DATA_DIR": str(folder),
                "NODULEAI_SPOOL_URL": f"http://127.0.0.1:{http_port}",
            },
            folder.name,
        )
        for folder in worker_dirs
    ]
    db = Database(database_url)
    lidc = shared_data / "lidc-idri-0001"
    sent = sum(1 for _ in lidc.rglob("*.dcm"))
    assert storescu(int(node_env["NODULEAI_DICOM_PORT"]), lidc).returncode == 0

    # the worker that took the job is killed as soon as its first instances are here
    fetching = wait_for(
        lambda: [i for i, d in enumerate(worker_dirs) if _cached(d) > 0],
        timeout=180,
        interval=0.005,
    )[0]
    workers[fetching].kill()
    cached_at_kill = _cached(worker_dirs[fetching])
    killed_at = time.monotonic()
    survivor = 1 - fetching

    job = wait_for(lambda: _finished(db), timeout=600, interval=1.0)
    taken_over_s = time.monotonic() - killed_at
    assert job.state == "done", job.error
    assert job.attempts == 2
    study_uid = node_api(http_port, "/api/studies", TOKEN)[0]["study_instance_uid"]
    over_http = node_api(http_port, f"/api/studies/{study_uid}/findings", TOKEN)

    # every result file is in the node's spool; nothing was fetched into a worker's spool folder
    with db.session() as session:
        result = session.scalars(select(Result).where(Result.job_id == job.id)).one()
    node_spool = tmp_path / "node" / "spool"
    objects = result.detail["objects"]
    assert objects and all((node_spool / o["path"]).is_file() for o in objects)
    assert (node_spool / result.detail["fhir_path"]).is_file()
    assert not any((d / "spool").exists() for d in worker_dirs)
    assert _cached(worker_dirs[survivor]) == 0, "the job's cache was not dropped"
    print(
        f"\nHTTP spool: {sent} instances; worker killed with {cached_at_kill} of them fetched; "
        f"the other finished the job {taken_over_s:.0f} s later (attempt {job.attempts}); "
        f"{len(over_http['nodules'])} findings"
    )
    assert 0 < cached_at_kill < sent, "the worker was not killed mid-fetch"

    # the same study rerun by a worker that reads the node's own spool folder (the shared mode)
    workers[survivor].stop()
    services(["worker"], node_env, "shared-worker")
    rerun = node_api(http_port, f"/api/studies/{study_uid}/rerun", TOKEN, method="POST")
    shared_job = wait_for(lambda: _finished(db, rerun["new_job_id"]), timeout=600, interval=1.0)
    assert shared_job.state == "done", shared_job.error
    shared = node_api(http_port, f"/api/studies/{study_uid}/findings", TOKEN)
    assert shared["job_id"] == shared_job.id
    assert over_http["nodules"], "no findings on LIDC-IDRI-0001"
    assert _comparable(over_http) == _comparable(shared)
    db.dispose()
