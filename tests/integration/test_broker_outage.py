"""RabbitMQ stops during ingest and comes back: every study received meanwhile is published once."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.db import Job
from dicom_node.node import Node
from dicom_node.queues import declare_topology
from tests.helpers import AMQP_URL, broker_up, rabbitmqctl, storescu, wait_for


@pytest.fixture
def broker_outage() -> Iterator[Callable[[], None]]:
    """``start()`` brings RabbitMQ back; it is brought back anyway at the end of the test."""
    rabbitmqctl("stop_app")

    def start() -> None:
        rabbitmqctl("start_app")
        wait_for(lambda: broker_up(AMQP_URL), timeout=60, interval=0.5)

    try:
        yield start
    finally:
        if not broker_up(AMQP_URL):
            start()


def _three_studies(source: Path, out: Path) -> list[Path]:
    """Three studies of five real slices each (new study/series/instance UIDs)."""
    slices = sorted(source.rglob("*.dcm"))
    folders = []
    for n in range(3):
        folder = out / f"study{n}"
        folder.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        for path in slices[n * 5 : n * 5 + 5]:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / path.name)
        folders.append(folder)
    return folders


def test_studies_received_while_rabbitmq_is_down_are_published_once_when_it_is_back(
    make_node: Callable[..., Node],
    amqp_queues: tuple[str, str],
    shared_data: Path,
    tmp_path: Path,
    broker_outage: Callable[[], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node.publisher")
    queue, dead = amqp_queues
    node = make_node(amqp_url=AMQP_URL, amqp_queue=queue, amqp_dead_letter_queue=dead)
    folders = _three_studies(shared_data / "lidc-small", tmp_path / "studies")
    for folder in folders:
        assert storescu(node.scp.port, folder).returncode == 0

    def jobs() -> list[Job]:
        with node.db.session() as session:
            return list(session.scalars(select(Job)))

    wait_for(lambda: len(jobs()) == 3, timeout=30)
    wait_for(lambda: "job queue unavailable" in caplog.text, timeout=30)
    assert all(job.published_at is None for job in jobs())

    broker_outage()
    back = time.monotonic()
    wait_for(lambda: all(job.published_at is not None for job in jobs()), timeout=60, interval=0.1)
    published_s = time.monotonic() - back

    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    declare_topology(channel, queue, dead)
    bodies = []
    while (message := channel.basic_get(queue, auto_ack=True))[0] is not None:
        bodies.append(json.loads(message[2]))
    connection.close()
    print(
        f"\nRabbitMQ down during ingest: studies sent 3, jobs {len(jobs())}, messages "
        f"{len(bodies)}, duplicates {len(bodies) - len({b['job_id'] for b in bodies})}, all "
        f"published {published_s:.1f} s after the broker was back"
    )
    assert sorted(b["job_id"] for b in bodies) == sorted(j.id for j in jobs())
