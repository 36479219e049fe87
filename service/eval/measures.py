"""What one summary is worth, in figures: pure measures of a `SummaryResult` and its record.

- claims kept / dropped (of which contradicted), dropped by severity, with their reasons;
- key-fact coverage: every active allergy, medication and problem *of the record* (read from
  the raw resources, not from what normalize kept) must be named in the written markdown;
- narrative statements that add information beyond the coded part, and the ones that only
  restate a coded line (its name, citation key, status or date): `quoted`;
- conflicts the structured part lists, tokens and seconds;
- the patient's sex and age band (age at death, else at the latest date in the record).

What it must not do: IO of any kind, or judge whether a claim is true (that is grounding's).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fhir_adapters.models import ClinicalContext, PatientRecord
from fhir_adapters.normalize import codeable_text, coding_key, medication_name, parse_day
from service.coded import condition_group
from service.pipeline import SummaryResult
from service.safety import md_unescape
from service.verify.terms import coded_terms, statement_terms

JsonObject = dict[str, Any]
KeyKind = Literal["allergy", "medication", "problem"]

AGE_BANDS: tuple[str, ...] = ("0-17", "18-44", "45-64", "65+")
UNKNOWN = "unknown"

_ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
_NOT_A_FINDING = frozenset({"entered-in-error", "refuted"})


@dataclass(frozen=True)
class KeyFact:
    """An active allergy, medication or problem of the record, and whether the markdown names it."""

    kind: KeyKind
    name: str | None  # None when the record holds no name for it (e.g. an unresolved medicationReference)
    reference: str
    found: bool

    def to_json(self) -> JsonObject:
        return {"kind": self.kind, "name": self.name, "reference": self.reference, "found": self.found}


@dataclass(frozen=True)
class NarrativeStatement:
    """A kept statement of the narrative and what it says beyond the coded part."""

    text: str
    citations: tuple[str, ...]
    new_terms: tuple[str, ...]  # words, numbers and dates absent from the coded part
    written_by: Literal["model", "quote"] = "model"

    @property
    def adds_information(self) -> bool:
        return bool(self.new_terms)

    def to_json(self) -> JsonObject:
        return {
            "text": self.text,
            "citations": list(self.citations),
            "adds_information": self.adds_information,
            "new_terms": list(self.new_terms),
            "written_by": self.written_by,
        }


@dataclass(frozen=True)
class DroppedStatement:
    text: str
    citations: tuple[str, ...]
    reason: str
    verdict: str
    severity: str

    def to_json(self) -> JsonObject:
        return {
            "text": self.text,
            "citations": list(self.citations),
            "reason": self.reason,
            "verdict": self.verdict,
            "severity": self.severity,
        }


@dataclass(frozen=True)
class PatientEvaluation:
    patient: str
    sex: str
    age: int | None
    age_band: str
    kept: tuple[NarrativeStatement, ...]
    dropped: tuple[DroppedStatement, ...]
    key_facts: tuple[KeyFact, ...]
    conflicts: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    seconds_generate: float
    facts: int
    skipped: int
    origin: str = ""  # the bundle file or the server it was read from (for the operator)
    notes: int = 0  # notes in the record
    notes_read: int = 0  # of them, read by the model

    @property
    def quoted(self) -> int:
        return sum(s.written_by == "quote" for s in self.kept)

    @property
    def claims_contradicted(self) -> int:
        return sum(d.verdict == "contradicted" for d in self.dropped)

    @property
    def adds_information(self) -> int:
        return sum(s.adds_information for s in self.kept)

    @property
    def adds_information_model_written(self) -> int:
        return sum(s.adds_information and s.written_by == "model" for s in self.kept)

    @property
    def key_facts_found(self) -> int:
        return sum(k.found for k in self.key_facts)

    @property
    def coverage(self) -> float:
        """Share of the record's active allergies, medications and problems the markdown names (1.0
        when it has none)."""
        return self.key_facts_found / len(self.key_facts) if self.key_facts else 1.0

    def to_json(self) -> JsonObject:
        severities = Counter(d.severity for d in self.dropped)
        return {
            "patient": self.patient,
            "origin": self.origin,
            "sex": self.sex,
            "age": self.age,
            "age_band": self.age_band,
            "claims_kept": len(self.kept),
            "claims_dropped": len(self.dropped),
            "claims_contradicted": self.claims_contradicted,
            "dropped_by_severity": {s: severities.get(s, 0) for s in ("high", "medium", "low")},
            "adds_information": self.adds_information,
            "adds_information_model_written": self.adds_information_model_written,
            "quoted": self.quoted,
            "notes": self.notes,
            "notes_read": self.notes_read,
            "adds_nothing": len(self.kept) - self.adds_information,
            "key_facts": len(self.key_facts),
            "key_facts_found": self.key_facts_found,
            "coverage": round(self.coverage, 4),
            "coverage_misses": [k.to_json() for k in self.key_facts if not k.found],
            "conflicts": self.conflicts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "seconds_generate": round(self.seconds_generate, 3),
            "facts": self.facts,
            "skipped": self.skipped,
            "kept": [s.to_json() for s in self.kept],
            "dropped": [d.to_json() for d in self.dropped],
        }


# --- pure measures ------------------------------------------------------------------------------


def age_in_years(birth: str | None, as_of: str | None) -> int | None:
    """Whole years between two ISO dates (a partial birth date counts from its first day).

    >>> age_in_years("1950-06-15", "2015-06-14"), age_in_years("1950-06-15", "2015-06-15")
    (64, 65)
    >>> age_in_years("1950", "2000-01-01"), age_in_years(None, "2000-01-01")
    (50, None)
    """
    start, end = parse_day(birth), parse_day(as_of)
    if start is None or end is None or end < start:
        return None
    return end.year - start.year - ((end.month, end.day) < (start.month, start.day))


def age_band(age: int | None) -> str:
    """The report's age band.

    >>> [age_band(a) for a in (0, 17, 18, 44, 45, 64, 65, 101, None)]
    ['0-17', '0-17', '18-44', '18-44', '45-64', '45-64', '65+', '65+', 'unknown']
    """
    if age is None:
        return UNKNOWN
    if age < 18:
        return AGE_BANDS[0]
    if age < 45:
        return AGE_BANDS[1]
    return AGE_BANDS[2] if age < 65 else AGE_BANDS[3]


def as_of_date(patient: JsonObject, ctx: ClinicalContext) -> str | None:
    """The date an age is taken at: the date of death, else the latest date in the record."""
    died = patient.get("deceasedDateTime")
    if isinstance(died, str) and died:
        return died[:10]
    dates = [f.date for f in ctx.facts if f.date and f.kind != "patient"]
    return max(dates) if dates else None


def active_key_facts(
    record: PatientRecord, names: Mapping[str, str] | None = None
) -> list[tuple[KeyKind, str | None, str]]:
    """(kind, name, Type/id) of every active allergy, medication and problem in the raw record.

    Read from the resources as fetched, not from normalize's facts, so that what normalize or the
    structured part leave out shows as a miss instead of vanishing from the denominator. `names`
    holds the names of referenced Medications (`Medication/id` -> name) the record does not.
    """
    items: list[tuple[KeyKind, str | None, str]] = []
    for resource in record.of_type("AllergyIntolerance"):
        if _status(resource.get("clinicalStatus")) == "active" and _is_finding(resource):
            items.append(("allergy", codeable_text(resource.get("code")), _ref(resource)))
    for resource in record.of_type("MedicationRequest"):
        if resource.get("status") == "active":
            name = medication_name(resource) or (names or {}).get(_medication_reference(resource) or "")
            items.append(("medication", name, _ref(resource)))
    for resource in record.of_type("Condition"):
        if _status(resource.get("clinicalStatus")) in _ACTIVE_CONDITION and _is_finding(resource):
            name = codeable_text(resource.get("code"))
            # Administrative items ("Medication review due") are left out of the coded part by
            # design (service.structured); the same classification keeps them out of the count.
            # Social findings are shown in their own section and stay counted.
            if condition_group(coding_key(resource.get("code")), name) == "administrative":
                continue
            items.append(("problem", name, _ref(resource)))
    return items


def key_fact_coverage(
    record: PatientRecord, markdown: str, names: Mapping[str, str] | None = None
) -> tuple[KeyFact, ...]:
    """Each active allergy, medication and problem, found when its name appears in the markdown
    (case and spacing aside). One entry per kind and name: two orders of one drug are one fact."""
    written = _plain(md_unescape(markdown))  # as the reader sees it, escapes rendered
    seen: dict[tuple[str, str], KeyFact] = {}
    for kind, name, reference in active_key_facts(record, names):
        key = (kind, _plain(name) if name else reference)
        if key not in seen:
            seen[key] = KeyFact(kind, name, reference, bool(name) and _plain(name or "") in written)
    return tuple(seen.values())


def assess_statement(
    text: str,
    citations: Sequence[str],
    coded: frozenset[str],
    keys: frozenset[str],
    written_by: Literal["model", "quote"] = "model",
) -> NarrativeStatement:
    """A kept statement and the terms it states that the coded part does not.

    >>> keys = frozenset({"C1"})
    >>> coded = coded_terms("Hypertension (since 2011-01-01) [C1]", keys)
    >>> assess_statement("Hypertension, active since 2011 [C1]", ["C1"], coded, keys).new_terms
    ()
    >>> assess_statement("Hypertension treated with lisinopril [C1]", ["C1"], coded, keys).new_terms
    ('lisino', 'treate')
    """
    new = sorted(statement_terms(text, keys) - coded)
    return NarrativeStatement(text, tuple(citations), tuple(new), written_by)


def measure_patient(
    record: PatientRecord,
    ctx: ClinicalContext,
    result: SummaryResult,
    seconds: float,
    origin: str = "",
    names: Mapping[str, str] | None = None,
) -> PatientEvaluation:
    """The figures of one summary. Pure."""
    keys = frozenset(f.key for f in ctx.facts)
    coded = coded_terms(md_unescape(f"{ctx.patient_summary}\n{result.structured.to_markdown()}"), keys)
    gender = record.patient.get("gender")
    age = age_in_years(_text(record.patient.get("birthDate")), as_of_date(record.patient, ctx))
    conflicts = result.structured.to_json().get("conflicts", [])
    return PatientEvaluation(
        patient=result.patient,
        sex=gender if isinstance(gender, str) and gender else UNKNOWN,
        age=age,
        age_band=age_band(age),
        kept=tuple(assess_statement(c.text, c.citations, coded, keys, c.origin) for c in result.kept),
        dropped=tuple(
            DroppedStatement(
                d.claim.text,
                tuple(d.claim.citations),
                d.reason,
                str(getattr(d, "verdict", "unsupported")),
                str(getattr(d, "severity", "low")),
            )
            for d in result.dropped
        ),
        key_facts=key_fact_coverage(record, result.markdown, names),
        conflicts=len(conflicts) if isinstance(conflicts, list) else 0,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        seconds=seconds,
        seconds_generate=result.seconds_generate,
        facts=result.facts,
        skipped=len(result.skipped),
        origin=origin,
        notes=result.notes,
        notes_read=len(result.notes_read.read) if result.notes_read else 0,
    )


# --- helpers ------------------------------------------------------------------------------------


def _plain(text: str) -> str:
    return " ".join(text.casefold().split())


def _status(concept: object) -> str | None:
    if not isinstance(concept, dict):
        return None
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            return str(coding["code"])
    return None


def _is_finding(resource: JsonObject) -> bool:
    return _status(resource.get("verificationStatus")) not in _NOT_A_FINDING


def _medication_reference(resource: JsonObject) -> str | None:
    target = resource.get("medicationReference")
    reference = target.get("reference") if isinstance(target, dict) else None
    if not isinstance(reference, str):
        return None
    match = re.search(r"(?:^|/)(Medication/[^/]+)$", reference)
    return match.group(1) if match else None


def _ref(resource: JsonObject) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


__all__ = [
    "AGE_BANDS",
    "UNKNOWN",
    "DroppedStatement",
    "KeyFact",
    "NarrativeStatement",
    "PatientEvaluation",
    "active_key_facts",
    "age_band",
    "age_in_years",
    "as_of_date",
    "assess_statement",
    "coded_terms",
    "key_fact_coverage",
    "measure_patient",
    "statement_terms",
]
