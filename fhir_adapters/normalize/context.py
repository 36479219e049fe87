"""`normalize`: a `PatientRecord` in, a `ClinicalContext` of keyed, citable facts out. Pure.

The builders (`facts`) draft one fact per usable resource; here the drafts of a group collapse
into the latest, get their keys (kind prefix, most recent first, ties by id), and lose the
patient's name. The table of prefixes is in the package docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import date

from fhir_adapters.models import ClinicalContext, Fact, Note, PatientRecord, Skipped, SourceRef
from fhir_adapters.normalize.datatypes import JsonObject
from fhir_adapters.normalize.facts import Draft, builders, note_draft, unusable
from fhir_adapters.normalize.patient import last_encounter_day, name_redactor, patient_summary

KEY_ORDER = ("P", "C", "M", "A", "E", "L", "V", "R", "I", "N")


def normalize(record: PatientRecord, *, note_chars: int = 4000, today: date | None = None) -> ClinicalContext:
    """Build the citable context of one patient record (see the package docstring).

    `today` fixes the date ages are computed at; by default the last encounter's date (so the
    same record always gives the same text), or the date of death.
    """
    if note_chars < 1:
        raise ValueError(f"note_chars must be at least 1, got {note_chars}")
    skipped = list(record.skipped)
    drafts: list[Draft] = []
    for resource_type, build in builders(record):
        for resource in record.of_type(resource_type):
            ref = f"{resource_type}/{resource.get('id')}"
            reason = unusable(resource)
            outcome = reason if reason else build(resource)
            if isinstance(outcome, str):
                skipped.append(Skipped(ref, outcome))
            else:
                drafts.append(outcome)
    drafts.extend(note_draft(note, seq, note_chars) for seq, note in enumerate(record.notes))

    summary = patient_summary(record.patient, last_encounter_day(record), today)
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


def _keyed(prefix: str, drafts: list[Draft]) -> list[Fact]:
    """Keys `prefix1..n`: most recent date first, ties by resource id (then input order)."""
    ordered = sorted(enumerate(drafts), key=lambda pair: (pair[1].fact.source.id, pair[0]))
    ordered.sort(key=lambda pair: pair[1].fact.date or "", reverse=True)
    return [replace(d.fact, key=f"{prefix}{i}") for i, (_, d) in enumerate(ordered, start=1)]


def _latest_per_group(drafts: list[Draft]) -> list[Draft]:
    """One draft per group: the latest (ties by id); its text says how many records it stands for."""
    groups: dict[tuple[str, ...], list[Draft]] = {}
    kept: list[Draft] = []
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


def _maybe(redact: Callable[[str], str], text: str | None) -> str | None:
    return redact(text) if text else text


def _focus_encounter(record: PatientRecord) -> SourceRef | None:
    if not record.encounter_id:
        return None
    for encounter in record.of_type("Encounter"):
        if str(encounter.get("id")) == record.encounter_id:
            return SourceRef.of(encounter)
    return SourceRef("Encounter", record.encounter_id)
