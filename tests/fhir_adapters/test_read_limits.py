"""Read limits: a FHIR server cannot make chartbrief page forever or read bodies of any size.

The server is mocked at the transport (respx); oversize bodies are streams that count the bytes
handed to the client, so a test sees that reading stopped near the cap instead of at the end.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import respx

from fhir_adapters.client import FhirClient
from fhir_adapters.client.search import ReadLimits
from fhir_adapters.errors import FhirResponseTooLarge
from fhir_adapters.fetch import fetch_record
from service.config import FhirSettings
from service.fhir import fhir_client

BASE = "http://127.0.0.1:8998/fhir"
CHUNK = 64 * 1024
KIB = 1024


class CountingStream(httpx.AsyncByteStream):
    """A body of `chunks` chunks of CHUNK bytes, counting what the client actually pulled."""

    def __init__(self, chunks: int, fill: bytes = b" ") -> None:
        self.chunks = chunks
        self.fill = fill
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.sent += CHUNK
            yield self.fill * CHUNK


def bundle(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [{"resource": r} for r in resources],
    }


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        yield mock


def endless_pages(request: httpx.Request) -> httpx.Response:
    """Every page links to a new, distinct next page: a search that would never end."""
    page = int(request.url.params.get("page", "0"))
    obs = {"resourceType": "Observation", "id": f"o{page}"}
    return httpx.Response(200, json=bundle([obs], f"{BASE}/Observation?page={page + 1}"))


async def test_endless_distinct_next_links_stop_at_the_page_cap_with_a_truncated_note(
    router: respx.MockRouter,
) -> None:
    route = router.get("/Observation").mock(side_effect=endless_pages)
    async with FhirClient(BASE, limits=ReadLimits(max_pages=7)) as client:
        found = await client.search_all("Observation", {"patient": "p"})

    assert route.call_count == 7
    assert [r["id"] for r in found] == [f"o{i}" for i in range(7)]
    assert found.truncated is not None
    assert "after 7 pages" in found.truncated
    assert "max_pages_per_search" in found.truncated


async def test_a_search_stops_at_the_resource_cap_without_reading_further_pages(
    router: respx.MockRouter,
) -> None:
    many = [{"resourceType": "Observation", "id": f"o{i}"} for i in range(10)]
    route = router.get("/Observation").mock(
        return_value=httpx.Response(200, json=bundle(many, f"{BASE}/Observation?page=2"))
    )
    async with FhirClient(BASE, limits=ReadLimits(max_resources=4)) as client:
        found = await client.search_all("Observation", {"patient": "p"})

    assert len(found) == 4
    assert route.call_count == 1
    assert found.truncated is not None and "4 resources" in found.truncated


async def test_a_caller_limit_is_not_a_truncation(router: respx.MockRouter) -> None:
    router.get("/Observation").mock(side_effect=endless_pages)
    async with FhirClient(BASE) as client:
        found = await client.search_all("Observation", {"patient": "p"}, limit=3)
    assert len(found) == 3
    assert found.truncated is None


async def test_an_oversize_search_page_is_abandoned_at_the_cap_and_named(router: respx.MockRouter) -> None:
    stream = CountingStream(chunks=200)  # 12.5 MiB of whitespace: valid JSON padding, if read whole
    router.get("/Observation").mock(
        return_value=httpx.Response(200, headers={"content-type": "application/fhir+json"}, stream=stream)
    )
    async with FhirClient(BASE, limits=ReadLimits(max_response_bytes=256 * KIB)) as client:
        found = await client.search_all("Observation", {"patient": "p"})

    assert list(found) == []
    assert found.truncated is not None and "larger than 262144 bytes" in found.truncated
    assert stream.sent <= 256 * KIB + CHUNK  # stopped at the cap, not at 12.5 MiB


async def test_an_oversize_read_raises_too_large_after_reading_no_more_than_the_cap(
    router: respx.MockRouter,
) -> None:
    stream = CountingStream(chunks=500)
    router.get("/Patient/p").mock(return_value=httpx.Response(200, stream=stream))
    async with FhirClient(BASE, limits=ReadLimits(max_response_bytes=128 * KIB)) as client:
        with pytest.raises(FhirResponseTooLarge, match="larger than 131072 bytes") as info:
            await client.read("Patient", "p")

    assert info.value.limit == 128 * KIB
    assert "/fhir/Patient/p" in str(info.value)
    assert stream.sent <= 128 * KIB + CHUNK


async def test_a_declared_content_length_over_the_cap_is_refused_before_any_byte_is_read(
    router: respx.MockRouter,
) -> None:
    stream = CountingStream(chunks=100)
    router.get("/Patient/p").mock(
        return_value=httpx.Response(200, headers={"content-length": str(100 * CHUNK)}, stream=stream)
    )
    async with FhirClient(BASE, limits=ReadLimits(max_response_bytes=64 * KIB)) as client:
        with pytest.raises(FhirResponseTooLarge):
            await client.read("Patient", "p")
    assert stream.sent == 0


async def test_an_oversize_binary_is_cut_off_at_the_attachment_cap(router: respx.MockRouter) -> None:
    stream = CountingStream(chunks=400, fill=b"a")
    router.get("/Binary/big").mock(
        return_value=httpx.Response(200, headers={"content-type": "text/plain"}, stream=stream)
    )
    async with FhirClient(BASE, limits=ReadLimits(max_attachment_bytes=100 * KIB)) as client:
        with pytest.raises(FhirResponseTooLarge):
            await client.binary("Binary/big")
    # The Binary read is allowed the base64 overhead over the attachment cap, and no more.
    assert stream.sent <= 100 * KIB * 4 // 3 + 4096 + CHUNK


async def test_a_bodies_within_the_caps_read_as_before(router: respx.MockRouter) -> None:
    router.get("/Patient/p").mock(
        return_value=httpx.Response(200, json={"resourceType": "Patient", "id": "p"})
    )
    payload = base64.b64encode(b"Stable.").decode()
    router.get("/Binary/b").mock(
        return_value=httpx.Response(
            200,
            headers={"content-type": "application/fhir+json"},
            content=json.dumps({"resourceType": "Binary", "contentType": "text/plain", "data": payload}),
        )
    )
    async with FhirClient(
        BASE, limits=ReadLimits(max_response_bytes=2 * KIB, max_attachment_bytes=2 * KIB)
    ) as c:
        assert (await c.read("Patient", "p"))["id"] == "p"
        assert await c.binary("Binary/b") == (b"Stable.", "text/plain")


def patient_server(router: respx.MockRouter, documents: list[dict[str, Any]]) -> None:
    router.get("/Patient/p").mock(
        return_value=httpx.Response(200, json={"resourceType": "Patient", "id": "p", "gender": "female"})
    )
    router.get("/Observation").mock(
        side_effect=lambda request: _observations_forever(request),
    )
    router.get("/DocumentReference").mock(return_value=httpx.Response(200, json=bundle(documents)))
    router.get(url__regex=rf"{BASE}/[A-Za-z]+(\?.*)?$").mock(
        return_value=httpx.Response(200, json=bundle([]))
    )


def _observations_forever(request: httpx.Request) -> httpx.Response:
    page = int(request.url.params.get("page", "0"))
    obs = {
        "resourceType": "Observation",
        "id": f"o{page}",
        "status": "final",
        "code": {"text": "Heart rate"},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": "2024-01-01",
    }
    return httpx.Response(200, json=bundle([obs], f"{BASE}/Observation?page={page + 1}"))


def document(id: str, attachment: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": id,
        "status": "current",
        "subject": {"reference": "Patient/p"},
        "date": "2024-01-15T10:00:00Z",
        "content": [{"attachment": attachment}],
    }


async def test_fetch_names_each_truncated_search_and_attachment_and_keeps_the_rest(
    router: respx.MockRouter,
) -> None:
    big = CountingStream(chunks=300, fill=b"a")
    router.get("/Binary/big").mock(
        return_value=httpx.Response(200, headers={"content-type": "text/plain"}, stream=big)
    )
    inline = base64.b64encode(b"b" * (40 * KIB)).decode()
    ok = base64.b64encode(b"Seen for follow up; doing well.").decode()
    patient_server(
        router,
        [
            document("doc-big", {"contentType": "text/plain", "url": f"{BASE}/Binary/big"}),
            document("doc-inline", {"contentType": "text/plain", "data": inline}),
            document("doc-ok", {"contentType": "text/plain", "data": ok}),
        ],
    )
    settings = FhirSettings(
        base_url=BASE, max_pages_per_search=5, max_attachment_bytes=16 * KIB, max_response_bytes=256 * KIB
    )
    async with fhir_client(settings) as client:
        record = await fetch_record(client, "p", observation_limit=1000)

    truncated = {s.resource: s.reason for s in record.truncated}
    assert "after 5 pages" in truncated["Observation"]
    assert "max_attachment_bytes" in truncated["DocumentReference/doc-big#content[0]"]
    assert "max_attachment_bytes" in truncated["DocumentReference/doc-inline#content[0]"]
    assert len(record.of_type("Observation")) == 5
    assert [n.source.id for n in record.notes] == ["doc-ok"]
    assert big.sent <= 16 * KIB * 4 // 3 + 4096 + CHUNK
    # A truncated search is not a refused one: the type is not reported as missing.
    assert not any(s.whole_type for s in record.skipped)


def test_the_caps_are_settings_with_safe_defaults() -> None:
    s = FhirSettings()
    assert 1 <= s.max_pages_per_search <= 1000
    assert s.max_resources_per_search <= 100_000
    assert s.max_response_bytes <= 64 * 1024 * 1024
    assert s.max_attachment_bytes <= 32 * 1024 * 1024
    with pytest.raises(ValueError, match="max_pages_per_search"):
        FhirSettings(max_pages_per_search=0)
