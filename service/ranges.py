"""Is an observation's value abnormal, and by whose range? Three sources, in this order.

1. The observation's own `interpretation` (H, L, A, ... as the laboratory coded it);
2. its own `referenceRange` (low/high in the value's unit);
3. the versioned table `service/reference_ranges/vN.yaml`, by LOINC code and unit, for adults
   only: for a patient under the table's `min_age_years` it says so instead of guessing.

A released table is never edited (a change is a new version); its id, version and sha256 travel
in the structured JSON, so a flag can always be traced to the exact range that raised it.

What it must not do: do IO after loading the table, or flag a value whose unit the range does not
name (a glucose in mmol/L is not compared with a range in mg/dL).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import yaml

from fhir_adapters.normalize import format_number

FlagSource = Literal["interpretation", "referenceRange", "table"]
Direction = Literal["high", "low", "abnormal"]

DEFAULT_TABLE = "v1"
BP_PANELS = frozenset({"85354-9", "55284-4"})
SYSTOLIC, DIASTOLIC = "8480-6", "8462-4"

# v3 ObservationInterpretation codes that mean "outside the normal range".
_HIGH = frozenset({"H", "HH", "HU", ">", "HX"})
_LOW = frozenset({"L", "LL", "LU", "<", "LX"})
_ABNORMAL = frozenset({"A", "AA", "POS", "DET", "R", "W"})
_NORMAL = frozenset({"N", "NEG", "ND", "S"})


@dataclass(frozen=True)
class Flag:
    """What a source says of one value. `direction` is None for a value within range."""

    direction: Direction | None
    label: str
    source: FlagSource
    source_name: str

    @property
    def abnormal(self) -> bool:
        return self.direction is not None

    def text(self) -> str:
        """'high: stage 2 hypertension range (ACC/AHA 2017 ...)' for a reader.

        >>> Flag("low", "below range", "referenceRange", "the laboratory's range").text()
        "low: below range (the laboratory's range)"
        """
        head = f"{self.direction}: {self.label}" if self.direction else self.label
        return f"{head} ({self.source_name})"


@dataclass(frozen=True)
class RangeTable:
    id: str
    version: str
    sha256: str
    min_age_years: int
    sources: dict[str, str]
    tests: tuple[dict[str, Any], ...]

    def identity(self) -> dict[str, str]:
        return {"id": self.id, "version": self.version, "sha256": self.sha256}

    def entry(self, loinc: str, sex: str | None) -> dict[str, Any] | None:
        """The table's entry for a LOINC code (the one of the patient's sex when ranges differ)."""
        matches = [t for t in self.tests if loinc in t["loinc"]]
        for test in matches:
            if test.get("sex") in (None, sex):
                return test
        return None


def load_table(version: str = DEFAULT_TABLE) -> RangeTable:
    """Read and check `service/reference_ranges/<version>.yaml` (shipped as package data)."""
    raw = resources.files("service").joinpath("reference_ranges", f"{version}.yaml").read_bytes()
    data = yaml.safe_load(raw.decode("utf-8"))
    if not isinstance(data, dict) or data.get("version") != version:
        raise ValueError(f"reference_ranges/{version}.yaml: version field must be {version!r}")
    sources = {str(k): str(v) for k, v in (data.get("sources") or {}).items()}
    tests = tuple(data.get("tests") or [])
    for test in tests:
        if test.get("source") not in sources:
            raise ValueError(f"reference_ranges/{version}.yaml: {test.get('name')!r} names no known source")
        if not (test.get("bands") or test.get("categories")):
            raise ValueError(f"reference_ranges/{version}.yaml: {test.get('name')!r} has no bands")
    return RangeTable(
        id=str(data["id"]),
        version=version,
        sha256=hashlib.sha256(raw).hexdigest(),
        min_age_years=int(data.get("min_age_years", 18)),
        sources=sources,
        tests=tests,
    )


def loinc_codes(resource: dict[str, Any]) -> list[str]:
    """Every LOINC code of an observation's (or component's) code."""
    codings = (resource.get("code") or {}).get("coding") or []
    return [
        str(c["code"])
        for c in codings
        if isinstance(c, dict) and c.get("code") and c.get("system", "http://loinc.org") == "http://loinc.org"
    ]


def quantity(element: dict[str, Any]) -> tuple[float, str] | None:
    """(value, unit) of a valueQuantity without a comparator, else None."""
    q = element.get("valueQuantity")
    if not isinstance(q, dict) or q.get("comparator"):
        return None
    value = q.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value), str(q.get("code") or q.get("unit") or "")


def blood_pressure(resource: dict[str, Any]) -> tuple[float, float, str] | None:
    """(systolic, diastolic, unit) of a blood pressure panel, else None."""
    found: dict[str, tuple[float, str]] = {}
    for component in resource.get("component") or []:
        if not isinstance(component, dict):
            continue
        value = quantity(component)
        for code in loinc_codes(component):
            if code in (SYSTOLIC, DIASTOLIC) and value is not None:
                found[code] = value
    if SYSTOLIC not in found or DIASTOLIC not in found:
        return None
    return found[SYSTOLIC][0], found[DIASTOLIC][0], found[SYSTOLIC][1]


def flag_observation(
    resource: dict[str, Any], table: RangeTable, *, age_years: int | None, sex: str | None
) -> Flag | None:
    """The flag of one Observation resource, or None when no source covers it.

    >>> table = load_table()
    >>> obs = {"code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
    ...        "valueQuantity": {"value": 6.1, "unit": "%"}}
    >>> flag_observation(obs, table, age_years=50, sex="female").text()
    'high: prediabetes range (ADA Standards of Care 2024, diagnosis and classification of diabetes)'
    >>> flag_observation(obs, table, age_years=9, sex="female") is None
    True
    """
    own = interpretation_flag(resource) or reference_range_flag(resource)
    if own is not None:
        return own
    if age_years is None or age_years < table.min_age_years:
        return None
    return table_flag(resource, table, sex)


def interpretation_flag(resource: dict[str, Any]) -> Flag | None:
    for concept in resource.get("interpretation") or []:
        if not isinstance(concept, dict):
            continue
        for coding in concept.get("coding") or []:
            code = str(coding.get("code") or "") if isinstance(coding, dict) else ""
            label = str(concept.get("text") or coding.get("display") or code)
            direction: Direction | None
            if code in _HIGH:
                direction = "high"
            elif code in _LOW:
                direction = "low"
            elif code in _ABNORMAL:
                direction = "abnormal"
            elif code in _NORMAL:
                direction = None
            else:
                continue
            return Flag(direction, label, "interpretation", "interpretation recorded with the result")
    return None


def reference_range_flag(resource: dict[str, Any]) -> Flag | None:
    value = quantity(resource)
    if value is None:
        return None
    for rng in resource.get("referenceRange") or []:
        if not isinstance(rng, dict):
            continue
        low, high = _bound(rng.get("low"), value[1]), _bound(rng.get("high"), value[1])
        if low is None and high is None:
            continue
        shown = "-".join(format_number(b) if b is not None else "" for b in (low, high)).strip("-")
        name = f"the laboratory's range {shown} {value[1]}".rstrip()
        if low is not None and value[0] < low:
            return Flag("low", "below range", "referenceRange", name)
        if high is not None and value[0] > high:
            return Flag("high", "above range", "referenceRange", name)
        return Flag(None, "within range", "referenceRange", name)
    return None


def table_flag(resource: dict[str, Any], table: RangeTable, sex: str | None) -> Flag | None:
    for code in loinc_codes(resource):
        entry = table.entry(code, sex)
        if entry is None:
            continue
        source = table.sources[entry["source"]]
        band: dict[str, Any] | None
        if entry.get("kind") == "blood_pressure":
            bp = blood_pressure(resource)
            if bp is None or bp[2] not in entry["unit"]:
                return None
            band = _bp_category(entry["categories"], bp[0], bp[1])
        else:
            value = quantity(resource)
            if value is None or value[1] not in entry["unit"]:
                return None
            band = _band(entry["bands"], value[0])
        if band is None:
            return None
        return Flag(band.get("flag"), str(band["label"]), "table", source)
    return None


def _bound(element: object, unit: str) -> float | None:
    if not isinstance(element, dict) or element.get("value") is None:
        return None
    own = str(element.get("code") or element.get("unit") or unit)
    if own != unit:
        return None
    return float(element["value"])


def _band(bands: list[dict[str, Any]], value: float) -> dict[str, Any] | None:
    for band in bands:
        if "min" in band and value < float(band["min"]):
            continue
        if "below" in band and value >= float(band["below"]):
            continue
        return band
    return None


def _bp_category(categories: list[dict[str, Any]], systolic: float, diastolic: float) -> dict[str, Any]:
    for category in categories:
        s_min, d_min = category.get("systolic_min"), category.get("diastolic_min")
        if s_min is None and d_min is None:
            return category
        if (s_min is not None and systolic >= s_min) or (d_min is not None and diastolic >= d_min):
            return category
    return categories[-1]


__all__ = [
    "BP_PANELS",
    "DEFAULT_TABLE",
    "Flag",
    "RangeTable",
    "blood_pressure",
    "flag_observation",
    "load_table",
    "loinc_codes",
    "quantity",
]
