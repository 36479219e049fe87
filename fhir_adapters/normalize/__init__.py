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

Modules, one job each: `context` (`normalize` itself: keys, groups, redaction), `facts` (one
builder per resource type), `patient` (the P1 line and the name redactor), `datatypes` (readers
of CodeableConcept, Quantity, dates, shared with `service`).
"""

from fhir_adapters.normalize.context import KEY_ORDER, normalize
from fhir_adapters.normalize.datatypes import (
    codeable_text,
    coding_key,
    format_number,
    medication_name,
    observation_category,
    observation_value,
    parse_day,
    truncate_on_line,
)
from fhir_adapters.normalize.facts import ACTIVE_CONDITION
from fhir_adapters.normalize.patient import PatientSummary, age_between, name_redactor, patient_summary

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
    "parse_day",
    "patient_summary",
    "truncate_on_line",
]
