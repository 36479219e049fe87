"""Conflicts between notes and coded data: tables of facts in, neutral cited sentences out."""

from __future__ import annotations

import doctest
from typing import Any

import pytest

import service.conflicts
from fhir_adapters.fetch import fetch_record
from fhir_adapters.models import ClinicalContext, Fact, FactKind, Note, PatientRecord, SourceRef
from fhir_adapters.normalize import normalize
from service.conflicts import Conflict, find_conflicts, note_statement
from tests.fakes import FakeFhirSource, bundle_patient, bundle_resources, load_synthea

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
NKA_NOTE = "# Allergies\nNo Known Allergies.\n\n# Medications\nNo Active Medications.\n"
RTYPE = {"allergy": "AllergyIntolerance", "medication": "MedicationRequest", "note": "DocumentReference"}


def fact(kind: FactKind, key: str, display: str | None = None, **fields: Any) -> Fact:
    text = fields.pop("text", f"{display} text")
    return Fact(key=key, kind=kind, text=text, source=SourceRef(RTYPE[kind], key.lower()), display=display, **fields)  # fmt: skip


def note(key: str, text: str, date: str | None = "2023-10-02", status: str | None = "current") -> Fact:
    return fact("note", key, "Clinical note", text=text, date=date, status=status)


def allergy(key: str, display: str = "Latex", **fields: Any) -> Fact:
    fields.setdefault("status", "active")
    fields.setdefault("date", "2017-08-30")
    return fact("allergy", key, display, **fields)


def medication(key: str, display: str = "Fexofenadine 30 MG Oral Tablet", **fields: Any) -> Fact:
    fields.setdefault("status", "active")
    fields.setdefault("date", "2017-08-22")
    return fact("medication", key, display, **fields)


def conflicts(*facts: Fact) -> tuple[Conflict, ...]:
    return find_conflicts(ClinicalContext(SourceRef("Patient", "p"), "female, 8 years old", list(facts)))


def test_conflicts_doctests_pass() -> None:
    assert doctest.testmod(service.conflicts).failed == 0


def test_a_note_saying_no_known_allergies_conflicts_with_active_allergies_citing_both_sides() -> None:
    (found,) = conflicts(note("N1", NKA_NOTE), allergy("A1", "Latex"), allergy("A2", "Bee venom"))

    assert found.kind == "allergies"
    assert found.text == (
        "Record lists 2 active allergies (Latex, Bee venom) [A1, A2]; "
        "the note of 2023-10-02 says no known allergies [N1]."
    )
    assert found.citations == ("A1", "A2", "N1")
    assert found.to_json() == {
        "kind": "allergies",
        "text": found.text,
        "citations": ["A1", "A2", "N1"],
        "record": {"text": "Record lists 2 active allergies (Latex, Bee venom)", "citations": ["A1", "A2"]},
        "note": {"text": "the note of 2023-10-02 says no known allergies", "citations": ["N1"]},
    }
    assert Conflict.from_json(found.to_json()) == found


@pytest.mark.parametrize(
    ("case", "allergy_fields", "conflict"),
    [
        ("active, recorded before the note", {}, True),
        ("no clinical status", {"status": None}, True),
        ("no recorded date", {"date": None}, True),
        ("recorded after the note", {"date": "2024-01-05"}, False),
        ("recorded the same day as the note", {"date": "2023-10-02"}, False),
        ("recorded the same year, day unknown", {"date": "2023"}, False),
        ("resolved", {"status": "resolved"}, False),
        ("inactive", {"status": "inactive"}, False),
        ("entered in error", {"status": "entered-in-error"}, False),
        ("refuted", {"status": "refuted"}, False),
    ],
)
def test_no_known_allergies_conflicts_only_with_allergies_active_before_the_note(
    case: str, allergy_fields: dict[str, Any], conflict: bool
) -> None:
    found = conflicts(note("N1", NKA_NOTE), allergy("A1", **allergy_fields))

    assert bool(found) is conflict, case


@pytest.mark.parametrize(
    ("note_text", "conflict"),
    [
        ("Allergies: NKA", True),
        ("Patient denies any allergies.", True),
        ("# Allergies\nNone\n", True),
        ("Allergies: none known.", True),
        ("No known allergies except latex.", False),
        ("No known allergies, but reacts to latex gloves.", False),
        ("Her mother has no known allergies.", False),
        ("# Family History\nNo known allergies.\n", False),
        ("No known allergies to anesthesia agents.", False),
        ("# Allergies\nlatex\n", False),  # listed: no disagreement with an active latex allergy
        ("# Chief Complaint\nNo complaints.\n", False),
    ],
)
def test_only_a_plain_no_known_allergies_statement_is_read_as_one(note_text: str, conflict: bool) -> None:
    found = conflicts(note("N1", note_text), allergy("A1", "Latex"))

    assert bool(found) is conflict, note_text


def test_no_known_drug_allergies_conflicts_with_drug_allergens_only() -> None:
    food = allergy("A1", "Peanut (substance)", code=f"{SNOMED}|91935009")
    drug = allergy("A2", "Penicillin V", code=f"{RXNORM}|7980")

    assert conflicts(note("N1", "Allergies: NKDA"), food) == ()
    (found,) = conflicts(note("N1", "No known drug allergies."), food, drug)
    assert found.text == (
        "Record lists 1 active drug allergy (Penicillin V) [A2]; "
        "the note of 2023-10-02 says no known drug allergies [N1]."
    )


def test_an_entered_in_error_allergy_read_from_the_record_is_no_conflict() -> None:
    def resource(rid: str, verification: str) -> dict[str, Any]:
        return {
            "resourceType": "AllergyIntolerance",
            "id": rid,
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "verificationStatus": {"coding": [{"code": verification}]},
            "code": {"text": "Latex"},
            "recordedDate": "2017-08-30",
        }

    record = PatientRecord(
        patient={"resourceType": "Patient", "id": "p", "gender": "female", "birthDate": "2015-05-03"},
        resources={"AllergyIntolerance": [resource("a1", "entered-in-error"), resource("a2", "refuted")]},
        notes=[Note(SourceRef("DocumentReference", "d1"), NKA_NOTE, "text/plain", "2023-10-02", None, "current", "x")],
    )  # fmt: skip
    ctx = normalize(record)

    assert ctx.of_kind("allergy") == [] and len(ctx.of_kind("note")) == 1
    assert find_conflicts(ctx) == ()


def test_a_note_listing_an_allergy_the_record_has_as_resolved_is_a_conflict() -> None:
    (found,) = conflicts(
        note("N1", "# Allergies\nlatex, mold (organism)\n"),
        allergy("A1", "Latex", status="resolved"),
        allergy("A2", "Mold (organism)"),
    )
    assert (
        found.text
        == "Record has Latex as resolved [A1]; the note of 2023-10-02 lists it under allergies [N1]."
    )


@pytest.mark.parametrize(
    ("case", "medication_fields", "conflict"),
    [
        ("active, ordered before the note", {}, True),
        ("no order date", {"date": None}, True),
        ("ordered after the note", {"date": "2023-11-01"}, False),
        ("ordered the same day as the note", {"date": "2023-10-02"}, False),
        ("stopped", {"status": "stopped"}, False),
        ("on hold", {"status": "on-hold"}, False),
        ("draft", {"status": "draft"}, False),
    ],
)
def test_no_active_medications_conflicts_only_with_orders_active_before_the_note(
    case: str, medication_fields: dict[str, Any], conflict: bool
) -> None:
    found = conflicts(note("N1", NKA_NOTE), medication("M1", **medication_fields))

    assert bool(found) is conflict, case
    if conflict:
        assert found[0].kind == "medications"
        assert found[0].text == (
            "Record lists 1 active medication (Fexofenadine 30 MG Oral Tablet) [M1]; "
            "the note of 2023-10-02 says no active medications [N1]."
        )


@pytest.mark.parametrize(
    "note_text",
    ["No medications were given during the visit.", "Medication review done; no medications changed."],
)
def test_a_note_about_medications_given_or_changed_is_not_read_as_taking_none(note_text: str) -> None:
    assert conflicts(note("N1", note_text), medication("M1")) == ()


PENICILLIN = "Penicillin V Potassium 250 MG Oral Tablet"
LISTED = f"# Medications\n{PENICILLIN.lower()}; amoxicillin 500 mg oral tablet\n\n# Assessment and Plan\n"


@pytest.mark.parametrize(
    ("case", "facts", "conflict_keys"),
    [
        ("every order of it stopped", [medication("M2", PENICILLIN, status="stopped", date="2022-02-26")], ("M2",)),
        ("stopped and completed orders", [medication("M2", PENICILLIN, status="stopped", date="2021-02-17"),
                                          medication("M3", PENICILLIN, status="completed", date="2022-02-26")],
         ("M2", "M3")),
        ("a stopped and an active order", [medication("M2", PENICILLIN, status="stopped", date="2021-02-17"),
                                           medication("M1", PENICILLIN, status="active", date="2022-02-26")], ()),
        ("stopped, ordered after the note", [medication("M2", PENICILLIN, status="stopped", date="2024-01-01")], ()),
        ("stopped, no order date", [medication("M2", PENICILLIN, status="stopped", date=None)], ()),
        ("status unknown", [medication("M2", PENICILLIN, status="unknown", date="2022-02-26")], ()),
        ("not in the record at all", [medication("M2", "Ibuprofen 200 MG Oral Tablet", status="stopped")], ()),
    ],
)  # fmt: skip
def test_a_note_listing_a_medication_conflicts_when_the_record_has_every_order_of_it_ended(
    case: str, facts: list[Fact], conflict_keys: tuple[str, ...]
) -> None:
    found = conflicts(note("N1", LISTED), *facts)

    assert tuple(k for c in found for k in c.record_keys) == conflict_keys, case
    if conflict_keys == ("M2",):
        assert found[0].text == (
            f"Record has {PENICILLIN} as stopped [M2]; the note of 2023-10-02 lists it under medications [N1]."
        )
    if conflict_keys == ("M2", "M3"):
        assert found[0].record.startswith("Record has 2 medications as completed or stopped (")


def test_the_latest_note_that_speaks_of_a_topic_is_the_note_side() -> None:
    older_nka = note("N2", NKA_NOTE, date="2022-01-01", status="superseded")
    latest_lists = note("N1", "# Allergies\nlatex\n", date="2023-10-02")
    assert conflicts(latest_lists, note("N3", NKA_NOTE, date="2022-01-01"), allergy("A1")) == ()

    silent_latest = note("N1", "# Chief Complaint\nCough.\n", date="2023-10-02")
    (found,) = conflicts(silent_latest, note("N2", NKA_NOTE, date="2022-01-01"), allergy("A1"))
    assert found.note_keys == ("N2",) and "note of 2022-01-01" in found.text
    assert conflicts(silent_latest, older_nka, allergy("A1")) == ()


@pytest.mark.parametrize(
    ("case", "stated"),
    [
        ("entered in error", note("N1", NKA_NOTE, status="entered-in-error")),
        ("superseded", note("N1", NKA_NOTE, status="superseded")),
        ("undated", note("N1", NKA_NOTE, date=None)),
    ],
)
def test_notes_entered_in_error_superseded_or_undated_say_nothing(case: str, stated: Fact) -> None:
    assert conflicts(stated, allergy("A1"), medication("M1")) == (), case


def test_a_note_that_says_none_and_lists_names_is_not_read_either_way() -> None:
    text = "# Allergies\nlatex\n\nAllergies: none known\n"
    assert not note_statement(text, "allergies").says_something


def test_many_names_are_counted_not_all_spelled_out() -> None:
    facts = [allergy(f"A{i}", f"Allergen {i}") for i in range(1, 6)]
    (found,) = conflicts(note("N1", NKA_NOTE), *facts)
    assert found.record == "Record lists 5 active allergies (Allergen 1, Allergen 2, Allergen 3, +2 more)"
    assert found.record_keys == ("A1", "A2", "A3", "A4", "A5")


# ---------------------------------------------------------------------------
# Real records: Synthea notes disagree with the coded data
# ---------------------------------------------------------------------------


async def context_of(prefix: str) -> tuple[dict[str, Any], ClinicalContext]:
    bundle = load_synthea(prefix)
    record = await fetch_record(FakeFhirSource.from_bundle(bundle), str(bundle_patient(bundle)["id"]))
    return bundle, normalize(record)


async def test_beatris_latest_note_says_no_known_allergies_while_nine_are_active() -> None:
    bundle, ctx = await context_of("Beatris270")
    active = [
        a for a in bundle_resources(bundle, "AllergyIntolerance") if a["clinicalStatus"]["coding"][0]["code"] == "active"
    ]  # fmt: skip
    latest = max(ctx.of_kind("note"), key=lambda n: n.date or "")

    by_kind = {c.kind: c for c in find_conflicts(ctx)}
    allergies = by_kind["allergies"]
    assert "No Known Allergies" in latest.text
    assert allergies.note_keys == (latest.key,)
    assert set(allergies.record_keys) == {f.key for f in ctx.of_kind("allergy")}
    assert len(allergies.record_keys) == len(active) == 9
    assert allergies.record.startswith("Record lists 9 active allergies (")
    # Her latest note lists three drugs the record has only as stopped orders.
    assert [ctx.by_key()[k].status for k in by_kind["medications"].record_keys] == ["stopped"] * 3


@pytest.mark.parametrize(("prefix", "kinds"), [("Allen322", ["allergies", "medications"]),
                                               ("Edythe31", ["medications"]), ("Pasquale620", []),
                                               ("Kermit", []), ("Luigi", [])])  # fmt: skip
async def test_synthea_records_give_the_conflicts_their_notes_hold(prefix: str, kinds: list[str]) -> None:
    _, ctx = await context_of(prefix)

    found = find_conflicts(ctx)
    assert [c.kind for c in found] == kinds
    by_key = ctx.by_key()
    for conflict in found:
        assert all(by_key[k].kind == "note" for k in conflict.note_keys)
        assert all(by_key[k].kind in ("allergy", "medication") for k in conflict.record_keys)
