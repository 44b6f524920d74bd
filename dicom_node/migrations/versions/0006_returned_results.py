"""returned_results: our own result objects sent back by a PACS, kept apart from study input

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 19:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "returned_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=400), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    with op.batch_alter_table("returned_results", schema=None) as batch_op:
        batch_op.create_index(
            "ix_returned_results_study_instance_uid", ["study_instance_uid"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("returned_results", schema=None) as batch_op:
        batch_op.drop_index("ix_returned_results_study_instance_uid")
    op.drop_table("returned_results")
