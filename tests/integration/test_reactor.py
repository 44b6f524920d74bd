"""The event-driven association reactors (dicom_node.reactor) behave like pynetdicom's own.

Real peers over loopback: DCMTK's storescu and echoscu, and a pynetdicom SCU in a subprocess of
its own (so that its polling reactors do not count against this process's CPU time) that holds an
association open, echoes, releases, aborts or drops the connection when told to on stdin.
"""

from __future__ import annotations

import logging
import resource
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from dicom_node import reactor
from dicom_node.db import Instance
from dicom_node.node import Node
from tests.chaos import associate_rq
from tests.helpers import echoscu, refusals_on_metrics, storescu, wait_for

pytestmark = pytest.mark.integration

_PEER = r"""
import os, sys
from pynetdicom import AE
from pynetdicom.sop_class import Verification

ae = AE(ae_title="IDLER")
ae.add_requested_context(Verification)
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="NODULEAI")
print("established" if assoc.is_established else "refused", flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "echo":
        status = assoc.send_c_echo()
        print(f"echo 0x{status.Status:04X}" if status else "echo none", flush=True)
    elif command == "release":
        assoc.release()
        print("released" if assoc.is_released else "not released", flush=True)
        break
    elif command == "abort":
        assoc.abort()
        print("aborted", flush=True)
        break
    elif command == "drop":
        os._exit(0)  # the kernel closes the connection: no A-RELEASE, no A-ABORT
"""


class Peer:
    """A pynetdicom SCU in a subprocess, driven line by line."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PEER, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def read(self, timeout: float = 30.0) -> str:
        """The next line the peer prints; fails after ``timeout`` seconds."""
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise AssertionError(f"peer printed nothing within {timeout} s")
        return self.proc.stdout.readline().strip()

    def tell(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: these tests are about the network layer, not the database."""
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def peer_of(make_node: Callable[..., Node]) -> Iterator[Callable[[Node], Peer]]:
    peers: list[Peer] = []

    def make(node: Node) -> Peer:
        peer = Peer(node.scp.port)
        peers.append(peer)
        assert peer.read() == "established"
        return peer

    yield make
    for peer in peers:
        peer.stop()


def _ct_files(folder: Path, count: int, size: int = 64) -> list[Path]:
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "R^T", "RT1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, index + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.full((size, size), 1024 + index, dtype=np.int16).tobytes()
        paths.append(folder / f"{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _rows(node: Node) -> int:
    with node.db.session() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def _no_associations(node: Node) -> bool:
    return not node.scp.ae.active_associations


def test_the_installed_pynetdicom_is_one_the_reactor_is_written_against() -> None:
    # An upgrade of pynetdicom must fail here rather than silently fall back to 1 ms polling.
    assert reactor.supported() is None


def test_storescu_stores_a_handful_of_files_over_the_event_driven_reactor(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node()
    _ct_files(tmp_path / "ct", 5)

    done = storescu(node.scp.port, tmp_path / "ct")

    assert done.returncode == 0, done.stderr
    assert _rows(node) == 5
    assert wait_for(lambda: _no_associations(node), timeout=5)


def test_echoscu_gets_a_success_answer(make_node: Callable[..., Node]) -> None:
    node = make_node()

    done = echoscu(node.scp.port, "MODALITY")

    assert done.returncode == 0, done.stderr


def test_an_open_association_is_event_driven_and_answers_echo_then_releases(
    make_node: Callable[..., Node], peer_of: Callable[[Node], Peer]
) -> None:
    node = make_node()
    peer = peer_of(node)
    (assoc,) = wait_for(lambda: node.scp.ae.active_associations, timeout=5)
    assert isinstance(assoc, reactor.EventDrivenAssociation)
    assert isinstance(assoc.dul, reactor.EventDrivenDUL)

    for _ in range(3):
        peer.tell("echo")
        assert peer.read() == "echo 0x0000"
    started = time.monotonic()
    peer.tell("release")

    assert peer.read() == "released"
    assert time.monotonic() - started < 2
    assert wait_for(lambda: _no_associations(node), timeout=5)
    assert assoc.is_released


@pytest.mark.parametrize("how", ["abort", "drop"])
def test_an_aborted_or_dropped_association_is_cleaned_up(
    how: str, make_node: Callable[..., Node], peer_of: Callable[[Node], Peer]
) -> None:
    node = make_node()
    peer = peer_of(node)
    (assoc,) = wait_for(lambda: node.scp.ae.active_associations, timeout=5)

    peer.tell(how)

    assert wait_for(lambda: _no_associations(node), timeout=5)
    assert assoc.is_aborted
    assert not assoc.dul.is_alive()
    # The node still takes new associations afterwards.
    assert echoscu(node.scp.port, "MODALITY").returncode == 0


def test_an_idle_open_association_does_not_burn_cpu(
    make_node: Callable[..., Node], peer_of: Callable[[Node], Peer]
) -> None:
    node = make_node()
    peer = peer_of(node)
    wait_for(lambda: node.scp.ae.active_associations, timeout=5)
    peer.tell("echo")
    assert peer.read() == "echo 0x0000"

    cpu, wall = time.process_time(), time.monotonic()
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    threading.Event().wait(1.0)  # the measurement window, not a synchronisation
    wall = time.monotonic() - wall
    share = (time.process_time() - cpu) / wall
    wakeups = (resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches) / wall

    # The whole node process (HTTP server, publisher and completeness loops included). Measured
    # here: about 1% of a core and 60 wake-ups/s; pynetdicom's polling reactors: about 4% and
    # 1,800 wake-ups/s (two threads each waking every millisecond).
    assert share < 0.2, f"{share:.0%} of a core while idle"
    assert wakeups < 500, f"{wakeups:.0f} voluntary context switches/s while idle"
    peer.tell("release")
    assert peer.read() == "released"


def test_an_unsupported_pynetdicom_falls_back_to_the_stock_reactor_with_a_warning(
    make_node: Callable[..., Node],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(reactor, "SUPPORTED_VERSIONS", frozenset({"0.0.0"}))
    monkeypatch.setattr(reactor, "_warned", False)
    seen: list[type[Association]] = []
    original = reactor.install

    def spy(assoc: Association, on_malformed: Callable[[], None] | None = None) -> Association:
        result = original(assoc, on_malformed)
        seen.append(type(result))
        return result

    monkeypatch.setattr(reactor, "install", spy)
    node = make_node()
    _ct_files(tmp_path / "ct", 3)

    with caplog.at_level(logging.WARNING, logger="dicom_node.reactor"):
        done = storescu(node.scp.port, tmp_path / "ct")

    assert done.returncode == 0, done.stderr
    assert _rows(node) == 3
    assert seen == [Association]
    assert "event-driven reactor not installed" in caplog.text


def test_large_instances_over_tls_are_not_held_up_by_the_socket_wait(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    # Decrypted bytes can sit in the TLS layer while the socket itself has nothing to read: the
    # DUL must not wait on select() then (each 512 KB instance is about ten PDUs).
    key, cert = tmp_path / "server.key", tmp_path / "server.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    node = make_node(tls_cert=cert, tls_key=key)
    paths = _ct_files(tmp_path / "ct", 5, size=512)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    context = ssl.create_default_context(cafile=str(cert))
    tls_args = (context, "localhost")
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="NODULEAI", tls_args=tls_args)
    assert assoc.is_established
    try:
        started = time.monotonic()
        statuses = [assoc.send_c_store(path).Status for path in paths]
        elapsed = time.monotonic() - started
    finally:
        assoc.release()

    assert statuses == [0x0000] * 5
    assert _rows(node) == 5
    assert elapsed / 5 < 0.25, f"{elapsed / 5:.2f} s per instance"


@pytest.mark.parametrize(
    "request_pdu",
    [associate_rq(context_id=2), associate_rq(abstract_syntax=None)],
    ids=["even-context-id", "context-without-abstract-syntax"],
)
def test_a_malformed_associate_request_is_aborted_at_once_and_kills_no_thread(
    make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch, request_pdu: bytes
) -> None:
    """An even presentation context ID (PS3.8 9.3.2.2 wants odd ones) made pynetdicom's DUL
    thread die, a presentation context without an abstract syntax its association thread: no
    answer, the slot held. More requests than the association cap, one at a time: each is
    answered with an A-ABORT within seconds, no thread dies, and echo still works."""
    crashes: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(repr(args.exc_value)))
    node = make_node(max_associations=4)
    for _ in range(6):
        with socket.create_connection(("127.0.0.1", node.scp.port), timeout=10) as peer:
            started = time.monotonic()
            peer.sendall(request_pdu)
            answer = peer.recv(1)
            assert answer == b"\x07"  # A-ABORT
            assert time.monotonic() - started < 5
    assert crashes == []
    assert echoscu(node.scp.port, "MODALITY").returncode == 0
    assert refusals_on_metrics(node.http_port)["malformed"] == 6
