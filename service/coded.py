"""Reading coded facts the way a clinician sorts them: which conditions are problems, which are
social history or other findings, which are administrative; which allergy records name no
allergen; the earlier values of a result (trends); which results were reported as one panel.

Pure functions over facts and the raw resources of a `ClinicalContext`. `service.eval.measures`
uses the same classification, so that what the coded part leaves out by design is not counted
as a miss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from fhir_adapters.models import ClinicalContext, Fact
from fhir_adapters.normalize import coding_key, observation_value, parse_day
from service.safety import neutralize

# LOINC codes a clinician looks at first; shown before other labs, in this order.
KEY_LAB_CODES: tuple[str, ...] = (
    "4548-4",  # Hemoglobin A1c
    "2339-0",  # Glucose [Mass/volume] in Blood
    "2345-7",  # Glucose [Mass/volume] in Serum or Plasma
    "2160-0",  # Creatinine [Mass/volume] in Serum or Plasma
    "38483-4",  # Creatinine [Mass/volume] in Blood
    "33914-3",  # eGFR (MDRD)
    "62238-1",  # eGFR (CKD-EPI)
    "98979-8",  # eGFR (CKD-EPI 2021)
    "2823-3",  # Potassium
    "6298-4",  # Potassium [Moles/volume] in Blood
    "2951-2",  # Sodium
    "2947-0",  # Sodium [Moles/volume] in Blood
    "6299-2",  # Urea nitrogen [Mass/volume] in Blood
    "3094-0",  # Urea nitrogen [Mass/volume] in Serum or Plasma
    "718-7",  # Hemoglobin
    "6690-2",  # Leukocytes
    "777-3",  # Platelets
    "18262-6",  # LDL cholesterol (direct)
    "13457-7",  # LDL cholesterol (calculated)
    "2093-3",  # Total cholesterol
    "2085-9",  # HDL cholesterol
    "2571-8",  # Triglycerides
    "6301-6",  # INR
    "1742-6",  # ALT
    "1920-8",  # AST
    "14959-1",  # Microalbumin/creatinine ratio
)

# Vitals and labs whose last values are shown with a direction, in this order.
TREND_CODES: tuple[str, ...] = (
    "85354-9", "55284-4",  # Blood pressure panel
    "29463-7",  # Body weight
    "39156-5",  # BMI
    "4548-4",  # HbA1c
    "2339-0", "2345-7",  # Glucose
    "33914-3", "62238-1", "98979-8", "69405-9",  # eGFR
    "2160-0", "38483-4",  # Creatinine
    "18262-6", "2089-1", "13457-7",  # LDL cholesterol
    "718-7",  # Hemoglobin
)  # fmt: skip


ConditionGroup = Literal["problem", "social", "administrative"]

# SNOMED CT situations that record a task for the care team, not something about the patient.
ADMINISTRATIVE_CODES = frozenset({"314529007"})  # Medication review due (situation)
_ADMINISTRATIVE_WORDS = re.compile(r"\breview due\b", re.IGNORECASE)
# The semantic tag of a SNOMED display ("(finding)", "(situation)"; Synthea sometimes cuts the ")").
_FINDING_TAG = re.compile(r"\((?:finding|situation)\)?\s*$", re.IGNORECASE)
_SOCIAL_WORDS = re.compile(
    r"\b(?:smok\w*|tobacco|employ\w*|unemploy\w*|labor force|education|school|housing|homeless\w*|"
    r"abuse|violence|criminal|social|transport\w*|armed forces|income|incarcerat\w*)\b",
    re.IGNORECASE,
)
_DISORDER_TAG = re.compile(r"\((?:disorder|disease)\)\s*$", re.IGNORECASE)

# Allergy codes that say "allergic to something" without naming the allergen (SNOMED CT).
NON_ALLERGEN_CODES = frozenset(
    {
        "419199007",  # Allergy to substance (finding)
        "609328004",  # Allergic disposition (finding)
        "473010000",  # Hypersensitivity condition (finding)
        "421961002",  # Hypersensitivity reaction (disorder)
    }
)
_NON_ALLERGEN_NAMES = re.compile(
    r"^\s*(?:allergy to substance|allergic disposition|hypersensitivity(?: condition)?)\s*(?:\(\w+\))?\s*$",
    re.IGNORECASE,
)


def condition_group(code: str | None, display: str | None) -> ConditionGroup:
    """Where a condition belongs in the coded part, from its SNOMED code and display.

    >>> [condition_group(None, d) for d in ("Hypertension", "Stress (finding)",
    ...     "Medication review due (situation)", "Victim of intimate partner abuse (finding)")]
    ['problem', 'social', 'administrative', 'social']
    >>> condition_group("http://snomed.info/sct|314529007", None)
    'administrative'
    """
    value = code.partition("|")[2] if code and "|" in code else (code or "")
    name = display or ""
    if value in ADMINISTRATIVE_CODES or _ADMINISTRATIVE_WORDS.search(name):
        return "administrative"
    if _DISORDER_TAG.search(name):
        return "problem"
    if _FINDING_TAG.search(name) or _SOCIAL_WORDS.search(name):
        return "social"
    return "problem"


def is_non_allergen(code: str | None, display: str | None) -> bool:
    """An allergy record that names no allergen ("Allergy to substance (finding)").

    >>> is_non_allergen("http://snomed.info/sct|419199007", "Allergy to substance")
    True
    >>> is_non_allergen(None, "Allergic disposition"), is_non_allergen(None, "Allergy to peanuts")
    (True, False)
    """
    value = code.partition("|")[2] if code and "|" in code else (code or "")
    return value in NON_ALLERGEN_CODES or bool(display and _NON_ALLERGEN_NAMES.match(display))


def concept_code(concept: object) -> str | None:
    """`system|code` of a CodeableConcept's first coding (as normalize keys facts)."""
    return coding_key(concept)


def age_years_at(ctx: ClinicalContext, day: str | None) -> int | None:
    """The patient's age in whole years on `day` (None when the birth date or day is unknown)."""
    patient = ctx.resources.get(ctx.patient.reference) or {}
    birth, when = parse_day(patient.get("birthDate")), parse_day(day)
    if birth is None or when is None or when < birth:
        return None
    return when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))


def patient_sex(ctx: ClinicalContext) -> str | None:
    gender = (ctx.resources.get(ctx.patient.reference) or {}).get("gender")
    return gender if isinstance(gender, str) else None


def resource_of(ctx: ClinicalContext, fact: Fact) -> dict[str, Any]:
    return ctx.resources.get(fact.source.reference) or {}


# ---------------------------------------------------------------------------
# Trends
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    day: str
    value: str  # as a reader sees it ("6.1 %", "120/80 mm[Hg]")
    number: float | None  # what the direction compares (the systolic of a blood pressure)
    unit: str | None = None  # the unit of `number`: numbers in different units are not compared


def history(ctx: ClinicalContext, fact: Fact, limit: int = 3) -> list[Point]:
    """The last `limit` values of the fact's code, oldest first, one per day, from the raw
    Observations (normalize keeps only the latest fact of a code)."""
    by_day: dict[str, Point] = {}
    for ref, resource in ctx.resources.items():
        if not ref.startswith("Observation/") or coding_key(resource.get("code")) != fact.code:
            continue
        if resource.get("status") in ("entered-in-error", "cancelled"):
            continue
        day = _effective_day(resource)
        value = observation_value(resource)
        if day is None or value is None:
            continue
        # Raw resources are not made inert by the pipeline as facts are; their text is, here.
        number, unit = _number(resource)
        by_day[day] = Point(day, neutralize(value), number, unit)
    return [by_day[d] for d in sorted(by_day)][-limit:]


def direction(points: list[Point], tolerance: float = 0.05) -> str:
    """rising / falling / stable, first value against the last (within 5 % is stable).

    >>> direction([Point("2019", "5.6 %", 5.6), Point("2021", "6.1 %", 6.1)])
    'rising'
    >>> direction([Point("2019", "80 kg", 80), Point("2021", "81 kg", 81)])
    'stable'
    >>> direction([Point("2019", "100 mg/dL", 100, "mg/dL"), Point("2021", "5.5 mmol/L", 5.5, "mmol/L")])
    'no direction'
    """
    numbered = [p for p in points if p.number is not None]
    numbers = [p.number for p in numbered if p.number is not None]
    if len(numbers) < 2 or numbers[0] == 0 or len({p.unit for p in numbered}) > 1:
        return "no direction"
    change = (numbers[-1] - numbers[0]) / abs(numbers[0])
    if abs(change) <= tolerance:
        return "stable"
    return "rising" if change > 0 else "falling"


def _effective_day(resource: dict[str, Any]) -> str | None:
    for key in ("effectiveDateTime", "effectiveInstant", "issued"):
        value = resource.get(key)
        if isinstance(value, str) and re.match(r"\d{4}-\d{2}-\d{2}", value):
            return value[:10]
    period = resource.get("effectivePeriod")
    start = period.get("start") if isinstance(period, dict) else None
    return start[:10] if isinstance(start, str) and re.match(r"\d{4}-\d{2}-\d{2}", start) else None


def _number(resource: dict[str, Any]) -> tuple[float | None, str | None]:
    """The number a direction compares and its unit (the systolic's, for a blood pressure)."""
    quantity = resource.get("valueQuantity")
    if isinstance(quantity, dict) and isinstance(quantity.get("value"), int | float):
        return float(quantity["value"]), _unit(quantity)
    for component in resource.get("component") or []:
        codes = [c.get("code") for c in (component.get("code") or {}).get("coding") or []]
        quantity = component.get("valueQuantity") or {}
        value = quantity.get("value")
        if "8480-6" in codes and isinstance(value, int | float):
            return float(value), _unit(quantity)
    return None, None


def _unit(quantity: dict[str, Any]) -> str | None:
    unit = quantity.get("code") or quantity.get("unit")
    return str(unit) if unit else None


# ---------------------------------------------------------------------------
# Panels
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    name: str
    day: str | None
    facts: tuple[Fact, ...]


def panels(ctx: ClinicalContext, facts: list[Fact]) -> tuple[list[Panel], list[Fact]]:
    """The facts reported together by one DiagnosticReport (two or more of them), and the rest.

    Without reports, laboratory facts of one day form one panel. A fact belongs to the newest
    report that lists it.
    """
    wanted = {f.source.reference: f for f in facts}
    taken: set[str] = set()
    found: list[Panel] = []
    reports = [r for ref, r in ctx.resources.items() if ref.startswith("DiagnosticReport/")]
    reports.sort(key=lambda r: str(r.get("effectiveDateTime") or r.get("issued") or ""), reverse=True)
    for report in reports:
        members = []
        for result in report.get("result") or []:
            ref = _observation_ref(result)
            if ref in wanted and ref not in taken:
                members.append(wanted[ref])
        if len(members) < 2:
            continue
        taken.update(m.source.reference for m in members)
        name = _report_name(report)
        found.append(Panel(name, members[0].date, tuple(members)))
    rest = [f for f in facts if f.source.reference not in taken]
    if not reports:
        by_day: dict[str, list[Fact]] = {}
        for f in rest:
            if f.category == "laboratory" and f.date:
                by_day.setdefault(f.date, []).append(f)
        for day, members in by_day.items():
            if len(members) >= 3:
                found.append(Panel("Laboratory results", day, tuple(members)))
                taken.update(m.source.reference for m in members)
        rest = [f for f in rest if f.source.reference not in taken]
    return found, rest


def _observation_ref(result: object) -> str | None:
    reference = result.get("reference") if isinstance(result, dict) else None
    if not isinstance(reference, str):
        return None
    tail = reference.removeprefix("urn:uuid:").split("/_history")[0]
    return f"Observation/{tail.split('/')[-1]}"


def _report_name(report: dict[str, Any]) -> str:
    code = report.get("code") or {}
    text = code.get("text") if isinstance(code, dict) else None
    if not text:
        codings = code.get("coding") or [] if isinstance(code, dict) else []
        text = next((c.get("display") for c in codings if isinstance(c, dict) and c.get("display")), None)
    return neutralize(str(text)) if text else "Panel"


__all__ = [
    "ADMINISTRATIVE_CODES",
    "NON_ALLERGEN_CODES",
    "Panel",
    "Point",
    "age_years_at",
    "condition_group",
    "direction",
    "history",
    "is_non_allergen",
    "panels",
    "patient_sex",
]
