"""The `$summarize` FHIR operation: its one parameter table, the parsers of POST and GET requests,
the OperationDefinition and CapabilityStatement (validated as R4B resources), and the routes."""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from service.api.operation import (
    PARAMETERS,
    SummarizeRequest,
    capability_statement,
    definition_url,
    operation_definition,
    parse_parameters,
    parse_query,
)
from service.errors import BadRequest

BASE = "https://cb.example"


def parameters(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(entries)}


# -- the table and what is built from it ----------------------------------------------------------------


def test_the_table_lists_the_three_inputs_and_the_bundle_output() -> None:
    rows = {(p.name, p.use, p.fhir_type, p.min, p.max) for p in PARAMETERS}
    assert rows == {
        ("encounter", "in", "Reference", 0, "1"),
        ("dryRun", "in", "boolean", 0, "1"),
        ("promptVersion", "in", "string", 0, "1"),
        ("return", "out", "Bundle", 1, "1"),
    }
    assert all(p.documentation for p in PARAMETERS)
    assert {p.name for p in PARAMETERS if p.get_allowed} == {"encounter", "dryRun", "promptVersion"}


def test_the_operation_definition_is_a_valid_r4b_resource_built_from_the_table() -> None:
    body = operation_definition(BASE)
    model = get_fhir_model_class("OperationDefinition").model_validate(body)
    assert model.url == f"{BASE}/fhir/OperationDefinition/chartbrief-summarize"
    assert (model.code, model.resource, model.system, model.type, model.instance) == (
        "summarize",
        ["Patient"],
        False,
        False,
        True,
    )
    assert model.affectsState is True
    assert [(p.name, p.use, p.type, p.min, p.max) for p in model.parameter] == [
        (p.name, p.use, p.fhir_type, p.min, p.max) for p in PARAMETERS
    ]


def test_the_capability_statement_is_valid_and_points_at_the_definition() -> None:
    body = capability_statement(BASE + "/", date="2026-01-01", version="0.1.0")
    model = get_fhir_model_class("CapabilityStatement").model_validate(body)
    assert (model.kind, model.fhirVersion, model.format) == ("instance", "4.0.1", ["json"])
    rest = model.rest[0]
    assert rest.mode == "server"
    patient = rest.resource[0]
    assert patient.type == "Patient"
    assert [(o.name, o.definition) for o in patient.operation] == [("summarize", definition_url(BASE))]


# -- POST: a Parameters body ------------------------------------------------------------------------


def test_a_parameters_body_gives_the_request() -> None:
    body = parameters(
        {"name": "encounter", "valueReference": {"reference": "Encounter/e-1"}},
        {"name": "dryRun", "valueBoolean": True},
        {"name": "promptVersion", "valueString": "summary/v1"},
    )
    assert parse_parameters(body) == SummarizeRequest(
        encounter="e-1", dry_run=True, prompt_version="summary/v1"
    )
    assert parse_parameters(parameters()) == SummarizeRequest()
    assert parse_parameters({"resourceType": "Parameters"}) == SummarizeRequest()
    assert (
        parse_parameters(parameters({"name": "encounter", "valueString": "Encounter/e2"})).encounter == "e2"
    )


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (parameters({"name": "colour", "valueString": "red"}), "'colour'"),
        (parameters({"name": "dryRun", "valueString": "true"}), "'dryRun' must be valueBoolean"),
        (parameters({"name": "promptVersion", "valueBoolean": True}), "'promptVersion'"),
        (parameters({"name": "encounter", "valueReference": {"reference": "Patient/p1"}}), "'encounter'"),
        (parameters({"name": "encounter", "valueString": "Encounter/bad id!"}), "'encounter'"),
        (parameters({"name": "promptVersion", "valueString": "../etc"}), "'promptVersion'"),
        (
            parameters({"name": "dryRun", "valueBoolean": True}, {"name": "dryRun", "valueBoolean": False}),
            "more than once",
        ),
        (parameters({"name": "dryRun"}), "exactly one value"),
        ({"resourceType": "Patient"}, "Parameters"),
        ([1, 2], "Parameters"),
        (parameters({"name": "dryRun", "valueBoolean": "maybe"}), "not valid"),
    ],
)
def test_a_bad_parameters_body_is_refused_naming_the_problem(body: Any, names: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_parameters(body)
    assert caught.value.status == 400
    assert names in caught.value.message


# -- GET: query parameters ---------------------------------------------------------------------------


def test_get_query_parameters_are_always_a_dry_run() -> None:
    assert parse_query([]) == SummarizeRequest(dry_run=True)
    assert parse_query([("_dryRun", "true"), ("encounter", "Encounter/e-1")]) == SummarizeRequest(
        encounter="e-1", dry_run=True
    )
    assert parse_query([("dryRun", "true"), ("promptVersion", "summary/v1"), ("encounter", "e9")]) == (
        SummarizeRequest(encounter="e9", dry_run=True, prompt_version="summary/v1")
    )


@pytest.mark.parametrize(
    ("items", "names"),
    [
        ([("_dryRun", "false")], "cannot be false on GET"),
        ([("dryRun", "false")], "cannot be false on GET"),
        ([("_dryRun", "yes")], "true or false"),
        ([("_count", "3")], "'_count'"),
        ([("dryRun", "true"), ("_dryRun", "true")], "more than once"),
        ([("encounter", "Observation/1")], "'encounter'"),
    ],
)
def test_bad_get_parameters_are_refused_naming_them(items: list[tuple[str, str]], names: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_query(items)
    assert names in caught.value.message
