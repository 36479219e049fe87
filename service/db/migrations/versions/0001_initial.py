"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 16:42:12.889358
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=8), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_prefix"), ["prefix"], unique=False)

    op.create_table(
        "app_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("browser_session_hash", sa.String(length=64), nullable=False),
        sa.Column("iss", sa.String(length=500), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("encounter_id", sa.String(length=64), nullable=True),
        sa.Column("fhir_user", sa.String(length=500), nullable=True),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("need_patient_banner", sa.Boolean(), nullable=False),
        sa.Column("token_set_encrypted", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("app_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_app_sessions_expires_at"), ["expires_at"], unique=False)

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=500), nullable=False),
        sa.Column("action", sa.String(length=50), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("resource", sa.String(length=200), nullable=True),
        sa.Column("outcome", sa.String(length=10), nullable=False),
        sa.Column("detail", sa.String(length=200), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_patient_id"), ["patient_id"], unique=False)

    op.create_table(
        "batch_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=30), nullable=False),
        sa.Column("mode", sa.String(length=10), nullable=False),
        sa.Column("fhir_base", sa.String(length=500), nullable=False),
        sa.Column("selection", sa.String(length=200), nullable=False),
        sa.Column("since", sa.String(length=40), nullable=True),
        sa.Column("watermark", sa.String(length=40), nullable=True),
        sa.Column("transaction_time", sa.String(length=40), nullable=True),
        sa.Column("selection_problems", sa.Integer(), nullable=False),
        sa.Column("selected", sa.Integer(), nullable=False),
        sa.Column("summarized", sa.Integer(), nullable=False),
        sa.Column("skipped_unchanged", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cpu_seconds", sa.Float(), nullable=False),
        sa.Column("machine_seconds", sa.Float(), nullable=False),
        sa.Column("owner", sa.String(length=300), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("batch_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_batch_runs_fhir_base"), ["fhir_base"], unique=False)
        batch_op.create_index(batch_op.f("ix_batch_runs_status"), ["status"], unique=False)

    op.create_table(
        "launch_states",
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("browser_session_hash", sa.String(length=64), nullable=False),
        sa.Column("iss", sa.String(length=500), nullable=False),
        sa.Column("code_verifier", sa.String(length=200), nullable=False),
        sa.Column("launch", sa.String(length=500), nullable=True),
        sa.Column("redirect_uri", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("state_hash"),
    )
    with op.batch_alter_table("launch_states", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_launch_states_expires_at"), ["expires_at"], unique=False)

    op.create_table(
        "rejections",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("document_reference", sa.String(length=200), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("who", sa.String(length=500), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rejections", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_rejections_document_reference"), ["document_reference"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_rejections_patient_id"), ["patient_id"], unique=False)

    op.create_table(
        "summaries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fhir_base", sa.String(length=500), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("encounter_id", sa.String(length=64), nullable=True),
        sa.Column("idempotency_key", sa.String(length=64), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("prompt_id", sa.String(length=100), nullable=False),
        sa.Column("prompt_version", sa.String(length=20), nullable=False),
        sa.Column("prompt_sha256", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("model_file", sa.String(length=300), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("sampling", sa.String(length=300), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("claims_kept", sa.Integer(), nullable=False),
        sa.Column("claims_dropped", sa.Integer(), nullable=False),
        sa.Column("seconds_fetch", sa.Float(), nullable=False),
        sa.Column("seconds_generate", sa.Float(), nullable=False),
        sa.Column("seconds_total", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("document_reference", sa.String(length=200), nullable=True),
        sa.Column("provenance", sa.String(length=200), nullable=True),
        sa.Column("device", sa.String(length=200), nullable=True),
        sa.Column("superseded", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key", "fhir_base", name="uq_summary_key_base"),
    )
    with op.batch_alter_table("summaries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_summaries_idempotency_key"), ["idempotency_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_summaries_patient_id"), ["patient_id"], unique=False)

    op.create_table(
        "batch_run_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=300), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("seconds_fetch", sa.Float(), nullable=False),
        sa.Column("seconds_generate", sa.Float(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cpu_seconds", sa.Float(), nullable=False),
        sa.Column("document_reference", sa.String(length=200), nullable=True),
        sa.Column("worker", sa.String(length=300), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["batch_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "patient_id", name="uq_batch_item_run_patient"),
    )
    with op.batch_alter_table("batch_run_items", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_batch_run_items_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_batch_run_items_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("batch_run_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_batch_run_items_state"))
        batch_op.drop_index(batch_op.f("ix_batch_run_items_run_id"))

    op.drop_table("batch_run_items")
    with op.batch_alter_table("summaries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_summaries_patient_id"))
        batch_op.drop_index(batch_op.f("ix_summaries_idempotency_key"))

    op.drop_table("summaries")
    with op.batch_alter_table("rejections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rejections_patient_id"))
        batch_op.drop_index(batch_op.f("ix_rejections_document_reference"))

    op.drop_table("rejections")
    with op.batch_alter_table("launch_states", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_launch_states_expires_at"))

    op.drop_table("launch_states")
    with op.batch_alter_table("batch_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_batch_runs_status"))
        batch_op.drop_index(batch_op.f("ix_batch_runs_fhir_base"))

    op.drop_table("batch_runs")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_patient_id"))
        batch_op.drop_index(batch_op.f("ix_audit_events_at"))

    op.drop_table("audit_events")
    with op.batch_alter_table("app_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_app_sessions_expires_at"))

    op.drop_table("app_sessions")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_prefix"))

    op.drop_table("api_keys")
