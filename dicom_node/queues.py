"""Job queues: RabbitMQ for scale, an embedded durable queue in the database for one host.

Both offer the same two faces: :class:`JobQueue` (publish, with the message on durable storage
when it returns) for the node, and :class:`JobSource` (receive, ack, reject) for workers.
Messages carry ids and UIDs only, never patient attributes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy import select, update

from dicom_node.db import Database, QueueMessage, utcnow
from dicom_node.errors import QueueUnavailableError

LOGGER = logging.getLogger(__name__)

DEAD_LETTER_EXCHANGE = "nodule.dlx"


@dataclass(frozen=True)
class Received:
    """A message handed to a worker; ``tag`` identifies it for ack/reject."""

    body: dict[str, Any]
    tag: int
    redelivered: bool


class JobQueue(Protocol):
    """Where the node publishes jobs."""

    def publish(self, body: dict[str, Any], message_id: str) -> None:
        """Publish ``body``; return only once the queue holds it durably."""

    def close(self) -> None:
        """Release connections."""


class JobSource(Protocol):
    """Where workers take jobs from."""

    def receive(self, timeout: float) -> Received | None:
        """The next message, or ``None`` after ``timeout`` seconds without one."""

    def ack(self, message: Received) -> None:
        """The message is done with; remove it."""

    def reject(self, message: Received, requeue: bool) -> None:
        """Give the message back (``requeue``) or dead-letter it."""

    def dead_letters(self) -> JobSource:
        """A handle that receives from the dead-letter queue."""

    def close(self) -> None:
        """Release connections."""


_AMQP_ERRORS = (pika.exceptions.AMQPError, OSError)


class RabbitQueue:
    """A durable RabbitMQ queue with a dead-letter exchange; publishes with confirms.

    Not thread-safe (pika is not): each thread that publishes or consumes owns one.

    Parameters
    ----------
    url : str
        AMQP URL, e.g. ``amqp://guest:guest@127.0.0.1:5672/%2F``.
    queue, dead_letter_queue : str
        Names of the work queue and of the queue its dead letters land in.
    """

    def __init__(
        self, url: str, queue: str, dead_letter_queue: str, consume_from: str | None = None
    ) -> None:
        self.url = url
        self.queue = queue
        self.dead_letter_queue = dead_letter_queue
        self.consume_from = consume_from or queue
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer: Iterator[Any] | None = None

    def _open(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        try:
            params = pika.URLParameters(self.url)
            params.connection_attempts = 1
            params.blocked_connection_timeout = 30
            self._connection = pika.BlockingConnection(params)
            channel = self._connection.channel()
            declare_topology(channel, self.queue, self.dead_letter_queue)
            channel.confirm_delivery()
        except _AMQP_ERRORS as exc:
            self.close()
            raise QueueUnavailableError(f"RabbitMQ unavailable: {exc!r}") from exc
        self._channel = channel
        return channel

    def publish(self, body: dict[str, Any], message_id: str) -> None:
        """Publish a persistent message and wait for the broker's confirm."""
        channel = self._open()
        try:
            channel.basic_publish(
                exchange="",
                routing_key=self.queue,
                body=json.dumps(body).encode(),
                properties=pika.BasicProperties(
                    delivery_mode=pika.DeliveryMode.Persistent,
                    content_type="application/json",
                    message_id=message_id,
                ),
                mandatory=True,
            )
        except _AMQP_ERRORS as exc:
            self.close()
            raise QueueUnavailableError(f"publish not confirmed: {exc!r}") from exc

    def receive(self, timeout: float) -> Received | None:
        """Take the next message (prefetch 1)."""
        channel = self._open()
        try:
            if self._consumer is None:
                channel.basic_qos(prefetch_count=1)
                self._consumer = channel.consume(self.consume_from, inactivity_timeout=timeout)
            method, _props, body = next(self._consumer)
        except _AMQP_ERRORS as exc:
            self.close()
            raise QueueUnavailableError(f"consume failed: {exc!r}") from exc
        if method is None:
            return None
        return Received(json.loads(body), method.delivery_tag, bool(method.redelivered))

    def ack(self, message: Received) -> None:
        """Acknowledge on the channel that delivered the message."""
        self._open().basic_ack(message.tag)

    def reject(self, message: Received, requeue: bool) -> None:
        """Requeue, or dead-letter through the queue's dead-letter exchange."""
        self._open().basic_reject(message.tag, requeue=requeue)

    def dead_letters(self) -> RabbitQueue:
        """A handle that receives from this queue's dead-letter queue."""
        return RabbitQueue(self.url, self.queue, self.dead_letter_queue, self.dead_letter_queue)

    def close(self) -> None:
        """Close the connection, ignoring errors of a connection already gone."""
        connection, self._connection, self._channel, self._consumer = (
            self._connection,
            None,
            None,
            None,
        )
        if connection is not None and connection.is_open:
            with contextlib.suppress(*_AMQP_ERRORS):
                connection.close()


def declare_topology(channel: BlockingChannel, queue: str, dead_letter_queue: str) -> None:
    """Declare the durable work queue, the dead-letter exchange and the dead-letter queue."""
    channel.exchange_declare(DEAD_LETTER_EXCHANGE, exchange_type="direct", durable=True)
    channel.queue_declare(dead_letter_queue, durable=True)
    channel.queue_bind(dead_letter_queue, DEAD_LETTER_EXCHANGE, routing_key=dead_letter_queue)
    channel.queue_declare(
        queue,
        durable=True,
        arguments={
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": dead_letter_queue,
        },
    )


class EmbeddedQueue:
    """A durable queue in the service's own database (the default without ``AMQP_URL``).

    A received message is leased for ``lease_seconds``; a worker that dies without acking lets the
    lease expire and the message is delivered again, as RabbitMQ would on a lost connection.
    """

    def __init__(
        self, db: Database, queue: str, dead_letter_queue: str, lease_seconds: float = 600.0
    ) -> None:
        self.db = db
        self.queue = queue
        self.dead_letter_queue = dead_letter_queue
        self.lease = timedelta(seconds=lease_seconds)

    def publish(self, body: dict[str, Any], message_id: str) -> None:
        """Insert the message; durable once the transaction commits."""
        with self.db.session() as session:
            session.add(QueueMessage(queue=self.queue, body=json.dumps(body), deliveries=0))

    def receive(self, timeout: float) -> Received | None:
        """Lease the oldest available message, polling until ``timeout``."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            message = self._lease_one()
            if message is not None or time.monotonic() >= deadline:
                return message
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _lease_one(self) -> Received | None:
        now = utcnow()
        with self.db.session() as session:
            row = session.scalar(
                select(QueueMessage)
                .where(
                    QueueMessage.queue == self.queue,
                    QueueMessage.acked_at.is_(None),
                    QueueMessage.available_at <= now,
                )
                .order_by(QueueMessage.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if row is None:
                return None
            row.deliveries += 1
            row.available_at = now + self.lease
            return Received(json.loads(row.body), row.id, row.deliveries > 1)

    def ack(self, message: Received) -> None:
        """Mark the message done."""
        with self.db.session() as session:
            session.execute(
                update(QueueMessage).where(QueueMessage.id == message.tag).values(acked_at=utcnow())
            )

    def reject(self, message: Received, requeue: bool) -> None:
        """Make it available again now, or move it to the dead-letter queue."""
        values: dict[str, Any] = {"available_at": utcnow()}
        if not requeue:
            values["queue"] = self.dead_letter_queue
        with self.db.session() as session:
            session.execute(
                update(QueueMessage).where(QueueMessage.id == message.tag).values(**values)
            )

    def dead_letters(self) -> EmbeddedQueue:
        """A handle that receives from this queue's dead-letter queue."""
        return EmbeddedQueue(self.db, self.dead_letter_queue, self.dead_letter_queue)

    def close(self) -> None:
        """Nothing to release: the database is shared."""
