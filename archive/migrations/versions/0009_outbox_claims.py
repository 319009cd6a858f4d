"""outbox claims: how many times in a row a row was claimed to build without being built

A receipt or delivery whose building kills its worker (the OOM killer, a crash in a native
library) is claimed again and again; the count lets a worker take it alone, and fail it after a
few (the admin is alerted).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claims", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("claims")
