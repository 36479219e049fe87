"""`Patient/{id}/$summarize` against the real local FHIR server: a dry run (POST and GET) returns the
three resources and writes nothing; a real POST writes them once, and a retry returns the same ones."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B import get_fhir_model_class

from service.dev.sandbox import LoadedPatient
from tests.api.conftest import APP_BASE, ehr, running_app, scripted_engine
from tests.api.test_api import bearer
from tests.api.test_fhir_operation import READ, SUMMARIZE, WRITE, operation_settings, outcome, parameters

__all__ = ["ehr"]  # the module-scoped test EHR (it signs the bearer JWTs)

pytestmark = pytest.mark.integration

SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"
NO_CLAIMS = '{"claims": []}'


def resources_of(response: httpx.Response) -> dict[str, dict[str, Any]]:
    """The answer's resources by type, after checking it is a valid R4B collection Bundle."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    get_fhir_model_class("Bundle").model_validate(body)
    assert body["type"] == "collection"
    resources = {e["resource"]["resourceType"]: e["resource"] for e in body["entry"]}
    assert list(resources) == ["DocumentReference", "Device", "Provenance"]
    return resources


async def documents_with(fhir_base: str, key: str) -> int:
    """How many DocumentReferences on the server carry this summary key."""
    async with httpx.AsyncClient() as http:
        found = await http.get(
            f"{fhir_base}/DocumentReference",
            params={"identifier": f"urn:chartbrief:summary|{key}", "_summary": "count"},
        )
    assert found.status_code == 200, found.text
    total: int = found.json()["total"]
    return total


def summary_key(doc: dict[str, Any]) -> str:
    value: str = next(i["value"] for i in doc["identifier"] if i["system"] == "urn:chartbrief:summary")
    return value


async def test_a_dry_run_returns_the_three_resources_and_writes_nothing(
    ehr: Any, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    engine = scripted_engine("fhir-op-dry", NO_CLAIMS, NO_CLAIMS)
    token = ehr.issue_token(patient=patient, scope=f"{READ} {WRITE}", audience=APP_BASE)
    dry = parameters({"name": "dryRun", "valueBoolean": True})
    async with running_app(operation_settings(tmp_path, ehr, fhir_base), engine=engine) as (client, _app):
        post = await client.post(SUMMARIZE.format(patient), json=dry, headers=bearer(token))
        get = await client.get(SUMMARIZE.format(patient), headers=bearer(token))
    for response in (post, get):
        resources = resources_of(response)
        doc, device, provenance = (resources[t] for t in ("DocumentReference", "Device", "Provenance"))
        assert doc["subject"] == {"reference": f"Patient/{patient}"}
        assert doc["docStatus"] == "preliminary"
        assert "id" not in doc and "versionId" not in doc.get("meta", {})  # never sent to the server
        assert device["identifier"][0]["value"] == engine.identity.sha256
        assert provenance["target"][0]["reference"].startswith("urn:uuid:")
        assert await documents_with(fhir_base, summary_key(doc)) == 0
    assert summary_key(resources_of(post)["DocumentReference"]) == summary_key(
        resources_of(get)["DocumentReference"]
    )


async def test_a_real_post_writes_once_and_a_retry_returns_the_same_resources(
    ehr: Any, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    engine = scripted_engine("fhir-op-write", NO_CLAIMS)  # one generation: the retry generates nothing
    token = ehr.issue_token(patient=patient, scope=f"{READ} {WRITE}", audience=APP_BASE)
    async with running_app(operation_settings(tmp_path, ehr, fhir_base), engine=engine) as (client, _app):
        first = await client.post(SUMMARIZE.format(patient), json=parameters(), headers=bearer(token))
        again = await client.post(SUMMARIZE.format(patient), json=parameters(), headers=bearer(token))
    written, retried = resources_of(first), resources_of(again)
    doc = written["DocumentReference"]
    assert doc["id"] and doc["meta"]["versionId"]
    assert retried["DocumentReference"]["id"] == doc["id"]
    assert retried["Provenance"]["id"] == written["Provenance"]["id"]
    assert written["Provenance"]["target"][0]["reference"].startswith(f"DocumentReference/{doc['id']}")
    assert await documents_with(fhir_base, summary_key(doc)) == 1
    async with httpx.AsyncClient() as http:
        stored = (await http.get(f"{fhir_base}/DocumentReference/{doc['id']}")).json()
    assert stored["subject"] == {"reference": f"Patient/{patient}"}
    assert len(engine.history) == 1


async def test_an_unknown_patient_is_404(ehr: Any, tmp_path: Path, fhir_base: str) -> None:
    token = ehr.issue_token(scope="system/DocumentReference.c", audience=APP_BASE)
    async with running_app(operation_settings(tmp_path, ehr, fhir_base)) as (client, _app):
        response = await client.get(SUMMARIZE.format("no-such-patient-404"), headers=bearer(token))
    issue = outcome(response, 404)
    assert issue["code"] == "not-found" and "Patient/no-such-patient-404" in issue["diagnostics"]


async def poll(client: httpx.AsyncClient, url: str, token: str) -> httpx.Response:
    """GET the status URL until it is no longer 202 (each 202 must say how far the job is)."""
    path = url.removeprefix(APP_BASE)
    for _ in range(200):
        response = await client.get(path, headers=bearer(token))
        if response.status_code != 202:
            return response
        assert response.headers["X-Progress"] in ("queued", "running")
        assert int(response.headers["Retry-After"]) > 0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} still 202 after 200 polls")


async def test_respond_async_answers_202_then_the_status_url_gives_the_bundle_written_once(
    ehr: Any, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    engine = scripted_engine("fhir-op-async", NO_CLAIMS)
    token = ehr.issue_token(patient=patient, scope=f"{READ} {WRITE}", audience=APP_BASE)
    other = ehr.issue_token(patient="someone-else", scope=f"{READ} {WRITE}", audience=APP_BASE)
    prefer = {**bearer(token), "Prefer": "respond-async"}
    async with running_app(operation_settings(tmp_path, ehr, fhir_base), engine=engine) as (client, _app):
        accepted = await client.post(SUMMARIZE.format(patient), json=parameters(), headers=prefer)
        assert accepted.status_code == 202, accepted.text
        url = accepted.headers["Content-Location"]
        assert url.startswith(f"{APP_BASE}/fhir/$summarize-status/")
        done = await poll(client, url, token)
        # Another patient's caller learns nothing of the job, as for an unknown id.
        foreign = await client.get(url.removeprefix(APP_BASE), headers=bearer(other))
        # The same request without Prefer: the same summary, found by its key, written once.
        sync = await client.post(SUMMARIZE.format(patient), json=parameters(), headers=bearer(token))
    assert accepted.json()["resourceType"] == "OperationOutcome"
    assert done.status_code == 200, done.text
    body = done.json()
    get_fhir_model_class("Bundle").model_validate(body)
    assert body["type"] == "batch-response"
    (entry,) = body["entry"]
    assert entry["response"]["status"] == "200 OK"
    inner = {e["resource"]["resourceType"]: e["resource"] for e in entry["resource"]["entry"]}
    assert list(inner) == ["DocumentReference", "Device", "Provenance"]
    doc = inner["DocumentReference"]
    assert resources_of(sync)["DocumentReference"]["id"] == doc["id"]
    assert await documents_with(fhir_base, summary_key(doc)) == 1
    assert foreign.status_code == 404
    assert len(engine.history) == 1


async def test_an_async_request_for_an_unknown_encounter_ends_with_the_404_it_would_have_had(
    ehr: Any, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    token = ehr.issue_token(patient=patient, scope=f"{READ} {WRITE}", audience=APP_BASE)
    body = parameters({"name": "encounter", "valueReference": {"reference": "Encounter/no-such-visit"}})
    prefer = {**bearer(token), "Prefer": "respond-async"}
    engine = scripted_engine("fhir-op-async-404")
    async with running_app(operation_settings(tmp_path, ehr, fhir_base), engine=engine) as (client, _app):
        accepted = await client.post(SUMMARIZE.format(patient), json=body, headers=prefer)
        done = await poll(client, accepted.headers["Content-Location"], token)
        unknown = await client.get("/fhir/$summarize-status/no-such-job", headers=bearer(token))
    assert done.status_code == 200, done.text
    (entry,) = done.json()["entry"]
    assert entry["response"]["status"] == "404 Not Found"
    issue = entry["response"]["outcome"]["issue"][0]
    assert issue["code"] == "not-found" and "Encounter/no-such-visit" in issue["diagnostics"]
    assert "resource" not in entry
    assert unknown.status_code == 404 and unknown.json()["resourceType"] == "OperationOutcome"
