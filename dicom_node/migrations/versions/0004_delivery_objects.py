"""deliveries: one row per result object and destination

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("object_uid", sa.String(length=64), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("path", sa.String(length=400), nullable=True))
        batch_op.create_unique_constraint(
            "uq_deliveries_job_destination_object", ["job_id", "destination", "object_uid"]
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_constraint("uq_deliveries_job_destination_object", type_="unique")
        batch_op.drop_column("path")
        batch_op.drop_column("object_uid")
