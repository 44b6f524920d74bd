"""Schema migrations with Alembic (``noduleai db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from dicom_node.db import Database

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    """An Alembic configuration pointing at the packaged migrations and at ``url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


#: The PostgreSQL advisory lock that serialises migrations (any constant of our own).
MIGRATION_LOCK = 0x4E6F64756C654149  # "NoduleAI"


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the schema of ``db`` to ``revision`` (the newest by default).

    The node and its workers each upgrade at start, and on Kubernetes or Compose they start
    together: one migrates, the others wait for it and then find the schema current. PostgreSQL
    serialises them with a transaction-scoped advisory lock; SQLite's ``BEGIN IMMEDIATE`` (see
    :func:`dicom_node.db.make_engine`) already takes the database's write lock.
    """
    cfg = alembic_config(db.url)
    with db.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
