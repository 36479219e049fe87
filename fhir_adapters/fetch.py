"""Reading one patient's record from a FHIR server into a `PatientRecord`.

`fetch_record` reads the Patient, then searches every resource type the summary uses
(`patient=<id>`) concurrently under one semaphore, validates each resource with the
fhir.resources R4B models (which read R4 JSON for these types), keeps the raw JSON, and decodes
the clinical notes: DocumentReference attachments first, then DiagnosticReport.presentedForm,
de-duplicated by the sha256 of their whitespace-normalized text.

Bad data never crashes a fetch: an invalid resource, a resource of another patient, an
unreadable attachment or a search the server refuses is recorded in `record.skipped` (ids and
short reasons only) and the rest is kept. A server that refuses `_sort` gets a plain search and
the newest Observations are chosen here. Errors that say the fetch itself is wrong propagate:
the Patient read (an unknown patient is the source's `FhirNotFound`), the focus Encounter read
(`EncounterNotOfPatient` when it is someone else's), and retryable server errors (the caller's
job may retry later).

What it must not do: interpret clinical meaning (that is `normalize`), talk HTTP directly (the
`FhirSource` does), or log anything but ids, counts and reasons.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import structlog
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from fhir_adapters.auth.scopes import SEARCHED_TYPES
from fhir_adapters.client.search import ReadLimits, SearchResults
from fhir_adapters.errors import ChartbriefError, FhirBadRequest, FhirPermanentError, FhirResponseTooLarge
from fhir_adapters.models import Note, PatientRecord, Skipped, SourceRef
from fhir_adapters.text import UnsupportedContent, decode_base64, decode_text, ensure_supported, text_sha256

log = structlog.get_logger(__name__)

JsonObject = dict[str, Any]
SearchParams = Mapping[str, str | Sequence[str]]
T = TypeVar("T")


@runtime_checkable
class FhirSource(Protocol):
    """What `fetch_record` needs from a FHIR server: `FhirClient`, or a fake in tests."""

    async def read(self, resource_type: str, id: str) -> JsonObject: ...

    def search(self, resource_type: str, params: SearchParams) -> AsyncIterator[JsonObject]: ...

    async def search_all(
        self, resource_type: str, params: SearchParams, *, limit: int | None = None
    ) -> list[JsonObject]: ...

    async def binary(self, url: str) -> tuple[bytes, str]: ...


class EncounterNotOfPatient(ChartbriefError, ValueError):
    """The focus Encounter belongs to another patient: a session may only touch its own patient."""


async def fetch_record(
    source: FhirSource,
    patient_id: str,
    *,
    encounter_id: str | None = None,
    observation_limit: int = 200,
    max_concurrency: int = 10,
) -> PatientRecord:
    """Read everything the summary may use about one patient (see the module docstring)."""
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
    if observation_limit < 1:
        raise ValueError(f"observation_limit must be at least 1, got {observation_limit}")

    patient = await source.read("Patient", patient_id)
    skipped: list[Skipped] = []
    problem = validation_problem(patient)
    if problem:
        # Without the Patient there is no record; keep it and say its demographics are suspect.
        skipped.append(Skipped(f"Patient/{patient_id}", f"{problem}; demographics may be incomplete"))

    semaphore = asyncio.Semaphore(max_concurrency)
    searches = [
        _search(source, semaphore, rtype, patient_id, observation_limit if rtype == "Observation" else None)
        for rtype in SEARCHED_TYPES
    ]
    focus = _limited(semaphore, source.read("Encounter", encounter_id)) if encounter_id else _none()
    *results, focus_result = await asyncio.gather(*searches, focus, return_exceptions=True)
    if isinstance(focus_result, BaseException):
        raise focus_result

    resources: dict[str, list[JsonObject]] = {}
    for rtype, result in zip(SEARCHED_TYPES, results, strict=True):
        if isinstance(result, FhirPermanentError):
            skipped.append(_search_refused(rtype, result))
            continue
        if isinstance(result, BaseException):
            raise result
        # gather() types every result alike; the searches' results are lists.
        found = result if isinstance(result, list) else []
        truncated = getattr(result, "truncated", None)
        if isinstance(truncated, str) and truncated:
            skipped.append(Skipped(rtype, truncated, truncated=True))
        kept, rejected = accept_resources(rtype, found, patient_id)
        resources[rtype] = kept
        skipped.extend(rejected)

    if encounter_id and isinstance(focus_result, dict):
        focus_skips = _add_focus_encounter(resources, focus_result, encounter_id, patient_id)
        skipped.extend(s for s in focus_skips if s not in skipped)

    medications, medication_skips = await read_medications(
        source, resources.get("MedicationRequest", []), semaphore
    )
    if medications:
        resources["Medication"] = medications
    skipped.extend(medication_skips)
    notes, note_skips = await read_notes(
        source, resources.get("DocumentReference", []), resources.get("DiagnosticReport", []), semaphore
    )
    skipped.extend(note_skips)
    record = PatientRecord(
        patient=patient,
        encounter_id=encounter_id,
        resources=resources,
        notes=notes,
        skipped=skipped,
    )
    log.info(
        "fetch.done",
        patient_id=patient_id,
        encounter_id=encounter_id,
        counts={rtype: len(items) for rtype, items in sorted(resources.items())},
        notes=len(notes),
        skipped=len(skipped),
    )
    return record


# ---------------------------------------------------------------------------
# Searches and validation
# ---------------------------------------------------------------------------


def search_params(resource_type: str, patient_id: str) -> dict[str, str]:
    """The search parameters for one type.

    >>> search_params("Observation", "7")
    {'patient': '7', '_sort': '-date'}
    """
    if resource_type == "Observation":
        # Most recent first, so the limit keeps the newest results.
        return {"patient": patient_id, "_sort": "-date"}
    return {"patient": patient_id}


async def _search(
    source: FhirSource, semaphore: asyncio.Semaphore, resource_type: str, patient_id: str, limit: int | None
) -> list[JsonObject]:
    params = search_params(resource_type, patient_id)
    try:
        async with semaphore:
            return await source.search_all(resource_type, params, limit=limit)
    except FhirBadRequest:
        if "_sort" not in params:
            raise
    # A server that cannot sort still answers the plain search; the newest are then chosen here,
    # which needs every result (a limit on an unsorted search would keep arbitrary ones).
    log.warning("fetch.sort_unsupported", resource_type=resource_type)
    async with semaphore:
        found = await source.search_all(resource_type, {"patient": patient_id}, limit=None)
    truncated = getattr(found, "truncated", None)
    found.sort(key=lambda r: _effective(r) or "", reverse=True)
    if limit is None or not truncated:
        return found[:limit] if limit is not None else found
    kept = SearchResults(found[:limit])
    kept.truncated = truncated
    return kept


def _effective(resource: JsonObject) -> str | None:
    period = resource.get("effectivePeriod")
    return (
        _str(resource.get("effectiveDateTime"))
        or (_str(period.get("start")) if isinstance(period, dict) else None)
        or _str(resource.get("effectiveInstant"))
        or _str(resource.get("issued"))
    )


async def _limited(semaphore: asyncio.Semaphore, call: Awaitable[T]) -> T:
    async with semaphore:
        return await call


async def _none() -> None:
    return None


def _search_refused(resource_type: str, error: FhirPermanentError) -> Skipped:
    """A refused search (no scope, unsupported parameter) costs one type, not the whole record."""
    log.warning("fetch.search_refused", resource_type=resource_type, status=error.status)
    return Skipped(resource_type, f"search refused by the server ({_why(error)})")


def _why(error: FhirPermanentError) -> str:
    """The status, or the error class for a request refused before it was sent (another origin)."""
    return f"status {error.status}" if error.status else type(error).__name__


def validation_problem(resource: JsonObject) -> str | None:
    """None when the resource parses with its fhir.resources R4B model, else a short reason.

    The reason names fields and error kinds only, never values (they may be patient data).

    >>> validation_problem({"resourceType": "Condition", "subject": {"reference": "Patient/1"}})
    >>> validation_problem({"resourceType": "Condition", "subject": {"reference": "Patient/1"},
    ...                     "clinicalStatus": "active"})
    'invalid clinicalStatus (json_invalid)'
    """
    rtype = resource.get("resourceType")
    try:
        model = get_fhir_model_class(str(rtype))
    except (KeyError, ValueError):
        return f"unknown resourceType {rtype!r}"
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"]) or "resource"
        more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
        return f"invalid {where} ({first['type']}){more}"
    except (ValueError, TypeError) as exc:
        return f"invalid resource ({type(exc).__name__})"
    return None


def refers_to_patient(reference: object, patient_id: str) -> bool:
    """Whether a Reference.reference points at this patient (relative, absolute or versioned).

    >>> refers_to_patient("Patient/7", "7"), refers_to_patient("https://h/fhir/Patient/7/_history/2", "7")
    (True, True)
    >>> refers_to_patient("Patient/77", "7"), refers_to_patient(None, "7")
    (False, False)
    """
    if not isinstance(reference, str):
        return False
    return re.search(rf"(?:^|/)Patient/{re.escape(patient_id)}(?:/_history/[^/]+)?$", reference) is not None


def accept_resources(
    resource_type: str, found: list[JsonObject], patient_id: str
) -> tuple[list[JsonObject], list[Skipped]]:
    """The search results worth keeping, and why the others were not.

    Entries of another type (an OperationOutcome, an `_include`) are not results and are
    ignored; a repeated `Type/id` is kept once.
    """
    kept: list[JsonObject] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for resource in found:
        if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
            continue
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            skipped.append(Skipped(f"{resource_type}/?", "missing id"))
            continue
        ref = f"{resource_type}/{rid}"
        if ref in seen:
            continue
        seen.add(ref)
        reason = _rejection(resource_type, resource, patient_id)
        if reason:
            skipped.append(Skipped(ref, reason))
            continue
        kept.append(resource)
    if skipped:
        log.info("fetch.skipped", resource_type=resource_type, count=len(skipped))
    return kept, skipped


def _rejection(resource_type: str, resource: JsonObject, patient_id: str) -> str | None:
    element = SEARCHED_TYPES.get(resource_type, "subject")
    target = resource.get(element)
    reference = target.get("reference") if isinstance(target, dict) else None
    if not refers_to_patient(reference, patient_id):
        return f"{element} does not reference the requested patient"
    problem = validation_problem(resource)
    if problem:
        return problem
    if resource_type == "DocumentReference" and resource.get("status") == "entered-in-error":
        return "status entered-in-error"
    return None


def _add_focus_encounter(
    resources: dict[str, list[JsonObject]], encounter: JsonObject, encounter_id: str, patient_id: str
) -> list[Skipped]:
    """Make sure the focus Encounter is among the encounters read (a search may have missed it)."""
    subject = encounter.get("subject")
    if not refers_to_patient(subject.get("reference") if isinstance(subject, dict) else None, patient_id):
        # Not bad data but a request for someone else's chart: never summarize it.
        raise EncounterNotOfPatient(f"Encounter/{encounter_id} does not belong to Patient/{patient_id}")
    encounters = resources.setdefault("Encounter", [])
    if any(str(e.get("id")) == str(encounter.get("id")) for e in encounters):
        return []
    problem = validation_problem(encounter)
    if problem:
        return [Skipped(f"Encounter/{encounter_id}", problem)]
    encounters.append(encounter)
    return []


# ---------------------------------------------------------------------------
# Notes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attachment:
    """One attachment to decode, with what the Note needs to know about its owner."""

    owner: JsonObject
    where: str  # "content[0]" / "presentedForm[1]"
    attachment: JsonObject
    date: str | None
    title: str | None
    status: str | None

    @property
    def label(self) -> str:
        return f"{self.owner['resourceType']}/{self.owner['id']}#{self.where}"


def medication_ids(requests: Iterable[JsonObject]) -> list[str]:
    """Ids of the Medication resources orders name by reference (not contained ones), in order.

    >>> medication_ids([{"medicationReference": {"reference": "Medication/7"}},
    ...                 {"medicationReference": {"reference": "urn:uuid:ab-1"}},
    ...                 {"medicationReference": {"reference": "#m"}}, {"medicationCodeableConcept": {}}])
    ['7', 'ab-1']
    """
    ids: list[str] = []
    for request in requests:
        reference = request.get("medicationReference")
        target = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(target, str) or target.startswith("#"):
            continue
        if target.startswith("urn:uuid:"):
            ids.append(target.removeprefix("urn:uuid:"))
            continue
        parts = target.split("/")
        if "Medication" in parts and parts.index("Medication") + 1 < len(parts):
            ids.append(parts[parts.index("Medication") + 1])
    return list(dict.fromkeys(ids))


async def read_medications(
    source: FhirSource, requests: list[JsonObject], semaphore: asyncio.Semaphore
) -> tuple[list[JsonObject], list[Skipped]]:
    """The Medication resources that orders reference: without them a drug named only by reference
    has no name, and the summary could not list it."""
    ids = medication_ids(requests)
    results = await asyncio.gather(
        *(_limited(semaphore, source.read("Medication", mid)) for mid in ids), return_exceptions=True
    )
    found: list[JsonObject] = []
    skipped: list[Skipped] = []
    for mid, result in zip(ids, results, strict=True):
        if isinstance(result, FhirPermanentError):
            skipped.append(Skipped(f"Medication/{mid}", f"could not be read ({_why(result)})"))
        elif isinstance(result, BaseException):
            raise result
        elif isinstance(result, dict) and result.get("resourceType") == "Medication":
            found.append(result)
    return found, skipped


async def read_notes(
    source: FhirSource,
    document_references: list[JsonObject],
    diagnostic_reports: list[JsonObject],
    semaphore: asyncio.Semaphore,
) -> tuple[list[Note], list[Skipped]]:
    """Decode every note attachment; the DocumentReference copy of a repeated text wins."""
    # DocumentReferences first: a text repeated in a report keeps its document's copy.
    items = [*note_attachments(document_references), *note_attachments(diagnostic_reports)]
    contents = await asyncio.gather(
        *(_attachment_bytes(source, item, semaphore) for item in items), return_exceptions=True
    )
    notes: list[Note] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    duplicates = 0
    for item, content in zip(items, contents, strict=True):
        if isinstance(content, BaseException):
            if isinstance(content, UnsupportedContent):
                skipped.append(Skipped(item.label, str(content)))
                continue
            if isinstance(content, FhirResponseTooLarge):
                reason = (
                    f"truncated: attachment larger than {content.limit} bytes "
                    "(fhir.max_attachment_bytes); not read"
                )
                skipped.append(Skipped(item.label, reason, truncated=True))
                continue
            if isinstance(content, FhirPermanentError):
                reason = f"attachment url could not be read ({_why(content)})"
                skipped.append(Skipped(item.label, reason))
                continue
            raise content
        data, binary_type = content
        declared = item.attachment.get("contentType")
        try:
            text = decode_text(data, declared if isinstance(declared, str) and declared else binary_type)
        except UnsupportedContent as exc:
            skipped.append(Skipped(item.label, str(exc)))
            continue
        if not text.strip():
            skipped.append(Skipped(item.label, "attachment has no text"))
            continue
        digest = text_sha256(text)
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        notes.append(
            Note(
                source=SourceRef.of(item.owner),
                text=text,
                content_type=_media_type(declared if isinstance(declared, str) else binary_type),
                date=item.date,
                title=item.title,
                status=item.status,
                sha256=digest,
            )
        )
    log.info("fetch.notes", notes=len(notes), duplicates=duplicates, skipped=len(skipped))
    return notes, skipped


def note_attachments(resources: list[JsonObject]) -> list[_Attachment]:
    """Every note attachment of DocumentReferences (`content[].attachment`) and DiagnosticReports
    (`presentedForm[]`): current documents first, then newest first, then by id.

    >>> report = {"resourceType": "DiagnosticReport", "id": "r", "presentedForm": [{}]}
    >>> doc = {"resourceType": "DocumentReference", "id": "d", "status": "current",
    ...        "content": [{"attachment": {}}]}
    >>> [a.label for a in note_attachments([report, doc])]
    ['DocumentReference/d#content[0]', 'DiagnosticReport/r#presentedForm[0]']
    """
    ordered = sorted(resources, key=lambda r: str(r["id"]))
    ordered.sort(key=lambda r: _note_date(r) or "", reverse=True)
    ordered.sort(key=lambda r: r.get("status") != "current")
    items: list[_Attachment] = []
    for owner in ordered:
        title = _note_title(owner)
        for where, attachment in _attachments_of(owner):
            items.append(
                _Attachment(
                    owner=owner,
                    where=where,
                    attachment=attachment,
                    date=_note_date(owner),
                    title=_str(attachment.get("title")) or title,
                    status=_str(owner.get("status")),
                )
            )
    return items


def _attachments_of(owner: JsonObject) -> list[tuple[str, JsonObject]]:
    """(where, attachment) of each note a DocumentReference or DiagnosticReport carries."""
    if owner.get("resourceType") == "DiagnosticReport":
        found = [(f"presentedForm[{i}]", a) for i, a in enumerate(owner.get("presentedForm") or [])]
    else:
        found = [
            (f"content[{i}]", c.get("attachment") if isinstance(c, dict) else None)
            for i, c in enumerate(owner.get("content") or [])
        ]
    return [(where, attachment) for where, attachment in found if isinstance(attachment, dict)]


def _note_title(owner: JsonObject) -> str | None:
    if owner.get("resourceType") == "DiagnosticReport":
        return _codeable_text(owner.get("code"))
    return _codeable_text(owner.get("type")) or _str(owner.get("description"))


def _note_date(owner: JsonObject) -> str | None:
    return _report_date(owner) if owner.get("resourceType") == "DiagnosticReport" else _doc_date(owner)


async def _attachment_bytes(
    source: FhirSource, item: _Attachment, semaphore: asyncio.Semaphore
) -> tuple[bytes, str]:
    """The attachment's bytes and the content type the server gave them (raises to skip it)."""
    attachment = item.attachment
    declared = _str(attachment.get("contentType")) or ""
    data = attachment.get("data")
    if isinstance(data, str) and data:
        content = decode_base64(data)
        limit = getattr(source, "limits", None)
        cap = limit.max_attachment_bytes if isinstance(limit, ReadLimits) else None
        if cap is not None and len(content) > cap:
            raise FhirResponseTooLarge(f"inline attachment larger than {cap} bytes", limit=cap)
        return content, declared
    url = attachment.get("url")
    if isinstance(url, str) and url:
        # Fail before the read when the declared type is one chartbrief cannot use anyway.
        if declared:
            ensure_supported(declared)
        async with semaphore:
            content, content_type = await source.binary(url)
        return content, content_type
    raise UnsupportedContent("attachment has neither data nor url")


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _doc_date(doc: JsonObject) -> str | None:
    context = doc.get("context")
    period = context.get("period") if isinstance(context, dict) else None
    return _str(doc.get("date")) or (_str(period.get("start")) if isinstance(period, dict) else None)


def _report_date(report: JsonObject) -> str | None:
    period = report.get("effectivePeriod")
    return (
        _str(report.get("effectiveDateTime"))
        or (_str(period.get("start")) if isinstance(period, dict) else None)
        or _str(report.get("issued"))
    )


def _codeable_text(concept: object) -> str | None:
    if not isinstance(concept, dict):
        return None
    text = _str(concept.get("text"))
    if text:
        return text
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and _str(coding.get("display")):
            return _str(coding.get("display"))
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


__all__ = [
    "EncounterNotOfPatient",
    "FhirSource",
    "accept_resources",
    "fetch_record",
    "read_notes",
    "refers_to_patient",
    "search_params",
    "validation_problem",
]
