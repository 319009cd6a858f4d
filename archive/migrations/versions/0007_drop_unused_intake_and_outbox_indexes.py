"""drop the indexes no query uses: intake by digest and by time received, outbox by entry

Every message taken in wrote a page of each intake index to the log before its 250 (five
pages, now three), and every receipt and delivery owed one of the outbox's; nothing looks rows
up by these columns (intake is claimed by state, metrics read it by number).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("intake", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_intake_sha256"))
        batch_op.drop_index(batch_op.f("ix_intake_received_at"))
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_for_seq"))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_outbox_for_seq"), ["for_seq"], unique=False)
    with op.batch_alter_table("intake", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_intake_received_at"), ["received_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_intake_sha256"), ["sha256"], unique=False)
