"""RabbitMQ drops every connection mid-job, twice, then restarts, while two ``noduleai worker``
processes share the job queue: the job runs to one committed result, no two workers ever hold it
at once, and the committed files are never rewritten (issue 20, must-show 3).

The node and the workers are real processes on the real RabbitMQ and PostgreSQL; the broker's
connections are closed with ``rabbitmqctl close_all_connections`` and the broker is restarted with
``stop_app``/``start_app``. The figures (sent, stored, results, duplicates, time to recover) are
printed for the README's Reliability table.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dicom_node.db import Database, Instance, Job, Result, WorkerHeartbeat
from tests.helpers import AMQP_URL, broker_up, rabbitmqctl, service_env, storescu, wait_for
from tests.integration.conftest import StartService

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def broker_restored(services: StartService) -> Iterator[None]:
    """The broker is running again before the services are stopped (torn down first)."""
    yield
    if not broker_up(AMQP_URL):
        rabbitmqctl("start_app")
        wait_for(lambda: broker_up(AMQP_URL), timeout=60, interval=0.5)


class Holders:
    """Samples which workers hold which job (their heartbeat's current job) every 0.2 s."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.db.session() as session:
                    rows = session.execute(
                        select(WorkerHeartbeat.current_job_id, func.count())
                        .where(WorkerHeartbeat.current_job_id.is_not(None))
                        .group_by(WorkerHeartbeat.current_job_id)
                    ).all()
                self.most = max([self.most, *(int(n) for _, n in rows)])
                self.samples += 1
            except Exception:  # a sample lost to a busy database is no evidence either way
                pass
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _busy(db: Database) -> bool:
    with db.session() as session:
        held = session.scalars(
            select(WorkerHeartbeat).where(WorkerHeartbeat.current_job_id.is_not(None))
        ).first()
    return held is not None


def _digests(root: Path, paths: list[str]) -> dict[str, tuple[str, float]]:
    return {
        p: (hashlib.sha256((root / p).read_bytes()).hexdigest(), (root / p).stat().st_mtime)
        for p in paths
    }


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_dropped_broker_connections_and_a_broker_restart_mid_job_give_one_result(
    database_url: str,
    amqp_queues: tuple[str, str],
    services: StartService,
    broker_restored: None,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    # (the services are stopped before the database schema and the queues are removed)
    env = service_env(tmp_path / "var", database_url, AMQP_URL, amqp_queues, 1)
    services(["node"], env, "node")
    db = Database(database_url)
    wait_for(lambda: _healthy(env), timeout=60)
    for i in range(2):
        services(["worker"], env, f"worker{i}")
    lidc = shared_data / "lidc-idri-0001"
    sent = sum(1 for _ in lidc.rglob("*.dcm"))
    assert storescu(int(env["NODULEAI_DICOM_PORT"]), lidc).returncode == 0
    holders = Holders(db)
    try:
        wait_for(lambda: _busy(db), timeout=180, interval=0.2)
        for _ in range(2):  # every connection dropped (the node's and both workers'), twice
            rabbitmqctl("close_all_connections", "test: connection dropped mid-job")
            time.sleep(3.0)
        rabbitmqctl("stop_app")
        time.sleep(2.0)
        rabbitmqctl("start_app")
        wait_for(lambda: broker_up(AMQP_URL), timeout=60, interval=0.5)
        back = time.monotonic()
        wait_for(lambda: _done(db), timeout=600, interval=1.0)
        recovered_s = time.monotonic() - back
        root = tmp_path / "var" / "spool"
        with db.session() as session:
            job = session.scalars(select(Job)).one()
            results = list(session.scalars(select(Result)))
            stored = session.scalar(select(func.count()).select_from(Instance))
        files = [o["path"] for o in results[0].detail["objects"]]
        before = _digests(root, files)
        time.sleep(15.0)  # a late run (if any) would write now
        after = _digests(root, files)
    finally:
        holders.stop()
    print(
        f"\nbroker drops x2 + restart mid-job: sent {sent}, stored {stored}, jobs 1, "
        f"results {len(results)}, duplicates {len(results) - 1}, attempts {job.attempts}, "
        f"most workers holding the job at once {holders.most} ({holders.samples} samples), "
        f"done {recovered_s:.1f} s after the broker was back"
    )
    assert job.state == "done", job.error
    assert stored == sent
    assert len(results) == 1
    assert holders.samples > 10 and holders.most == 1
    assert after == before, "committed result files were rewritten"
    db.dispose()


def _healthy(env: dict[str, str]) -> bool:
    import urllib.request

    try:
        url = f"http://127.0.0.1:{env['NODULEAI_HTTP_PORT']}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _done(db: Database) -> Any:
    with db.session() as session:
        job = session.scalars(select(Job)).first()
    return job is not None and job.state in ("done", "failed")
