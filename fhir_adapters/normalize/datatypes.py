"""Small readers of FHIR datatypes: labels, codes, values, dates and plain-text cuts, pure.

Every builder of `fhir_adapters.normalize` reads a CodeableConcept, a Quantity or a date the same
way through these; `service` reads codes and values with them too, so a fact and a check of it
agree on what a resource says.

What it must not do: any IO, or turn a missing value into a made-up one (None means absent).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date
from typing import Any

JsonObject = dict[str, Any]

_SYSTOLIC, _DIASTOLIC = "8480-6", "8462-4"


def codeable_text(concept: object) -> str | None:
    """CodeableConcept.text, else the first coding's display.

    >>> codeable_text({"coding": [{"code": "1"}, {"display": "Asthma"}]})
    'Asthma'
    >>> codeable_text({"text": " Hypertension ", "coding": [{"display": "HTN"}]})
    'Hypertension'
    """
    if not isinstance(concept, dict):
        return None
    text = nonblank(concept.get("text"))
    if text:
        return text.strip()
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and nonblank(coding.get("display")):
            return str(coding["display"]).strip()
    return None


def coding_key(concept: object) -> str | None:
    """`system|code` of the first coding that has a code.

    >>> coding_key({"coding": [{"system": "http://loinc.org", "code": "4548-4"}]})
    'http://loinc.org|4548-4'
    """
    if not isinstance(concept, dict):
        return None
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and nonblank(coding.get("code")):
            return f"{coding.get('system') or ''}|{coding['code']}"
    return None


def medication_name(resource: JsonObject, medications: dict[str, JsonObject] | None = None) -> str | None:
    """The medication's label: the CodeableConcept, the reference's display, or a contained Medication.

    >>> medication_name({"medicationReference": {"reference": "Medication/1", "display": "Aspirin 81 MG"}})
    'Aspirin 81 MG'
    >>> medication_name({"medicationReference": {"reference": "#m"}, "contained": [
    ...     {"resourceType": "Medication", "id": "m", "code": {"text": "Insulin"}}]})
    'Insulin'
    >>> medication_name({"medicationReference": {"reference": "Medication/1"}}) is None
    True
    >>> medication_name({"medicationReference": {"reference": "Medication/1"}},
    ...                 {"1": {"resourceType": "Medication", "id": "1", "code": {"text": "Vancomycin"}}})
    'Vancomycin'
    """
    name = codeable_text(resource.get("medicationCodeableConcept"))
    if name:
        return name
    reference = resource.get("medicationReference")
    if not isinstance(reference, dict):
        return None
    if nonblank(reference.get("display")):
        return str(reference["display"]).strip()
    target = reference.get("reference")
    if isinstance(target, str) and target.startswith("#"):
        for contained in resource.get("contained") or []:
            if isinstance(contained, dict) and contained.get("id") == target[1:]:
                return codeable_text(contained.get("code"))
    if isinstance(target, str) and medications:
        # A Medication read beside the order ("Medication/7", or "urn:uuid:7" inside a bundle).
        found = medications.get(target.removeprefix("urn:uuid:").split("/_history")[0].split("/")[-1])
        if found is not None:
            return codeable_text(found.get("code"))
    return None


def observation_category(resource: JsonObject) -> str | None:
    """The first category code; `vital-signs` wins when several are given.

    >>> observation_category({"category": [{"coding": [{"code": "exam"}]},
    ...                                    {"coding": [{"code": "vital-signs"}]}]})
    'vital-signs'
    """
    codes = [
        str(coding["code"])
        for concept in resource.get("category") or []
        if isinstance(concept, dict)
        for coding in concept.get("coding") or []
        if isinstance(coding, dict) and nonblank(coding.get("code"))
    ]
    if "vital-signs" in codes:
        return "vital-signs"
    return codes[0] if codes else None


def observation_value(resource: JsonObject) -> str | None:
    """The observation's value as shown to a reader, components included.

    >>> observation_value({"valueQuantity": {"value": 6.06, "unit": "%"}})
    '6.06 %'
    >>> mmhg = lambda v: {"value": v, "unit": "mm[Hg]"}
    >>> observation_value({"component": [
    ...     {"code": {"coding": [{"code": "8462-4"}]}, "valueQuantity": mmhg(80)},
    ...     {"code": {"coding": [{"code": "8480-6"}]}, "valueQuantity": mmhg(120.0)}]})
    '120/80 mm[Hg]'
    >>> observation_value({"valueCodeableConcept": {"text": "Never smoked tobacco (finding)"}})
    'Never smoked tobacco (finding)'
    >>> observation_value({"dataAbsentReason": {"text": "Patient refused"}})
    'not available (Patient refused)'
    """
    own = _value_of(resource)
    if own is not None:
        return own
    components = [c for c in resource.get("component") or [] if isinstance(c, dict)]
    blood_pressure = _blood_pressure(components)
    if blood_pressure:
        return blood_pressure
    rendered = []
    for component in components:
        value = _value_of(component)
        label = codeable_text(component.get("code"))
        if value is not None:
            rendered.append(f"{label}: {value}" if label else value)
    if rendered:
        # Survey panels have dozens of answers; the first few say what the panel is about.
        shown = rendered[:6]
        more = f" (+{len(rendered) - 6} more)" if len(rendered) > 6 else ""
        return "; ".join(shown) + more
    absent = codeable_text(resource.get("dataAbsentReason"))
    return f"not available ({absent})" if absent else None


def _blood_pressure(components: list[JsonObject]) -> str | None:
    by_code = {}
    for component in components:
        for coding in path_of(component, "code", "coding") or []:
            if isinstance(coding, dict) and coding.get("code") in (_SYSTOLIC, _DIASTOLIC):
                by_code[coding["code"]] = component.get("valueQuantity")
    systolic, diastolic = by_code.get(_SYSTOLIC), by_code.get(_DIASTOLIC)
    if not (isinstance(systolic, dict) and isinstance(diastolic, dict)):
        return None
    if systolic.get("value") is None or diastolic.get("value") is None:
        return None
    unit = nonblank(systolic.get("unit")) or nonblank(systolic.get("code")) or ""
    return f"{format_number(systolic['value'])}/{format_number(diastolic['value'])} {unit}".strip()


def _value_of(element: JsonObject) -> str | None:
    quantity = element.get("valueQuantity")
    if isinstance(quantity, dict) and quantity.get("value") is not None:
        unit = nonblank(quantity.get("unit")) or nonblank(quantity.get("code")) or ""
        comparator = nonblank(quantity.get("comparator")) or ""
        return f"{comparator}{format_number(quantity['value'])} {unit}".strip()
    concept = codeable_text(element.get("valueCodeableConcept"))
    if concept:
        return concept
    for key in ("valueString", "valueDateTime", "valueTime"):
        if nonblank(element.get(key)):
            return str(element[key]).strip()
    if isinstance(element.get("valueBoolean"), bool):
        return "yes" if element["valueBoolean"] else "no"
    if isinstance(element.get("valueInteger"), int):
        return str(element["valueInteger"])
    return None


def format_number(value: object) -> str:
    """A measurement as a reader writes it: no float noise, two decimals above 1, three digits below.

    >>> [format_number(v) for v in (120.0, 6.2, 27.5000001, 0.00512345, 3, 1234.567)]
    ['120', '6.2', '27.5', '0.00512', '3', '1234.57']
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    text = f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    if "e" in text:
        return text
    return text.rstrip("0").rstrip(".") if "." in text else text


def truncate_on_line(text: str, limit: int) -> str:
    """At most `limit` characters, cut at the last line break that fits (else a space), marked.

    >>> truncate_on_line("line one\\nline two\\nline three", 19)
    'line one\\nline two\\n[... truncated]'
    >>> truncate_on_line("short", 100)
    'short'
    """
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = head.rfind("\n")
    if cut <= 0:
        cut = head.rfind(" ")
    if cut <= 0:
        cut = limit
    return head[:cut].rstrip() + "\n[... truncated]"


def reasons(resource: JsonObject) -> str | None:
    """The labels of `reasonCode` and `reasonReference.display`, each once, joined by "; ".

    >>> reasons({"reasonCode": [{"text": "Asthma"}], "reasonReference": [{"display": "Asthma"}]})
    'Asthma'
    """
    labels = [codeable_text(c) for c in resource.get("reasonCode") or []]
    labels += [
        nonblank(r.get("display")) for r in resource.get("reasonReference") or [] if isinstance(r, dict)
    ]
    unique = list(dict.fromkeys(label.strip() for label in labels if label))
    return "; ".join(unique) if unique else None


def first_code(concept: object) -> str | None:
    """The first coding's code of a CodeableConcept (clinicalStatus, verificationStatus)."""
    if not isinstance(concept, dict):
        return None
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and nonblank(coding.get("code")):
            return str(coding["code"])
    return None


def day_of(value: object) -> str | None:
    """The date part of a FHIR date/dateTime ("2015", "2015-05" and "2015-05-03" kept as given)."""
    if not isinstance(value, str):
        return None
    match = re.match(r"\d{4}(?:-\d{2}(?:-\d{2})?)?", value)
    return match.group(0) if match else None


def path_of(node: object, *steps: str) -> Any:
    """The element at `steps` below `node`, or None as soon as a step is missing or not an object.

    >>> path_of({"period": {"start": "2020"}}, "period", "start"), path_of({"period": 1}, "period", "start")
    ('2020', None)
    """
    for step in steps:
        node = node.get(step) if isinstance(node, dict) else None
    return node


def first_str(resource: JsonObject, *paths: Iterable[str]) -> str | None:
    """The first non-blank string found at one of `paths` (FHIR's choice types: onsetDateTime, ...)."""
    for path in paths:
        value = path_of(resource, *path)
        if nonblank(value):
            return str(value)
    return None


def nonblank(value: object) -> str | None:
    """`value` when it is a string with some text in it, else None (so `or` can chain fallbacks)."""
    return value if isinstance(value, str) and value.strip() else None


def parse_day(value: str | None) -> date | None:
    """The date a FHIR date or dateTime starts on (a month or year: its first day), or None."""
    if not value:
        return None
    match = re.match(r"(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?", value)
    if not match:
        return None
    try:
        return date(int(match[1]), int(match[2] or 1), int(match[3] or 1))
    except ValueError:
        return None
