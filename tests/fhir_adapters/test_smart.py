"""The SMART App Launch client against an authorization server mocked at the transport (respx)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

import httpx
import pytest
import respx
from joserfc import jwk, jwt
from structlog.testing import capture_logs

from fhir_adapters.auth import TokenProvider
from fhir_adapters.auth.launch import (
    RefreshingToken,
    TokenSet,
    authorize_url,
    exchange_code,
    new_pkce,
    parse_token_response,
    refresh_tokens,
)
from fhir_adapters.auth.oauth import (
    CLIENT_ASSERTION_TYPE,
    JWKS_MAX_AGE_SECONDS,
    JwksCache,
    SmartClient,
    SmartConfiguration,
    SmartError,
    discover,
    jwks_cache,
    parse_smart_configuration,
    verified_id_token_claims,
)
from fhir_adapters.auth.scopes import DEFAULT_SCOPES, STANDALONE_SCOPES
from fhir_adapters.client import FhirClient

EHR = "http://127.0.0.1:8999"
ISS = f"{EHR}/fhir"
TOKEN_URL = f"{EHR}/token"
JWKS_URL = f"{EHR}/jwks"
REDIRECT = "http://127.0.0.1:8000/callback"
CLIENT_ID = "chartbrief"
WELL_KNOWN = {
    "issuer": ISS,
    "jwks_uri": JWKS_URL,
    "authorization_endpoint": f"{EHR}/authorize",
    "token_endpoint": TOKEN_URL,
    "capabilities": ["launch-ehr", "launch-standalone", "client-public", "sso-openid-connect"],
    "code_challenge_methods_supported": ["S256"],
}
SECRET_LOOKING = ("at-SECRET", "rt-SECRET", "code-SECRET", "verifier-SECRET")


@pytest.fixture(scope="module")
def ehr_key() -> jwk.RSAKey:
    return jwk.RSAKey.generate_key(2048, auto_kid=True)


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return jwk.RSAKey.generate_key(2048).as_pem(private=True).decode()


@pytest.fixture(scope="module")
def ec_pem() -> str:
    return jwk.ECKey.generate_key("P-384").as_pem(private=True).decode()


def config() -> SmartConfiguration:
    return parse_smart_configuration(WELL_KNOWN, ISS)


def public_jwks(key: jwk.Key) -> dict[str, Any]:
    return {"keys": [key.as_dict(private=False)]}


def id_token(key: jwk.Key, alg: str = "RS384", **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISS,
        "sub": "dr-1",
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 600,
        "fhirUser": f"{ISS}/Practitioner/dr-1",
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    header = {"alg": alg, "kid": key.kid} if key.kid else {"alg": alg}
    return jwt.encode(header, claims, key, algorithms=[alg])


def token_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": "at-SECRET",
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": DEFAULT_SCOPES,
        "refresh_token": "rt-SECRET",
        "patient": "p1",
        "encounter": "e1",
        "fhirContext": [{"reference": "Encounter/e1"}],
        "need_patient_banner": False,
        "smart_style_url": f"{EHR}/style.json",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def token_set(**overrides: Any) -> TokenSet:
    values: dict[str, Any] = {
        "access_token": "at-1",
        "token_type": "Bearer",
        "expires_at": time.time() + 3600,
        "scope": DEFAULT_SCOPES,
        "refresh_token": "rt-1",
        "id_token": None,
        "patient": "p1",
        "encounter": "e1",
        "fhir_context": (),
        "need_patient_banner": True,
        "fhir_user": f"{ISS}/Practitioner/dr-1",
        "raw_claims": {},
    }
    values.update(overrides)
    return TokenSet(**values)


def form_of(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


async def exchange(http: httpx.AsyncClient, client: SmartClient | None = None) -> TokenSet:
    return await exchange_code(
        http,
        config(),
        client or SmartClient(CLIENT_ID),
        code="code-SECRET",
        redirect_uri=REDIRECT,
        code_verifier="verifier-SECRET",
    )


# -- discovery ------------------------------------------------------------------------------------


@respx.mock
async def test_discover_reads_the_well_known_document_with_json_accept() -> None:
    route = respx.get(f"{ISS}/.well-known/smart-configuration").respond(200, json=WELL_KNOWN)
    async with httpx.AsyncClient() as http:
        found = await discover(http, ISS + "/")
    assert route.calls.last.request.headers["accept"] == "application/json"
    assert found.token_endpoint == TOKEN_URL
    assert found.authorization_endpoint == f"{EHR}/authorize"
    assert found.jwks_uri == JWKS_URL and found.issuer == ISS
    assert found.supports("launch-ehr") and not found.supports("client-confidential-asymmetric")
    assert found.code_challenge_methods_supported == ("S256",)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"code_challenge_methods_supported": ["plain"]}, "S256"),
        ({"code_challenge_methods_supported": None}, "S256"),
        ({"token_endpoint": None}, "token_endpoint"),
        ({"authorization_endpoint": ""}, "authorization_endpoint"),
        ({"token_endpoint": "http://ehr.example.org/token"}, "https"),
        ({"token_endpoint": "/token"}, "absolute"),
    ],
)
@respx.mock
async def test_discover_refuses_an_ehr_that_cannot_launch_safely(change: dict[str, Any], named: str) -> None:
    body = {k: v for k, v in {**WELL_KNOWN, **change}.items() if v is not None}
    respx.get(f"{ISS}/.well-known/smart-configuration").respond(200, json=body)
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match=named):
            await discover(http, ISS)


@respx.mock
async def test_discover_accepts_plain_http_off_loopback_only_when_allowed() -> None:
    iss = "http://ehr.example.org/fhir"
    body = {**WELL_KNOWN, "token_endpoint": "http://ehr.example.org/token", "jwks_uri": None}
    respx.get(f"{iss}/.well-known/smart-configuration").respond(200, json=body)
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match="https"):
            await discover(http, iss)
        found = await discover(http, iss, allow_http=True)
    assert found.token_endpoint == "http://ehr.example.org/token" and found.jwks_uri is None


@pytest.mark.parametrize(
    ("response", "named"),
    [
        (httpx.Response(404), "HTTP 404"),
        (httpx.Response(200, text="<html>"), "not JSON"),
        (httpx.Response(200, json=["a list"]), "not a JSON object"),
        (httpx.ConnectError("refused"), "ConnectError"),
    ],
)
@respx.mock
async def test_discover_turns_every_failure_into_a_smart_error(response: Any, named: str) -> None:
    respx.get(f"{ISS}/.well-known/smart-configuration").mock(side_effect=[response])
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match=named):
            await discover(http, ISS)


# -- PKCE and the authorize URL ---------------------------------------------------------------------


def test_new_pkce_gives_an_rfc7636_verifier_and_its_s256_challenge() -> None:
    verifier, challenge = new_pkce()
    assert 43 <= len(verifier) <= 128
    assert all(c.isalnum() or c in "-._~" for c in verifier)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    assert challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert new_pkce()[0] != verifier


def test_authorize_url_carries_every_smart_parameter() -> None:
    url = authorize_url(
        config(),
        client_id=CLIENT_ID,
        redirect_uri=REDIRECT,
        scope=DEFAULT_SCOPES,
        state="st",
        aud=ISS,
        code_challenge="ch",
        launch="L1",
    )
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{EHR}/authorize"
    assert query == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT,
        "scope": DEFAULT_SCOPES,
        "state": "st",
        "aud": ISS,
        "code_challenge": "ch",
        "code_challenge_method": "S256",
        "launch": "L1",
    }


def test_authorize_url_for_a_standalone_launch_has_no_launch_and_keeps_the_endpoint_query() -> None:
    endpoint = f"{EHR}/authorize?tenant=t1"
    cfg = parse_smart_configuration({**WELL_KNOWN, "authorization_endpoint": endpoint}, ISS)
    url = authorize_url(
        cfg,
        client_id=CLIENT_ID,
        redirect_uri=REDIRECT,
        scope=STANDALONE_SCOPES.split(),
        state="st",
        aud=ISS,
        code_challenge="ch",
        launch=None,
    )
    query = parse_qs(urlsplit(url).query)
    assert "launch" not in query
    assert query["tenant"] == ["t1"]
    assert query["scope"] == [STANDALONE_SCOPES]


def test_an_ehr_launch_needs_the_launch_scope_and_every_parameter() -> None:
    common: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT,
        "state": "st",
        "aud": ISS,
        "code_challenge": "ch",
    }
    with pytest.raises(ValueError, match="launch"):
        authorize_url(config(), scope=STANDALONE_SCOPES, launch="L1", **common)
    with pytest.raises(ValueError, match="state"):
        authorize_url(config(), scope=DEFAULT_SCOPES, launch="L1", **{**common, "state": ""})


def test_the_standalone_scopes_differ_from_the_launch_scopes_only_by_launch_patient() -> None:
    launch, standalone = DEFAULT_SCOPES.split(), STANDALONE_SCOPES.split()
    assert set(launch) - set(standalone) == {"launch"}
    assert set(standalone) - set(launch) == {"launch/patient"}
    assert {"openid", "fhirUser", "patient/Patient.rs", "patient/DocumentReference.c"} <= set(launch)
    assert not any(s.startswith(("user/", "system/")) or s.endswith(".cruds") for s in launch)


# -- client authentication ----------------------------------------------------------------------------


@respx.mock
async def test_a_public_client_sends_its_client_id_and_the_pkce_verifier_in_the_form() -> None:
    route = respx.post(TOKEN_URL).respond(200, json=token_body())
    async with httpx.AsyncClient() as http:
        await exchange(http)
    request = route.calls.last.request
    assert "authorization" not in request.headers
    assert form_of(request) == {
        "grant_type": "authorization_code",
        "code": "code-SECRET",
        "redirect_uri": REDIRECT,
        "code_verifier": "verifier-SECRET",
        "client_id": CLIENT_ID,
    }


@respx.mock
async def test_a_confidential_client_authenticates_with_basic_and_form_encoded_credentials() -> None:
    route = respx.post(TOKEN_URL).respond(200, json=token_body())
    client = SmartClient("chart brief", client_secret="s3:cr/t+")
    async with httpx.AsyncClient() as http:
        await exchange(http, client)
    request = route.calls.last.request
    scheme, _, encoded = request.headers["authorization"].partition(" ")
    raw_id, _, raw_secret = base64.b64decode(encoded).decode().partition(":")
    assert scheme == "Basic"
    assert (unquote_plus(raw_id), unquote_plus(raw_secret)) == ("chart brief", "s3:cr/t+")
    assert "client_id" not in form_of(request) and "client_secret" not in form_of(request)


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
@respx.mock
async def test_private_key_jwt_sends_a_short_lived_unique_assertion_for_the_token_endpoint(
    alg: str, rsa_pem: str, ec_pem: str
) -> None:
    client = SmartClient(CLIENT_ID, private_key_pem=rsa_pem if alg == "RS384" else ec_pem, kid="k1", alg=alg)
    route = respx.post(TOKEN_URL).respond(200, json=token_body())
    async with httpx.AsyncClient() as http:
        await exchange(http, client)
        await exchange(http, client)
    keys = jwk.KeySet.import_key_set(client.public_jwks())
    forms = [form_of(call.request) for call in route.calls]
    decoded = [jwt.decode(f["client_assertion"], keys, algorithms=[alg]) for f in forms]
    for form, token in zip(forms, decoded, strict=True):
        assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
        assert token.header == {"alg": alg, "kid": "k1", "typ": "JWT"}
        claims = token.claims
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert claims["aud"] == TOKEN_URL
        assert 0 < claims["exp"] - time.time() <= 300
    assert decoded[0].claims["jti"] != decoded[1].claims["jti"]
    assert all("authorization" not in call.request.headers for call in route.calls)


def test_smart_client_never_shows_its_secret_or_key(rsa_pem: str) -> None:
    with_secret = SmartClient(CLIENT_ID, client_secret="hunter2-secret")
    with_key = SmartClient(CLIENT_ID, private_key_pem=rsa_pem)
    assert "hunter2" not in repr(with_secret) and "client_secret_basic" in repr(with_secret)
    assert "PRIVATE" not in repr(with_key) and "private_key_jwt" in repr(with_key)
    assert SmartClient(CLIENT_ID).auth_method == "none"
    assert "d" not in with_key.public_jwks()["keys"][0]  # the private exponent never leaves


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"client_secret": "s", "private_key_pem": "x"}, "not both"),
        ({"private_key_pem": "not a pem"}, "PEM"),
        ({"private_key_pem": "RSA", "alg": "HS256"}, "alg"),
        ({"client_secret": ""}, "empty"),
    ],
)
def test_smart_client_refuses_a_configuration_it_cannot_use(
    kwargs: dict[str, Any], named: str, rsa_pem: str
) -> None:
    if kwargs.get("private_key_pem") == "RSA":
        kwargs = {**kwargs, "private_key_pem": rsa_pem}
    with pytest.raises(ValueError, match=named):
        SmartClient(CLIENT_ID, **kwargs)


def test_smart_client_refuses_a_public_key_for_signing() -> None:
    public_pem = jwk.RSAKey.generate_key(2048).as_pem(private=False).decode()
    with pytest.raises(ValueError, match="public key"):
        SmartClient(CLIENT_ID, private_key_pem=public_pem)


# -- the token exchange --------------------------------------------------------------------------------


@respx.mock
async def test_exchange_code_returns_the_launch_context_and_the_verified_fhir_user(
    ehr_key: jwk.RSAKey,
) -> None:
    respx.post(TOKEN_URL).respond(200, json=token_body(id_token=id_token(ehr_key)))
    respx.get(JWKS_URL).respond(200, json=public_jwks(ehr_key))
    before = time.time()
    async with httpx.AsyncClient() as http:
        tokens = await exchange(http)
    assert tokens.access_token == "at-SECRET" and tokens.refresh_token == "rt-SECRET"
    assert before + 3600 <= tokens.expires_at <= time.time() + 3600
    assert (tokens.patient, tokens.encounter) == ("p1", "e1")
    assert tokens.fhir_context == ({"reference": "Encounter/e1"},)
    assert tokens.need_patient_banner is False
    assert tokens.fhir_user == f"{ISS}/Practitioner/dr-1"
    assert tokens.fhir_user_reference == "Practitioner/dr-1"
    assert tokens.granted_scopes == frozenset(DEFAULT_SCOPES.split())
    assert tokens.raw_claims["smart_style_url"] == f"{EHR}/style.json"
    assert not set(tokens.raw_claims) & {"access_token", "refresh_token", "id_token"}


@pytest.mark.parametrize(
    ("claims", "named"),
    [
        ({"aud": "someone-else"}, "InvalidClaimError"),
        ({"iss": "http://evil.example/fhir"}, "InvalidClaimError"),
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"sub": None}, "sub"),
    ],
)
@respx.mock
async def test_exchange_code_refuses_an_id_token_with_wrong_claims(
    claims: dict[str, Any], named: str, ehr_key: jwk.RSAKey
) -> None:
    respx.post(TOKEN_URL).respond(200, json=token_body(id_token=id_token(ehr_key, **claims)))
    respx.get(JWKS_URL).respond(200, json=public_jwks(ehr_key))
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match=named):
            await exchange(http)


@respx.mock
async def test_exchange_code_refuses_an_id_token_signed_by_another_key(ehr_key: jwk.RSAKey) -> None:
    impostor = jwk.RSAKey.generate_key(2048, parameters={"kid": ehr_key.kid})
    respx.post(TOKEN_URL).respond(200, json=token_body(id_token=id_token(impostor)))
    respx.get(JWKS_URL).respond(200, json=public_jwks(ehr_key))
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match="BadSignature"):
            await exchange(http)


@respx.mock
async def test_exchange_code_refuses_an_hmac_signed_id_token(ehr_key: jwk.RSAKey) -> None:
    # Same kid as the EHR's key: the HS256 "signature" would check out if HMAC were accepted
    # with the public key as the shared secret.
    hmac_key = jwk.OctKey.import_key("a-shared-secret-that-is-long-enough-for-hs256", {"kid": ehr_key.kid})
    respx.post(TOKEN_URL).respond(200, json=token_body(id_token=id_token(hmac_key, alg="HS256")))
    respx.get(JWKS_URL).respond(200, json=public_jwks(ehr_key))
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match="did not verify"):
            await exchange(http)


@respx.mock
async def test_an_id_token_cannot_be_believed_without_the_servers_jwks_uri(ehr_key: jwk.RSAKey) -> None:
    respx.post(TOKEN_URL).respond(200, json=token_body(id_token=id_token(ehr_key)))
    cfg = parse_smart_configuration({**WELL_KNOWN, "jwks_uri": None}, ISS)
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match="jwks_uri"):
            await exchange_code(
                http, cfg, SmartClient(CLIENT_ID), code="c", redirect_uri=REDIRECT, code_verifier="v"
            )


@respx.mock
async def test_a_refused_exchange_names_the_oauth_error_and_never_the_code_or_verifier() -> None:
    respx.post(TOKEN_URL).respond(400, json={"error": "invalid_grant", "error_description": "code expired"})
    async with httpx.AsyncClient() as http:
        with capture_logs() as logs, pytest.raises(SmartError) as caught:
            await exchange(http)
    assert caught.value.oauth_error == "invalid_grant"
    assert "invalid_grant" in str(caught.value) and "code expired" in str(caught.value)
    shown = str(caught.value) + json.dumps(logs, default=str)
    assert not any(secret in shown for secret in SECRET_LOOKING)


@respx.mock
async def test_an_unreachable_token_endpoint_is_a_smart_error() -> None:
    respx.post(TOKEN_URL).mock(side_effect=httpx.ConnectTimeout("slow"))
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match="could not be reached") as caught:
            await exchange(http)
    assert caught.value.oauth_error is None


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"access_token": None}, "access_token"),
        ({"token_type": "DPoP"}, "token_type"),
        ({"scope": None}, "scope"),
        ({"patient": "../Patient/p2"}, "patient"),
        ({"encounter": 12}, "encounter"),
        ({"expires_in": "soon"}, "expires_in"),
        ({"need_patient_banner": "yes"}, "need_patient_banner"),
        ({"fhirContext": {"reference": "Encounter/e1"}}, "fhirContext"),
    ],
)
def test_a_token_response_that_breaks_the_smart_rules_is_refused(change: dict[str, Any], named: str) -> None:
    with pytest.raises(SmartError, match=named) as caught:
        parse_token_response(token_body(**change), now=0.0)
    assert not any(secret in str(caught.value) for secret in SECRET_LOOKING)


def test_a_token_response_without_banner_or_expiry_is_read_conservatively() -> None:
    body = token_body(expires_in=None)
    body.pop("need_patient_banner")
    tokens = parse_token_response({**body, "token_type": "bearer"}, now=1000.0)
    assert tokens.need_patient_banner is True
    assert tokens.expires_at == 1300.0
    assert tokens.token_type == "Bearer"


# -- TokenSet ------------------------------------------------------------------------------------------


def test_token_set_repr_hides_every_token_and_round_trips_through_a_dict() -> None:
    tokens = token_set(access_token="at-SECRET", refresh_token="rt-SECRET", id_token="id-SECRET")
    for shown in (repr(tokens), str(tokens)):
        assert "SECRET" not in shown and "p1" in shown
    stored = json.loads(json.dumps(tokens.to_dict()))
    assert TokenSet.from_dict(stored) == tokens
    with pytest.raises(ValueError, match="access_token"):
        TokenSet.from_dict({k: v for k, v in stored.items() if k != "access_token"})


def test_needs_refresh_when_less_than_a_minute_is_left() -> None:
    tokens = token_set(expires_at=1000.0)
    assert not tokens.needs_refresh(now=939.0)
    assert tokens.needs_refresh(now=941.0)


# -- refresh -------------------------------------------------------------------------------------------


@respx.mock
async def test_refresh_keeps_the_launch_context_and_the_refresh_token_the_server_left_out() -> None:
    route = respx.post(TOKEN_URL).respond(
        200, json={"access_token": "at-2", "token_type": "Bearer", "expires_in": 600, "scope": "openid"}
    )
    old = token_set(fhir_context=({"reference": "Encounter/e1"},), need_patient_banner=False)
    async with httpx.AsyncClient() as http:
        new = await refresh_tokens(http, config(), SmartClient(CLIENT_ID), old)
    assert form_of(route.calls.last.request) == {
        "grant_type": "refresh_token",
        "refresh_token": "rt-1",
        "client_id": CLIENT_ID,
    }
    assert new.access_token == "at-2" and new.refresh_token == "rt-1"
    assert (new.patient, new.encounter, new.fhir_context) == ("p1", "e1", ({"reference": "Encounter/e1"},))
    assert new.need_patient_banner is False and new.fhir_user == old.fhir_user
    assert new.scope == "openid"


@respx.mock
async def test_a_refresh_that_names_another_patient_is_refused() -> None:
    respx.post(TOKEN_URL).respond(200, json=token_body(access_token="at-2", patient="p2"))
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match="another patient"):
            await refresh_tokens(http, config(), SmartClient(CLIENT_ID), token_set())


async def test_a_session_without_refresh_token_cannot_refresh() -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match="launch the app again"):
            await refresh_tokens(http, config(), SmartClient(CLIENT_ID), token_set(refresh_token=None))


# -- RefreshingToken -----------------------------------------------------------------------------------


def refreshed(count: list[int]) -> Any:
    async def answer(request: httpx.Request) -> httpx.Response:
        count.append(1)
        await asyncio.sleep(0.01)  # a real server takes a while: concurrent callers pile up meanwhile
        return httpx.Response(
            200,
            json={
                "access_token": f"at-{len(count) + 1}",
                "token_type": "Bearer",
                "expires_in": 3600,
                "scope": DEFAULT_SCOPES,
                "refresh_token": f"rt-{len(count) + 1}",
            },
        )

    return answer


@respx.mock
async def test_refreshing_token_is_a_token_provider_that_keeps_a_fresh_token_as_is() -> None:
    route = respx.post(TOKEN_URL)
    async with httpx.AsyncClient() as http:
        provider = RefreshingToken(http, config(), SmartClient(CLIENT_ID), token_set())
        assert isinstance(provider, TokenProvider)
        assert await provider.token() == "at-1"
    assert not route.called
    assert "at-1" not in repr(provider)


@respx.mock
async def test_refreshing_token_refreshes_under_a_minute_before_expiry_and_reports_the_new_set() -> None:
    calls: list[int] = []
    respx.post(TOKEN_URL).mock(side_effect=refreshed(calls))
    stored: list[TokenSet] = []

    async def store(tokens: TokenSet) -> None:
        stored.append(tokens)

    now = 10_000.0
    async with httpx.AsyncClient() as http:
        provider = RefreshingToken(
            http,
            config(),
            SmartClient(CLIENT_ID),
            token_set(expires_at=now + 59),
            on_refresh=store,
            clock=lambda: now,
        )
        assert await provider.token() == "at-2"
    assert len(calls) == 1
    assert [t.access_token for t in stored] == ["at-2"]
    assert provider.token_set.refresh_token == "rt-2" and provider.token_set.patient == "p1"


@respx.mock
async def test_concurrent_requests_share_one_refresh() -> None:
    calls: list[int] = []
    respx.post(TOKEN_URL).mock(side_effect=refreshed(calls))
    stored: list[TokenSet] = []
    async with httpx.AsyncClient() as http:
        provider = RefreshingToken(
            http, config(), SmartClient(CLIENT_ID), token_set(expires_at=0.0), on_refresh=stored.append
        )
        tokens = await asyncio.gather(*(provider.token() for _ in range(5)))
    assert tokens == ["at-2"] * 5
    assert len(calls) == 1 and len(stored) == 1


@respx.mock
async def test_a_401_from_the_fhir_server_makes_the_client_retry_with_a_refreshed_token() -> None:
    calls: list[int] = []
    respx.post(TOKEN_URL).mock(side_effect=refreshed(calls))

    def fhir(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] == "Bearer at-2":
            return httpx.Response(200, json={"resourceType": "Patient", "id": "p1"})
        return httpx.Response(401)

    respx.get(f"{ISS}/Patient/p1").mock(side_effect=fhir)
    async with httpx.AsyncClient() as http:
        provider = RefreshingToken(http, config(), SmartClient(CLIENT_ID), token_set())
        async with FhirClient(ISS, http=http, auth=provider, max_attempts=1) as client:
            patient = await client.read("Patient", "p1")
    assert patient["id"] == "p1"
    assert len(calls) == 1


@respx.mock
async def test_without_a_refresh_token_the_provider_keeps_returning_the_token_it_has() -> None:
    route = respx.post(TOKEN_URL)
    async with httpx.AsyncClient() as http:
        provider = RefreshingToken(
            http, config(), SmartClient(CLIENT_ID), token_set(expires_at=0.0, refresh_token=None)
        )
        await provider.invalidate()
        assert await provider.token() == "at-1"
    assert not route.called


@respx.mock
async def test_a_refused_refresh_raises_a_smart_error_saying_to_launch_again() -> None:
    respx.post(TOKEN_URL).respond(400, json={"error": "invalid_grant"})
    async with httpx.AsyncClient() as http:
        provider = RefreshingToken(http, config(), SmartClient(CLIENT_ID), token_set(expires_at=0.0))
        with pytest.raises(SmartError) as caught:
            await provider.token()
    assert caught.value.oauth_error == "invalid_grant"


@respx.mock
async def test_no_token_reaches_the_logs_through_exchange_and_refresh(ehr_key: jwk.RSAKey) -> None:
    respx.post(TOKEN_URL).respond(200, json=token_body(id_token=id_token(ehr_key)))
    respx.get(JWKS_URL).respond(200, json=public_jwks(ehr_key))
    async with httpx.AsyncClient() as http:
        with capture_logs() as logs:
            tokens = await exchange(http)
            await refresh_tokens(http, config(), SmartClient(CLIENT_ID), tokens)
    text = json.dumps(logs, default=str)
    assert logs and "smart.token" in text
    assert not any(secret in text for secret in SECRET_LOOKING)
    assert tokens.id_token is not None and tokens.id_token not in text


# -- the JWKS cache ------------------------------------------------------------------------------------


@respx.mock
async def test_two_launches_against_one_ehr_read_its_jwks_once(ehr_key: jwk.RSAKey) -> None:
    respx.post(TOKEN_URL).respond(200, json=token_body(id_token=id_token(ehr_key)))
    keys = respx.get(JWKS_URL).respond(200, json=public_jwks(ehr_key))
    async with httpx.AsyncClient() as http:
        first, second = await exchange(http), await exchange(http)
        assert jwks_cache(http).fetches == 1
    assert first.fhir_user == second.fhir_user == f"{ISS}/Practitioner/dr-1"
    assert keys.call_count == 1


@respx.mock
async def test_concurrent_id_token_checks_wait_for_one_jwks_fetch(ehr_key: jwk.RSAKey) -> None:
    async def slow_keys(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.01)
        return httpx.Response(200, json=public_jwks(ehr_key))

    keys = respx.get(JWKS_URL).mock(side_effect=slow_keys)
    now = time.time()
    async with httpx.AsyncClient() as http:
        checks = [
            verified_id_token_claims(http, config(), CLIENT_ID, id_token(ehr_key), now=now) for _ in range(5)
        ]
        claims = await asyncio.gather(*checks)
    assert [c["sub"] for c in claims] == ["dr-1"] * 5
    assert keys.call_count == 1


@respx.mock
async def test_a_rotated_key_refetches_the_jwks_once_and_an_unknown_kid_not_on_every_token(
    ehr_key: jwk.RSAKey,
) -> None:
    rotated = jwk.ECKey.generate_key("P-384", parameters={"kid": "ec-2"})
    published = [ehr_key]
    keys = respx.get(JWKS_URL).mock(
        side_effect=lambda request: httpx.Response(
            200, json={"keys": [k.as_dict(private=False) for k in published]}
        )
    )
    cache = JwksCache()
    now = time.time()

    async def check(token: str, at: float) -> dict[str, Any]:
        return await verified_id_token_claims(http, config(), CLIENT_ID, token, now=at, jwks=cache)

    async with httpx.AsyncClient() as http:
        await check(id_token(ehr_key), now)
        published.append(rotated)
        # Within the refetch throttle an unknown kid is refused without asking the EHR again.
        with pytest.raises(SmartError, match="InvalidKeyIdError"):
            await check(id_token(rotated, alg="ES384"), now + 1)
        assert keys.call_count == 1
        # Past it, the rotated key is fetched once and then served from the cache.
        assert (await check(id_token(rotated, alg="ES384"), now + 31))["sub"] == "dr-1"
        assert (await check(id_token(rotated, alg="ES384"), now + 32))["sub"] == "dr-1"
        assert keys.call_count == 2
        stranger = jwk.RSAKey.generate_key(2048, parameters={"kid": "nobody"})
        for offset in (33, 34, 35):
            with pytest.raises(SmartError, match="did not verify"):
                await check(id_token(stranger), now + offset)
        assert keys.call_count == 2
        # After max_age the set is read again even without an unknown kid.
        await check(id_token(ehr_key), now + JWKS_MAX_AGE_SECONDS + 32)
        assert keys.call_count == 3 and cache.fetches == 3


@pytest.mark.parametrize(
    ("response", "named"),
    [
        (httpx.Response(503), "the EHR's JWKS answered HTTP 503"),
        (httpx.Response(200, json={"keys": "none"}), "the EHR's JWKS holds no usable key"),
        (httpx.ConnectError("refused"), "the EHR's JWKS could not be read"),
    ],
)
@respx.mock
async def test_an_unreadable_jwks_is_a_smart_error_remembered_briefly_then_read_again(
    response: Any, named: str, ehr_key: jwk.RSAKey
) -> None:
    respx.post(TOKEN_URL).respond(200, json=token_body(id_token=id_token(ehr_key)))
    keys = respx.get(JWKS_URL).mock(side_effect=[response, httpx.Response(200, json=public_jwks(ehr_key))])
    async with httpx.AsyncClient() as http:
        with pytest.raises(SmartError, match=named):
            await exchange(http)
        # Within the failure window the same refusal comes from memory: an outage is not hammered.
        with pytest.raises(SmartError, match=named):
            await exchange(http)
        assert keys.call_count == 1
        jwks_cache(http).failure_seconds = 0.0  # the window has passed
        assert (await exchange(http)).fhir_user == f"{ISS}/Practitioner/dr-1"
        assert keys.call_count == 2


async def test_the_jwks_cache_never_accepts_hmac_or_unsigned_tokens(ehr_key: jwk.RSAKey) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ValueError, match="asymmetric"):
            await JwksCache().decode(http, id_token(ehr_key), JWKS_URL, algorithms=["HS256", "none"])
