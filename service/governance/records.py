"""The monitoring record of review actions: written where an action happens, read by `chartbrief monitor`.

A row says which summary a clinician approved, edited or rejected, when, and for an edit how many words
and characters changed. It never holds the draft's or the clinician's text (only sizes), and nothing
here logs a patient detail: ids and counts only. Rejection reasons stay in `rejections` (service.db.audit).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, get_args

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import ReviewOutcomeRow, SummaryRow

_log = structlog.get_logger(__name__)

ReviewAction = Literal["approve", "edit", "reject"]
REVIEW_ACTIONS: frozenset[str] = frozenset(get_args(ReviewAction))


@dataclass(frozen=True)
class ReviewOutcomeRecord:
    id: int
    at: datetime
    action: str
    document_reference: str
    patient_id: str
    summary_id: str | None
    draft_created_at: datetime | None
    words_changed: int | None
    chars_changed: int | None
    draft_words: int | None
    who: str = ""  # for CDS card feedback: `cds:<iss>`
    override_reasons: tuple[str, ...] = ()  # CDS card feedback: the override reason codes


@dataclass(frozen=True)
class SummaryRecord:
    """What monitoring and recall need of a summary row (no PHI: ids, hashes, instants)."""

    id: str
    created_at: datetime
    fhir_base: str
    patient_id: str
    document_reference: str | None
    superseded: str | None
    outcome: str
    model_name: str
    model_sha256: str
    prompt_id: str
    prompt_version: str


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes for timezone-aware columns: they were stored as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def record_outcome(
    db: sessionmaker[Session],
    *,
    action: ReviewAction,
    document_reference: str,
    patient_id: str,
    who: str,
    summary_id: str | None,
    draft_created_at: datetime | None,
    words_changed: int | None = None,
    chars_changed: int | None = None,
    draft_words: int | None = None,
    at: datetime | None = None,
) -> int:
    """Append one review outcome and return its id."""
    if action not in REVIEW_ACTIONS:
        raise ValueError(f"review action must be one of {sorted(REVIEW_ACTIONS)}, got {action!r}")
    row = ReviewOutcomeRow(
        at=at or datetime.now(UTC),
        action=action,
        document_reference=document_reference,
        patient_id=patient_id,
        who=who[:500],
        summary_id=summary_id,
        draft_created_at=draft_created_at,
        words_changed=words_changed,
        chars_changed=chars_changed,
        draft_words=draft_words,
    )
    with db.begin() as s:
        s.add(row)
        s.flush()
        row_id = int(row.id)
    _log.info(
        "review_outcome.recorded",
        action=action,
        document_reference=document_reference,
        summary_id=summary_id,
        words_changed=words_changed,
    )
    return row_id


def review_outcomes(db: sessionmaker[Session]) -> list[ReviewOutcomeRecord]:
    """Every recorded review outcome, oldest first."""
    with db() as s:
        rows = s.scalars(select(ReviewOutcomeRow).order_by(ReviewOutcomeRow.at, ReviewOutcomeRow.id)).all()
        return [
            ReviewOutcomeRecord(
                id=r.id,
                at=aware(r.at),
                action=r.action,
                document_reference=r.document_reference,
                patient_id=r.patient_id,
                summary_id=r.summary_id,
                draft_created_at=aware(r.draft_created_at) if r.draft_created_at else None,
                words_changed=r.words_changed,
                chars_changed=r.chars_changed,
                draft_words=r.draft_words,
                who=r.who,
                override_reasons=tuple(r.override_reasons or ()),
            )
            for r in rows
        ]


def summaries(db: sessionmaker[Session]) -> list[SummaryRecord]:
    """Every summary row, oldest first."""
    with db() as s:
        rows = s.scalars(select(SummaryRow).order_by(SummaryRow.created_at, SummaryRow.id)).all()
        return [
            SummaryRecord(
                id=r.id,
                created_at=aware(r.created_at),
                fhir_base=r.fhir_base,
                patient_id=r.patient_id,
                document_reference=r.document_reference,
                superseded=r.superseded,
                outcome=r.outcome,
                model_name=r.model_name,
                model_sha256=r.model_sha256,
                prompt_id=r.prompt_id,
                prompt_version=r.prompt_version,
            )
            for r in rows
        ]


CDS_OUTCOMES: dict[str, str] = {"accepted": "cds_accepted", "overridden": "cds_overridden"}


def record_cds_feedback(
    db: sessionmaker[Session],
    *,
    outcome: str,
    summary_id: str | None,
    who: str,
    reasons: list[str] | None = None,
    at: datetime | None = None,
) -> int:
    """Append a CDS Hooks card outcome (accepted / overridden, with the override reason codes)
    next to the review outcomes; the summary row names the document and the patient."""
    action = CDS_OUTCOMES.get(outcome)
    if action is None:
        raise ValueError(f"feedback outcome must be one of {sorted(CDS_OUTCOMES)}, got {outcome!r}")
    with db.begin() as s:
        summary = s.get(SummaryRow, summary_id) if summary_id else None
        row = ReviewOutcomeRow(
            at=at or datetime.now(UTC),
            action=action,
            document_reference=(summary.document_reference or "") if summary else "",
            patient_id=summary.patient_id if summary else "",
            who=who[:500],
            override_reasons=[r[:200] for r in reasons or () if r] or None,
            summary_id=summary.id if summary else None,
            draft_created_at=None,
        )
        s.add(row)
        s.flush()
        row_id = int(row.id)
    _log.info("cds_feedback.recorded", outcome=outcome, summary_id=row.summary_id)
    return row_id
