"""The audit trail of review actions and access decisions, and the rejection reasons kept for monitoring.

An audit row says who (a fhirUser reference, `apikey:<id>`, `system`), when, what action, on which
resource of which patient, and whether it went through (`ok`), was refused (`denied`) or failed
(`error`). `detail` is a short fixed phrase chosen by the caller ("version 3 -> 4", "stale version"),
never clinical text: the audit table must be safe to hand to a security reviewer.

A rejection's reason is clinician free text and may name the patient: it lives in its own table,
read only by monitoring, and is never logged or copied into an audit row.

`audited` is the one way an action is audited from async code: the block's success writes an `ok`
row with the detail the block set, and a failure writes the row its `failure` rule chooses (or none)
before the error goes on; the write runs in a worker thread (`service.db.store.in_thread`).

What this module must not do: log a reason, accept an unknown outcome, or let a long free text slip
into `detail`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, get_args

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import AuditEvent, Rejection
from service.db.store import in_thread

_log = structlog.get_logger(__name__)

Outcome = Literal["ok", "denied", "error"]
OUTCOMES: frozenset[str] = frozenset(get_args(Outcome))
MAX_DETAIL_CHARS = 200
MAX_REASON_CHARS = 4000
_ACTION = re.compile(r"[a-z][a-z0-9._-]{0,49}")


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    action: str
    patient_id: str | None
    resource: str | None
    outcome: str
    detail: str | None
    request_id: str | None


@dataclass(frozen=True)
class RejectionRecord:
    id: int
    document_reference: str
    patient_id: str
    who: str
    at: datetime
    reason: str | None  # clinician free text: show to monitoring staff, never log


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def short_detail(detail: str | None) -> str | None:
    """`detail` on one line and at most MAX_DETAIL_CHARS characters.

    >>> short_detail("a\\nb")
    'a b'
    >>> len(short_detail("x" * 500) or "")
    200
    """
    if detail is None:
        return None
    one_line = " ".join(detail.split())
    return one_line[:MAX_DETAIL_CHARS] or None


def record(
    db: sessionmaker[Session],
    *,
    actor: str,
    action: str,
    outcome: Outcome,
    patient_id: str | None = None,
    resource: str | None = None,
    detail: str | None = None,
    request_id: str | None = None,
    at: datetime | None = None,
) -> int:
    """Append one audit row and return its id."""
    if outcome not in OUTCOMES:
        raise ValueError(f"audit outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")
    if not _ACTION.fullmatch(action):
        raise ValueError(f"audit action must be a short lowercase word (e.g. 'approve'), got {action!r}")
    if not actor or not actor.strip():
        raise ValueError("audit actor is empty: name who acted (fhirUser, apikey:<id> or system)")
    row = AuditEvent(
        at=at or datetime.now(UTC),
        actor=actor.strip()[:500],
        action=action,
        patient_id=patient_id,
        resource=resource,
        outcome=outcome,
        detail=short_detail(detail),
        request_id=request_id[:64] if request_id else None,
    )
    with db.begin() as s:
        s.add(row)
        s.flush()
        row_id = int(row.id)
    _log.info(
        "audit.recorded",
        action=action,
        outcome=outcome,
        patient_id=patient_id,
        resource=resource,
        audit_id=row_id,
    )
    return row_id


@dataclass
class AuditEntry:
    """The row an `audited` block writes when it succeeds: the block says what went through."""

    detail: str | None = None


# How a failure is audited: (outcome, fixed phrase), or None when it is not this trail's to record.
FailureRule = Callable[[Exception], tuple[Outcome, str] | None]


@asynccontextmanager
async def audited(
    db: sessionmaker[Session],
    *,
    actor: str,
    action: str,
    failure: FailureRule,
    patient_id: str | None = None,
    resource: str | None = None,
    request_id: str | None = None,
) -> AsyncIterator[AuditEntry]:
    """Audit the block: `ok` with the entry's detail when it succeeds, `failure(exc)` when it raises.

    The error is always raised again: auditing a failure never swallows it.
    """
    entry = AuditEntry()

    async def write(outcome: Outcome, detail: str | None) -> None:
        await in_thread(
            record,
            db,
            actor=actor,
            action=action,
            outcome=outcome,
            patient_id=patient_id,
            resource=resource,
            detail=detail,
            request_id=request_id,
        )

    try:
        yield entry
    except Exception as exc:
        verdict = failure(exc)
        if verdict is not None:
            await write(*verdict)
        raise
    await write("ok", entry.detail)


def _to_record(row: AuditEvent) -> AuditRecord:
    return AuditRecord(
        id=row.id,
        at=_aware(row.at),
        actor=row.actor,
        action=row.action,
        patient_id=row.patient_id,
        resource=row.resource,
        outcome=row.outcome,
        detail=row.detail,
        request_id=row.request_id,
    )


def list_for_patient(db: sessionmaker[Session], patient_id: str, *, limit: int = 100) -> list[AuditRecord]:
    """The patient's audit rows, newest first."""
    with db() as s:
        rows = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.patient_id == patient_id)
            .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
            .limit(max(1, limit))
        ).all()
        return [_to_record(r) for r in rows]


def record_rejection(
    db: sessionmaker[Session],
    *,
    document_reference: str,
    patient_id: str,
    who: str,
    reason: str | None,
    at: datetime | None = None,
) -> int:
    """Keep a rejection and its optional reason (trimmed, capped) for monitoring; returns its id."""
    text = reason.strip()[:MAX_REASON_CHARS] if reason else None
    row = Rejection(
        document_reference=document_reference,
        patient_id=patient_id,
        reason=text or None,
        who=who,
        at=at or datetime.now(UTC),
    )
    with db.begin() as s:
        s.add(row)
        s.flush()
        row_id = int(row.id)
    # The reason itself stays out of the log: only whether one was given.
    _log.info("rejection.recorded", document_reference=document_reference, with_reason=bool(text))
    return row_id


def rejections(
    db: sessionmaker[Session], *, patient_id: str | None = None, since: datetime | None = None
) -> list[RejectionRecord]:
    """Rejections, newest first, optionally of one patient and/or since an instant (monitoring)."""
    query = select(Rejection)
    if patient_id is not None:
        query = query.where(Rejection.patient_id == patient_id)
    if since is not None:
        query = query.where(Rejection.at >= since)
    with db() as s:
        rows = s.scalars(query.order_by(Rejection.at.desc(), Rejection.id.desc())).all()
        return [
            RejectionRecord(
                id=r.id,
                document_reference=r.document_reference,
                patient_id=r.patient_id,
                who=r.who,
                at=_aware(r.at),
                reason=r.reason,
            )
            for r in rows
        ]
