"""Job queues: RabbitMQ for scale, an embedded durable queue in the database for one host.

Both offer the same two faces, chosen by one factory each (:func:`make_job_queue`,
:func:`make_job_source`: RabbitMQ when ``NODULEAI_AMQP_URL`` is set, else the embedded queue):

- :class:`JobQueue` (publish, with the message on durable storage when it returns) for the node's
  outbox publisher;
- :class:`JobSource` (receive, ack, requeue, dead-letter) for workers.

A job that is to be retried later is not held or delayed in the queue: the worker acknowledges
its message and the job goes back to the outbox with a ``retry_at`` time
(:mod:`dicom_node.lifecycle`), from which the publisher sends it again. ``requeue`` is only for a
message whose outcome could not be recorded at all (the database unreachable).

Messages carry ids and UIDs only, never patient attributes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue as stdlib_queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties
from sqlalchemy import select, update

from dicom_node.config import Settings
from dicom_node.db import Database, QueueMessage, utcnow
from dicom_node.errors import QueueUnavailableError

LOGGER = logging.getLogger(__name__)

DEAD_LETTER_EXCHANGE = "nodule.dlx"
#: What pika raises when a broker or connection goes away.
AMQP_ERRORS = (pika.exceptions.AMQPError, OSError)


@dataclass(frozen=True)
class Received:
    """A message handed to a worker; ``tag`` identifies it for settling.

    ``connection`` numbers the RabbitMQ connection that delivered it: a message from a connection
    since lost cannot be settled (the broker has already put it back).
    """

    body: dict[str, Any]
    tag: int
    redelivered: bool
    connection: int = 0


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

    def requeue(self, message: Received) -> None:
        """Give the message back to the queue."""

    def dead_letter(self, message: Received) -> None:
        """Move the message to the dead-letter queue."""

    def close(self) -> None:
        """Release connections."""


def amqp_connection(
    url: str, heartbeat: int | None = None, socket_timeout: float | None = None
) -> pika.BlockingConnection:
    """A blocking connection to ``url`` (one attempt; raises pika's errors)."""
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.blocked_connection_timeout = 30
    if heartbeat is not None:
        params.heartbeat = heartbeat
    if socket_timeout is not None:
        params.socket_timeout = socket_timeout
    return pika.BlockingConnection(params)


@contextlib.contextmanager
def amqp_channel(url: str, socket_timeout: float = 5) -> Iterator[BlockingChannel]:
    """A short-lived channel on a connection of its own (for inspection from any thread)."""
    connection = amqp_connection(url, socket_timeout=socket_timeout)
    try:
        yield connection.channel()
    finally:
        with contextlib.suppress(*AMQP_ERRORS):
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


class RabbitPublisher:
    """Publishes persistent messages with confirms to a durable RabbitMQ queue.

    Not thread-safe (pika is not): the node's publisher thread owns it.

    Parameters
    ----------
    url : str
        AMQP URL, e.g. ``amqp://guest:guest@127.0.0.1:5672/%2F``.
    queue, dead_letter_queue : str
        Names of the work queue and of the queue its dead letters land in.
    """

    def __init__(self, url: str, queue: str, dead_letter_queue: str) -> None:
        self.url = url
        self.queue = queue
        self.dead_letter_queue = dead_letter_queue
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def _open(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        try:
            self._connection = amqp_connection(self.url)
            channel = self._connection.channel()
            declare_topology(channel, self.queue, self.dead_letter_queue)
            channel.confirm_delivery()
        except AMQP_ERRORS as exc:
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
        except AMQP_ERRORS as exc:
            self.close()
            raise QueueUnavailableError(f"publish not confirmed: {exc!r}") from exc

    def close(self) -> None:
        """Close the connection, ignoring errors of a connection already gone."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(*AMQP_ERRORS):
                connection.close()


class RabbitSource:
    """A RabbitMQ consumer (prefetch 1) whose connection lives on a thread of its own.

    pika is not thread-safe, and a long inference must not starve the connection's heartbeats:
    the connection thread consumes and serves heartbeats, hands each message to the worker's
    thread through :meth:`receive`, and performs the worker's ack/requeue/dead-letter, which
    the worker's thread schedules with ``add_callback_threadsafe`` (DESIGN.md). A lost
    connection is re-opened after ``reconnect_seconds``; messages it had delivered are the
    broker's again and are not settled.

    Parameters
    ----------
    url : str
        AMQP URL.
    queue, dead_letter_queue : str
        The work queue to consume and its dead-letter queue (declared if missing).
    heartbeat : int
        AMQP heartbeat in seconds.
    reconnect_seconds : float
        Pause before re-opening a lost connection.
    """

    def __init__(
        self,
        url: str,
        queue: str,
        dead_letter_queue: str,
        heartbeat: int = 30,
        reconnect_seconds: float = 2.0,
    ) -> None:
        self.url = url
        self.queue = queue
        self.dead_letter_queue = dead_letter_queue
        self.heartbeat = heartbeat
        self.reconnect_seconds = reconnect_seconds
        self._inbox: stdlib_queue.Queue[Received] = stdlib_queue.Queue()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._generation = 0
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="amqp-consumer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                self._consume()
            except AMQP_ERRORS as exc:
                LOGGER.warning("RabbitMQ connection lost (%r); reconnecting", exc)
            except Exception:
                LOGGER.exception("RabbitMQ consumer failed; reconnecting")
            finally:
                self._drop_connection()
            self._closing.wait(self.reconnect_seconds)

    def _consume(self) -> None:
        connection = amqp_connection(self.url, heartbeat=self.heartbeat)
        channel = connection.channel()
        declare_topology(channel, self.queue, self.dead_letter_queue)
        channel.basic_qos(prefetch_count=1)
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._connection, self._channel = connection, channel

        def on_message(
            _ch: BlockingChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes
        ) -> None:
            tag, redelivered = method.delivery_tag, bool(method.redelivered)
            self._inbox.put(Received(decode_body(body), tag, redelivered, generation))

        channel.basic_consume(self.queue, on_message)
        while not self._closing.is_set():
            connection.process_data_events(time_limit=0.5)

    def _drop_connection(self) -> None:
        with self._lock:
            connection, self._connection, self._channel = self._connection, None, None
        while not self._inbox.empty():  # the broker puts these back itself
            self._inbox.get_nowait()
        if connection is not None and connection.is_open:
            with contextlib.suppress(*AMQP_ERRORS):
                connection.close()

    def receive(self, timeout: float) -> Received | None:
        """The next delivered message, or ``None`` after ``timeout`` seconds."""
        self._ensure_started()
        try:
            return self._inbox.get(timeout=timeout)
        except stdlib_queue.Empty:
            return None

    def _settle(
        self, message: Received, what: str, action: Callable[[BlockingChannel], None]
    ) -> None:
        """Run ``action`` on the connection thread; wait until it ran (or the connection died)."""
        with self._lock:
            connection, channel = self._connection, self._channel
            current = self._generation
        if connection is None or channel is None or message.connection != current:
            LOGGER.warning(
                "message %s not %s: its connection is gone (the broker requeues it)",
                message.tag,
                what,
            )
            return
        done = threading.Event()

        def run() -> None:
            try:
                action(channel)
            except AMQP_ERRORS as exc:
                LOGGER.warning("message %s not %s: %r", message.tag, what, exc)
            finally:
                done.set()

        try:
            connection.add_callback_threadsafe(run)
        except AMQP_ERRORS as exc:
            LOGGER.warning("message %s not %s: %r", message.tag, what, exc)
            return
        done.wait(timeout=30)

    def ack(self, message: Received) -> None:
        """Acknowledge on the connection that delivered the message."""
        self._settle(message, "acked", lambda ch: ch.basic_ack(message.tag))

    def requeue(self, message: Received) -> None:
        """Give the message back to the work queue."""
        self._settle(message, "requeued", lambda ch: ch.basic_reject(message.tag, requeue=True))

    def dead_letter(self, message: Received) -> None:
        """Reject without requeue: the queue's dead-letter exchange takes it."""
        self._settle(
            message, "dead-lettered", lambda ch: ch.basic_reject(message.tag, requeue=False)
        )

    def close(self) -> None:
        """Stop consuming and close the connection."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def decode_body(body: bytes) -> dict[str, Any]:
    """A message body as a dict (an unreadable body becomes ``{}``, which no job matches)."""
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class EmbeddedQueue:
    """A durable queue in the service's own database (the default without ``AMQP_URL``).

    A received message is leased for ``lease_seconds``; a worker that dies without settling lets
    the lease expire and the message is delivered again, as RabbitMQ would on a lost connection.
    Both faces (:class:`JobQueue`, :class:`JobSource`) in one class.
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
            return Received(decode_body(row.body.encode()), row.id, row.deliveries > 1)

    def ack(self, message: Received) -> None:
        """Mark the message done."""
        self._update(message, acked_at=utcnow())

    def requeue(self, message: Received) -> None:
        """Make it available again now."""
        self._update(message, available_at=utcnow())

    def dead_letter(self, message: Received) -> None:
        """Move it to the dead-letter queue."""
        self._update(message, available_at=utcnow(), queue=self.dead_letter_queue)

    def _update(self, message: Received, **values: Any) -> None:
        with self.db.session() as session:
            session.execute(
                update(QueueMessage).where(QueueMessage.id == message.tag).values(**values)
            )

    def close(self) -> None:
        """Nothing to release: the database is shared."""


def make_job_queue(settings: Settings, db: Database) -> JobQueue:
    """The node's publishing face: RabbitMQ when ``amqp_url`` is set, else the embedded queue."""
    if settings.amqp_url is not None:
        return RabbitPublisher(
            settings.amqp_url.get_secret_value(),
            settings.amqp_queue,
            settings.amqp_dead_letter_queue,
        )
    return EmbeddedQueue(db, settings.amqp_queue, settings.amqp_dead_letter_queue)


def make_job_source(settings: Settings, db: Database) -> JobSource:
    """A worker's face on the work queue: RabbitMQ when ``amqp_url`` is set, else embedded."""
    work, dead = settings.amqp_queue, settings.amqp_dead_letter_queue
    if settings.amqp_url is not None:
        return RabbitSource(settings.amqp_url.get_secret_value(), work, dead)
    return EmbeddedQueue(db, work, dead, lease_seconds=settings.job_timeout_seconds)
