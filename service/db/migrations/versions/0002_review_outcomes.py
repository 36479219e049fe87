"""review outcomes for monitoring

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 21:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "review_outcomes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("document_reference", sa.String(length=200), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("who", sa.String(length=500), nullable=False),
        sa.Column("summary_id", sa.String(length=36), nullable=True),
        sa.Column("draft_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("words_changed", sa.Integer(), nullable=True),
        sa.Column("chars_changed", sa.Integer(), nullable=True),
        sa.Column("draft_words", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("review_outcomes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_review_outcomes_at"), ["at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_review_outcomes_document_reference"), ["document_reference"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_review_outcomes_summary_id"), ["summary_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("review_outcomes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_review_outcomes_summary_id"))
        batch_op.drop_index(batch_op.f("ix_review_outcomes_document_reference"))
        batch_op.drop_index(batch_op.f("ix_review_outcomes_at"))
    op.drop_table("review_outcomes")
