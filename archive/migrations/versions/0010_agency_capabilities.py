"""agency capabilities: what each agency's signatures last advertised (SMIMECapabilities)

The hub encrypts with AES-256-GCM to an agency whose newest verified signature (by the time
its message was received) lists it before AES-256-CBC, and with AES-256-CBC to every other
(DESIGN §3).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import archive.tables

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agency_capabilities",
        sa.Column("organ_id", sa.String(length=64), nullable=False),
        sa.Column("advertised", sa.JSON(), nullable=False),
        sa.Column("entry_seq", sa.BigInteger(), nullable=False),
        sa.Column("received_at", archive.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", archive.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("organ_id"),
    )


def downgrade() -> None:
    op.drop_table("agency_capabilities")
