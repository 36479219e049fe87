"""The review screen end to end over HTTP: a SMART launch at the test EHR in front of the real local FHIR
server, the streamed summary, and each action read back from the FHIR server - with a scripted engine
(the browser test runs the real model)."""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from fhir_adapters.auth.launch import TokenSet
from service.db.launch import load_session
from service.db.models import AuditEvent, Rejection
from service.dev.sandbox import LoadedPatient
from tests.api.conftest import (
    REDIRECT_URI,
    app_settings,
    form_field,
    launch_session,
    read_events,
    running_app,
    scripted_engine,
)
from tests.smart_ehr.server import TestEhr

pytestmark = pytest.mark.integration

ALLERGIES = "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json"
SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"
# Kermit's three allergies share one date, so which of them is A1 depends on the ids the server
# gave them; this statement is supported by any of the three.
KEPT = "Allergy recorded on 1994-03-30."
UNSUPPORTED = "Has diabetes since 1990."
OUTPUT = json.dumps(
    {"claims": [{"text": KEPT, "citations": ["A1"]}, {"text": UNSUPPORTED, "citations": ["A1"]}]}
)


@pytest.fixture(scope="module")
def ehr_fhir(fhir_base: str) -> Iterator[TestEhr]:
    with TestEhr(fhir_base, redirect_uris=[REDIRECT_URI]) as server:
        yield server


@pytest.fixture
def kermit(loaded_patients: dict[str, LoadedPatient]) -> str:
    return loaded_patients[ALLERGIES].id


async def fhir_read(fhir_base: str, reference: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{fhir_base}/{reference}", headers={"Accept": "application/fhir+json"})
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def stream_url(page_html: str) -> str:
    match = re.search(r'data-stream-url="([^"]+)"', page_html)
    assert match is not None, "the review page names no stream"
    return html.unescape(match.group(1))


def audit_rows(app: Any) -> list[AuditEvent]:
    with app.state.runtime.db() as s:
        return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all())


async def stream_a_draft(client: httpx.AsyncClient) -> tuple[list[tuple[str, dict[str, Any]]], str, str, str]:
    """Open the review page and run its stream; return the events, the draft id, version and CSRF token."""
    page = await client.get("/review")
    assert page.status_code == 200, page.text
    events = await read_events(client, stream_url(page.text))
    (draft,) = [d for n, d in events if n == "draft"]
    actions = draft["actions"]
    return events, draft["id"], form_field(actions, "version"), form_field(actions, "csrf_token")


# -- the stream ------------------------------------------------------------------------------------


async def test_the_stream_shows_the_coded_part_then_the_model_text_then_only_checked_claims(
    ehr_fhir: TestEhr,
    tmp_path: Path,
    kermit: str,
    fhir_base: str,
) -> None:
    engine = scripted_engine("stream", OUTPUT)
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, _app):
        await launch_session(client, ehr_fhir, kermit)
        page = await client.get("/review")
        assert page.status_code == 200
        assert "patient-banner" in page.text and "Kermit" in page.text
        assert stream_url(page.text).startswith("/review/stream?csrf_token=")
        assert "<script src=" in page.text and "<script>" not in page.text
        events, doc_id, version, csrf = await stream_a_draft(client)

    names = [n for n, _ in events]
    assert names.index("structured") < names.index("token") < names.index("narrative") < names.index("draft")
    assert names[-1] == "done"
    structured = dict(events)["structured"]
    assert "Allergies" in structured["html"]
    assert 'id="source-A1"' in structured["sources"]
    assert "".join(d["text"] for n, d in events if n == "token") == OUTPUT
    narrative = html.unescape(dict(events)["narrative"]["html"])
    kept_part, dropped_part = narrative.split("Removed by the source check")
    assert KEPT in kept_part and UNSUPPORTED not in kept_part
    assert UNSUPPORTED in dropped_part and "NOT part of the summary" in dropped_part
    assert "Reason:" in dropped_part
    assert csrf and version == "1"
    doc = await fhir_read(fhir_base, f"DocumentReference/{doc_id}")
    assert (doc["status"], doc["docStatus"]) == ("current", "preliminary")
    markdown = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert KEPT in markdown and UNSUPPORTED not in markdown


async def test_opening_the_review_again_shows_the_saved_draft_without_running_the_model(
    ehr_fhir: TestEhr, tmp_path: Path, kermit: str
) -> None:
    engine = scripted_engine("again", OUTPUT)  # one output only: a second generation would fail
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, _app):
        await launch_session(client, ehr_fhir, kermit)
        _events, first_id, _version, _csrf = await stream_a_draft(client)
        again, second_id, _version, _csrf = await stream_a_draft(client)
    assert second_id == first_id
    assert engine.pending == 0 and len(engine.history) == 1
    assert "token" not in [n for n, _ in again]
    assert "already holds the summary" in dict(again)["done"]["text"]
    assert KEPT in html.unescape(dict(again)["narrative"]["html"])


async def test_the_stream_writes_nothing_without_the_pages_csrf_token(
    ehr_fhir: TestEhr, tmp_path: Path, kermit: str
) -> None:
    engine = scripted_engine("stream-csrf", OUTPUT)
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, app):
        await launch_session(client, ehr_fhir, kermit)
        bare = await client.get("/review/stream")
        forged = await client.get("/review/stream", params={"csrf_token": "forged"})
        rows = audit_rows(app)
    assert bare.status_code == 403 and forged.status_code == 403
    assert engine.history == []
    assert [(r.action, r.outcome) for r in rows if r.action == "summarize"] == [("summarize", "denied")] * 2


# -- the actions -----------------------------------------------------------------------------------


async def test_approve_makes_the_draft_final_with_the_clinician_as_author_and_verifier(
    ehr_fhir: TestEhr,
    tmp_path: Path,
    kermit: str,
    fhir_base: str,
) -> None:
    engine = scripted_engine("approve", OUTPUT)
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, app):
        await launch_session(client, ehr_fhir, kermit)
        _events, doc_id, version, csrf = await stream_a_draft(client)
        response = await client.post(
            "/review/approve", data={"document_reference": doc_id, "version": version, "csrf_token": csrf}
        )
        assert response.status_code == 303
        assert response.headers["location"] == f"/review?doc={doc_id}&notice=approved"
        shown = await client.get(response.headers["location"])
        rows = audit_rows(app)
    assert shown.status_code == 200
    assert "Approved by a clinician (final)" in shown.text
    assert "approve-button" not in shown.text  # nothing left to approve
    doc = await fhir_read(fhir_base, f"DocumentReference/{doc_id}")
    assert doc["docStatus"] == "final"
    authors = [a["reference"] for a in doc["author"]]
    assert authors[0].startswith("Device/") and "Practitioner/dr-1" in authors
    identifier = doc["identifier"][0]["value"]
    provenance = await fhir_read(fhir_base, f"Provenance/cb-{identifier[:40]}")
    verifiers = [
        a["who"]["reference"]
        for a in provenance["agent"]
        if any(c["code"] == "verifier" for c in a["type"]["coding"])
    ]
    assert verifiers == ["Practitioner/dr-1"]
    approve_rows = [r for r in rows if r.action == "approve"]
    assert [(r.actor, r.outcome, r.patient_id, r.resource) for r in approve_rows] == [
        ("Practitioner/dr-1", "ok", kermit, f"DocumentReference/{doc_id}")
    ]


async def test_an_action_without_the_csrf_token_or_from_another_origin_is_refused(
    ehr_fhir: TestEhr,
    tmp_path: Path,
    kermit: str,
    fhir_base: str,
) -> None:
    engine = scripted_engine("csrf", OUTPUT)
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, app):
        await launch_session(client, ehr_fhir, kermit)
        _events, doc_id, version, csrf = await stream_a_draft(client)
        form = {"document_reference": doc_id, "version": version}
        missing = await client.post("/review/approve", data=form)
        forged = await client.post("/review/approve", data={**form, "csrf_token": csrf[:-4] + "AAAA"})
        cross_site = await client.post(
            "/review/reject", data={**form, "csrf_token": csrf}, headers={"Origin": "https://evil.example"}
        )
        rows = audit_rows(app)
    assert missing.status_code == 400  # the form field is required
    assert forged.status_code == 403 and cross_site.status_code == 403
    doc = await fhir_read(fhir_base, f"DocumentReference/{doc_id}")
    assert (doc["status"], doc["docStatus"]) == ("current", "preliminary")
    denied = [(r.action, r.detail) for r in rows if r.outcome == "denied"]
    assert denied == [("approve", "CSRF check failed"), ("reject", "CSRF check failed")]


async def test_a_stale_version_is_refused_as_a_conflict(
    ehr_fhir: TestEhr,
    tmp_path: Path,
    kermit: str,
    fhir_base: str,
) -> None:
    engine = scripted_engine("stale", OUTPUT)
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, _app):
        await launch_session(client, ehr_fhir, kermit)
        _events, doc_id, _version, csrf = await stream_a_draft(client)
        response = await client.post(
            "/review/approve", data={"document_reference": doc_id, "version": "99", "csrf_token": csrf}
        )
        assert response.headers["location"] == f"/review?doc={doc_id}&error=conflict"
        shown = await client.get(response.headers["location"])
    assert "The draft changed since you opened it" in html.unescape(shown.text)
    assert (await fhir_read(fhir_base, f"DocumentReference/{doc_id}"))["docStatus"] == "preliminary"


async def test_reject_marks_the_draft_entered_in_error_and_keeps_the_reason_off_the_chart(
    ehr_fhir: TestEhr,
    tmp_path: Path,
    kermit: str,
    fhir_base: str,
) -> None:
    engine = scripted_engine("reject", OUTPUT)
    reason = "Mentions a diagnosis this patient does not have."
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, app):
        await launch_session(client, ehr_fhir, kermit)
        _events, doc_id, version, csrf = await stream_a_draft(client)
        response = await client.post(
            "/review/reject",
            data={"document_reference": doc_id, "version": version, "csrf_token": csrf, "reason": reason},
        )
        assert response.headers["location"] == f"/review?doc={doc_id}&notice=rejected"
        with app.state.runtime.db() as s:
            rejections = list(s.scalars(select(Rejection)).all())
        rows = audit_rows(app)
    doc = await fhir_read(fhir_base, f"DocumentReference/{doc_id}")
    assert doc["status"] == "entered-in-error"
    assert reason not in str(doc)
    assert [(r.document_reference, r.reason, r.who) for r in rejections] == [
        (f"DocumentReference/{doc_id}", reason, "Practitioner/dr-1")
    ]
    assert all(reason not in (r.detail or "") for r in rows)


async def test_edit_saves_the_clinicians_text_as_a_new_version_and_approves_it(
    ehr_fhir: TestEhr,
    tmp_path: Path,
    kermit: str,
    fhir_base: str,
) -> None:
    engine = scripted_engine("edit", OUTPUT)
    text = "# Summary\n\nAllergies reviewed with the patient today.\n"
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, _app):
        await launch_session(client, ehr_fhir, kermit)
        _events, doc_id, version, csrf = await stream_a_draft(client)
        response = await client.post(
            "/review/edit",
            data={"document_reference": doc_id, "version": version, "csrf_token": csrf, "markdown": text},
        )
        assert response.headers["location"] == f"/review?doc={doc_id}&notice=edited"
        shown = await client.get(response.headers["location"])
    assert "edited by a clinician" in shown.text
    assert "reviewed with the patient today" in shown.text
    doc = await fhir_read(fhir_base, f"DocumentReference/{doc_id}")
    assert doc["docStatus"] == "final"
    assert int(doc["meta"]["versionId"]) > int(version)
    assert base64.b64decode(doc["content"][0]["attachment"]["data"]).decode() == text


async def test_regenerate_writes_a_new_draft_that_supersedes_the_old_one(
    ehr_fhir: TestEhr,
    tmp_path: Path,
    kermit: str,
    fhir_base: str,
) -> None:
    second = json.dumps({"claims": [{"text": KEPT, "citations": ["A1"]}]})
    engine = scripted_engine("regenerate", OUTPUT, second)
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=engine) as (client, _app):
        await launch_session(client, ehr_fhir, kermit)
        _events, doc_id, _version, csrf = await stream_a_draft(client)
        response = await client.post(
            "/review/regenerate", data={"document_reference": doc_id, "csrf_token": csrf}
        )
        assert response.status_code == 303
        location = response.headers["location"]
        assert location.endswith("&notice=regenerated")
        new_id = location.removeprefix("/review?doc=").split("&")[0]
        shown = await client.get(location)
    assert new_id != doc_id
    assert "Draft - not reviewed" in shown.text
    old = await fhir_read(fhir_base, f"DocumentReference/{doc_id}")
    new = await fhir_read(fhir_base, f"DocumentReference/{new_id}")
    assert old["status"] == "superseded"
    assert new["relatesTo"][0] == {"code": "replaces", "target": {"reference": f"DocumentReference/{doc_id}"}}


# -- patient context ---------------------------------------------------------------------------------


async def _two_patients_drafts(
    client: httpx.AsyncClient, ehr: TestEhr, kermit: str, other: str
) -> tuple[str, str, str]:
    """A draft of `other`, then a session in Kermit's chart; returns other's draft, its version, the CSRF."""
    await launch_session(client, ehr, other)
    _events, others_doc, others_version, _csrf = await stream_a_draft(client)
    await launch_session(client, ehr, kermit)  # the same browser, now in Kermit's chart
    _events, _doc, _version, csrf = await stream_a_draft(client)
    return others_doc, others_version, csrf


@pytest.mark.parametrize(
    ("scope", "refused_by"),
    [
        # Patient-level scopes: the EHR itself refuses the read; chartbrief shows 403 and audits it.
        (None, "ehr"),
        # User-level scopes: the EHR would allow it; chartbrief's own launch-patient check refuses.
        ("launch openid fhirUser user/*.cruds", "chartbrief"),
    ],
)
async def test_a_session_cannot_open_or_act_on_another_patients_draft(
    ehr_fhir: TestEhr,
    tmp_path: Path,
    kermit: str,
    loaded_patients: dict[str, LoadedPatient],
    fhir_base: str,
    scope: str | None,
    refused_by: str,
) -> None:
    other = loaded_patients[SMALL].id
    engine = scripted_engine(f"other-patient-{refused_by}", '{"claims": []}', OUTPUT)
    settings = app_settings(tmp_path, ehr_fhir, smart={"scope": scope})
    async with running_app(settings, engine=engine) as (client, app):
        others_doc, others_version, csrf = await _two_patients_drafts(client, ehr_fhir, kermit, other)
        opened = await client.get(f"/review?doc={others_doc}")
        approved = await client.post(
            "/review/approve",
            data={"document_reference": others_doc, "version": others_version, "csrf_token": csrf},
        )
        rows = audit_rows(app)
    assert opened.status_code == 403 and approved.status_code == 403
    doc = await fhir_read(fhir_base, f"DocumentReference/{others_doc}")
    assert (doc["status"], doc["docStatus"]) == ("current", "preliminary")
    refusals = {(r.action, r.patient_id, r.resource): r for r in rows if r.outcome != "ok"}
    view = refusals[("view", kermit, f"DocumentReference/{others_doc}")]
    approve = refusals[("approve", kermit, f"DocumentReference/{others_doc}")]
    assert view.outcome == "denied"
    if refused_by == "chartbrief":
        assert "another patient" in html.unescape(approved.text)
        assert (view.detail, approve.outcome) == ("another patient", "denied")
    else:
        assert "refused chartbrief's access" in html.unescape(approved.text)
        assert view.detail == "refused by the EHR"


# -- tokens ------------------------------------------------------------------------------------------


async def test_a_short_lived_access_token_is_refreshed_and_the_new_one_stored_encrypted(
    fhir_base: str,
    tmp_path: Path,
    kermit: str,
) -> None:
    engine = scripted_engine("refresh", OUTPUT)
    # 30 s of life is under the 60 s refresh margin: the first FHIR request already refreshes.
    with TestEhr(fhir_base, redirect_uris=[REDIRECT_URI], access_token_lifetime=30) as ehr:
        async with running_app(app_settings(tmp_path, ehr), engine=engine) as (client, app):
            await launch_session(client, ehr, kermit)
            runtime = app.state.runtime
            session_id = client.cookies["__Host-cb_session"]
            browser = client.cookies["__Host-cb_browser"]
            before = TokenSet.from_dict(load_session(runtime.db, runtime.cipher, session_id).token_set)
            events, _doc, _version, _csrf = await stream_a_draft(client)
            after = TokenSet.from_dict(
                load_session(runtime.db, runtime.cipher, session_id, browser_session=browser).token_set
            )
        grants = [r["grant_type"] for r in ehr.token_requests]
    assert grants[0] == "authorization_code" and "refresh_token" in grants
    assert after.access_token != before.access_token
    assert after.refresh_token != before.refresh_token  # rotated, and the rotation was stored
    assert after.patient == before.patient == kermit
    assert dict(events)["done"]["text"].startswith("Draft saved to the chart")
