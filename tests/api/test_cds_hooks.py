"""The CDS Hooks patient-view service, driven as an EHR drives it: JWTs signed by the EHR's key,
its JWKS served on 127.0.0.1 by the test EHR."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from sqlalchemy import select

from service.db.models import ReviewOutcomeRow
from tests.api.conftest import APP_BASE, app_settings, running_app
from tests.smart_ehr.server import TestEhr

AUD = f"{APP_BASE}/cds-services/chartbrief-summary"
SYSTEM = "urn:chartbrief:summary"


def settings_for(tmp_path: Path, ehr: TestEhr, *, fhir_servers: tuple[str, ...] = (), **extra: Any) -> Any:
    """`fhir_servers`: FHIR servers a hook may name as its fhirServer, besides the test EHR."""
    cds = {"clients": [{"issuer": ehr.base_url, "jwks_url": ehr.jwks_url}], **extra}
    smart = {"allowed_issuers": [ehr.base_url, *fhir_servers]}
    return app_settings(tmp_path, ehr, cds=cds, writer={"identifier_system": SYSTEM}, smart=smart)


def signed(ehr: TestEhr, key: Any = None, **claims: Any) -> str:
    key = key or ehr.signing_key
    now = int(time.time())
    body = {
        "iss": ehr.base_url,
        "aud": AUD,
        "sub": "ehr-client",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode({"alg": "RS384", "kid": key.kid, "typ": "JWT"}, body, key, algorithms=["RS384"])


def doc(
    doc_status: str = "final", *, date: str = "2026-01-01T10:00:00Z", flagged: bool = False
) -> dict[str, Any]:
    sections = [
        {
            "title": "Synopsis",
            "lines": [{"text": "68 y, type 2 diabetes, hypertension", "citations": []}],
        }
    ]
    if flagged:
        sections.append(
            {"title": "Flagged results", "lines": [{"text": "HbA1c 9.1 % (high)", "citations": []}]}
        )
    data = base64.b64encode(json.dumps({"sections": sections, "conflicts": []}).encode()).decode()
    return {
        "resourceType": "DocumentReference",
        "id": "d1",
        "docStatus": doc_status,
        "date": date,
        "content": [{"attachment": {"contentType": "application/json", "data": data}}],
    }


def hook(patient: str = "p1", **extra: Any) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": patient},
        **extra,
    }


def prefetch(
    document: dict[str, Any] | None, last_updated: str = "2025-12-01T00:00:00Z"
) -> dict[str, Any]:
    entries = [{"resource": document}] if document else []
    return {
        "patient": {"resourceType": "Patient", "id": "p1", "meta": {"lastUpdated": last_updated}},
        "summary": {"resourceType": "Bundle", "type": "searchset", "entry": entries},
    }


async def call(client: httpx.AsyncClient, body: Any, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await client.post("/cds-services/chartbrief-summary", json=body, headers=headers)


async def test_discovery_lists_the_patient_view_service_with_its_prefetch(
    ehr: TestEhr, tmp_path: Path
) -> None:
    async with running_app(settings_for(tmp_path, ehr)) as (client, _):
        response = await client.get("/cds-services")
    assert response.status_code == 200
    (service,) = response.json()["services"]
    assert (service["id"], service["hook"]) == ("chartbrief-summary", "patient-view")
    assert service["title"] and service["description"]
    assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert service["prefetch"]["summary"] == (
        "DocumentReference?patient={{context.patientId}}&identifier=" + SYSTEM + "|&_sort=-date&_count=1"
    )


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 600, "iat": int(time.time()) - 900}, "expired"),
        ({"aud": "https://elsewhere.example.org/cds-services/chartbrief-summary"}, "aud"),
        ({"iss": "https://foreign.example.org/fhir"}, "iss"),
        ({"jti": None}, "jti"),
        ({"iat": int(time.time()) + 600}, "iat"),
    ],
)
async def test_misused_tokens_are_refused_with_401_and_a_reason(
    ehr: TestEhr, tmp_path: Path, claims: dict[str, Any], reason: str
) -> None:
    async with running_app(settings_for(tmp_path, ehr)) as (client, _):
        response = await call(client, hook(prefetch=prefetch(doc())), signed(ehr, **claims))
    assert response.status_code == 401
    assert reason in response.json()["error"]


async def test_a_missing_token_and_a_foreign_signature_are_refused(ehr: TestEhr, tmp_path: Path) -> None:
    stranger = RSAKey.generate_key(2048, parameters={"kid": ehr.signing_key.kid}, private=True)
    async with running_app(settings_for(tmp_path, ehr)) as (client, _):
        missing = await call(client, hook(prefetch=prefetch(doc())), None)
        forged = await call(client, hook(prefetch=prefetch(doc())), signed(ehr, key=stranger))
        bad_jku = await call(
            client, hook(prefetch=prefetch(doc())), _with_jku(ehr, "http://127.0.0.1:9/jwks")
        )
    assert missing.status_code == forged.status_code == bad_jku.status_code == 401
    assert "Bearer" in missing.json()["error"]
    assert "signature" in forged.json()["error"]
    assert "jku" in bad_jku.json()["error"]


def _with_jku(ehr: TestEhr, jku: str) -> str:
    now = int(time.time())
    body = {"iss": ehr.base_url, "aud": AUD, "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex}
    header = {"alg": "RS384", "kid": ehr.signing_key.kid, "jku": jku}
    return jwt.encode(header, body, ehr.signing_key, algorithms=["RS384"])


async def test_a_replayed_jti_is_refused(ehr: TestEhr, tmp_path: Path) -> None:
    token = signed(ehr)
    async with running_app(settings_for(tmp_path, ehr)) as (client, _):
        first = await call(client, hook(prefetch=prefetch(doc())), token)
        again = await call(client, hook(prefetch=prefetch(doc())), token)
    assert first.status_code == 200
    assert again.status_code == 401 and "replay" in again.json()["error"]


async def test_a_jti_replayed_to_another_process_of_the_same_database_is_refused(
    ehr: TestEhr, tmp_path: Path
) -> None:
    token, settings = signed(ehr), settings_for(tmp_path, ehr)
    async with running_app(settings) as (client, _):
        first = await call(client, hook(prefetch=prefetch(doc())), token)
    async with running_app(settings) as (client, _):  # a second process: nothing shared but the database
        again = await call(client, hook(prefetch=prefetch(doc())), token)
        fresh = await call(client, hook(prefetch=prefetch(doc())), signed(ehr))
    assert first.status_code == 200 and fresh.status_code == 200
    assert again.status_code == 401 and "replay" in again.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"hook": "order-select", "hookInstance": "x", "context": {"patientId": "p1"}}, 400, "hook"),
        ({"hook": "patient-view", "hookInstance": "x", "context": {}}, 400, "context.patientId"),
        ({"hook": "patient-view", "context": {"patientId": "p1"}}, 400, "hookInstance"),
        (
            {
                "hook": "patient-view",
                "hookInstance": "x",
                "context": {"patientId": "p1"},
                "fhirAuthorization": {"token_type": "Bearer"},
                "fhirServer": "http://127.0.0.1:9/fhir",
            },
            400,
            "access_token",
        ),
        ({"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p1"}}, 412, "prefetch"),
    ],
)
async def test_bad_hook_requests_get_the_spec_answers(
    ehr: TestEhr, tmp_path: Path, body: dict[str, Any], status: int, field: str
) -> None:
    async with running_app(settings_for(tmp_path, ehr)) as (client, _):
        response = await call(client, body, signed(ehr))
    assert response.status_code == status
    assert field in response.json()["error"]


@pytest.mark.parametrize(
    ("document", "last_updated", "state", "indicator"),
    [
        (doc("final"), "2025-12-01T00:00:00Z", "approved", "info"),
        (doc("preliminary"), "2025-12-01T00:00:00Z", "draft", "info"),
        (doc("final"), "2026-02-01T00:00:00Z", "stale", "warning"),
        (doc("final", flagged=True), "2025-12-01T00:00:00Z", "approved", "warning"),
    ],
)
async def test_a_ready_summary_becomes_a_card_with_its_state_and_a_smart_link(
    ehr: TestEhr, tmp_path: Path, document: dict[str, Any], last_updated: str, state: str, indicator: str
) -> None:
    async with running_app(settings_for(tmp_path, ehr)) as (client, _):
        response = await call(client, hook(prefetch=prefetch(document, last_updated)), signed(ehr))
    assert response.status_code == 200
    (card,) = response.json()["cards"]
    assert card["summary"] == "68 y, type 2 diabetes, hypertension"
    assert f"**State:** {state}" in card["detail"]
    assert card["indicator"] == indicator
    assert card["source"]["label"] == "chartbrief"
    # Nothing here may ask a FHIR server, so the card falls back on the Patient and says so.
    assert "was not checked: chartbrief has no access to the FHIR server" in card["detail"]
    (link,) = card["links"]
    assert link["type"] == "smart" and link["url"].startswith(f"{APP_BASE}/launch")
    if "Flagged" in json.dumps(document):
        assert "HbA1c 9.1 % (high)" in card["detail"]


async def test_a_missing_summary_answers_a_card_saying_none_is_ready(
    ehr: TestEhr, tmp_path: Path
) -> None:
    async with running_app(settings_for(tmp_path, ehr)) as (client, _):
        response = await call(client, hook(prefetch=prefetch(None)), signed(ehr))
    (card,) = response.json()["cards"]
    # No FHIR server of chartbrief's own is configured here, so nothing can be queued and the card says so.
    assert card["summary"] == "No chartbrief summary yet"
    assert card["links"][0]["type"] == "smart"


async def test_feedback_is_recorded_with_the_review_outcomes(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(settings_for(tmp_path, ehr)) as (client, app):
        body = {
            "feedback": [
                {"card": "none.abc", "outcome": "accepted", "outcomeTimestamp": "2026-01-01T10:00:00Z"},
                {
                    "card": "none.def",
                    "outcome": "overridden",
                    "outcomeTimestamp": "2026-01-01T10:00:00Z",
                    "overrideReason": {"reason": {"code": "not-relevant", "system": "urn:x"}, "userComment": "free text"},
                },
            ]
        }
        ok = await client.post(
            "/cds-services/chartbrief-summary/feedback",
            json=body,
            headers={"Authorization": f"Bearer {signed(ehr)}"},
        )
        bad = await client.post(
            "/cds-services/chartbrief-summary/feedback",
            json={"feedback": [{"card": "x"}]},
            headers={"Authorization": f"Bearer {signed(ehr)}"},
        )
        unsigned = await client.post("/cds-services/chartbrief-summary/feedback", json=body)
        with app.state.runtime.db() as s:
            rows = list(s.scalars(select(ReviewOutcomeRow).order_by(ReviewOutcomeRow.id)).all())
    assert ok.status_code == 200 and bad.status_code == 400 and unsigned.status_code == 401
    assert [r.action for r in rows] == ["cds_accepted", "cds_overridden"]
    assert rows[1].override_reasons == ["not-relevant"] and rows[1].who.startswith("cds:")
    assert "free text" not in repr([(r.who, r.override_reasons) for r in rows])  # the user comment is not kept


def summary_fields(fhir_base: str) -> dict[str, Any]:
    return {
        "fhir_base": fhir_base,
        "patient_id": "p1",
        "encounter_id": None,
        "idempotency_key": "k1",
        "inputs": [],
        "prompt_id": "summary",
        "prompt_version": "v2",
        "prompt_sha256": "c" * 64,
        "model_name": "model-a",
        "model_file": "model-a.gguf",
        "model_sha256": "a" * 64,
        "sampling": "temperature=0.0",
        "outcome": "written",
        "document_reference": "DocumentReference/d1",
    }


async def test_a_card_names_its_summary_so_feedback_is_counted_per_model_and_prompt_by_monitor(
    ehr: TestEhr, tmp_path: Path
) -> None:
    from service.cli.monitor import render
    from service.db.audit import rejections
    from service.governance.monitor import monitor_report
    from service.governance.records import review_outcomes, summaries

    server = "http://127.0.0.1:9/fhir"
    async with running_app(settings_for(tmp_path, ehr)) as (client, app):
        runtime = app.state.runtime
        row_id = runtime.store.record(summary_fields(server))
        response = await call(client, hook(prefetch=prefetch(doc()), fhirServer=server), signed(ehr))
        card_id = response.json()["cards"][0]["uuid"]
        assert card_id.startswith(f"{row_id}.")
        body = {
            "feedback": [
                {"card": card_id, "outcome": "accepted", "outcomeTimestamp": "2026-01-01T10:00:00Z"},
                {
                    "card": card_id,
                    "outcome": "overridden",
                    "outcomeTimestamp": "2026-01-01T10:01:00Z",
                    "overrideReason": {"reason": {"code": "already-known", "system": "urn:x"}},
                },
            ]
        }
        ok = await client.post(
            "/cds-services/chartbrief-summary/feedback",
            json=body,
            headers={"Authorization": f"Bearer {signed(ehr)}"},
        )
        assert ok.status_code == 200
        report = monitor_report(
            summaries(runtime.db), review_outcomes(runtime.db), rejections(runtime.db)
        )
    (group,) = report["cds_feedback"]
    assert (group["model_name"], group["prompt"], group["accepted"], group["overridden"]) == (
        "model-a",
        "summary/v2",
        1,
        1,
    )
    assert group["override_reasons"] == [{"reason": "already-known", "count": 1}]
    # Card outcomes are not review outcomes: the draft itself is still pending review.
    assert report["overall"]["pending"] == 1
    assert "1 accepted, 1 overridden (override reasons: already-known 1)" in render(report)
