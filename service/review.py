"""One clinician review action, end to end: the FHIR write, the audit row, and the monitoring record.

- `approve`, `edit` (saves the clinician's text, then approves it), `reject` (entered-in-error; the
  optional reason goes to the `rejections` table, never to the EHR or a log) are the entries of
  `ACTIONS`, each a `ReviewAction`: one sequence that calls `fhir_adapters.write.send` and records one
  audit row per FHIR action: `ok`, `denied` (another patient's document, or not a chartbrief draft)
  or `error` (stale version, server failure).
- `regenerate` writes a fresh draft that supersedes the old one: the summary pipeline runs again with
  the sampling seed one above the old draft's. The seed is part of the idempotency key (through
  `ModelIdentity.sampling`), so the new draft gets a new key even when the record did not change.
  The old draft's seed is the `seed` of its summary row (`StoredSummary.seed`, recorded with every
  regenerated draft); a draft whose row has none (recorded before the column, or by another
  database) falls back to the seed named in its Provenance's sampling string (`seed_of`).

A DocumentReference that carries chartbrief's identifier is not trusted for that alone: every action
first checks, through `service.draft_origin`, that chartbrief wrote it (its Provenance, AI-Device, AIAST
labels and summary row) and that its stored statements still hold against the record. Every action
refuses a document that is not chartbrief's (`NotChartbriefDraft`, audited `denied`); approve and
edit also refuse a genuine draft with a statement whose cited source version is no longer in the
record (audited `denied`): it can still be rejected or regenerated.

The FHIR client in `Services` must be the one of the clinician's session (their token, their patient);
`db` is the database of the audit trail and monitoring. Its calls run in a worker thread (`in_thread`).
What this module must not do: decide who may act (the API checks the session first; the patient check
here is a second line), log clinical text or a reason, or swallow an error after auditing it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict

import structlog
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.errors import FhirError
from fhir_adapters.models import ModelIdentity
from fhir_adapters.write import send as fhir_write
from fhir_adapters.write.draft import version_of
from fhir_adapters.write.review import (
    NotChartbriefDraft,
    ReviewConflict,
    ReviewError,
    ReviewForbidden,
    ReviewNotFound,
    StaleDraft,
    sampling_of,
)
from service.db import audit
from service.db.store import in_thread
from service.draft_origin import DraftCheck, check_draft, check_origin, checked, fhir_base, recheck_claims
from service.governance import capture
from service.governance.monitor import EditSize
from service.llm.base import Engine, Generation, GenerationRequest
from service.llm.model_files import sampling_string
from service.pipeline import Services, SummaryResult, summarize_patient

_log = structlog.get_logger(__name__)

ReviewActionName = Literal["approve", "edit", "reject"]
Action = Literal[ReviewActionName, "regenerate"]
# A regenerate whose new seed lands on a draft that already exists (same key) tries the next seed.
REGENERATE_ATTEMPTS = 3
# A regenerated draft is sampled at least this warm, so a new seed gives a new text.
REGENERATE_TEMPERATURE = 0.7
_SEED = re.compile(r"\bseed=(\d+)\b")

__all__ = [
    "ACTIONS",
    "DraftCheck",
    "NotChartbriefDraft",
    "ReviewAction",
    "ReviewConflict",
    "ReviewError",
    "ReviewForbidden",
    "ReviewNotFound",
    "ReviewOutcome",
    "ReviewRequest",
    "StaleDraft",
    "approve",
    "check_draft",
    "check_origin",
    "edit",
    "recheck_claims",
    "regenerate",
    "reject",
    "reseeded",
    "seed_of",
]


@dataclass(frozen=True)
class ReviewOutcome:
    """Where the draft stands after an action (what the review screen shows next)."""

    action: Action
    document_reference: str  # "DocumentReference/<id>"
    version: str | None  # its versionId now
    status: str  # current | entered-in-error
    doc_status: str | None  # preliminary | final


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _outcome_of(action: Action, doc: dict[str, Any]) -> ReviewOutcome:
    doc_status = doc.get("docStatus")
    return ReviewOutcome(
        action=action,
        document_reference=f"DocumentReference/{doc.get('id')}",
        version=version_of(doc),
        status=str(doc.get("status")),
        doc_status=str(doc_status) if doc_status else None,
    )


def _failure(exc: Exception) -> tuple[audit.Outcome, str]:
    """How a failed action is audited: refused, or failed, and a fixed phrase (never a message)."""
    if isinstance(exc, ReviewForbidden):
        return "denied", "document of another patient"
    if isinstance(exc, NotChartbriefDraft):
        return "denied", "not a chartbrief draft"
    if isinstance(exc, StaleDraft):
        return "denied", "statements no longer supported by the record"
    if isinstance(exc, ReviewConflict):
        return "error", "stale version: the draft changed since it was opened"
    if isinstance(exc, ReviewNotFound):
        return "error", "not found"
    if isinstance(exc, ReviewError):
        return "denied", "refused: not a reviewable chartbrief draft in this state"
    if isinstance(exc, FhirError):
        return "error", f"FHIR server: {type(exc).__name__} {exc.status or ''}".strip()
    return "error", type(exc).__name__


def _monitor(
    svc: Services,
    db: sessionmaker[Session],
    action: ReviewActionName,
    doc: dict[str, Any],
    *,
    patient_id: str,
    actor: str,
    size: EditSize | None = None,
) -> None:
    """The monitoring row of an action that went through (`chartbrief monitor` reads them)."""
    capture.record_review(
        db,
        svc.store,
        fhir_base=fhir_base(svc),
        identifier_system=svc.settings.writer.identifier_system,
        action=action,
        doc=doc,
        patient_id=patient_id,
        who=actor,
        size=size,
    )


def _doc_ref(document_reference_id: str) -> str:
    tail = document_reference_id.split("/", 1)[1] if "/" in document_reference_id else document_reference_id
    return f"DocumentReference/{tail}"


@dataclass(frozen=True)
class ReviewRequest:
    """One clinician's action on one draft: who, on which document at which version, and what they sent."""

    document_reference_id: str
    patient_id: str
    actor: str
    version: str | None = None
    markdown: str | None = None  # edit: the clinician's text
    reason: str | None = None  # reject: kept for monitoring, never sent to the EHR or a log
    request_id: str | None = None
    encounter_id: str | None = None  # the session's focus: the record the draft is checked against


# The FHIR write of an action: (services, request, now as ISO 8601) -> the document as the server holds it.
FhirWrite = Callable[[Services, ReviewRequest, str], Awaitable[dict[str, Any]]]


class _WriteArgs(TypedDict):
    """What every FHIR review write is given besides its document and its clinician."""

    when: str
    version: str | None
    identifier_system: str
    patient_id: str


def _args(svc: Services, req: ReviewRequest, when: str) -> _WriteArgs:
    return {
        "when": when,
        "version": req.version,
        "identifier_system": svc.settings.writer.identifier_system,
        "patient_id": req.patient_id,
    }


async def _approve_write(svc: Services, req: ReviewRequest, when: str) -> dict[str, Any]:
    return await fhir_write.approve(
        svc.client, req.document_reference_id, verifier=req.actor, **_args(svc, req, when)
    )


async def _edit_write(svc: Services, req: ReviewRequest, when: str) -> dict[str, Any]:
    text = req.markdown or ""
    return await fhir_write.edit(
        svc.client, req.document_reference_id, markdown=text, editor=req.actor, **_args(svc, req, when)
    )


async def _reject_write(svc: Services, req: ReviewRequest, when: str) -> dict[str, Any]:
    return await fhir_write.reject(
        svc.client, req.document_reference_id, who=req.actor, **_args(svc, req, when)
    )


def _rejected_detail(_doc: dict[str, Any], req: ReviewRequest) -> str:
    return "entered-in-error" + (", reason recorded" if req.reason and req.reason.strip() else "")


@dataclass(frozen=True)
class ReviewAction:
    """One kind of review action: its FHIR write, its audit detail, and what it keeps for monitoring.

    Calling it runs the action end to end: the write inside an audited block (one row, `ok` or the
    failure's), then the monitoring records, then `then` (edit is followed by an approve of the
    version it wrote). A new action is one more instance, not another copy of this sequence.
    """

    name: ReviewActionName
    write: FhirWrite
    detail: Callable[[dict[str, Any], ReviewRequest], str]
    measures_edit: bool = False  # read the AI text first, keep the edit's size (never the text)
    keeps_reason: bool = False  # the optional reason goes to the rejections table
    needs_current: bool = False  # refused when a statement's cited source version left the record
    then: ReviewAction | None = None

    async def __call__(
        self,
        svc: Services,
        document_reference_id: str,
        *,
        patient_id: str,
        actor: str,
        db: sessionmaker[Session],
        version: str | None = None,
        markdown: str | None = None,
        reason: str | None = None,
        request_id: str | None = None,
        encounter_id: str | None = None,
    ) -> ReviewOutcome:
        req = ReviewRequest(
            document_reference_id=document_reference_id,
            patient_id=patient_id,
            actor=actor,
            version=version,
            markdown=markdown,
            reason=reason,
            request_id=request_id,
            encounter_id=encounter_id,
        )
        return await self.run(svc, req, db=db)

    async def run(
        self, svc: Services, req: ReviewRequest, *, db: sessionmaker[Session], checked: bool = False
    ) -> ReviewOutcome:
        """The action for `req`, audited in `db` (the API's database: audit, rejections, monitoring).

        `checked`: the draft was checked to be chartbrief's by the action this one follows (the
        approve after an edit acts on the version the edit itself wrote)."""
        before = (
            await capture.text_before_edit(svc.client, req.document_reference_id, req.patient_id)
            if self.measures_edit
            else None
        )
        async with audit.audited(
            db,
            actor=req.actor,
            action=self.name,
            failure=_failure,
            patient_id=req.patient_id,
            resource=_doc_ref(req.document_reference_id),
            request_id=req.request_id,
        ) as entry:
            if not checked:
                await self._check(svc, req)
            doc = await self.write(svc, req, _now_iso())
            entry.detail = self.detail(doc, req)
        result = _outcome_of(self.name, doc)
        if self.keeps_reason:
            await in_thread(
                audit.record_rejection,
                db,
                document_reference=result.document_reference,
                patient_id=req.patient_id,
                who=req.actor,
                reason=req.reason,
            )
        size = capture.size_of_edit(before, req.markdown or "") if self.measures_edit else None
        await in_thread(
            _monitor, svc, db, self.name, doc, patient_id=req.patient_id, actor=req.actor, size=size
        )
        if self.then is not None:
            return await self.then.run(svc, replace(req, version=version_of(doc)), db=db, checked=True)
        return result

    async def _check(self, svc: Services, req: ReviewRequest) -> None:
        found = await checked(
            svc,
            req.document_reference_id,
            req.patient_id,
            encounter_id=req.encounter_id,
            action=self.name,
            version=req.version,
        )
        if self.needs_current and found.stale:
            raise StaleDraft(
                f"{_doc_ref(req.document_reference_id)}: {len(found.stale)} statement(s) cite a source "
                "version no longer in the record; regenerate the draft or reject it"
            )


approve = ReviewAction(
    "approve",
    _approve_write,
    detail=lambda doc, _req: f"final at version {version_of(doc)}",
    needs_current=True,
)
"""The clinician `actor` (fhirUser) approves the draft they reviewed at `version`."""

edit = ReviewAction(
    "edit",
    _edit_write,
    detail=lambda doc, _req: f"saved as version {version_of(doc)}",
    measures_edit=True,
    needs_current=True,
    then=approve,
)
"""Save the clinician's `markdown` as a new version (a Provenance says a person changed it), then approve
that version. Two audit rows: `edit` and `approve`."""

reject = ReviewAction("reject", _reject_write, detail=_rejected_detail, keeps_reason=True)
"""Mark the draft entered-in-error; keep the optional `reason` for monitoring (DB only)."""

ACTIONS: dict[ReviewActionName, ReviewAction] = {a.name: a for a in (approve, edit, reject)}


# -- regenerate ------------------------------------------------------------------------------------------


def seed_of(sampling: str | None) -> int | None:
    """The seed named in a sampling string: for drafts whose summary row carries no seed.

    >>> seed_of("temperature=0.0 top_p=1.0 seed=42 n_ctx=2048")
    42
    >>> seed_of("temperature=0.0") is None
    True
    """
    match = _SEED.search(sampling or "")
    return int(match.group(1)) if match else None


class _ReseededEngine:
    """The shared engine, presented with another seed: requests carry it (from the settings) and the
    identity names it, so the idempotency key changes. It does not own the engine it wraps."""

    def __init__(self, engine: Engine, sampling: str) -> None:
        self._engine = engine
        self._identity: ModelIdentity = replace(engine.identity, sampling=sampling)

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def n_ctx(self) -> int:
        return self._engine.n_ctx

    def count_tokens(self, text: str) -> int:
        return self._engine.count_tokens(text)

    async def generate(self, request: GenerationRequest) -> Generation:
        return await self._engine.generate(request)

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        return self._engine.stream(request)

    async def aclose(self) -> None:
        # The wrapped engine belongs to the process, not to this one regeneration.
        return None


def reseeded(svc: Services, seed: int) -> Services:
    """`svc` with the sampling seed set to `seed`, for the settings (what the request carries and the
    summary row records, what the next regenerate reads) and the engine identity (what the
    idempotency key and the Provenance record)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    # Greedy decoding (temperature 0) ignores the seed: a regenerated draft samples.
    temperature = max(svc.settings.llm.temperature, REGENERATE_TEMPERATURE)
    llm = svc.settings.llm.model_copy(update={"seed": seed, "temperature": temperature})
    settings = svc.settings.model_copy(update={"llm": llm})
    engine = _ReseededEngine(svc.engine, sampling_string(llm))
    return replace(svc, settings=settings, engine=engine)


async def previous_seed(svc: Services, document_reference_id: str, *, patient_id: str) -> int:
    """The seed the previous draft was written with: the `seed` of its summary row; for a row without
    one, the seed its Provenance's sampling string names; else the configured seed."""
    doc, key = await fhir_write.read_draft(
        svc.client,
        document_reference_id,
        identifier_system=svc.settings.writer.identifier_system,
        patient_id=patient_id,
    )
    row = await in_thread(svc.store.find, fhir_base(svc), key)
    if row is not None and row.seed is not None:
        return row.seed
    try:
        provenance = await fhir_write.read_provenance(svc.client, str(doc["id"]), key)
    except ReviewNotFound:
        return svc.settings.llm.seed
    seed = seed_of(sampling_of(provenance))
    return seed if seed is not None else svc.settings.llm.seed


async def regenerate(
    svc: Services,
    patient_id: str,
    *,
    encounter_id: str | None = None,
    previous_doc: str,
    actor: str = "system",
    request_id: str | None = None,
    db: sessionmaker[Session],
) -> SummaryResult:
    """A fresh draft for the patient that supersedes `previous_doc` (an id or `DocumentReference/id`).

    The writer supersedes the newest current, unapproved draft of the same focus, which is the previous
    one when the clinician regenerates what they are looking at. With temperature 0 (the default) a new
    seed does not change the model's text: the fresh draft then differs only if the record changed.
    """
    previous = _doc_ref(previous_doc)
    async with audit.audited(
        db,
        actor=actor,
        action="regenerate",
        failure=_failure,
        patient_id=patient_id,
        resource=previous,
        request_id=request_id,
    ) as entry:
        await checked(svc, previous_doc, patient_id, encounter_id=encounter_id, action="regenerated")
        seed = await previous_seed(svc, previous_doc, patient_id=patient_id)
        result: SummaryResult | None = None
        for step in range(1, REGENERATE_ATTEMPTS + 1):
            result = await summarize_patient(
                reseeded(svc, seed + step), patient_id, encounter_id=encounter_id
            )
            if result.write is not None and result.write.created:
                break
            _log.info("review.regenerate_exists", attempt=step, document_reference=previous)
        assert result is not None  # the loop runs at least once
        entry.detail = _regenerated_detail(result)
    return result


def _regenerated_detail(result: SummaryResult) -> str:
    write = result.write
    new_ref = write.document_reference if write else "none"
    if write is not None and write.created:
        superseded = f", supersedes {write.superseded}" if write.superseded else ""
        return f"new draft {new_ref}{superseded}"
    return f"no new draft: {new_ref} already holds it"
