"""Flags of abnormal values: the observation's interpretation, its reference range, else the
versioned adult table, each naming its source; children are not flagged against adult ranges."""

from __future__ import annotations

import doctest
import hashlib
from importlib import resources
from typing import Any

import pytest

import service.ranges
from service.ranges import Flag, flag_observation, load_table

TABLE = load_table()


def obs(loinc: str, value: float, unit: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "valueQuantity": {"value": value, "unit": unit},
        **extra,
    }


def bp(systolic: float, diastolic: float, panel: str = "85354-9") -> dict[str, Any]:
    def part(code: str, value: float) -> dict[str, Any]:
        return {"code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "valueQuantity": {"value": value, "unit": "mm[Hg]"}}  # fmt: skip

    return {
        "resourceType": "Observation",
        "code": {"coding": [{"system": "http://loinc.org", "code": panel}]},
        "component": [part("8480-6", systolic), part("8462-4", diastolic)],
    }


def adult(resource: dict[str, Any], sex: str = "female") -> Flag | None:
    return flag_observation(resource, TABLE, age_years=45, sex=sex)


def test_ranges_doctests_pass() -> None:
    assert doctest.testmod(service.ranges).failed == 0


def test_the_table_carries_its_id_version_and_the_sha256_of_its_bytes() -> None:
    raw = resources.files("service").joinpath("reference_ranges", "v1.yaml").read_bytes()

    assert TABLE.identity() == {
        "id": "reference_ranges",
        "version": "v1",
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    assert TABLE.min_age_years == 18
    assert all(test["source"] in TABLE.sources for test in TABLE.tests)


def test_an_unknown_table_version_is_refused() -> None:
    with pytest.raises(FileNotFoundError):
        load_table("v999")


@pytest.mark.parametrize(
    ("resource", "direction", "label", "source"),
    [
        (bp(188, 115), "high", "hypertensive crisis range", "ACC/AHA 2017"),
        (bp(145, 83), "high", "stage 2 hypertension range", "ACC/AHA 2017"),
        (bp(132, 70), "high", "stage 1 hypertension range", "ACC/AHA 2017"),
        (bp(118, 84, "55284-4"), "high", "stage 1 hypertension range", "ACC/AHA 2017"),
        (bp(124, 77), "high", "elevated", "ACC/AHA 2017"),
        (bp(112, 70), None, "normal", "ACC/AHA 2017"),
        (obs("8867-4", 112, "/min"), "high", "above resting range", "AHA adult resting heart rate"),
        (obs("8867-4", 72, "/min"), None, "within range", "AHA adult resting heart rate"),
        (obs("39156-5", 30.3, "kg/m2"), "high", "obesity", "WHO BMI"),
        (obs("39156-5", 17.9, "kg/m2"), "low", "underweight", "WHO BMI"),
        (obs("39156-5", 22, "kg/m2"), None, "normal range", "WHO BMI"),
        (obs("4548-4", 5.6, "%"), None, "normal range", "ADA"),
        (obs("4548-4", 5.8, "%"), "high", "prediabetes range", "ADA"),
        (obs("4548-4", 6.5, "%"), "high", "diabetes range", "ADA"),
        (obs("2339-0", 64, "mg/dL"), "low", "hypoglycemia range", "ADA"),
        (obs("2345-7", 130, "mg/dL"), "high", "above fasting range (diabetes range if fasting)", "ADA"),
        (obs("33914-3", 52, "mL/min/{1.73_m2}"), "low", "G3a (mildly to moderately decreased)", "KDIGO"),
        (obs("98979-8", 95, "mL/min/{1.73_m2}"), None, "G1-G2", "KDIGO"),
        (obs("2160-0", 1.6, "mg/dL"), "high", "above range", "Common adult laboratory"),
        (obs("6298-4", 5.4, "mmol/L"), "high", "above range", "Common adult laboratory"),
        (obs("2951-2", 131, "mmol/L"), "low", "below range", "Common adult laboratory"),
        (obs("18262-6", 165, "mg/dL"), "high", "high", "NCEP ATP III"),
        (obs("18262-6", 99, "mg/dL"), None, "optimal or near optimal", "NCEP ATP III"),
        (obs("718-7", 12.5, "g/dL"), None, "within range", "Common adult laboratory"),
    ],
)  # fmt: skip
def test_the_table_flags_adult_values_by_their_category_naming_its_source(
    resource: dict[str, Any], direction: str | None, label: str, source: str
) -> None:
    flag = adult(resource)

    assert flag is not None and flag.source == "table"
    assert (flag.direction, flag.label) == (direction, label)
    assert flag.source_name.startswith(source)


def test_hemoglobin_ranges_follow_the_patients_sex() -> None:
    value = obs("718-7", 13.0, "g/dL")

    assert adult(value, "female") == Flag(None, "within range", "table", TABLE.sources["adult_lab"])
    assert adult(value, "male") == Flag("low", "below range", "table", TABLE.sources["adult_lab"])


@pytest.mark.parametrize(
    "resource",
    [
        obs("2339-0", 7.2, "mmol/L"),  # a unit the range does not name
        obs("2093-0", 500, "mg/dL"),  # a code the table does not hold
        {**obs("2160-0", 9, "mg/dL"), "valueQuantity": {"value": 9, "unit": "mg/dL", "comparator": ">"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "72166-2"}]},
         "valueCodeableConcept": {"text": "Never smoked"}},
    ],
)  # fmt: skip
def test_no_flag_where_no_range_covers_the_value(resource: dict[str, Any]) -> None:
    assert adult(resource) is None


def test_a_child_is_not_flagged_against_adult_ranges() -> None:
    for age in (0, 9, 17):
        assert flag_observation(bp(188, 115), TABLE, age_years=age, sex="male") is None
    assert flag_observation(bp(188, 115), TABLE, age_years=None, sex="male") is None
    assert flag_observation(bp(188, 115), TABLE, age_years=18, sex="male") is not None


@pytest.mark.parametrize(
    ("code", "direction"), [("H", "high"), ("HH", "high"), ("L", "low"), ("A", "abnormal"), ("N", None)]
)
def test_the_observations_interpretation_wins_over_every_range(code: str, direction: str | None) -> None:
    interpretation = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                   "code": code}], "text": f"coded {code}"}]  # fmt: skip
    # 5.6 % is normal by the table, but the laboratory said otherwise.
    resource = obs("4548-4", 5.6, "%", interpretation=interpretation)

    flag = flag_observation(resource, TABLE, age_years=9, sex="female")

    assert flag == Flag(
        direction, f"coded {code}", "interpretation", "interpretation recorded with the result"
    )


@pytest.mark.parametrize(
    ("value", "direction", "label"),
    [(3.1, "low", "below range"), (5.9, "high", "above range"), (4.2, None, "within range")],
)
def test_the_observations_reference_range_wins_over_the_table(
    value: float, direction: str | None, label: str
) -> None:
    rng = [{"low": {"value": 3.5, "unit": "mmol/L"}, "high": {"value": 5.3, "unit": "mmol/L"}}]
    resource = obs("6298-4", value, "mmol/L", referenceRange=rng)

    flag = flag_observation(resource, TABLE, age_years=9, sex="female")

    assert flag == Flag(direction, label, "referenceRange", "the laboratory's range 3.5-5.3 mmol/L")  # type: ignore[arg-type]


def test_a_reference_range_in_another_unit_is_not_used() -> None:
    rng = [{"low": {"value": 63, "unit": "mg/dL"}, "high": {"value": 99, "unit": "mg/dL"}}]
    resource = obs("2339-0", 7.2, "mmol/L", referenceRange=rng)

    assert adult(resource) is None
