"""A clinician's verdict on an AI draft, written to the EHR: approve, edit, reject.

What each action writes (STANDARDS.md "Writing the summary back", AI Transparency IG):

- **approve**: the DocumentReference becomes `docStatus=final` and its `author` gains the clinician
  (the AI Device stays); the draft's AI-Provenance (id `draft.provenance_id(key)`) gains an agent of
  type `verifier`. Both are PUT in ONE transaction, each guarded by If-Match.
- **edit**: a new version of the DocumentReference holding the clinician's markdown (an extension and
  the description say a person changed the AI text), plus a NEW Provenance: target the new version,
  activity UPDATE, agent author = the clinician, entity role `revision` = the previous version.
  The draft stays preliminary: approval is a separate, explicit step.
- **reject**: `status=entered-in-error` (If-Match), plus a Provenance with activity NULLIFY naming who
  did it. The clinician's reason is NOT written to the EHR; the service layer keeps it for monitoring.

Only chartbrief drafts (an identifier in the configured system) may be acted on, and only by a
Practitioner or PractitionerRole (the SMART `fhirUser`). A write refused because the draft changed
since the clinician opened it raises `ReviewConflict`.

```
ReviewError               not a chartbrief draft, wrong state, bad verifier / text / time
├── ReviewNotFound        no such DocumentReference (or its Provenance is gone)
├── ReviewForbidden       the draft belongs to another patient than the session's
├── ReviewConflict        the draft changed since it was opened (version mismatch, 409/412)
├── StaleDraft            chartbrief's draft, but a statement's cited source version left the record
└── NotChartbriefDraft    it carries chartbrief's identifier, but its Provenance, Device or AIAST
                          label do not show that chartbrief wrote it (`origin_problems`)
```

An identifier is only a claim: anyone who may create a DocumentReference can give it chartbrief's
system. A draft is chartbrief's when `origin_problems` finds nothing wrong: the document carries the
AIAST label; the Provenance with the id chartbrief gives it (`draft.provenance_id(key)`) is labelled,
targets this document and has as author agent an AI-Device labelled AIAST whose model-sha256
identifier is the model the summary was made with.

Other `FhirError`s (transport, auth, 5xx) pass through unchanged. Everything here is pure: the
checks and the builders; `approve`, `edit` and `reject` in `fhir_adapters.write.send` are the IO.
What this module must not do: put the clinician's reason in a resource, or build a write for a
resource that chartbrief did not write.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from fhir_adapters.errors import ChartbriefError
from fhir_adapters.write.draft import (
    AIAST,
    MARKDOWN,
    MODEL_IDENTIFIER_SYSTEM,
    PARTICIPANT_AUTHOR,
    SAMPLING_EXTENSION_URL,
    for_update,
    version_of,
)

JsonObject = dict[str, Any]

PARTICIPANT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
PARTICIPANT_VERIFIER = {"system": PARTICIPANT_TYPE_SYSTEM, "code": "verifier", "display": "Verifier"}
PARTICIPANT_PERFORMER = {"system": PARTICIPANT_TYPE_SYSTEM, "code": "performer", "display": "Performer"}
DATA_OPERATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
DATA_OPERATION_UPDATE = {"system": DATA_OPERATION_SYSTEM, "code": "UPDATE", "display": "revise"}
DATA_OPERATION_NULLIFY = {"system": DATA_OPERATION_SYSTEM, "code": "NULLIFY", "display": "nullify"}

EDITED_BY_URL = "urn:chartbrief:edited-by"
EDITED_TITLE = "Clinical summary (AI draft, edited by a clinician)"
EDITED_DESCRIPTION = (
    "AI-generated draft summary (chartbrief), edited by a clinician. Preliminary until a clinician "
    "approves it."
)
APPROVED_DESCRIPTION = (
    "AI-generated summary (chartbrief), reviewed and approved by a clinician; every statement cites "
    "its sources."
)
APPROVED_EDITED_DESCRIPTION = (
    "AI-generated summary (chartbrief), edited, reviewed and approved by a clinician."
)
REJECTED_DESCRIPTION = "AI-generated draft summary (chartbrief), rejected by a clinician: not for use."

# Who may review: the SMART fhirUser of a clinician, relative (`Practitioner/1`) or absolute.
REVIEWER_TYPES = ("Practitioner", "PractitionerRole")
_REVIEWER = re.compile(r"^(?:https?://[^\s]+/)?(Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}$")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# The clinician's text is stored as one attachment; far larger than any summary means a mistake.
MAX_MARKDOWN_CHARS = 100_000
REVIEW_PROVENANCE_HEX = 40


class ReviewError(ChartbriefError):
    """The action cannot be done on this resource; the message says why, for a person (no PHI)."""


class ReviewNotFound(ReviewError):
    """The DocumentReference (or its Provenance) does not exist on the server."""


class ReviewForbidden(ReviewError):
    """The draft is another patient's than the one the caller is allowed to act for."""


class ReviewConflict(ReviewError):
    """The draft changed on the server since the clinician opened it."""

    def __init__(self, document_reference: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"{document_reference}: the draft changed since you opened it; reload it and review again"
        )
        self.document_reference = document_reference


class NotChartbriefDraft(ReviewError):
    """The DocumentReference names chartbrief's identifier system, but chartbrief did not write it
    (or it was changed since): it is never shown as a draft nor acted on."""


class StaleDraft(ReviewError):
    """A genuine draft with a statement whose cited source version is no longer in the record: it
    may be rejected or regenerated, not approved as it stands."""


# -- checks (pure) -------------------------------------------------------------------------------------


def check_reviewer(reference: str, field: str = "verifier") -> str:
    """A clinician's reference as given, or ReviewError naming the field.

    >>> check_reviewer("Practitioner/dr-1")
    'Practitioner/dr-1'
    >>> check_reviewer("https://ehr.example/fhir/PractitionerRole/7")
    'https://ehr.example/fhir/PractitionerRole/7'
    """
    if not isinstance(reference, str) or not _REVIEWER.match(reference.strip()):
        kind = reference.split("/")[-2] if isinstance(reference, str) and "/" in reference else "?"
        raise ReviewError(
            f"{field} must be a Practitioner or PractitionerRole reference (the SMART fhirUser), "
            f"got a {kind!s} reference"
        )
    return reference.strip()


def check_when(when: str) -> str:
    """An ISO 8601 instant with a time zone (what Provenance.recorded needs), or ReviewError."""
    try:
        parsed = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except (AttributeError, ValueError) as exc:
        raise ReviewError(f"when must be an ISO 8601 instant, got {when!r}") from exc
    if parsed.tzinfo is None:
        raise ReviewError(f"when must carry a time zone, got {when!r}")
    return when


def check_id(value: str, field: str = "document_reference_id") -> str:
    """A FHIR id; `DocumentReference/x` is accepted for `x`.

    >>> check_id("DocumentReference/abc-1")
    'abc-1'
    >>> check_id("abc-1\\n")
    Traceback (most recent call last):
    ...
    fhir_adapters.write.review.ReviewError: document_reference_id 'abc-1\\n' is not a valid FHIR id
    """
    if isinstance(value, str) and value.startswith("DocumentReference/"):
        value = value.split("/", 1)[1]
    if not isinstance(value, str) or not _FHIR_ID.fullmatch(value):
        raise ReviewError(f"{field} {value!r} is not a valid FHIR id")
    return value


def draft_key(doc: JsonObject, identifier_system: str) -> str:
    """The idempotency key of a chartbrief draft (its identifier value); ReviewError for anything else."""
    if doc.get("resourceType") != "DocumentReference":
        raise ReviewError(f"{doc.get('resourceType')!r} is not a DocumentReference")
    for ident in doc.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == identifier_system:
            value = ident.get("value")
            if isinstance(value, str) and value:
                return value
    raise ReviewError(
        f"DocumentReference/{doc.get('id')} was not written by chartbrief (no identifier in "
        f"{identifier_system}): only chartbrief drafts can be reviewed here"
    )


def check_patient(doc: JsonObject, patient_id: str | None) -> None:
    """ReviewForbidden unless the document's subject is `Patient/{patient_id}` (None: no check)."""
    if patient_id is None:
        return
    subject = (doc.get("subject") or {}).get("reference")
    if subject != f"Patient/{patient_id}":
        raise ReviewForbidden(
            f"DocumentReference/{doc.get('id')} is not a document of the patient in this session"
        )


def references(resource: JsonObject, element: str) -> list[str]:
    """`element[].reference` values (author of a DocumentReference, ...)."""
    return [
        str(item["reference"])
        for item in resource.get(element) or []
        if isinstance(item, dict) and isinstance(item.get("reference"), str)
    ]


def agents_of_type(provenance: JsonObject, code: str) -> list[str]:
    """`who.reference` of every agent whose type has `code` in provenance-participant-type."""
    found: list[str] = []
    for agent in provenance.get("agent") or []:
        if not isinstance(agent, dict):
            continue
        codings = (agent.get("type") or {}).get("coding") or []
        if any(c.get("system") == PARTICIPANT_TYPE_SYSTEM and c.get("code") == code for c in codings):
            who = (agent.get("who") or {}).get("reference")
            if isinstance(who, str):
                found.append(who)
    return found


def is_edited(doc: JsonObject) -> bool:
    """True when a clinician changed the AI text (the edited-by extension is there)."""
    return any(isinstance(e, dict) and e.get("url") == EDITED_BY_URL for e in doc.get("extension") or [])


def check_actionable(doc: JsonObject, action: str) -> None:
    """ReviewError unless the draft is current: a rejected or superseded one cannot be `action`."""
    ref = f"DocumentReference/{doc.get('id')}"
    status = doc.get("status")
    if status == "entered-in-error":
        raise ReviewError(f"{ref} was rejected (entered-in-error): it cannot be {action}")
    if status == "superseded":
        raise ReviewError(f"{ref} was superseded by a newer draft: open the newer one to review it")
    if status != "current":
        raise ReviewError(f"{ref} has status {status!r}: only a current draft can be {action}")


def check_version(doc: JsonObject, expected: str | None) -> None:
    """ReviewConflict when the server holds another version than the one the clinician reviewed."""
    if expected is not None and version_of(doc) != str(expected):
        raise ReviewConflict(f"DocumentReference/{doc.get('id')}")


def labelled_aiast(resource: Mapping[str, Any]) -> bool:
    """True when `meta.security` carries the AIAST (AI asserted) label."""
    meta = resource.get("meta")
    labels = meta.get("security") if isinstance(meta, dict) else None
    return any(
        isinstance(label, dict)
        and label.get("system") == AIAST["system"]
        and label.get("code") == AIAST["code"]
        for label in labels or []
    )


def targets(provenance: Mapping[str, Any], doc_id: str) -> bool:
    """True when a `target` is `DocumentReference/{doc_id}`, plain or one of its versions (the
    server resolves the transaction's placeholder to either)."""
    wanted = f"DocumentReference/{doc_id}"
    for target in provenance.get("target") or []:
        ref = target.get("reference") if isinstance(target, dict) else None
        if not isinstance(ref, str):
            continue
        # An absolute reference to the same server ends the same way.
        tail = ref.split("/_history/", 1)[0]
        if tail == wanted or tail.endswith(f"/{wanted}"):
            return True
    return False


def model_sha256_of(device: Mapping[str, Any]) -> str | None:
    """The model file's sha256 the AI-Device names (`urn:chartbrief:model-sha256`)."""
    for ident in device.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == MODEL_IDENTIFIER_SYSTEM:
            value = ident.get("value")
            return value if isinstance(value, str) and value else None
    return None


def origin_problems(
    doc: Mapping[str, Any],
    provenance: Mapping[str, Any] | None,
    device: Mapping[str, Any] | None,
    *,
    model_sha256: str | None,
) -> list[str]:
    """Why the document is not shown to be chartbrief's (empty: it is).

    `provenance` is the one read by the id chartbrief gives its draft's Provenance, None when there
    is none; `device` the resource its author agent names, None when it names none or it is gone.
    `model_sha256` is the model the summary was made with (None: not known, any chartbrief Device).
    """
    problems: list[str] = []
    doc_id = str(doc.get("id") or "")
    if not labelled_aiast(doc):
        problems.append("the document has no AIAST security label")
    if provenance is None:
        return [*problems, "it has no Provenance with the id chartbrief gives its drafts"]
    if not labelled_aiast(provenance):
        problems.append("its Provenance has no AIAST security label")
    if not targets(provenance, doc_id):
        problems.append("its Provenance is about another resource")
    authors = [ref for ref in agents_of_type(dict(provenance), "author") if "Device/" in ref]
    if not authors:
        return [*problems, "its Provenance names no Device as author"]
    if device is None:
        return [*problems, "the Device its Provenance names is not on the server"]
    if not labelled_aiast(device):
        problems.append("its Device has no AIAST security label")
    sha = model_sha256_of(device)
    if sha is None:
        problems.append("its Device names no model file")
    elif model_sha256 is not None and sha != model_sha256:
        problems.append("its Device is not the model the summary was made with")
    return problems


def _review_provenance_id(kind: str, doc_id: str, version: str | None) -> str:
    # Derived from the document version, so a retried write overwrites instead of adding a second one.
    digest = hashlib.sha256(f"{kind}|{doc_id}|{version}".encode()).hexdigest()
    return f"cb-{kind}-{digest[:REVIEW_PROVENANCE_HEX]}"


# -- builders (pure) -----------------------------------------------------------------------------------


def approved_document(doc: JsonObject, verifier: str) -> JsonObject:
    """The DocumentReference as approved: final, the clinician added to `author` (the Device stays)."""
    approved = for_update(doc)
    approved["docStatus"] = "final"
    authors = list(approved.get("author") or [])
    if verifier not in references(approved, "author"):
        authors.append({"reference": verifier})
    approved["author"] = authors
    approved["description"] = APPROVED_EDITED_DESCRIPTION if is_edited(doc) else APPROVED_DESCRIPTION
    return approved


def verified_provenance(provenance: JsonObject, verifier: str) -> JsonObject:
    """The draft's AI-Provenance with a `verifier` agent for the clinician (once)."""
    verified = for_update(provenance)
    if verifier not in agents_of_type(provenance, "verifier"):
        agents = list(verified.get("agent") or [])
        agents.append({"type": {"coding": [dict(PARTICIPANT_VERIFIER)]}, "who": {"reference": verifier}})
        verified["agent"] = agents
    return verified


def edited_document(doc: JsonObject, markdown: str, editor: str, *, when: str) -> JsonObject:
    """The next version of the draft holding the clinician's markdown.

    The first attachment is replaced by the clinician's text; the AI's structured JSON attachment is
    dropped because it no longer describes the text (it stays on the previous version, which the
    edit Provenance points at). The draft stays preliminary and AI-labelled: it still holds AI text.
    """
    edited = for_update(doc)
    edited["content"] = [
        {
            "attachment": {
                "contentType": MARKDOWN,
                "data": base64.b64encode(markdown.encode("utf-8")).decode("ascii"),
                "title": EDITED_TITLE,
                "creation": when,
            }
        }
    ]
    extensions = [
        e
        for e in edited.get("extension") or []
        if not (isinstance(e, dict) and e.get("url") == EDITED_BY_URL)
    ]
    extensions.append({"url": EDITED_BY_URL, "valueReference": {"reference": editor}})
    edited["extension"] = extensions
    edited["description"] = EDITED_DESCRIPTION
    if editor not in references(edited, "author"):
        edited["author"] = [*(edited.get("author") or []), {"reference": editor}]
    return edited


def edit_provenance(
    doc_id: str, *, new_version: str, previous_version: str, editor: str, when: str
) -> JsonObject:
    """Provenance of a person's change: the new version, derived from the previous (AI) version."""
    return {
        "resourceType": "Provenance",
        "id": _review_provenance_id("ed", doc_id, new_version),
        "target": [{"reference": f"DocumentReference/{doc_id}/_history/{new_version}"}],
        "recorded": when,
        "activity": {"coding": [dict(DATA_OPERATION_UPDATE)], "text": "A clinician edited the AI draft"},
        "agent": [{"type": {"coding": [dict(PARTICIPANT_AUTHOR)]}, "who": {"reference": editor}}],
        "entity": [
            {
                "role": "revision",
                "what": {"reference": f"DocumentReference/{doc_id}/_history/{previous_version}"},
            }
        ],
    }


def rejected_document(doc: JsonObject) -> JsonObject:
    """The draft marked entered-in-error: never to be used, kept for the record."""
    rejected = for_update(doc)
    rejected["status"] = "entered-in-error"
    rejected["description"] = REJECTED_DESCRIPTION
    return rejected


def reject_provenance(doc_id: str, *, version: str | None, who: str, when: str) -> JsonObject:
    """Provenance of a rejection: who nullified which version. The reason is never put here."""
    removed = f"DocumentReference/{doc_id}/_history/{version}" if version else f"DocumentReference/{doc_id}"
    return {
        "resourceType": "Provenance",
        "id": _review_provenance_id("rj", doc_id, version),
        "target": [{"reference": f"DocumentReference/{doc_id}"}],
        "recorded": when,
        "activity": {"coding": [dict(DATA_OPERATION_NULLIFY)], "text": "A clinician rejected the AI draft"},
        "agent": [{"type": {"coding": [dict(PARTICIPANT_PERFORMER)]}, "who": {"reference": who}}],
        "entity": [{"role": "removal", "what": {"reference": removed}}],
    }


def put_entry(resource: JsonObject, match: str | None) -> JsonObject:
    """A transaction entry updating `resource`, guarded by If-Match when a version is known."""
    request: JsonObject = {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
    if match:
        request["ifMatch"] = match
    return {"resource": resource, "request": request}


def transaction(*entries: JsonObject) -> JsonObject:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def approved_by(doc: JsonObject, verifier: str) -> bool:
    """True when the draft is final with `verifier` among its authors (the approval is done)."""
    return doc.get("docStatus") == "final" and verifier in references(doc, "author")


def holds_edit(doc: JsonObject, markdown: str, editor: str) -> bool:
    """True when the draft already holds this editor's text (an edit whose first attempt committed)."""
    content = doc.get("content") or []
    attachment = content[0].get("attachment") if content and isinstance(content[0], dict) else None
    if not isinstance(attachment, dict):
        return False
    data = base64.b64encode(markdown.encode("utf-8")).decode("ascii")
    edited_by = [
        (e.get("valueReference") or {}).get("reference")
        for e in doc.get("extension") or []
        if isinstance(e, dict) and e.get("url") == EDITED_BY_URL
    ]
    return attachment.get("data") == data and editor in edited_by


def sampling_of(provenance: Mapping[str, Any]) -> str | None:
    """The sampling string the writer put on a draft's Provenance (`urn:chartbrief:sampling`)."""
    for ext in provenance.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == SAMPLING_EXTENSION_URL:
            value = ext.get("valueString")
            return value if isinstance(value, str) else None
    return None
