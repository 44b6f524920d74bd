"""What the dashboard's routes share: database, settings, node configuration, credentials, queue
inspector; built once at start."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicom_node.config import NodeConfig, Settings
from dicom_node.dashboard.auth import Credentials, Sessions, SignInLimiter
from dicom_node.dashboard.queue_stats import QueueInspector
from dicom_node.db import Database

_SECRET_KEY = re.compile(r"pass|secret|token|key|auth|credential", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^@/\s]+@", re.IGNORECASE)
MASK = "**********"


@dataclass(frozen=True)
class Dashboard:
    """Everything a dashboard route needs, built once by :func:`create_app`."""

    db: Database
    settings: Settings
    config: NodeConfig
    creds: Credentials
    queues: QueueInspector
    on_job: Callable[[], None]
    sessions: Sessions = field(default_factory=Sessions)
    limiter: SignInLimiter = field(default_factory=SignInLimiter)


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
