"""Who may read and act: a bearer token, operator users and read-only users; sessions held by an
HttpOnly cookie; failed sign-ins rate-limited; every action and every refusal audited.

With neither ``NODULEAI_DASHBOARD_TOKEN`` nor ``NODULEAI_DASHBOARD_USERS`` configured, a random
token is generated at first start and written to ``DATA_DIR/dashboard-token`` (mode 0600); the log
names the file, never the token; later starts read it back.

- **Roles.** The token and ``DASHBOARD_USERS`` are *operators* (read and act);
  ``DASHBOARD_READERS`` are *readers* (read only: an action answers 403 and is audited).
- **Sign-in** (``POST /api/session`` with the credentials in the ``Authorization`` header, as a
  bearer token or basic auth): the server answers with a session cookie (:data:`COOKIE`) set
  ``HttpOnly`` (scripts cannot read it), ``SameSite=Strict`` (no other site's request carries it),
  ``Secure`` when the request came over TLS, ``Path=/``, for :data:`SESSION_SECONDS`. Sessions live
  in the node's memory: a restart signs everyone out. ``DELETE /api/session`` signs out.
- **Actions** accept the ``Authorization`` header, or the session cookie together with the header
  :data:`ACTION_HEADER` (a cross-site form cannot send it: a second guard behind SameSite).
- **Rate limit.** More than :data:`MAX_FAILURES` failed sign-ins from one address within
  :data:`FAILURE_WINDOW_SECONDS` answer 429 (with ``Retry-After``) until the window has passed;
  each failure and each limited attempt is audited.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request, status

from dicom_node.config import Settings
from dicom_node.db import AuditEntry, Database

LOGGER = logging.getLogger(__name__)

TOKEN_FILE = "dashboard-token"
COOKIE = "noduleai_session"
#: The header an action sent with the session cookie must carry (any value).
ACTION_HEADER = "X-NoduleAI-Action"
SESSION_SECONDS = 8 * 3600
MAX_FAILURES = 5
FAILURE_WINDOW_SECONDS = 60.0
OPERATOR, READER = "operator", "reader"


@dataclass(frozen=True)
class Credentials:
    """The accepted token (if any), operator users and read-only users (name → password)."""

    token: str | None
    users: dict[str, str] = field(default_factory=dict)
    public_read: bool = True
    readers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Principal:
    """Who a request authenticated as: ``token`` or a user name, and the role."""

    actor: str
    role: str

    @property
    def may_act(self) -> bool:
        """Whether the role may run actions."""
        return self.role == OPERATOR


class Sessions:
    """Signed-in sessions by their random id, in memory (thread-safe)."""

    def __init__(self, seconds: float = SESSION_SECONDS) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._by_id: dict[str, tuple[Principal, float]] = {}

    def open(self, principal: Principal) -> str:
        """A new session for ``principal``; its id (the cookie's value)."""
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._by_id = {k: v for k, v in self._by_id.items() if v[1] > now}
            self._by_id[sid] = (principal, now + self.seconds)
        return sid

    def get(self, sid: str | None) -> Principal | None:
        """The principal of a live session, or ``None``."""
        if not sid:
            return None
        with self._lock:
            found = self._by_id.get(sid)
        if found is None or found[1] <= time.monotonic():
            return None
        return found[0]

    def close(self, sid: str | None) -> None:
        """End a session (no error when there is none)."""
        with self._lock:
            self._by_id.pop(sid or "", None)


class SignInLimiter:
    """Failed sign-ins per client address in a sliding window (thread-safe)."""

    def __init__(
        self, max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW_SECONDS
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        with self._lock:
            recent = self._recent(client)
            if len(recent) < self.max_failures:
                return 0.0
            return max(0.0, recent[0] + self.window - time.monotonic())

    def failed(self, client: str) -> None:
        """Count a failed sign-in of ``client``."""
        with self._lock:
            self._recent(client).append(time.monotonic())

    def _recent(self, client: str) -> list[float]:
        now = time.monotonic()
        kept = [t for t in self._failures.get(client, []) if t > now - self.window]
        self._failures[client] = kept
        return kept


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
    readers = (
        parse_users(settings.dashboard_readers.get_secret_value())
        if settings.dashboard_readers
        else {}
    )
    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
    if token is None and not users:
        token = load_or_create_token(settings.data_dir)
    return Credentials(token, users, settings.dashboard_public_read, readers)


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _basic_user(value: str, users: dict[str, str]) -> str | None:
    try:
        name, _sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    expected = users.get(name)
    return name if expected is not None and _equal(password, expected) else None


def from_header(request: Request, creds: Credentials) -> Principal | None:
    """The principal the ``Authorization`` header names (bearer token or basic auth), if valid."""
    scheme, _sep, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and creds.token and _equal(value.strip(), creds.token):
        return Principal("token", OPERATOR)
    if scheme.lower() == "basic":
        for users, role in ((creds.users, OPERATOR), (creds.readers, READER)):
            name = _basic_user(value.strip(), users) if users else None
            if name is not None:
                return Principal(name, role)
    return None


def authenticate(
    request: Request, creds: Credentials, sessions: Sessions, acting: bool = False
) -> Principal | None:
    """Who the request authenticates as: the ``Authorization`` header, else the session cookie
    (for an action only together with :data:`ACTION_HEADER`); ``None`` when neither holds."""
    principal = from_header(request, creds)
    if principal is not None:
        return principal
    if acting and ACTION_HEADER.lower() not in request.headers:
        return None
    return sessions.get(request.cookies.get(COOKIE))


def client_of(request: Request) -> str:
    """The client's address, as the audit names it."""
    return request.client.host if request.client else "unknown"


def audit(db: Database, actor: str, action: str, target: str | None, detail: str | None) -> None:
    """Write one audit row (ids and outcomes only, never patient attributes)."""
    with db.session() as session:
        session.add(AuditEntry(actor=actor, action=action, target=target, detail=detail))


def refuse(db: Database, request: Request, action: str, target: str | None) -> HTTPException:
    """Audit a refused action and return the 401 to raise."""
    supplied = "credentials rejected" if request.headers.get("authorization") else "no credentials"
    audit(db, "anonymous", f"{action}.refused", target, f"{supplied} from {client_of(request)}")
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail="authentication required",
        headers={"WWW-Authenticate": 'Bearer, Basic realm="NoduleAI"'},
    )
