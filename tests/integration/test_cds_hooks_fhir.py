"""The patient-view card read from the real local FHIR server (and whether the record changed since
the summary), and the time budget with a slow one."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters.auth.scopes import CHANGE_TYPES
from fhir_adapters.client import FhirClient
from service.cds.freshness import versioned
from service.dev.sandbox import LoadedPatient
from service.llm.base import EngineError, Generation, GenerationRequest
from service.llm.fake import FakeEngine
from tests.api.conftest import ehr, running_app
from tests.api.test_cds_hooks import SYSTEM, call, hook, settings_for, signed, summary_fields
from tests.smart_ehr.server import TestEhr

__all__ = ["ehr"]  # the module-scoped test EHR (its JWKS signs the CDS JWTs)

SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"


def summary_document(patient_id: str) -> dict[str, Any]:
    data = {
        "sections": [{"title": "Synopsis", "lines": [{"text": "Adult, no active problems", "citations": []}]}]
    }
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "docStatus": "preliminary",
        "identifier": [{"system": SYSTEM, "value": f"cds-test-{patient_id}"}],
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "content": [
            {
                "attachment": {
                    "contentType": "application/json",
                    "data": base64.b64encode(json.dumps(data).encode()).decode(),
                }
            }
        ],
    }


async def recorded_summary(fhir_base: str, patient_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A summary document written for the patient after reading its record, and the row chartbrief
    keeps of it (the versions it read), as `runtime.store.record` takes it."""

    def by_patient(resource_type: str) -> dict[str, str]:
        return {"_id" if resource_type == "Patient" else "patient": patient_id}

    async with FhirClient(fhir_base) as fhir:
        found = await asyncio.gather(*(fhir.search_all(t, by_patient(t)) for t in CHANGE_TYPES))
        document = await fhir.create(summary_document(patient_id))
    row = {
        **summary_fields(fhir_base),
        "patient_id": patient_id,
        "idempotency_key": f"cds-{patient_id}-{document['id']}",
        "inputs": [versioned(r) for resources in found for r in resources],
        "document_reference": f"DocumentReference/{document['id']}",
    }
    return document, row


async def test_without_prefetch_the_card_is_read_from_the_fhir_server_with_the_ehr_token(
    ehr: TestEhr, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    _, row = await recorded_summary(fhir_base, patient)
    body = hook(
        patient,
        fhirServer=fhir_base,
        fhirAuthorization={
            "access_token": "ehr-token",
            "token_type": "Bearer",
            "scope": "patient/*.read",
            "subject": "cds",
        },
    )
    async with running_app(settings_for(tmp_path, ehr, fhir_servers=(fhir_base,))) as (client, app):
        app.state.runtime.store.record(row)
        response = await call(client, body, signed(ehr))
        foreign = await call(client, {**body, "fhirServer": "http://127.0.0.1:9/fhir"}, signed(ehr))
    assert response.status_code == 200
    # The EHR's token is sent to no FHIR server the deployment does not name.
    assert foreign.status_code == 400 and "fhirServer" in foreign.json()["error"]
    (card,) = response.json()["cards"]
    assert card["summary"] == "Adult, no active problems"
    assert "**State:** draft" in card["detail"], card["detail"]
    assert "Changed in the record" not in card["detail"]


class _Slow(BaseHTTPRequestHandler):
    authorizations: list[str | None] = []  # noqa: RUF012 - what each request carried, for the test

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.authorizations.append(self.headers.get("Authorization"))
        time.sleep(3)
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.end_headers()
        self.wfile.write(b'{"resourceType": "Bundle", "type": "searchset", "entry": []}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def slow_fhir() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()
    server.server_close()


async def test_a_slow_fhir_server_never_holds_the_card_past_its_budget(
    ehr: TestEhr, tmp_path: Path, slow_fhir: str
) -> None:
    body = hook(
        "p1",
        fhirServer=slow_fhir,
        fhirAuthorization={"access_token": "ehr-token", "token_type": "Bearer"},
    )
    _Slow.authorizations.clear()
    settings = settings_for(tmp_path, ehr, fhir_servers=(slow_fhir,), budget_seconds=0.4)
    async with running_app(settings) as (client, _):
        started = time.perf_counter()
        response = await call(client, body, signed(ehr))
        took = time.perf_counter() - started
    assert response.status_code == 200
    assert took < 1.2, f"the card took {took:.2f} s with a 0.4 s budget"
    assert _Slow.authorizations and set(_Slow.authorizations) == {"Bearer ehr-token"}  # the EHR's own token
    (card,) = response.json()["cards"]
    assert card["summary"] in ("No chartbrief summary yet", "A chartbrief summary is being prepared")


class _HeldEngine(FakeEngine):
    """A model that does not answer until the test lets it: its job stays unfinished meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> Generation:
        await self.release.wait()
        raise EngineError("released by the test")


async def test_a_patient_without_a_summary_gets_one_queued_and_a_card_saying_so(
    ehr: TestEhr, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = next(p.id for name, p in sorted(loaded_patients.items()) if name != SMALL)
    base = settings_for(tmp_path, ehr)
    settings = base.model_copy(update={"fhir": base.fhir.model_copy(update={"base_url": fhir_base})})
    engine = _HeldEngine()
    async with running_app(settings, engine=engine) as (client, app):
        response = await call(client, hook(patient, fhirServer=fhir_base), signed(ehr))
        # The chart opened again while that summary is still being made: no second one.
        again = await call(client, hook(patient, fhirServer=fhir_base), signed(ehr))
        jobs = list(app.state.runtime.jobs._jobs.values())
        engine.release.set()
    assert response.status_code == 200
    for answer in (response, again):
        (card,) = answer.json()["cards"]
        assert card["summary"] == "A chartbrief summary is being prepared"
    assert [(j.patient_id, j.requested_by) for j in jobs] == [(patient, f"cds:{ehr.base_url}")]


def _glucose(patient_id: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "valueQuantity": {"value": value, "unit": "mg/dL"},
    }


async def test_a_result_added_after_the_summary_makes_the_card_stale_and_names_what_changed(
    ehr: TestEhr, tmp_path: Path, fhir_base: str
) -> None:
    async with FhirClient(fhir_base) as fhir:
        patient = await fhir.create({"resourceType": "Patient", "gender": "female"})
        await fhir.create(_glucose(patient["id"], 98))
    # The summary read the Patient and its result at their versions: found again, they are no change.
    _, row = await recorded_summary(fhir_base, patient["id"])
    auth = {"access_token": "ehr-token", "token_type": "Bearer"}
    body = hook(patient["id"], fhirServer=fhir_base, fhirAuthorization=auth)
    async with running_app(settings_for(tmp_path, ehr, fhir_servers=(fhir_base,))) as (client, app):
        app.state.runtime.store.record(row)
        before = (await call(client, body, signed(ehr))).json()["cards"][0]
        async with FhirClient(fhir_base) as fhir:
            await fhir.create(_glucose(patient["id"], 212))
        after = (await call(client, {**body, "hookInstance": str(uuid.uuid4())}, signed(ehr))).json()[
            "cards"
        ][0]
    assert "**State:** draft" in before["detail"], before["detail"]
    assert "Changed in the record" not in before["detail"] and "not checked" not in before["detail"]
    assert before["indicator"] == "info"
    assert "**State:** stale" in after["detail"], after["detail"]
    assert "Changed in the record since it was written: 1 Observation." in after["detail"]
    assert after["indicator"] == "warning"


async def test_a_slow_answer_on_changes_leaves_the_card_saying_it_was_not_checked(
    ehr: TestEhr, tmp_path: Path, slow_fhir: str
) -> None:
    from tests.api.test_cds_hooks import doc, prefetch

    body = hook(
        "p1",
        prefetch=prefetch(doc("final")),
        fhirServer=slow_fhir,
        fhirAuthorization={"access_token": "ehr-token", "token_type": "Bearer"},
    )
    settings = settings_for(tmp_path, ehr, fhir_servers=(slow_fhir,), budget_seconds=0.4)
    async with running_app(settings) as (client, _):
        started = time.perf_counter()
        response = await call(client, body, signed(ehr))
        took = time.perf_counter() - started
    assert took < 1.2, f"the card took {took:.2f} s with a 0.4 s budget"
    (card,) = response.json()["cards"]
    # The summary is shown from the prefetch; it is never called current when that went unchecked.
    assert card["summary"] == "68 y, type 2 diabetes, hypertension"
    assert "**State:** approved" in card["detail"]
    assert "was not checked: the FHIR server did not answer in time" in card["detail"]


async def test_right_after_chartbrief_writes_a_summary_the_card_is_current_until_a_result_comes_in(
    ehr: TestEhr, tmp_path: Path, fhir_base: str
) -> None:
    from tests.api.conftest import APP_BASE, app_settings
    from tests.api.test_api import READ, WRITE, bearer

    async with FhirClient(fhir_base) as fhir:
        patient = await fhir.create({"resourceType": "Patient", "gender": "male", "birthDate": "1961-04-02"})
        await fhir.create(_glucose(patient["id"], 101))
    engine = FakeEngine()
    engine.enqueue(json.dumps({"claims": []}))
    settings = app_settings(
        tmp_path,
        ehr,
        api={"jwt_issuer": ehr.base_url, "jwks_url": ehr.jwks_url},
        fhir={"base_url": fhir_base},
        cds={"clients": [{"issuer": ehr.base_url, "jwks_url": ehr.jwks_url}]},
        writer={"identifier_system": SYSTEM},
        smart={"allowed_issuers": [ehr.base_url]},
    )
    token = ehr.issue_token(patient=patient["id"], scope=f"{READ} {WRITE}", audience=APP_BASE)
    body = hook(patient["id"], fhirServer=fhir_base)  # read with chartbrief's own client
    async with running_app(settings, engine=engine) as (client, app):
        started = await client.post("/api/summaries", json={"patient": patient["id"]}, headers=bearer(token))
        await app.state.runtime.jobs.wait(started.json()["id"])
        job = (await client.get(started.headers["location"], headers=bearer(token))).json()
        assert job["status"] == "succeeded", job["error"]
        current = (await call(client, body, signed(ehr))).json()["cards"][0]
        async with FhirClient(fhir_base) as fhir:
            await fhir.create(_glucose(patient["id"], 240))
        changed = (await call(client, {**body, "hookInstance": str(uuid.uuid4())}, signed(ehr))).json()
    assert "**State:** draft" in current["detail"], current["detail"]
    assert "Changed in the record" not in current["detail"] and "not checked" not in current["detail"]
    (card,) = changed["cards"]
    assert "**State:** stale" in card["detail"], card["detail"]
    assert "1 Observation" in card["detail"]
