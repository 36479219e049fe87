"""The caches in front of the issuers: a failed JWKS fetch is remembered for a short while (a flood of
tokens during an outage does not hammer the issuer), and SMART discovery waits per issuer (a slow EHR
stalls only its own launches)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from fhir_adapters.auth.oauth import JWKS_FAILURE_SECONDS, MIN_JWKS_REFETCH_SECONDS, JwksCache, SmartError
from service.api.deps import DiscoveryCache
from service.api.errors import Unavailable
from service.api.security import JwtVerifier

ISSUER = "https://ehr.example.org/fhir"
JWKS_URL = "https://ehr.example.org/jwks"
AUDIENCE = "https://chartbrief.example.org"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class FlakyIssuer:
    """A JWKS endpoint that is down until `up` is set; counts every request."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
        self.up = False
        self.fetches = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        if not self.up:
            return httpx.Response(503)
        return httpx.Response(200, json={"keys": [self.key.as_dict(private=False)]})

    def token(self, now: float, key: RSAKey | None = None) -> str:
        key = key or self.key
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "c", "iat": int(now), "exp": int(now) + 300}
        return jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key, algorithms=["RS256"])


def verifier(http: httpx.AsyncClient, clock: Clock, jwks: JwksCache) -> JwtVerifier:
    return JwtVerifier(
        http,
        issuer=ISSUER,
        jwks_url=JWKS_URL,
        audience=AUDIENCE,
        algorithms=["RS256"],
        clock=clock,
        jwks=jwks,
    )


async def test_a_failed_jwks_fetch_is_not_repeated_for_every_token() -> None:
    issuer, clock = FlakyIssuer(), Clock()
    jwks = JwksCache(clock=clock)
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as http:
        check = verifier(http, clock, jwks)
        for _ in range(20):
            with pytest.raises(Unavailable, match="could not be read"):
                await check.verify(issuer.token(clock.now))
        assert issuer.fetches == 1  # one failure answers the whole flood

        issuer.up = True
        clock.now += JWKS_FAILURE_SECONDS - 1
        with pytest.raises(Unavailable):
            await check.verify(issuer.token(clock.now))
        assert issuer.fetches == 1  # still inside the failure window

        clock.now += 2
        principal = await check.verify(issuer.token(clock.now))
        assert principal.subject == "c"
        assert issuer.fetches == 2  # asked again once the window passed, and recovered


async def test_concurrent_tokens_during_an_outage_make_one_fetch() -> None:
    issuer, clock = FlakyIssuer(), Clock()
    jwks = JwksCache(clock=clock)
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as http:
        results = await asyncio.gather(
            *(jwks.key_set(http, JWKS_URL, now=clock.now) for _ in range(10)), return_exceptions=True
        )
    assert all(isinstance(r, SmartError) for r in results)
    assert issuer.fetches == 1


async def test_an_unknown_kid_still_refetches_at_most_once_per_interval() -> None:
    issuer, clock = FlakyIssuer(), Clock()
    issuer.up = True
    jwks = JwksCache(clock=clock)
    stranger = RSAKey.generate_key(2048, parameters={"kid": "nobody"}, private=True)
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as http:
        check = verifier(http, clock, jwks)
        await check.verify(issuer.token(clock.now))
        assert issuer.fetches == 1
        clock.now += MIN_JWKS_REFETCH_SECONDS + 1
        for _ in range(10):
            with pytest.raises(Exception, match="does not publish"):
                await check.verify(issuer.token(clock.now, key=stranger))
        assert issuer.fetches == 2  # one refetch for the unknown kid, not ten
        # The issuer goes down: the refetch fails once, and the cached keys still verify good tokens.
        issuer.up = False
        clock.now += MIN_JWKS_REFETCH_SECONDS + 1
        for _ in range(5):
            with pytest.raises(Exception, match="does not publish|could not be read"):
                await check.verify(issuer.token(clock.now, key=stranger))
        assert issuer.fetches == 3
        assert (await check.verify(issuer.token(clock.now))).subject == "c"
        assert issuer.fetches == 3


# -- discovery ---------------------------------------------------------------------------------------


def smart_configuration(iss: str) -> dict[str, Any]:
    origin = iss.rsplit("/", 1)[0]
    return {
        "issuer": iss,
        "jwks_uri": f"{origin}/jwks",
        "authorization_endpoint": f"{origin}/authorize",
        "token_endpoint": f"{origin}/token",
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["launch-ehr"],
    }


SLOW = "https://slow.example.org/fhir"
FAST = "https://fast.example.org/fhir"


async def test_a_slow_issuer_does_not_block_another_issuers_discovery() -> None:
    slow_asked, release_slow = asyncio.Event(), asyncio.Event()
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        iss = f"{request.url.scheme}://{request.url.host}/fhir"
        asked.append(iss)
        if iss == SLOW:
            slow_asked.set()
            await release_slow.wait()
        return httpx.Response(200, json=smart_configuration(iss))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        cache = DiscoveryCache(http, allow_http=False)
        slow = asyncio.create_task(cache.get(SLOW))
        also_slow = asyncio.create_task(cache.get(SLOW))
        await slow_asked.wait()
        fast = asyncio.create_task(cache.get(FAST))
        # Only a deadlock guard (the slow issuer is never released before the fast one answers):
        # with one lock for all issuers the fast lookup would wait for the slow one forever.
        done, _ = await asyncio.wait({fast, slow}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert done == {fast}, "the fast issuer's discovery waited for the slow issuer"
        assert fast.result().token_endpoint == "https://fast.example.org/token"
        assert not slow.done()
        release_slow.set()
        first, second = await asyncio.gather(slow, also_slow)
    assert first is second  # one fetch per issuer, shared by whoever waited for it
    assert sorted(asked) == [FAST, SLOW]
