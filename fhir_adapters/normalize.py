"""From a `PatientRecord` (raw FHIR JSON) to a `ClinicalContext`: citable facts, pure.

Each fact gets a short citation key: a kind prefix and a 1-based index, numbered most recent
date first and ties by resource id, so the same record always gives the same keys.

| prefix | facts from | kept |
|---|---|---|
| P | Patient | one line: sex and age (never the name or the birth date) |
| C | Condition | latest of each code and clinical status |
| M | MedicationRequest | latest of each medication and status |
| A | AllergyIntolerance | every one; `value` holds the reactions |
| E | Encounter | every one; `value` holds the reason |
| L | Observation (not vital-signs) | latest of each code |
| V | Observation (vital-signs) | latest of each code |
| R | Procedure | latest of each code; `value` holds the reason |
| I | Immunization | latest of each vaccine and status |
| N | notes (DocumentReference, DiagnosticReport.presentedForm) | every one; the text cut on a line |

Resources entered in error, refuted, or without any human label cannot be stated and are
added to `skipped` with the reason; the record's own skipped items carry over.

What it must not do: any IO, logging of content, or inventing text that is not in the record.
The patient's name parts are replaced by `[name]` wherever they appear (notes repeat them).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from fhir_adapters.models import ClinicalContext, Fact, FactKind, Note, PatientRecord, Skipped, SourceRef

JsonObject = dict[str, Any]

KEY_ORDER = ("P", "C", "M", "A", "E", "L", "V", "R", "I", "N")
NAME_PLACEHOLDER = "[name]"
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
_SYSTOLIC, _DIASTOLIC = "8480-6", "8462-4"


@dataclass(frozen=True)
class _Draft:
    """A fact before its key is known, with what orders and groups it."""

    fact: Fact
    prefix: str
    sort_date: str  # the full FHIR dateTime, for choosing the latest within a group
    group: tuple[str, ...] | None = None  # facts of one group collapse into the latest


def normalize(record: PatientRecord, *, note_chars: int = 4000, today: date | None = None) -> ClinicalContext:
    """Build the citable context of one patient record (see the module docstring).

    `today` fixes the date ages are computed at; by default the last encounter's date (so the
    same record always gives the same text), or the date of death.
    """
    if note_chars < 1:
        raise ValueError(f"note_chars must be at least 1, got {note_chars}")
    skipped = list(record.skipped)
    drafts: list[_Draft] = []
    builders: list[tuple[str, Callable[[JsonObject], _Draft | str]]] = [
        ("Condition", _condition),
        ("MedicationRequest", functools.partial(_medication, medications=_medications_by_id(record))),
        ("AllergyIntolerance", _allergy),
        ("Encounter", _encounter),
        ("Observation", _observation),
        ("Procedure", _procedure),
        ("Immunization", _immunization),
    ]
    for resource_type, build in builders:
        for resource in record.of_type(resource_type):
            ref = f"{resource_type}/{resource.get('id')}"
            unusable = _unusable(resource)
            outcome = unusable if unusable else build(resource)
            if isinstance(outcome, str):
                skipped.append(Skipped(ref, outcome))
            else:
                drafts.append(outcome)
    drafts.extend(_note(note, seq, note_chars) for seq, note in enumerate(record.notes))

    summary = patient_summary(record.patient, _last_encounter_day(record), today)
    patient_ref = SourceRef.of(record.patient)
    patient_fact = Fact(
        key="P1",
        kind="patient",
        text=f"Patient: {summary.text}",
        source=patient_ref,
        date=summary.as_of,
        status="deceased" if summary.deceased else None,
        display=summary.sex,
        value=summary.age,
    )
    redact = name_redactor(record.patient)
    facts = [patient_fact]
    for prefix in KEY_ORDER[1:]:
        facts.extend(_keyed(prefix, _latest_per_group([d for d in drafts if d.prefix == prefix])))
    facts = [
        replace(f, text=redact(f.text), display=_maybe(redact, f.display), value=_maybe(redact, f.value))
        for f in facts
    ]
    return ClinicalContext(
        patient=patient_ref,
        patient_summary=summary.text,
        facts=facts,
        skipped=skipped,
        encounter=_focus_encounter(record),
        resources=_by_reference(record),
        note_texts=_note_texts(record.notes),
    )


def _note_texts(notes: Iterable[Note]) -> dict[str, str]:
    texts: dict[str, list[str]] = {}
    for note in notes:
        texts.setdefault(note.source.reference, []).append(note.text)
    return {ref: "\n\n".join(parts) for ref, parts in texts.items()}


def _by_reference(record: PatientRecord) -> dict[str, JsonObject]:
    found = {SourceRef.of(record.patient).reference: record.patient}
    for resource_type, resources in record.resources.items():
        found.update({f"{resource_type}/{r.get('id')}": r for r in resources})
    return found


# ---------------------------------------------------------------------------
# Keys, grouping and ordering
# ---------------------------------------------------------------------------


def _keyed(prefix: str, drafts: list[_Draft]) -> list[Fact]:
    """Keys `prefix1..n`: most recent date first, ties by resource id (then input order)."""
    ordered = sorted(enumerate(drafts), key=lambda pair: (pair[1].fact.source.id, pair[0]))
    ordered.sort(key=lambda pair: pair[1].fact.date or "", reverse=True)
    return [replace(d.fact, key=f"{prefix}{i}") for i, (_, d) in enumerate(ordered, start=1)]


def _latest_per_group(drafts: list[_Draft]) -> list[_Draft]:
    """One draft per group: the latest (ties by id); its text says how many records it stands for."""
    groups: dict[tuple[str, ...], list[_Draft]] = {}
    kept: list[_Draft] = []
    for draft in drafts:
        if draft.group is None:
            kept.append(draft)
        else:
            groups.setdefault(draft.group, []).append(draft)
    for members in groups.values():
        # max() returns the first of equal dates: after this sort, the smallest id.
        members.sort(key=lambda d: d.fact.source.id)
        latest = max(members, key=lambda d: d.sort_date)
        if len(members) > 1 and latest.prefix in ("C", "M", "R", "I"):
            noun = "doses" if latest.prefix == "I" else "times"
            latest = replace(
                latest, fact=replace(latest.fact, text=f"{latest.fact.text}; recorded {len(members)} {noun}")
            )
        kept.append(latest)
    return kept


# ---------------------------------------------------------------------------
# Patient
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientSummary:
    text: str
    sex: str | None
    age: str | None
    as_of: str | None
    deceased: bool


def patient_summary(
    patient: JsonObject, last_encounter: str | None, today: date | None = None
) -> PatientSummary:
    """Sex and age of the patient, never the name or the birth date.

    >>> patient_summary({"gender": "female", "birthDate": "2015-05-03"}, "2023-10-02").text
    'female, 8 years old (as of 2023-10-02)'
    >>> patient_summary({"gender": "male", "birthDate": "1933-12-14",
    ...                  "deceasedDateTime": "2001-12-25T10:00:00Z"}, "2001-12-20").text
    'male, died 2001-12-25 aged 68 years'
    >>> patient_summary({"gender": "male", "birthDate": "2020-10-20"}, None, date(2021, 3, 1)).text
    'male, 4 months old (as of 2021-03-01)'
    >>> patient_summary({"deceasedBoolean": True}, None).text
    'sex not recorded, age unknown, deceased'
    """
    sex = _str(patient.get("gender"))
    died = _day(patient.get("deceasedDateTime"))
    deceased = bool(died) or patient.get("deceasedBoolean") is True
    as_of = died or (today.isoformat() if today else None) or last_encounter
    age = age_between(_str(patient.get("birthDate")), as_of)
    parts = [sex or "sex not recorded"]
    if died:
        parts.append(f"died {died} aged {age}" if age else f"died {died}")
    else:
        parts.append(f"{age} old (as of {as_of})" if age else "age unknown")
        if deceased:
            parts.append("deceased")
    return PatientSummary(", ".join(parts), sex, age, as_of if age else died, deceased)


def age_between(birth: str | None, as_of: str | None) -> str | None:
    """Age in whole years (whole months under two); 'about' when the birth date is partial.

    >>> age_between("2015-05-03", "2023-05-02"), age_between("2015-05-03", "2023-05-03")
    ('7 years', '8 years')
    >>> age_between("2023-01-31", "2023-02-28"), age_between("1970", "2020-06-01")
    ('0 months', 'about 50 years')
    >>> age_between(None, "2020-01-01") is None
    True
    """
    start, end = parse_day(birth), parse_day(as_of)
    if start is None or end is None or end < start:
        return None
    months = (end.year - start.year) * 12 + end.month - start.month - (end.day < start.day)
    about = "about " if birth and len(birth) < 10 else ""
    if months < 24:
        return f"{about}{months} month{'s' if months != 1 else ''}"
    years = months // 12
    return f"{about}{years} year{'s' if years != 1 else ''}"


def parse_day(value: str | None) -> date | None:
    """The date a FHIR date or dateTime starts on (a month or year: its first day), or None."""
    if not value:
        return None
    match = re.match(r"(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?", value)
    if not match:
        return None
    try:
        return date(int(match[1]), int(match[2] or 1), int(match[3] or 1))
    except ValueError:
        return None


def _last_encounter_day(record: PatientRecord) -> str | None:
    days = [
        day
        for encounter in record.of_type("Encounter")
        for day in (_day(_path(encounter, "period", "end")), _day(_path(encounter, "period", "start")))
        if day and len(day) == 10
    ]
    return max(days) if days else None


def name_redactor(patient: JsonObject) -> Callable[[str], str]:
    """A function replacing the patient's name parts (given, family, text) by `[name]`.

    Names are matched as written, in capitals and capitalized, not in lower case: a patient
    called May or Hope must not turn "may" and "hope" in a note into `[name]`. Titles ("Mr.")
    are not name parts.

    >>> redact = name_redactor({"name": [{"given": ["Beatris270", "May"], "family": "Bogan287",
    ...                                   "text": "Ms. Beatris270 Bogan287"}]})
    >>> redact("Beatris270\\n is a 8 year-old. BOGAN287 may have asthma. Ms. May agrees.")
    '[name]\\n is a 8 year-old. [name] may have asthma. Ms. [name] agrees.'
    """
    tokens: set[str] = set()
    for name in patient.get("name") or []:
        if not isinstance(name, dict):
            continue
        words = [*(name.get("given") or []), name.get("family"), name.get("text")]
        for word in words:
            if not isinstance(word, str):
                continue
            for token in word.split():
                if token.endswith(".") or len(token.strip(",")) < 2:
                    continue
                token = token.strip(",")
                tokens.update({token, token.upper(), token[:1].upper() + token[1:].lower()})
    if not tokens:
        return lambda text: text
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
    return lambda text: pattern.sub(NAME_PLACEHOLDER, text)


def _maybe(redact: Callable[[str], str], text: str | None) -> str | None:
    return redact(text) if text else text


def _focus_encounter(record: PatientRecord) -> SourceRef | None:
    if not record.encounter_id:
        return None
    for encounter in record.of_type("Encounter"):
        if str(encounter.get("id")) == record.encounter_id:
            return SourceRef.of(encounter)
    return SourceRef("Encounter", record.encounter_id)


# ---------------------------------------------------------------------------
# One builder per resource type: a draft fact, or the reason it cannot be stated
# ---------------------------------------------------------------------------


def _unusable(resource: JsonObject) -> str | None:
    if resource.get("status") == "entered-in-error":
        return "status entered-in-error"
    verification = _code(resource.get("verificationStatus"))
    if verification in ("entered-in-error", "refuted"):
        return f"verificationStatus {verification}"
    return None


def _condition(resource: JsonObject) -> _Draft | str:
    display = codeable_text(resource.get("code"))
    if not display:
        return "code has no text or display"
    status = _code(resource.get("clinicalStatus"))
    onset_full = _first_str(resource, ("onsetDateTime",), ("onsetPeriod", "start"), ("recordedDate",))
    onset = _day(onset_full)
    abated = _day(
        _first_str(resource, ("abatementDateTime",), ("abatementPeriod", "end"), ("abatementPeriod", "start"))
    )
    parts = [f"Condition: {display}", status or "clinical status not recorded"]
    if status in ACTIVE_CONDITION and onset:
        parts[-1] += f" since {onset}"
    elif abated:
        parts[-1] += f" {abated}" if status in ("resolved", "inactive", "remission") else f", abated {abated}"
    if onset and status not in ACTIVE_CONDITION:
        parts.append(f"onset {onset}")
    verification = _code(resource.get("verificationStatus"))
    if verification and verification != "confirmed":
        parts.append(f"verification {verification}")
    code = coding_key(resource.get("code"))
    fact = _fact("condition", resource, ", ".join(parts), onset, status, code, display)
    return _Draft(fact, "C", onset_full or "", (code or display.lower(), status or ""))


def _medications_by_id(record: PatientRecord) -> dict[str, JsonObject]:
    return {str(m.get("id")): m for m in record.of_type("Medication")}


def _medication(resource: JsonObject, medications: dict[str, JsonObject] | None = None) -> _Draft | str:
    display = medication_name(resource, medications)
    if not display:
        return "no medication name (medicationCodeableConcept or medicationReference.display)"
    status = _str(resource.get("status"))
    authored_full = _str(resource.get("authoredOn"))
    authored = _day(authored_full)
    parts = [f"Medication: {display}", status or "status not recorded"]
    if authored:
        parts.append(f"ordered {authored}")
    dosage = [d.get("text") for d in resource.get("dosageInstruction") or [] if isinstance(d, dict)]
    if dosage and isinstance(dosage[0], str) and dosage[0].strip():
        parts.append(f"dosage: {dosage[0].strip()}")
    reason = _reasons(resource)
    if reason:
        parts.append(f"reason: {reason}")
    code = coding_key(resource.get("medicationCodeableConcept"))
    fact = _fact("medication", resource, ", ".join(parts), authored, status, code, display)
    return _Draft(fact, "M", authored_full or "", (code or display.lower(), status or ""))


def _allergy(resource: JsonObject) -> _Draft | str:
    display = codeable_text(resource.get("code"))
    if not display:
        return "code has no text or display"
    status = _code(resource.get("clinicalStatus"))
    recorded_full = _first_str(resource, ("recordedDate",), ("onsetDateTime",), ("lastOccurrence",))
    recorded = _day(recorded_full)
    parts = [f"Allergy: {display}", status or "clinical status not recorded"]
    kind = "/".join(filter(None, [_str(resource.get("type")), *map(_str, resource.get("category") or [])]))
    if kind:
        parts.append(kind)
    if _str(resource.get("criticality")):
        parts.append(f"criticality {resource['criticality']}")
    reactions = []
    for reaction in resource.get("reaction") or []:
        if not isinstance(reaction, dict):
            continue
        for manifestation in reaction.get("manifestation") or []:
            label = codeable_text(manifestation)
            if label:
                severity = _str(reaction.get("severity"))
                reactions.append(f"{label} ({severity})" if severity else label)
    reaction_text = "; ".join(reactions) or None
    if reaction_text:
        parts.append(f"reactions: {reaction_text}")
    if recorded:
        parts.append(f"recorded {recorded}")
    code = coding_key(resource.get("code"))
    fact = _fact("allergy", resource, ", ".join(parts), recorded, status, code, display, value=reaction_text)
    return _Draft(fact, "A", recorded_full or "")


def _encounter(resource: JsonObject) -> _Draft | str:
    types = resource.get("type") or []
    klass = resource.get("class") if isinstance(resource.get("class"), dict) else {}
    class_label = _str(klass.get("display")) or _ENCOUNTER_CLASSES.get(
        str(klass.get("code")), _str(klass.get("code"))
    )
    display = (codeable_text(types[0]) if types else None) or (
        f"{class_label} encounter" if class_label else None
    )
    if not display:
        return "type and class have no text or display"
    start_full = _first_str(resource, ("period", "start"))
    start, end = _day(start_full), _day(_path(resource, "period", "end"))
    status = _str(resource.get("status"))
    when = f"{start} to {end}" if start and end and end != start else (start or "date not recorded")
    head = f"Encounter {when}: {display}"
    if class_label and class_label.lower() not in display.lower():
        head += f" ({class_label})"
    parts = [head, status or "status not recorded"]
    reason = _reasons(resource)
    if reason:
        parts.append(f"reason: {reason}")
    code = coding_key(types[0]) if types else None
    fact = _fact("encounter", resource, ", ".join(parts), start, status, code, display, value=reason)
    return _Draft(fact, "E", start_full or "")


def _observation(resource: JsonObject) -> _Draft | str:
    display = codeable_text(resource.get("code"))
    if not display:
        return "code has no text or display"
    value = observation_value(resource)
    if value is None:
        return "no value, component or dataAbsentReason"
    category = observation_category(resource)
    vital = category == "vital-signs"
    label = "Vital sign" if vital else ("Lab" if category == "laboratory" else "Observation")
    effective_full = _first_str(
        resource, ("effectiveDateTime",), ("effectivePeriod", "start"), ("effectiveInstant",), ("issued",)
    )
    effective = _day(effective_full)
    status = _str(resource.get("status"))
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
    return _Draft(fact, "V" if vital else "L", effective_full or "", (code or display.lower(),))


def _procedure(resource: JsonObject) -> _Draft | str:
    display = codeable_text(resource.get("code"))
    if not display:
        return "code has no text or display"
    performed_full = _first_str(resource, ("performedDateTime",), ("performedPeriod", "start"))
    performed = _day(performed_full)
    status = _str(resource.get("status"))
    parts = [f"Procedure {performed or 'date not recorded'}: {display}", status or "status not recorded"]
    reason = _reasons(resource)
    if reason:
        parts.append(f"reason: {reason}")
    code = coding_key(resource.get("code"))
    fact = _fact("procedure", resource, ", ".join(parts), performed, status, code, display, value=reason)
    return _Draft(fact, "R", performed_full or "", (code or display.lower(),))


def _immunization(resource: JsonObject) -> _Draft | str:
    display = codeable_text(resource.get("vaccineCode"))
    if not display:
        return "vaccineCode has no text or display"
    occurred_full = _first_str(resource, ("occurrenceDateTime",), ("recorded",))
    occurred = _day(occurred_full)
    status = _str(resource.get("status"))
    text = f"Immunization {occurred or 'date not recorded'}: {display}, {status or 'status not recorded'}"
    code = coding_key(resource.get("vaccineCode"))
    fact = _fact("immunization", resource, text, occurred, status, code, display)
    return _Draft(fact, "I", occurred_full or "", (code or display.lower(), status or ""))


def _note(note: Note, seq: int, note_chars: int) -> _Draft:
    # The text is the note alone: date, title and status travel in their own fields, and the
    # prompt renders its own header from them.
    fact = Fact(
        key="",
        kind="note",
        text=truncate_on_line(note.text, note_chars),
        source=note.source,
        date=_day(note.date),
        status=note.status,
        display=note.title or "Clinical note",
    )
    # `seq` keeps two attachments of one resource in their record order.
    return _Draft(fact, "N", f"{note.date or ''}#{seq:06d}")


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


# ---------------------------------------------------------------------------
# Small readers of FHIR datatypes
# ---------------------------------------------------------------------------


def codeable_text(concept: object) -> str | None:
    """CodeableConcept.text, else the first coding's display.

    >>> codeable_text({"coding": [{"code": "1"}, {"display": "Asthma"}]})
    'Asthma'
    >>> codeable_text({"text": " Hypertension ", "coding": [{"display": "HTN"}]})
    'Hypertension'
    """
    if not isinstance(concept, dict):
        return None
    text = _str(concept.get("text"))
    if text:
        return text.strip()
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and _str(coding.get("display")):
            return str(coding["display"]).strip()
    return None


def coding_key(concept: object) -> str | None:
    """`system|code` of the first coding that has a code.

    >>> coding_key({"coding": [{"system": "http://loinc.org", "code": "4548-4"}]})
    'http://loinc.org|4548-4'
    """
    if not isinstance(concept, dict):
        return None
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and _str(coding.get("code")):
            return f"{coding.get('system') or ''}|{coding['code']}"
    return None


def medication_name(resource: JsonObject, medications: dict[str, JsonObject] | None = None) -> str | None:
    """The medication's label: the CodeableConcept, the reference's display, or a contained Medication.

    >>> medication_name({"medicationReference": {"reference": "Medication/1", "display": "Aspirin 81 MG"}})
    'Aspirin 81 MG'
    >>> medication_name({"medicationReference": {"reference": "#m"}, "contained": [
    ...     {"resourceType": "Medication", "id": "m", "code": {"text": "Insulin"}}]})
    'Insulin'
    >>> medication_name({"medicationReference": {"reference": "Medication/1"}}) is None
    True
    >>> medication_name({"medicationReference": {"reference": "Medication/1"}},
    ...                 {"1": {"resourceType": "Medication", "id": "1", "code": {"text": "Vancomycin"}}})
    'Vancomycin'
    """
    name = codeable_text(resource.get("medicationCodeableConcept"))
    if name:
        return name
    reference = resource.get("medicationReference")
    if not isinstance(reference, dict):
        return None
    if _str(reference.get("display")):
        return str(reference["display"]).strip()
    target = reference.get("reference")
    if isinstance(target, str) and target.startswith("#"):
        for contained in resource.get("contained") or []:
            if isinstance(contained, dict) and contained.get("id") == target[1:]:
                return codeable_text(contained.get("code"))
    if isinstance(target, str) and medications:
        # A Medication read beside the order ("Medication/7", or "urn:uuid:7" inside a bundle).
        found = medications.get(target.removeprefix("urn:uuid:").split("/_history")[0].split("/")[-1])
        if found is not None:
            return codeable_text(found.get("code"))
    return None


def observation_category(resource: JsonObject) -> str | None:
    """The first category code; `vital-signs` wins when several are given.

    >>> observation_category({"category": [{"coding": [{"code": "exam"}]},
    ...                                    {"coding": [{"code": "vital-signs"}]}]})
    'vital-signs'
    """
    codes = [
        str(coding["code"])
        for concept in resource.get("category") or []
        if isinstance(concept, dict)
        for coding in concept.get("coding") or []
        if isinstance(coding, dict) and _str(coding.get("code"))
    ]
    if "vital-signs" in codes:
        return "vital-signs"
    return codes[0] if codes else None


def observation_value(resource: JsonObject) -> str | None:
    """The observation's value as shown to a reader, components included.

    >>> observation_value({"valueQuantity": {"value": 6.06, "unit": "%"}})
    '6.06 %'
    >>> mmhg = lambda v: {"value": v, "unit": "mm[Hg]"}
    >>> observation_value({"component": [
    ...     {"code": {"coding": [{"code": "8462-4"}]}, "valueQuantity": mmhg(80)},
    ...     {"code": {"coding": [{"code": "8480-6"}]}, "valueQuantity": mmhg(120.0)}]})
    '120/80 mm[Hg]'
    >>> observation_value({"valueCodeableConcept": {"text": "Never smoked tobacco (finding)"}})
    'Never smoked tobacco (finding)'
    >>> observation_value({"dataAbsentReason": {"text": "Patient refused"}})
    'not available (Patient refused)'
    """
    own = _value_of(resource)
    if own is not None:
        return own
    components = [c for c in resource.get("component") or [] if isinstance(c, dict)]
    blood_pressure = _blood_pressure(components)
    if blood_pressure:
        return blood_pressure
    rendered = []
    for component in components:
        value = _value_of(component)
        label = codeable_text(component.get("code"))
        if value is not None:
            rendered.append(f"{label}: {value}" if label else value)
    if rendered:
        # Survey panels have dozens of answers; the first few say what the panel is about.
        shown = rendered[:6]
        more = f" (+{len(rendered) - 6} more)" if len(rendered) > 6 else ""
        return "; ".join(shown) + more
    absent = codeable_text(resource.get("dataAbsentReason"))
    return f"not available ({absent})" if absent else None


def _blood_pressure(components: list[JsonObject]) -> str | None:
    by_code = {}
    for component in components:
        for coding in _path(component, "code", "coding") or []:
            if isinstance(coding, dict) and coding.get("code") in (_SYSTOLIC, _DIASTOLIC):
                by_code[coding["code"]] = component.get("valueQuantity")
    systolic, diastolic = by_code.get(_SYSTOLIC), by_code.get(_DIASTOLIC)
    if not (isinstance(systolic, dict) and isinstance(diastolic, dict)):
        return None
    if systolic.get("value") is None or diastolic.get("value") is None:
        return None
    unit = _str(systolic.get("unit")) or _str(systolic.get("code")) or ""
    return f"{format_number(systolic['value'])}/{format_number(diastolic['value'])} {unit}".strip()


def _value_of(element: JsonObject) -> str | None:
    quantity = element.get("valueQuantity")
    if isinstance(quantity, dict) and quantity.get("value") is not None:
        unit = _str(quantity.get("unit")) or _str(quantity.get("code")) or ""
        comparator = _str(quantity.get("comparator")) or ""
        return f"{comparator}{format_number(quantity['value'])} {unit}".strip()
    concept = codeable_text(element.get("valueCodeableConcept"))
    if concept:
        return concept
    for key in ("valueString", "valueDateTime", "valueTime"):
        if _str(element.get(key)):
            return str(element[key]).strip()
    if isinstance(element.get("valueBoolean"), bool):
        return "yes" if element["valueBoolean"] else "no"
    if isinstance(element.get("valueInteger"), int):
        return str(element["valueInteger"])
    return None


def format_number(value: object) -> str:
    """A measurement as a reader writes it: no float noise, two decimals above 1, three digits below.

    >>> [format_number(v) for v in (120.0, 6.2, 27.5000001, 0.00512345, 3, 1234.567)]
    ['120', '6.2', '27.5', '0.00512', '3', '1234.57']
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    text = f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    if "e" in text:
        return text
    return text.rstrip("0").rstrip(".") if "." in text else text


def truncate_on_line(text: str, limit: int) -> str:
    """At most `limit` characters, cut at the last line break that fits (else a space), marked.

    >>> truncate_on_line("line one\\nline two\\nline three", 19)
    'line one\\nline two\\n[... truncated]'
    >>> truncate_on_line("short", 100)
    'short'
    """
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = head.rfind("\n")
    if cut <= 0:
        cut = head.rfind(" ")
    if cut <= 0:
        cut = limit
    return head[:cut].rstrip() + "\n[... truncated]"


def _reasons(resource: JsonObject) -> str | None:
    labels = [codeable_text(c) for c in resource.get("reasonCode") or []]
    labels += [_str(r.get("display")) for r in resource.get("reasonReference") or [] if isinstance(r, dict)]
    unique = list(dict.fromkeys(label.strip() for label in labels if label))
    return "; ".join(unique) if unique else None


def _code(concept: object) -> str | None:
    """The first coding's code of a CodeableConcept (clinicalStatus, verificationStatus)."""
    if not isinstance(concept, dict):
        return None
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and _str(coding.get("code")):
            return str(coding["code"])
    return None


def _day(value: object) -> str | None:
    """The date part of a FHIR date/dateTime ("2015", "2015-05" and "2015-05-03" kept as given)."""
    if not isinstance(value, str):
        return None
    match = re.match(r"\d{4}(?:-\d{2}(?:-\d{2})?)?", value)
    return match.group(0) if match else None


def _path(node: object, *steps: str) -> Any:
    for step in steps:
        node = node.get(step) if isinstance(node, dict) else None
    return node


def _first_str(resource: JsonObject, *paths: Iterable[str]) -> str | None:
    for path in paths:
        value = _path(resource, *path)
        if _str(value):
            return str(value)
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


__all__ = [
    "ACTIVE_CONDITION",
    "KEY_ORDER",
    "PatientSummary",
    "age_between",
    "codeable_text",
    "coding_key",
    "format_number",
    "medication_name",
    "name_redactor",
    "normalize",
    "observation_category",
    "observation_value",
    "patient_summary",
    "truncate_on_line",
]
