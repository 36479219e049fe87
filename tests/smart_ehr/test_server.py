"""The SMART test EHR itself: discovery, authorize, token, and the patient-scoped FHIR proxy.

The browser test of the review screen relies on this server refusing what a real EHR refuses, so
every refusal is checked here. Most tests answer for the upstream FHIR server in-process
(httpx.MockTransport); the last ones run a whole launch against the real local FHIR server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc import jwk, jwt

from fhir_adapters.auth.launch import RefreshingToken, TokenSet, authorize_url, exchange_code, new_pkce
from fhir_adapters.auth.oauth import (
    CLIENT_ASSERTION_TYPE,
    SmartClient,
    SmartError,
    client_assertion,
    discover,
)
from fhir_adapters.auth.scopes import DEFAULT_SCOPES, STANDALONE_SCOPES
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirAuthError
from tests.smart_ehr.server import TestEhr, body_problem, scope_problem, search_problem

UPSTREAM = "http://upstream.test/fhir"
REDIRECT = "http://127.0.0.1:8000/callback"
CLIENT_ID = "chartbrief"


# -- an in-process upstream FHIR server ----------------------------------------------------------------


def observation(oid: str, patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient/{patient}"},
    }


def searchset(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "self", "url": f"{UPSTREAM}/Observation"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [{"fullUrl": f"{UPSTREAM}/{r['resourceType']}/{r['id']}", "resource": r} for r in resources],
    }


class FakeUpstream:
    """Answers like a FHIR server holding patients p1 and p2, and records what reached it."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.observations = [observation("o1", "p1"), observation("o2", "p2")]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        segments = [s for s in request.url.path.removeprefix("/fhir").split("/") if s]
        params = request.url.params
        if segments == ["metadata"]:
            return httpx.Response(200, json={"resourceType": "CapabilityStatement", "status": "active"})
        if len(segments) == 2 and segments[0] == "Patient" and request.method == "GET":
            return httpx.Response(200, json={"resourceType": "Patient", "id": segments[1]})
        if segments == ["Encounter", "e2"]:
            body = {"resourceType": "Encounter", "id": "e2", "subject": {"reference": "Patient/p2"}}
            return httpx.Response(200, json=body)
        if segments == ["Observation"]:
            wanted = params.get("patient")
            found = [o for o in self.observations if wanted in (None, o["subject"]["reference"][8:])]
            more = (
                f"{UPSTREAM}/Observation?patient={wanted}&page=2" if wanted and "page" not in params else None
            )
            return httpx.Response(200, json=searchset(found if "page" not in params else [], more))
        if not segments and request.method == "POST":
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "transaction-response"})
        if len(segments) == 2 and request.method == "PUT":
            headers = {"ETag": 'W/"2"', "Location": f"{UPSTREAM}/{segments[0]}/{segments[1]}/_history/2"}
            return httpx.Response(200, json=json.loads(request.content), headers=headers)
        return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def ehr(upstream: FakeUpstream) -> Iterator[TestEhr]:
    with TestEhr(UPSTREAM, upstream_transport=httpx.MockTransport(upstream)) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client_key_pem() -> str:
    return jwk.RSAKey.generate_key(2048).as_pem(private=True).decode()


# -- helpers: one authorize request, one whole launch ---------------------------------------------------


def authorize_params(ehr: TestEhr, **changes: str | None) -> tuple[dict[str, str], str]:
    verifier, challenge = new_pkce()
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT,
        "scope": DEFAULT_SCOPES,
        "state": "state-1",
        "aud": ehr.base_url,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v is not None}, verifier


def redirect_query(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def launch(
    http: httpx.AsyncClient,
    ehr: TestEhr,
    client: SmartClient | None = None,
    *,
    launch_id: str | None = None,
    scope: str = DEFAULT_SCOPES,
) -> TokenSet:
    """A whole SMART launch the way chartbrief does it: discover, authorize, exchange."""
    client = client or SmartClient(CLIENT_ID)
    config = await discover(http, ehr.base_url)
    verifier, challenge = new_pkce()
    url = authorize_url(
        config,
        client_id=client.client_id,
        redirect_uri=REDIRECT,
        scope=scope,
        state="s-1",
        aud=ehr.base_url,
        code_challenge=challenge,
        launch=launch_id,
    )
    query = redirect_query(await http.get(url))
    assert query["state"] == "s-1"
    return await exchange_code(
        http, config, client, code=query["code"], redirect_uri=REDIRECT, code_verifier=verifier
    )


async def code_and_verifier(http: httpx.AsyncClient, ehr: TestEhr) -> tuple[str, str]:
    params, verifier = authorize_params(ehr, launch=ehr.launch("p1"))
    return redirect_query(await http.get(ehr.authorize_url, params=params))["code"], verifier


async def token_call(http: httpx.AsyncClient, ehr: TestEhr, **form: str) -> httpx.Response:
    return await http.post(ehr.token_url, data=form)


# -- discovery -----------------------------------------------------------------------------------------


async def test_discovery_names_this_ehrs_endpoints_and_requires_s256(
    http: httpx.AsyncClient, ehr: TestEhr
) -> None:
    config = await discover(http, ehr.base_url)
    assert config.issuer == ehr.base_url
    assert (config.authorization_endpoint, config.token_endpoint) == (ehr.authorize_url, ehr.token_url)
    assert config.jwks_uri == ehr.jwks_url
    assert {"launch-ehr", "launch-standalone", "context-banner", "sso-openid-connect"} <= set(
        config.capabilities
    )
    assert config.code_challenge_methods_supported == ("S256",)
    assert (await http.get(ehr.jwks_url)).json() == ehr.jwks
    assert "d" not in ehr.jwks["keys"][0]


async def test_overrides_make_a_broken_ehr_for_the_apps_own_tests(
    http: httpx.AsyncClient, ehr: TestEhr
) -> None:
    ehr.smart_configuration_overrides["code_challenge_methods_supported"] = None
    with pytest.raises(SmartError, match="S256"):
        await discover(http, ehr.base_url)


# -- authorize -------------------------------------------------------------------------------------------


async def test_authorize_approves_an_ehr_launch_and_redirects_with_a_code_and_the_state(
    http: httpx.AsyncClient, ehr: TestEhr
) -> None:
    params, _ = authorize_params(ehr, launch=ehr.launch("p1"))
    query = redirect_query(await http.get(ehr.authorize_url, params=params))
    assert query["state"] == "state-1" and len(query["code"]) >= 32
    assert ehr.authorize_requests[-1]["aud"] == ehr.base_url


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"aud": "http://127.0.0.1:1/other-fhir"}, "invalid_request"),
        ({"launch": "never-issued"}, "invalid_request"),
        ({"launch": None}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": STANDALONE_SCOPES, "launch": "x"}, "invalid_scope"),
    ],
)
async def test_authorize_sends_an_error_back_to_the_app_for_a_bad_request(
    http: httpx.AsyncClient, ehr: TestEhr, changes: dict[str, str | None], error: str
) -> None:
    changes = {"launch": ehr.launch("p1"), **changes}
    params, _ = authorize_params(ehr, **changes)
    query = redirect_query(await http.get(ehr.authorize_url, params=params))
    assert query["error"] == error and "code" not in query
    assert query["state"] == "state-1"


async def test_authorize_never_redirects_to_an_unregistered_uri_or_for_an_unknown_client(
    http: httpx.AsyncClient, ehr: TestEhr
) -> None:
    for changes in ({"redirect_uri": "http://evil.example/callback"}, {"client_id": "someone-else"}):
        params, _ = authorize_params(ehr, launch=ehr.launch("p1"), **changes)
        response = await http.get(ehr.authorize_url, params=params)
        assert response.status_code == 400 and "location" not in response.headers


async def test_an_expired_launch_is_refused(http: httpx.AsyncClient, ehr: TestEhr) -> None:
    ehr.launch_lifetime = -1
    params, _ = authorize_params(ehr, launch=ehr.launch("p1"))
    assert redirect_query(await http.get(ehr.authorize_url, params=params))["error"] == "invalid_request"


async def test_a_standalone_launch_gets_the_selected_patient_and_is_denied_without_one(
    http: httpx.AsyncClient, ehr: TestEhr
) -> None:
    params, _ = authorize_params(ehr, scope=STANDALONE_SCOPES)
    assert redirect_query(await http.get(ehr.authorize_url, params=params))["error"] == "access_denied"
    ehr.select_patient("p2")
    tokens = await launch(http, ehr, scope=STANDALONE_SCOPES)
    assert tokens.patient == "p2" and tokens.encounter is None and tokens.need_patient_banner is True


# -- token -------------------------------------------------------------------------------------------------


async def test_an_ehr_launch_hands_over_its_context_a_verified_fhir_user_and_a_scoped_access_token(
    http: httpx.AsyncClient, ehr: TestEhr
) -> None:
    launch_id = ehr.launch(
        "p1", "e1", need_patient_banner=False, fhir_context=[{"reference": "Location/ward-3"}]
    )
    tokens = await launch(http, ehr, launch_id=launch_id)
    assert (tokens.patient, tokens.encounter, tokens.need_patient_banner) == ("p1", "e1", False)
    assert tokens.fhir_context == ({"reference": "Location/ward-3"},)
    assert tokens.fhir_user_reference == "Practitioner/dr-1"
    assert tokens.granted_scopes == frozenset(DEFAULT_SCOPES.split())
    assert tokens.refresh_token is not None
    assert 3500 < tokens.expires_at - time.time() <= 3600
    claims = jwt.decode(tokens.access_token, jwk.KeySet.import_key_set(ehr.jwks), algorithms=["RS384"]).claims
    assert (claims["patient"], claims["aud"], claims["iss"]) == ("p1", ehr.base_url, ehr.base_url)
    assert claims["scope"] == DEFAULT_SCOPES
    assert ehr.token_requests[-1] == {
        "grant_type": "authorization_code",
        "client_auth": "none",
        "outcome": "ok",
    }


async def test_withheld_scopes_are_not_granted_and_the_app_can_see_it(
    http: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    transport = httpx.MockTransport(upstream)
    with TestEhr(UPSTREAM, upstream_transport=transport, withheld_scopes=["patient/Provenance.c"]) as ehr:
        tokens = await launch(http, ehr, launch_id=ehr.launch("p1"))
    assert "patient/Provenance.c" not in tokens.granted_scopes
    assert "patient/DocumentReference.c" in tokens.granted_scopes


async def test_an_authorization_code_works_once_and_its_replay_revokes_the_refresh_token(
    http: httpx.AsyncClient, ehr: TestEhr
) -> None:
    code, verifier = await code_and_verifier(http, ehr)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
        "client_id": CLIENT_ID,
    }
    first = await token_call(http, ehr, **form)
    assert first.status_code == 200 and first.headers["cache-control"] == "no-store"
    replay = await token_call(http, ehr, **form)
    assert (replay.status_code, replay.json()["error"]) == (400, "invalid_grant")
    refresh = await token_call(
        http,
        ehr,
        grant_type="refresh_token",
        refresh_token=first.json()["refresh_token"],
        client_id=CLIENT_ID,
    )
    assert refresh.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"code_verifier": "x" * 64}, "invalid_grant"),
        ({"code_verifier": None}, "invalid_request"),
        ({"redirect_uri": "http://127.0.0.1:8000/other"}, "invalid_grant"),
        ({"code": "made-up"}, "invalid_grant"),
        ({"client_id": "someone-else"}, "invalid_client"),
        ({"grant_type": "password"}, "unsupported_grant_type"),
    ],
)
async def test_the_token_endpoint_refuses_a_bad_exchange(
    http: httpx.AsyncClient, ehr: TestEhr, change: dict[str, str | None], error: str
) -> None:
    code, verifier = await code_and_verifier(http, ehr)
    form: dict[str, str | None] = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
        "client_id": CLIENT_ID,
        **change,
    }
    response = await token_call(http, ehr, **{k: v for k, v in form.items() if v is not None})
    assert response.status_code in (400, 401)
    assert response.json()["error"] == error
    assert "access_token" not in response.json()


async def test_an_expired_code_is_refused(http: httpx.AsyncClient, ehr: TestEhr) -> None:
    ehr.code_lifetime = -1
    code, verifier = await code_and_verifier(http, ehr)
    response = await token_call(
        http,
        ehr,
        grant_type="authorization_code",
        code=code,
        redirect_uri=REDIRECT,
        code_verifier=verifier,
        client_id=CLIENT_ID,
    )
    assert response.json()["error"] == "invalid_grant"


async def test_refresh_rotates_the_refresh_token_keeps_the_context_and_cannot_widen_scope(
    http: httpx.AsyncClient, ehr: TestEhr
) -> None:
    tokens = await launch(http, ehr, launch_id=ehr.launch("p1", "e1"))
    first = await token_call(
        http, ehr, grant_type="refresh_token", refresh_token=tokens.refresh_token or "", client_id=CLIENT_ID
    )
    body = first.json()
    assert (body["patient"], body["encounter"]) == ("p1", "e1")
    assert body["refresh_token"] != tokens.refresh_token and body["access_token"] != tokens.access_token
    reused = await token_call(
        http, ehr, grant_type="refresh_token", refresh_token=tokens.refresh_token or "", client_id=CLIENT_ID
    )
    assert reused.json()["error"] == "invalid_grant"
    widened = await token_call(
        http,
        ehr,
        grant_type="refresh_token",
        refresh_token=body["refresh_token"],
        client_id=CLIENT_ID,
        scope="user/*.cruds",
    )
    assert widened.json()["error"] == "invalid_scope"


async def test_a_confidential_client_must_present_its_secret_with_basic_auth(
    http: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    transport = httpx.MockTransport(upstream)
    with TestEhr(UPSTREAM, upstream_transport=transport, client_secret="s3:cr/t+") as ehr:
        tokens = await launch(
            http, ehr, SmartClient(CLIENT_ID, client_secret="s3:cr/t+"), launch_id=ehr.launch("p1")
        )
        assert tokens.patient == "p1"
        assert ehr.token_requests[-1]["client_auth"] == "client_secret_basic"
        for client in (SmartClient(CLIENT_ID, client_secret="wrong"), SmartClient(CLIENT_ID)):
            with pytest.raises(SmartError) as caught:
                await launch(http, ehr, client, launch_id=ehr.launch("p1"))
            assert caught.value.oauth_error == "invalid_client"


async def test_a_private_key_jwt_client_is_accepted_once_per_assertion_and_only_with_its_key(
    http: httpx.AsyncClient, upstream: FakeUpstream, client_key_pem: str
) -> None:
    client = SmartClient(CLIENT_ID, private_key_pem=client_key_pem, kid="cb-1")
    transport = httpx.MockTransport(upstream)
    with TestEhr(UPSTREAM, upstream_transport=transport, client_jwks=client.public_jwks()) as ehr:
        tokens = await launch(http, ehr, client, launch_id=ehr.launch("p1"))
        assert tokens.patient == "p1" and ehr.token_requests[-1]["client_auth"] == "private_key_jwt"

        assertion = client_assertion(client, ehr.token_url, now=time.time())
        form = {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion}
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token or ""}
        assert (await token_call(http, ehr, **refresh, **form)).status_code == 200
        replayed = await token_call(http, ehr, **refresh, **form)
        assert replayed.json()["error"] == "invalid_client"

        stranger_pem = jwk.RSAKey.generate_key(2048).as_pem(private=True).decode()
        stranger = SmartClient(CLIENT_ID, private_key_pem=stranger_pem, kid="cb-1")
        with pytest.raises(SmartError) as caught:
            await launch(http, ehr, stranger, launch_id=ehr.launch("p1"))
        assert caught.value.oauth_error == "invalid_client"
        wrong_audience = client_assertion(client, "http://127.0.0.1:1/token", now=time.time())
        answer = await token_call(
            http, ehr, **refresh, client_assertion_type=CLIENT_ASSERTION_TYPE, client_assertion=wrong_audience
        )
        assert answer.json()["error"] == "invalid_client"


# -- the FHIR proxy ---------------------------------------------------------------------------------------


async def fhir_get(http: httpx.AsyncClient, ehr: TestEhr, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await http.get(f"{ehr.base_url}/{path}", headers=headers)


async def test_the_proxy_refuses_a_missing_expired_foreign_or_wrong_audience_token_with_401(
    http: httpx.AsyncClient, ehr: TestEhr, upstream: FakeUpstream
) -> None:
    other_key = jwk.RSAKey.generate_key(2048, auto_kid=True)
    forged = jwt.encode(
        {"alg": "RS384", "kid": ehr.signing_key.kid},
        {"iss": ehr.base_url, "aud": ehr.base_url, "exp": int(time.time()) + 60, "scope": "user/*.rs"},
        other_key,
        algorithms=["RS384"],
    )
    for token in (
        None,
        ehr.issue_token(patient="p1", expires_in=-10),
        ehr.issue_token(patient="p1", audience="http://127.0.0.1:1/fhir"),
        forged,
        "not-a-jwt",
    ):
        response = await fhir_get(http, ehr, "Patient/p1", token)
        assert response.status_code == 401
        assert response.json()["resourceType"] == "OperationOutcome"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert upstream.requests == []


async def test_the_capability_statement_is_public(http: httpx.AsyncClient, ehr: TestEhr) -> None:
    response = await fhir_get(http, ehr, "metadata", None)
    assert response.json()["resourceType"] == "CapabilityStatement"


async def test_a_patient_token_reads_its_patient_and_the_upstream_never_sees_the_token(
    http: httpx.AsyncClient, ehr: TestEhr, upstream: FakeUpstream
) -> None:
    response = await fhir_get(http, ehr, "Patient/p1", ehr.issue_token(patient="p1"))
    assert response.status_code == 200 and response.json()["id"] == "p1"
    assert "authorization" not in upstream.requests[-1].headers


@pytest.mark.parametrize(
    "path",
    [
        "Patient/p2",
        "Patient/p2/_history/1",
        "Observation?patient=p2",
        "Observation?subject=Patient/p2",
        "Observation?patient=p1,p2",
        "Observation?subject:Group=g1",
        "Patient?_id=p2",
    ],
)
async def test_a_patient_token_cannot_ask_for_another_patient(
    http: httpx.AsyncClient, ehr: TestEhr, upstream: FakeUpstream, path: str
) -> None:
    response = await fhir_get(http, ehr, path, ehr.issue_token(patient="p1"))
    assert response.status_code == 403
    assert response.json()["issue"][0]["code"] == "forbidden"
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["Observation", "Encounter/e2"])
async def test_a_patient_token_never_receives_another_patients_data_it_did_not_name(
    http: httpx.AsyncClient, ehr: TestEhr, path: str
) -> None:
    response = await fhir_get(http, ehr, path, ehr.issue_token(patient="p1"))
    assert response.status_code == 403
    assert "p2" not in response.text.replace("another patient", "")


async def test_a_user_level_token_is_not_limited_to_one_patient(
    http: httpx.AsyncClient, ehr: TestEhr
) -> None:
    token = ehr.issue_token(scope="openid fhirUser user/*.rs")
    assert (await fhir_get(http, ehr, "Patient/p2", token)).status_code == 200
    assert (await fhir_get(http, ehr, "Observation", token)).status_code == 200


async def test_patient_scopes_without_a_patient_in_context_are_refused(
    http: httpx.AsyncClient, ehr: TestEhr
) -> None:
    assert (await fhir_get(http, ehr, "Observation", ehr.issue_token(patient=None))).status_code == 403


async def test_the_proxy_rewrites_upstream_links_so_a_fhir_client_can_page_through_it(
    ehr: TestEhr, upstream: FakeUpstream
) -> None:
    async with FhirClient(ehr.base_url, auth=_Static(ehr.issue_token(patient="p1"))) as client:
        found = await client.search_all("Observation", {"patient": "p1"})
    assert [o["id"] for o in found] == ["o1"]
    assert [r.url.params.get("page") for r in upstream.requests] == [None, "2"]


async def test_writes_are_checked_for_the_patient_too(
    http: httpx.AsyncClient, ehr: TestEhr, upstream: FakeUpstream
) -> None:
    headers = {
        "Authorization": f"Bearer {ehr.issue_token(patient='p1')}",
        "Content-Type": "application/fhir+json",
    }

    def transaction(patient: str) -> dict[str, Any]:
        doc = {
            "resourceType": "DocumentReference",
            "status": "current",
            "subject": {"reference": f"Patient/{patient}"},
        }
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": doc, "request": {"method": "POST", "url": "DocumentReference"}}],
        }

    refused = await http.post(ehr.base_url, json=transaction("p2"), headers=headers)
    assert refused.status_code == 403 and upstream.requests == []
    accepted = await http.post(ehr.base_url, json=transaction("p1"), headers=headers)
    assert accepted.status_code == 200 and upstream.requests[-1].url == httpx.URL(UPSTREAM)

    doc = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "subject": {"reference": f"{ehr.base_url}/Patient/p1"},
    }
    put = await http.put(
        f"{ehr.base_url}/DocumentReference/d1", json=doc, headers={**headers, "If-Match": 'W/"1"'}
    )
    assert put.status_code == 200
    sent = upstream.requests[-1]
    assert sent.headers["if-match"] == 'W/"1"'
    assert json.loads(sent.content)["subject"]["reference"] == f"{UPSTREAM}/Patient/p1"
    assert put.headers["location"].startswith(ehr.base_url + "/DocumentReference/d1")
    assert put.headers["etag"] == 'W/"2"'


async def test_with_scope_enforcement_each_interaction_needs_a_granting_scope(
    http: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    transport = httpx.MockTransport(upstream)
    with TestEhr(UPSTREAM, upstream_transport=transport, enforce_scopes=True) as ehr:
        token = ehr.issue_token(patient="p1", scope="patient/Observation.rs patient/DocumentReference.c")
        headers = {"Authorization": f"Bearer {token}"}
        assert (await fhir_get(http, ehr, "Observation?patient=p1", token)).status_code == 200
        assert (await fhir_get(http, ehr, "Patient/p1", token)).status_code == 403
        doc = {"resourceType": "DocumentReference", "id": "d1", "subject": {"reference": "Patient/p1"}}
        put = await http.put(f"{ehr.base_url}/DocumentReference/d1", json=doc, headers=headers)
        assert put.status_code == 403 and "'u' on DocumentReference" in put.text


def test_the_pure_compartment_and_scope_checks_agree_with_the_smart_rules() -> None:
    assert search_problem("Observation", [("patient", "Patient/p1"), ("code", "x")], "p1") is None
    assert search_problem("Observation", [("patient", "http://h/fhir/Patient/p1")], "p1") is None
    entry = {"request": {"method": "PUT", "url": "Patient/p2"}, "resource": {"resourceType": "Patient"}}
    assert body_problem({"resourceType": "Bundle", "entry": [entry]}, "p1") == "Patient/p2 is another patient"
    bundle = {
        "resourceType": "Bundle",
        "entry": [
            {"request": {"method": "POST", "url": "DocumentReference"}},
            {"request": {"method": "PUT", "url": "Provenance/x"}},
        ],
    }
    narrow = DEFAULT_SCOPES.split()
    assert scope_problem(narrow, "POST", [], bundle) == "no granted scope allows 'u' on Provenance"
    assert scope_problem([*narrow, "patient/Provenance.u"], "POST", [], bundle) is None
    assert scope_problem(["patient/DocumentReference.read"], "GET", ["Binary", "b1"], None) is None
    assert scope_problem(["patient/*.read"], "DELETE", ["Observation", "o1"], None) is not None


async def test_the_server_stops_listening_when_the_block_ends(upstream: FakeUpstream) -> None:
    with TestEhr(UPSTREAM, upstream_transport=httpx.MockTransport(upstream)) as ehr:
        url = ehr.jwks_url
    async with httpx.AsyncClient(timeout=2) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(url)


class _Static:
    """A fixed bearer token for FhirClient (the product's StaticToken strips nothing we need here)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token

    async def invalidate(self) -> None:
        return None


# -- against the real local FHIR server ---------------------------------------------------------------------


def _patient(family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "active": True, "name": [{"family": family, "given": ["Test"]}]}


def _vital(patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2024-01-01T10:00:00Z",
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }


@pytest.fixture(scope="module")
def two_patients(fhir_base: str) -> tuple[str, str]:  # noqa: F811 - the imported session fixture
    async def create() -> tuple[str, str]:
        async with FhirClient(fhir_base) as client:
            ids = []
            for family in ("Smartlaunch", "Otherpatient"):
                patient = await client.create(_patient(family))
                await client.create(_vital(patient["id"]))
                ids.append(patient["id"])
            return ids[0], ids[1]

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(create())
    finally:
        loop.close()


@pytest.mark.integration
async def test_a_whole_ehr_launch_reads_its_patient_through_the_proxy_refreshes_and_is_kept_to_it(
    fhir_base: str,  # noqa: F811 - the imported session fixture
    two_patients: tuple[str, str],
    http: httpx.AsyncClient,
) -> None:
    mine, other = two_patients
    with TestEhr(fhir_base, access_token_lifetime=30) as ehr:
        config = await discover(http, ehr.base_url)
        tokens = await launch(http, ehr, launch_id=ehr.launch(mine))
        stored: list[TokenSet] = []
        # 30 s lifetime < the 60 s refresh margin: every token() call refreshes first.
        provider = RefreshingToken(http, config, SmartClient(CLIENT_ID), tokens, on_refresh=stored.append)
        async with FhirClient(ehr.base_url, http=http, auth=provider) as client:
            patient = await client.read("Patient", mine)
            vitals = await client.search_all("Observation", {"patient": mine})
            with pytest.raises(FhirAuthError) as caught:
                await client.read("Patient", other)
    assert patient["id"] == mine
    assert [v["subject"]["reference"] for v in vitals] == [f"Patient/{mine}"]
    assert caught.value.status == 403
    assert stored and stored[-1].patient == mine
    grants = [r["grant_type"] for r in ehr.token_requests]
    assert grants[0] == "authorization_code" and "refresh_token" in grants[1:]


@pytest.mark.integration
async def test_a_standalone_launch_works_against_the_real_server(
    fhir_base: str,  # noqa: F811 - the imported session fixture
    two_patients: tuple[str, str],
    http: httpx.AsyncClient,
) -> None:
    _, other = two_patients
    with TestEhr(fhir_base) as ehr:
        ehr.select_patient(other)
        tokens = await launch(http, ehr, scope=STANDALONE_SCOPES)
        response = await http.get(
            f"{ehr.base_url}/Patient/{other}", headers={"Authorization": f"Bearer {tokens.access_token}"}
        )
    assert response.status_code == 200 and response.json()["id"] == other
