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
import shutil
import socket
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import func, select  # noqa: E402

from dicom_node.db import Database, Instance, Job, JobState, Series, Study  # noqa: E402
from models.phantom import make_phantom, write_dicom_series  # noqa: E402
from tests.helpers import (  # noqa: E402
    AMQP_URL,
    Service,
    amqp_queue_names,
    free_port,
    postgres_schema,
    service_env,
    storescu,
    wait_for,
)

FIRST_SEED = 70_000


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


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def measure(db: Database, n: int, timeout: float, services: list[Service]) -> dict[str, float]:
    """Wait until every study's job finished (or ``timeout``); the figures."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        died = [str(s.log) for s in services if s.process.poll() is not None]
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
    folder = work / mode
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if mode == "embedded":
            db_url = f"sqlite:///{(folder / 'noduleai.db').resolve()}"
            env = {
                "NODULEAI_DATA_DIR": str(folder),
                "NODULEAI_DICOM_HOST": "127.0.0.1",
                "NODULEAI_DICOM_PORT": str(free_port()),
                "NODULEAI_HTTP_PORT": str(free_port()),
                "NODULEAI_QUIET_SECONDS": "1",
                "NODULEAI_MIN_FREE_BYTES": "0",
                "NODULEAI_INFERENCE_THREADS": "1",
                "NODULEAI_WORKERS": "2",
            }
            commands = [["serve"]]
        else:
            db_url = stack.enter_context(postgres_schema("bench"))
            queues = stack.enter_context(amqp_queue_names("bench"))
            env = service_env(folder, db_url, AMQP_URL, queues, inference_threads=1)
            commands = [["node"], ["worker"], ["worker"]]
        services = []
        for i, args in enumerate(commands):
            services.append(Service(args, env, folder / f"{args[0]}-{i}.log"))
            stack.callback(services[-1].stop)
        dicom = int(env["NODULEAI_DICOM_PORT"])
        wait_for(lambda: listening(dicom), timeout=120, interval=0.2)
        db = Database(db_url)
        stack.callback(db.dispose)
        for study in studies:
            sent = storescu(dicom, study, aet="BENCH")
            if sent.returncode != 0:
                raise RuntimeError(f"storescu failed: {sent.stderr[-1000:]}")
        return measure(db, len(studies), timeout, services)


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
