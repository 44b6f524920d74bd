"""Association policy: who may associate, from where, how many at once, over TLS; the disk floor."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from dicom_node.db import Instance
from dicom_node.node import Node
from dicom_node.status import Status
from tests.chaos import associate_rq
from tests.helpers import echoscu, refusals_on_metrics, storescu


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def _associate(port: int, calling: str, called: str = "NODULEAI", **kwargs: object) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title=called, **kwargs)  # type: ignore[arg-type]


def _rejection(assoc: Association) -> tuple[int, int, int]:
    """(result, source, reason) of the A-ASSOCIATE-RJ the node sent."""
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert rj is not None
    return (rj.result, rj.result_source, rj.diagnostic)


POLICY = """
ae_policies:
  - ae_title: MODALITY
    hosts: [127.0.0.1]
  - ae_title: ELSEWHERE
    hosts: [192.0.2.0/24]
"""


def test_an_unknown_calling_ae_is_rejected_as_not_recognised(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node(config=_write_config(tmp_path, POLICY))
    # PS3.8 Table 9-21: rejected-permanent, service-user, calling-AE-title-not-recognized.
    assert _rejection(_associate(node.scp.port, "STRANGER")) == (1, 1, 3)
    result = echoscu(node.scp.port, "STRANGER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr

    allowed = _associate(node.scp.port, "MODALITY")
    assert allowed.send_c_echo().Status == Status.SUCCESS
    allowed.release()
    assert refusals_on_metrics(node.http_port)["not_allowed"] == 2


def test_a_known_ae_calling_from_an_address_not_its_own_is_rejected(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node(config=_write_config(tmp_path, POLICY))
    assert _rejection(_associate(node.scp.port, "ELSEWHERE")) == (1, 1, 3)


def test_a_wrong_called_ae_title_is_rejected(make_node: Callable[..., Node]) -> None:
    node = make_node()
    assert _rejection(_associate(node.scp.port, "MODALITY", called="SOMEONE")) == (1, 1, 7)


def test_associations_beyond_the_cap_are_rejected_transiently(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(max_associations=1)
    first = _associate(node.scp.port, "MODALITY")
    assert first.is_established
    # rejected-transient, service-provider (presentation), local-limit-exceeded.
    assert _rejection(_associate(node.scp.port, "MODALITY")) == (2, 3, 2)
    first.release()


def test_a_free_space_floor_above_the_disk_answers_out_of_resources_and_writes_nothing(
    make_node: Callable[..., Node], shared_data: Path
) -> None:
    node = make_node(min_free_bytes=1 << 62)
    slices = sorted((shared_data / "lidc-small").rglob("*.dcm"))
    assoc = _associate(node.scp.port, "MODALITY")
    assert assoc.send_c_store(slices[0]).Status == Status.OUT_OF_RESOURCES
    assoc.release()
    assert storescu(node.scp.port, shared_data / "lidc-small").returncode != 0
    with node.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    assert [p for p in node.spool.root.rglob("*") if p.is_file()] == []


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate and a client certificate made with openssl."""
    d = tmp_path / "tls"
    d.mkdir()

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
        )
    return {p.stem + p.suffix: p for p in d.iterdir()}


def _client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.check_hostname = False
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def test_tls_with_a_client_certificate_check_admits_only_certified_clients(
    make_node: Callable[..., Node], certificates: dict[str, Path]
) -> None:
    node = make_node(
        tls_cert=certificates["server.pem"],
        tls_key=certificates["server.key"],
        tls_client_ca=certificates["ca.pem"],
    )
    ca = certificates["ca.pem"]
    good = _associate(
        node.scp.port,
        "MODALITY",
        tls_args=(
            _client_context(ca, certificates["client.pem"], certificates["client.key"]),
            None,
        ),
    )
    assert good.is_established
    assert good.send_c_echo().Status == Status.SUCCESS
    good.release()

    anonymous = _associate(node.scp.port, "MODALITY", tls_args=(_client_context(ca), None))
    assert not anonymous.is_established
    plain = _associate(node.scp.port, "MODALITY")
    assert not plain.is_established


def _idle_from(address: str, port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections from ``address`` that never send an A-ASSOCIATE-RQ."""
    peers = []
    for _ in range(count):
        peer = socket.socket()
        peer.bind((address, 0))
        peer.settimeout(10)
        peer.connect(("127.0.0.1", port))
        peers.append(peer)
    return peers


def _closed(peer: socket.socket, within: float) -> bool:
    """Whether the node closes ``peer`` within ``within`` seconds (EOF or reset)."""
    peer.settimeout(within)
    try:
        return peer.recv(64) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_cannot_lock_a_pacs_out(make_node: Callable[..., Node]) -> None:
    """16 idle sockets from one address (then 16 more): the node keeps 4 of them waiting at
    most, closes the others at once and those 4 after the request deadline; an echo from another
    address is answered within 5 s throughout."""
    node = make_node(association_request_timeout=1.0, max_pending_per_peer=4)
    for _round in range(2):
        started = time.monotonic()
        peers = _idle_from("127.0.0.2", node.scp.port, 16)
        try:
            echo = echoscu(node.scp.port, "MODALITY")
            assert echo.returncode == 0, echo.stderr
            assert time.monotonic() - started < 5
            assert sum(_closed(peer, within=0.5) for peer in peers) >= 12
            assert all(_closed(peer, within=5.0) for peer in peers)  # the rest: at the deadline
        finally:
            for peer in peers:
                peer.close()
    # counted on /metrics (how many exactly depends on which the deadline closed first)
    assert refusals_on_metrics(node.http_port)["pending_per_peer"] > 0


def test_connections_that_sent_no_request_take_no_association_slot(
    make_node: Callable[..., Node],
) -> None:
    """With a cap of 2 and 6 connections waiting (under the per-peer limit), a PACS still gets
    both slots; the third association is refused as the local limit."""
    node = make_node(max_associations=2, max_pending_per_peer=8, association_request_timeout=30)
    peers = _idle_from("127.0.0.2", node.scp.port, 6)
    try:
        first = _associate(node.scp.port, "MODALITY")
        second = _associate(node.scp.port, "MODALITY")
        assert first.is_established and second.is_established
        assert _rejection(_associate(node.scp.port, "MODALITY")) == (2, 3, 2)
        first.release()
        second.release()
    finally:
        for peer in peers:
            peer.close()


def test_a_connection_that_stops_mid_pdu_is_closed_at_the_request_deadline(
    make_node: Callable[..., Node],
) -> None:
    """The first 40 bytes of an A-ASSOCIATE-RQ, then nothing: closed when the deadline passes
    (the node used to wait in recv for the rest for good)."""
    node = make_node(association_request_timeout=1.0)
    peer = socket.create_connection(("127.0.0.1", node.scp.port), timeout=10)
    try:
        peer.sendall(associate_rq()[:40])
        started = time.monotonic()
        assert _closed(peer, within=5.0)
        assert time.monotonic() - started < 4.0
    finally:
        peer.close()
    assert echoscu(node.scp.port, "MODALITY").returncode == 0


def test_a_hundred_idle_and_truncated_connections_from_many_addresses_lock_no_pacs_out(
    make_node: Callable[..., Node],
) -> None:
    """100 connections from 13 addresses (8 each, the per-peer limit), half of them idle and half
    stopped mid-request, against a cap of 16: they take no slot, an echo is answered within 5 s
    throughout, and all are closed at the request deadline."""
    node = make_node(association_request_timeout=2.0)
    started = time.monotonic()
    peers: list[socket.socket] = []
    try:
        for k in range(100):
            peer = socket.socket()
            peer.bind((f"127.0.0.{2 + k // 8}", 0))
            peer.settimeout(10)
            peer.connect(("127.0.0.1", node.scp.port))
            if k % 2:
                peer.sendall(associate_rq()[:40])
            peers.append(peer)
        echoes = []
        for _ in range(3):
            before = time.monotonic()
            echo = echoscu(node.scp.port, "MODALITY")
            assert echo.returncode == 0, echo.stderr
            echoes.append(time.monotonic() - before)
            assert echoes[-1] < 5
        assert all(_closed(peer, within=10.0) for peer in peers)
        print(
            f"\n100 idle or truncated connections: echoes answered in "
            f"{', '.join(f'{e:.2f}' for e in echoes)} s; all closed "
            f"{time.monotonic() - started:.1f} s after the first opened"
        )
        assert time.monotonic() - started < 20
    finally:
        for peer in peers:
            peer.close()
