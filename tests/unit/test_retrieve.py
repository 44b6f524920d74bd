"""The Query/Retrieve SCU keeps its deadline and says why nothing came, without identifiers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import date

import pytest

from dicom_node.config import DimseDestination
from dicom_node.retrieve import QueryRetrieve, RetrieveError, RetrieveFailure
from tests.helpers import free_port

pytestmark = pytest.mark.unit

PATIENT = "PAT-SECRET-123"


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A TCP peer that accepts connections and never answers (a hung PACS)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        server.close()


def _qr(port: int, seconds: float) -> QueryRetrieve:
    source = DimseDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    return QueryRetrieve(source, "NODULEAI", time.monotonic() + seconds)


def test_a_pacs_that_never_answers_is_a_timeout_at_the_deadline(silent_peer: int) -> None:
    start = time.monotonic()
    with pytest.raises(RetrieveError) as caught:
        _qr(silent_peer, 1.5).find_studies(PATIENT, date(2026, 1, 1))
    elapsed = time.monotonic() - start
    assert caught.value.code is RetrieveFailure.TIMEOUT
    assert 1.0 <= elapsed < 5.0, elapsed
    assert PATIENT not in str(caught.value)


def test_a_closed_port_is_unreachable_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(RetrieveError) as caught:
        _qr(free_port(), 10.0).move("1.2.3")
    assert caught.value.code is RetrieveFailure.UNREACHABLE
    assert time.monotonic() - start < 5.0


def test_no_time_left_means_no_association() -> None:
    with pytest.raises(RetrieveError) as caught:
        _qr(free_port(), -1.0).find_studies(PATIENT, date(2026, 1, 1))
    assert caught.value.code is RetrieveFailure.TIMEOUT
