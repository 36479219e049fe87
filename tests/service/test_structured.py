"""The deterministic, cited part of a summary: tables of facts in, sections and lines out."""

from __future__ import annotations

import doctest
import re
from typing import Any

import pytest

import service.structured
from fhir_adapters.fetch import fetch_record
from fhir_adapters.models import ClinicalContext, Fact, FactKind, SourceRef
from fhir_adapters.normalize import normalize
from service.grounding import Claim, DroppedClaim
from service.pipeline import compose_markdown, structured_json
from service.structured import (
    ALLERGIES,
    ENCOUNTERS,
    FLAGGED,
    LABS,
    MEDICATIONS,
    PROBLEMS,
    SOCIAL,
    SYNOPSIS,
    Line,
    Section,
    StructuredSummary,
    build_structured,
)
from tests.fakes import FakeFhirSource, bundle_patient, bundle_resources, load_synthea

PREFIX = {"condition": "C", "medication": "M", "allergy": "A", "encounter": "E", "observation": "L"}


def fact(kind: FactKind, n: int, display: str, **fields: Any) -> Fact:
    key = fields.pop("key", f"{PREFIX[kind]}{n}")
    rtype = {"condition": "Condition", "medication": "MedicationRequest", "allergy": "AllergyIntolerance",
             "encounter": "Encounter", "observation": "Observation"}[kind]  # fmt: skip
    return Fact(key=key, kind=kind, text=f"{display} text", source=SourceRef(rtype, f"{key.lower()}"),
                display=display, **fields)  # fmt: skip


def context(*facts: Fact, encounter: SourceRef | None = None) -> ClinicalContext:
    return ClinicalContext(
        SourceRef("Patient", "p"), "female, 50 years old", list(facts), encounter=encounter
    )


def texts(summary: StructuredSummary, title: str) -> list[str]:
    return [line.text for line in summary.section(title).lines]


def test_structured_doctests_pass() -> None:
    assert doctest.testmod(service.structured).failed == 0


def test_structured_has_its_sections_in_reading_order_even_for_an_empty_record() -> None:
    summary = build_structured(context())

    assert [s.title for s in summary.sections] == [
        "Synopsis",
        "Active problems",
        "Active medications",
        "Allergies",
        "Flagged results",
        "Social history and other findings",
        "Recent encounters",
        "Trends",
        "Latest labs and vitals",
    ]
    assert [s.lines for s in summary.sections[1:]] == [
        (Line("No active problems recorded"),),
        (Line("No active medications recorded"),),
        (Line("No allergies recorded"),),
        (Line("No labs or vital signs recorded"),),
        (Line("No social history or other findings recorded"),),
        (Line("No encounters recorded"),),
        (Line("No repeated key vitals or labs to show a trend"),),
        (Line("No labs or vital signs recorded"),),
    ]
    assert summary.sections[0].lines[0].text == (
        "female, 50 years old; no active problems recorded; no active medications recorded; "
        "no allergies recorded"
    )
    assert summary.cited_keys() == set()


@pytest.mark.parametrize(
    ("status", "shown"),
    [("active", "Asthma (since 2001-02-03)"), ("recurrence", "Asthma (recurrence) (since 2001-02-03)"),
     ("relapse", "Asthma (relapse) (since 2001-02-03)"), ("resolved", None), ("inactive", None),
     ("remission", None), (None, "Asthma (clinical status not recorded) (since 2001-02-03)")],
)  # fmt: skip
def test_structured_lists_active_recurring_and_relapsed_problems_only(
    status: str | None, shown: str | None
) -> None:
    summary = build_structured(context(fact("condition", 1, "Asthma", status=status, date="2001-02-03")))

    lines = summary.section(PROBLEMS).lines
    assert lines == ((Line(shown, ("C1",)),) if shown else (Line("No active problems recorded"),))


def test_structured_merges_one_problem_recorded_twice_into_one_line_citing_both() -> None:
    summary = build_structured(
        context(
            fact("condition", 1, "Hypertension", status="active", date="2020-01-01"),
            fact("condition", 2, "Diabetes", status="active", date="2015-01-01"),
            fact("condition", 3, "hypertension", status="relapse", date="2010-01-01"),
        )
    )

    assert summary.section(PROBLEMS).lines == (
        Line("Hypertension (since 2020-01-01)", ("C1", "C3")),
        Line("Diabetes (since 2015-01-01)", ("C2",)),
    )


@pytest.mark.parametrize(
    ("status", "shown"),
    [("active", ["Metformin (ordered 2024-01-02)"]),
     ("on-hold", ["Metformin (on hold) (ordered 2024-01-02)"]),
     ("stopped", ["No active medications recorded"]), ("completed", ["No active medications recorded"]),
     ("draft", ["No active medications recorded"])],
)  # fmt: skip
def test_structured_lists_active_and_on_hold_medications(status: str, shown: list[str]) -> None:
    summary = build_structured(context(fact("medication", 1, "Metformin", status=status, date="2024-01-02")))

    assert texts(summary, MEDICATIONS) == shown


def test_structured_lists_active_allergies_with_reactions() -> None:
    summary = build_structured(
        context(
            fact("allergy", 1, "Peanut", status="active", value="Anaphylaxis (severe)"),
            fact("allergy", 2, "Latex", status="resolved"),
            fact("allergy", 3, "Penicillin", status=None),
        )
    )

    assert summary.section(ALLERGIES).lines == (
        Line("Peanut: Anaphylaxis (severe)", ("A1",)),
        Line("Penicillin (clinical status not recorded)", ("A3",)),
    )


def test_structured_never_invents_no_known_allergies() -> None:
    none_at_all = build_structured(context())
    only_resolved = build_structured(context(fact("allergy", 1, "Latex", status="resolved")))

    assert texts(none_at_all, ALLERGIES) == ["No allergies recorded"]
    assert only_resolved.section(ALLERGIES).lines == (
        Line("No active allergies recorded (1 inactive or resolved)", ("A1",)),
    )
    for summary in (none_at_all, only_resolved):
        assert not re.search(r"\bNKA\b|no known", summary.to_markdown(), re.IGNORECASE)


def test_structured_shows_the_latest_encounters_and_always_the_focus_one() -> None:
    encounters = [
        fact("encounter", n, f"Visit {n}", date=f"2024-0{9 - n}-01", value="Cough" if n == 2 else None)
        for n in range(1, 8)
    ]

    plain = build_structured(context(*encounters), max_encounters=3)
    focused = build_structured(context(*encounters, encounter=SourceRef("Encounter", "e6")), max_encounters=3)

    assert texts(plain, ENCOUNTERS) == [
        "2024-08-01: Visit 1",
        "2024-07-01: Visit 2, reason: Cough",
        "2024-06-01: Visit 3",
    ]
    assert [line.citations for line in focused.section(ENCOUNTERS).lines] == [
        ("E1",),
        ("E2",),
        ("E3",),
        ("E6",),
    ]
    assert texts(focused, ENCOUNTERS)[-1] == "2024-03-01: Visit 6 (this encounter)"


def test_structured_shows_vitals_then_key_labs_first_up_to_max_labs() -> None:
    def obs(key: str, display: str, category: str, loinc: str, date: str) -> Fact:
        return fact("observation", 0, display, key=key, category=category, code=f"http://loinc.org|{loinc}",
                    value="1 u", date=date)  # fmt: skip

    ctx = context(
        obs("L1", "Chloride", "laboratory", "2075-0", "2024-05-01"),
        obs("L2", "Creatinine", "laboratory", "2160-0", "2024-04-01"),
        obs("L3", "MCV", "laboratory", "787-2", "2024-03-01"),
        obs("L4", "HbA1c", "laboratory", "4548-4", "2023-01-01"),
        obs("L5", "PHQ-2 score", "survey", "55758-7", "2024-06-01"),
        obs("V1", "Body Weight", "vital-signs", "29463-7", "2024-05-01"),
    )

    assert texts(build_structured(ctx, max_labs=3), LABS) == [
        "Body Weight: 1 u (2024-05-01)",
        "HbA1c: 1 u (2023-01-01)",
        "Creatinine: 1 u (2024-04-01)",
        "Chloride: 1 u (2024-05-01)",
    ]
    assert texts(build_structured(ctx, max_labs=0), LABS) == ["Body Weight: 1 u (2024-05-01)"]


def test_structured_markdown_ends_each_line_with_its_citations() -> None:
    summary = StructuredSummary(
        (Section("Active problems", (Line("Asthma", ("C1",)), Line("Gout", ("C2", "C7")))),
         Section("Allergies", (Line("No allergies recorded"),)))
    )  # fmt: skip

    assert summary.to_markdown() == (
        "## Active problems\n\n- Asthma [C1]\n- Gout [C2, C7]\n\n## Allergies\n\n- No allergies recorded\n"
    )
    assert summary.cited_keys() == {"C1", "C2", "C7"}


def test_structured_json_round_trips() -> None:
    summary = build_structured(
        context(
            fact("condition", 1, "Asthma", status="active"), fact("allergy", 1, "Peanut", status="active")
        )
    )

    data = summary.to_json()

    assert data["sections"][1] == {
        "title": "Active problems",
        "lines": [{"text": "Asthma", "citations": ["C1"]}],
    }
    assert StructuredSummary.from_json(data) == summary


def test_structured_rejects_negative_limits_naming_them() -> None:
    with pytest.raises(ValueError, match="max_encounters"):
        build_structured(context(), max_encounters=-1)


# ---------------------------------------------------------------------------
# Real records
# ---------------------------------------------------------------------------


async def structured_of(prefix: str) -> tuple[dict[str, Any], ClinicalContext, StructuredSummary]:
    bundle = load_synthea(prefix)
    record = await fetch_record(FakeFhirSource.from_bundle(bundle), str(bundle_patient(bundle)["id"]))
    ctx = normalize(record)
    return bundle, ctx, build_structured(ctx)


@pytest.mark.parametrize("prefix", ["Beatris270", "Allen322", "Luigi"])
async def test_structured_lines_cite_existing_facts_that_hold_their_numbers(prefix: str) -> None:
    _, ctx, summary = await structured_of(prefix)

    by_key = ctx.by_key()
    assert summary.cited_keys() <= set(by_key)
    # Counts (synopsis, panels) and earlier values (trends) are checked by their own tests; here,
    # every number a value line states is in the facts it cites (the range's name aside).
    for title in (PROBLEMS, MEDICATIONS, ALLERGIES, FLAGGED, SOCIAL, ENCOUNTERS, LABS):
        for line in summary.section(title).lines:
            if not line.citations or "within range" in line.text or "without a reference range" in line.text:
                continue
            cited = " ".join(by_key[k].text for k in line.citations)
            for number in re.findall(r"\d+(?:\.\d+)?", line.text.split(" \u2014 ")[0]):
                assert number in cited, (line, number)
    for part in summary.section(SYNOPSIS).lines[0].parts[:1]:
        assert part.citations == ("P1",) and part.text in by_key["P1"].text


async def test_structured_allen_lists_the_bundles_active_medications_and_allergies() -> None:
    bundle, _, summary = await structured_of("Allen322")
    requests = bundle_resources(bundle, "MedicationRequest")
    active_meds = {m["medicationCodeableConcept"]["text"] for m in requests if m["status"] == "active"}
    allergies = bundle_resources(bundle, "AllergyIntolerance")

    med_lines = texts(summary, MEDICATIONS)
    assert len(med_lines) == len(active_meds)
    assert {line.split(" (ordered")[0] for line in med_lines} == active_meds
    assert len(texts(summary, ALLERGIES)) == len(allergies) == 3
    assert len(texts(summary, ENCOUNTERS)) == 5
    # His HbA1c of 5.81 % is in the prediabetes range: flagged, naming the range's source.
    assert any(
        line.startswith("Hemoglobin A1c") and "prediabetes range (ADA" in line
        for line in texts(summary, FLAGGED)
    )


async def test_structured_beatris_lists_recorded_allergies_even_though_her_notes_say_none() -> None:
    bundle, ctx, summary = await structured_of("Beatris270")

    assert all("No Known Allergies" in f.text for f in ctx.of_kind("note"))
    assert len(texts(summary, ALLERGIES)) == len(bundle_resources(bundle, "AllergyIntolerance")) == 9


async def test_structured_luigi_says_what_is_not_recorded() -> None:
    _, _, summary = await structured_of("Luigi")

    assert texts(summary, PROBLEMS) == ["No active problems recorded"]
    assert texts(summary, MEDICATIONS) == ["No active medications recorded"]
    assert texts(summary, ALLERGIES) == ["No allergies recorded"]


# ---------------------------------------------------------------------------
# Conflicts between the notes and the coded part
# ---------------------------------------------------------------------------


def test_an_empty_record_has_no_conflicts_and_no_conflicts_section() -> None:
    summary = build_structured(context())

    assert summary.conflicts == ()
    assert summary.to_json()["conflicts"] == []
    assert "Conflicts" not in summary.to_markdown()


def test_a_structured_summary_stored_before_conflicts_existed_still_loads() -> None:
    data = build_structured(context(fact("condition", 1, "Asthma", status="active"))).to_json()
    del data["conflicts"]

    assert StructuredSummary.from_json(data).conflicts == ()


async def test_structured_beatris_states_the_conflict_between_her_notes_and_her_allergies() -> None:
    _, ctx, summary = await structured_of("Beatris270")
    latest_note = max(ctx.of_kind("note"), key=lambda n: n.date or "").key
    allergy_keys = sorted(f.key for f in ctx.of_kind("allergy"))

    allergies = next(c for c in summary.conflicts if c.kind == "allergies")
    assert allergies.note_keys == (latest_note,)
    assert sorted(allergies.record_keys) == allergy_keys

    markdown = summary.to_markdown()
    after_flags = markdown.split("## Conflicts in the record\n\n", 1)[1]
    assert after_flags.startswith("- Conflict: Record lists 9 active allergies")
    assert (
        markdown.index("## Flagged results")
        < markdown.index("## Conflicts in the record")
        < markdown.index("## Social history and other findings")
    )
    line = next(li for li in markdown.splitlines() if "no known allergies" in li)
    assert f"[{', '.join(allergies.record_keys)}]" in line and f"[{latest_note}]" in line

    data = summary.to_json()
    assert len(data["conflicts"]) == len(summary.conflicts) == 2
    entry = next(c for c in data["conflicts"] if c["kind"] == "allergies")
    assert entry["text"] == allergies.text
    assert entry["citations"] == [*allergies.record_keys, latest_note]
    assert {latest_note, *allergy_keys} <= summary.cited_keys()
    assert StructuredSummary.from_json(data) == summary


async def test_the_summary_document_shows_the_synopsis_first_and_the_conflicts_after_the_flags() -> None:
    _, ctx, summary = await structured_of("Beatris270")
    note_key = next(c for c in summary.conflicts if c.kind == "allergies").note_keys[0]

    markdown = compose_markdown(ctx, summary, [], [], {})
    data = structured_json(summary, [], [], ctx)

    after_patient = markdown.split(f"Patient: {ctx.patient_summary}\n\n", 1)[1]
    assert after_patient.startswith(f"## Synopsis\n\n- {ctx.patient_summary} [P1]; ")
    assert "\n## Conflicts in the record\n" in after_patient.split("## Social history", 1)[0]
    assert f"- [{note_key}] DocumentReference/" in markdown  # the note is listed among the sources
    assert len(data["structured"]["conflicts"]) == 2
    assert note_key in data["sources"]


def test_the_json_attachment_gives_each_dropped_statement_its_verdict_and_severity() -> None:
    ctx = context(fact("allergy", 1, "Peanuts", status="active"))
    dropped = [DroppedClaim(Claim("No known allergies.", ("A1",)), "negates A1", "contradicted", "high")]

    data = structured_json(build_structured(ctx), [], dropped, ctx)

    assert data["dropped"] == [
        {
            "text": "No known allergies.",
            "citations": ["A1"],
            "reason": "negates A1",
            "verdict": "contradicted",
            "severity": "high",
        }
    ]
