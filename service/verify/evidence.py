"""What one cited FHIR resource states, in the forms a claim is checked against.

`evidence_of(resource)` reads a resource's human labels (every coding display and text), its
dates by role (onset, abatement, authored, effective, birth, death ...), its quantities with
units (values, components, strengths inside a medication name, dosage), its status as "active"
or "inactive", and for a note its whole text. Words of coded values that have no display are
spelled out (Encounter class AMB -> "ambulatory outpatient", a dosage timing of once a day ->
"once daily", criticality "low" -> "low criticality").

Pure: no IO. The record-wide facts a resource cannot know about itself (is this Observation the
latest of its code?) are passed in by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.verify.dates import day_of, find_dates, widen
from service.verify.quantities import Quantity, canonical_unit, normal_number, read_quantities
from service.verify.words import IMPLIED, STOP, stems, tokens, with_aliases

JsonObject = Mapping[str, Any]

_ENCOUNTER_CLASS_WORDS = {
    "AMB": "ambulatory outpatient office clinic",
    "EMER": "emergency department room er ed",
    "IMP": "inpatient admission admitted hospital hospitalization hospitalized stay",
    "ACUTE": "inpatient acute admission admitted hospital",
    "NONAC": "inpatient non acute admission",
    "OBSENC": "observation",
    "PRENC": "pre admission",
    "SS": "short stay",
    "VR": "virtual telehealth video telephone",
    "HH": "home health",
    "FLD": "field",
}
_ACTIVE = {
    "Condition": {"active", "recurrence", "relapse"},
    "AllergyIntolerance": {"active"},
    "MedicationRequest": {"active", "on-hold", "draft"},
}
_INACTIVE = {
    "Condition": {"inactive", "remission", "resolved"},
    "AllergyIntolerance": {"inactive", "resolved"},
    "MedicationRequest": {"stopped", "completed", "cancelled"},
}
_PERIOD_UNITS = {"h": "hours", "d": "days", "wk": "weeks", "mo": "months", "min": "minutes", "a": "years"}
_TIMES = {1: "once", 2: "twice", 3: "three times", 4: "four times"}
_SYSTOLIC, _DIASTOLIC = "8480-6", "8462-4"


@dataclass(frozen=True)
class SourceEvidence:
    """One cited resource, ready to check claims against."""

    reference: str  # "Condition/123"
    resource_type: str
    label: str  # the main human label, for reasons shown to the reviewer
    stems: frozenset[str]  # every word it states, stemmed, with aliases
    sequence: tuple[str, ...]  # its text's stems in order, stop words left out (phrase checks)
    dates: Mapping[str, frozenset[str]]  # role -> ISO days (with their months and years)
    quantities: tuple[Quantity, ...] = ()
    status: str | None = None  # "active" | "inactive" | None when the type has no such status
    is_note: bool = False
    gender: str | None = None
    deceased: str | None = None  # a date, "yes" for deceasedBoolean, None when alive
    birth_date: str | None = None
    latest: bool | None = None  # the latest of its code in the record (None: not known)
    implied: frozenset[str] = field(default_factory=frozenset)

    @property
    def all_dates(self) -> frozenset[str]:
        return frozenset().union(*self.dates.values()) if self.dates else frozenset()


def evidence_of(
    resource: JsonObject,
    *,
    note_text: str | None = None,
    latest: bool | None = None,
    related: Sequence[JsonObject] = (),
) -> SourceEvidence:
    """The evidence of one resource; `note_text` is the decoded text of a note resource, `related`
    the resources it names by reference (an order's Medication), whose labels it states too."""
    rtype = str(resource.get("resourceType", ""))
    labels = _labels(rtype, resource) + [t for r in related for t in _concepts(r.get("code"))]
    extra = _spelled_out(rtype, resource)
    text_parts = [*labels, *extra]
    quantities = list(_quantities(rtype, resource))
    if note_text is not None:
        text_parts.append(note_text)
    for label in labels:
        found, _pairs, _rest = read_quantities(find_dates(label)[1])
        quantities.extend(found)
    if note_text is not None:
        found, pairs, _rest = read_quantities(find_dates(note_text)[1])
        quantities.extend(found)
        quantities.extend(q for pair in pairs for q in pair)
    words = tokens(" ".join(text_parts))
    stemmed = stems(words)
    gender = resource.get("gender") if rtype == "Patient" else None
    deceased = None
    if rtype == "Patient":
        deceased = day_of(resource.get("deceasedDateTime")) or (
            "yes" if resource.get("deceasedBoolean") else None
        )
    return SourceEvidence(
        reference=f"{rtype}/{resource.get('id')}",
        resource_type=rtype,
        label=labels[0] if labels else rtype,
        stems=with_aliases(stemmed),
        sequence=tuple(s for s in stemmed if s not in STOP),
        dates=_dates(rtype, resource),
        quantities=tuple(quantities),
        status=_status(rtype, resource),
        is_note=note_text is not None,
        gender=str(gender) if gender else None,
        deceased=deceased,
        birth_date=day_of(resource.get("birthDate")) if rtype == "Patient" else None,
        latest=latest,
        implied=IMPLIED.get(rtype, frozenset()),
    )


# --- labels and spelled-out codes ----------------------------------------------------------------


def _concept_texts(concept: object) -> list[str]:
    if not isinstance(concept, Mapping):
        return []
    texts = [str(concept["text"])] if concept.get("text") else []
    for coding in concept.get("coding") or []:
        if isinstance(coding, Mapping) and coding.get("display"):
            texts.append(str(coding["display"]))
    return list(dict.fromkeys(texts))


def _concepts(value: object) -> list[str]:
    if isinstance(value, list):
        return [t for item in value for t in _concept_texts(item)]
    return _concept_texts(value)


def _labels(rtype: str, r: JsonObject) -> list[str]:
    """Human labels, the main one first."""
    main = {
        "Condition": "code",
        "AllergyIntolerance": "code",
        "Procedure": "code",
        "Observation": "code",
        "Immunization": "vaccineCode",
        "MedicationRequest": "medicationCodeableConcept",
        "MedicationStatement": "medicationCodeableConcept",
        "Encounter": "type",
        "DocumentReference": "type",
        "DiagnosticReport": "code",
    }.get(rtype)
    labels = _concepts(r.get(main)) if main else []
    for key in ("reasonCode", "bodySite", "category", "severity", "valueCodeableConcept", "serviceType"):
        if rtype in ("Condition", "Observation") and key == "category":
            continue  # "problem-list-item", "vital-signs": not what the claim is about
        labels.extend(_concepts(r.get(key)))
    if rtype == "MedicationRequest":
        labels.extend(_concepts(r.get("medicationReference")))
    if rtype == "Observation":
        for component in r.get("component") or []:
            if isinstance(component, Mapping):
                labels.extend(_concepts(component.get("code")))
                labels.extend(_concepts(component.get("valueCodeableConcept")))
        if isinstance(r.get("valueString"), str):
            labels.append(r["valueString"])
    if rtype == "AllergyIntolerance":
        for reaction in r.get("reaction") or []:
            if isinstance(reaction, Mapping):
                labels.extend(_concepts(reaction.get("substance")))
                labels.extend(_concepts(reaction.get("manifestation")))
    if rtype in ("DocumentReference", "DiagnosticReport"):
        labels.extend(str(c["attachment"]["title"]) for c in r.get("content") or [] if _title(c))
    return [label for label in labels if label]


def _title(content: object) -> bool:
    return (
        isinstance(content, Mapping)
        and isinstance(content.get("attachment"), Mapping)
        and bool(content["attachment"].get("title"))
    )


def _spelled_out(rtype: str, r: JsonObject) -> list[str]:
    """Words for coded values that carry no display text."""
    words: list[str] = []
    if rtype == "Encounter":
        klass = r.get("class")
        code = klass.get("code") if isinstance(klass, Mapping) else None
        if code:
            words.append(_ENCOUNTER_CLASS_WORDS.get(str(code), str(code)))
            if isinstance(klass, Mapping) and klass.get("display"):
                words.append(str(klass["display"]))
    if rtype == "AllergyIntolerance":
        if r.get("criticality"):
            words.append(f"{r['criticality']} criticality".replace("unable-to-assess", "unable to assess"))
        words.extend(str(c) for c in r.get("category") or [])
        if r.get("type"):
            words.append(str(r["type"]))
        for reaction in r.get("reaction") or []:
            if isinstance(reaction, Mapping) and reaction.get("severity"):
                words.append(str(reaction["severity"]))
    if rtype == "MedicationRequest":
        words.extend(_dosage_words(r.get("dosageInstruction") or []))
    if rtype == "Patient" and r.get("gender"):
        words.append(
            {"female": "female woman girl", "male": "male man boy"}.get(str(r["gender"]), str(r["gender"]))
        )
    return words


def _dosage_words(dosages: Iterable[object]) -> list[str]:
    words: list[str] = []
    for dosage in dosages:
        if not isinstance(dosage, Mapping):
            continue
        if dosage.get("text"):
            words.append(str(dosage["text"]))
        if dosage.get("asNeededBoolean") or dosage.get("asNeededCodeableConcept"):
            words.append("as needed prn when required")
            words.extend(_concepts(dosage.get("asNeededCodeableConcept")))
        timing = dosage.get("timing")
        repeat = timing.get("repeat") if isinstance(timing, Mapping) else None
        if isinstance(repeat, Mapping):
            words.extend(_repeat_words(repeat))
        if isinstance(timing, Mapping):
            words.extend(_concepts(timing.get("code")))
        words.extend(_concepts(dosage.get("route")))
    return words


def _repeat_words(repeat: Mapping[str, Any]) -> list[str]:
    frequency, period, unit = repeat.get("frequency"), repeat.get("period"), repeat.get("periodUnit")
    words: list[str] = []
    if isinstance(frequency, int | float) and isinstance(period, int | float) and unit:
        times = _TIMES.get(int(frequency), f"{int(frequency)} times")
        unit_word = _PERIOD_UNITS.get(str(unit), str(unit))
        if float(period) == 1:
            adverb = {
                "days": "daily day",
                "weeks": "weekly week",
                "months": "monthly month",
                "hours": "hourly hour",
            }
            words.append(f"{times} {adverb.get(unit_word, unit_word)} a per every")
            if int(frequency) == 1:
                words.append(f"every {unit_word.rstrip('s')}")
        else:
            words.append(f"{times} every {normal_number(str(period))} {unit_word}")
    for when in repeat.get("when") or []:
        words.append(
            {
                "HS": "at bedtime",
                "WAKE": "on waking",
                "C": "with meals",
                "AC": "before meals",
                "PC": "after meals",
                "MORN": "in the morning",
                "EVE": "in the evening",
            }.get(str(when), str(when))
        )
    return words


# --- dates, quantities, status -------------------------------------------------------------------

_DATE_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "Patient": (("birth", "birthDate"), ("death", "deceasedDateTime")),
    "Condition": (("onset", "onsetDateTime"), ("onset", "recordedDate"), ("abatement", "abatementDateTime"),
                  ("onset", "onsetPeriod.start"), ("abatement", "onsetPeriod.end")),
    "MedicationRequest": (("authored", "authoredOn"), ("authored", "dispenseRequest.validityPeriod.start")),
    "AllergyIntolerance": (("onset", "recordedDate"), ("onset", "onsetDateTime"), ("last", "lastOccurrence")),
    "Encounter": (("start", "period.start"), ("end", "period.end")),
    "Observation": (("effective", "effectiveDateTime"), ("effective", "effectivePeriod.start"),
                    ("effective", "issued")),
    "Procedure": (("performed", "performedDateTime"), ("performed", "performedPeriod.start"),
                  ("performed", "performedPeriod.end")),
    "Immunization": (("occurrence", "occurrenceDateTime"), ("occurrence", "recorded")),
    "DocumentReference": (("note", "date"), ("note", "context.period.start"),
                          ("note", "context.period.end")),
    "DiagnosticReport": (("note", "effectiveDateTime"), ("note", "issued"),
                         ("note", "effectivePeriod.start")),
}  # fmt: skip


def _path(r: JsonObject, dotted: str) -> object:
    value: object = r
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _dates(rtype: str, r: JsonObject) -> dict[str, frozenset[str]]:
    by_role: dict[str, set[str]] = {}
    for role, dotted in _DATE_FIELDS.get(rtype, ()):
        day = day_of(_path(r, dotted))
        if day:
            by_role.setdefault(role, set()).update(widen(day))
    if rtype == "Encounter":  # every day of a stay
        by_role.setdefault("start", set())
    return {role: frozenset(days) for role, days in by_role.items()}


def _quantities(rtype: str, r: JsonObject) -> Iterable[Quantity]:
    if rtype == "Observation":
        yield from _value_quantity(r.get("valueQuantity"), None)
        for component in r.get("component") or []:
            if not isinstance(component, Mapping):
                continue
            codes = {str(c.get("code")) for c in (component.get("code") or {}).get("coding") or []}
            role = "systolic" if _SYSTOLIC in codes else "diastolic" if _DIASTOLIC in codes else None
            yield from _value_quantity(component.get("valueQuantity"), role)
    if rtype == "MedicationRequest":
        for dosage in r.get("dosageInstruction") or []:
            for rate in (dosage or {}).get("doseAndRate") or []:
                yield from _value_quantity((rate or {}).get("doseQuantity"), "dose")
    if rtype == "Immunization":
        yield from _value_quantity(r.get("doseQuantity"), "dose")


def _value_quantity(quantity: object, role: str | None) -> Iterable[Quantity]:
    if not isinstance(quantity, Mapping) or not isinstance(quantity.get("value"), int | float):
        return
    value = normal_number(
        repr(quantity["value"]) if isinstance(quantity["value"], float) else str(quantity["value"])
    )
    unit = canonical_unit(str(quantity.get("code") or quantity.get("unit") or "")) or canonical_unit(
        str(quantity.get("unit") or "")
    )
    yield Quantity(value, unit, role)


def _status(rtype: str, r: JsonObject) -> str | None:
    if rtype not in _ACTIVE:
        return None
    raw = r.get("clinicalStatus") if rtype != "MedicationRequest" else r.get("status")
    code = raw if isinstance(raw, str) else None
    if isinstance(raw, Mapping):
        code = next((str(c.get("code")) for c in raw.get("coding") or [] if c.get("code")), None)
    if code in _ACTIVE[rtype]:
        return "active"
    if code in _INACTIVE[rtype]:
        return "inactive"
    return None
