"""Small helpers shared by the tests: polling with a deadline, free ports, DCMTK calls."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value {last!r})")
        time.sleep(interval)
        last = predicate()
    return last


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def system_program(tool: str) -> str:
    """Path of the installed program ``tool`` (DCMTK, Orthanc, dicom3tools), or the bare name
    when it is not installed.

    pynetdicom puts ``storescu``, ``echoscu``, ``findscu``, ``getscu`` and ``movescu`` scripts
    of its own, with other options, into the Python environment's ``bin``; with the virtual
    environment activated they would shadow DCMTK's, so a virtual environment's ``bin`` is
    skipped (a system Python's is not: DCMTK may live there).
    """
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    if sys.prefix != sys.base_prefix:
        own = (Path(sys.prefix) / "bin").resolve()
        dirs = [d for d in dirs if Path(d).resolve() != own]
    return shutil.which(tool, path=os.pathsep.join(dirs)) or tool


def echoscu(port: int, aet: str, aec: str = "NODULEAI") -> subprocess.CompletedProcess[str]:
    """One C-ECHO with DCMTK's echoscu, calling as ``aet``."""
    cmd = [system_program("echoscu"), "-aet", aet, "-aec", aec, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def storescu(
    port: int,
    *paths: Path,
    aet: str = "MODALITY",
    aec: str = "NODULEAI",
    pattern: str = "*.dcm",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Send files or folders with DCMTK's storescu (folders recursively, names by ``pattern``)."""
    cmd = [system_program("storescu"), "-aet", aet, "-aec", aec, "+sd", "+r", "+sp", pattern]
    cmd += [*extra, "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def stop_process(process: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM a process this test started (by its pid); SIGKILL it if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def wait_until_ready(
    process: subprocess.Popen[Any] | None,
    probe: Callable[[], int],
    timeout: float,
    describe: Callable[[str], Exception],
) -> None:
    """Poll ``probe`` (an HTTP status) until 200 while ``process`` runs; raise ``describe(why)``."""
    import httpx

    deadline = time.monotonic() + timeout
    last: object = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise describe(f"exited with {process.returncode} at start")
        try:
            status = probe()
            if status == 200:
                return
            last = f"HTTP {status}"
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.05)
    raise describe(f"not ready within {timeout} s ({last!r})")


def log_tail(path: Path, tail: int, missing: str) -> str:
    """The last ``tail`` lines of a server's log file."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return missing
    return "\n".join(lines[-tail:])


class Service:
    """A ``noduleai`` process of the test's own: output to a log file, stopped by its pid."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        import os
        import sys

        self.log = log
        self._out = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", *args],
            env={**os.environ, **env},
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait; SIGKILL after ``timeout``. Returns the exit code."""
        stop_process(self.process, timeout)
        self._out.close()
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL, as a crashed host would."""
        self.process.kill()
        self.process.wait(timeout=30)
        self._out.close()


def sr_items(items: Any) -> Iterator[Any]:
    """Every SR content item below ``items`` (a ContentSequence), depth first, in order."""
    for item in items:
        yield item
        yield from sr_items(item.get("ContentSequence", []))


def sr_code(item: Any) -> str:
    """The CodeValue of a content item's concept name ("" for an unnamed item)."""
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else ""


def refusals_on_metrics(http_port: int) -> dict[str, float]:
    """``noduleai_association_refusals_total`` by reason, scraped from the node's ``/metrics``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "noduleai_association_refusals"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dicom3tools' ``dciodvfy`` on one file: its ``Error -`` and ``Warning -`` lines."""
    result = subprocess.run(
        [system_program("dciodvfy"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error -")]
    warnings = [line for line in lines if line.startswith("Warning -")]
    return errors, warnings


def node_api(port: int | str, path: str, token: str, method: str = "GET") -> Any:
    """A JSON answer of a running node's HTTP API, with its dashboard token."""
    import json
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def node_healthy(port: int | str, token: str) -> bool:
    """Whether a node's ``/healthz`` answers yet."""
    try:
        return bool(node_api(port, "/healthz", token))
    except OSError:
        return False


def rabbitmqctl(*args: str) -> None:
    """Run ``rabbitmqctl`` on the local broker (stop_app, start_app, close_all_connections...)."""
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def broker_up(amqp_url: str) -> bool:
    """Whether RabbitMQ at ``amqp_url`` accepts a connection."""
    import pika

    try:
        pika.BlockingConnection(pika.URLParameters(amqp_url)).close()
    except pika.exceptions.AMQPError:
        return False
    return True


def service_env(
    data_dir: Path,
    database_url: str,
    amqp_url: str,
    queues: tuple[str, str],
    inference_threads: int = 2,
) -> dict[str, str]:
    """The environment of ``noduleai`` processes on loopback, on free ports, with RabbitMQ."""
    return {
        "NODULEAI_DATA_DIR": str(data_dir),
        "NODULEAI_DB_URL": database_url,
        "NODULEAI_AMQP_URL": amqp_url,
        "NODULEAI_AMQP_QUEUE": queues[0],
        "NODULEAI_AMQP_DEAD_LETTER_QUEUE": queues[1],
        "NODULEAI_DICOM_HOST": "127.0.0.1",
        "NODULEAI_DICOM_PORT": str(free_port()),
        "NODULEAI_HTTP_PORT": str(free_port()),
        "NODULEAI_QUIET_SECONDS": "1",
        "NODULEAI_MIN_FREE_BYTES": "0",
        "NODULEAI_INFERENCE_THREADS": str(inference_threads),
    }


#: The PostgreSQL server and RabbitMQ broker the tests (and the benchmarks) use.
PG_BASE = os.environ.get("NODULEAI_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("NODULEAI_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


@contextlib.contextmanager
def postgres_schema(prefix: str = "t") -> Iterator[str]:
    """The URL of a fresh PostgreSQL schema of the caller's own; dropped afterwards."""
    from sqlalchemy import create_engine, text

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_BASE)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@contextlib.contextmanager
def amqp_queue_names(prefix: str = "test") -> Iterator[tuple[str, str]]:
    """Names of a work queue and its dead-letter queue of the caller's own; deleted afterwards
    (when the broker is reachable)."""
    import pika

    names = (f"{prefix}.inference.{uuid.uuid4().hex[:8]}", f"{prefix}.dead.{uuid.uuid4().hex[:8]}")
    yield names
    try:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    except pika.exceptions.AMQPError:
        return
    channel = connection.channel()
    for name in names:
        channel.queue_delete(name)
    connection.close()
