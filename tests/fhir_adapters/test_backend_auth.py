"""SMART Backend Services: the assertion is what the spec asks for, and the token is cached and renewed."""

from __future__ import annotations

import time
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhir_adapters.auth.backend import BackendAuthError, BackendClient, BackendServicesToken
from fhir_adapters.auth.oauth import CLIENT_ASSERTION_TYPE as CLIENT_ASSERTION_TYPE
from fhir_adapters.auth.oauth import generate_key, public_jwk

BASE = "http://ehr.test/fhir"
TOKEN_URL = "http://ehr.test/auth/token"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _token_route(router: respx.MockRouter, lifetime: int = 300) -> respx.Route:
    counter = {"n": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        counter["n"] += 1
        return httpx.Response(
            200, json={"access_token": f"tok-{counter['n']}", "expires_in": lifetime, "scope": "system/*.rs"}
        )

    return router.post(TOKEN_URL).mock(side_effect=answer)


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_assertion_carries_the_claims_and_header_the_spec_requires(alg: str) -> None:
    pem, jwk = generate_key(alg)  # type: ignore[arg-type]
    client = BackendClient("chartbrief", pem, alg=alg)  # type: ignore[arg-type]
    now = time.time()
    token = client.assertion(TOKEN_URL, now)
    key = RSAKey.import_key(jwk) if alg == "RS384" else ECKey.import_key(jwk)
    decoded = jwt.decode(token, key, algorithms=[alg])
    assert decoded.header == {"alg": alg, "kid": jwk["kid"], "typ": "JWT"}
    c = decoded.claims
    assert c["iss"] == c["sub"] == "chartbrief"
    assert c["aud"] == TOKEN_URL
    assert now < c["exp"] <= now + 300
    assert c["jti"] != jwt.decode(client.assertion(TOKEN_URL, now), key, algorithms=[alg]).claims["jti"]


def test_public_jwk_matches_the_generated_one_and_has_no_private_part() -> None:
    pem, jwk = generate_key("ES384", kid="k1")
    assert public_jwk(pem, "ES384", kid="k1") == jwk
    assert "d" not in jwk and jwk["crv"] == "P-384"


async def test_token_is_cached_then_renewed_before_it_expires() -> None:
    pem, _ = generate_key("RS384")
    clock = Clock()
    with respx.mock() as router:
        route = _token_route(router, lifetime=300)
        async with httpx.AsyncClient() as http:
            auth = BackendServicesToken(
                http, BASE, BackendClient("cb", pem, token_url=TOKEN_URL), renew_margin_seconds=60, clock=clock
            )
            assert await auth.token() == "tok-1"
            clock.now += 200
            assert await auth.token() == "tok-1"  # 100 s left: still good
            clock.now += 50
            assert await auth.token() == "tok-2"  # 50 s left < margin: renewed early
            await auth.invalidate()
            assert await auth.token() == "tok-3"  # after a 401 the client invalidates
    assert route.call_count == 3
    form = parse_qs(route.calls[0].request.content.decode())
    assert form["grant_type"] == ["client_credentials"]
    assert form["client_assertion_type"] == [CLIENT_ASSERTION_TYPE]
    assert "system/Patient.rs" in form["scope"][0]
    assert "tok-" not in repr(auth)


async def test_token_endpoint_is_discovered_from_smart_configuration() -> None:
    pem, _ = generate_key("RS384")
    with respx.mock() as router:
        router.get(f"{BASE}/.well-known/smart-configuration").mock(
            return_value=httpx.Response(200, json={"token_endpoint": TOKEN_URL})
        )
        _token_route(router)
        async with httpx.AsyncClient() as http:
            auth = BackendServicesToken(http, BASE, BackendClient("cb", pem))
            assert await auth.token() == "tok-1"


async def test_a_refusal_is_reported_with_the_servers_reason_and_no_secret() -> None:
    pem, _ = generate_key("RS384")
    with respx.mock() as router:
        router.post(TOKEN_URL).mock(
            return_value=httpx.Response(401, json={"error": "invalid_client", "error_description": "jti reused"})
        )
        async with httpx.AsyncClient() as http:
            auth = BackendServicesToken(http, BASE, BackendClient("cb", pem, token_url=TOKEN_URL))
            with pytest.raises(BackendAuthError, match="refused client cb: jti reused") as info:
                await auth.token()
    assert "PRIVATE" not in str(info.value)


def test_a_key_of_the_wrong_kind_is_named() -> None:
    pem, _ = generate_key("ES384")
    with pytest.raises(BackendAuthError, match="not a RS384 key"):
        BackendClient("cb", pem, alg="RS384").assertion(TOKEN_URL, time.time())
