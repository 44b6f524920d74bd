"""Container health check of a NoduleAI worker (it serves no HTTP).

Healthy when a worker on this host (the container's host name) recorded a heartbeat within
``dicom_node.workers.STALE_AFTER``; workers heartbeat every few seconds, idle or busy. Exit 0
healthy, 1 stale or absent, 2 the database could not be asked.
"""

from __future__ import annotations

import socket
import sys

from sqlalchemy import select

from dicom_node.config import load_settings
from dicom_node.db import Database, WorkerHeartbeat
from dicom_node.workers import is_alive


def main() -> int:
    """Check this host's worker heartbeats; the exit status is the verdict."""
    host = socket.gethostname()
    try:
        db = Database(load_settings().database_url)
        try:
            with db.session() as session:
                workers = list(
                    session.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.host == host))
                )
                alive = [w.id for w in workers if is_alive(w)]
        finally:
            db.dispose()
    except Exception as exc:  # any failure to ask is "unhealthy", with the reason
        print(f"cannot read worker heartbeats: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if alive:
        print(f"alive: {', '.join(alive)}")
        return 0
    print(f"no recent heartbeat from a worker on {host}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
