"""The Alembic migrations build exactly the schema the models declare, up to the newest head."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from dicom_node.db import Base, Database
from dicom_node.migrate import alembic_config, upgrade


def test_upgrade_reaches_the_single_head_and_matches_the_models(database_url: str) -> None:
    db = Database(database_url)
    try:
        upgrade(db)
        upgrade(db)  # idempotent
        script = ScriptDirectory.from_config(alembic_config(database_url))
        (head,) = script.get_heads()
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert context.get_current_revision() == head
            assert compare_metadata(context, Base.metadata) == []
    finally:
        db.dispose()


def test_processes_starting_together_on_a_fresh_database_migrate_once(
    database_url: str, tmp_path: Path
) -> None:
    """A node and its workers start at the same moment (Compose, Kubernetes) and each upgrades
    the schema at start: one migrates, the others wait and find it current."""
    env = {**os.environ, "NODULEAI_DB_URL": database_url, "NODULEAI_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "dicom_node.cli", "db", "upgrade"]
    started = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in started]
    assert [p.returncode for p in started] == [0, 0, 0, 0], "\n".join(outputs)
    db = Database(database_url)
    try:
        (head,) = ScriptDirectory.from_config(alembic_config(database_url)).get_heads()
        with db.engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == head
    finally:
        db.dispose()
