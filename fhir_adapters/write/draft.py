"""A grounded summary as FHIR resources: the pure builders of the one transaction that writes it back.

What is written, in ONE transaction Bundle (HL7 AI Transparency on FHIR, US Core DocumentReference shape):

- `Device` (profile AI-Device): the exact model file (identifier = its sha256), created only if absent.
- `DocumentReference`: the summary as a preliminary, AI-asserted draft awaiting clinician review;
  identifier = the summary's idempotency key, created with `ifNoneExist` so a retry never duplicates.
- `Provenance` (profile AI-Provenance): the Device as author, one `source` entity per resource
  version read, the prompt id/version/sha256. Its id is derived from the idempotency key and it is
  written with PUT, so a retried transaction overwrites it instead of adding a second one.
- the patient's previous chartbrief summary, if any, PUT back with `status=superseded` (guarded by
  If-Match) while the new one `relatesTo` it with `replaces`.

Every function here is pure; `fhir_adapters.write.send` is the only IO. What this module must not
do: log summary text or any patient detail, or build a write that a retry could duplicate.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from fhir_adapters.errors import ChartbriefError, FhirUnexpectedResponse
from fhir_adapters.models import ModelIdentity, PromptIdentity, SourceRef, SummaryDraft

JsonObject = dict[str, Any]
LoincType = Literal["34133-9", "11506-3"]

# -- the codes (STANDARDS.md "Writing the summary back", AI Transparency IG) ---------------------------

AIT = "http://hl7.org/fhir/uv/aitransparency"
AI_DEVICE_PROFILE = f"{AIT}/StructureDefinition/AI-Device"
AI_PROVENANCE_PROFILE = f"{AIT}/StructureDefinition/AI-Provenance"
AI_KIND_URL = f"{AIT}/StructureDefinition/aitransparency.AIKind"
AI_DEVICE_TYPE_SYSTEM = f"{AIT}/CodeSystem/AIdeviceTypeCS"

AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
AI_DEVICE_TYPE = {
    "system": AI_DEVICE_TYPE_SYSTEM,
    "code": "Artificial-Intelligence",
    "display": "All kinds of Artificial Intelligence",
}
AI_KINDS = (
    {"system": AI_DEVICE_TYPE_SYSTEM, "code": "Large-Language-Models", "display": "Large Language Models"},
    {
        "system": AI_DEVICE_TYPE_SYSTEM,
        "code": "Clinical-Documentation-and-Workflow",
        "display": "Clinical Documentation and Workflow",
    },
)
MODEL_IDENTIFIER_SYSTEM = "urn:chartbrief:model-sha256"
PROMPT_EXTENSION_URL = "urn:chartbrief:prompt"
SAMPLING_EXTENSION_URL = "urn:chartbrief:sampling"

LOINC = "http://loinc.org"
LOINC_DISPLAY = {"34133-9": "Summary of episode note", "11506-3": "Progress note"}
CLINICAL_NOTE = {
    "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
    "code": "clinical-note",
    "display": "Clinical Note",
}
DATA_OPERATION_CREATE = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
    "code": "CREATE",
    "display": "create",
}
PARTICIPANT_AUTHOR = {
    "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
    "code": "author",
    "display": "Author",
}

MARKDOWN = "text/markdown; charset=utf-8"
JSON_CONTENT = "application/json"
SUMMARY_TITLE = "Clinical summary (AI draft)"
STRUCTURED_TITLE = "Clinical summary, structured part (AI draft)"
DESCRIPTION = (
    "AI-generated draft summary (chartbrief). Preliminary: a clinician must review it before it is used; "
    "every statement cites its sources."
)

# FHIR ids: at most 64 characters of [A-Za-z0-9-.]; "cb-" + 40 hex digits (160 bits of the key).
PROVENANCE_ID_PREFIX = "cb-"
PROVENANCE_ID_HEX = 40


class DraftError(ChartbriefError, ValueError):
    """A draft (or previous DocumentReference) that cannot be written; the message names the field."""


DEFAULT_IDENTIFIER_SYSTEM = "urn:chartbrief:summary"


@dataclass(frozen=True)
class WriteOptions:
    """How this deployment writes drafts; the service builds it from its settings.

    `identifier_system` marks chartbrief's own DocumentReferences (the idempotency key is the
    value); `loinc_type` is 34133-9 Summary of episode note, or 11506-3 Progress note for EHRs
    that take only that; `include_structured_json` adds the cited structured part as a second,
    application/json attachment.
    """

    identifier_system: str = DEFAULT_IDENTIFIER_SYSTEM
    loinc_type: LoincType = "34133-9"
    include_structured_json: bool = True

    def __post_init__(self) -> None:
        if not self.identifier_system.strip():
            raise ValueError("WriteOptions.identifier_system is empty")
        if self.loinc_type not in LOINC_DISPLAY:
            raise ValueError(
                f"WriteOptions.loinc_type {self.loinc_type!r} is not one of {', '.join(LOINC_DISPLAY)}"
            )


# -- identity ------------------------------------------------------------------------------------------


def idempotency_key(
    inputs: Sequence[SourceRef],
    prompt: PromptIdentity,
    model: ModelIdentity,
    encounter: SourceRef | None,
    options: Mapping[str, str] | None = None,
) -> str:
    """sha256 (hex) of everything that decides a summary: input versions, prompt, model file, sampling,
    and `options` (other settings that change the text, e.g. how many notes the model reads).

    Input order and repeats do not matter; any changed version, prompt or model gives a new key.

    >>> a, b = SourceRef("Observation", "1", "3"), SourceRef("Patient", "p", "1")
    >>> p = PromptIdentity("summary", "v1", "ab")
    >>> m = ModelIdentity("m", "m.gguf", "cd", "Q4_1", "llama.cpp")
    >>> idempotency_key([a, b], p, m, None) == idempotency_key([b, a, a], p, m, None)
    True
    >>> idempotency_key([a], p, m, None) == idempotency_key([SourceRef("Observation", "1", "4")], p, m, None)
    False
    """
    canonical = {
        "inputs": sorted({ref.versioned for ref in inputs}),
        "prompt": {"id": prompt.id, "version": prompt.version, "sha256": prompt.sha256},
        "model": {"sha256": model.sha256, "sampling": model.sampling},
        "encounter": encounter.versioned if encounter else None,
    }
    if options:
        canonical["options"] = dict(sorted(options.items()))
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def provenance_id(key: str) -> str:
    """The Provenance's client-assigned id for a summary key: stable, so a retry overwrites it.

    >>> provenance_id("0123456789abcdef" * 4)
    'cb-0123456789abcdef0123456789abcdef01234567'
    """
    return PROVENANCE_ID_PREFIX + key[:PROVENANCE_ID_HEX]


def _entry_uuid(key: str, role: str) -> str:
    # Derived from the key, so the same draft always gives the same Bundle (reproducible, testable).
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'urn:chartbrief:{key}:{role}')}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _security_meta(profile: str | None = None) -> JsonObject:
    meta: JsonObject = {"security": [dict(AIAST)]}
    if profile:
        meta["profile"] = [profile]
    return meta


# -- builders (pure) -----------------------------------------------------------------------------------


def build_device(model: ModelIdentity) -> JsonObject:
    """The AI-Device for one model file; the sha256 identifies it, the version string pins the runtime."""
    if not model.sha256:
        raise DraftError("ModelIdentity.sha256 is empty: the Device must name the exact model file")
    device_names = [{"name": model.name, "type": "model-name"}]
    if model.file_name and model.file_name != model.name:
        device_names.append({"name": model.file_name, "type": "other"})
    return {
        "resourceType": "Device",
        "meta": _security_meta(AI_DEVICE_PROFILE),
        "extension": [{"url": AI_KIND_URL, "valueCodeableConcept": {"coding": [dict(k)]}} for k in AI_KINDS],
        "identifier": [{"system": MODEL_IDENTIFIER_SYSTEM, "value": model.sha256}],
        "status": "active",
        "deviceName": device_names,
        "type": {"coding": [dict(AI_DEVICE_TYPE)], "text": "Artificial Intelligence"},
        "version": [{"value": model.version_string}],
    }


def _check_draft(draft: SummaryDraft) -> None:
    if not draft.idempotency_key:
        raise DraftError("SummaryDraft.idempotency_key is empty")
    if draft.patient.resource_type != "Patient" or not draft.patient.id:
        raise DraftError(f"SummaryDraft.patient must be a Patient reference, got {draft.patient.reference!r}")
    if not draft.created:
        raise DraftError("SummaryDraft.created is empty: DocumentReference.date needs it")


def _unique(refs: Sequence[SourceRef]) -> list[SourceRef]:
    seen: set[str] = set()
    out: list[SourceRef] = []
    for ref in refs:
        if ref.versioned not in seen:
            seen.add(ref.versioned)
            out.append(ref)
    return out


def build_document_reference(
    draft: SummaryDraft, options: WriteOptions, *, device_ref: str, replaces: str | None
) -> JsonObject:
    """The summary as a preliminary, AI-asserted DocumentReference (US Core shape)."""
    _check_draft(draft)
    display = LOINC_DISPLAY[options.loinc_type]
    content: list[JsonObject] = [
        {
            "attachment": {
                "contentType": MARKDOWN,
                "data": _b64(draft.markdown.encode("utf-8")),
                "title": SUMMARY_TITLE,
                "creation": draft.created,
            }
        }
    ]
    if options.include_structured_json:
        structured = json.dumps(draft.structured, sort_keys=True, ensure_ascii=False).encode("utf-8")
        content.append(
            {
                "attachment": {
                    "contentType": JSON_CONTENT,
                    "data": _b64(structured),
                    "title": STRUCTURED_TITLE,
                    "creation": draft.created,
                }
            }
        )
    context: JsonObject = {}
    if draft.encounter:
        context["encounter"] = [{"reference": draft.encounter.reference}]
    period = {k: v for k, v in (("start", draft.period_start), ("end", draft.period_end)) if v}
    if period:
        context["period"] = period
    related = [{"reference": ref.versioned} for ref in _unique(draft.cited)]
    if related:
        context["related"] = related

    doc: JsonObject = {
        "resourceType": "DocumentReference",
        "meta": _security_meta(),
        "identifier": [{"system": options.identifier_system, "value": draft.idempotency_key}],
        "status": "current",
        "docStatus": "preliminary",
        "type": {
            "coding": [{"system": LOINC, "code": options.loinc_type, "display": display}],
            "text": display,
        },
        "category": [{"coding": [dict(CLINICAL_NOTE)]}],
        "subject": {"reference": draft.patient.reference},
        "date": draft.created,
        "author": [{"reference": device_ref}],
        "description": DESCRIPTION,
        "content": content,
    }
    if replaces:
        doc["relatesTo"] = [{"code": "replaces", "target": {"reference": replaces}}]
    if context:
        doc["context"] = context
    return doc


def prompt_label(prompt: PromptIdentity) -> str:
    """`summary/v1 sha256:<hex>` - how the Provenance names the prompt template."""
    return f"{prompt.id}/{prompt.version} sha256:{prompt.sha256}"


def build_provenance(draft: SummaryDraft, *, target: str, device_ref: str) -> JsonObject:
    """AI-Provenance: the Device wrote `target` from these exact resource versions with this prompt."""
    _check_draft(draft)
    extensions: list[JsonObject] = [{"url": PROMPT_EXTENSION_URL, "valueString": prompt_label(draft.prompt)}]
    if draft.model.sampling:
        extensions.append({"url": SAMPLING_EXTENSION_URL, "valueString": draft.model.sampling})
    provenance: JsonObject = {
        "resourceType": "Provenance",
        "meta": _security_meta(AI_PROVENANCE_PROFILE),
        "extension": extensions,
        "target": [{"reference": target}],
        "recorded": draft.created,
        "reason": [{"coding": [dict(AIAST)]}],
        "activity": {"coding": [dict(DATA_OPERATION_CREATE)]},
        "agent": [
            {
                "type": {"coding": [dict(PARTICIPANT_AUTHOR)]},
                "role": [{"coding": [dict(AI_DEVICE_TYPE)]}],
                "who": {"reference": device_ref},
            }
        ],
    }
    entities = [{"role": "source", "what": {"reference": ref.versioned}} for ref in _unique(draft.inputs)]
    if entities:
        provenance["entity"] = entities
    return provenance


def superseded_copy(previous: JsonObject) -> tuple[JsonObject, str, str | None]:
    """The previous summary with `status=superseded`, its `Type/id`, and the If-Match for its version."""
    if previous.get("resourceType") != "DocumentReference":
        raise DraftError("previous must be a DocumentReference")
    pid = previous.get("id")
    if not isinstance(pid, str) or not pid:
        raise DraftError("previous DocumentReference has no id: it cannot be superseded")
    updated = for_update(previous)
    updated["status"] = "superseded"
    return updated, f"DocumentReference/{pid}", if_match(previous)


def build_transaction(
    draft: SummaryDraft, options: WriteOptions, *, previous: JsonObject | None
) -> JsonObject:
    """The one transaction Bundle writing a summary; safe to resend (each entry is conditional or a PUT)."""
    _check_draft(draft)
    key = draft.idempotency_key
    device_url = _entry_uuid(key, "Device")
    doc_url = _entry_uuid(key, "DocumentReference")
    prov_id = provenance_id(key)

    replaced: tuple[JsonObject, str, str | None] | None = None
    if previous is not None:
        replaced = superseded_copy(previous)

    device = build_device(draft.model)
    doc = build_document_reference(
        draft, options, device_ref=device_url, replaces=replaced[1] if replaced else None
    )
    provenance = build_provenance(draft, target=doc_url, device_ref=device_url)
    provenance["id"] = prov_id

    entries: list[JsonObject] = [
        {
            "fullUrl": device_url,
            "resource": device,
            "request": {
                "method": "POST",
                "url": "Device",
                "ifNoneExist": f"identifier={MODEL_IDENTIFIER_SYSTEM}|{draft.model.sha256}",
            },
        },
        {
            "fullUrl": doc_url,
            "resource": doc,
            "request": {
                "method": "POST",
                "url": "DocumentReference",
                "ifNoneExist": f"identifier={options.identifier_system}|{key}",
            },
        },
        {"resource": provenance, "request": {"method": "PUT", "url": f"Provenance/{prov_id}"}},
    ]
    if replaced:
        old, old_ref, if_match = replaced
        request: JsonObject = {"method": "PUT", "url": old_ref}
        if if_match:
            request["ifMatch"] = if_match
        entries.append({"resource": old, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


# -- updating a resource chartbrief read (pure) ---------------------------------------------------------


def for_update(resource: JsonObject) -> JsonObject:
    """A copy without the server-managed meta fields (the server sets them anew on update)."""
    updated = copy.deepcopy(resource)
    meta = updated.get("meta")
    if isinstance(meta, dict):
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
        if not meta:
            updated.pop("meta")
    return updated


def version_of(resource: JsonObject) -> str | None:
    """`meta.versionId`, the version a write must match, or None when the server gave none."""
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return str(version) if version else None


def if_match(resource: JsonObject) -> str | None:
    """The If-Match header value for the resource's version (`W/"3"`), None when it has none.

    >>> if_match({"meta": {"versionId": "3"}})
    'W/"3"'
    """
    version = version_of(resource)
    return f'W/"{version}"' if version else None


# -- reading answers (pure) ----------------------------------------------------------------------------


def reference_from_location(location: str) -> str:
    """`Type/id` from a Location (relative or absolute, with or without `_history`).

    >>> reference_from_location("http://h/fhir/DocumentReference/12/_history/3")
    'DocumentReference/12'
    >>> reference_from_location("Device/7")
    'Device/7'
    """
    path = urlsplit(location).path
    segments = [s for s in path.split("/") if s]
    if "_history" in segments:
        segments = segments[: segments.index("_history")]
    if len(segments) < 2:
        raise ValueError(f"location {location!r} does not name a resource")
    return f"{segments[-2]}/{segments[-1]}"


def entry_reference(entry: JsonObject, what: str) -> str:
    """`Type/id` a transaction response entry names (its Location, else its resource)."""
    response = entry.get("response") or {}
    location = response.get("location")
    if isinstance(location, str) and location:
        return reference_from_location(location)
    resource = entry.get("resource") or {}
    if resource.get("resourceType") and resource.get("id"):
        return f"{resource['resourceType']}/{resource['id']}"
    raise FhirUnexpectedResponse(f"transaction response: no location for the {what} entry")


def identifier_matches(resource: JsonObject, system: str, value: str | None = None) -> bool:
    """True when the resource has an identifier in `system` (with `value`, when given)."""
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == system:
            if value is None or ident.get("value") == value:
                return True
    return False


def latest_previous(
    candidates: Sequence[JsonObject], options: WriteOptions, key: str, encounter: str | None = None
) -> JsonObject | None:
    """The newest current, unreviewed chartbrief draft for the same focus other than this one.

    A draft a clinician approved (`docStatus=final`) is never superseded by a new AI draft: it
    stays the reviewed record until a clinician replaces it. A summary focused on an encounter
    only replaces an earlier one with the same focus.
    """
    ours = [
        doc
        for doc in candidates
        if doc.get("resourceType") == "DocumentReference"
        and doc.get("status") == "current"
        and doc.get("docStatus") != "final"
        and _encounter_of(doc) == encounter
        and identifier_matches(doc, options.identifier_system)
        and not identifier_matches(doc, options.identifier_system, key)
    ]
    if not ours:
        return None
    return max(ours, key=_recency)


def _encounter_of(doc: JsonObject) -> str | None:
    encounters = (doc.get("context") or {}).get("encounter") or []
    refs = [e.get("reference") for e in encounters if isinstance(e, dict)]
    return str(refs[0]) if refs and refs[0] else None


def _recency(doc: JsonObject) -> tuple[str, str]:
    meta = doc.get("meta") or {}
    return str(doc.get("date") or ""), str(meta.get("lastUpdated") or "")
