"""tamper-evident log and blobs

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import archive.tables

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root", sa.LargeBinary(), nullable=False),
        sa.Column("at", archive.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_checkpoints_size"), ["size"], unique=False)

    op.create_table(
        "data_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", archive.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "log_entries",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("at", archive.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("record", sa.LargeBinary(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(), nullable=False),
        sa.Column("agency", sa.String(length=64), nullable=True),
        sa.Column("category", sa.String(length=32), nullable=True),
        sa.Column("period", sa.String(length=7), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("document_id", sa.String(length=256), nullable=True),
        sa.Column("message_id", sa.String(length=998), nullable=True),
        sa.Column("digest", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("log_entries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_log_entries_agency"), ["agency"], unique=False)
        batch_op.create_index(batch_op.f("ix_log_entries_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_log_entries_category"), ["category"], unique=False)
        batch_op.create_index(batch_op.f("ix_log_entries_digest"), ["digest"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_log_entries_document_id"), ["document_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_log_entries_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_log_entries_message_id"), ["message_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_log_entries_period"), ["period"], unique=False)
        batch_op.create_index(batch_op.f("ix_log_entries_status"), ["status"], unique=False)

    head = op.create_table(
        "log_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(head, [{"id": 1, "size": 0}])
    op.create_table(
        "log_nodes",
        sa.Column("level", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx"),
    )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["data_keys.id"],
        ),
        sa.PrimaryKeyConstraint("sha256"),
    )


def downgrade() -> None:
    op.drop_table("blobs")
    op.drop_table("log_nodes")
    op.drop_table("log_head")
    with op.batch_alter_table("log_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_log_entries_status"))
        batch_op.drop_index(batch_op.f("ix_log_entries_period"))
        batch_op.drop_index(batch_op.f("ix_log_entries_message_id"))
        batch_op.drop_index(batch_op.f("ix_log_entries_kind"))
        batch_op.drop_index(batch_op.f("ix_log_entries_document_id"))
        batch_op.drop_index(batch_op.f("ix_log_entries_digest"))
        batch_op.drop_index(batch_op.f("ix_log_entries_category"))
        batch_op.drop_index(batch_op.f("ix_log_entries_at"))
        batch_op.drop_index(batch_op.f("ix_log_entries_agency"))

    op.drop_table("log_entries")
    op.drop_table("data_keys")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoints_size"))

    op.drop_table("checkpoints")
