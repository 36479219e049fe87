"""Recording a review action for monitoring, at the point where it happens (service.review).

It links the action to the summary row it judged (through the draft's idempotency identifier), keeps the
draft's creation instant for time to review, and for an edit the size of the change (words and
characters, computed by `service.governance.monitor.edit_size`). The texts compared are read, measured and
dropped: only the sizes are stored, nothing is logged but ids and counts.

What it must not do: fail a review the clinician made because the AI text could not be read back (the
size is then simply unknown), or keep any text.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

import structlog
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.errors import FhirError
from service.db.store import SummaryStore
from service.governance.monitor import EditSize, edit_size
from service.governance.records import ReviewAction, record_outcome

_log = structlog.get_logger(__name__)


class _Reader(Protocol):
    async def read(self, resource_type: str, id: str) -> dict[str, Any]: ...


def draft_markdown(doc: Mapping[str, Any]) -> str | None:
    """The markdown attachment's text of a chartbrief DocumentReference (None when there is none).

    >>> draft_markdown({"content": [{"attachment": {"contentType": "text/markdown", "data": "SGk="}}]})
    'Hi'
    """
    for content in doc.get("content") or []:
        attachment = content.get("attachment") if isinstance(content, dict) else None
        if not isinstance(attachment, dict):
            continue
        if str(attachment.get("contentType", "")).startswith("text/markdown") and attachment.get("data"):
            try:
                return base64.b64decode(str(attachment["data"]), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
    return None


def draft_created(doc: Mapping[str, Any]) -> datetime | None:
    """DocumentReference.date (the writer sets it to the draft's creation), as an aware datetime."""
    value = doc.get("date")
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


async def text_before_edit(client: _Reader, document_reference_id: str, patient_id: str) -> str | None:
    """The draft's current text, read just before a clinician's edit replaces it; None if unreadable or
    not a document of `patient_id` (the edit itself then refuses it and says why)."""
    doc_id = document_reference_id.removeprefix("DocumentReference/")
    try:
        doc = await client.read("DocumentReference", doc_id)
    except (FhirError, ValueError) as exc:
        # The edit reads the draft again and reports any real problem; monitoring just loses the size.
        _log.info("review_outcome.draft_unreadable", document_reference=doc_id, error=type(exc).__name__)
        return None
    if (doc.get("subject") or {}).get("reference") != f"Patient/{patient_id}":
        return None
    return draft_markdown(doc)


def size_of_edit(before: str | None, after: str) -> EditSize | None:
    return edit_size(before, after) if before is not None else None


def _summary_id(
    store: SummaryStore, fhir_base: str | None, doc: Mapping[str, Any], system: str
) -> str | None:
    keys = [
        str(i.get("value"))
        for i in doc.get("identifier") or []
        if isinstance(i, dict) and i.get("system") == system and i.get("value")
    ]
    if not keys or not fhir_base:
        return None
    row = store.find(fhir_base, keys[0])
    return row.id if row is not None else None


def record_review(
    db: sessionmaker[Session],
    store: SummaryStore,
    *,
    fhir_base: str | None,
    identifier_system: str,
    action: ReviewAction,
    doc: Mapping[str, Any],
    patient_id: str,
    who: str,
    size: EditSize | None = None,
) -> int:
    """One monitoring row for an action that went through on `doc` (the document as the server holds it)."""
    return record_outcome(
        db,
        action=action,
        document_reference=f"DocumentReference/{doc.get('id')}",
        patient_id=patient_id,
        who=who,
        summary_id=_summary_id(store, fhir_base, doc, identifier_system),
        draft_created_at=draft_created(doc),
        words_changed=size.words_changed if size else None,
        chars_changed=size.chars_changed if size else None,
        draft_words=size.draft_words if size else None,
    )
