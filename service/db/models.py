"""Tables. One row per summary: what it read, with which prompt and model, what it cost, what it wrote.

No PHI is stored in the summary table: resource ids and versions, hashes, counts and timings only. The
review tables at the end hold one exception, said where it is: a rejection's optional free-text reason.
Review outcomes keep edit sizes, never text.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def _uuid() -> str:
    return str(uuid.uuid4())


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class SummaryRow(Base):
    __tablename__ = "summaries"
    __table_args__ = (UniqueConstraint("idempotency_key", "fhir_base", name="uq_summary_key_base"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    fhir_base: Mapped[str] = mapped_column(String(500))
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    encounter_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    idempotency_key: Mapped[str] = mapped_column(String(64), index=True)
    inputs: Mapped[list[str]] = mapped_column(JSON)  # versioned refs read
    prompt_id: Mapped[str] = mapped_column(String(100))
    prompt_version: Mapped[str] = mapped_column(String(20))
    prompt_sha256: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(200))
    model_file: Mapped[str] = mapped_column(String(300))
    model_sha256: Mapped[str] = mapped_column(String(64))
    sampling: Mapped[str] = mapped_column(String(300))
    # The sampling seed the summary was generated with, as a number (regenerate reads it); None on
    # rows recorded without one.
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    claims_kept: Mapped[int] = mapped_column(Integer, default=0)
    claims_dropped: Mapped[int] = mapped_column(Integer, default=0)
    seconds_fetch: Mapped[float] = mapped_column(Float, default=0.0)
    seconds_generate: Mapped[float] = mapped_column(Float, default=0.0)
    seconds_total: Mapped[float] = mapped_column(Float, default=0.0)
    outcome: Mapped[str] = mapped_column(String(20))  # written | unchanged | dry-run
    document_reference: Mapped[str | None] = mapped_column(String(200), nullable=True)
    provenance: Mapped[str | None] = mapped_column(String(200), nullable=True)
    device: Mapped[str | None] = mapped_column(String(200), nullable=True)
    superseded: Mapped[str | None] = mapped_column(String(200), nullable=True)


# -- review, SMART launch and API access (security-relevant tables) ------------------------------------
#
# Secrets are never stored in the clear: launch `state`, app-session ids and API-key secrets are kept
# as sha256 hashes; OAuth tokens are kept Fernet-encrypted. Audit rows carry ids, never PHI content.


class LaunchState(Base):
    """One SMART authorize round trip in flight: single use, expiring, bound to a browser session."""

    __tablename__ = "launch_states"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the raw state
    browser_session_hash: Mapped[str] = mapped_column(String(64))
    iss: Mapped[str] = mapped_column(String(500))
    code_verifier: Mapped[str] = mapped_column(String(200))
    launch: Mapped[str | None] = mapped_column(String(500), nullable=True)
    redirect_uri: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class CdsTokenId(Base):
    """A CDS client's JWT id already used, kept until the token expires: a replay is refused by every
    process that shares this database."""

    __tablename__ = "cds_token_ids"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of issuer and jti
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class AppSession(Base):
    """A clinician's session after a SMART launch; tokens stay here, encrypted, never in the browser."""

    __tablename__ = "app_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the cookie value
    browser_session_hash: Mapped[str] = mapped_column(String(64))
    iss: Mapped[str] = mapped_column(String(500))
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    encounter_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    fhir_user: Mapped[str | None] = mapped_column(String(500), nullable=True)
    scope: Mapped[str] = mapped_column(Text)
    need_patient_banner: Mapped[bool] = mapped_column(Boolean, default=True)
    token_set_encrypted: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AuditEvent(Base):
    """Who did what to which resource of which patient, and how it ended. No PHI content."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    actor: Mapped[str] = mapped_column(String(500))  # fhirUser reference, "apikey:<id>", "system"
    action: Mapped[str] = mapped_column(String(50))  # approve | edit | reject | regenerate | read ...
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    resource: Mapped[str | None] = mapped_column(String(200), nullable=True)  # "DocumentReference/x"
    outcome: Mapped[str] = mapped_column(String(10))  # ok | denied | error
    detail: Mapped[str | None] = mapped_column(String(200), nullable=True)  # short, fixed phrases only
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Rejection(Base):
    """A clinician's rejection of a draft, with the optional reason: a monitoring signal, never logged."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    document_reference: Mapped[str] = mapped_column(String(200), index=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # clinician free text (may hold PHI)
    who: Mapped[str] = mapped_column(String(500))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ReviewOutcomeRow(Base):
    """One review action (approve, edit, reject) kept for monitoring, tied to the summary it judged.

    Sizes only: how many words and characters a clinician's edit changed, never the draft's or the
    clinician's text. `draft_created_at` is the draft's DocumentReference.date, for time to review.
    """

    __tablename__ = "review_outcomes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    action: Mapped[str] = mapped_column(String(20))  # approve | edit | reject
    document_reference: Mapped[str] = mapped_column(String(200), index=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    who: Mapped[str] = mapped_column(String(500))
    summary_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)  # summaries.id
    draft_created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    words_changed: Mapped[int | None] = mapped_column(Integer, nullable=True)  # edit only
    chars_changed: Mapped[int | None] = mapped_column(Integer, nullable=True)  # edit only
    draft_words: Mapped[int | None] = mapped_column(Integer, nullable=True)  # edit only: the AI text's size
    # CDS card feedback only: the override reason codes the EHR sent (codes, never a user comment)
    override_reasons: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class ApiKey(Base):
    """A static API key for a service account; only the sha256 of its secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(8), index=True)  # first 8 characters, for lookup
    scopes: Mapped[list[str]] = mapped_column(JSON)
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # key limited to one patient
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
