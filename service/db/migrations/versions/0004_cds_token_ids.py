"""the CDS clients' JWT ids already used (a replay is refused by every process), and the override
reason codes of CDS card feedback

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 20:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cds_token_ids",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("cds_token_ids", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cds_token_ids_expires_at"), ["expires_at"], unique=False)
    with op.batch_alter_table("review_outcomes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("override_reasons", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("review_outcomes", schema=None) as batch_op:
        batch_op.drop_column("override_reasons")
    with op.batch_alter_table("cds_token_ids", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cds_token_ids_expires_at"))
    op.drop_table("cds_token_ids")
