"""structured failures (error_code) on studies, jobs and deliveries; FHIR rows' report_status;
jobs.retry_at (a retried job waits in the outbox)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 18:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_UNIQUE = "uq_deliveries_job_destination_object"


def upgrade() -> None:
    for table in ("studies", "jobs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("error_code", sa.String(length=32), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error_code", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("report_status", sa.String(length=16), nullable=False, server_default="")
        )
        batch_op.drop_constraint(_UNIQUE, type_="unique")
    # FHIR rows kept their report status in object_uid before this revision.
    op.execute(
        "UPDATE deliveries SET report_status = object_uid, object_uid = '' WHERE kind = 'fhir'"
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_unique_constraint(
            _UNIQUE, ["job_id", "destination", "object_uid", "report_status"]
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_constraint(_UNIQUE, type_="unique")
    op.execute(
        "UPDATE deliveries SET object_uid = report_status, report_status = '' WHERE kind = 'fhir'"
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_unique_constraint(_UNIQUE, ["job_id", "destination", "object_uid"])
        batch_op.drop_column("report_status")
        batch_op.drop_column("error_code")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("retry_at")
    for table in ("jobs", "studies"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("error_code")
