"""Who may act: a bearer token or basic-auth users; every action and every refusal is audited.

With neither ``NODULEAI_DASHBOARD_TOKEN`` nor ``NODULEAI_DASHBOARD_USERS`` configured, a random
token is generated at first start and written to ``DATA_DIR/dashboard-token`` (mode 0600); the log
names the file, never the token; later starts read it back.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request, status

from dicom_node.config import Settings
from dicom_node.db import AuditEntry, Database

LOGGER = logging.getLogger(__name__)

TOKEN_FILE = "dashboard-token"
COOKIE = "noduleai_token"


@dataclass(frozen=True)
class Credentials:
    """The accepted token (if any) and basic-auth users (name → password)."""

    token: str | None
    users: dict[str, str] = field(default_factory=dict)
    public_read: bool = True


def parse_users(value: str) -> dict[str, str]:
    """Parse ``"alice:pw1,bob:pw2"`` into a mapping; entries without a colon are ignored."""
    users = {}
    for entry in value.split(","):
        name, sep, password = entry.strip().partition(":")
        if sep and name and password:
            users[name] = password
    return users


def load_or_create_token(data_dir: Path) -> str:
    """Read ``DATA_DIR/dashboard-token``, or create it (0600) and log where it is."""
    path = data_dir / TOKEN_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    LOGGER.warning("dashboard token generated: read it from %s (mode 0600)", path)
    return token


def credentials_from(settings: Settings) -> Credentials:
    """The credentials the dashboard accepts, per the settings (generating a token if none)."""
    users = (
        parse_users(settings.dashboard_users.get_secret_value()) if settings.dashboard_users else {}
    )
    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
    if token is None and not users:
        token = load_or_create_token(settings.data_dir)
    return Credentials(token, users, settings.dashboard_public_read)


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _basic_user(value: str, users: dict[str, str]) -> str | None:
    try:
        name, _sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    expected = users.get(name)
    return name if expected is not None and _equal(password, expected) else None


def authenticate(request: Request, creds: Credentials, allow_cookie: bool) -> str | None:
    """The actor (``token`` or a user name) the request authenticates as, else ``None``.

    Actions accept only the ``Authorization`` header (so a cookie cannot be ridden by another
    site); reads also accept the cookie the dashboard's pages set.
    """
    scheme, _sep, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and creds.token and _equal(value.strip(), creds.token):
        return "token"
    if scheme.lower() == "basic" and creds.users:
        return _basic_user(value.strip(), creds.users)
    cookie = request.cookies.get(COOKIE)
    if allow_cookie and cookie and creds.token and _equal(cookie, creds.token):
        return "token"
    return None


def audit(db: Database, actor: str, action: str, target: str | None, detail: str | None) -> None:
    """Write one audit row (ids and outcomes only, never patient attributes)."""
    with db.session() as session:
        session.add(AuditEntry(actor=actor, action=action, target=target, detail=detail))


def refuse(db: Database, request: Request, action: str, target: str | None) -> HTTPException:
    """Audit a refused action and return the 401 to raise."""
    client = request.client.host if request.client else "unknown"
    supplied = "credentials rejected" if request.headers.get("authorization") else "no credentials"
    audit(db, "anonymous", f"{action}.refused", target, f"{supplied} from {client}")
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail="authentication required",
        headers={"WWW-Authenticate": 'Bearer, Basic realm="NoduleAI"'},
    )
