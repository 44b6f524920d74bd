"""Fixtures of the integration tests: real peers (Orthanc) on loopback."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fhir_peer import FhirServer
from tests.fhir_peer import install as fhir_install
from tests.helpers import Service
from tests.peers import Orthanc

StartService = Callable[[list[str], dict[str, str], str], Service]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[StartService]:
    """Start ``noduleai`` processes (``start(args, env, name)``, log in ``tmp_path/<name>.log``);
    every one still running is stopped by its pid afterwards."""
    started: list[Service] = []

    def start(args: list[str], env: dict[str, str], name: str) -> Service:
        service = Service(args, env, tmp_path / f"{name}.log")
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@contextlib.contextmanager
def running_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """An Orthanc in a fresh temp dir, stopped (by its pid) on exit."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc of this test's own (free loopback ports, basic auth, DICOMweb)."""
    with running_orthanc(tmp_path_factory) as server:
        yield server


def _orthancs_of(item: pytest.Item) -> list[Orthanc]:
    """The Orthanc servers a test used: fixtures that are one, or that hold one as ``.orthanc``."""
    found = []
    for value in getattr(item, "funcargs", {}).values():
        server = value if isinstance(value, Orthanc) else getattr(value, "orthanc", None)
        if isinstance(server, Orthanc) and server not in found:
            found.append(server)
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach Orthanc's log to the report of a test that failed while using it."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in _orthancs_of(item):
            report.sections.append((f"Orthanc log {server.log_path} (tail)", server.log()))


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    """One FHIR R4 server (Medplum's router, in memory) for the session; requires a bearer token.

    ``npm ci`` runs once here when ``tests/fhir_server/node_modules`` is missing. Tests keep
    apart by using studies of their own.
    """
    fhir_install()
    server = FhirServer(
        tmp_path_factory.mktemp("fhir") / "fhir.log", token=secrets.token_urlsafe(16)
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
