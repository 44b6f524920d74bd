"""What the job queues hold: depth, consumers and dead letters, for RabbitMQ or the embedded queue.

RabbitMQ is asked with a passive ``queue.declare`` on a short-lived connection of its own (pika is
not thread-safe, and the HTTP server answers from several threads); the embedded queue is counted
in its table. Dead letters are peeked without being consumed: RabbitMQ's are fetched unacked and
then returned with one ``basic.nack(requeue)``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy import func, select, update

from dicom_node.config import Settings
from dicom_node.db import Database, QueueMessage, utcnow
from dicom_node.queues import AMQP_ERRORS, amqp_channel, decode_body

NOT_FOUND = 404


@dataclass(frozen=True)
class QueueDepth:
    """One queue: its name, messages waiting, consumers (``None`` when unknown)."""

    name: str
    messages: int | None
    consumers: int | None
    error: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A message in the dead-letter queue: its job and study ids only."""

    job_id: str | None
    study_instance_uid: str | None
    redelivered: bool


class QueueInspector(Protocol):
    """Reads queue depth and dead letters; implemented for RabbitMQ and the embedded queue."""

    kind: str

    def depths(self) -> list[QueueDepth]:
        """Depth of the work queue, then of the dead-letter queue."""

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first, left in the queue."""

    def discard_dead_letters(self, job_id: str) -> int:
        """Remove the dead letters of ``job_id``; return how many."""

    def ping(self) -> str | None:
        """``None`` when the queue is reachable, else why not."""


def _dead_letter(body: dict[str, Any], redelivered: bool) -> DeadLetter:
    return DeadLetter(body.get("job_id"), body.get("study_instance_uid"), redelivered)


class RabbitInspector:
    """Inspects the RabbitMQ work and dead-letter queues (results cached for ``ttl`` s)."""

    kind = "rabbitmq"

    def __init__(self, url: str, queue: str, dead_letter_queue: str, ttl: float = 1.0) -> None:
        self.url = url
        self.names = (queue, dead_letter_queue)
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, list[QueueDepth]] | None = None

    def depths(self) -> list[QueueDepth]:
        """Passive declares of both queues; a missing queue or broker shows as an error."""
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.ttl:
                return self._cached[1]
            result = [self._depth(name) for name in self.names]
            self._cached = (time.monotonic(), result)
            return result

    def _depth(self, name: str) -> QueueDepth:
        try:
            with amqp_channel(self.url) as channel:
                ok = channel.queue_declare(name, passive=True).method
                return QueueDepth(name, int(ok.message_count), int(ok.consumer_count))
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == NOT_FOUND:  # the publisher declares it on its first message
                return QueueDepth(name, 0, 0, error="not declared yet")
            return QueueDepth(name, None, None, error=type(exc).__name__)
        except AMQP_ERRORS as exc:
            return QueueDepth(name, None, None, error=type(exc).__name__)

    def _peek(self, channel: BlockingChannel, limit: int) -> list[tuple[int, dict[str, Any], bool]]:
        got = []
        for _ in range(limit):
            method, _props, body = channel.basic_get(self.names[1], auto_ack=False)
            if method is None:
                break
            got.append((int(method.delivery_tag), decode_body(body), bool(method.redelivered)))
        return got

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        """Fetch unacked, then give every one back with one ``basic.nack(requeue=True)``."""
        try:
            with amqp_channel(self.url) as channel:
                got = self._peek(channel, limit)
                if got:
                    channel.basic_nack(got[-1][0], multiple=True, requeue=True)
        except AMQP_ERRORS:
            return []
        return [_dead_letter(body, redelivered) for _tag, body, redelivered in got]

    def discard_dead_letters(self, job_id: str) -> int:
        """Ack the dead letters of ``job_id``, give the others back."""
        with amqp_channel(self.url) as channel:
            got = self._peek(channel, 10_000)
            mine = [tag for tag, body, _r in got if body.get("job_id") == job_id]
            for tag in mine:
                channel.basic_ack(tag)
            for tag, body, _r in got:
                if body.get("job_id") != job_id:
                    channel.basic_nack(tag, requeue=True)
        return len(mine)

    def ping(self) -> str | None:
        """``None`` when the broker accepts a connection and a channel."""
        try:
            with amqp_channel(self.url):
                return None
        except AMQP_ERRORS as exc:
            return type(exc).__name__


class EmbeddedInspector:
    """Counts the embedded queue's rows; consumers are unknown (see the workers table)."""

    kind = "embedded"

    def __init__(self, db: Database, queue: str, dead_letter_queue: str) -> None:
        self.db = db
        self.names = (queue, dead_letter_queue)

    def depths(self) -> list[QueueDepth]:
        """Unacknowledged messages per queue."""
        with self.db.session() as session:
            counts = dict(
                session.execute(
                    select(QueueMessage.queue, func.count())
                    .where(QueueMessage.queue.in_(self.names), QueueMessage.acked_at.is_(None))
                    .group_by(QueueMessage.queue)
                ).all()
            )
        return [QueueDepth(name, int(counts.get(name, 0)), None) for name in self.names]

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        """Unacknowledged rows of the dead-letter queue."""
        with self.db.session() as session:
            rows = session.scalars(
                select(QueueMessage)
                .where(QueueMessage.queue == self.names[1], QueueMessage.acked_at.is_(None))
                .order_by(QueueMessage.id)
                .limit(limit)
            ).all()
            return [_dead_letter(decode_body(r.body.encode()), r.deliveries > 1) for r in rows]

    def discard_dead_letters(self, job_id: str) -> int:
        """Acknowledge the dead-letter rows of ``job_id``."""
        with self.db.session() as session:
            rows = session.scalars(
                select(QueueMessage).where(
                    QueueMessage.queue == self.names[1], QueueMessage.acked_at.is_(None)
                )
            ).all()
            ids = [r.id for r in rows if decode_body(r.body.encode()).get("job_id") == job_id]
            if ids:
                session.execute(
                    update(QueueMessage).where(QueueMessage.id.in_(ids)).values(acked_at=utcnow())
                )
        return len(ids)

    def ping(self) -> str | None:
        """The embedded queue is reachable whenever the database is."""
        return None


def make_inspector(settings: Settings, db: Database) -> QueueInspector:
    """RabbitMQ inspector when ``amqp_url`` is set, else the embedded queue's."""
    if settings.amqp_url is not None:
        return RabbitInspector(
            settings.amqp_url.get_secret_value(),
            settings.amqp_queue,
            settings.amqp_dead_letter_queue,
        )
    return EmbeddedInspector(db, settings.amqp_queue, settings.amqp_dead_letter_queue)
