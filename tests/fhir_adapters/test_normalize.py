"""normalize over real Synthea records (read through fetch and the fake source) and small tables."""

from __future__ import annotations

import copy
import doctest
import random
import re
from datetime import date
from typing import Any

import pytest

import fhir_adapters.normalize.context
import fhir_adapters.normalize.datatypes
import fhir_adapters.normalize.facts
import fhir_adapters.normalize.patient
import fhir_adapters.text
from fhir_adapters.fetch import fetch_record
from fhir_adapters.models import ClinicalContext, Fact, Note, PatientRecord, Skipped, SourceRef
from fhir_adapters.normalize import normalize
from tests.fakes import FakeFhirSource, bundle_patient, bundle_resources, load_synthea

LOINC = "http://loinc.org"
PREFIXES = {
    "patient": "P",
    "condition": "C",
    "medication": "M",
    "allergy": "A",
    "encounter": "E",
    "procedure": "R",
    "immunization": "I",
    "note": "N",
}


async def read(prefix: str) -> tuple[dict[str, Any], PatientRecord]:
    bundle = load_synthea(prefix)
    source = FakeFhirSource.from_bundle(bundle)
    record = await fetch_record(source, str(bundle_patient(bundle)["id"]), observation_limit=5000)
    return bundle, record


def code_of(resource: dict[str, Any], element: str = "code") -> str:
    coding = resource[element]["coding"][0]
    return f"{coding['system']}|{coding['code']}"


def latest(resources: list[dict[str, Any]], date_field: str) -> dict[str, Any]:
    return max(resources, key=lambda r: r[date_field])


def fact_with_code(ctx: ClinicalContext, code: str) -> Fact:
    (fact,) = [f for f in ctx.facts if f.code == code]
    return fact


def name_parts(patient: dict[str, Any]) -> set[str]:
    return {part for name in patient["name"] for part in [*name.get("given", []), name["family"]]}


def all_text(ctx: ClinicalContext) -> str:
    return "\n".join(
        [ctx.patient_summary, *(f.text for f in ctx.facts), *(f.display or "" for f in ctx.facts)]
    )


def test_normalize_and_text_doctests_pass() -> None:
    for module in (
        fhir_adapters.normalize.context,
        fhir_adapters.normalize.datatypes,
        fhir_adapters.normalize.facts,
        fhir_adapters.normalize.patient,
    ):
        assert doctest.testmod(module).failed == 0
    assert doctest.testmod(fhir_adapters.text).failed == 0


# ---------------------------------------------------------------------------
# Real records
# ---------------------------------------------------------------------------


async def test_normalize_beatris_lists_every_active_condition_of_the_bundle() -> None:
    bundle, record = await read("Beatris270")

    ctx = normalize(record)

    raw_active = {
        code_of(c)
        for c in bundle_resources(bundle, "Condition")
        if c["clinicalStatus"]["coding"][0]["code"] == "active"
    }
    facts_active = {f.code for f in ctx.of_kind("condition") if f.status == "active"}
    assert facts_active == raw_active
    assert len([f for f in ctx.of_kind("condition") if f.status == "active"]) == len(raw_active)


async def test_normalize_beatris_turns_every_note_into_a_dated_fact_with_status() -> None:
    bundle, record = await read("Beatris270")

    ctx = normalize(record)

    notes = ctx.of_kind("note")
    docs = bundle_resources(bundle, "DocumentReference")
    assert len(notes) == len(docs)
    newest = latest(docs, "date")
    assert notes[0].source.id == newest["id"]
    assert notes[0].key == "N1"
    assert notes[0].status == "current"
    assert notes[0].date == newest["date"][:10]
    assert {n.status for n in notes[1:]} == {"superseded"}


async def test_normalize_never_puts_the_patients_name_in_any_text() -> None:
    for prefix in ("Beatris270", "Allen322", "Luigi"):
        bundle, record = await read(prefix)
        parts = name_parts(bundle_patient(bundle))
        assert (
            any(p in note.text for note in record.notes for p in parts) or not record.notes
        )  # notes repeat it

        text = all_text(normalize(record)).casefold()

        assert not [p for p in parts if p.casefold() in text], prefix


async def test_normalize_states_sex_and_age_at_the_last_encounter_and_never_the_birth_date() -> None:
    bundle, record = await read("Beatris270")
    patient = bundle_patient(bundle)
    last = max(e["period"]["start"][:10] for e in bundle_resources(bundle, "Encounter"))
    born = date.fromisoformat(patient["birthDate"])
    at = date.fromisoformat(last)
    years = at.year - born.year - ((at.month, at.day) < (born.month, born.day))

    ctx = normalize(record)

    assert ctx.patient_summary == f"{patient['gender']}, {years} years old (as of {last})"
    (p1,) = ctx.of_kind("patient")
    assert (p1.key, p1.source.reference) == ("P1", f"Patient/{patient['id']}")
    # The birth date itself is not stated (a newborn visit on that day is, as an encounter date).
    assert patient["birthDate"] not in ctx.patient_summary and patient["birthDate"] not in p1.text


async def test_normalize_allen_keeps_the_latest_hba1c_and_blood_pressure() -> None:
    bundle, record = await read("Allen322")
    observations = bundle_resources(bundle, "Observation")
    a1c = latest([o for o in observations if code_of(o) == f"{LOINC}|4548-4"], "effectiveDateTime")
    bp = latest([o for o in observations if code_of(o) == f"{LOINC}|85354-9"], "effectiveDateTime")
    systolic = next(c for c in bp["component"] if c["code"]["coding"][0]["code"] == "8480-6")
    diastolic = next(c for c in bp["component"] if c["code"]["coding"][0]["code"] == "8462-4")

    ctx = normalize(record)

    a1c_fact = fact_with_code(ctx, f"{LOINC}|4548-4")
    assert a1c_fact.key.startswith("L")
    assert a1c_fact.category == "laboratory"
    assert a1c_fact.source.id == a1c["id"]
    assert a1c_fact.date == a1c["effectiveDateTime"][:10]
    number, unit = a1c_fact.value.split(" ")  # type: ignore[union-attr]
    assert float(number) == pytest.approx(a1c["valueQuantity"]["value"], abs=0.005)
    assert unit == "%"
    bp_fact = fact_with_code(ctx, f"{LOINC}|85354-9")
    assert bp_fact.key.startswith("V")
    assert bp_fact.value == (
        f"{systolic['valueQuantity']['value']:g}/{diastolic['valueQuantity']['value']:g} mm[Hg]"
    )
    assert bp_fact.value in bp_fact.text


async def test_normalize_allen_keeps_one_fact_per_observation_code() -> None:
    bundle, record = await read("Allen322")
    raw_codes = {code_of(o) for o in bundle_resources(bundle, "Observation")}

    ctx = normalize(record)

    codes = [f.code for f in ctx.of_kind("observation")]
    assert sorted(codes) == sorted(raw_codes)  # type: ignore[type-var]


async def test_normalize_allen_lists_active_medications_and_active_allergies_of_the_bundle() -> None:
    bundle, record = await read("Allen322")
    raw_meds = {m["medicationCodeableConcept"]["text"] for m in bundle_resources(bundle, "MedicationRequest")
                if m["status"] == "active"}  # fmt: skip
    raw_allergies = {a["code"]["text"] for a in bundle_resources(bundle, "AllergyIntolerance")}

    ctx = normalize(record)

    assert {f.display for f in ctx.of_kind("medication") if f.status == "active"} == raw_meds
    assert {f.display for f in ctx.of_kind("allergy") if f.status == "active"} == raw_allergies
    stopped = {f.display for f in ctx.of_kind("medication") if f.status == "stopped"}
    assert all(
        sum(f.display == name for f in ctx.of_kind("medication") if f.status == "stopped") == 1
        for name in stopped
    )


async def test_normalize_gives_the_same_keys_whatever_order_the_server_returned() -> None:
    _, record = await read("Allen322")
    shuffled = copy.deepcopy(record)
    rng = random.Random(7)
    for resources in shuffled.resources.values():
        rng.shuffle(resources)
    rng.shuffle(shuffled.notes)

    first, again, other_order = normalize(record), normalize(record), normalize(shuffled)

    assert first == again
    assert [(f.key, f.source, f.text) for f in first.facts] == [
        (f.key, f.source, f.text) for f in other_order.facts
    ]


async def test_normalize_numbers_keys_per_kind_most_recent_first() -> None:
    _, record = await read("Allen322")

    ctx = normalize(record)

    by_prefix: dict[str, list[Fact]] = {}
    for fact in ctx.facts:
        by_prefix.setdefault(re.sub(r"\d+$", "", fact.key), []).append(fact)
    for prefix, facts in by_prefix.items():
        assert [f.key for f in facts] == [f"{prefix}{i}" for i in range(1, len(facts) + 1)]
        dates = [f.date or "" for f in facts]
        assert dates == sorted(dates, reverse=True), prefix
        for fact in facts:
            if fact.kind != "observation":
                assert PREFIXES[fact.kind] == prefix
            else:
                assert prefix == ("V" if fact.category == "vital-signs" else "L")
    assert len(ctx.by_key()) == len(ctx.facts)


async def test_normalize_luigi_has_no_conditions_or_notes_and_an_age_in_months() -> None:
    bundle, record = await read("Luigi")
    patient = bundle_patient(bundle)
    last = max(e["period"]["start"][:10] for e in bundle_resources(bundle, "Encounter"))
    born, at = date.fromisoformat(patient["birthDate"]), date.fromisoformat(last)
    months = (at.year - born.year) * 12 + at.month - born.month - (at.day < born.day)

    ctx = normalize(record)

    assert ctx.of_kind("condition") == [] and ctx.of_kind("note") == []
    assert ctx.patient_summary == f"male, {months} months old (as of {last})"
    assert len(ctx.of_kind("encounter")) == len(bundle_resources(bundle, "Encounter"))
    assert ctx.skipped == []


async def test_normalize_truncates_notes_on_a_line_boundary() -> None:
    _, record = await read("Beatris270")
    originals = {n.source.id: n.text for n in record.notes}

    ctx = normalize(record, note_chars=300)

    for fact in ctx.of_kind("note"):
        body = fact.text
        original = originals[fact.source.id].replace("Beatris270", "[name]")
        if len(original) <= 300:
            assert body == original
        else:
            kept = body.removesuffix("\n[... truncated]")
            assert kept != body and len(kept) <= 300
            assert original.startswith(kept) and original[len(kept)] == "\n"


async def test_normalize_carries_the_focus_encounter() -> None:
    bundle = load_synthea("Luigi")
    encounter_id = bundle_resources(bundle, "Encounter")[1]["id"]
    record = await fetch_record(
        FakeFhirSource.from_bundle(bundle), str(bundle_patient(bundle)["id"]), encounter_id=encounter_id
    )

    ctx = normalize(record)

    assert ctx.encounter == SourceRef("Encounter", encounter_id, "1")


# ---------------------------------------------------------------------------
# Small records: what is skipped, and how values read
# ---------------------------------------------------------------------------

PATIENT = {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "3"}, "gender": "female",
           "birthDate": "1950-06-15", "name": [{"given": ["Ada"], "family": "Lovelace"}]}  # fmt: skip


def subject(resource_type: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": resource_type, "id": "x", "subject": {"reference": "Patient/p1"}, **resource}


def context_of(**resources: list[dict[str, Any]]) -> ClinicalContext:
    return normalize(
        PatientRecord(
            patient=PATIENT,
            resources={k: [subject(k, r) for r in v] for k, v in resources.items()},
            skipped=[Skipped("Procedure", "search refused by the server (status 403)")],
        ),
        today=date(2024, 6, 14),
    )


def test_normalize_skips_what_cannot_be_stated_and_keeps_earlier_skips() -> None:
    ctx = context_of(
        Condition=[
            {
                "id": "eie",
                "code": {"text": "Asthma"},
                "verificationStatus": {"coding": [{"code": "entered-in-error"}]},
            },
            {
                "id": "refuted",
                "code": {"text": "Gout"},
                "verificationStatus": {"coding": [{"code": "refuted"}]},
            },
            {"id": "nolabel", "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]}},
        ],
        MedicationRequest=[
            {"id": "noname", "status": "active", "medicationReference": {"reference": "Medication/9"}}
        ],
        Observation=[
            {
                "id": "eie-obs",
                "status": "entered-in-error",
                "code": {"text": "K"},
                "valueQuantity": {"value": 4},
            }
        ],
    )

    assert {(s.resource, s.reason) for s in ctx.skipped} == {
        ("Procedure", "search refused by the server (status 403)"),
        ("Condition/eie", "verificationStatus entered-in-error"),
        ("Condition/refuted", "verificationStatus refuted"),
        ("Condition/nolabel", "code has no text or display"),
        (
            "MedicationRequest/noname",
            "no medication name (medicationCodeableConcept or medicationReference.display)",
        ),
        ("Observation/eie-obs", "status entered-in-error"),
    }
    assert [f.key for f in ctx.facts] == ["P1"]


@pytest.mark.parametrize(
    ("medication", "display"),
    [
        ({"medicationCodeableConcept": {"coding": [{"display": "Metformin 500 MG"}]}}, "Metformin 500 MG"),
        ({"medicationCodeableConcept": {"text": "Insulin glargine"}}, "Insulin glargine"),
        ({"medicationReference": {"reference": "Medication/1", "display": "Aspirin 81 MG"}}, "Aspirin 81 MG"),
    ],
)
def test_normalize_names_a_medication_from_its_concept_or_reference(
    medication: dict[str, Any], display: str
) -> None:
    ctx = context_of(MedicationRequest=[{"status": "active", "authoredOn": "2024-01-02", **medication}])

    (fact,) = ctx.of_kind("medication")
    assert (fact.key, fact.display, fact.status, fact.date) == ("M1", display, "active", "2024-01-02")
    assert fact.text == f"Medication: {display}, active, ordered 2024-01-02"


@pytest.mark.parametrize(
    ("observation", "value", "text"),
    [
        ({"valueQuantity": {"value": 7.2, "unit": "%"}}, "7.2 %", "Lab 2024-05-01: HbA1c = 7.2 %"),
        ({"valueQuantity": {"value": 140.0, "code": "mg/dL"}, "interpretation": [{"text": "High"}]},
         "140 mg/dL", "Lab 2024-05-01: HbA1c = 140 mg/dL (High)"),
        ({"valueString": "positive", "status": "preliminary"}, "positive",
         "Lab 2024-05-01: HbA1c = positive, preliminary"),
        ({"valueQuantity": {"value": 5, "unit": "mmol/L", "comparator": "<"}}, "<5 mmol/L",
         "Lab 2024-05-01: HbA1c = <5 mmol/L"),
    ],
)  # fmt: skip
def test_normalize_renders_an_observation_value_with_unit_and_status(
    observation: dict[str, Any], value: str, text: str
) -> None:
    lab = {"status": "final", "category": [{"coding": [{"code": "laboratory"}]}], "code": {"text": "HbA1c"},
           "effectiveDateTime": "2024-05-01T08:00:00Z", **observation}  # fmt: skip

    (fact,) = context_of(Observation=[lab]).of_kind("observation")

    assert (fact.key, fact.value, fact.text, fact.category) == ("L1", value, text, "laboratory")


def test_normalize_keeps_the_latest_observation_of_a_code_and_the_smallest_id_on_a_tie() -> None:
    def weight(id: str, when: str, kg: float) -> dict[str, Any]:
        return {"id": id, "status": "final", "category": [{"coding": [{"code": "vital-signs"}]}],
                "code": {"coding": [{"system": LOINC, "code": "29463-7"}], "text": "Body Weight"},
                "effectiveDateTime": when, "valueQuantity": {"value": kg, "unit": "kg"}}  # fmt: skip

    ctx = context_of(Observation=[weight("b", "2024-01-01", 70), weight("c", "2024-03-01", 72),
                                  weight("a", "2024-03-01", 71), weight("d", "2023-12-01", 69)])  # fmt: skip

    (fact,) = ctx.of_kind("observation")
    assert (fact.key, fact.source.id, fact.value) == ("V1", "a", "71 kg")


def test_normalize_collapses_repeated_records_and_says_how_many() -> None:
    flu = {
        "status": "completed",
        "vaccineCode": {"coding": [{"system": "cvx", "code": "140", "display": "Influenza"}]},
    }
    ctx = context_of(
        Immunization=[{**flu, "id": f"i{n}", "occurrenceDateTime": f"202{n}-10-01"} for n in range(3)]
    )

    (fact,) = ctx.of_kind("immunization")
    assert (fact.source.id, fact.text) == (
        "i2",
        "Immunization 2022-10-01: Influenza, completed; recorded 3 doses",
    )


def test_normalize_describes_conditions_with_their_dates() -> None:
    def condition(id: str, status: str, **dates: str) -> dict[str, Any]:
        return {
            "id": id,
            "code": {"text": id.title()},
            "clinicalStatus": {"coding": [{"code": status}]},
            **dates,
        }

    ctx = context_of(
        Condition=[
            condition("asthma", "active", onsetDateTime="2001-02-03"),
            condition("flu", "resolved", onsetDateTime="2020-01-01", abatementDateTime="2020-01-09"),
            condition("gout", "relapse"),
        ]
    )

    assert [f.text for f in ctx.of_kind("condition")] == [
        "Condition: Flu, resolved 2020-01-09, onset 2020-01-01",
        "Condition: Asthma, active since 2001-02-03",
        "Condition: Gout, relapse",
    ]
    assert [f.key for f in ctx.of_kind("condition")] == ["C1", "C2", "C3"]


@pytest.mark.parametrize(
    ("patient", "today", "summary"),
    [
        ({"gender": "female", "birthDate": "1950-06-15"}, date(2024, 6, 14),
         "female, 73 years old (as of 2024-06-14)"),
        ({"gender": "female", "birthDate": "1950-06-15"}, date(2024, 6, 15),
         "female, 74 years old (as of 2024-06-15)"),
        ({"gender": "male", "birthDate": "1949-04-19", "deceasedDateTime": "2008-11-12"}, date(2024, 1, 1),
         "male, died 2008-11-12 aged 59 years"),
        ({"gender": "other", "deceasedBoolean": True}, date(2024, 1, 1), "other, age unknown, deceased"),
    ],
)  # fmt: skip
def test_normalize_summarizes_the_patient_without_name_or_birth_date(
    patient: dict[str, Any], today: date, summary: str
) -> None:
    record = PatientRecord(
        patient={"resourceType": "Patient", "id": "p", "name": [{"family": "Doe"}], **patient}
    )

    ctx = normalize(record, today=today)

    assert ctx.patient_summary == summary
    assert ctx.facts[0].text == f"Patient: {summary}"


def test_normalize_redacts_the_name_from_a_note_and_keeps_its_source_version() -> None:
    note = Note(SourceRef("DocumentReference", "d1", "4"), "Ada Lovelace, 73F.\nLOVELACE reports dyspnea.",
                "text/plain", "2024-06-01T10:00:00Z", "Progress note", "current", "0" * 64)  # fmt: skip

    ctx = normalize(PatientRecord(patient=PATIENT, notes=[note]))

    (fact,) = ctx.of_kind("note")
    assert fact.text == "[name] [name], 73F.\n[name] reports dyspnea."
    assert (fact.key, fact.date, fact.display, fact.status) == (
        "N1",
        "2024-06-01",
        "Progress note",
        "current",
    )
    assert fact.source.versioned == "DocumentReference/d1/_history/4"


def test_normalize_rejects_a_non_positive_note_length() -> None:
    with pytest.raises(ValueError, match="note_chars"):
        normalize(PatientRecord(patient=PATIENT), note_chars=0)
