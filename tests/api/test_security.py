"""The web service's defences, as pure functions and one JWT verifier against a JWKS served in memory."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhir_adapters.auth.oauth import jwks_cache, parse_smart_configuration, verified_id_token_claims
from service.api.errors import Unauthenticated
from service.api.routes.api import contexts_for
from service.api.routes.launch import launch_scopes, missing_rights
from service.api.security import (
    JwtVerifier,
    Principal,
    csrf_ok,
    csrf_token,
    frame_ancestor_origins,
    page_csp,
    parse_scope,
    same_origin_request,
    scopes_allow,
)

ISSUER = "https://ehr.example.org/fhir"
JWKS_URL = "https://ehr.example.org/jwks"
AUDIENCE = "https://chartbrief.example.org"
ALGORITHMS = ["RS256", "RS384", "ES256", "ES384"]


# -- headers and CSRF ----------------------------------------------------------------------------


def test_page_csp_allows_scripts_only_from_itself_and_framing_only_by_the_ehrs() -> None:
    origins = frame_ancestor_origins(
        [], ["https://ehr.example.org/fhir", "https://other.example.net:8443/r4"]
    )
    csp = page_csp(origins)
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'"
    assert "unsafe-inline" not in csp
    assert directives["frame-ancestors"] == "'self' https://ehr.example.org https://other.example.net:8443"
    assert directives["object-src"] == "'none'"
    assert directives["form-action"] == "'self'"


def test_explicit_frame_ancestors_replace_the_issuer_origins() -> None:
    assert frame_ancestor_origins(["https://portal.example.org/app"], [ISSUER]) == [
        "https://portal.example.org"
    ]


def test_csrf_token_belongs_to_one_session_and_one_secret() -> None:
    secret = b"s" * 40
    token = csrf_token(secret, "session-a")
    assert csrf_ok(secret, "session-a", token)
    assert not csrf_ok(secret, "session-b", token)
    assert not csrf_ok(b"t" * 40, "session-a", token)
    assert not csrf_ok(secret, "session-a", None)
    assert not csrf_ok(secret, "session-a", "")


def test_a_post_from_another_origin_is_refused() -> None:
    assert same_origin_request("https://chartbrief.example.org", "https://chartbrief.example.org/")
    assert not same_origin_request("https://evil.example", "https://chartbrief.example.org")
    assert same_origin_request(None, "https://chartbrief.example.org")


# -- scopes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "resource", "action", "contexts"),
    [
        ("patient/DocumentReference.rs", "DocumentReference", "r", {"patient"}),
        ("patient/DocumentReference.rs", "DocumentReference", "c", set()),
        ("user/*.cruds", "DocumentReference", "u", {"user"}),
        ("system/DocumentReference.read", "DocumentReference", "s", {"system"}),
        ("system/DocumentReference.write", "DocumentReference", "r", set()),
        ("patient/Observation.rs", "DocumentReference", "r", set()),
        ("patient/DocumentReference.rs?category=clinical-note", "DocumentReference", "r", set()),
        ("patient/DocumentReference.sr", "DocumentReference", "r", set()),  # letters out of order
        ("launch", "DocumentReference", "r", set()),
    ],
)
def test_smart_scopes_grant_exactly_what_they_name(
    scope: str, resource: str, action: str, contexts: set[str]
) -> None:
    assert scopes_allow([scope], resource, action) == contexts


def test_parse_scope_ignores_non_resource_scopes() -> None:
    assert parse_scope("openid") is None
    assert parse_scope("fhirUser") is None
    assert parse_scope("patient/Patient.") is None
    assert parse_scope("patient/Observation.rs\n") is None  # checked whole: `$` allowed a trailing newline


def test_api_key_scopes_count_as_system_level_rights() -> None:
    reader = Principal("api-key", "apikey:1", frozenset({"summaries.read"}))
    writer = Principal("api-key", "apikey:2", frozenset({"summaries.write"}))
    assert contexts_for(reader, "read") == {"system"}
    assert contexts_for(reader, "create") == set()
    assert contexts_for(writer, "create") == {"system"}
    # A JWT cannot borrow chartbrief's key scope names.
    assert contexts_for(Principal("jwt", "x", frozenset({"summaries.write"})), "create") == set()


def test_an_ehr_launch_asks_for_launch_and_the_review_updates_and_a_standalone_for_launch_patient() -> None:
    ehr = launch_scopes(None, ehr_launch=True).split()
    standalone = launch_scopes(None, ehr_launch=False).split()
    assert ehr[0] == "launch" and "launch/patient" not in ehr
    assert standalone[0] == "launch/patient" and "launch" not in standalone
    for scopes in (ehr, standalone):
        assert {"openid", "fhirUser", "patient/DocumentReference.u", "patient/Provenance.u"} <= set(scopes)
        assert not any(s.startswith(("user/", "system/")) or "*" in s for s in scopes)


def test_a_grant_without_write_back_rights_is_named_by_what_is_missing() -> None:
    assert missing_rights(frozenset({"patient/Patient.rs", "patient/DocumentReference.rs"})) == [
        "DocumentReference.c",
        "Provenance.c",
    ]
    assert missing_rights(frozenset({"patient/*.cruds"})) == []


# -- JWT verification ------------------------------------------------------------------------------


class Issuer:
    """An in-memory token issuer: its keys, a JWKS endpoint for httpx, and a counter of JWKS fetches."""

    def __init__(self) -> None:
        self.keys = [RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)]
        self.fetches = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        assert str(request.url) == JWKS_URL
        self.fetches += 1
        return httpx.Response(200, json={"keys": [k.as_dict(private=False) for k in self.keys]})

    def token(self, key: Any = None, alg: str = "RS384", **claims: Any) -> str:
        key = key or self.keys[0]
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "client-1", "iat": now, "exp": now + 300, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        header = {"alg": alg, "kid": key.kid} if key.kid else {"alg": alg}
        return jwt.encode(header, body, key, algorithms=[alg])


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def verifier_for(issuer: Issuer, http: httpx.AsyncClient, **kw: Any) -> JwtVerifier:
    return JwtVerifier(http, issuer=ISSUER, jwks_url=JWKS_URL, audience=AUDIENCE, algorithms=ALGORITHMS, **kw)


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


async def test_a_valid_token_gives_its_subject_scopes_and_patient(issuer: Issuer) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as http:
        token = issuer.token(scope="patient/DocumentReference.rs launch", patient="p-1")
        principal = await verifier_for(issuer, http).verify(token)
    assert principal.kind == "jwt"
    assert principal.subject == "client-1"
    assert principal.patient == "p-1"
    assert principal.scopes == {"patient/DocumentReference.rs", "launch"}


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 600}, "expired"),
        ({"aud": "https://someone-else.example.org"}, "aud"),
        ({"iss": "https://evil.example/fhir"}, "iss"),
        ({"exp": None}, "exp"),
    ],
)
async def test_tokens_with_bad_claims_are_refused(
    issuer: Issuer, claims: dict[str, Any], message: str
) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as http:
        with pytest.raises(Unauthenticated, match=message) as info:
            await verifier_for(issuer, http).verify(issuer.token(**claims))
    assert "invalid_token" in info.value.headers["WWW-Authenticate"]


async def test_a_token_signed_by_another_key_is_refused(issuer: Issuer) -> None:
    stranger = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as http:
        with pytest.raises(Unauthenticated, match="not a valid signed JWT"):
            await verifier_for(issuer, http).verify(issuer.token(key=stranger))


async def test_hmac_and_unsigned_tokens_are_never_accepted(issuer: Issuer) -> None:
    # An HMAC token keyed with the public key's bytes is the classic algorithm-confusion attack.
    # (joserfc itself refuses to build such a key, so the token is assembled by hand.)
    payload = _b64({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60})
    signing_input = f"{_b64({'alg': 'HS256', 'kid': 'rsa-1'})}.{payload}"
    public_pem = issuer.keys[0].as_pem(private=False)
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    hmac_token = f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    unsigned = f"{_b64({'alg': 'none'})}.{payload}."
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as http:
        verifier = JwtVerifier(
            http, issuer=ISSUER, jwks_url=JWKS_URL, audience=AUDIENCE, algorithms=["HS256", "RS384"]
        )
        assert verifier.algorithms == ["RS384"]
        for token in (hmac_token, unsigned):
            with pytest.raises(Unauthenticated):
                await verifier.verify(token)


async def test_rotated_keys_are_fetched_once_when_an_unknown_kid_appears(issuer: Issuer) -> None:
    offset = [0.0]
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as http:
        verifier = verifier_for(issuer, http, clock=lambda: time.time() + offset[0], cache_seconds=3600)
        await verifier.verify(issuer.token())
        await verifier.verify(issuer.token())
        assert issuer.fetches == 1
        rotated = ECKey.generate_key("P-384", parameters={"kid": "ec-2"}, private=True)
        issuer.keys.append(rotated)
        offset[0] = 31  # past the refetch throttle
        principal = await verifier.verify(issuer.token(key=rotated, alg="ES384"))
        assert principal.subject == "client-1"
        assert issuer.fetches == 2
        # A kid nobody publishes does not trigger a second fetch within the throttle window.
        unknown = RSAKey.generate_key(2048, parameters={"kid": "nobody"}, private=True)
        with pytest.raises(Unauthenticated, match="key the issuer does not publish"):
            await verifier.verify(issuer.token(key=unknown))
        assert issuer.fetches == 2


async def test_an_unreachable_jwks_is_a_temporary_failure_not_an_acceptance(issuer: Issuer) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        with pytest.raises(Exception, match="could not be read") as info:
            await verifier_for(issuer, http).verify(issuer.token())
    assert getattr(info.value, "status", None) == 503


async def test_the_api_and_the_launch_share_one_jwks_fetch_through_the_shared_client(issuer: Issuer) -> None:
    # The EHR that launches chartbrief also issues the API's bearer tokens: one JWKS, read once.
    config = parse_smart_configuration(
        {
            "issuer": ISSUER,
            "jwks_uri": JWKS_URL,
            "authorization_endpoint": "https://ehr.example.org/authorize",
            "token_endpoint": "https://ehr.example.org/token",
            "code_challenge_methods_supported": ["S256"],
        },
        ISSUER,
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as http:
        verifier = verifier_for(issuer, http)
        await verifier.verify(issuer.token())
        await verifier.verify(issuer.token(scope="patient/DocumentReference.rs"))
        id_token = issuer.token(aud="chartbrief-client", sub="dr-1")
        claims = await verified_id_token_claims(http, config, "chartbrief-client", id_token, now=time.time())
        await verifier_for(issuer, http).verify(issuer.token())
        assert verifier.jwks is jwks_cache(http)
    assert claims["sub"] == "dr-1"
    assert issuer.fetches == 1


async def test_concurrent_bearer_checks_make_one_jwks_fetch(issuer: Issuer) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as http:
        verifier = verifier_for(issuer, http)
        principals = await asyncio.gather(*(verifier.verify(issuer.token()) for _ in range(5)))
    assert {p.subject for p in principals} == {"client-1"}
    assert issuer.fetches == 1


async def test_a_verifier_without_an_asymmetric_algorithm_is_refused() -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ValueError, match="asymmetric"):
            JwtVerifier(http, issuer=ISSUER, jwks_url=JWKS_URL, audience=AUDIENCE, algorithms=["HS256"])
