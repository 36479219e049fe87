"""User-level tokens at the REST API: refused for patient data by default; with
`api.user_tokens = "check-at-ehr"` allowed only when the EHR, asked with the caller's own token,
lets that user read the patient. Patient-context tokens, system-level accounts and API keys keep
working, and another patient's job looks exactly like an unknown one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from service.db import apikeys
from tests.api.conftest import APP_BASE, app_settings, running_app
from tests.api.test_api import audits, bearer, outcome
from tests.smart_ehr.server import TestEhr

EHR_FHIR = "https://ehr.example/fhir/r4"
SERVICE_TOKEN = "chartbrief-own-service-token"
USER_READ = "user/DocumentReference.rs"
USER_WRITE = "user/DocumentReference.c"


def settings_for(tmp_path: Path, ehr: TestEhr, *, user_tokens: str | None = None) -> Any:
    api: dict[str, Any] = {"jwt_issuer": ehr.base_url, "jwks_url": ehr.jwks_url}
    if user_tokens is not None:
        api["user_tokens"] = user_tokens
    fhir = {"base_url": EHR_FHIR, "bearer_token": SERVICE_TOKEN, "max_attempts": 1}
    return app_settings(tmp_path, ehr, api=api, fhir=fhir)


@pytest.fixture
def mocked_ehr() -> Iterator[respx.MockRouter]:
    """The EHR's FHIR server, mocked; everything else (the test EHR's JWKS on loopback) passes through."""
    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="ehr.example", path__regex=r"^/fhir/r4/(?!Patient/p1$)").mock(
            return_value=httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})
        )
        mock.route(host="127.0.0.1").pass_through()
        yield mock


def user_token(ehr: TestEhr, subject: str = "dr-who", scope: str = f"{USER_READ} {USER_WRITE}") -> str:
    return ehr.issue_token(scope=scope, audience=APP_BASE, subject=subject)


# -- refused by default ----------------------------------------------------------------------------


async def test_a_user_level_token_is_refused_for_patient_data_by_default(
    ehr: TestEhr, tmp_path: Path, mocked_ehr: respx.MockRouter
) -> None:
    patient_route = mocked_ehr.get(f"{EHR_FHIR}/Patient/p1").mock(return_value=httpx.Response(200, json={}))
    token = user_token(ehr)
    mixed = ehr.issue_token(
        scope=f"{USER_READ} patient/DocumentReference.rs", audience=APP_BASE, subject="mix"
    )
    async with running_app(settings_for(tmp_path, ehr)) as (client, app):
        read = await client.get("/api/patients/p1/summaries/latest", headers=bearer(token))
        create = await client.post("/api/summaries", json={"patient": "p1"}, headers=bearer(token))
        mixed_read = await client.get("/api/patients/p1/summaries/latest", headers=bearer(mixed))
    for response in (read, create, mixed_read):
        assert response.status_code == 403
        issue = outcome(response)
        assert issue["code"] == "forbidden"
        assert "user-level" in issue["diagnostics"]
        assert "CHARTBRIEF_API__USER_TOKENS" in issue["diagnostics"]
    assert patient_route.call_count == 0  # refused without asking anyone
    assert [(r.actor, r.action, r.outcome, r.patient_id) for r in audits(app)] == [
        ("dr-who", "api.read", "denied", "p1"),
        ("dr-who", "api.create", "denied", "p1"),
        ("mix", "api.read", "denied", "p1"),
    ]


# -- checked at the EHR ------------------------------------------------------------------------------


async def test_with_the_check_on_the_ehr_allowing_the_user_allows_the_call_with_the_users_own_token(
    ehr: TestEhr, tmp_path: Path, mocked_ehr: respx.MockRouter
) -> None:
    patient_route = mocked_ehr.get(f"{EHR_FHIR}/Patient/p1").mock(
        return_value=httpx.Response(200, json={"resourceType": "Patient", "id": "p1"})
    )
    token = user_token(ehr)
    async with running_app(settings_for(tmp_path, ehr, user_tokens="check-at-ehr")) as (client, app):
        read = await client.get("/api/patients/p1/summaries/latest", headers=bearer(token))
        create = await client.post("/api/summaries", json={"patient": "p1"}, headers=bearer(token))
    assert read.status_code == 404  # allowed; nothing recorded yet
    assert outcome(read)["code"] == "not-found"
    assert create.status_code == 202
    # The two checks come first (the job started by the create may read the Patient afterwards,
    # with chartbrief's own token); one per request, nothing cached.
    requests = [c.request for c in patient_route.calls]
    assert [r.headers["authorization"] for r in requests[:2]] == [f"Bearer {token}"] * 2
    assert all(str(r.url) == f"{EHR_FHIR}/Patient/p1" for r in requests[:2])
    assert sum(r.headers["authorization"] == f"Bearer {token}" for r in requests) == 2
    assert [(r.actor, r.action, r.outcome) for r in audits(app)] == [
        ("dr-who", "api.read", "ok"),
        ("dr-who", "api.create", "ok"),
    ]


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_with_the_check_on_an_ehr_that_refuses_the_user_refuses_the_call_and_audits_it(
    ehr: TestEhr, tmp_path: Path, mocked_ehr: respx.MockRouter, status: int
) -> None:
    mocked_ehr.get(f"{EHR_FHIR}/Patient/p1").mock(return_value=httpx.Response(status))
    token = user_token(ehr)
    async with running_app(settings_for(tmp_path, ehr, user_tokens="check-at-ehr")) as (client, app):
        read = await client.get("/api/patients/p1/summaries/latest", headers=bearer(token))
        create = await client.post("/api/summaries", json={"patient": "p1"}, headers=bearer(token))
    for response in (read, create):
        assert response.status_code == 403
        assert outcome(response)["code"] == "forbidden"
        assert "EHR" in outcome(response)["diagnostics"]
        assert token not in response.text
    rows = audits(app)
    assert [(r.actor, r.action, r.outcome, r.patient_id) for r in rows] == [
        ("dr-who", "api.read", "denied", "p1"),
        ("dr-who", "api.create", "denied", "p1"),
    ]
    assert all(f"HTTP {status}" in (r.detail or "") for r in rows)


async def test_one_users_allowed_check_never_serves_another_user(
    ehr: TestEhr, tmp_path: Path, mocked_ehr: respx.MockRouter
) -> None:
    allowed, refused = user_token(ehr, subject="dr-a"), user_token(ehr, subject="dr-b")

    def answer(request: httpx.Request) -> httpx.Response:
        ok = request.headers.get("authorization") == f"Bearer {allowed}"
        return (
            httpx.Response(200, json={"resourceType": "Patient", "id": "p1"}) if ok else httpx.Response(403)
        )

    route = mocked_ehr.get(f"{EHR_FHIR}/Patient/p1").mock(side_effect=answer)
    async with running_app(settings_for(tmp_path, ehr, user_tokens="check-at-ehr")) as (client, _app):
        first = await client.get("/api/patients/p1/summaries/latest", headers=bearer(allowed))
        other = await client.get("/api/patients/p1/summaries/latest", headers=bearer(refused))
        again = await client.get("/api/patients/p1/summaries/latest", headers=bearer(allowed))
    assert (first.status_code, other.status_code, again.status_code) == (404, 403, 404)
    assert route.call_count == 3


async def test_an_ehr_that_cannot_answer_the_check_is_a_refusal_not_an_acceptance(
    ehr: TestEhr, tmp_path: Path, mocked_ehr: respx.MockRouter
) -> None:
    mocked_ehr.get(f"{EHR_FHIR}/Patient/p1").mock(return_value=httpx.Response(503))
    async with running_app(settings_for(tmp_path, ehr, user_tokens="check-at-ehr")) as (client, app):
        read = await client.get("/api/patients/p1/summaries/latest", headers=bearer(user_token(ehr)))
    assert read.status_code == 502
    assert outcome(read)["code"] != "not-found"
    assert [(r.action, r.outcome) for r in audits(app)] == [("api.read", "denied")]


# -- what keeps working --------------------------------------------------------------------------------


async def test_patient_context_and_system_tokens_and_api_keys_need_no_ehr_check(
    ehr: TestEhr, tmp_path: Path, mocked_ehr: respx.MockRouter
) -> None:
    patient_route = mocked_ehr.get(f"{EHR_FHIR}/Patient/p1").mock(return_value=httpx.Response(403))
    in_context = ehr.issue_token(patient="p1", scope=USER_READ, audience=APP_BASE, subject="launched")
    patient_level = ehr.issue_token(patient="p1", scope="patient/DocumentReference.rs", audience=APP_BASE)
    system = ehr.issue_token(scope="system/DocumentReference.rs", audience=APP_BASE, subject="svc")
    for mode in ("refuse", "check-at-ehr"):
        (tmp_path / mode).mkdir()
        async with running_app(settings_for(tmp_path / mode, ehr, user_tokens=mode)) as (client, app):
            _key_id, secret = apikeys.create(app.state.runtime.db, "nightly", ["summaries.read"])
            for token in (in_context, patient_level, system, secret):
                response = await client.get("/api/patients/p1/summaries/latest", headers=bearer(token))
                assert response.status_code == 404, (mode, response.text)  # allowed; nothing recorded
            elsewhere = await client.get("/api/patients/p2/summaries/latest", headers=bearer(in_context))
            assert elsewhere.status_code == 403
            assert "another patient" in outcome(elsewhere)["diagnostics"]
    assert patient_route.call_count == 0


# -- job ids ---------------------------------------------------------------------------------------


async def test_another_patients_job_answers_exactly_like_an_unknown_job(
    ehr: TestEhr, tmp_path: Path, mocked_ehr: respx.MockRouter
) -> None:
    system = ehr.issue_token(scope="system/DocumentReference.cr", audience=APP_BASE)
    patient_b = ehr.issue_token(patient="patient-b", scope="patient/DocumentReference.rs", audience=APP_BASE)
    async with running_app(settings_for(tmp_path, ehr)) as (client, app):
        started = await client.post("/api/summaries", json={"patient": "patient-a"}, headers=bearer(system))
        assert started.status_code == 202
        job_id = started.json()["id"]
        unknown_id = "0" * len(job_id)
        assert app.state.runtime.jobs.get(unknown_id) is None
        foreign = await client.get(f"/api/summaries/{job_id}", headers=bearer(patient_b))
        unknown = await client.get(f"/api/summaries/{unknown_id}", headers=bearer(patient_b))
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.headers["content-type"] == unknown.headers["content-type"]
    assert foreign.text.replace(job_id, "<id>") == unknown.text.replace(unknown_id, "<id>")
    denied = [r for r in audits(app) if r.outcome == "denied"]
    assert [(r.action, r.patient_id) for r in denied] == [("api.read", "patient-a")]
