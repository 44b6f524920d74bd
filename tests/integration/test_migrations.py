"""The Alembic migrations build exactly the schema the models declare, up to the newest head."""

from __future__ import annotations

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
