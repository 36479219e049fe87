"""The only IO of `fhir_adapters.write`: a draft's one transaction, and a clinician's verdict on it.

`write_summary` writes a draft once: nothing if its idempotency key is already on the server,
else the one transaction `draft.build_transaction` builds (a retry of it cannot duplicate).
`approve`, `edit` and `reject` read the draft, check it (`review`), and write what the verdict
changes, each guarded by If-Match; a retry whose first attempt committed is recognised and
answered as done. `read_draft` and `read_provenance` read what a review needs.

What this module must not do: log summary text, the clinician's reason or any patient detail
(ids, versions and counts only); write a resource outside these writes; or retry a write that
is not idempotent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from fhir_adapters.errors import FhirConflict, FhirNotFound, FhirUnexpectedResponse
from fhir_adapters.models import SummaryDraft
from fhir_adapters.write.draft import (
    DEFAULT_IDENTIFIER_SYSTEM,
    WriteOptions,
    build_transaction,
    entry_reference,
    identifier_matches,
    if_match,
    latest_previous,
    provenance_id,
    version_of,
)
from fhir_adapters.write.review import (
    MAX_MARKDOWN_CHARS,
    ReviewConflict,
    ReviewError,
    ReviewNotFound,
    agents_of_type,
    approved_by,
    approved_document,
    check_actionable,
    check_id,
    check_patient,
    check_reviewer,
    check_version,
    check_when,
    draft_key,
    edit_provenance,
    edited_document,
    holds_edit,
    put_entry,
    reject_provenance,
    rejected_document,
    transaction,
    verified_provenance,
)

JsonObject = dict[str, Any]

_log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WriteResult:
    """What the server holds after a write: `Type/id` references, never versioned."""

    document_reference: str
    provenance: str
    device: str
    created: bool  # False when the same summary (same idempotency key) was already there
    superseded: str | None = None  # the older summary this one replaced


class WriteClient(Protocol):
    """What `write_summary` needs from a FHIR client (`fhir_adapters.client.FhirClient` has it)."""

    async def search_all(
        self, resource_type: str, params: Mapping[str, str] | None = None
    ) -> list[JsonObject]: ...

    async def transaction(self, bundle: JsonObject, *, idempotent: bool = False) -> JsonObject: ...


class ReviewClient(Protocol):
    """What the actions need from a FHIR client (`fhir_adapters.client.FhirClient` has it)."""

    async def read(self, resource_type: str, id: str) -> JsonObject: ...

    async def update(self, resource: JsonObject, *, if_match: str | None = None) -> JsonObject: ...

    async def transaction(self, bundle: JsonObject, *, idempotent: bool = False) -> JsonObject: ...


# -- writing a draft ------------------------------------------------------------------------------


def _device_of(doc: JsonObject) -> str:
    for author in doc.get("author") or []:
        ref = author.get("reference") if isinstance(author, dict) else None
        if isinstance(ref, str) and ref.startswith("Device/"):
            return ref
    return ""


def _existing_result(doc: JsonObject, key: str) -> WriteResult:
    return WriteResult(
        document_reference=f"DocumentReference/{doc['id']}",
        provenance=f"Provenance/{provenance_id(key)}",
        device=_device_of(doc),
        created=False,
    )


async def _find_by_key(client: WriteClient, options: WriteOptions, key: str) -> JsonObject | None:
    params = {"identifier": f"{options.identifier_system}|{key}"}
    found = await client.search_all("DocumentReference", params)
    # Filter again: a server that ignores an unknown search parameter returns everything.
    matches = [d for d in found if identifier_matches(d, options.identifier_system, key) and d.get("id")]
    return matches[0] if matches else None


async def write_summary(client: WriteClient, draft: SummaryDraft, options: WriteOptions) -> WriteResult:
    """Write a draft once: nothing if its key is already on the server, else one transaction."""
    key = draft.idempotency_key
    existing = await _find_by_key(client, options, key)
    if existing is not None:
        _log.info("writer.unchanged", document_reference=existing["id"])
        return _existing_result(existing, key)

    candidates = await client.search_all(
        "DocumentReference",
        {
            "subject": draft.patient.reference,
            "status": "current",
            "identifier": f"{options.identifier_system}|",
        },
    )
    focus = draft.encounter.reference if draft.encounter else None
    previous = latest_previous(candidates, options, key, focus)
    bundle = build_transaction(draft, options, previous=previous)
    try:
        response = await client.transaction(bundle, idempotent=True)
    except FhirConflict:
        # A retry whose first attempt did commit fails its If-Match; so does a concurrent writer.
        # Either way, if our summary is there now the job is done.
        existing = await _find_by_key(client, options, key)
        if existing is None:
            raise
        _log.info("writer.unchanged_after_conflict", document_reference=existing["id"])
        return _existing_result(existing, key)

    entries = response.get("entry") or []
    if len(entries) < 3:
        raise FhirUnexpectedResponse(
            f"transaction response has {len(entries)} entries, expected {len(bundle['entry'])}"
        )
    doc_status = str((entries[1].get("response") or {}).get("status") or "")
    result = WriteResult(
        document_reference=entry_reference(entries[1], "DocumentReference"),
        provenance=entry_reference(entries[2], "Provenance"),
        device=entry_reference(entries[0], "Device"),
        created=doc_status.startswith("201"),
        superseded=f"DocumentReference/{previous['id']}" if previous else None,
    )
    _log.info(
        "writer.written",
        document_reference=result.document_reference,
        provenance=result.provenance,
        device=result.device,
        created=result.created,
        superseded=result.superseded,
        sources=len(draft.inputs),
    )
    return result


# -- a clinician's verdict ------------------------------------------------------------------------


async def read_draft(
    client: ReviewClient,
    document_reference_id: str,
    *,
    identifier_system: str = DEFAULT_IDENTIFIER_SYSTEM,
    patient_id: str | None = None,
) -> tuple[JsonObject, str]:
    """The DocumentReference and its idempotency key, once checked to be a chartbrief draft of the patient."""
    doc_id = check_id(document_reference_id)
    try:
        doc = await client.read("DocumentReference", doc_id)
    except FhirNotFound as exc:
        raise ReviewNotFound(f"DocumentReference/{doc_id} does not exist on the FHIR server") from exc
    check_patient(doc, patient_id)
    return doc, draft_key(doc, identifier_system)


async def read_provenance(client: ReviewClient, doc_id: str, key: str) -> JsonObject:
    """The draft's AI-Provenance (its id derives from the key); ReviewNotFound when it is gone."""
    prov_id = provenance_id(key)
    try:
        return await client.read("Provenance", prov_id)
    except FhirNotFound as exc:
        raise ReviewNotFound(
            f"Provenance/{prov_id} of DocumentReference/{doc_id} is missing: the draft cannot be verified"
        ) from exc


async def approve(
    client: ReviewClient,
    document_reference_id: str,
    *,
    verifier: str,
    when: str,
    version: str | None = None,
    identifier_system: str = DEFAULT_IDENTIFIER_SYSTEM,
    patient_id: str | None = None,
) -> JsonObject:
    """Make the draft final with `verifier` as author and as the Provenance's verifier; returns the doc.

    `version` is the versionId the clinician reviewed: if the server holds another, nothing is written
    and ReviewConflict is raised. Approving twice by the same clinician is harmless (nothing changes).
    """
    verifier = check_reviewer(verifier)
    check_when(when)
    doc, key = await read_draft(
        client, document_reference_id, identifier_system=identifier_system, patient_id=patient_id
    )
    doc_id = str(doc["id"])
    ref = f"DocumentReference/{doc_id}"
    check_actionable(doc, "approved")
    already = approved_by(doc, verifier)
    if not already:
        if doc.get("docStatus") == "final":
            raise ReviewError(f"{ref} was already approved by another clinician")
        check_version(doc, version)
    provenance = await read_provenance(client, doc_id, key)
    entries: list[JsonObject] = []
    if not already:
        entries.append(put_entry(approved_document(doc, verifier), if_match(doc)))
    if verifier not in agents_of_type(provenance, "verifier"):
        entries.append(put_entry(verified_provenance(provenance, verifier), if_match(provenance)))
    if entries:
        try:
            await client.transaction(transaction(*entries), idempotent=True)
        except FhirConflict as exc:
            # A retry whose first attempt committed fails its If-Match too: done if the result is there.
            doc_now = await client.read("DocumentReference", doc_id)
            prov_now = await client.read("Provenance", str(provenance["id"]))
            if not (approved_by(doc_now, verifier) and verifier in agents_of_type(prov_now, "verifier")):
                raise ReviewConflict(ref) from exc
    result = await client.read("DocumentReference", doc_id)
    _log.info(
        "review.approved",
        document_reference=ref,
        version=version_of(result),
        provenance=f"Provenance/{provenance['id']}",
        unchanged=not entries,
    )
    return result


async def edit(
    client: ReviewClient,
    document_reference_id: str,
    *,
    markdown: str,
    editor: str,
    when: str,
    version: str | None = None,
    identifier_system: str = DEFAULT_IDENTIFIER_SYSTEM,
    patient_id: str | None = None,
) -> JsonObject:
    """Save the clinician's text as a new version of the draft, with a Provenance saying a person
    changed the AI text; returns the new version. The draft stays preliminary: approve it next."""
    editor = check_reviewer(editor, "editor")
    check_when(when)
    if not isinstance(markdown, str) or not markdown.strip():
        raise ReviewError("markdown is empty: write the summary text, or reject the draft instead")
    if len(markdown) > MAX_MARKDOWN_CHARS:
        raise ReviewError(
            f"markdown has {len(markdown)} characters; at most {MAX_MARKDOWN_CHARS} are accepted"
        )
    doc, _key = await read_draft(
        client, document_reference_id, identifier_system=identifier_system, patient_id=patient_id
    )
    doc_id = str(doc["id"])
    ref = f"DocumentReference/{doc_id}"
    check_actionable(doc, "edited")
    if doc.get("docStatus") == "final":
        raise ReviewError(f"{ref} is already approved (final): it cannot be edited here")
    check_version(doc, version)
    previous_version = version_of(doc)
    if previous_version is None:
        raise ReviewError(f"{ref} has no meta.versionId: the server must version documents to edit them")
    try:
        saved = await client.update(edited_document(doc, markdown, editor, when=when), if_match=if_match(doc))
    except FhirConflict as exc:
        saved = await client.read("DocumentReference", doc_id)
        # A retried PUT whose first attempt committed fails its If-Match: the edit is there, go on.
        if not (holds_edit(saved, markdown, editor) and version_of(saved) != previous_version):
            raise ReviewConflict(ref) from exc
    new_version = version_of(saved)
    if new_version is None:
        raise ReviewError(f"{ref}: the server did not report the new version of the edited draft")
    provenance = edit_provenance(
        doc_id, new_version=new_version, previous_version=previous_version, editor=editor, when=when
    )
    await client.update(provenance)
    _log.info(
        "review.edited",
        document_reference=ref,
        version=new_version,
        previous_version=previous_version,
        provenance=f"Provenance/{provenance['id']}",
    )
    return saved


async def reject(
    client: ReviewClient,
    document_reference_id: str,
    *,
    who: str,
    reason: str | None = None,
    when: str,
    version: str | None = None,
    identifier_system: str = DEFAULT_IDENTIFIER_SYSTEM,
    patient_id: str | None = None,
) -> JsonObject:
    """Mark the draft entered-in-error, with a Provenance naming who; returns the doc.

    `reason` is accepted for the caller's convenience and deliberately not written to the EHR or
    logged (it is clinician free text); the service layer stores it for monitoring.
    """
    del reason  # see the docstring: kept out of FHIR and logs on purpose
    who = check_reviewer(who, "who")
    check_when(when)
    doc, _key = await read_draft(
        client, document_reference_id, identifier_system=identifier_system, patient_id=patient_id
    )
    doc_id = str(doc["id"])
    ref = f"DocumentReference/{doc_id}"
    if doc.get("status") == "entered-in-error":
        _log.info("review.rejected", document_reference=ref, version=version_of(doc), unchanged=True)
        return doc
    check_actionable(doc, "rejected")
    if doc.get("docStatus") == "final":
        raise ReviewError(f"{ref} is already approved (final): it cannot be rejected here")
    check_version(doc, version)
    provenance = reject_provenance(doc_id, version=version_of(doc), who=who, when=when)
    bundle = transaction(put_entry(rejected_document(doc), if_match(doc)), put_entry(provenance, None))
    try:
        await client.transaction(bundle, idempotent=True)
    except FhirConflict as exc:
        now = await client.read("DocumentReference", doc_id)
        if now.get("status") != "entered-in-error":
            raise ReviewConflict(ref) from exc
    result = await client.read("DocumentReference", doc_id)
    _log.info(
        "review.rejected",
        document_reference=ref,
        version=version_of(result),
        provenance=f"Provenance/{provenance['id']}",
    )
    return result
