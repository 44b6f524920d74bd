"""What the dashboard's routes share: database, settings, credentials, queue inspector."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicom_node.config import Settings
from dicom_node.dashboard.auth import Credentials
from dicom_node.dashboard.queue_stats import EmbeddedInspector, QueueInspector, RabbitInspector
from dicom_node.db import Database

_SECRET_KEY = re.compile(r"pass|secret|token|key|auth|credential", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^@/\s]+@", re.IGNORECASE)
MASK = "**********"


@dataclass(frozen=True)
class Dashboard:
    """Everything a dashboard route needs, built once by :func:`create_app`."""

    db: Database
    settings: Settings
    creds: Credentials
    queues: QueueInspector
    on_job: Callable[[], None]


def make_inspector(settings: Settings, db: Database) -> QueueInspector:
    """RabbitMQ inspector when ``amqp_url`` is set, else the embedded queue's."""
    if settings.amqp_url is not None:
        return RabbitInspector(
            settings.amqp_url.get_secret_value(),
            settings.amqp_queue,
            settings.amqp_dead_letter_queue,
        )
    return EmbeddedInspector(db, settings.amqp_queue, settings.amqp_dead_letter_queue)


def mask_secrets(value: Any) -> Any:
    """``value`` with secret-looking keys masked and passwords in URLs removed (recursive)."""
    if isinstance(value, dict):
        return {
            k: MASK if _SECRET_KEY.search(str(k)) and v else mask_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", value)
    return value
