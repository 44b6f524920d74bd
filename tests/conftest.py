"""Fixtures: real databases (SQLite and PostgreSQL), real RabbitMQ, the node on free ports."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import Settings, load_settings
from dicom_node.node import Node
from tests.helpers import amqp_queue_names, postgres_schema, system_program

REPO = Path(__file__).resolve().parents[1]
DATABASES = os.environ.get("NODULEAI_TEST_DATABASES", "sqlite,postgresql").split(",")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test data (``../shared/data``, or ``NODULEAI_TEST_DATA``)."""
    path = Path(os.environ.get("NODULEAI_TEST_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"test data missing at {path}")
        pytest.skip(f"test data not found at {path}; set NODULEAI_TEST_DATA")
    return path


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh empty database: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def amqp_queues() -> Iterator[tuple[str, str]]:
    """Names of a work queue and its dead-letter queue of this test's own; deleted afterwards."""
    with amqp_queue_names() as names:
        yield names


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> Callable[..., Settings]:
    """Settings for a node on loopback, on free ports, in ``tmp_path``."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "var",
            "dicom_host": "127.0.0.1",
            "dicom_port": 0,
            "http_port": 0,
            "db_url": database_url,
            "min_free_bytes": 0,
            "quiet_seconds": 1.0,
            "publish_retry_seconds": 0.5,
        }
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture
def make_node(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Node]]:
    """Start nodes with the given setting overrides; every one is stopped afterwards."""
    nodes: list[Node] = []

    def make(**overrides: Any) -> Node:
        node = Node(make_settings(**overrides))
        node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


#: Test folders, each also a marker: ``pytest -m unit`` selects ``tests/unit``.
SUITES = ("unit", "integration", "e2e", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its folder's suite; fail, not skip, when a DCMTK or Orthanc binary the
    tests need is missing in CI."""
    for item in items:
        parts = item.path.relative_to(REPO / "tests").parts
        if parts and parts[0] in SUITES:
            item.add_marker(parts[0])
    if os.environ.get("CI"):
        for tool in ("storescu", "Orthanc", "dciodvfy"):
            if system_program(tool) == tool:
                raise pytest.UsageError(f"{tool} is not installed; .ci/run installs it")
