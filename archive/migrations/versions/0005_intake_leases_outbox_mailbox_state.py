"""intake leases and source keys, outbox, mailbox state

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import archive.tables

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailbox_state",
        sa.Column("mailbox", sa.String(length=400), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("last_uid", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", archive.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("mailbox"),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("for_seq", sa.BigInteger(), nullable=True),
        sa.Column("organ_id", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", archive.tables.UtcDateTime(timezone=True), nullable=True),
        sa.Column("worker", sa.String(length=100), nullable=True),
        sa.Column("lease_until", archive.tables.UtcDateTime(timezone=True), nullable=True),
        sa.Column("mail_from", sa.String(length=320), nullable=True),
        sa.Column("rcpt_to", sa.JSON(), nullable=True),
        sa.Column("message", sa.LargeBinary(), nullable=True),
        sa.Column("entry_seq", sa.BigInteger(), nullable=True),
        sa.Column("last_reply", sa.Text(), nullable=True),
        sa.Column("created_at", archive.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", archive.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_outbox_for_seq"), ["for_seq"], unique=False)
        batch_op.create_index(batch_op.f("ix_outbox_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_outbox_state"), ["state"], unique=False)

    with op.batch_alter_table("intake", schema=None) as batch_op:
        batch_op.add_column(sa.Column("size", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("worker", sa.String(length=100), nullable=True))
        batch_op.add_column(
            sa.Column("lease_until", archive.tables.UtcDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("source_key", sa.String(length=400), nullable=True))
        batch_op.create_unique_constraint("uq_intake_source_key", ["source_key"])


def downgrade() -> None:
    with op.batch_alter_table("intake", schema=None) as batch_op:
        batch_op.drop_constraint("uq_intake_source_key", type_="unique")
        batch_op.drop_column("source_key")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("worker")
        batch_op.drop_column("size")

    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_state"))
        batch_op.drop_index(batch_op.f("ix_outbox_kind"))
        batch_op.drop_index(batch_op.f("ix_outbox_for_seq"))

    op.drop_table("outbox")
    op.drop_table("mailbox_state")
