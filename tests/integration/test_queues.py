"""RabbitMQ and the embedded queue offer workers the same interface and the same guarantees."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dicom_node.db import Database
from dicom_node.migrate import upgrade
from dicom_node.queues import EmbeddedQueue, RabbitQueue
from tests.conftest import AMQP_URL


@pytest.fixture(params=["rabbitmq", "embedded"])
def queues(
    request: pytest.FixtureRequest, amqp_queues: tuple[str, str], database_url: str
) -> Iterator[Any]:
    """A work queue and a second handle on its dead-letter queue."""
    queue, dead = amqp_queues
    if request.param == "rabbitmq":
        work = RabbitQueue(AMQP_URL, queue, dead)
        dead_letters = work.dead_letters()
        yield work, dead_letters
        work.close()
        dead_letters.close()
        return
    db = Database(database_url)
    upgrade(db)
    embedded = EmbeddedQueue(db, queue, dead)
    yield embedded, embedded.dead_letters()
    db.dispose()


def test_a_message_is_received_once_acked_and_gone(queues: Any) -> None:
    work, _ = queues
    work.publish({"job_id": "j1"}, "j1")
    message = work.receive(timeout=5)
    assert message is not None and message.body == {"job_id": "j1"}
    assert not message.redelivered
    work.ack(message)
    assert work.receive(timeout=0.5) is None


def test_a_requeued_message_comes_back_marked_redelivered(queues: Any) -> None:
    work, _ = queues
    work.publish({"job_id": "j2"}, "j2")
    first = work.receive(timeout=5)
    assert first is not None
    work.reject(first, requeue=True)
    again = work.receive(timeout=5)
    assert again is not None and again.body == {"job_id": "j2"} and again.redelivered
    work.ack(again)


def test_a_rejected_message_lands_in_the_dead_letter_queue(queues: Any) -> None:
    work, dead_letters = queues
    work.publish({"job_id": "j3"}, "j3")
    message = work.receive(timeout=5)
    assert message is not None
    work.reject(message, requeue=False)
    assert work.receive(timeout=0.5) is None
    dead = dead_letters.receive(timeout=5)
    assert dead is not None and dead.body == {"job_id": "j3"}
    dead_letters.ack(dead)
