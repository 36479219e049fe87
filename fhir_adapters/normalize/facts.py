"""One builder per resource type: a draft fact, or the reason the resource cannot be stated.

A `Draft` is a fact before its citation key is known; `normalize` numbers the drafts and keeps
the latest of each group. Each builder reads one resource and nothing else. Pure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from fhir_adapters.models import Fact, FactKind, Note, PatientRecord, SourceRef
from fhir_adapters.normalize.datatypes import (
    JsonObject,
    codeable_text,
    coding_key,
    day_of,
    first_code,
    first_str,
    medication_name,
    nonblank,
    observation_category,
    observation_value,
    path_of,
    reasons,
    truncate_on_line,
)

ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
_ENCOUNTER_CLASSES = {
    "AMB": "ambulatory",
    "EMER": "emergency",
    "IMP": "inpatient",
    "ACUTE": "inpatient acute",
    "NONAC": "inpatient non-acute",
    "OBSENC": "observation",
    "PRENC": "pre-admission",
    "SS": "short stay",
    "VR": "virtual",
    "HH": "home health",
    "FLD": "field",
}
# Statuses that mean a result or order is not (yet) the final word; shown next to the value.
_FINAL_OBSERVATION = frozenset({"final", "amended", "corrected"})


@dataclass(frozen=True)
class Draft:
    """A fact before its key is known, with what orders and groups it."""

    fact: Fact
    prefix: str
    sort_date: str  # the full FHIR dateTime, for choosing the latest within a group
    group: tuple[str, ...] | None = None  # facts of one group collapse into the latest


Builder = Callable[[JsonObject], Draft | str]


def builders(record: PatientRecord) -> list[tuple[str, Builder]]:
    """The builder of each resource type facts are made from, in the order they are drafted."""
    return [
        ("Condition", _condition),
        ("MedicationRequest", functools.partial(_medication, medications=_medications_by_id(record))),
        ("AllergyIntolerance", _allergy),
        ("Encounter", _encounter),
        ("Observation", _observation),
        ("Procedure", _procedure),
        ("Immunization", _immunization),
    ]


def unusable(resource: JsonObject) -> str | None:
    """Why a resource cannot be stated at all (entered in error, refuted), or None."""
    if resource.get("status") == "entered-in-error":
        return "status entered-in-error"
    verification = first_code(resource.get("verificationStatus"))
    if verification in ("entered-in-error", "refuted"):
        return f"verificationStatus {verification}"
    return None


def _condition(resource: JsonObject) -> Draft | str:
    display = codeable_text(resource.get("code"))
    if not display:
        return "code has no text or display"
    status = first_code(resource.get("clinicalStatus"))
    onset_full = first_str(resource, ("onsetDateTime",), ("onsetPeriod", "start"), ("recordedDate",))
    onset = day_of(onset_full)
    abated = day_of(
        first_str(resource, ("abatementDateTime",), ("abatementPeriod", "end"), ("abatementPeriod", "start"))
    )
    parts = [f"Condition: {display}", status or "clinical status not recorded"]
    if status in ACTIVE_CONDITION and onset:
        parts[-1] += f" since {onset}"
    elif abated:
        parts[-1] += f" {abated}" if status in ("resolved", "inactive", "remission") else f", abated {abated}"
    if onset and status not in ACTIVE_CONDITION:
        parts.append(f"onset {onset}")
    verification = first_code(resource.get("verificationStatus"))
    if verification and verification != "confirmed":
        parts.append(f"verification {verification}")
    code = coding_key(resource.get("code"))
    fact = _fact("condition", resource, ", ".join(parts), onset, status, code, display)
    return Draft(fact, "C", onset_full or "", (code or display.lower(), status or ""))


def _medications_by_id(record: PatientRecord) -> dict[str, JsonObject]:
    return {str(m.get("id")): m for m in record.of_type("Medication")}


def _medication(resource: JsonObject, medications: dict[str, JsonObject] | None = None) -> Draft | str:
    display = medication_name(resource, medications)
    if not display:
        return "no medication name (medicationCodeableConcept or medicationReference.display)"
    status = nonblank(resource.get("status"))
    authored_full = nonblank(resource.get("authoredOn"))
    authored = day_of(authored_full)
    parts = [f"Medication: {display}", status or "status not recorded"]
    if authored:
        parts.append(f"ordered {authored}")
    dosage = [d.get("text") for d in resource.get("dosageInstruction") or [] if isinstance(d, dict)]
    if dosage and isinstance(dosage[0], str) and dosage[0].strip():
        parts.append(f"dosage: {dosage[0].strip()}")
    reason = reasons(resource)
    if reason:
        parts.append(f"reason: {reason}")
    code = coding_key(resource.get("medicationCodeableConcept"))
    fact = _fact("medication", resource, ", ".join(parts), authored, status, code, display)
    return Draft(fact, "M", authored_full or "", (code or display.lower(), status or ""))


def _allergy(resource: JsonObject) -> Draft | str:
    display = codeable_text(resource.get("code"))
    if not display:
        return "code has no text or display"
    status = first_code(resource.get("clinicalStatus"))
    recorded_full = first_str(resource, ("recordedDate",), ("onsetDateTime",), ("lastOccurrence",))
    recorded = day_of(recorded_full)
    parts = [f"Allergy: {display}", status or "clinical status not recorded"]
    categories = map(nonblank, resource.get("category") or [])
    kind = "/".join(filter(None, [nonblank(resource.get("type")), *categories]))
    if kind:
        parts.append(kind)
    if nonblank(resource.get("criticality")):
        parts.append(f"criticality {resource['criticality']}")
    reactions = []
    for reaction in resource.get("reaction") or []:
        if not isinstance(reaction, dict):
            continue
        for manifestation in reaction.get("manifestation") or []:
            label = codeable_text(manifestation)
            if label:
                severity = nonblank(reaction.get("severity"))
                reactions.append(f"{label} ({severity})" if severity else label)
    reaction_text = "; ".join(reactions) or None
    if reaction_text:
        parts.append(f"reactions: {reaction_text}")
    if recorded:
        parts.append(f"recorded {recorded}")
    code = coding_key(resource.get("code"))
    fact = _fact("allergy", resource, ", ".join(parts), recorded, status, code, display, value=reaction_text)
    return Draft(fact, "A", recorded_full or "")


def _encounter(resource: JsonObject) -> Draft | str:
    types = resource.get("type") or []
    klass_value = resource.get("class")
    klass: JsonObject = klass_value if isinstance(klass_value, dict) else {}
    class_label = nonblank(klass.get("display")) or _ENCOUNTER_CLASSES.get(
        str(klass.get("code")), nonblank(klass.get("code"))
    )
    display = (codeable_text(types[0]) if types else None) or (
        f"{class_label} encounter" if class_label else None
    )
    if not display:
        return "type and class have no text or display"
    start_full = first_str(resource, ("period", "start"))
    start, end = day_of(start_full), day_of(path_of(resource, "period", "end"))
    status = nonblank(resource.get("status"))
    when = f"{start} to {end}" if start and end and end != start else (start or "date not recorded")
    head = f"Encounter {when}: {display}"
    if class_label and class_label.lower() not in display.lower():
        head += f" ({class_label})"
    parts = [head, status or "status not recorded"]
    reason = reasons(resource)
    if reason:
        parts.append(f"reason: {reason}")
    code = coding_key(types[0]) if types else None
    fact = _fact("encounter", resource, ", ".join(parts), start, status, code, display, value=reason)
    return Draft(fact, "E", start_full or "")


def _observation(resource: JsonObject) -> Draft | str:
    display = codeable_text(resource.get("code"))
    if not display:
        return "code has no text or display"
    value = observation_value(resource)
    if value is None:
        return "no value, component or dataAbsentReason"
    category = observation_category(resource)
    vital = category == "vital-signs"
    label = "Vital sign" if vital else ("Lab" if category == "laboratory" else "Observation")
    effective_full = first_str(
        resource, ("effectiveDateTime",), ("effectivePeriod", "start"), ("effectiveInstant",), ("issued",)
    )
    effective = day_of(effective_full)
    status = nonblank(resource.get("status"))
    text = f"{label} {effective or 'date not recorded'}: {display} = {value}"
    interpretation = [codeable_text(i) for i in resource.get("interpretation") or []]
    if interpretation and interpretation[0]:
        text += f" ({interpretation[0]})"
    if status and status not in _FINAL_OBSERVATION:
        text += f", {status}"
    code = coding_key(resource.get("code"))
    fact = _fact(
        "observation", resource, text, effective, status, code, display, value=value, category=category
    )
    return Draft(fact, "V" if vital else "L", effective_full or "", (code or display.lower(),))


def _procedure(resource: JsonObject) -> Draft | str:
    display = codeable_text(resource.get("code"))
    if not display:
        return "code has no text or display"
    performed_full = first_str(resource, ("performedDateTime",), ("performedPeriod", "start"))
    performed = day_of(performed_full)
    status = nonblank(resource.get("status"))
    parts = [f"Procedure {performed or 'date not recorded'}: {display}", status or "status not recorded"]
    reason = reasons(resource)
    if reason:
        parts.append(f"reason: {reason}")
    code = coding_key(resource.get("code"))
    fact = _fact("procedure", resource, ", ".join(parts), performed, status, code, display, value=reason)
    return Draft(fact, "R", performed_full or "", (code or display.lower(),))


def _immunization(resource: JsonObject) -> Draft | str:
    display = codeable_text(resource.get("vaccineCode"))
    if not display:
        return "vaccineCode has no text or display"
    occurred_full = first_str(resource, ("occurrenceDateTime",), ("recorded",))
    occurred = day_of(occurred_full)
    status = nonblank(resource.get("status"))
    text = f"Immunization {occurred or 'date not recorded'}: {display}, {status or 'status not recorded'}"
    code = coding_key(resource.get("vaccineCode"))
    fact = _fact("immunization", resource, text, occurred, status, code, display)
    return Draft(fact, "I", occurred_full or "", (code or display.lower(), status or ""))


def note_draft(note: Note, seq: int, note_chars: int) -> Draft:
    # The text is the note alone: date, title and status travel in their own fields, and the
    # prompt renders its own header from them.
    fact = Fact(
        key="",
        kind="note",
        text=truncate_on_line(note.text, note_chars),
        source=note.source,
        date=day_of(note.date),
        status=note.status,
        display=note.title or "Clinical note",
    )
    # `seq` keeps two attachments of one resource in their record order.
    return Draft(fact, "N", f"{note.date or ''}#{seq:06d}")


def _fact(
    kind: FactKind,
    resource: JsonObject,
    text: str,
    day: str | None,
    status: str | None,
    code: str | None,
    display: str,
    *,
    value: str | None = None,
    category: str | None = None,
) -> Fact:
    return Fact(
        key="",
        kind=kind,
        text=text,
        source=SourceRef.of(resource),
        date=day,
        status=status,
        code=code,
        display=display,
        value=value,
        category=category,
    )
