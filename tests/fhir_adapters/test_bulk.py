"""Bulk Data $export against a respx-mocked FHIR server: kick-off, polling, NDJSON, cleanup."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from fhir_adapters.auth import StaticToken
from fhir_adapters.bulk.export import (
    MAX_CONSECUTIVE_POLL_FAILURES,
    delete_export,
    export_resources,
    kick_off,
    stream_ndjson,
    wait_for_manifest,
)
from fhir_adapters.bulk.manifest import (
    BulkExportError,
    BulkExportTimeout,
    ExportFile,
    ExportReport,
    NdjsonStats,
    parse_manifest,
)
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import (
    FhirAuthError,
    FhirBadRequest,
    FhirNotFound,
    FhirServerError,
    FhirTransportError,
)

BASE = "http://127.0.0.1:8998/fhir"
OTHER_ORIGIN = "http://127.0.0.1:8997"
STATUS_PATH = "/bulk-status/job1"
STATUS_URL = f"{BASE}{STATUS_PATH}"
TRANSACTION_TIME = "2024-05-01T10:00:00.000Z"
TOKEN = "secret-token-value"


class FakeTime:
    """A clock and an async sleep that only advances it: the waits a poll loop asks for, instantly."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class RotatingTokens:
    """A TokenProvider fake: hands out the next token after each invalidation."""

    def __init__(self, *tokens: str) -> None:
        self._tokens = list(tokens)
        self.invalidations = 0

    async def token(self) -> str:
        return self._tokens[min(self.invalidations, len(self._tokens) - 1)]

    async def invalidate(self) -> None:
        self.invalidations += 1


def outcome(code: str, text: str = "export failed") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


def manifest_body(
    output: list[dict[str, Any]], error: list[dict[str, Any]] | None = None, *, requires_token: bool = False
) -> dict[str, Any]:
    return {
        "transactionTime": TRANSACTION_TIME,
        "request": f"{BASE}/Patient/$export?_type=Patient,Condition",
        "requiresAccessToken": requires_token,
        "output": output,
        "error": error or [],
    }


def ndjson(resources: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in resources)


def accepted(location: str = STATUS_URL) -> httpx.Response:
    return httpx.Response(202, headers={"Content-Location": location})


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
async def client() -> AsyncIterator[FhirClient]:
    # Zero backoff: the client's own retries (file downloads, DELETE) take no time in tests.
    async with FhirClient(BASE, max_attempts=2, backoff_initial=0.0, backoff_max=0.0) as fhir:
        yield fhir


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


# ---------------------------------------------------------------------------
# kick-off
# ---------------------------------------------------------------------------


async def test_kick_off_posts_a_parameters_body_with_async_headers_and_returns_the_status_url(router, client):
    route = router.post("/Patient/$export").mock(return_value=accepted())

    status_url = await kick_off(
        client,
        types=["Patient", "Condition"],
        since="2024-04-30T22:00:00.000Z",
        type_filters=["Condition?clinical-status=active"],
    )

    assert status_url == STATUS_URL
    request = route.calls.last.request
    assert request.headers["Prefer"] == "respond-async"
    assert request.headers["Accept"] == "application/fhir+json"
    body = json.loads(request.content)
    assert body["resourceType"] == "Parameters"
    assert body["parameter"] == [
        {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
        {"name": "_type", "valueString": "Patient,Condition"},
        {"name": "_since", "valueInstant": "2024-04-30T22:00:00.000Z"},
        {"name": "_typeFilter", "valueString": "Condition?clinical-status=active"},
    ]


async def test_kick_off_with_a_group_exports_that_group(router, client):
    route = router.post("/Group/nightly-7/$export").mock(return_value=accepted())

    await kick_off(client, group_id="nightly-7", types=["Patient"])

    assert route.call_count == 1


async def test_kick_off_resolves_a_relative_content_location_against_the_base(router, client):
    router.post("/Patient/$export").mock(return_value=accepted("bulk-status/job1"))

    assert await kick_off(client, types=["Patient"]) == STATUS_URL


async def test_kick_off_falls_back_to_get_with_query_parameters_when_post_is_not_allowed(router, client):
    post = router.post("/Patient/$export").mock(
        return_value=httpx.Response(405, json=outcome("not-supported"))
    )
    get = router.get("/Patient/$export").mock(return_value=accepted())

    status_url = await kick_off(
        client,
        types=["Patient", "Condition"],
        since="2024-04-30T22:00:00Z",
        type_filters=["Condition?code=1"],
    )

    assert status_url == STATUS_URL
    assert post.call_count == 1
    request = get.calls.last.request
    assert request.headers["Prefer"] == "respond-async"
    assert request.url.params.multi_items() == [
        ("_outputFormat", "application/fhir+ndjson"),
        ("_type", "Patient,Condition"),
        ("_since", "2024-04-30T22:00:00Z"),
        ("_typeFilter", "Condition?code=1"),
    ]


async def test_a_refused_kick_off_carries_the_operation_outcome_and_is_not_retried(router, client):
    route = router.post("/Patient/$export").mock(
        return_value=httpx.Response(400, json=outcome("invalid", "Unsupported _type Foo"))
    )

    with pytest.raises(FhirBadRequest) as caught:
        await kick_off(client, types=["Patient"])

    assert caught.value.diagnostics == "Unsupported _type Foo"
    assert route.call_count == 1


async def test_a_kick_off_refused_for_lack_of_scopes_stays_an_auth_error(router, client):
    router.post("/Patient/$export").mock(return_value=httpx.Response(403, json=outcome("forbidden")))

    with pytest.raises(FhirAuthError):
        await kick_off(client, types=["Patient"])


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (httpx.Response(200, json=manifest_body([])), "expected 202"),
        (httpx.Response(202), "without a Content-Location"),
        (httpx.Response(202, headers={"Content-Location": f"{OTHER_ORIGIN}/status/1"}), "origin"),
    ],
    ids=["not-202", "no-content-location", "status-url-elsewhere"],
)
async def test_an_unusable_kick_off_answer_is_a_bulk_export_error(router, client, answer, says):
    router.post("/Patient/$export").mock(return_value=answer)

    with pytest.raises(BulkExportError, match=says):
        await kick_off(client, types=["Patient"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"types": ["patient"]}, "_type"),
        ({"types": "Patient"}, "_type"),
        ({"since": "yesterday"}, "_since"),
        ({"since": "2024-05-01"}, "_since"),
        ({"type_filters": ["status=final"]}, "_typeFilter"),
        ({"group_id": "../Patient"}, "group_id"),
    ],
)
async def test_bad_export_parameters_are_refused_naming_the_parameter_before_any_request(
    router, client, kwargs, field
):
    route = router.route().mock(return_value=accepted())

    with pytest.raises(ValueError, match=field):
        await kick_off(client, **kwargs)

    assert route.call_count == 0


# ---------------------------------------------------------------------------
# polling
# ---------------------------------------------------------------------------


async def test_polling_waits_as_retry_after_says_until_the_manifest_arrives(router, client, fake_time):
    files = [{"type": "Patient", "url": f"{BASE}/files/Patient.ndjson", "count": 3}]
    route = router.get(STATUS_PATH).mock(
        side_effect=[
            httpx.Response(202, headers={"Retry-After": "7", "X-Progress": "collecting"}),
            httpx.Response(202, headers={"Retry-After": "3", "X-Progress": "writing"}),
            httpx.Response(200, json=manifest_body(files)),
        ]
    )

    with capture_logs() as logs:
        manifest = await wait_for_manifest(client, STATUS_URL, sleep=fake_time.sleep, clock=fake_time.clock)

    assert fake_time.sleeps == [7.0, 3.0]
    assert route.call_count == 3
    assert manifest.transaction_time == TRANSACTION_TIME
    assert manifest.output == [ExportFile("Patient", f"{BASE}/files/Patient.ndjson", 3)]
    assert manifest.requires_access_token is False
    assert [e["progress"] for e in logs if e["event"] == "bulk.poll"] == ["collecting", "writing"]


async def test_polling_honours_retry_after_given_as_an_http_date(router, client, fake_time):
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    router.get(STATUS_PATH).mock(
        side_effect=[
            httpx.Response(202, headers={"Retry-After": when}),
            httpx.Response(200, json=manifest_body([])),
        ]
    )

    await wait_for_manifest(client, STATUS_URL, sleep=fake_time.sleep, clock=fake_time.clock)

    assert len(fake_time.sleeps) == 1
    assert 27.0 <= fake_time.sleeps[0] <= 30.0


async def test_polling_without_retry_after_backs_off_exponentially_up_to_max_poll(router, client, fake_time):
    router.get(STATUS_PATH).mock(
        side_effect=[httpx.Response(202)] * 5 + [httpx.Response(200, json=manifest_body([]))]
    )

    await wait_for_manifest(
        client, STATUS_URL, min_poll=1.0, max_poll=5.0, sleep=fake_time.sleep, clock=fake_time.clock
    )

    assert fake_time.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]


async def test_polling_too_often_is_answered_by_waiting_the_429_retry_after_and_polling_on(
    router, client, fake_time
):
    route = router.get(STATUS_PATH).mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "12"}),
            httpx.Response(202, headers={"Retry-After": "2"}),
            httpx.Response(200, json=manifest_body([])),
        ]
    )

    manifest = await wait_for_manifest(client, STATUS_URL, sleep=fake_time.sleep, clock=fake_time.clock)

    assert fake_time.sleeps == [12.0, 2.0]
    assert route.call_count == 3
    assert manifest.transaction_time == TRANSACTION_TIME


async def test_a_retry_after_longer_than_max_poll_is_still_honoured(router, client, fake_time):
    router.get(STATUS_PATH).mock(
        side_effect=[
            httpx.Response(202, headers={"Retry-After": "300"}),
            httpx.Response(200, json=manifest_body([])),
        ]
    )

    await wait_for_manifest(client, STATUS_URL, max_poll=60.0, sleep=fake_time.sleep, clock=fake_time.clock)

    assert fake_time.sleeps == [300.0]


async def test_a_failed_export_is_an_error_naming_the_status_url_and_carrying_the_outcome(
    router, client, fake_time
):
    route = router.get(STATUS_PATH).mock(
        return_value=httpx.Response(500, json=outcome("exception", "disk full"))
    )

    with pytest.raises(BulkExportError) as caught:
        await wait_for_manifest(client, STATUS_URL, sleep=fake_time.sleep, clock=fake_time.clock)

    assert STATUS_URL in str(caught.value)
    assert caught.value.status == 500
    assert caught.value.diagnostics == "disk full"
    assert "disk full" not in str(caught.value)  # diagnostics may echo content: data, not message
    assert route.call_count == 1


async def test_an_expired_export_is_an_error_naming_the_status_url(router, client, fake_time):
    router.get(STATUS_PATH).mock(return_value=httpx.Response(404, json=outcome("not-found", "No export")))

    with pytest.raises(BulkExportError, match=STATUS_URL):
        await wait_for_manifest(client, STATUS_URL, sleep=fake_time.sleep, clock=fake_time.clock)


async def test_transient_poll_failures_are_polled_again(router, client, fake_time):
    route = router.get(STATUS_PATH).mock(
        side_effect=[
            httpx.Response(500, json=outcome("transient", "busy")),
            httpx.Response(503),
            httpx.ConnectError("refused"),
            httpx.Response(200, json=manifest_body([])),
        ]
    )

    manifest = await wait_for_manifest(
        client, STATUS_URL, min_poll=0.5, sleep=fake_time.sleep, clock=fake_time.clock
    )

    assert manifest.transaction_time == TRANSACTION_TIME
    assert route.call_count == 4
    assert fake_time.sleeps == [0.5, 1.0, 2.0]


async def test_a_transient_failure_that_persists_is_raised_after_a_bounded_number_of_polls(
    router, client, fake_time
):
    route = router.get(STATUS_PATH).mock(return_value=httpx.Response(503))

    with pytest.raises(FhirServerError):
        await wait_for_manifest(client, STATUS_URL, sleep=fake_time.sleep, clock=fake_time.clock)

    assert route.call_count == MAX_CONSECUTIVE_POLL_FAILURES


async def test_polling_gives_up_when_the_next_wait_would_pass_max_wait_seconds(router, client, fake_time):
    route = router.get(STATUS_PATH).mock(return_value=httpx.Response(202, headers={"Retry-After": "10"}))

    with pytest.raises(BulkExportTimeout, match=STATUS_URL):
        await wait_for_manifest(
            client, STATUS_URL, max_wait_seconds=25.0, sleep=fake_time.sleep, clock=fake_time.clock
        )

    assert fake_time.sleeps == [10.0, 10.0]
    assert route.call_count == 3


async def test_a_manifest_that_is_not_json_is_a_bulk_export_error(router, client, fake_time):
    router.get(STATUS_PATH).mock(return_value=httpx.Response(200, text="<html>done</html>"))

    with pytest.raises(BulkExportError, match="not JSON"):
        await wait_for_manifest(client, STATUS_URL, sleep=fake_time.sleep, clock=fake_time.clock)


def test_a_manifest_keeps_its_good_entries_and_names_the_bad_ones():
    body = {
        "transactionTime": TRANSACTION_TIME,
        "output": [
            {"type": "Patient", "url": "http://h/p.ndjson"},
            {"type": "Condition"},
            "junk",
            {"type": "Observation", "url": "http://h/o.ndjson", "count": -1},
        ],
        "error": [{"type": "OperationOutcome", "url": "http://h/e.ndjson", "count": 1}],
    }

    manifest = parse_manifest(body, STATUS_URL)

    assert manifest.output == [
        ExportFile("Patient", "http://h/p.ndjson"),
        ExportFile("Observation", "http://h/o.ndjson", None),
    ]
    assert manifest.error == [ExportFile("OperationOutcome", "http://h/e.ndjson", 1)]
    assert manifest.requires_access_token is True  # missing: the safe reading
    assert manifest.problems == [
        "output[1]: no url",
        "output[2]: not an object",
        "output[3]: count is not a non-negative integer, ignored",
        "requiresAccessToken: missing or not a boolean, taken as true",
    ]


def test_a_manifest_without_transaction_time_is_refused_naming_the_status_url():
    with pytest.raises(BulkExportError, match=f"{STATUS_URL} has no transactionTime"):
        parse_manifest({"output": []}, STATUS_URL)


# ---------------------------------------------------------------------------
# NDJSON streaming
# ---------------------------------------------------------------------------


async def collect(stream: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    async with aclosing(stream):
        return [resource async for resource in stream]


async def test_malformed_lines_are_skipped_and_counted_with_their_line_numbers(router, client):
    body = b"".join(
        [
            b'{"resourceType":"Patient","id":"p1"}\n',
            b'{"resourceType":"Patient",\n',
            b"[1, 2]\n",
            b"\n",
            b'{"resourceType":"Patient","id":"p2"}\r\n',
            b'{"id":"no-type"}\n',
            b'{"resourceType":"Patient","id":"\xff"}\n',
            b'{"resourceType":"Patient","id":"p3"}',  # no newline at the end of the file
        ]
    )

    async def chunks() -> AsyncIterator[bytes]:
        # Cut at awkward places: lines arrive split across chunks.
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    router.get("/files/Patient.ndjson").mock(return_value=httpx.Response(200, content=chunks()))
    stats = NdjsonStats()

    resources = await collect(stream_ndjson(client, f"{BASE}/files/Patient.ndjson", stats=stats))

    assert [r["id"] for r in resources] == ["p1", "p2", "p3"]
    assert stats.lines == 8
    assert stats.resources == 3
    assert stats.malformed == 4
    assert stats.malformed_lines == [
        (2, "not JSON"),
        (3, "not a JSON object"),
        (6, "no resourceType"),
        (7, "not UTF-8"),
    ]


async def test_a_large_file_is_consumed_as_it_arrives_never_read_ahead(router, client):
    lines_per_chunk, chunk_count = 50, 400
    produced = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal produced
        for chunk in range(chunk_count):
            produced += 1
            yield b"".join(
                b'{"resourceType":"Observation","id":"o%d"}\n' % (chunk * lines_per_chunk + n)
                for n in range(lines_per_chunk)
            )

    router.get("/files/Observation.ndjson").mock(return_value=httpx.Response(200, content=chunks()))

    count = 0
    most_ahead = 0
    stream = stream_ndjson(client, f"{BASE}/files/Observation.ndjson")
    async with aclosing(stream):
        async for resource in stream:
            assert resource["id"] == f"o{count}"
            # When resource `count` comes out, only the chunk holding it (and at most the next) was read.
            most_ahead = max(most_ahead, produced - (count // lines_per_chunk + 1))
            count += 1

    assert count == lines_per_chunk * chunk_count
    assert most_ahead <= 1


async def test_a_line_over_the_limit_is_skipped_without_being_buffered(router, client):
    huge = b'{"resourceType":"Binary","data":"' + b"A" * 10_000 + b'"}\n'
    body = huge + b'{"resourceType":"Patient","id":"p1"}\n'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100):
            yield body[start : start + 100]

    router.get("/files/mixed.ndjson").mock(return_value=httpx.Response(200, content=chunks()))
    stats = NdjsonStats()

    resources = await collect(
        stream_ndjson(client, f"{BASE}/files/mixed.ndjson", stats=stats, max_line_bytes=1000)
    )

    assert [r["id"] for r in resources] == ["p1"]
    assert stats.malformed_lines == [(1, "longer than the line limit")]


async def test_a_connection_lost_mid_file_is_a_transport_error_after_the_lines_already_read(router, client):
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"resourceType":"Patient","id":"p1"}\n'
        raise httpx.ReadError("connection reset")

    router.get("/files/Patient.ndjson").mock(return_value=httpx.Response(200, content=chunks()))
    seen: list[str] = []

    with pytest.raises(FhirTransportError, match="lost"):
        stream = stream_ndjson(client, f"{BASE}/files/Patient.ndjson")
        async with aclosing(stream):
            async for resource in stream:
                seen.append(resource["id"])

    assert seen == ["p1"]


async def test_a_missing_file_is_not_found_carrying_the_outcome(router, client):
    router.get("/files/gone.ndjson").mock(
        return_value=httpx.Response(404, json=outcome("not-found", "No such file"))
    )

    with pytest.raises(FhirNotFound) as caught:
        await collect(stream_ndjson(client, f"{BASE}/files/gone.ndjson"))

    assert caught.value.diagnostics == "No such file"


async def test_opening_a_file_is_retried_on_503(router, client):
    route = router.get("/files/Patient.ndjson").mock(
        side_effect=[
            httpx.Response(503),
            httpx.Response(200, content=ndjson([{"resourceType": "Patient", "id": "1"}])),
        ]
    )

    resources = await collect(stream_ndjson(client, f"{BASE}/files/Patient.ndjson"))

    assert [r["id"] for r in resources] == ["1"]
    assert route.call_count == 2


async def test_the_token_goes_with_a_file_only_when_required_and_on_the_fhir_origin():
    file_body = ndjson([{"resourceType": "Patient", "id": "1"}])
    with respx.mock(assert_all_called=False) as mock:
        own = mock.get(f"{BASE}/files/Patient.ndjson").mock(
            return_value=httpx.Response(200, content=file_body)
        )
        elsewhere = mock.get(f"{OTHER_ORIGIN}/signed/Patient.ndjson").mock(
            return_value=httpx.Response(200, content=file_body)
        )
        async with FhirClient(BASE, auth=StaticToken(TOKEN)) as fhir:
            await collect(stream_ndjson(fhir, f"{BASE}/files/Patient.ndjson", requires_access_token=True))
            assert own.calls.last.request.headers["Authorization"] == f"Bearer {TOKEN}"

            await collect(stream_ndjson(fhir, f"{BASE}/files/Patient.ndjson", requires_access_token=False))
            assert "Authorization" not in own.calls.last.request.headers

            signed = f"{OTHER_ORIGIN}/signed/Patient.ndjson?sig=abc"
            assert len(await collect(stream_ndjson(fhir, signed, requires_access_token=False))) == 1
            assert "Authorization" not in elsewhere.calls.last.request.headers

            with pytest.raises(FhirBadRequest, match="not the FHIR server's origin"):
                await collect(stream_ndjson(fhir, signed, requires_access_token=True))
            assert elsewhere.call_count == 1


async def test_a_file_read_renews_the_token_once_on_401():
    tokens = RotatingTokens("expired", "fresh")
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        route = mock.get("/files/Patient.ndjson").mock(
            side_effect=[
                httpx.Response(401),
                httpx.Response(200, content=ndjson([{"resourceType": "Patient", "id": "1"}])),
            ]
        )
        async with FhirClient(BASE, auth=tokens) as fhir:
            resources = await collect(stream_ndjson(fhir, f"{BASE}/files/Patient.ndjson"))

    assert [r["id"] for r in resources] == ["1"]
    assert [c.request.headers["Authorization"] for c in route.calls] == ["Bearer expired", "Bearer fresh"]
    assert tokens.invalidations == 1


async def test_logs_of_a_file_read_carry_no_line_content_query_string_or_token():
    body = b'{"resourceType":"Patient","name":[{"family":"Smithson"}]\n{"resourceType":"Patient","id":"1"}\n'
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        mock.get("/files/Patient.ndjson").mock(return_value=httpx.Response(200, content=body))
        async with FhirClient(BASE, auth=StaticToken(TOKEN)) as fhir:
            with capture_logs() as logs:
                await collect(stream_ndjson(fhir, f"{BASE}/files/Patient.ndjson?sig=qwerty"))

    text = json.dumps(logs)
    assert "bulk.ndjson.malformed_line" in text
    for secret in ("Smithson", "qwerty", TOKEN):
        assert secret not in text


# ---------------------------------------------------------------------------
# DELETE and the whole export
# ---------------------------------------------------------------------------


async def test_delete_export_deletes_the_status_url_and_ignores_an_export_already_gone(router, client):
    route = router.delete(STATUS_PATH).mock(
        side_effect=[httpx.Response(202), httpx.Response(404, json=outcome("not-found"))]
    )

    assert await delete_export(client, STATUS_URL) is True
    assert await delete_export(client, STATUS_URL) is False
    assert route.call_count == 2


def mock_export(
    router: respx.MockRouter, *, status: list[httpx.Response] | None = None
) -> dict[str, respx.Route]:
    patients = [{"resourceType": "Patient", "id": "p1"}, {"resourceType": "Patient", "id": "p2"}]
    conditions = [{"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}}]
    problems = [outcome("processing", "Observation/o9 could not be exported")]
    manifest = manifest_body(
        [
            {"type": "Patient", "url": f"{BASE}/files/Patient.ndjson", "count": 2},
            {"type": "Condition", "url": f"{BASE}/files/Condition.ndjson", "count": 1},
        ],
        [{"type": "OperationOutcome", "url": f"{BASE}/files/errors.ndjson", "count": 1}],
    )
    return {
        "kickoff": router.post("/Patient/$export").mock(return_value=accepted()),
        "status": router.get(STATUS_PATH).mock(
            side_effect=status or [httpx.Response(202), httpx.Response(200, json=manifest)]
        ),
        "patients": router.get("/files/Patient.ndjson").mock(
            return_value=httpx.Response(200, content=ndjson(patients))
        ),
        "conditions": router.get("/files/Condition.ndjson").mock(
            return_value=httpx.Response(200, content=ndjson(conditions))
        ),
        "errors": router.get("/files/errors.ndjson").mock(
            return_value=httpx.Response(200, content=ndjson(problems))
        ),
        "delete": router.delete(STATUS_PATH).mock(return_value=httpx.Response(202)),
    }


async def test_export_resources_yields_every_resource_reports_the_run_and_deletes_the_job(
    router, client, fake_time
):
    routes = mock_export(router)
    report = ExportReport()

    stream = export_resources(
        client,
        types=["Patient", "Condition"],
        since="2024-04-01T00:00:00Z",
        report=report,
        sleep=fake_time.sleep,
    )
    async with aclosing(stream):
        got = [(rtype, resource["id"]) async for rtype, resource in stream]

    assert got == [("Patient", "p1"), ("Patient", "p2"), ("Condition", "c1")]
    sent = json.loads(routes["kickoff"].calls.last.request.content)["parameter"]
    assert {"name": "_since", "valueInstant": "2024-04-01T00:00:00Z"} in sent
    assert report.status_url == STATUS_URL
    assert report.transaction_time == TRANSACTION_TIME
    assert report.resources_by_type == {"Patient": 2, "Condition": 1}
    assert report.error_count == 1
    assert report.error_outcomes[0]["issue"][0]["code"] == "processing"
    assert report.malformed_lines == 0
    assert report.deleted is True
    assert routes["delete"].call_count == 1


async def test_export_resources_deletes_the_job_when_the_caller_stops_early(router, client, fake_time):
    routes = mock_export(router)

    stream = export_resources(client, types=["Patient", "Condition"], sleep=fake_time.sleep)
    async with aclosing(stream):
        async for _ in stream:
            break

    assert routes["delete"].call_count == 1
    assert routes["conditions"].call_count == 0


async def test_export_resources_deletes_the_job_when_the_export_failed(router, client, fake_time):
    routes = mock_export(router, status=[httpx.Response(500, json=outcome("exception"))])

    with pytest.raises(BulkExportError):
        stream = export_resources(client, types=["Patient"], sleep=fake_time.sleep)
        async with aclosing(stream):
            async for _ in stream:
                pass

    assert routes["delete"].call_count == 1
