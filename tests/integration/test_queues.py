"""RabbitMQ and the embedded queue offer workers the same interface and the same guarantees."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dicom_node.config import Settings
from dicom_node.dashboard.queue_stats import make_inspector
from dicom_node.db import Database
from dicom_node.migrate import upgrade
from dicom_node.queues import make_job_queue, make_job_source
from tests.helpers import AMQP_URL, wait_for


@pytest.fixture(params=["rabbitmq", "embedded"])
def queues(
    request: pytest.FixtureRequest, amqp_queues: tuple[str, str], database_url: str
) -> Iterator[Any]:
    """The node's publishing face, a worker's face on the work queue and the dashboard's
    inspector of both queues, as the factories build them from the settings."""
    queue, dead = amqp_queues
    amqp = AMQP_URL if request.param == "rabbitmq" else None
    settings = Settings(amqp_url=amqp, amqp_queue=queue, amqp_dead_letter_queue=dead)
    db = Database(database_url)
    upgrade(db)
    publisher = make_job_queue(settings, db)
    work = make_job_source(settings, db)
    yield publisher, work, make_inspector(settings, db)
    for face in (publisher, work):
        face.close()
    db.dispose()


def test_a_message_is_received_once_acked_and_gone(queues: Any) -> None:
    publisher, work, _ = queues
    publisher.publish({"job_id": "j1"}, "j1")
    message = work.receive(timeout=5)
    assert message is not None and message.body == {"job_id": "j1"}
    assert not message.redelivered
    work.ack(message)
    assert work.receive(timeout=0.5) is None


def test_a_requeued_message_comes_back_marked_redelivered(queues: Any) -> None:
    publisher, work, _ = queues
    publisher.publish({"job_id": "j2"}, "j2")
    first = work.receive(timeout=5)
    assert first is not None
    work.requeue(first)
    again = work.receive(timeout=5)
    assert again is not None and again.body == {"job_id": "j2"} and again.redelivered
    work.ack(again)


def test_a_rejected_message_lands_in_the_dead_letter_queue(queues: Any) -> None:
    publisher, work, inspector = queues
    publisher.publish({"job_id": "j3"}, "j3")
    message = work.receive(timeout=5)
    assert message is not None
    work.dead_letter(message)
    assert work.receive(timeout=0.5) is None
    (dead,) = wait_for(lambda: inspector.dead_letters(10), timeout=5)
    assert dead.job_id == "j3"
    assert inspector.discard_dead_letters("j3") == 1
