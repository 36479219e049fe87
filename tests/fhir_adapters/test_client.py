"""FhirClient against a FHIR server mocked at the transport (respx): paging, retries, errors, auth, logs."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from fhir_adapters.auth import StaticToken
from fhir_adapters.client import FhirClient, backoff_seconds, parse_retry_after, resolve_url, search_query
from fhir_adapters.errors import (
    FhirAuthError,
    FhirBadRequest,
    FhirConflict,
    FhirError,
    FhirNotFound,
    FhirPermanentError,
    FhirRateLimited,
    FhirRetryableError,
    FhirServerError,
    FhirTransportError,
    FhirUnexpectedResponse,
    error_for_status,
)

BASE = "http://127.0.0.1:8999/fhir"
MAX_ATTEMPTS = 3


def patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid}


def bundle(
    resources: list[dict[str, Any]], next_url: str | None = None, mode: str = "match"
) -> dict[str, Any]:
    links = [{"relation": "self", "url": f"{BASE}/Patient"}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [{"resource": r, "search": {"mode": mode}} for r in resources],
    }


def outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }


class RotatingTokens:
    """A TokenProvider fake: hands out the next token after each invalidation."""

    def __init__(self, *tokens: str) -> None:
        self._tokens = list(tokens)
        self.invalidations = 0

    async def token(self) -> str:
        return self._tokens[min(self.invalidations, len(self._tokens) - 1)]

    async def invalidate(self) -> None:
        self.invalidations += 1


@pytest.fixture
def router():
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
async def client(router):
    async with FhirClient(
        BASE, page_size=2, max_attempts=MAX_ATTEMPTS, backoff_initial=0.001, backoff_max=0.005
    ) as fhir:
        yield fhir


# -- paging -------------------------------------------------------------------


async def test_search_follows_next_links_until_exhausted_and_deduplicates(router, client):
    page3 = router.get("/Patient", params={"_getpagesoffset": "4"}).respond(json=bundle([patient("1")]))
    page2 = router.get("/Patient", params={"_getpagesoffset": "2"}).respond(
        json=bundle([patient("3"), patient("4")], f"{BASE}/Patient?_getpages=abc&_getpagesoffset=4")
    )
    page1 = router.get("/Patient").respond(
        json=bundle([patient("1"), patient("2")], f"{BASE}/Patient?_getpages=abc&_getpagesoffset=2")
    )

    ids = [r["id"] async for r in client.search("Patient", {"general-practitioner": "Practitioner/9"})]

    assert ids == ["1", "2", "3", "4"]
    assert (page1.call_count, page2.call_count, page3.call_count) == (1, 1, 1)
    first = page1.calls.last.request.url.params
    assert first["_count"] == "2" and first["general-practitioner"] == "Practitioner/9"
    # Next links are followed verbatim: nothing is added to them.
    assert "_count" not in page2.calls.last.request.url.params


async def test_search_yields_included_resources_as_well_as_matches(router, client):
    page = bundle([patient("1")])
    page["entry"].append(
        {"resource": {"resourceType": "Organization", "id": "1"}, "search": {"mode": "include"}}
    )
    router.get("/Patient").respond(json=page)

    found = await client.search_all("Patient", {"_include": "Patient:organization"})

    assert [(r["resourceType"], r["id"]) for r in found] == [("Patient", "1"), ("Organization", "1")]


async def test_search_follows_relative_next_links_against_the_base(router, client):
    page2 = router.get("/Patient", params={"page": "2"}).respond(json=bundle([patient("2")]))
    router.get("/Patient").respond(json=bundle([patient("1")], "Patient?page=2"))

    ids = [r["id"] for r in await client.search_all("Patient")]

    assert ids == ["1", "2"]
    assert str(page2.calls.last.request.url) == f"{BASE}/Patient?page=2"


async def test_search_restarts_once_when_the_paging_snapshot_expired(router, client):
    page2 = router.get("/Patient", params={"_getpagesoffset": "2"}).mock(
        side_effect=[
            httpx.Response(410, json=outcome("Search id abc does not exist and may have expired")),
            httpx.Response(200, json=bundle([patient("3")])),
        ]
    )
    page1 = router.get("/Patient").respond(
        json=bundle([patient("1"), patient("2")], f"{BASE}/Patient?_getpages=abc&_getpagesoffset=2")
    )

    ids = [r["id"] for r in await client.search_all("Patient")]

    assert ids == ["1", "2", "3"]  # page one read twice, its resources yielded once
    assert page1.call_count == 2 and page2.call_count == 2


async def test_search_gives_up_when_the_restarted_search_expires_again(router, client):
    router.get("/Patient", params={"_getpagesoffset": "2"}).respond(404, json=outcome("Unknown paging ID"))
    page1 = router.get("/Patient").respond(
        json=bundle([patient("1")], f"{BASE}/Patient?_getpages=abc&_getpagesoffset=2")
    )

    with pytest.raises(FhirNotFound):
        await client.search_all("Patient")
    assert page1.call_count == 2


async def test_search_first_page_not_found_is_not_restarted(router, client):
    route = router.get("/Patient").respond(404, json=outcome("no such type"))

    with pytest.raises(FhirNotFound):
        await client.search_all("Patient")
    assert route.call_count == 1


async def test_search_keeps_a_count_the_caller_gave(router, client):
    route = router.get("/Observation").respond(json=bundle([]))

    await client.search_all("Observation", {"patient": "1", "_count": "50", "code": ["a", "b"]})

    params = route.calls.last.request.url.params
    assert params.get_list("_count") == ["50"]
    assert params.get_list("code") == ["a", "b"]


async def test_search_all_stops_at_limit_without_reading_further_pages(router, client):
    page2 = router.get("/Patient", params={"page": "2"}).respond(json=bundle([patient("3")]))
    router.get("/Patient").respond(json=bundle([patient("1"), patient("2")], "Patient?page=2"))

    found = await client.search_all("Patient", limit=2)

    assert [r["id"] for r in found] == ["1", "2"]
    assert page2.call_count == 0


async def test_search_stops_when_a_next_link_points_back_to_a_page_already_read(router, client):
    route = router.get("/Patient").respond(json=bundle([patient("1")], "Patient?page=1"))

    found = await client.search_all("Patient")

    assert [r["id"] for r in found] == ["1"]
    assert route.call_count == 2


async def test_search_answer_that_is_not_a_bundle_is_unexpected(router, client):
    router.get("/Patient").respond(json=patient("1"))

    with pytest.raises(FhirUnexpectedResponse):
        await client.search_all("Patient")


# -- retries and status mapping -----------------------------------------------


async def test_read_retries_after_429_honouring_retry_after_then_succeeds(router, client):
    route = router.get("/Patient/1").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "0"}),
            httpx.Response(200, json=patient("1")),
        ]
    )

    assert (await client.read("Patient", "1"))["id"] == "1"
    assert route.call_count == 2


async def test_retry_after_overrides_a_long_backoff(router):
    router.get("/Patient/1").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "0"}),
            httpx.Response(200, json=patient("1")),
        ]
    )
    async with FhirClient(BASE, backoff_initial=20.0, backoff_max=30.0) as fhir:
        with capture_logs() as logs:
            await fhir.read("Patient", "1")

    retries = [e for e in logs if e["event"] == "fhir.retry"]
    assert [(e["wait_s"], e["status"], e["error"]) for e in retries] == [(0.0, 429, "FhirRateLimited")]


async def test_read_retries_after_503_then_succeeds(router, client):
    route = router.get("/Patient/1").mock(
        side_effect=[httpx.Response(503), httpx.Response(502), httpx.Response(200, json=patient("1"))]
    )

    assert (await client.read("Patient", "1"))["id"] == "1"
    assert route.call_count == 3


async def test_read_gives_up_after_max_attempts_with_server_error(router, client):
    route = router.get("/Patient/1").respond(503, json=outcome("overloaded"))

    with pytest.raises(FhirServerError) as caught:
        await client.read("Patient", "1")
    assert route.call_count == MAX_ATTEMPTS
    assert caught.value.status == 503
    assert caught.value.diagnostics == "overloaded"


async def test_not_found_is_not_retried_and_carries_the_operation_outcome(router, client):
    route = router.get("/Patient/404").respond(
        404,
        json=outcome("Resource Patient/404 is not known"),
        headers={"Content-Type": "application/fhir+json"},
    )

    with pytest.raises(FhirNotFound) as caught:
        await client.read("Patient", "404")
    assert route.call_count == 1
    error = caught.value
    assert error.status == 404
    assert error.outcome is not None and error.outcome["resourceType"] == "OperationOutcome"
    assert error.diagnostics == "Resource Patient/404 is not known"
    assert error.url == f"{BASE}/Patient/404"


@pytest.mark.parametrize("status", [400, 422])
async def test_rejected_request_is_a_bad_request_and_not_retried(router, client, status):
    route = router.get("/Patient/1").respond(status, json=outcome("bad"))

    with pytest.raises(FhirBadRequest):
        await client.read("Patient", "1")
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("status", "expected", "family"),
    [
        (400, FhirBadRequest, FhirPermanentError),
        (422, FhirBadRequest, FhirPermanentError),
        (401, FhirAuthError, FhirPermanentError),
        (403, FhirAuthError, FhirPermanentError),
        (404, FhirNotFound, FhirPermanentError),
        (410, FhirNotFound, FhirPermanentError),
        (409, FhirConflict, FhirPermanentError),
        (412, FhirConflict, FhirPermanentError),
        (418, FhirUnexpectedResponse, FhirPermanentError),
        (302, FhirUnexpectedResponse, FhirPermanentError),
        (429, FhirRateLimited, FhirRetryableError),
        (500, FhirServerError, FhirRetryableError),
        (504, FhirServerError, FhirRetryableError),
    ],
)
def test_errors_are_chosen_by_status(status, expected, family):
    error = error_for_status(status, method="GET", url=f"{BASE}/Patient/1")

    assert type(error) is expected
    assert isinstance(error, family)
    assert error.status == status
    assert error.diagnostics == "the server gave no diagnostics"


async def test_error_url_has_no_query_string(router, client):
    router.get("/Patient").respond(400, json=outcome("unknown parameter"))

    with pytest.raises(FhirBadRequest) as caught:
        await client.search_all("Patient", {"name": "Smith"})
    assert caught.value.url == f"{BASE}/Patient"
    assert "Smith" not in str(caught.value)


async def test_transport_error_becomes_fhir_transport_error_after_retries(router, client):
    route = router.get("/Patient/1").mock(side_effect=httpx.ConnectError("refused"))

    with pytest.raises(FhirTransportError) as caught:
        await client.read("Patient", "1")
    assert route.call_count == MAX_ATTEMPTS
    assert BASE in str(caught.value) and "unreachable" in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert caught.value.status is None


async def test_body_that_is_not_json_is_unexpected(router, client):
    router.get("/Patient/1").respond(200, text="<html>login</html>", headers={"Content-Type": "text/html"})

    with pytest.raises(FhirUnexpectedResponse):
        await client.read("Patient", "1")


# -- writes -------------------------------------------------------------------


async def test_plain_create_is_not_retried_on_503(router, client):
    route = router.post("/DocumentReference").respond(503)

    with pytest.raises(FhirServerError):
        await client.create({"resourceType": "DocumentReference", "status": "current"})
    assert route.call_count == 1


async def test_conditional_create_sends_if_none_exist_and_is_retried(router, client):
    created = {"resourceType": "DocumentReference", "id": "7", "status": "current"}
    route = router.post("/DocumentReference").mock(
        side_effect=[httpx.Response(503), httpx.Response(201, json=created)]
    )
    condition = "identifier=urn:chartbrief:summary|abc"

    result = await client.create(
        {"resourceType": "DocumentReference", "status": "current"}, if_none_exist=condition
    )

    assert result == created
    assert route.call_count == 2
    sent = route.calls.last.request
    assert sent.headers["If-None-Exist"] == condition
    assert sent.headers["Content-Type"] == "application/fhir+json"
    assert sent.headers["Prefer"] == "return=representation"
    assert json.loads(sent.content) == {"resourceType": "DocumentReference", "status": "current"}


async def test_create_without_a_body_reads_the_location(router, client):
    router.post("/Device").respond(201, headers={"Location": f"{BASE}/Device/5/_history/1"})
    read = router.get("/Device/5/_history/1").respond(json={"resourceType": "Device", "id": "5"})

    result = await client.create({"resourceType": "Device"})

    assert result["id"] == "5"
    assert read.call_count == 1


async def test_update_puts_with_if_match_and_is_retried(router, client):
    route = router.put("/DocumentReference/7").mock(
        side_effect=[
            httpx.Response(500),
            httpx.Response(200, json={"resourceType": "DocumentReference", "id": "7"}),
        ]
    )

    await client.update({"resourceType": "DocumentReference", "id": "7"}, if_match='W/"2"')

    assert route.call_count == 2
    assert route.calls.last.request.headers["If-Match"] == 'W/"2"'


async def test_update_without_id_is_refused_naming_the_field(client):
    with pytest.raises(ValueError, match="no id"):
        await client.update({"resourceType": "DocumentReference"})


@pytest.mark.parametrize(("idempotent", "calls"), [(False, 1), (True, MAX_ATTEMPTS)])
async def test_transaction_is_retried_only_when_declared_idempotent(router, client, idempotent, calls):
    route = router.post(BASE).respond(503)

    with pytest.raises(FhirServerError):
        await client.transaction({"resourceType": "Bundle", "type": "transaction"}, idempotent=idempotent)
    assert route.call_count == calls


# -- auth -----------------------------------------------------------------------


async def test_bearer_token_is_sent_on_every_request(router):
    route = router.get("/metadata").respond(json={"resourceType": "CapabilityStatement"})
    async with FhirClient(BASE, auth=StaticToken("s3cret-token")) as fhir:
        await fhir.capabilities()

    assert route.calls.last.request.headers["Authorization"] == "Bearer s3cret-token"
    assert route.calls.last.request.headers["Accept"] == "application/fhir+json"


async def test_401_invalidates_the_token_and_retries_once_with_a_new_one(router):
    route = router.get("/Patient/1").mock(
        side_effect=lambda request: (
            httpx.Response(200, json=patient("1"))
            if request.headers["Authorization"] == "Bearer fresh"
            else httpx.Response(401)
        )
    )
    tokens = RotatingTokens("stale", "fresh")
    async with FhirClient(BASE, auth=tokens, backoff_initial=0.001) as fhir:
        assert (await fhir.read("Patient", "1"))["id"] == "1"

    assert tokens.invalidations == 1
    assert route.call_count == 2


async def test_a_second_401_is_an_auth_error(router):
    route = router.get("/Patient/1").respond(401)
    tokens = RotatingTokens("stale", "also-stale")
    async with FhirClient(BASE, auth=tokens, backoff_initial=0.001) as fhir:
        with pytest.raises(FhirAuthError):
            await fhir.read("Patient", "1")

    assert tokens.invalidations == 1
    assert route.call_count == 2


def test_static_token_is_never_shown():
    token = StaticToken("s3cret-token")

    assert "s3cret" not in repr(token) and "s3cret" not in str(token)


# -- Binary ---------------------------------------------------------------------


async def test_binary_decodes_a_fhir_binary_resource(router, client):
    text = b"Chief complaint: cough."
    route = router.get("/Binary/9").respond(
        json={
            "resourceType": "Binary",
            "id": "9",
            "contentType": "text/plain",
            "data": base64.b64encode(text).decode(),
        },
        headers={"Content-Type": "application/fhir+json"},
    )

    content, content_type = await client.binary("Binary/9")

    assert (content, content_type) == (text, "text/plain")
    assert route.calls.last.request.headers["Accept"] == "application/fhir+json"


async def test_binary_returns_raw_bytes_when_the_server_sends_them(router, client):
    router.get("/Binary/9").respond(
        content=b"<p>note</p>", headers={"Content-Type": "text/html; charset=utf-8"}
    )

    content, content_type = await client.binary(f"{BASE}/Binary/9")

    assert (content, content_type) == (b"<p>note</p>", "text/html; charset=utf-8")


async def test_binary_refuses_a_url_on_another_host(router):
    other = router.get("http://127.0.0.2:8999/fhir/Binary/9").respond(content=b"x")
    async with FhirClient(BASE, auth=StaticToken("s3cret-token")) as fhir:
        with pytest.raises(FhirBadRequest) as caught:
            await fhir.binary("http://127.0.0.2:8999/fhir/Binary/9")

    assert other.call_count == 0
    assert "127.0.0.2" in str(caught.value)


async def test_binary_with_invalid_base64_is_unexpected(router, client):
    router.get("/Binary/9").respond(
        json={"resourceType": "Binary", "contentType": "text/plain", "data": "@@@"}
    )

    with pytest.raises(FhirUnexpectedResponse):
        await client.binary("Binary/9")


# -- logs -----------------------------------------------------------------------


async def test_log_lines_never_hold_the_query_string_or_the_token(router):
    router.get("/Patient").mock(
        side_effect=[httpx.Response(503), httpx.Response(200, json=bundle([patient("1")]))]
    )
    async with FhirClient(BASE, auth=StaticToken("s3cret-token"), backoff_initial=0.001) as fhir:
        with capture_logs() as logs:
            await fhir.search_all("Patient", {"family": "Smith", "birthdate": "1970-01-01"})

    requests = [entry for entry in logs if entry["event"] == "fhir.request"]
    assert [(e["method"], e["path"], e["status"], e["attempt"]) for e in requests] == [
        ("GET", "/fhir/Patient", 503, 1),
        ("GET", "/fhir/Patient", 200, 2),
    ]
    assert all(isinstance(e["elapsed_ms"], float) for e in requests)
    assert any(entry["event"] == "fhir.retry" for entry in logs)
    dumped = repr(logs)
    for secret in ("Smith", "1970-01-01", "s3cret", "_count", "?"):
        assert secret not in dumped


# -- construction and pure helpers ----------------------------------------------


async def test_aclose_leaves_a_shared_http_client_open(router):
    router.get("/metadata").respond(json={"resourceType": "CapabilityStatement"})
    async with httpx.AsyncClient() as shared:
        async with FhirClient(BASE, http=shared):
            pass
        assert not shared.is_closed
        async with FhirClient(BASE, http=shared) as again:
            await again.capabilities()


@pytest.mark.parametrize("bad_id", ["1/../Patient", "1?x=y", "", "a" * 65])
async def test_ids_that_would_change_the_path_are_refused(client, bad_id):
    with pytest.raises(ValueError, match="not a valid FHIR id"):
        await client.read("Patient", bad_id)


@pytest.mark.parametrize(
    ("link", "expected"),
    [
        ("Patient?page=2", f"{BASE}/Patient?page=2"),
        ("?_getpages=abc", f"{BASE}?_getpages=abc"),
        ("/other/Binary/1", "http://127.0.0.1:8999/other/Binary/1"),
        ("https://elsewhere.example/fhir?x=1", "https://elsewhere.example/fhir?x=1"),
    ],
)
def test_resolve_url_keeps_absolute_links_and_roots_relative_ones_at_the_base(link, expected):
    assert resolve_url(BASE, link) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("0", 0.0),
        ("12", 12.0),
        ("Mon, 01 Jan 2024 00:00:30 GMT", 30.0),
        ("Sun, 31 Dec 2023 23:59:00 GMT", 0.0),
        ("later", None),
        (None, None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(header, expected):
    assert parse_retry_after(header, datetime(2024, 1, 1, tzinfo=UTC)) == expected


def test_search_query_repeats_list_values_and_adds_count():
    assert search_query({"code": ["a", "b"]}, 10) == [("code", "a"), ("code", "b"), ("_count", "10")]


def test_every_error_is_a_fhir_error():
    for cls in (FhirTransportError, FhirRateLimited, FhirServerError, FhirBadRequest, FhirAuthError):
        assert issubclass(cls, FhirError)


@pytest.mark.parametrize(("attempt", "expected"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (200, 3.0)])
def test_backoff_doubles_from_the_initial_wait_up_to_the_cap(attempt, expected):
    assert backoff_seconds(attempt, 0.5, 3.0) == expected
