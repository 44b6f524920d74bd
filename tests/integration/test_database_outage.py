"""The database goes away during a C-STORE stream: the sender is told to retry later, no file is
kept without its row, and a resend stores every instance once.

The outage is real (a loopback TCP forwarder in front of the shared PostgreSQL, cut and restored by
the test), so the node meets exactly what psycopg and SQLAlchemy raise when the server goes away.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from dicom_node.completeness import CompletenessTracker
from dicom_node.config import AEPolicy, Completeness, NodeConfig
from dicom_node.db import Database, Instance, Job
from dicom_node.errors import DatabaseUnavailableError
from dicom_node.ingest import Ingest
from dicom_node.migrate import upgrade
from dicom_node.node import Node
from dicom_node.policy import AssociationPolicy
from dicom_node.spool import LocalSpool
from dicom_node.status import Status, status_for
from tests.helpers import PG_BASE, free_port, storescu, wait_for

pytestmark = pytest.mark.integration


class Forwarder:
    """Forwards a loopback port to PostgreSQL until :meth:`cut` closes it and its connections."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def start(self) -> Forwarder:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the blocked accept(); close alone does not
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def forwarded_url(database_url: str) -> Iterator[tuple[str, Forwarder]]:
    """The test's own PostgreSQL schema, reached through a :class:`Forwarder`."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the outage is staged in front of PostgreSQL")
    host_port = PG_BASE.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    forwarder = Forwarder((host, int(port))).start()
    yield database_url.replace(host_port, f"127.0.0.1:{forwarder.port}"), forwarder
    forwarder.cut()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_no_file_is_kept_without_its_row_and_the_sender_is_told_to_retry(
    forwarded_url: tuple[str, Forwarder], shared_data: Path, tmp_path: Path
) -> None:
    url, forwarder = forwarded_url
    files = sorted((shared_data / "lidc-small").rglob("*.dcm"))
    db = Database(url)
    upgrade(db)
    spool_root = tmp_path / "spool"

    class CutAfterWrite(LocalSpool):
        """The outage begins between the fsync'd file and its commit."""

        def write(self, relpath: str, data: bytes) -> None:
            super().write(relpath, data)
            if cut_next.is_set():
                cut_next.clear()
                forwarder.cut()

    cut_next = threading.Event()
    ingest = Ingest(db, CutAfterWrite(spool_root, 0))
    try:
        for path in files[:5]:
            assert not ingest.store(path.read_bytes(), "CT").duplicate
        cut_next.set()
        with pytest.raises(DatabaseUnavailableError) as refused:
            ingest.store(files[5].read_bytes(), "CT")
        assert status_for(refused.value) is Status.OUT_OF_RESOURCES
        with pytest.raises(DatabaseUnavailableError):  # still down: refused before writing
            ingest.store(files[6].read_bytes(), "CT")
        assert len([p for p in spool_root.rglob("*.dcm")]) == 5

        forwarder.start()
        for path in files[5:]:
            assert not ingest.store(path.read_bytes(), "CT").duplicate
        with db.session() as session:
            rows = session.scalar(select(func.count()).select_from(Instance))
        assert rows == len(files) == len(list(spool_root.rglob("*.dcm")))
    finally:
        db.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_storescu_sees_out_of_resources_while_the_database_is_down_and_a_resend_stores_all(
    forwarded_url: tuple[str, Forwarder],
    make_node: Callable[..., Node],
    shared_data: Path,
) -> None:
    url, forwarder = forwarded_url
    node = make_node(db_url=url, quiet_seconds=3.0)
    small = shared_data / "lidc-small"
    forwarder.cut()
    refused = storescu(node.scp.port, small, extra=("-v",))
    assert refused.returncode != 0
    assert "OutOfResources" in refused.stdout + refused.stderr, refused.stderr[-2000:]
    forwarder.start()
    back = time.monotonic()
    sent = storescu(node.scp.port, small)
    assert sent.returncode == 0, sent.stderr

    def stored() -> int:
        with node.db.session() as session:
            return int(session.scalar(select(func.count()).select_from(Instance)) or 0)

    wait_for(lambda: stored() == 16, timeout=30)
    files = len(list(node.spool.root.rglob("*.dcm")))
    print(
        f"\nPostgreSQL down during a C-STORE stream: sent 16 (refused, OutOfResources), "
        f"resent 16, stored {stored()}, files {files}, lost {16 - stored()}, duplicates "
        f"{files - 16}, all stored {time.monotonic() - back:.1f} s after the database was back"
    )
    assert files == 16


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_study_whose_instances_failed_to_commit_is_not_complete_until_the_hold_has_passed(
    forwarded_url: tuple[str, Forwarder], shared_data: Path, tmp_path: Path
) -> None:
    """5 of 16 stored, then the database goes: the 6th is refused (retry later) and holds the
    study; quiet or released, it does not become a job while held, and does after the hold (or
    when the resend completes it first)."""
    url, forwarder = forwarded_url
    files = sorted((shared_data / "lidc-small").rglob("*.dcm"))
    db = Database(url)
    upgrade(db)
    config = NodeConfig(ae_policies=[AEPolicy(ae_title="CT", completeness=Completeness.RELEASE)])
    policy = AssociationPolicy(config, default_quiet_seconds=0.1)
    tracker = CompletenessTracker(db, policy, lambda: None, hold_seconds=2.0)
    ingest = Ingest(db, LocalSpool(tmp_path / "spool", 0), tracker.hold)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    try:
        for path in files[:5]:
            ingest.store(path.read_bytes(), "CT")
        forwarder.cut()
        with pytest.raises(DatabaseUnavailableError):
            ingest.store(files[5].read_bytes(), "CT")
        forwarder.start()
        tracker.association_released("CT", [study_uid])  # the sender gave up and released
        time.sleep(0.2)  # quiet too
        assert tracker.sweep() == 0, "a partial study must not become a job while held"
        with db.session() as session:
            assert session.scalar(select(func.count()).select_from(Job)) == 0
        wait_for(lambda: tracker.sweep() == 1, timeout=10, interval=0.2)  # the hold has passed
        with db.session() as session:
            assert session.scalar(select(Job.instances)) == 5
    finally:
        db.dispose()
