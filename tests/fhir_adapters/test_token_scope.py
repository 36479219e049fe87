"""The FHIR server's bearer token goes only to URLs under its base path, not to the rest of its host."""

from __future__ import annotations

import httpx
import pytest
import respx

from fhir_adapters.auth import StaticToken
from fhir_adapters.bulk.export import BulkExportError, kick_off
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirBadRequest

BASE = "https://ehr.example/fhir/r4"
TOKEN = "server-token-abc"


@pytest.mark.parametrize(
    "url",
    [
        "https://ehr.example/admin",
        "https://ehr.example/fhir/r4x/Patient/1",
        "https://ehr.example/fhir",
        "/admin/users",
        "https://ehr.example/fhir/r4/%2e%2e/admin",
        "https://ehr.example/fhir/r4%2Fx/Patient",
    ],
)
async def test_the_token_is_not_sent_to_another_path_on_the_ehr_host(url: str) -> None:
    with respx.mock(assert_all_called=False) as mock:
        anything = mock.route(host="ehr.example").mock(return_value=httpx.Response(200, json={}))
        async with FhirClient(BASE, auth=StaticToken(TOKEN)) as fhir:
            with pytest.raises(FhirBadRequest, match="base path"):
                await fhir.request("GET", url, idempotent=True)
    assert anything.call_count == 0


@pytest.mark.parametrize(
    "url", [f"{BASE}/Patient/1", "Patient/1", f"{BASE}/", "https://ehr.example:443/fhir/r4/Patient/1"]
)
async def test_the_token_is_sent_below_the_base_path(url: str) -> None:
    with respx.mock(assert_all_called=False) as mock:
        route = mock.get(f"{BASE}/Patient/1").mock(return_value=httpx.Response(200, json={"id": "1"}))
        base_route = mock.get(f"{BASE}/").mock(return_value=httpx.Response(200, json={}))
        async with FhirClient(BASE, auth=StaticToken(TOKEN)) as fhir:
            await fhir.request("GET", url, idempotent=True)
    sent = [*route.calls, *base_route.calls]
    assert [c.request.headers["Authorization"] for c in sent] == [f"Bearer {TOKEN}"]


async def test_a_bulk_status_url_elsewhere_on_the_host_is_not_polled_with_the_token() -> None:
    with respx.mock(assert_all_called=False) as mock:
        accepted = httpx.Response(202, headers={"Content-Location": "https://ehr.example/jobs/1"})
        mock.route(host="ehr.example", path__startswith="/fhir/r4/").mock(return_value=accepted)
        async with FhirClient(BASE, auth=StaticToken(TOKEN)) as fhir:
            with pytest.raises(BulkExportError, match="base path"):
                await kick_off(fhir)
