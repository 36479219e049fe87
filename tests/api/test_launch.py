"""SMART launch against a real test authorization server (tests/smart_ehr): the happy paths and the
misuse the issue names - an iss off the allow-list, unknown / replayed / foreign state, a code used
without its own PKCE verifier - plus confidential clients and a grant too narrow to work with."""

from __future__ import annotations

import base64
import hashlib
import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from service.db.launch import TokenCipher
from service.db.models import AppSession, AuditEvent, LaunchState
from tests.api.conftest import (
    APP_BASE,
    NO_FHIR,
    REDIRECT_URI,
    app_settings,
    authorize,
    launch_session,
    query_of,
    running_app,
)
from tests.smart_ehr.server import TestEhr


def audit_rows(app: Any) -> list[AuditEvent]:
    with app.state.runtime.db() as s:
        return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all())


def session_rows(app: Any) -> list[AppSession]:
    with app.state.runtime.db() as s:
        return list(s.scalars(select(AppSession)).all())


async def start_launch(client: httpx.AsyncClient, ehr: TestEhr, patient_id: str = "p-1") -> httpx.Response:
    response = await client.get("/launch", params={"iss": ehr.base_url, "launch": ehr.launch(patient_id)})
    assert response.status_code == 302, response.text
    return response


async def finish(client: httpx.AsyncClient, callback_url: str) -> httpx.Response:
    parts = urlsplit(callback_url)
    return await client.get(f"{parts.path}?{parts.query}")


def page(response: httpx.Response) -> str:
    """The response body as a person reads it (HTML entities decoded)."""
    return html.unescape(response.text)


def cookie_attributes(response: httpx.Response, name: str) -> str:
    (header,) = [h for h in response.headers.get_list("set-cookie") if h.startswith(f"{name}=")]
    return header.lower()


# -- the EHR launch ------------------------------------------------------------------------------


async def test_ehr_launch_redirects_to_authorize_with_pkce_s256_aud_launch_and_narrow_scopes(
    ehr: TestEhr, tmp_path: Path
) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, app):
        launch = ehr.launch("p-1")
        response = await client.get("/launch", params={"iss": ehr.base_url, "launch": launch})
        assert response.status_code == 302
        location = response.headers["location"]
        assert location.startswith(ehr.authorize_url + "?")
        query = query_of(location)
        assert query["response_type"] == "code"
        assert query["client_id"] == "chartbrief"
        assert query["redirect_uri"] == REDIRECT_URI
        assert query["aud"] == ehr.base_url
        assert query["launch"] == launch
        assert query["code_challenge_method"] == "S256"
        scopes = query["scope"].split()
        assert scopes[0] == "launch" and {"openid", "fhirUser", "patient/DocumentReference.c"} <= set(scopes)
        assert all(not s.startswith(("user/", "system/")) for s in scopes)
        # The state and the verifier stay server-side; only the state's hash is stored.
        with app.state.runtime.db() as s:
            (row,) = s.scalars(select(LaunchState)).all()
        assert row.state_hash == hashlib.sha256(query["state"].encode()).hexdigest()
        assert row.state_hash != query["state"]
        challenge = base64.urlsafe_b64encode(hashlib.sha256(row.code_verifier.encode()).digest()).rstrip(b"=")
        assert query["code_challenge"] == challenge.decode()
        assert row.code_verifier not in location
        browser = cookie_attributes(response, "__Host-cb_browser")
        assert "httponly" in browser and "secure" in browser and "samesite=lax" in browser


async def test_callback_opens_a_server_side_session_and_the_browser_never_sees_a_token(
    ehr: TestEhr, tmp_path: Path
) -> None:
    settings = app_settings(tmp_path, ehr)
    async with running_app(settings) as (client, app):
        started = await start_launch(client, ehr, "p-7")
        callback = await authorize(started.headers["location"])
        response = await finish(client, callback)
        assert response.status_code == 303
        assert response.headers["location"] == "/review"
        session_cookie = cookie_attributes(response, "__Host-cb_session")
        assert (
            "httponly" in session_cookie and "secure" in session_cookie and "samesite=lax" in session_cookie
        )
        (row,) = session_rows(app)
        assert (row.patient_id, row.fhir_user, row.need_patient_banner) == ("p-7", "Practitioner/dr-1", True)
        # The token set is encrypted at rest: it opens only with the session secret, and neither a
        # token nor a field name is readable in what the database holds.
        sealed = row.token_set_encrypted
        token_set = TokenCipher(settings.smart.session_secret.get_secret_value()).decrypt(sealed)
        access_token, id_token = token_set["access_token"], token_set["id_token"]
        assert access_token.startswith("eyJ") and id_token.startswith("eyJ")
        for readable in (access_token, id_token, *access_token.split("."), *id_token.split(".")):
            assert readable not in sealed
        assert "access_token" not in sealed and "refresh_token" not in sealed
        raw_cookie = response.cookies["__Host-cb_session"]
        assert row.id == hashlib.sha256(raw_cookie.encode()).hexdigest() != raw_cookie
        visible = response.text + json.dumps(dict(response.headers))
        for token in (access_token, id_token, token_set.get("refresh_token") or access_token):
            assert token not in visible  # no token in anything the browser gets
        (launch_audit,) = [a for a in audit_rows(app) if a.action == "launch"]
        assert (launch_audit.outcome, launch_audit.patient_id, launch_audit.actor) == (
            "ok",
            "p-7",
            "Practitioner/dr-1",
        )


async def test_standalone_launch_asks_for_launch_patient_at_the_configured_ehr(
    ehr: TestEhr, tmp_path: Path
) -> None:
    ehr.select_patient("p-9", need_patient_banner=False)
    try:
        async with running_app(app_settings(tmp_path, ehr)) as (client, app):
            response = await client.get("/launch")
            query = query_of(response.headers["location"])
            assert "launch" not in query
            assert query["scope"].split()[0] == "launch/patient"
            assert query["aud"] == ehr.base_url
            done = await finish(client, await authorize(response.headers["location"]))
            assert done.status_code == 303
            (row,) = session_rows(app)
            assert (row.patient_id, row.need_patient_banner) == ("p-9", False)
    finally:
        ehr.select_patient(None)


# -- misuse ----------------------------------------------------------------------------------------


async def test_an_iss_off_the_allow_list_is_refused_before_any_request_to_it(
    ehr: TestEhr, tmp_path: Path
) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, app):
        asked_before = len(ehr.authorize_requests)
        response = await client.get("/launch", params={"iss": "https://evil.example/fhir", "launch": "x"})
        assert response.status_code == 403
        assert "location" not in response.headers
        assert "not on chartbrief's list of allowed EHRs" in page(response)
        assert response.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        (row,) = audit_rows(app)
        assert (row.action, row.outcome, row.detail) == ("launch", "denied", "iss not on the allow-list")
        with app.state.runtime.db() as s:
            assert s.scalars(select(LaunchState)).all() == []
        assert len(ehr.authorize_requests) == asked_before


async def test_a_prefix_of_an_allowed_iss_is_not_allowed(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, _app):
        for iss in (ehr.base_url + ".evil.example", ehr.base_url + "/../other", ehr.origin):
            response = await client.get("/launch", params={"iss": iss, "launch": "x"})
            assert response.status_code == 403, iss


async def test_an_unknown_state_is_refused(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, app):
        await start_launch(client, ehr)
        response = await client.get("/callback", params={"code": "anything", "state": "not-a-state-we-made"})
        assert response.status_code == 400
        assert "unknown to chartbrief" in page(response)
        assert session_rows(app) == []
        assert [(a.outcome, a.detail) for a in audit_rows(app)] == [("denied", "state unknown")]


async def test_a_replayed_state_is_refused_and_opens_no_second_session(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, app):
        started = await start_launch(client, ehr)
        callback = await authorize(started.headers["location"])
        assert (await finish(client, callback)).status_code == 303
        replay = await finish(client, callback)
        assert replay.status_code == 400
        assert "already used" in page(replay)
        assert len(session_rows(app)) == 1
        assert audit_rows(app)[-1].detail == "state used"


async def test_a_state_from_another_browser_is_refused(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, app):
        started = await start_launch(client, ehr)
        callback = await authorize(started.headers["location"])
        # The victim's callback URL replayed by another browser (no cb_browser cookie of its own).
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=APP_BASE) as other:
            await other.get("/launch", params={"iss": ehr.base_url, "launch": ehr.launch("p-2")})
            response = await finish(other, callback)
        assert response.status_code == 400
        assert "another browser" in page(response)
        assert session_rows(app) == []
        # The leaked state is burnt: the rightful browser cannot use it either now.
        assert (await finish(client, callback)).status_code == 400


async def test_a_code_cannot_be_redeemed_without_its_own_pkce_verifier(ehr: TestEhr, tmp_path: Path) -> None:
    """Code injection: a code issued for one authorize request, presented with another request's state
    (so with that request's verifier), is refused by the EHR and opens no session."""
    async with running_app(app_settings(tmp_path, ehr)) as (client, app):
        first = await start_launch(client, ehr)
        second = await start_launch(client, ehr)
        code = query_of(await authorize(first.headers["location"]))["code"]
        state = query_of(second.headers["location"])["state"]
        response = await client.get("/callback", params={"code": code, "state": state})
        assert response.status_code == 403
        assert "code_verifier does not match" in page(response)
        assert session_rows(app) == []
        assert ehr.token_requests[-1]["outcome"] == "invalid_grant"


async def test_a_callback_without_state_or_code_opens_nothing(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, app):
        assert (await client.get("/callback", params={"code": "c"})).status_code == 400
        started = await start_launch(client, ehr)
        state = query_of(started.headers["location"])["state"]
        assert (await client.get("/callback", params={"state": state})).status_code == 400
        assert session_rows(app) == []


async def test_an_ehr_that_denies_access_sends_the_user_back_with_a_message(
    ehr: TestEhr, tmp_path: Path
) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, app):
        started = await start_launch(client, ehr)
        state = query_of(started.headers["location"])["state"]
        response = await client.get(
            "/callback", params={"state": state, "error": "access_denied", "error_description": "<b>no</b>"}
        )
        assert response.status_code == 403
        assert "access_denied" in page(response) and "<b>no</b>" not in page(response)
        assert session_rows(app) == []


async def test_an_ehr_without_pkce_s256_is_refused(ehr: TestEhr, tmp_path: Path) -> None:
    ehr.smart_configuration_overrides["code_challenge_methods_supported"] = ["plain"]
    try:
        async with running_app(app_settings(tmp_path, ehr)) as (client, _app):
            response = await client.get("/launch", params={"iss": ehr.base_url, "launch": ehr.launch("p-1")})
        assert response.status_code == 502
        assert "S256" in page(response)
    finally:
        ehr.smart_configuration_overrides.clear()


async def test_a_grant_too_narrow_to_save_the_draft_is_refused(tmp_path: Path) -> None:
    with TestEhr(
        NO_FHIR, redirect_uris=[REDIRECT_URI], withheld_scopes=["patient/DocumentReference.c"]
    ) as ehr:
        async with running_app(app_settings(tmp_path, ehr)) as (client, app):
            started = await start_launch(client, ehr)
            response = await finish(client, await authorize(started.headers["location"]))
            assert response.status_code == 403
            assert "missing: DocumentReference.c" in page(response)
            assert session_rows(app) == []


async def test_the_review_screen_without_a_session_explains_how_to_launch(
    ehr: TestEhr, tmp_path: Path
) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, _app):
        response = await client.get("/review")
        assert response.status_code == 401
        assert "Open chartbrief again from the patient's chart" in page(response)
        stream = await client.get("/review/stream", params={"csrf_token": "x"})
        assert stream.status_code == 401


# -- confidential clients -------------------------------------------------------------------------


async def test_a_confidential_client_authenticates_with_its_secret(tmp_path: Path) -> None:
    secret = "s3cret-for-the-test-ehr-0123456789"
    with TestEhr(NO_FHIR, redirect_uris=[REDIRECT_URI], client_secret=secret) as ehr:
        settings = app_settings(tmp_path, ehr, smart={"client_secret": secret})
        async with running_app(settings) as (client, app):
            await launch_session(client, ehr, "p-3")
            assert ehr.token_requests[-1] == {
                "grant_type": "authorization_code",
                "client_auth": "client_secret_basic",
                "outcome": "ok",
            }
            assert len(session_rows(app)) == 1


async def test_a_client_with_a_private_key_authenticates_with_a_signed_assertion(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path = tmp_path / "client.pem"
    key_path.write_bytes(pem)
    from fhir_adapters.auth.oauth import SmartClient

    jwks = SmartClient("chartbrief", private_key_pem=pem.decode(), kid="k1").public_jwks()
    with TestEhr(NO_FHIR, redirect_uris=[REDIRECT_URI], client_jwks=jwks) as ehr:
        settings = app_settings(
            tmp_path, ehr, smart={"private_key_path": str(key_path), "private_key_kid": "k1"}
        )
        async with running_app(settings) as (client, app):
            await launch_session(client, ehr, "p-4")
            assert ehr.token_requests[-1]["client_auth"] == "private_key_jwt"
            assert ehr.token_requests[-1]["outcome"] == "ok"
            assert len(session_rows(app)) == 1


def test_an_unreadable_private_key_stops_the_app_with_the_setting_named(tmp_path: Path) -> None:
    from service.api import create_app

    settings = app_settings(tmp_path, smart={"private_key_path": str(tmp_path / "missing.pem")})
    with pytest.raises(ValueError, match="CHARTBRIEF_SMART__PRIVATE_KEY_PATH"):
        create_app(settings)
