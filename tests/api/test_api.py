"""The REST API: bearer JWTs from the EHR's authorization server (tests/smart_ehr) and hashed API keys,
patient context enforced and audited, errors as OperationOutcome; then real summaries against the
real local FHIR server with a scripted engine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.db import apikeys
from service.db.models import AuditEvent
from service.dev.sandbox import LoadedPatient
from service.llm.fake import FakeEngine
from tests.api.conftest import APP_BASE, app_settings, running_app
from tests.smart_ehr.server import TestEhr

ALLERGIES = "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json"
SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"
READ = "patient/DocumentReference.rs"
WRITE = "patient/DocumentReference.c"


def api_settings(tmp_path: Path, ehr: TestEhr, fhir: str | None = None) -> Any:
    sections: dict[str, Any] = {"api": {"jwt_issuer": ehr.base_url, "jwks_url": ehr.jwks_url}}
    if fhir is not None:
        sections["fhir"] = {"base_url": fhir}
    return app_settings(tmp_path, ehr, **sections)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def outcome(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert body["resourceType"] == "OperationOutcome"
    issue: dict[str, Any] = body["issue"][0]
    return issue


def audits(app: Any) -> list[AuditEvent]:
    with app.state.runtime.db() as s:
        return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all())


# -- who may call ----------------------------------------------------------------------------------


async def test_a_call_without_a_token_is_401_with_a_bearer_challenge(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(api_settings(tmp_path, ehr)) as (client, _app):
        for response in (
            await client.get("/api/patients/p1/summaries/latest"),
            await client.get("/api/patients/p1/summaries/latest", headers={"Authorization": "Basic abc"}),
            await client.post("/api/summaries", json={"patient": "p1"}),
        ):
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith('Bearer realm="chartbrief"')
            assert outcome(response)["code"] == "login"


@pytest.mark.parametrize(
    ("token_kw", "message"),
    [
        ({"expires_in": -120}, "expired"),
        ({"audience": "https://another-app.example.org"}, "aud"),
        ({"audience": None}, "aud"),  # the EHR's default audience is its FHIR base, not chartbrief
    ],
)
async def test_an_expired_or_wrongly_addressed_token_is_401(
    ehr: TestEhr, tmp_path: Path, token_kw: dict[str, Any], message: str
) -> None:
    kw = {"patient": "p1", "scope": READ, "audience": APP_BASE, **token_kw}
    async with running_app(api_settings(tmp_path, ehr)) as (client, app):
        response = await client.get(
            "/api/patients/p1/summaries/latest", headers=bearer(ehr.issue_token(**kw))
        )
    assert response.status_code == 401
    assert message in outcome(response)["diagnostics"]
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert audits(app) == []  # nobody identified, nothing about a patient happened


async def test_a_token_from_another_issuer_is_401(ehr: TestEhr, tmp_path: Path) -> None:
    with TestEhr("http://127.0.0.1:9/fhir") as stranger:
        token = stranger.issue_token(patient="p1", scope=READ, audience=APP_BASE)
    async with running_app(api_settings(tmp_path, ehr)) as (client, _app):
        response = await client.get("/api/patients/p1/summaries/latest", headers=bearer(token))
    assert response.status_code == 401


async def test_a_token_for_patient_a_asking_for_patient_b_is_403_and_audited(
    ehr: TestEhr, tmp_path: Path
) -> None:
    token = ehr.issue_token(patient="patient-a", scope=f"{READ} {WRITE}", audience=APP_BASE, subject="svc-7")
    async with running_app(api_settings(tmp_path, ehr)) as (client, app):
        read = await client.get("/api/patients/patient-b/summaries/latest", headers=bearer(token))
        create = await client.post("/api/summaries", json={"patient": "patient-b"}, headers=bearer(token))
    for response in (read, create):
        assert response.status_code == 403
        assert outcome(response)["code"] == "forbidden"
        assert "another patient" in outcome(response)["diagnostics"]
    rows = audits(app)
    assert [(r.actor, r.action, r.outcome, r.patient_id) for r in rows] == [
        ("svc-7", "api.read", "denied", "patient-b"),
        ("svc-7", "api.create", "denied", "patient-b"),
    ]


async def test_scopes_that_do_not_cover_the_action_are_403(ehr: TestEhr, tmp_path: Path) -> None:
    reader = ehr.issue_token(patient="p1", scope=READ, audience=APP_BASE)
    unrelated = ehr.issue_token(patient="p1", scope="patient/Observation.rs", audience=APP_BASE)
    no_patient = ehr.issue_token(scope=f"{READ} {WRITE}", audience=APP_BASE)
    async with running_app(api_settings(tmp_path, ehr)) as (client, _app):
        create = await client.post("/api/summaries", json={"patient": "p1"}, headers=bearer(reader))
        read = await client.get("/api/patients/p1/summaries/latest", headers=bearer(unrelated))
        anonymous = await client.get("/api/patients/p1/summaries/latest", headers=bearer(no_patient))
    assert create.status_code == 403 and "DocumentReference.c" in outcome(create)["diagnostics"]
    assert read.status_code == 403 and "DocumentReference.r" in outcome(read)["diagnostics"]
    assert anonymous.status_code == 403 and "names no patient" in outcome(anonymous)["diagnostics"]


async def test_a_system_level_token_may_ask_for_any_patient(ehr: TestEhr, tmp_path: Path) -> None:
    token = ehr.issue_token(scope="system/DocumentReference.rs", audience=APP_BASE)
    async with running_app(api_settings(tmp_path, ehr, fhir="http://127.0.0.1:9/fhir")) as (client, app):
        response = await client.get("/api/patients/p1/summaries/latest", headers=bearer(token))
    assert response.status_code == 404  # allowed, and nothing recorded yet
    assert outcome(response)["code"] == "not-found"
    assert audits(app)[-1].outcome == "ok"


async def test_api_keys_are_checked_by_hash_limited_by_patient_and_dead_once_revoked(
    ehr: TestEhr, tmp_path: Path
) -> None:
    async with running_app(api_settings(tmp_path, ehr, fhir="http://127.0.0.1:9/fhir")) as (client, app):
        db = app.state.runtime.db
        key_id, secret = apikeys.create(db, "nightly", ["summaries.read"], patient_id="p1")
        ok = await client.get("/api/patients/p1/summaries/latest", headers=bearer(secret))
        other = await client.get("/api/patients/p2/summaries/latest", headers=bearer(secret))
        cannot_create = await client.post("/api/summaries", json={"patient": "p1"}, headers=bearer(secret))
        forged = await client.get("/api/patients/p1/summaries/latest", headers=bearer(secret[:-2] + "xx"))
        apikeys.revoke(db, key_id)
        revoked = await client.get("/api/patients/p1/summaries/latest", headers=bearer(secret))
    assert ok.status_code == 404  # authorized; no summary yet
    assert other.status_code == 403
    assert cannot_create.status_code == 403
    assert forged.status_code == 401 and revoked.status_code == 401
    assert "unknown or revoked" in outcome(revoked)["diagnostics"]
    assert {(r.actor, r.patient_id, r.outcome) for r in audits(app)} >= {
        (f"apikey:{key_id}", "p2", "denied"),
        (f"apikey:{key_id}", "p1", "ok"),
    }


async def test_a_bad_request_body_names_the_field(ehr: TestEhr, tmp_path: Path) -> None:
    token = ehr.issue_token(scope=f"system/DocumentReference.c {READ}", audience=APP_BASE)
    async with running_app(api_settings(tmp_path, ehr)) as (client, _app):
        response = await client.post(
            "/api/summaries", json={"patient": "../Patient/x"}, headers=bearer(token)
        )
    assert response.status_code == 400
    assert outcome(response)["code"] == "invalid"
    assert "patient" in outcome(response)["diagnostics"]


async def test_an_unknown_job_is_404(ehr: TestEhr, tmp_path: Path) -> None:
    token = ehr.issue_token(scope="system/DocumentReference.rs", audience=APP_BASE)
    async with running_app(api_settings(tmp_path, ehr)) as (client, _app):
        response = await client.get("/api/summaries/no-such-job", headers=bearer(token))
    assert response.status_code == 404


# -- real summaries ------------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_summary_job_runs_in_the_background_and_the_latest_summary_is_readable(
    ehr: TestEhr,
    tmp_path: Path,
    fhir_base: str,
    loaded_patients: dict[str, LoadedPatient],
) -> None:
    patient = loaded_patients[SMALL].id
    engine = FakeEngine()
    engine.enqueue('{"claims": []}')
    token = ehr.issue_token(patient=patient, scope=f"{READ} {WRITE}", audience=APP_BASE, subject="portal")
    async with running_app(api_settings(tmp_path, ehr, fhir=fhir_base), engine=engine) as (client, app):
        started = await client.post("/api/summaries", json={"patient": patient}, headers=bearer(token))
        assert started.status_code == 202
        job_id = started.json()["id"]
        assert started.headers["location"] == f"/api/summaries/{job_id}"
        await app.state.runtime.jobs.wait(job_id)
        job = await client.get(f"/api/summaries/{job_id}", headers=bearer(token))
        latest = await client.get(f"/api/patients/{patient}/summaries/latest", headers=bearer(token))
    assert job.status_code == 200
    body = job.json()
    assert body["status"] == "succeeded", body["error"]
    assert body["result"]["patient"] == patient
    reference = body["result"]["document_reference"]
    assert reference.startswith("DocumentReference/")
    assert latest.status_code == 200
    assert latest.json()["document_reference"] == reference
    assert latest.json()["document"]["docStatus"] == "preliminary"
    assert "AI draft" in latest.json()["document"]["markdown"]
    async with httpx.AsyncClient() as http:
        doc = (await http.get(f"{fhir_base}/{reference}")).json()
    assert doc["subject"]["reference"] == f"Patient/{patient}"


@pytest.mark.integration
async def test_the_streaming_variant_sends_the_structured_part_the_tokens_and_the_result(
    ehr: TestEhr,
    tmp_path: Path,
    fhir_base: str,
    loaded_patients: dict[str, LoadedPatient],
) -> None:
    patient = loaded_patients[ALLERGIES].id
    engine = FakeEngine()
    engine.enqueue(json.dumps({"claims": [{"text": "Allergy recorded on 1994-03-30.", "citations": ["A1"]}]}))
    token = ehr.issue_token(scope="system/DocumentReference.cr", audience=APP_BASE)
    events: list[tuple[str, Any]] = []
    async with running_app(api_settings(tmp_path, ehr, fhir=fhir_base), engine=engine) as (client, _app):
        async with client.stream(
            "POST", "/api/summaries/stream", json={"patient": patient}, headers=bearer(token)
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            name = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ").strip()
                elif line.startswith("data: ") and name:
                    events.append((name, json.loads(line.removeprefix("data: "))))
    names = [n for n, _ in events]
    assert names[0] == "structured" and names[-1] == "result"
    assert names.count("token") > 1
    structured = events[0][1]
    assert any(s["title"] == "Allergies" for s in structured["structured"]["sections"])
    assert all("reference" in s and "text" in s for s in structured["sources"].values())
    streamed = "".join(d["text"] for n, d in events if n == "token")
    assert json.loads(streamed)["claims"][0]["text"] == "Allergy recorded on 1994-03-30."
    result = events[-1][1]
    assert [k["text"] for k in result["kept"]] == ["Allergy recorded on 1994-03-30."]
    assert result["document_reference"].startswith("DocumentReference/")


@pytest.mark.integration
async def test_a_failing_job_reports_why_without_patient_data(
    ehr: TestEhr,
    tmp_path: Path,
    fhir_base: str,
    loaded_patients: dict[str, LoadedPatient],
) -> None:
    token = ehr.issue_token(scope="system/DocumentReference.cr", audience=APP_BASE)
    async with running_app(api_settings(tmp_path, ehr, fhir=fhir_base)) as (client, app):
        started = await client.post(
            "/api/summaries", json={"patient": "no-such-patient"}, headers=bearer(token)
        )
        job_id = started.json()["id"]
        await asyncio.wait_for(app.state.runtime.jobs.wait(job_id), 60)
        job = (await client.get(f"/api/summaries/{job_id}", headers=bearer(token))).json()
    assert job["status"] == "failed"
    assert job["error"].startswith("the FHIR server failed: FhirNotFound")
