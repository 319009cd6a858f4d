"""admin event subjects of any length

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("admin_events", schema=None) as batch_op:
        batch_op.alter_column(
            "subject",
            existing_type=sa.VARCHAR(length=256),
            type_=sa.Text(),
            existing_nullable=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("admin_events", schema=None) as batch_op:
        batch_op.alter_column(
            "subject",
            existing_type=sa.Text(),
            type_=sa.VARCHAR(length=256),
            existing_nullable=False,
        )
