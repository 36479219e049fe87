"""A DocumentReference that carries chartbrief's identifier system but that chartbrief did not write, put
straight into the chart (the real local FHIR server) by anyone allowed to write there: the review screen
says it is not a chartbrief draft, shows none of it and offers no action, and a forged approve is
refused and audited `denied`. A genuine draft still shows and approves; one whose cited source version
has left the record shows the warning and no Approve.

Each planted document copies a genuine draft of the same test (so only the one thing under test is
wrong) under an identifier value of its own (so chartbrief's summary row for the genuine draft does not
name it).
"""

from __future__ import annotations

import base64
import copy
import html
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_adapters.write.draft import provenance_id
from service.config import Settings
from tests.api.conftest import app_settings, launch_session, running_app, scripted_engine
from tests.api.test_review_flow import (
    KEPT,
    audit_rows,
    ehr_fhir,  # noqa: F401  # the module-scoped test EHR fixture
    fhir_read,
    kermit,  # noqa: F401  # the patient fixture
    stream_a_draft,
)
from tests.smart_ehr.server import TestEhr

pytestmark = pytest.mark.integration

FORGED = "Has diabetes since 1990."
OUTPUT = json.dumps({"claims": [{"text": KEPT, "citations": ["A1"]}]})
FHIR_JSON = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
AIAST = "AIAST"


async def fhir_put(fhir_base: str, resource: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.put(
            f"{fhir_base}/{resource['resourceType']}/{resource['id']}", json=resource, headers=FHIR_JSON
        )
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


def without_aiast(resource: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(resource)
    meta = stripped.setdefault("meta", {})
    meta["security"] = [s for s in meta.get("security") or [] if s.get("code") != AIAST]
    return stripped


def stored_json(doc: dict[str, Any]) -> dict[str, Any]:
    for content in doc["content"]:
        attachment = content["attachment"]
        if attachment.get("contentType", "").startswith("application/json"):
            data: dict[str, Any] = json.loads(base64.b64decode(attachment["data"]))
            return data
    raise AssertionError("the genuine draft stores no JSON part")


def with_statement(doc: dict[str, Any], text: str) -> dict[str, Any]:
    """`doc` whose stored statements all read `text`, still citing the same source versions."""
    changed = copy.deepcopy(doc)
    for content in changed["content"]:
        attachment = content["attachment"]
        if attachment.get("contentType", "").startswith("application/json"):
            data = json.loads(base64.b64decode(attachment["data"]))
            assert data["narrative"], "the genuine draft kept no statement to change"
            for item in data["narrative"]:
                item["text"] = text
            attachment["data"] = base64.b64encode(json.dumps(data).encode()).decode()
        else:
            attachment["data"] = base64.b64encode(f"- {text}\n".encode()).decode()
    return changed


async def plant(
    fhir_base: str,
    settings: Settings,
    genuine: dict[str, Any],
    *,
    doc_change: Any = None,
    provenance: str = "copy",
) -> dict[str, Any]:
    """A copy of `genuine` under a new id and identifier value; its Provenance per `provenance`:
    "none", "copy" (the genuine one, retargeted), or "foreign-device" (authored by a Device that is
    not a chartbrief model)."""
    key = uuid.uuid4().hex + uuid.uuid4().hex
    doc = copy.deepcopy(genuine)
    doc["id"] = f"planted-{uuid.uuid4().hex[:12]}"
    doc.pop("meta", None)
    doc["meta"] = {"security": genuine.get("meta", {}).get("security", [])}
    doc["identifier"] = [{"system": settings.writer.identifier_system, "value": key}]
    if doc_change is not None:
        doc = doc_change(doc)
    planted = await fhir_put(fhir_base, doc)
    if provenance == "none":
        return planted
    source = await fhir_read(fhir_base, f"Provenance/{provenance_id(genuine['identifier'][0]['value'])}")
    prov = copy.deepcopy(source)
    prov.pop("meta", None)
    prov["meta"] = {"security": source.get("meta", {}).get("security", [])}
    prov["id"] = provenance_id(key)
    prov["target"] = [{"reference": f"DocumentReference/{planted['id']}"}]
    if provenance == "foreign-device":
        device = await fhir_put(
            fhir_base,
            {
                "resourceType": "Device",
                "id": f"planted-{uuid.uuid4().hex[:12]}",
                "meta": {"security": source.get("meta", {}).get("security", [])},
                "deviceName": [{"name": "Some other generator", "type": "model-name"}],
            },
        )
        for agent in prov["agent"]:
            if "Device/" in agent["who"]["reference"]:
                agent["who"] = {"reference": f"Device/{device['id']}"}
    await fhir_put(fhir_base, prov)
    return planted


def no_actions(text: str) -> None:
    assert 'id="not-chartbrief"' in text and "Not a chartbrief draft" in text
    for action in ("approve", "edit", "reject", "regenerate"):
        assert f"/review/{action}" not in text, action
    assert "approve-button" not in text


PLANTS: dict[str, dict[str, Any]] = {
    "no-provenance": {"provenance": "none"},
    "foreign-device": {"provenance": "foreign-device"},
    "no-aiast-label": {"doc_change": without_aiast},
    "unsupported-statements": {"doc_change": lambda doc: with_statement(doc, FORGED)},
}


@pytest.mark.parametrize("how", list(PLANTS))
async def test_a_planted_document_is_not_shown_as_a_draft_and_cannot_be_approved(
    how: str,
    ehr_fhir: TestEhr,  # noqa: F811
    tmp_path: Path,
    kermit: str,  # noqa: F811
    fhir_base: str,
) -> None:
    settings = app_settings(tmp_path, ehr_fhir)
    engine = scripted_engine(f"planted-{how}", OUTPUT)
    async with running_app(settings, engine=engine) as (client, app):
        await launch_session(client, ehr_fhir, kermit)
        _events, genuine_id, _version, csrf = await stream_a_draft(client)
        genuine = await fhir_read(fhir_base, f"DocumentReference/{genuine_id}")
        assert stored_json(genuine)["narrative"], "the genuine draft must keep a statement to copy"
        planted = await plant(fhir_base, settings, genuine, **PLANTS[how])
        page = await client.get(f"/review?doc={planted['id']}")
        response = await client.post(
            "/review/approve",
            data={
                "document_reference": planted["id"],
                "version": planted["meta"]["versionId"],
                "csrf_token": csrf,
            },
        )
        rows = audit_rows(app)
    assert page.status_code == 200, page.text
    text = html.unescape(page.text)
    no_actions(text)
    assert KEPT not in text and FORGED not in text  # nothing of what it says is shown
    assert response.status_code == 303, response.text
    assert "error=not-chartbrief" in response.headers["location"]
    after = await fhir_read(fhir_base, f"DocumentReference/{planted['id']}")
    assert after.get("docStatus") != "final"
    assert after["meta"]["versionId"] == planted["meta"]["versionId"]
    approves = [
        (r.outcome, r.detail, r.resource)
        for r in rows
        if r.action == "approve" and r.resource.endswith(planted["id"])
    ]
    assert approves == [("denied", "not a chartbrief draft", f"DocumentReference/{planted['id']}")]


async def test_a_genuine_draft_still_shows_and_approves(
    ehr_fhir: TestEhr,  # noqa: F811
    tmp_path: Path,
    kermit: str,  # noqa: F811
    fhir_base: str,
) -> None:
    engine = scripted_engine("planted-genuine", OUTPUT)
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, _app):
        await launch_session(client, ehr_fhir, kermit)
        _events, doc_id, version, csrf = await stream_a_draft(client)
        page = await client.get(f"/review?doc={doc_id}")
        response = await client.post(
            "/review/approve", data={"document_reference": doc_id, "version": version, "csrf_token": csrf}
        )
    text = html.unescape(page.text)
    assert "Not a chartbrief draft" not in text and "approve-button" in text and KEPT in text
    assert response.status_code == 303, response.text
    assert (await fhir_read(fhir_base, f"DocumentReference/{doc_id}"))["docStatus"] == "final"


async def test_a_draft_whose_cited_source_changed_shows_the_warning_and_no_approve(
    ehr_fhir: TestEhr,  # noqa: F811
    tmp_path: Path,
    kermit: str,  # noqa: F811
    fhir_base: str,
) -> None:
    engine = scripted_engine("planted-stale", OUTPUT)
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, app):
        await launch_session(client, ehr_fhir, kermit)
        _events, doc_id, version, csrf = await stream_a_draft(client)
        doc = await fhir_read(fhir_base, f"DocumentReference/{doc_id}")
        data = stored_json(doc)
        cited = data["sources"][data["narrative"][0]["citations"][0]]
        source = await fhir_read(fhir_base, cited.split("/_history/")[0])
        # The same content saved again: a new version, so the one the statement cites is no longer current.
        source.pop("meta", None)
        await fhir_put(fhir_base, source)
        page = await client.get(f"/review?doc={doc_id}")
        response = await client.post(
            "/review/approve", data={"document_reference": doc_id, "version": version, "csrf_token": csrf}
        )
        rows = audit_rows(app)
    text = html.unescape(page.text)
    assert 'id="stale-warning"' in text and "approve-button" not in text
    assert "Not a chartbrief draft" not in text
    assert "/review/reject" in text and "/review/regenerate" in text  # still rejected or regenerated
    assert 'data-stale="true"' in text
    assert response.status_code == 303, response.text
    assert "error=stale" in response.headers["location"]
    assert (await fhir_read(fhir_base, f"DocumentReference/{doc_id}")).get("docStatus") != "final"
    assert [(r.outcome, r.detail) for r in rows if r.action == "approve"] == [
        ("denied", "statements no longer supported by the record")
    ]
