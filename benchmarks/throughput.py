"""Throughput: ``--studies`` phantom chest CTs pushed back to back, two workers, both queue modes.

1. **embedded**: ``noduleai serve`` with ``NODULEAI_WORKERS=2`` (SQLite, the embedded queue);
2. **rabbitmq**: ``noduleai node`` and two ``noduleai worker`` processes on RabbitMQ and
   PostgreSQL (a schema and queues of the run's own, removed afterwards).

Every study (a phantom of its own seed, 512x512, 2 mm slices, 28-44 of them) is sent over its own
association with DCMTK's ``storescu``, one after another. Turnaround is from the study's last
instance received to its job ``done`` (it includes the completeness wait,
``NODULEAI_QUIET_SECONDS=1``); studies per hour from the first instance received to the last job
done. Workers run onnxruntime with one
thread each (two workers on two cores). A study not done within ``--timeout`` counts as starved::

    .venv/bin/python benchmarks/throughput.py [--studies 20] [--modes embedded rabbitmq]

Environment: ``NODULEAI_TEST_PG`` and ``NODULEAI_TEST_AMQP`` as the tests use them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, func, select, text  # noqa: E402

from dicom_node.db import Database, Instance, Job, JobState, Series, Study  # noqa: E402
from models.phantom import make_phantom, write_dicom_series  # noqa: E402

PG_BASE = os.environ.get("NODULEAI_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("NODULEAI_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
FIRST_SEED = 70_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_studies(folder: Path, n: int) -> list[Path]:
    """``n`` phantom studies, each in a folder of its own."""
    studies = []
    for i in range(n):
        seed = FIRST_SEED + i
        p = make_phantom(seed, spacing_mm=(2.0, 0.7, 0.7))
        out = folder / f"study-{i:02d}"
        write_dicom_series(p.volume_hu, p.spacing_mm, out, seed, origin_mm=p.origin_mm)
        studies.append(out)
    return studies


@contextmanager
def processes(
    specs: list[tuple[list[str], dict[str, str]]], logs: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``noduleai`` processes (args, environment); stop them by pid afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i, (args, env) in enumerate(specs):
            log = (logs / f"{args[0]}-{i}.log").open("w")
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dicom_node.cli", *args],
                    env={**os.environ, **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        yield started
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def postgres_schema() -> Iterator[str]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_BASE)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@contextmanager
def amqp_queues() -> Iterator[tuple[str, str]]:
    import pika

    names = (f"bench.inference.{uuid.uuid4().hex[:8]}", f"bench.dead.{uuid.uuid4().hex[:8]}")
    try:
        yield names
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
        connection.close()


def wait_listening(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def send(port: int, folder: Path) -> None:
    cmd = ["storescu", "-aet", "BENCH", "-aec", "NODULEAI", "+sd", "+r", "+sp", "*.dcm"]
    done = subprocess.run(
        [*cmd, "127.0.0.1", str(port), str(folder)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-1000:]}")


def measure(
    db: Database, n: int, timeout: float, services: list[subprocess.Popen[bytes]]
) -> dict[str, float]:
    """Wait until every study's job finished (or ``timeout``); the figures."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        died = [p.args for p in services if p.poll() is not None]
        if died:
            raise RuntimeError(f"a service exited during the run: {died} (see its log)")
        with db.session() as session:
            finished = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.state.in_([JobState.DONE, JobState.FAILED, JobState.REJECTED]))
            )
        if finished is not None and finished >= n:
            break
        time.sleep(1.0)
    with db.session() as session:
        rows = session.execute(
            select(Study.id, func.min(Instance.received_at), func.max(Instance.received_at))
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .group_by(Study.id)
        ).all()
        jobs = {j.study_id: j for j in session.scalars(select(Job))}
    turnaround, done_at, first = [], [], []
    starved = failed = 0
    for study_id, received_first, received_last in rows:
        first.append(received_first)
        job = jobs.get(study_id)
        if job is None or job.done_at is None:
            starved += job is None or job.state not in (JobState.FAILED, JobState.REJECTED)
            failed += job is not None and job.state in (JobState.FAILED, JobState.REJECTED)
            continue
        turnaround.append((job.done_at - received_last).total_seconds())
        done_at.append(job.done_at)
    span = (max(done_at) - min(first)).total_seconds() if done_at else float("nan")
    ordered = sorted(turnaround)
    return {
        "done": len(turnaround),
        "failed": failed,
        "starved": starved,
        "studies_per_hour": len(turnaround) / span * 3600 if done_at else 0.0,
        "p50_s": statistics.median(ordered) if ordered else float("nan"),
        "p95_s": ordered[max(0, round(0.95 * len(ordered)) - 1)] if ordered else float("nan"),
        "max_s": ordered[-1] if ordered else float("nan"),
    }


def run_mode(mode: str, studies: list[Path], work: Path, timeout: float) -> dict[str, float]:
    dicom, http = free_port(), free_port()
    base = {
        "NODULEAI_DICOM_HOST": "127.0.0.1",
        "NODULEAI_DICOM_PORT": str(dicom),
        "NODULEAI_HTTP_PORT": str(http),
        "NODULEAI_QUIET_SECONDS": "1",
        "NODULEAI_MIN_FREE_BYTES": "0",
        "NODULEAI_INFERENCE_THREADS": "1",
        "NODULEAI_DATA_DIR": str(work / mode),
    }
    with ExitStack() as stack:
        if mode == "embedded":
            db_url = f"sqlite:///{(work / mode / 'noduleai.db').resolve()}"
            specs = [(["serve"], {**base, "NODULEAI_WORKERS": "2"})]
        else:
            db_url = stack.enter_context(postgres_schema())
            queue, dead = stack.enter_context(amqp_queues())
            env = {
                **base,
                "NODULEAI_DB_URL": db_url,
                "NODULEAI_AMQP_URL": AMQP_URL,
                "NODULEAI_AMQP_QUEUE": queue,
                "NODULEAI_AMQP_DEAD_LETTER_QUEUE": dead,
            }
            specs = [(["node"], env), (["worker"], env), (["worker"], env)]
        (work / mode).mkdir(parents=True, exist_ok=True)
        services = stack.enter_context(processes(specs, work / mode))
        wait_listening(dicom)
        db = Database(db_url)
        try:
            for folder in studies:
                send(dicom, folder)
            return measure(db, len(studies), timeout, services)
        finally:
            db.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["embedded", "rabbitmq"])
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        parser.error("storescu (DCMTK) is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        studies = write_studies(Path(tmp) / "studies", args.studies)
        print(f"{args.studies} phantom studies, two workers, 2 CPUs, one inference thread each")
        for mode in args.modes:
            r = run_mode(mode, studies, Path(tmp), args.timeout)
            print(
                f"  {mode:<9} {r['studies_per_hour']:6.0f} studies/hour; turnaround p50 "
                f"{r['p50_s']:.1f} s, p95 {r['p95_s']:.1f} s, max {r['max_s']:.1f} s; done "
                f"{r['done']:.0f}, failed {r['failed']:.0f}, starved {r['starved']:.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
