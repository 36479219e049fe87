"""Bulk Data files served without the access token: only https on the FHIR server's host, or a
host the deployment lists, is ever contacted; the others fail the export, each named."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import httpx
import pytest
import respx

from fhir_adapters.bulk.export import export_resources, stream_ndjson
from fhir_adapters.bulk.manifest import BulkExportError
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirBadRequest
from service.config import FhirSettings
from service.fhir import fhir_client
from tests.fhir_adapters.test_bulk import STATUS_PATH, STATUS_URL, FakeTime, accepted, manifest_body, ndjson

BASE = "https://ehr.example.org/fhir"
STORE = "https://store.example.net"
INTERNAL = "http://169.254.169.254"


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as mock:
        yield mock


def export_server(router: respx.MockRouter, files: list[dict[str, Any]]) -> dict[str, respx.Route]:
    status = STATUS_URL.replace("http://127.0.0.1:8998/fhir", BASE)
    routes = {
        "kickoff": router.post(f"{BASE}/Patient/$export").mock(return_value=accepted(status)),
        "status": router.get(f"{BASE}{STATUS_PATH}").mock(
            return_value=httpx.Response(200, json=manifest_body(files, requires_token=False))
        ),
        "delete": router.delete(f"{BASE}{STATUS_PATH}").mock(return_value=httpx.Response(202)),
    }
    body = ndjson([{"resourceType": "Patient", "id": "p1"}])
    for i, f in enumerate(files):
        routes[f"file{i}"] = router.get(f["url"].split("?")[0]).mock(
            return_value=httpx.Response(200, content=body)
        )
    return routes


async def run_export(client: FhirClient) -> list[str]:
    stream = export_resources(client, types=["Patient"], sleep=FakeTime().sleep)
    async with aclosing(stream):
        return [resource["id"] async for _, resource in stream]


async def test_a_tokenless_file_on_another_host_or_over_http_fails_the_export_naming_each_file(
    router: respx.MockRouter,
) -> None:
    files = [
        {"type": "Patient", "url": f"{BASE}/files/ok.ndjson"},
        {"type": "Patient", "url": f"{STORE}/bucket/p.ndjson?sig=secret"},
        {"type": "Condition", "url": f"{INTERNAL}/latest/meta-data"},
    ]
    routes = export_server(router, files)

    async with FhirClient(BASE) as client:
        with pytest.raises(BulkExportError) as info:
            await run_export(client)

    message = str(info.value)
    assert "refusing to read 2 file(s)" in message
    assert f"{STORE}/bucket/p.ndjson (Patient: host store.example.net is not the FHIR server host" in message
    assert f"{INTERNAL}/latest/meta-data (Condition: not https)" in message
    assert "CHARTBRIEF_FHIR__BULK_FILE_HOSTS" in message
    assert "sig=secret" not in message
    # Nothing was read, not even the allowed file (the run must not move its _since past the others).
    assert all(routes[f"file{i}"].call_count == 0 for i in range(3))
    assert routes["delete"].call_count == 1


async def test_a_listed_https_host_is_read_without_the_token(router: respx.MockRouter) -> None:
    files = [
        {"type": "Patient", "url": f"{BASE}/files/ok.ndjson"},
        {"type": "Patient", "url": f"{STORE}/bucket/p.ndjson?sig=secret"},
    ]
    routes = export_server(router, files)

    settings = FhirSettings(base_url=BASE, bearer_token="tok", bulk_file_hosts=["store.example.net"])
    async with fhir_client(settings) as client:
        ids = await run_export(client)

    assert ids == ["p1", "p1"]
    assert "Authorization" not in routes["file1"].calls.last.request.headers


async def test_the_client_itself_refuses_a_tokenless_read_from_an_unlisted_host(
    router: respx.MockRouter,
) -> None:
    route = router.get(f"{STORE}/p.ndjson").mock(return_value=httpx.Response(200, content=b""))
    async with FhirClient(BASE) as client:
        with pytest.raises(FhirBadRequest, match="without the token: host store.example.net"):
            async with aclosing(stream_ndjson(client, f"{STORE}/p.ndjson", requires_access_token=False)) as s:
                [r async for r in s]
        with pytest.raises(FhirBadRequest, match="not https"):
            async with aclosing(
                stream_ndjson(client, "http://ehr.example.org/p.ndjson", requires_access_token=False)
            ) as s:
                [r async for r in s]
    assert route.call_count == 0
