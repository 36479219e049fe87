"""SMART Backend Services against a real token endpoint (the local FHIR server's), RS384 and ES384."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from fhir_adapters.auth.backend import BackendClient, BackendServicesToken
from fhir_adapters.auth.oauth import generate_key
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirAuthError
from service.dev.devserver import LocalFhirServer

pytestmark = pytest.mark.integration

KEYS = {alg: generate_key(alg) for alg in ("RS384", "ES384")}  # type: ignore[arg-type]
TOKEN_LIFETIME = 2


@pytest.fixture(scope="module")
def guarded_fhir() -> Iterator[str]:
    clients = [
        {"client_id": f"chartbrief-{alg.lower()}", "jwks": {"keys": [jwk]}, "scopes": "system/*.*"}
        for alg, (_pem, jwk) in KEYS.items()
    ]
    overrides = {
        "server_auth": {"types": ["smart"], "smart_clients": clients, "token_lifetime": TOKEN_LIFETIME}
    }
    with LocalFhirServer(overrides=overrides) as server:
        yield server.base_url


def _client(alg: str) -> BackendClient:
    pem, _ = KEYS[alg]
    scope = "system/Patient.rs system/Patient.c"
    return BackendClient(f"chartbrief-{alg.lower()}", pem, alg=alg, scope=scope)  # type: ignore[arg-type]


async def test_without_a_token_the_server_refuses(guarded_fhir: str) -> None:
    async with FhirClient(guarded_fhir, max_attempts=1) as client:
        with pytest.raises(FhirAuthError):
            await client.search_all("Patient", {"_count": "1"})


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
async def test_a_signed_assertion_buys_a_token_that_reads_and_writes(guarded_fhir: str, alg: str) -> None:
    async with httpx.AsyncClient() as http:
        auth = BackendServicesToken(http, guarded_fhir, _client(alg))
        async with FhirClient(guarded_fhir, auth=auth) as client:
            created = await client.create({"resourceType": "Patient", "gender": "female"})
            read = await client.read("Patient", created["id"])
            again = await client.read("Patient", created["id"])
    assert read["id"] == again["id"] == created["id"]
    assert auth.fetched == 1  # one token served every request
    assert auth.granted_scope


async def test_a_token_that_expires_mid_run_is_replaced_and_the_request_succeeds(guarded_fhir: str) -> None:
    lagging_clock = lambda: time.time() - 3600  # noqa: E731 - we believe the token is fresh; the server knows better
    async with httpx.AsyncClient() as http:
        auth = BackendServicesToken(http, guarded_fhir, _client("RS384"), clock=lagging_clock)
        async with FhirClient(guarded_fhir, auth=auth) as client:
            created = await client.create({"resourceType": "Patient", "gender": "male"})
            await asyncio.sleep(TOKEN_LIFETIME + 1.0)
            read = await client.read("Patient", created["id"])
    assert read["id"] == created["id"]
    assert auth.fetched == 2
