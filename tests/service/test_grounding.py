"""Grounding keeps what the cited facts support and drops the rest, saying why."""

from __future__ import annotations

import json

import pytest

from fhir_adapters.models import ClinicalContext, Fact, SourceRef
from service.grounding import (
    MAX_WORDS,
    NO_CLAIMS,
    NOT_JSON,
    Claim,
    ground,
    ground_output,
    parse_claims,
)
from service.verify.dates import find_dates


def _fact(key: str, kind: str, text: str, **extra: str) -> Fact:
    return Fact(key=key, kind=kind, text=text, source=SourceRef("X", key.lower(), "1"), **extra)  # type: ignore[arg-type]


CTX = ClinicalContext(
    patient=SourceRef("Patient", "p1", "1"),
    patient_summary="female, born 1970-03-15",
    facts=[
        _fact("P1", "patient", "female, born 1970-03-15"),
        _fact(
            "C1", "condition", "Type 2 diabetes mellitus (active, since 2015-06-01)",
            date="2015-06-01", status="active", display="Type 2 diabetes mellitus",
        ),
        _fact("C2", "condition", "Essential hypertension (active, since 2012-01-20)", date="2012-01-20"),
        _fact(
            "M1", "medication", "metformin hydrochloride 500 MG Oral Tablet (active, since 2015-06-10)",
            display="metformin hydrochloride 500 MG Oral Tablet", status="active",
        ),
        _fact(
            "M2", "medication", "lisinopril 10 MG Oral Tablet (active)",
            display="lisinopril 10 MG Oral Tablet",
        ),
        _fact("A1", "allergy", "Allergy to penicillin (active)"),
        _fact(
            "L1", "observation", "Hemoglobin A1c/Hemoglobin.total in Blood: 7.2 % on 2023-04-01",
            value="7.2 %", date="2023-04-01",
        ),
        _fact("L2", "observation", "Platelets: 1,250.0 10*3/uL on 2023-04-01", date="2023-04-01"),
        _fact("V1", "observation", "Blood pressure: 120/80 mmHg on 2023-04-01", date="2023-04-01"),
        _fact(
            "V2", "observation",
            "Systolic blood pressure 130 mm[Hg]; Diastolic blood pressure 85 mm[Hg] on 2022-11-02",
            date="2022-11-02",
        ),
        _fact("E1", "encounter", "General examination of patient on 2023-04-01", date="2023-04-01"),
    ],
)  # fmt: skip


KEPT = [
    ("Has type 2 diabetes since 2015-06-01.", ("C1",)),
    ("HbA1c was 7.2% on 2023-04-01.", ("L1",)),
    ("HbA1c 7.20 % in April 2023.", ("L1",)),
    ("Hemoglobin A1c was 7.2 on April 1, 2023.", ("L1",)),
    ("Hemoglobin A1c was 7.2 on 1 April 2023.", ("L1",)),
    ("Blood pressure 120/80 mmHg.", ("V1",)),
    ("Blood pressure was 130/85 in 2022.", ("V2",)),
    ("Platelets 1250 on 04/01/2023.", ("L2",)),
    ("Takes metformin 500 mg for diabetes.", ("M1", "C1")),
    ("Takes Metformin and lisinopril.", ("M1", "M2")),
    ("Allergic to penicillin.", ("A1",)),
    ("Hypertensive since 2012.", ("C2",)),
    ("Had a general examination in 2023-04.", ("E1",)),
    ("History of essential hypertension, diagnosed 2012.", ("C2",)),
    ("Type 2 diabetes mellitus with hypertension since 2012, on lisinopril 10 mg.", ("C1", "C2", "M2")),
]


@pytest.mark.parametrize(("text", "citations"), KEPT)
def test_ground_keeps_claims_the_cited_facts_support(text: str, citations: tuple[str, ...]) -> None:
    result = ground([Claim(text, citations)], CTX)

    assert [d.reason for d in result.dropped] == []
    assert result.kept == [Claim(text, citations)]


DROPPED = [
    ("Has diabetes.", ("C9",), "cites C9, which is not in the record"),
    ("Has diabetes.", ("C1", "C9", "M7"), "cites C9 and M7, which are not in the record"),
    ("HbA1c was 7.9%.", ("L1",), "states 7.9 %, not a value of the cited sources [L1]"),
    ("HbA1c 7.2% on 2023-05-01.", ("L1",), "states 2023-05-01, not a date of the cited sources [L1]"),
    ("HbA1c 7.2% in May 2023.", ("L1",), "states May 2023, not a date of the cited sources [L1]"),
    ("Diabetes diagnosed in 2016.", ("C1",), "states 2016, not a date of the cited sources [C1]"),
    ("Blood pressure 120/85 mmHg.", ("V1",), "states 120/85, not a value of the cited sources [V1]"),
    ("Blood pressure was 85/130.", ("V2",), "states 85/130, not a value of the cited sources [V2]"),
    ("HbA1c 7.2% and BP 120/80.", ("L1",), "states 120/80, not a value of the cited sources [L1]"),
    ("Takes metformin daily.", ("M2",), "says metformin daily, not stated by the cited sources [M2]"),
    ("Takes metformin and lisinopril.", ("M1",), "says lisinopril, not stated by the cited sources [M1]"),
    ("Takes lisinopril 10 mg daily.", ("M2",), "says daily, not stated by the cited sources [M2]"),
    ("Diabetes treated with metformin.", ("C1",), "says treated and metformin, not stated by the cited sources [C1]"),
    ("Has cancer.", ("C1",), "says cancer, not stated by the cited sources [C1]"),
    ("P1", ("C2",), "is not a statement (fewer than 2 words)"),
    ("Patient P1", ("C2",), "states nothing the cited sources could support [C2]"),
    ("Has diabetes.", (), "cites no source"),
    ("Allergic to bee venom.", ("A1",), "says bee venom, not stated by the cited sources [A1]"),
    ("Type 2 diabetes mellitus, well controlled.", ("C1",), "says well controlled, not stated by the cited sources [C1]"),
    (
        "History of streptococcal sore throat, otitis media and acute pharyngitis, recorded 2015-06-01.",
        ("C1",),
        "says streptococcal sore throat, otitis media and acute pharyngitis, not stated by the cited sources [C1]",
    ),
    (
        "Diabetes mellitus with severe diabetic retinopathy and nephropathy.",
        ("C1",),
        "says severe, retinopathy and nephropathy, not stated by the cited sources [C1]",
    ),
    ("Has no diabetes.", ("C1",), "the cited Condition records it (Type 2 diabetes mellitus) [C1]"),
    ("   ", ("C1",), "is empty"),
    (" ".join(["diabetes"] * 61), ("C1",), f"has 61 words, more than the {MAX_WORDS}-word limit"),
]


@pytest.mark.parametrize(("text", "citations", "reason"), DROPPED)
def test_ground_drops_unsupported_claims_with_a_specific_reason(
    text: str, citations: tuple[str, ...], reason: str
) -> None:
    result = ground([Claim(text, citations)], CTX)

    assert result.kept == []
    assert [(d.claim.text, d.reason) for d in result.dropped] == [(text, reason)]


def test_ground_drops_repeated_claims_but_keeps_the_first() -> None:
    first = Claim("Has type 2 diabetes.", ("C1",))
    again = Claim("has Type 2 diabetes", ("C1",))

    result = ground([first, again], CTX)

    assert result.kept == [first]
    assert [(d.claim, d.reason) for d in result.dropped] == [(again, "repeats an earlier claim")]


def test_ground_keeps_order_and_reports_support_rate() -> None:
    claims = [
        Claim("Has type 2 diabetes.", ("C1",)),
        Claim("HbA1c was 9.1%.", ("L1",)),
        Claim("Allergic to penicillin.", ("A1",)),
        Claim("Takes lisinopril.", ("M1",)),
    ]

    result = ground(claims, CTX)

    assert result.kept == [claims[0], claims[2]]
    assert [d.claim for d in result.dropped] == [claims[1], claims[3]]
    assert result.support_rate == 0.5


def test_ground_checks_every_cited_fact_together_not_just_the_first() -> None:
    # 7.2 is in L1 only, metformin in M1 only: citing both supports both.
    claim = Claim("Takes metformin; HbA1c 7.2%.", ("M1", "L1"))

    assert ground([claim], CTX).kept == [claim]


# --- parsing -----------------------------------------------------------------------------------

def _claims_json(*items: object, wrap: bool = True) -> str:
    return json.dumps({"claims": list(items)} if wrap else list(items))


DIABETES = {"text": "Has diabetes.", "citations": ["C1"]}
PRESSURE = {"text": "BP 120/80.", "citations": ["V1", "C2"]}
GOOD_JSON = _claims_json(DIABETES, PRESSURE)
EXPECTED = [Claim("Has diabetes.", ("C1",)), Claim("BP 120/80.", ("V1", "C2"))]


@pytest.mark.parametrize(
    "output",
    [
        GOOD_JSON,
        f"Here is the summary:\n{GOOD_JSON}\nI hope this helps.",
        f"```json\n{GOOD_JSON}\n```",
        _claims_json(DIABETES, PRESSURE, wrap=False),
        _claims_json(
            {"text": "Has diabetes.", "citations": "C1"},
            {"text": "BP 120/80.", "citations": "v1, [C2]"},
        ),
        _claims_json(
            {"text": "1. Has diabetes.", "citations": ["C1", "C1"]},
            {"text": "- BP  120/80.", "citations": ["V1", "C2"]},
        ),
    ],
)
def test_parse_claims_reads_json_claims_tolerating_surrounding_text(output: str) -> None:
    assert parse_claims(output) == (EXPECTED, [])


def test_parse_claims_takes_inline_keys_when_the_citations_field_is_missing() -> None:
    claims, dropped = parse_claims('{"claims": [{"text": "Has diabetes [C1] and hypertension [c2]."}]}')

    assert claims == [Claim("Has diabetes [C1] and hypertension [c2].", ("C1", "C2"))]
    assert dropped == []


def test_parse_claims_turns_non_json_output_into_one_dropped_claim_keeping_the_text() -> None:
    claims, dropped = parse_claims("  The patient is doing well overall.  ")

    assert claims == []
    assert [(d.claim.text, d.claim.citations, d.reason) for d in dropped] == [
        ("The patient is doing well overall.", (), NOT_JSON)
    ]


def test_parse_claims_recovers_whole_claims_from_output_cut_off_at_max_tokens() -> None:
    output = '{"claims": [{"text": "Has diabetes.", "citations": ["C1"]}, {"text": "BP 120/80 and'

    claims, dropped = parse_claims(output)

    assert claims == [Claim("Has diabetes.", ("C1",))]
    assert [(d.claim.text, d.reason) for d in dropped] == [(output, NOT_JSON)]


def test_parse_claims_names_json_without_a_claims_list() -> None:
    for output in ('{"summary": "fine"}', '{"claims": "none"}'):
        claims, dropped = parse_claims(output)
        assert claims == []
        assert [d.reason for d in dropped] == [NO_CLAIMS]


def test_parse_claims_drops_malformed_items_and_keeps_the_rest() -> None:
    output = _claims_json(DIABETES, {"citations": ["C2"]}, "loose text")

    claims, dropped = parse_claims(output)

    assert claims == [Claim("Has diabetes.", ("C1",))]
    assert [(d.claim.text, d.reason) for d in dropped] == [
        ('{"citations": ["C2"]}', "claim 2 has no text"),
        ("loose text", "claim 3 is not an object with text and citations"),
    ]


def test_ground_output_puts_unreadable_output_and_unsupported_claims_in_dropped() -> None:
    # Cut off before the closing "]}": both claim objects are whole, the document is not.
    good, bad = {"text": "HbA1c 7.2%.", "citations": ["L1"]}, {"text": "HbA1c 8%.", "citations": ["L1"]}
    whole = _claims_json(good, bad)
    output = whole[: -len("]}")]

    result = ground_output(output, CTX)

    assert [c.text for c in result.kept] == ["HbA1c 7.2%."]
    assert [d.reason for d in result.dropped] == [NOT_JSON, "states 8 %, not a value of the cited sources [L1]"]


# --- the pieces --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "candidates"),
    [
        ("on 2023-04-01", {"2023-04-01"}),
        ("at 2023-04-01T10:30:00Z", {"2023-04-01"}),
        ("on 04/01/2023", {"2023-04-01", "2023-01-04"}),
        ("on 25/12/2023", {"2023-12-25"}),
        ("on April 1, 2023", {"2023-04-01"}),
        ("on 1st April 2023", {"2023-04-01"}),
        ("in Sept. 2021", {"2021-09"}),
        ("in 2021-09", {"2021-09"}),
        ("since 1998.", {"1998"}),
    ],
)
def test_find_dates_normalizes_common_forms_to_iso(text: str, candidates: set[str]) -> None:
    dates, rest = find_dates(text)

    assert [set(d.candidates) for d in dates] == [candidates]
    assert not any(ch.isdigit() for ch in rest)


def test_a_contradicted_claim_is_flagged_as_a_high_severity_warning() -> None:
    result = ground([Claim("The patient is not allergic to penicillin.", ("A1",))], CTX)

    assert result.kept == []
    assert [(d.verdict, d.severity, d.contradicted) for d in result.dropped] == [("contradicted", "high", True)]
