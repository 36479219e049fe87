"""The patient-view card read from the real local FHIR server, and the time budget with a slow one."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters.client import FhirClient
from service.dev.sandbox import LoadedPatient
from tests.api.conftest import ehr, running_app
from tests.api.test_cds_hooks import SYSTEM, call, hook, settings_for, signed
from tests.smart_ehr.server import TestEhr

__all__ = ["ehr"]  # the module-scoped test EHR (its JWKS signs the CDS JWTs)

SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"


def summary_document(patient_id: str) -> dict[str, Any]:
    data = {
        "sections": [
            {"title": "Synopsis", "lines": [{"text": "Adult, no active problems", "citations": []}]}
        ]
    }
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "docStatus": "preliminary",
        "identifier": [{"system": SYSTEM, "value": f"cds-test-{patient_id}"}],
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "content": [
            {
                "attachment": {
                    "contentType": "application/json",
                    "data": base64.b64encode(json.dumps(data).encode()).decode(),
                }
            }
        ],
    }


async def test_without_prefetch_the_card_is_read_from_the_fhir_server_with_the_ehr_token(
    ehr: TestEhr, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    async with FhirClient(fhir_base) as client:
        await client.create(summary_document(patient))
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
    async with running_app(settings_for(tmp_path, ehr, fhir_servers=(fhir_base,))) as (client, _):
        response = await call(client, body, signed(ehr))
        foreign = await call(client, {**body, "fhirServer": "http://127.0.0.1:9/fhir"}, signed(ehr))
    assert response.status_code == 200
    # The EHR's token is sent to no FHIR server the deployment does not name.
    assert foreign.status_code == 400 and "fhirServer" in foreign.json()["error"]
    (card,) = response.json()["cards"]
    assert card["summary"] == "Adult, no active problems"
    assert "**State:** draft" in card["detail"]


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


async def test_a_patient_without_a_summary_gets_one_queued_and_a_card_saying_so(
    ehr: TestEhr, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = next(p.id for name, p in sorted(loaded_patients.items()) if name != SMALL)
    base = settings_for(tmp_path, ehr)
    settings = base.model_copy(update={"fhir": base.fhir.model_copy(update={"base_url": fhir_base})})
    async with running_app(settings) as (client, app):
        response = await call(client, hook(patient, fhirServer=fhir_base), signed(ehr))
        jobs = list(app.state.runtime.jobs._jobs.values())
    assert response.status_code == 200
    (card,) = response.json()["cards"]
    assert card["summary"] == "A chartbrief summary is being prepared"
    assert [(j.patient_id, j.requested_by) for j in jobs] == [(patient, f"cds:{ehr.base_url}")]
