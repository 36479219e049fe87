"""The `$summarize` FHIR operation: its one parameter table, the parsers of POST and GET requests,
the OperationDefinition and CapabilityStatement (validated as R4B resources), and the routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
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
from service.config import Settings
from service.errors import BadRequest
from tests.api.conftest import APP_BASE, NO_FHIR, app_settings, running_app
from tests.api.test_api import bearer
from tests.smart_ehr.server import TestEhr

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


# -- the routes, before any FHIR server is reached ----------------------------------------------------

READ = "patient/DocumentReference.rs"
WRITE = "patient/DocumentReference.c"
SUMMARIZE = "/fhir/Patient/{}/$summarize"


def operation_settings(tmp_path: Path, ehr: TestEhr, fhir: str = NO_FHIR) -> Settings:
    api = {"jwt_issuer": ehr.base_url, "jwks_url": ehr.jwks_url}
    return app_settings(tmp_path, ehr, api=api, fhir={"base_url": fhir})


def outcome(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    get_fhir_model_class("OperationOutcome").model_validate(body)
    issue: dict[str, Any] = body["issue"][0]
    return issue


async def test_metadata_and_the_definition_are_served_as_fhir_json(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(operation_settings(tmp_path, ehr)) as (client, _app):
        metadata = await client.get("/fhir/metadata")
        definition = await client.get("/fhir/OperationDefinition/chartbrief-summarize")
    for response in (metadata, definition):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/fhir+json")
    statement = get_fhir_model_class("CapabilityStatement").model_validate(metadata.json())
    operation = statement.rest[0].resource[0].operation[0]
    assert operation.definition == definition.json()["url"] == definition_url(APP_BASE)
    get_fhir_model_class("OperationDefinition").model_validate(definition.json())


async def test_an_unauthenticated_call_is_401_with_an_operation_outcome(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(operation_settings(tmp_path, ehr)) as (client, _app):
        post = await client.post(SUMMARIZE.format("p1"), json=parameters())
        get = await client.get(SUMMARIZE.format("p1"))
    for response in (post, get):
        assert outcome(response, 401)["code"] == "login"
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_token_for_another_patient_is_403(ehr: TestEhr, tmp_path: Path) -> None:
    token = ehr.issue_token(patient="patient-a", scope=f"{READ} {WRITE}", audience=APP_BASE)
    async with running_app(operation_settings(tmp_path, ehr)) as (client, _app):
        post = await client.post(SUMMARIZE.format("patient-b"), json=parameters(), headers=bearer(token))
        get = await client.get(SUMMARIZE.format("patient-b"), headers=bearer(token))
    for response in (post, get):
        issue = outcome(response, 403)
        assert issue["code"] == "forbidden" and "another patient" in issue["diagnostics"]


async def test_bad_parameters_are_400_naming_them(ehr: TestEhr, tmp_path: Path) -> None:
    token = ehr.issue_token(patient="p1", scope=f"{READ} {WRITE}", audience=APP_BASE)
    path = SUMMARIZE.format("p1")
    async with running_app(operation_settings(tmp_path, ehr)) as (client, _app):
        unknown = await client.post(
            path, json=parameters({"name": "colour", "valueString": "red"}), headers=bearer(token)
        )
        unknown_get = await client.get(path, params={"colour": "red"}, headers=bearer(token))
        writing_get = await client.get(path, params={"_dryRun": "false"}, headers=bearer(token))
        not_json = await client.post(path, content=b"{", headers=bearer(token))
        no_prompt = await client.post(
            path,
            json=parameters({"name": "promptVersion", "valueString": "summary/v99"}),
            headers=bearer(token),
        )
        bad_id = await client.get(SUMMARIZE.format("p!1"), headers=bearer(token))
    assert "'colour'" in outcome(unknown, 400)["diagnostics"]
    assert "'colour'" in outcome(unknown_get, 400)["diagnostics"]
    assert "cannot be false on GET" in outcome(writing_get, 400)["diagnostics"]
    assert "not JSON" in outcome(not_json, 400)["diagnostics"]
    assert "'promptVersion'" in outcome(no_prompt, 400)["diagnostics"]
    assert "summary/v99" in outcome(no_prompt, 400)["diagnostics"]
    assert "patient id" in outcome(bad_id, 400)["diagnostics"]


async def test_a_full_work_bound_is_429_with_retry_after_and_frees_nothing_it_did_not_take(
    ehr: TestEhr, tmp_path: Path
) -> None:
    token = ehr.issue_token(patient="p1", scope=f"{READ} {WRITE}", audience=APP_BASE, subject="svc-busy")
    settings = operation_settings(tmp_path, ehr)
    settings = settings.model_copy(
        update={"api": settings.api.model_copy(update={"max_queued_work_per_client": 1})}
    )
    async with running_app(settings) as (client, app):
        admission = app.state.runtime.admission
        held = admission.admit("svc-busy", "job")  # this client's one place, taken by other work
        refused = await client.get(SUMMARIZE.format("p1"), headers=bearer(token))
        assert admission.in_flight_for("svc-busy") == 1
        held.release()
    issue = outcome(refused, 429)
    assert issue["code"] == "throttled"
    assert int(refused.headers["retry-after"]) >= 1


async def test_an_unreachable_fhir_server_is_an_outcome_and_gives_the_place_back(
    ehr: TestEhr, tmp_path: Path
) -> None:
    token = ehr.issue_token(patient="p1", scope=f"{READ} {WRITE}", audience=APP_BASE, subject="svc-down")
    async with running_app(operation_settings(tmp_path, ehr)) as (client, app):
        response = await client.get(SUMMARIZE.format("p1"), headers=bearer(token))
        assert app.state.runtime.admission.in_flight_for("svc-down") == 0
    assert response.status_code >= 500
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json()["resourceType"] == "OperationOutcome"
