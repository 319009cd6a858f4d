"""durable intake and replay keys

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import archive.tables

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "intake",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", archive.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("transport", sa.JSON(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", archive.tables.UtcDateTime(timezone=True), nullable=True),
        sa.Column("archive_seq", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", archive.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("intake", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_intake_received_at"), ["received_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_intake_sha256"), ["sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_intake_state"), ["state"], unique=False)

    op.create_table(
        "seen",
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("archive_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("seen")
    with op.batch_alter_table("intake", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_intake_state"))
        batch_op.drop_index(batch_op.f("ix_intake_sha256"))
        batch_op.drop_index(batch_op.f("ix_intake_received_at"))

    op.drop_table("intake")
