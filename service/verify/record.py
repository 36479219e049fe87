"""A patient's whole record as the verifier sees it: every resource by reference, note texts, and
what only the whole record knows (which Observation is the latest of its code, the last date).

Built from raw FHIR JSON, whatever read it (a FHIR server, a bundle file). Pure: no IO.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir_adapters.text import UnsupportedContent, decode_base64, decode_text
from service.verify.dates import day_of
from service.verify.evidence import SourceEvidence, evidence_of

JsonObject = Mapping[str, Any]
_LATEST_BY_CODE = ("Observation", "Condition", "Procedure", "Immunization", "MedicationRequest")
_WHEN = {
    "Observation": ("effectiveDateTime", "issued"),
    "Condition": ("onsetDateTime", "recordedDate"),
    "Procedure": ("performedDateTime", "performedPeriod"),
    "Immunization": ("occurrenceDateTime",),
    "MedicationRequest": ("authoredOn",),
    "Encounter": ("period",),
}


@dataclass
class RecordIndex:
    resources: dict[str, JsonObject]
    note_texts: dict[str, str] = field(default_factory=dict)
    _latest: dict[str, bool] = field(default_factory=dict)
    _evidence: dict[str, SourceEvidence] = field(default_factory=dict)
    last_date: str | None = None

    @classmethod
    def of(cls, resources: Iterable[JsonObject], note_texts: Mapping[str, str] | None = None) -> RecordIndex:
        by_ref = {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources if r.get("resourceType")}
        texts = dict(note_texts) if note_texts is not None else _embedded_note_texts(by_ref.values())
        index = cls(resources=by_ref, note_texts=texts)
        index._latest = _latest_flags(by_ref)
        index.last_date = _last_date(by_ref.values())
        return index

    @property
    def patient(self) -> JsonObject | None:
        return next((r for r in self.resources.values() if r.get("resourceType") == "Patient"), None)

    @property
    def as_of(self) -> str | None:
        """The date an undated age is stated at: the date of death, else the record's last date."""
        patient = self.patient or {}
        return day_of(patient.get("deceasedDateTime")) or self.last_date

    def evidence(self, reference: str) -> SourceEvidence | None:
        """The evidence of `Type/id` (a version suffix is ignored), or None when not in the record."""
        ref = "/".join(reference.split("/")[:2])
        if ref in self._evidence:
            return self._evidence[ref]
        resource = self.resources.get(ref)
        if resource is None:
            return None
        found = evidence_of(
            resource,
            note_text=self.note_texts.get(ref),
            latest=self._latest.get(ref),
            related=self._related(resource),
        )
        self._evidence[ref] = found
        return found

    def _related(self, resource: JsonObject) -> list[JsonObject]:
        """Resources whose names a resource borrows: the Medication an order names by reference."""
        reference = resource.get("medicationReference")
        target = reference.get("reference") if isinstance(reference, Mapping) else None
        if not isinstance(target, str):
            return []
        mid = target.removeprefix("urn:uuid:").split("/_history")[0].split("/")[-1]
        found = self.resources.get(f"Medication/{mid}")
        return [found] if found is not None else []


def _code_key(resource: JsonObject) -> str | None:
    concept = resource.get("code") or resource.get("vaccineCode") or resource.get("medicationCodeableConcept")
    if not isinstance(concept, Mapping):
        return None
    codings = [f"{c.get('system')}|{c.get('code')}" for c in concept.get("coding") or [] if c.get("code")]
    return codings[0] if codings else (str(concept["text"]).lower() if concept.get("text") else None)


def _when(resource: JsonObject) -> str:
    for key in _WHEN.get(str(resource.get("resourceType")), ()):
        value = resource.get(key)
        if isinstance(value, Mapping):
            value = value.get("start")
        if isinstance(value, str):
            return value
    return ""


def _latest_flags(by_ref: Mapping[str, JsonObject]) -> dict[str, bool]:
    """Per resource: is it the latest of its code (Observations, ...) or of all Encounters."""
    newest: dict[tuple[str, str], str] = {}
    for resource in by_ref.values():
        rtype = str(resource.get("resourceType"))
        key = _code_key(resource) if rtype in _LATEST_BY_CODE else ("*" if rtype == "Encounter" else None)
        if key is not None:
            when = _when(resource)[:10]
            newest[(rtype, key)] = max(newest.get((rtype, key), ""), when)
    flags: dict[str, bool] = {}
    for ref, resource in by_ref.items():
        rtype = str(resource.get("resourceType"))
        key = _code_key(resource) if rtype in _LATEST_BY_CODE else ("*" if rtype == "Encounter" else None)
        if key is not None:
            flags[ref] = _when(resource)[:10] == newest[(rtype, key)]
    return flags


def _last_date(resources: Iterable[JsonObject]) -> str | None:
    days = [_when(r)[:10] for r in resources if r.get("resourceType") == "Encounter" and _when(r)]
    return max(days) if days else None


def _embedded_note_texts(resources: Iterable[JsonObject]) -> dict[str, str]:
    """Texts of notes carried inline (attachment.data): enough for bundle files and tests. A server's
    notes stored as Binary are decoded by fhir_adapters.fetch and passed in instead."""
    texts: dict[str, str] = {}
    for resource in resources:
        rtype = resource.get("resourceType")
        attachments = []
        if rtype == "DocumentReference":
            attachments = [
                c.get("attachment") for c in resource.get("content") or [] if isinstance(c, Mapping)
            ]
        elif rtype == "DiagnosticReport":
            attachments = list(resource.get("presentedForm") or [])
        parts = [_decoded(a) for a in attachments if isinstance(a, Mapping)]
        text = "\n".join(p for p in parts if p)
        if text:
            texts[f"{rtype}/{resource.get('id')}"] = text
    return texts


def _decoded(attachment: Mapping[str, Any]) -> str | None:
    data = attachment.get("data")
    if not isinstance(data, str):
        return None
    try:
        return decode_text(decode_base64(data), str(attachment.get("contentType") or "text/plain"))
    except UnsupportedContent:
        return None
