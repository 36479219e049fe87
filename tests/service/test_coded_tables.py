"""The coded part, table by table, from raw FHIR R4 resources through `normalize` and
`build_structured`: which conditions are problems, social findings or administrative items; which
values are flagged and by whose range; trends; panels collapsed to one line."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_adapters.models import ClinicalContext, PatientRecord
from fhir_adapters.normalize import normalize
from service.coded import Point, condition_group, direction
from service.ranges import Flag, flag_observation, load_table
from service.structured import (
    ADULT_RANGES_ONLY,
    ALLERGIES,
    FLAGGED,
    LABS,
    PROBLEMS,
    SOCIAL,
    SYNOPSIS,
    TITLES,
    TRENDS,
    StructuredSummary,
    build_structured,
)

Resource = dict[str, Any]

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
TABLE = load_table()
ADULT_BIRTH = "1970-03-01"  # 50+ years old at every date below

# ---------------------------------------------------------------------------
# Raw FHIR R4 resources
# ---------------------------------------------------------------------------


def patient(birth: str = ADULT_BIRTH, gender: str = "female") -> Resource:
    return {"resourceType": "Patient", "id": "p", "gender": gender, "birthDate": birth}


def condition(
    rid: str,
    display: str | None,
    code: str | None = "1234",
    *,
    text: str | None = None,
    status: str = "active",
) -> Resource:
    concept: Resource = {}
    if code is not None or display is not None:
        coding: Resource = {"system": SNOMED}
        if code is not None:
            coding["code"] = code
        if display is not None:
            coding["display"] = display
        concept["coding"] = [coding]
    if text is not None:
        concept["text"] = text
    return {
        "resourceType": "Condition",
        "id": rid,
        "clinicalStatus": {"coding": [{"code": status}]},
        "code": concept,
        "subject": {"reference": "Patient/p"},
        "onsetDateTime": "2015-04-02T10:00:00Z",
    }


def observation(
    rid: str,
    loinc: str,
    display: str,
    value: float,
    unit: str,
    day: str = "2024-03-05",
    *,
    category: str = "laboratory",
    **extra: Any,
) -> Resource:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "category": [{"coding": [{"code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}], "text": display},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": f"{day}T09:30:00Z",
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
        **extra,
    }


def blood_pressure(rid: str, systolic: float, diastolic: float, day: str = "2024-03-05") -> Resource:
    def part(code: str, value: float) -> Resource:
        return {"code": {"coding": [{"system": LOINC, "code": code}]},
                "valueQuantity": {"value": value, "unit": "mm[Hg]", "code": "mm[Hg]"}}  # fmt: skip

    resource = observation(rid, "85354-9", "Blood pressure panel", 0, "", day, category="vital-signs")
    del resource["valueQuantity"]
    resource["component"] = [part("8480-6", systolic), part("8462-4", diastolic)]
    return resource


def report(rid: str, name: str, day: str, *observation_ids: str) -> Resource:
    return {
        "resourceType": "DiagnosticReport",
        "id": rid,
        "status": "final",
        "code": {"text": name},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": f"{day}T09:30:00Z",
        "result": [{"reference": f"Observation/{oid}"} for oid in observation_ids],
    }


def encounter(rid: str, day: str) -> Resource:
    return {
        "resourceType": "Encounter",
        "id": rid,
        "status": "finished",
        "class": {"code": "AMB"},
        "type": [{"text": "General examination of patient (procedure)"}],
        "subject": {"reference": "Patient/p"},
        "period": {"start": f"{day}T09:00:00Z", "end": f"{day}T09:45:00Z"},
    }


def interpretation(code: str, text: str | None = None) -> list[Resource]:
    concept: Resource = {"coding": [{"system": INTERPRETATION, "code": code}]}
    if text:
        concept["text"] = text
    return [concept]


def reference_range(low: float | None, high: float | None, unit: str) -> list[Resource]:
    rng: Resource = {}
    if low is not None:
        rng["low"] = {"value": low, "unit": unit}
    if high is not None:
        rng["high"] = {"value": high, "unit": unit}
    return [rng]


def context(*resources: Resource, birth: str = ADULT_BIRTH, gender: str = "female") -> ClinicalContext:
    by_type: dict[str, list[Resource]] = {}
    for resource in resources:
        by_type.setdefault(resource["resourceType"], []).append(resource)
    return normalize(PatientRecord(patient=patient(birth, gender), resources=by_type))


def structured(*resources: Resource, **options: Any) -> StructuredSummary:
    birth = options.pop("birth", ADULT_BIRTH)
    gender = options.pop("gender", "female")
    return build_structured(context(*resources, birth=birth, gender=gender), **options)


def texts(summary: StructuredSummary, title: str) -> list[str]:
    return [line.text for line in summary.section(title).lines]


def cited(summary: StructuredSummary, title: str) -> list[tuple[str, ...]]:
    return [line.citations for line in summary.section(title).lines]


def key_of(ctx: ClinicalContext, rid: str) -> str:
    return next(f.key for f in ctx.facts if f.source.id == rid)


# ---------------------------------------------------------------------------
# a. Problems, social history and other findings, administrative items
# ---------------------------------------------------------------------------

# Displays as Synthea and EHRs write them (SNOMED CT semantic tags included or not).
CONDITION_GROUPS = [
    # Disorders and diseases are problems, tagged or not.
    ("Essential hypertension (disorder)", "59621000", "problem"),
    ("Hypertension", "38341003", "problem"),
    ("Diabetes mellitus type 2 (disorder)", "44054006", "problem"),
    ("Prediabetes", "15777000", "problem"),
    ("Chronic congestive heart failure (disorder)", "88805009", "problem"),
    ("Alzheimer's disease (disorder)", "26929004", "problem"),
    ("Coronary Heart Disease", "53741008", "problem"),
    ("Chronic kidney disease stage 3 (disorder)", "433144002", "problem"),
    ("Anemia (disorder)", "271737000", "problem"),
    ("Childhood asthma", "233678006", "problem"),
    ("Fracture of ankle", "16114001", "problem"),
    ("Normal pregnancy", "72892002", "problem"),
    ("Sprain (morphologic abnormality)", "384709000", "problem"),
    # A disorder whose name holds a social word stays a problem: the tag decides first.
    ("Opioid abuse (disorder)", "5602001", "problem"),
    ("Dependent drug abuse (disorder)", "191816009", "problem"),
    ("Chronic (disease) of the school-age child (Disease)", None, "problem"),
    # Findings and situations: social history and other findings.
    ("Stress (finding)", "73595000", "social"),
    ("Full-time employment (finding)", "160903007", "social"),
    ("Part-time employment (finding)", "160904001", "social"),
    ("Unemployed (finding)", "73438004", "social"),
    ("Not in labor force (finding)", "741062008", "social"),
    ("Received higher education (finding)", "224299000", "social"),
    ("Received certificate of high school equivalency (finding)", "5251000175109", "social"),
    ("Housing unsatisfactory (finding)", "105531004", "social"),
    ("Lack of access to transportation (finding)", "713458007", "social"),
    ("Social isolation (finding)", "422650009", "social"),
    ("Limited social contact (finding)", "423315002", "social"),
    ("Victim of intimate partner abuse (finding)", "706893006", "social"),
    ("Reports of violence in the environment (finding)", "424393004", "social"),
    ("Has a criminal record (finding)", "266948004", "social"),
    ("Served in armed forces (finding)", "224355006", "social"),
    ("Misuses drugs (finding)", "361055000", "social"),
    ("Unhealthy alcohol drinking behavior (finding)", "10939881000119104", "social"),
    ("Smokes tobacco daily (finding)", "449868002", "social"),
    # Social words without a tag (text written by an EHR, not SNOMED).
    ("Current every day smoker", None, "social"),
    ("Tobacco user", None, "social"),
    ("Homelessness", None, "social"),
    ("Lives alone, no transportation", None, "social"),
    # Findings that are clinically relevant go to "other findings", shown there, not dropped.
    ("Body mass index 30+ - obesity (finding)", "162864005", "social"),
    ("Chronic pain (finding)", "82423001", "social"),
    ("History of myocardial infarction (situation)", "399211009", "social"),
    # Synthea sometimes cuts the closing parenthesis of the tag; the case of the tag does not matter.
    ("Severe anxiety (panic) (finding", "80583007", "social"),
    ("Fever (FINDING)", "386661006", "social"),
    ("Awaiting transplantation of kidney (situation)  ", None, "social"),
    # Administrative: a task for the care team, by code or by its words.
    ("Medication review due (situation)", "314529007", "administrative"),
    ("Medication review due", None, "administrative"),
    ("Care plan REVIEW DUE (situation)", None, "administrative"),
    ("Med rev (local text)", "314529007", "administrative"),
    # "review due" wins even over a disorder tag: it is never a problem of the patient.
    ("Diabetes review due (disorder)", None, "administrative"),
]


@pytest.mark.parametrize(
    ("display", "code", "group"), CONDITION_GROUPS, ids=[row[0].strip() for row in CONDITION_GROUPS]
)
def test_condition_group_of_real_snomed_displays(display: str, code: str | None, group: str) -> None:
    assert condition_group(f"{SNOMED}|{code}" if code else None, display) == group


@pytest.mark.parametrize(
    ("code", "display", "group"),
    [
        pytest.param(None, None, "problem", id="nothing known: a problem, never hidden"),
        pytest.param(f"{SNOMED}|314529007", None, "administrative", id="administrative code without display"),
        pytest.param("314529007", None, "administrative", id="administrative code without system"),
        pytest.param(f"{SNOMED}|73595000", None, "problem", id="social code without display is not guessed"),
        pytest.param(f"{SNOMED}|1234", "", "problem", id="empty display"),
    ],
)
def test_condition_group_without_a_display(code: str | None, display: str | None, group: str) -> None:
    assert condition_group(code, display) == group


def test_the_coded_part_sorts_conditions_into_problems_social_findings_and_a_count_of_hidden_items() -> None:
    resources = [
        condition("c1", "Essential hypertension (disorder)", "59621000"),
        condition("c2", "Stress (finding)", "73595000"),
        condition("c3", "Medication review due (situation)", "314529007"),
        condition("c4", "Full-time employment (finding)", "160903007"),
        condition("c5", "Body mass index 30+ - obesity (finding)", "162864005"),
        condition("c6", None, None, text="Care plan review due"),  # text only, no coding
        condition("c7", None, None, text="Tobacco user"),  # no coding at all
        condition("c8", "Opioid abuse (disorder)", "5602001"),
    ]
    ctx = context(*resources)
    summary = build_structured(ctx)

    problems = texts(summary, PROBLEMS)
    assert sorted(problems[:-1]) == [
        "Essential hypertension (disorder) (since 2015-04-02)",
        "Opioid abuse (disorder) (since 2015-04-02)",
    ]
    # Administrative items are counted, not shown.
    assert problems[-1] == "2 administrative items not shown"
    assert summary.section(PROBLEMS).lines[-1].citations == ()
    assert sorted(texts(summary, SOCIAL)) == [
        "Body mass index 30+ - obesity (finding) (since 2015-04-02)",
        "Full-time employment (finding) (since 2015-04-02)",
        "Stress (finding) (since 2015-04-02)",
        "Tobacco user (since 2015-04-02)",
    ]
    markdown = summary.to_markdown()
    assert "review due" not in markdown
    # The synopsis names problems only.
    synopsis = texts(summary, SYNOPSIS)[0]
    assert "main problems: " in synopsis and "hypertension" in synopsis
    assert "Stress" not in synopsis and "employment" not in synopsis
    # Every kept condition is cited where it is shown; the hidden ones are not cited anywhere.
    hidden = {key_of(ctx, "c3"), key_of(ctx, "c6")}
    assert not hidden & summary.cited_keys()
    assert {key_of(ctx, rid) for rid in ("c1", "c2", "c4", "c5", "c7", "c8")} <= summary.cited_keys()


def test_administrative_items_are_listed_with_the_problems_when_asked() -> None:
    summary = structured(
        condition("c1", "Medication review due (situation)", "314529007"),
        condition("c2", "Stress (finding)", "73595000"),
        show_administrative=True,
    )

    assert texts(summary, PROBLEMS) == ["Medication review due (situation) (since 2015-04-02)"]
    assert texts(summary, SOCIAL) == ["Stress (finding) (since 2015-04-02)"]


@pytest.mark.parametrize(
    ("administrative", "line"),
    [(0, None), (1, "1 administrative item not shown"), (2, "2 administrative items not shown")],
    ids=["none", "one", "two"],
)
def test_the_count_of_hidden_administrative_items(administrative: int, line: str | None) -> None:
    items = [
        condition("a1", "Medication review due (situation)", "314529007"),
        condition("a2", "Dental care review due (situation)", None),
    ][:administrative]
    summary = structured(condition("c1", "Hypertension", "38341003"), *items)

    expected = ["Hypertension (since 2015-04-02)"] + ([line] if line else [])
    assert texts(summary, PROBLEMS) == expected


def test_a_condition_without_any_label_is_skipped_with_its_reason_not_guessed() -> None:
    ctx = context(condition("c1", None, "59621000"))

    assert ctx.of_kind("condition") == []
    assert [(s.resource, s.reason) for s in ctx.skipped] == [("Condition/c1", "code has no text or display")]
    assert texts(build_structured(ctx), PROBLEMS) == ["No active problems recorded"]


def test_a_resolved_social_finding_is_not_shown() -> None:
    summary = structured(condition("c1", "Unemployed (finding)", "73438004", status="resolved"))

    assert texts(summary, SOCIAL) == ["No social history or other findings recorded"]


# Allergy records that name no allergen: not listed as allergens.


def allergy(rid: str, display: str, code: str | None) -> Resource:
    coding: Resource = {"system": SNOMED, "display": display}
    if code:
        coding["code"] = code
    return {
        "resourceType": "AllergyIntolerance",
        "id": rid,
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"coding": [coding], "text": display},
        "patient": {"reference": "Patient/p"},
        "recordedDate": "2019-07-01",
    }


@pytest.mark.parametrize(
    ("display", "code", "allergen"),
    [
        ("Allergy to substance (finding)", "419199007", False),
        ("Allergy to substance", None, False),
        ("Allergic disposition (finding)", "609328004", False),
        ("Hypersensitivity condition (finding)", "473010000", False),
        ("Hypersensitivity", None, False),
        ("Local label", "421961002", False),  # Hypersensitivity reaction (disorder), by its code
        ("Allergy to peanuts", "91935009", True),
        ("Penicillin V", "7980", True),
        ("Allergy to substance: latex", None, True),  # names its allergen
    ],
    ids=lambda v: str(v),
)
def test_an_allergy_record_without_an_allergen_is_not_listed_as_one(
    display: str, code: str | None, allergen: bool
) -> None:
    summary = structured(allergy("a1", display, code))

    synopsis = texts(summary, SYNOPSIS)[0]
    if allergen:
        assert texts(summary, ALLERGIES) == [display]
        assert f"allergies: {display}" in synopsis
    else:
        assert texts(summary, ALLERGIES) == [f"Allergy recorded without a named allergen: {display}"]
        # Something is recorded: the synopsis never says there is nothing.
        assert "; allergy recorded without a named allergen" in synopsis
        assert "no allergies recorded" not in synopsis and display not in synopsis


# ---------------------------------------------------------------------------
# b. Flags: the observation's interpretation, its reference range, the versioned table
# ---------------------------------------------------------------------------


def adult_flag(resource: Resource, sex: str = "female") -> Flag | None:
    return flag_observation(resource, TABLE, age_years=45, sex=sex)


@pytest.mark.parametrize(
    ("code", "text", "direction", "label"),
    [
        ("H", None, "high", "H"),
        ("HH", "Critical high", "high", "Critical high"),
        ("HU", None, "high", "HU"),
        ("L", "Low", "low", "Low"),
        ("LL", "Critical low", "low", "Critical low"),
        ("A", "Abnormal", "abnormal", "Abnormal"),
        ("AA", None, "abnormal", "AA"),
        ("POS", "Positive", "abnormal", "Positive"),
        ("N", "Normal", None, "Normal"),
        ("NEG", None, None, "NEG"),
    ],
    ids=lambda v: str(v),
)
def test_the_interpretation_source(code: str, text: str | None, direction: str | None, label: str) -> None:
    resource = observation(
        "o", "6298-4", "Potassium", 4.2, "mmol/L", interpretation=interpretation(code, text)
    )

    assert adult_flag(resource) == Flag(
        direction,  # type: ignore[arg-type]
        label,
        "interpretation",
        "interpretation recorded with the result",
    )


@pytest.mark.parametrize(
    ("value", "low", "high", "direction", "label", "shown"),
    [
        (3.4, 3.5, 5.3, "low", "below range", "3.5-5.3"),
        (3.5, 3.5, 5.3, None, "within range", "3.5-5.3"),  # exactly at the low limit
        (5.3, 3.5, 5.3, None, "within range", "3.5-5.3"),  # exactly at the high limit
        (5.31, 3.5, 5.3, "high", "above range", "3.5-5.3"),
        (2.0, 3.5, None, "low", "below range", "3.5"),
        (9.9, None, 5.3, "high", "above range", "5.3"),
        (1.0, None, 5.3, None, "within range", "5.3"),
    ],
    ids=["below", "at low", "at high", "above", "low only", "high only", "within high only"],
)
def test_the_reference_range_source_and_its_limits(
    value: float, low: float | None, high: float | None, direction: str | None, label: str, shown: str
) -> None:
    resource = observation(
        "o", "6298-4", "Potassium", value, "mmol/L", referenceRange=reference_range(low, high, "mmol/L")
    )

    assert adult_flag(resource) == Flag(
        direction,  # type: ignore[arg-type]
        label,
        "referenceRange",
        f"the laboratory's range {shown} mmol/L",
    )


@pytest.mark.parametrize(
    ("value", "extra", "source", "direction"),
    [
        # The table says 5.6 % is normal; the laboratory's interpretation and range say high.
        (5.6, {"interpretation": interpretation("H"), "referenceRange": reference_range(4.0, 5.5, "%")},
         "interpretation", "high"),
        (5.6, {"referenceRange": reference_range(4.0, 5.5, "%")}, "referenceRange", "high"),
        (5.6, {}, "table", None),
        # The table and the range say 7.2 % is high; the laboratory's interpretation says normal.
        (7.2, {"interpretation": interpretation("N"), "referenceRange": reference_range(4.0, 5.5, "%")},
         "interpretation", None),
        # The table says 7.2 % is diabetes range; the laboratory's range says within.
        (7.2, {"referenceRange": reference_range(4.0, 8.0, "%")}, "referenceRange", None),
        # An interpretation code that says nothing of the range gives way to the next source.
        (5.6, {"interpretation": interpretation("IND"), "referenceRange": reference_range(4.0, 5.5, "%")},
         "referenceRange", "high"),
        # A reference range in another unit is not compared: the table (in %) is used.
        (5.6, {"referenceRange": reference_range(20, 38, "mmol/mol")}, "table", None),
    ],
    ids=["interpretation over range and table", "range over table", "table alone",
         "normal interpretation over abnormal range and table", "range within over table high",
         "unknown interpretation code skipped", "range in another unit skipped"],
)  # fmt: skip
def test_the_sources_are_taken_in_order_interpretation_reference_range_table(
    value: float, extra: Resource, source: str, direction: str | None
) -> None:
    flag = adult_flag(observation("o", "4548-4", "Hemoglobin A1c", value, "%", **extra))

    assert flag is not None
    assert (flag.source, flag.direction) == (source, direction)


def test_every_table_entry_names_a_known_source_and_has_bands() -> None:
    assert TABLE.tests, "the table holds no tests"
    for entry in TABLE.tests:
        assert entry["source"] in TABLE.sources, entry["name"]
        assert TABLE.sources[entry["source"]].strip(), entry["name"]
        assert entry["loinc"] and entry["unit"], entry["name"]
        assert entry.get("bands") or entry.get("categories"), entry["name"]


def band_rows() -> list[Any]:
    """For every band of every table entry: a value inside it and the value at its lower limit
    (inclusive), each expected to get that band's flag, label and the entry's source."""
    rows = []
    for entry in TABLE.tests:
        if entry.get("kind") == "blood_pressure":
            continue
        sex = entry.get("sex")
        name = f"{entry['name']} ({sex})" if sex else entry["name"]
        lower: float | None = None
        for band in entry["bands"]:
            below = band.get("below")
            start = float(band["min"]) if "min" in band else lower
            inside = (start + float(below)) / 2 if start is not None and below is not None else None
            if inside is None:
                inside = float(below) - 0.5 if below is not None else float(start or 0) + 1
            cases = [("inside", inside)] + ([("at lower limit", start)] if start is not None else [])
            for where, value in cases:
                rows.append(
                    pytest.param(entry, sex, value, band, id=f"{name}: {band['label']} ({where} {value:g})")
                )
            lower = float(below) if below is not None else lower
    return rows


@pytest.mark.parametrize(("entry", "sex", "value", "band"), band_rows())
def test_every_band_of_the_table(entry: Resource, sex: str | None, value: float, band: Resource) -> None:
    resource = observation("o", entry["loinc"][0], entry["name"], value, entry["unit"][0])

    assert adult_flag(resource, sex or "female") == Flag(
        band.get("flag"), band["label"], "table", TABLE.sources[entry["source"]]
    )


@pytest.mark.parametrize(
    ("loinc", "value", "unit", "direction", "label"),
    [
        ("8867-4", 59, "/min", "low", "below resting range"),
        ("8867-4", 60, "/min", None, "within range"),
        ("8867-4", 100, "/min", None, "within range"),
        ("8867-4", 101, "/min", "high", "above resting range"),
        ("8867-4", 72, "{beats}/min", None, "within range"),
        ("39156-5", 18.4, "kg/m2", "low", "underweight"),
        ("39156-5", 18.5, "kg/m2", None, "normal range"),
        ("39156-5", 25, "kg/m2", "high", "overweight"),
        ("39156-5", 30, "kg/m2", "high", "obesity"),
        ("4548-4", 5.69, "%", None, "normal range"),
        ("4548-4", 5.7, "%", "high", "prediabetes range"),
        ("4548-4", 6.5, "%", "high", "diabetes range"),
        ("2345-7", 69, "mg/dL", "low", "hypoglycemia range"),
        ("2345-7", 70, "mg/dL", None, "within fasting range"),
        ("2345-7", 100, "mg/dL", "high", "above fasting range (prediabetes range if fasting)"),
        ("2339-0", 126, "mg/dL", "high", "above fasting range (diabetes range if fasting)"),
        ("62238-1", 60, "mL/min/{1.73_m2}", None, "G1-G2"),
        ("62238-1", 59.9, "mL/min/{1.73_m2}", "low", "G3a (mildly to moderately decreased)"),
        ("33914-3", 44, "mL/min/{1.73_m2}", "low", "G3b (moderately to severely decreased)"),
        ("33914-3", 15, "mL/min/{1.73_m2}", "low", "G4 (severely decreased)"),
        ("33914-3", 14.9, "mL/min/{1.73_m2}", "low", "G5 (kidney failure range)"),
        ("2160-0", 0.59, "mg/dL", "low", "below range"),
        ("2160-0", 1.3, "mg/dL", None, "within range"),
        ("2160-0", 1.31, "mg/dL", "high", "above range"),
        ("6298-4", 3.49, "mmol/L", "low", "below range"),
        ("6298-4", 5.1, "mmol/L", None, "within range"),
        ("2823-3", 5.2, "mEq/L", "high", "above range"),
        ("2947-0", 134, "mmol/L", "low", "below range"),
        ("2951-2", 145, "mmol/L", None, "within range"),
        ("2951-2", 146, "mmol/L", "high", "above range"),
        ("18262-6", 129, "mg/dL", None, "optimal or near optimal"),
        ("18262-6", 130, "mg/dL", "high", "borderline high"),
        ("13457-7", 160, "mg/dL", "high", "high"),
        ("2089-1", 190, "mg/dL", "high", "very high"),
    ],
    ids=lambda v: str(v),
)
def test_table_limits_of_common_adult_results(
    loinc: str, value: float, unit: str, direction: str | None, label: str
) -> None:
    flag = adult_flag(observation("o", loinc, "Result", value, unit))

    assert flag is not None and flag.source == "table"
    assert (flag.direction, flag.label) == (direction, label)


@pytest.mark.parametrize(
    ("sex", "value", "direction"),
    [("female", 11.9, "low"), ("female", 12.0, None), ("female", 15.5, None), ("female", 15.6, "high"),
     ("male", 13.4, "low"), ("male", 13.5, None), ("male", 17.5, None), ("male", 17.6, "high")],
    ids=lambda v: str(v),
)  # fmt: skip
def test_hemoglobin_limits_by_sex(sex: str, value: float, direction: str | None) -> None:
    flag = adult_flag(observation("o", "718-7", "Hemoglobin", value, "g/dL"), sex)

    assert flag is not None and flag.direction == direction


@pytest.mark.parametrize(
    ("systolic", "diastolic", "direction", "label"),
    [
        (181, 70, "high", "hypertensive crisis range"),
        (110, 121, "high", "hypertensive crisis range"),
        (180, 120, "high", "stage 2 hypertension range"),
        (140, 70, "high", "stage 2 hypertension range"),
        (120, 90, "high", "stage 2 hypertension range"),
        (139, 89, "high", "stage 1 hypertension range"),
        (130, 70, "high", "stage 1 hypertension range"),
        (115, 80, "high", "stage 1 hypertension range"),
        (129, 79, "high", "elevated"),
        (120, 79, "high", "elevated"),
        (119, 79, None, "normal"),
    ],
    ids=lambda v: str(v),
)
def test_blood_pressure_categories_at_their_limits(
    systolic: float, diastolic: float, direction: str | None, label: str
) -> None:
    assert adult_flag(blood_pressure("bp", systolic, diastolic)) == Flag(
        direction,  # type: ignore[arg-type]
        label,
        "table",
        TABLE.sources["acc_aha_2017"],
    )


def _without_diastolic(resource: Resource) -> Resource:
    resource["component"] = resource["component"][:1]
    return resource


def _kpa(resource: Resource) -> Resource:
    for component in resource["component"]:
        component["valueQuantity"] = {"value": 20, "unit": "kPa", "code": "kPa"}
    return resource


@pytest.mark.parametrize(
    "resource",
    [
        pytest.param(observation("o", "2345-7", "Glucose", 7.2, "mmol/L"), id="glucose in mmol/L"),
        pytest.param(observation("o", "2160-0", "Creatinine", 150, "umol/L"), id="creatinine in umol/L"),
        pytest.param(observation("o", "4548-4", "Hemoglobin A1c", 53, "mmol/mol"), id="HbA1c in mmol/mol"),
        pytest.param(observation("o", "718-7", "Hemoglobin", 130, "g/L"), id="hemoglobin in g/L"),
        pytest.param(_kpa(blood_pressure("bp", 180, 110)), id="blood pressure in kPa"),
        pytest.param(
            _without_diastolic(blood_pressure("bp", 180, 110)), id="blood pressure without its diastolic"
        ),
        pytest.param(
            observation("o", "2093-0", "Unknown", 999, "mg/dL"), id="a code the table does not hold"
        ),
    ],
)
def test_no_table_flag_for_a_unit_or_code_the_table_does_not_name(resource: Resource) -> None:
    assert adult_flag(resource) is None


# Born 2006-06-15: 17 the day before the 18th birthday, 18 on it.
MINOR_BIRTH = "2006-06-15"


@pytest.mark.parametrize(
    ("day", "flagged"), [("2024-06-14", False), ("2024-06-15", True)], ids=["day before 18", "18th birthday"]
)
def test_the_adult_table_applies_from_the_18th_birthday(day: str, flagged: bool) -> None:
    summary = structured(observation("o", "4548-4", "Hemoglobin A1c", 7.1, "%", day), birth=MINOR_BIRTH)

    lines = texts(summary, FLAGGED)
    assert any(line.startswith("Hemoglobin A1c: 7.1 %") for line in lines) is flagged
    if not flagged:
        assert lines == ["1 result taken before age 18 not flagged: reference ranges apply to adults"]


def test_a_child_is_not_flagged_by_the_table_and_the_summary_says_why() -> None:
    child = "2014-02-01"
    summary = structured(
        encounter("e1", "2024-03-05"),
        observation("o1", "4548-4", "Hemoglobin A1c", 7.5, "%"),
        blood_pressure("bp", 150, 95),
        birth=child,
    )

    assert texts(summary, FLAGGED) == [ADULT_RANGES_ONLY]
    assert "patient under 18" in ADULT_RANGES_ONLY
    # The values are not lost: they are listed with the other results, unflagged.
    labs = texts(summary, LABS)
    assert "Blood pressure panel: 150/95 mm[Hg] (2024-03-05)" in labs
    assert "Hemoglobin A1c: 7.5 % (2024-03-05)" in labs
    assert "high:" not in summary.to_markdown()


def test_a_child_result_flagged_by_its_own_laboratory_is_shown_and_not_called_unflagged() -> None:
    summary = structured(
        encounter("e1", "2024-03-05"),
        observation("o1", "6298-4", "Potassium", 6.1, "mmol/L", interpretation=interpretation("H", "High")),
        birth="2014-02-01",
    )

    assert texts(summary, FLAGGED) == [
        "Potassium: 6.1 mmol/L (2024-03-05) \u2014 high: High (interpretation recorded with the result)"
    ]


def test_a_child_result_within_its_own_laboratorys_range_counts_as_checked() -> None:
    summary = structured(
        encounter("e1", "2024-03-05"),
        observation(
            "o1", "6298-4", "Potassium", 4.1, "mmol/L", referenceRange=reference_range(3.4, 4.7, "mmol/L")
        ),
        observation("o2", "4548-4", "Hemoglobin A1c", 7.5, "%"),  # the table would flag it
        birth="2014-02-01",
    )

    # Only the HbA1c went unflagged for want of a range that applies to a child.
    assert texts(summary, FLAGGED) == [ADULT_RANGES_ONLY]
    only_checked = structured(
        encounter("e1", "2024-03-05"),
        observation(
            "o1", "6298-4", "Potassium", 4.1, "mmol/L", referenceRange=reference_range(3.4, 4.7, "mmol/L")
        ),
        birth="2014-02-01",
    )
    assert texts(only_checked, FLAGGED) == ["No latest result outside its reference range"]


def test_a_flag_names_its_source_in_the_flagged_line() -> None:
    ctx = context(
        observation(
            "o1", "6298-4", "Potassium", 5.9, "mmol/L", referenceRange=reference_range(3.5, 5.3, "mmol/L")
        ),
        observation("o2", "4548-4", "Hemoglobin A1c", 6.1, "%"),
        observation("o3", "2951-2", "Sodium", 150, "mmol/L", interpretation=interpretation("H", "High")),
    )
    summary = build_structured(ctx)

    lines = dict(zip(texts(summary, FLAGGED), cited(summary, FLAGGED), strict=True))
    assert lines == {
        "Hemoglobin A1c: 6.1 % (2024-03-05) \u2014 high: prediabetes range "
        "(ADA Standards of Care 2024, diagnosis and classification of diabetes)": (key_of(ctx, "o2"),),
        "Potassium: 5.9 mmol/L (2024-03-05) \u2014 high: above range "
        "(the laboratory's range 3.5-5.3 mmol/L)": (key_of(ctx, "o1"),),
        "Sodium: 150 mmol/L (2024-03-05) \u2014 high: High (interpretation recorded with the result)": (
            key_of(ctx, "o3"),
        ),
    }
    assert summary.reference_ranges == TABLE.identity()


# ---------------------------------------------------------------------------
# c. Trends
# ---------------------------------------------------------------------------


# (day, value) as the server returns them: not in date order.
A1C_HISTORY = [("2023-05-01", 6.8), ("2020-05-01", 5.4), ("2022-05-01", 5.9), ("2021-05-01", 6.3)]


@pytest.mark.parametrize(
    ("loinc", "display", "unit", "values", "shown", "trend"),
    [
        ("4548-4", "Hemoglobin A1c", "%", A1C_HISTORY,
         "6.3 % (2021-05-01) -> 5.9 % (2022-05-01) -> 6.8 % (2023-05-01)", "rising"),
        ("33914-3", "eGFR", "mL/min/{1.73_m2}", [("2022-05-01", 64), ("2023-05-01", 51), ("2021-05-01", 72)],
         "72 mL/min/{1.73_m2} (2021-05-01) -> 64 mL/min/{1.73_m2} (2022-05-01) -> 51 mL/min/{1.73_m2} "
         "(2023-05-01)", "falling"),
        ("29463-7", "Body Weight", "kg", [("2022-05-01", 84), ("2021-05-01", 80)],
         "80 kg (2021-05-01) -> 84 kg (2022-05-01)", "stable"),
        ("29463-7", "Body Weight", "kg", [("2021-05-01", 80), ("2022-05-01", 84.5)],
         "80 kg (2021-05-01) -> 84.5 kg (2022-05-01)", "rising"),
        ("29463-7", "Body Weight", "kg", [("2021-05-01", 80), ("2022-05-01", 76)],
         "80 kg (2021-05-01) -> 76 kg (2022-05-01)", "stable"),
        ("29463-7", "Body Weight", "kg", [("2021-05-01", 80), ("2022-05-01", 75.9)],
         "80 kg (2021-05-01) -> 75.9 kg (2022-05-01)", "falling"),
    ],
    ids=["last three of four, rising", "falling", "+5 % is stable", "above 5 % rising",
         "-5 % is stable", "below -5 % falling"],
)  # fmt: skip
def test_a_trend_shows_the_last_three_values_in_date_order_and_a_direction(
    loinc: str, display: str, unit: str, values: list[tuple[str, float]], shown: str, trend: str
) -> None:
    category = "vital-signs" if loinc == "29463-7" else "laboratory"
    ctx = context(
        *(
            observation(f"o-{day}", loinc, display, value, unit, day, category=category)
            for day, value in values
        )
    )
    summary = build_structured(ctx)

    latest = key_of(ctx, f"o-{max(day for day, _ in values)}")
    assert texts(summary, TRENDS) == [f"{display}: {shown}, {trend}"]
    # Only the latest value's fact is cited; the earlier values are read from the raw resources.
    assert cited(summary, TRENDS) == [(latest,)]


def test_a_blood_pressure_trend_follows_the_systolic() -> None:
    summary = structured(
        blood_pressure("b1", 150, 70, "2022-01-10"),
        blood_pressure("b2", 138, 96, "2023-01-10"),
        blood_pressure("b3", 124, 99, "2024-01-10"),
    )

    assert texts(summary, TRENDS) == [
        "Blood pressure panel: 150/70 mm[Hg] (2022-01-10) -> 138/96 mm[Hg] (2023-01-10) -> "
        "124/99 mm[Hg] (2024-01-10), falling"
    ]


@pytest.mark.parametrize(
    "resources",
    [
        pytest.param([observation("o1", "4548-4", "Hemoglobin A1c", 6.1, "%", "2023-01-01")], id="one value"),
        pytest.param(
            [observation("o1", "4548-4", "Hemoglobin A1c", 6.1, "%", "2023-01-01"),
             observation("o2", "4548-4", "Hemoglobin A1c", 6.4, "%", "2023-01-01")],
            id="two values of one day",
        ),
        pytest.param(
            [observation("o1", "4548-4", "Hemoglobin A1c", 6.1, "%", "2022-01-01"),
             {**observation("o2", "4548-4", "Hemoglobin A1c", 9.9, "%", "2023-01-01"), "status": "entered-in-error"}],
            id="the other value entered in error",
        ),
        pytest.param(
            [observation("o1", "2951-2", "Sodium", 139, "mmol/L", "2022-01-01"),
             observation("o2", "2951-2", "Sodium", 141, "mmol/L", "2023-01-01")],
            id="a result that is not a trended key result",
        ),
    ],
)  # fmt: skip
def test_no_trend_without_two_values_on_different_days(resources: list[Resource]) -> None:
    assert texts(structured(*resources), TRENDS) == ["No repeated key vitals or labs to show a trend"]


def test_a_trend_across_units_states_no_direction() -> None:
    # 5.5 mmol/L is about 99 mg/dL: comparing the bare numbers would say "falling".
    summary = structured(
        observation("g1", "2345-7", "Glucose", 100, "mg/dL", "2022-01-01"),
        observation("g2", "2345-7", "Glucose", 5.5, "mmol/L", "2023-01-01"),
    )

    assert texts(summary, TRENDS) == [
        "Glucose: 100 mg/dL (2022-01-01) -> 5.5 mmol/L (2023-01-01), no direction"
    ]


@pytest.mark.parametrize(
    ("numbers", "trend"),
    [([5.0, 6.0], "rising"), ([6.0, 5.0], "falling"), ([100.0, 90.0, 104.0], "stable"),
     ([0.0, 3.0], "no direction"), ([4.0], "no direction")],
    ids=["rising", "falling", "first against last", "from zero", "one value"],
)  # fmt: skip
def test_direction_compares_the_first_value_with_the_last(numbers: list[float], trend: str) -> None:
    assert direction([Point(f"202{i}", f"{n} %", n, "%") for i, n in enumerate(numbers)]) == trend


# ---------------------------------------------------------------------------
# d. Panels
# ---------------------------------------------------------------------------

BMP = [
    ("k", "6298-4", "Potassium", 4.2, "mmol/L"),
    ("na", "2951-2", "Sodium", 140, "mmol/L"),
    ("glu", "2345-7", "Glucose", 88, "mg/dL"),
    ("cr", "2160-0", "Creatinine", 0.9, "mg/dL"),
]


def bmp(**values: float) -> list[Resource]:
    """A basic metabolic panel (four results and their DiagnosticReport), values overridable by id."""
    results = [
        observation(rid, loinc, name, values.get(rid, value), unit) for rid, loinc, name, value, unit in BMP
    ]
    return [*results, report("r1", "Basic metabolic panel", "2024-03-05", *(rid for rid, *_ in BMP))]


def test_a_panel_within_range_is_one_line_citing_every_component() -> None:
    ctx = context(*bmp())
    summary = build_structured(ctx)

    assert texts(summary, LABS) == ["Basic metabolic panel 2024-03-05: 4 results within range"]
    assert sorted(cited(summary, LABS)[0]) == sorted(key_of(ctx, rid) for rid, *_ in BMP)
    assert texts(summary, FLAGGED) == ["No latest result outside its reference range"]


def test_a_panel_with_an_abnormal_component_lists_it_first_among_the_flags_and_counts_it() -> None:
    ctx = context(*bmp(k=5.9))
    summary = build_structured(ctx)

    potassium = key_of(ctx, "k")
    assert (
        summary.section(FLAGGED).lines[0].text.startswith("Potassium: 5.9 mmol/L (2024-03-05) \u2014 high:")
    )
    assert cited(summary, FLAGGED) == [(potassium,)]
    assert texts(summary, LABS) == [
        "Basic metabolic panel 2024-03-05: 3 results within range, 1 flagged (listed above)"
    ]
    # The panel line still cites every component, the flagged one too.
    assert set(cited(summary, LABS)[0]) == {key_of(ctx, rid) for rid, *_ in BMP}
    # Flagged results come before the other labs.
    assert TITLES.index(FLAGGED) < TITLES.index(LABS)
    markdown = summary.to_markdown()
    assert markdown.index("Potassium: 5.9") < markdown.index("Basic metabolic panel")


def test_a_panel_counts_the_components_no_range_covers() -> None:
    resources = bmp(glu=7.0)
    resources[2]["valueQuantity"]["unit"] = resources[2]["valueQuantity"]["code"] = "mmol/L"

    summary = structured(*resources)

    assert texts(summary, LABS) == [
        "Basic metabolic panel 2024-03-05: 3 results within range, 1 without a reference range"
    ]


def test_without_reports_three_labs_of_one_day_form_a_panel_and_two_do_not() -> None:
    three = structured(
        *(observation(rid, loinc, name, value, unit) for rid, loinc, name, value, unit in BMP[:3])
    )
    two = structured(
        *(observation(rid, loinc, name, value, unit) for rid, loinc, name, value, unit in BMP[:2])
    )

    assert texts(three, LABS) == ["Laboratory results 2024-03-05: 3 results within range"]
    assert len(cited(three, LABS)[0]) == 3
    assert sorted(texts(two, LABS)) == [
        "Potassium: 4.2 mmol/L (2024-03-05)",
        "Sodium: 140 mmol/L (2024-03-05)",
    ]


def test_a_report_of_a_single_result_is_no_panel() -> None:
    summary = structured(
        observation("k", "6298-4", "Potassium", 4.2, "mmol/L"),
        report("r1", "Potassium panel", "2024-03-05", "k"),
    )

    assert texts(summary, LABS) == ["Potassium: 4.2 mmol/L (2024-03-05)"]


def test_abnormal_results_come_first_vitals_then_key_labs_and_normal_ones_are_not_flagged() -> None:
    ctx = context(
        observation("ldl", "18262-6", "LDL cholesterol", 171, "mg/dL"),
        observation("a1c", "4548-4", "Hemoglobin A1c", 6.9, "%"),
        observation("hr", "8867-4", "Heart rate", 72, "/min", category="vital-signs"),
        blood_pressure("bp", 146, 92),
        observation("na", "2951-2", "Sodium", 140, "mmol/L", "2024-02-01"),
    )
    summary = build_structured(ctx)

    assert [line.split(":")[0] for line in texts(summary, FLAGGED)] == [
        "Blood pressure panel",
        "Hemoglobin A1c",
        "LDL cholesterol",
    ]
    assert texts(summary, LABS) == ["Heart rate: 72 /min (2024-03-05)", "Sodium: 140 mmol/L (2024-02-01)"]
