"""Bulk Data `$export` (FHIR Bulk Data Access 2.0), the IO: kick off, poll, stream the NDJSON, clean up.

- `kick_off` POSTs `[base]/Group/[id]/$export` or `[base]/Patient/$export` with
  `Prefer: respond-async` and a Parameters body (`_outputFormat`, `_type`, `_since`,
  `_typeFilter`), falls back to GET with the same query parameters when the server answers
  405, and returns the status URL from `Content-Location`.
- `wait_for_manifest` polls the status URL: on 202 (and on 429) it waits as `Retry-After`
  says (seconds or an HTTP date), else backs off exponentially between `min_poll` and
  `max_poll`; it gives up after `max_wait_seconds`; a 200 is parsed into an `ExportManifest`.
- `stream_ndjson` reads one output file as it arrives, line by line, and yields resources.
- `delete_export` tells the server it may drop the job and its files.
- `export_resources` does all four and fills an `ExportReport` (the manifest, whose
  `transaction_time` is the next run's `_since`, and the counts).

Every request goes through the client's one send path (`FhirClient.request` / `stream`). Errors
are `manifest.BulkExportError` / `BulkExportTimeout` and the client's own (an auth error at
kick-off stays `FhirAuthError`).

What it must not do: hold a whole file in memory, crash on a bad line (it is skipped and counted
with its line number), send the bearer token with a file unless the manifest says
`requiresAccessToken` and the file is under the FHIR server's base URL, or log anything but paths,
ids, counts, line numbers and reasons (never a line's content, a query string or a token).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import structlog

from fhir_adapters.bulk.manifest import (
    DEFAULT_TYPES,
    MAX_LINE_BYTES,
    MAX_REPORTED,
    BulkExportError,
    BulkExportTimeout,
    ExportManifest,
    ExportReport,
    JsonObject,
    LineSplitter,
    NdjsonStats,
    export_parameters,
    is_transient,
    kickoff_path,
    parameters_resource,
    parse_manifest,
    parse_ndjson_line,
    poll_delay,
)
from fhir_adapters.client import (
    FHIR_JSON,
    NDJSON,
    FhirClient,
    operation_outcome,
    parse_retry_after,
    resolve_url,
    url_without_query,
    within_base,
)
from fhir_adapters.client.search import tokenless_refusal
from fhir_adapters.errors import FhirError, FhirNotFound, FhirRateLimited, FhirTransportError

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]

# Status polls that fail in a row (connection lost, transient outcome, bare 502-504) before giving up.
MAX_CONSECUTIVE_POLL_FAILURES = 5
MAX_PROGRESS_CHARS = 80
_GATEWAY_STATUSES = frozenset({502, 503, 504})


async def kick_off(
    client: FhirClient,
    *,
    group_id: str | None = None,
    types: Sequence[str] = DEFAULT_TYPES,
    since: str | None = None,
    type_filters: Sequence[str] = (),
) -> str:
    """Start an export and return its status URL (absolute, under the FHIR server's base URL).

    POST with a Parameters body; a server that answers 405 (some Bulk Data 2.0 servers only take
    GET) is asked again with GET and query parameters. Never retried: each kick-off starts a job.
    """
    path = kickoff_path(group_id)
    pairs = export_parameters(types, since, type_filters)
    headers = {"Accept": FHIR_JSON, "Prefer": "respond-async"}
    try:
        response = await client.request(
            "POST", path, json=parameters_resource(pairs), headers=headers, idempotent=False
        )
    except FhirError as exc:
        if exc.status != 405:
            raise
        log.info("bulk.kickoff.get_fallback", path=path)
        response = await client.request("GET", path, params=pairs, headers=headers, idempotent=False)
    status_url = _status_url(client, response)
    log.info(
        "bulk.kickoff",
        path=path,
        method=response.request.method,
        status_path=httpx.URL(status_url).path,
        types=list(types),
        incremental=since is not None,
    )
    return status_url


def _status_url(client: FhirClient, response: httpx.Response) -> str:
    where = url_without_query(response.request.url)
    if response.status_code != 202:
        raise BulkExportError(
            f"bulk export kick-off at {where}: expected 202 Accepted, got {response.status_code}",
            status=response.status_code,
            outcome=operation_outcome(response),
            url=where,
        )
    location = response.headers.get("content-location", "").strip()
    if not location:
        raise BulkExportError(
            f"bulk export kick-off at {where}: 202 without a Content-Location (the status URL)",
            status=202,
            url=where,
        )
    status_url = resolve_url(client.base_url, location)
    if not within_base(status_url, client.base_url):
        # Polling carries the bearer token, which is for the FHIR server's API only.
        raise BulkExportError(
            f"bulk export kick-off at {where}: the status URL is not on the FHIR server's origin "
            f"and base path ({client.base_url})",
            status=202,
            url=where,
        )
    return status_url


async def wait_for_manifest(
    client: FhirClient,
    status_url: str,
    *,
    max_wait_seconds: float = 3600.0,
    min_poll: float = 1.0,
    max_poll: float = 120.0,
    sleep: Sleep = asyncio.sleep,
    clock: Clock = time.monotonic,
) -> ExportManifest:
    """Poll the status URL until the manifest is ready, within `max_wait_seconds` in all.

    202 and 429 wait as `Retry-After` says, or back off from `min_poll` doubling to `max_poll`.
    A failure the server marks transient (or a bare 502/503/504, or a lost connection) is polled
    again, up to MAX_CONSECUTIVE_POLL_FAILURES in a row. Any other error answer means the export
    failed: `BulkExportError` naming the status URL and carrying the OperationOutcome.
    """
    if min_poll <= 0 or max_poll < min_poll:
        raise ValueError(f"need 0 < min_poll <= max_poll, got min_poll={min_poll}, max_poll={max_poll}")
    if max_wait_seconds <= 0:
        raise ValueError(f"max_wait_seconds must be positive, got {max_wait_seconds}")
    started = clock()
    deadline = started + max_wait_seconds
    status_path = httpx.URL(status_url).path
    waits_without_hint = 0
    failures = 0
    polls = 0
    while True:
        polls += 1
        answer = await _poll_once(client, status_url)
        if isinstance(answer, _Pending) and answer.failure is not None:
            failures += 1
            if failures >= MAX_CONSECUTIVE_POLL_FAILURES:
                raise answer.failure
        else:
            failures = 0
        if isinstance(answer, ExportManifest):
            log.info(
                "bulk.manifest",
                status_path=status_path,
                polls=polls,
                seconds=round(clock() - started, 1),
                output_files=len(answer.output),
                error_files=len(answer.error),
                problems=answer.problems,
            )
            return answer
        if answer.retry_after is None:
            waits_without_hint += 1
        delay = poll_delay(answer.retry_after, waits_without_hint, min_poll, max_poll)
        remaining = deadline - clock()
        if delay > remaining:
            raise BulkExportTimeout(
                f"bulk export at {status_url} not ready after {clock() - started:.0f}s "
                f"(max_wait_seconds={max_wait_seconds:g}; next poll due in {delay:.0f}s)",
                url=status_url,
            )
        log.info(
            "bulk.poll",
            status_path=status_path,
            reason=answer.reason,
            progress=answer.progress,
            wait_s=round(delay, 3),
            polls=polls,
        )
        await sleep(delay)


@dataclass(frozen=True)
class _Pending:
    """Not ready yet: why, the server's wait if it gave one, and the failure if the poll failed."""

    retry_after: float | None
    reason: str
    progress: str | None = None
    # A poll failure the server marks as passing: raised if it persists.
    failure: FhirError | None = None


async def _poll_once(client: FhirClient, status_url: str) -> ExportManifest | _Pending:
    try:
        # The poll loop does its own waiting (Retry-After, the total bound), so no client retries.
        response = await client.request("GET", status_url, idempotent=False)
    except FhirRateLimited as exc:
        return _Pending(retry_after=exc.retry_after, reason="rate-limited")
    except FhirError as exc:
        passing = isinstance(exc, FhirTransportError) or is_transient(exc.outcome)
        if passing or (exc.status in _GATEWAY_STATUSES and exc.outcome is None):
            return _Pending(retry_after=None, reason="transient", failure=exc)
        raise BulkExportError(
            # No diagnostics in the message (they may echo content): the outcome travels as data.
            f"bulk export at {status_url} failed: the status URL answered {exc.status}",
            status=exc.status,
            outcome=exc.outcome,
            url=status_url,
        ) from exc
    if response.status_code == 202:
        progress = response.headers.get("x-progress")
        return _Pending(
            retry_after=parse_retry_after(response.headers.get("retry-after"), datetime.now(UTC)),
            reason="in-progress",
            progress=progress[:MAX_PROGRESS_CHARS] if progress else None,
        )
    if response.status_code != 200:
        raise BulkExportError(
            f"bulk export at {status_url}: unexpected status {response.status_code} while polling",
            status=response.status_code,
            url=status_url,
        )
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BulkExportError(
            f"bulk export at {status_url}: the manifest is not JSON", status=200, url=status_url
        ) from exc
    if not isinstance(body, dict):
        raise BulkExportError(
            f"bulk export at {status_url}: the manifest is not a JSON object", status=200, url=status_url
        )
    return parse_manifest(body, status_url)


async def stream_ndjson(
    client: FhirClient,
    url: str,
    *,
    requires_access_token: bool = True,
    stats: NdjsonStats | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> AsyncGenerator[JsonObject, None]:
    """Yield each resource of an NDJSON file as its bytes arrive (never the whole file in memory).

    A malformed line is skipped and recorded in `stats` with its line number and reason. With
    `requires_access_token` the file must be under the FHIR server's base URL and gets the token;
    without it no token is sent, wherever the file is.
    """
    stats = stats if stats is not None else NdjsonStats()
    path = httpx.URL(resolve_url(client.base_url, url)).path
    splitter = LineSplitter(max_line_bytes)
    chunks = client.stream(url, send_token=requires_access_token, accept=NDJSON)
    async with aclosing(chunks):
        async for chunk in chunks:
            for line in splitter.feed(chunk):
                resource = _take_line(line, stats, path)
                if resource is not None:
                    yield resource
        for line in splitter.finish():
            resource = _take_line(line, stats, path)
            if resource is not None:
                yield resource
    log.info(
        "bulk.ndjson.read", path=path, lines=stats.lines, resources=stats.resources, malformed=stats.malformed
    )


def _take_line(raw: bytes | None, stats: NdjsonStats, path: str) -> JsonObject | None:
    stats.lines += 1
    resource, reason = parse_ndjson_line(raw)
    if reason is not None:
        stats.record_malformed(stats.lines, reason)
        if stats.malformed <= MAX_REPORTED:
            log.warning("bulk.ndjson.malformed_line", path=path, line=stats.lines, reason=reason)
        return None
    if resource is not None:
        stats.resources += 1
    return resource


async def delete_export(client: FhirClient, status_url: str) -> bool:
    """DELETE the status URL so the server can drop the job and its files; False if already gone."""
    try:
        await client.request("DELETE", status_url, idempotent=True)
    except FhirNotFound:
        log.info("bulk.delete.gone", status_path=httpx.URL(status_url).path)
        return False
    log.info("bulk.delete", status_path=httpx.URL(status_url).path)
    return True


async def export_resources(
    client: FhirClient,
    *,
    group_id: str | None = None,
    types: Sequence[str] = DEFAULT_TYPES,
    since: str | None = None,
    type_filters: Sequence[str] = (),
    report: ExportReport | None = None,
    max_wait_seconds: float = 3600.0,
    min_poll: float = 1.0,
    max_poll: float = 120.0,
    sleep: Sleep = asyncio.sleep,
    delete_when_done: bool = True,
) -> AsyncGenerator[tuple[str, JsonObject], None]:
    """Run one export end to end and yield `(resourceType, resource)` for every exported resource.

    `report` (pass your own to read it afterwards) gets the status URL, the manifest (its
    `transaction_time` is the next run's `_since`, once this iteration has ended without error),
    per-file line counts and the error files' OperationOutcomes. The job is deleted at the end,
    also when the iteration stops early or fails.
    """
    report = report if report is not None else ExportReport()
    status_url = await kick_off(
        client, group_id=group_id, types=types, since=since, type_filters=type_filters
    )
    report.status_url = status_url
    try:
        manifest = await wait_for_manifest(
            client,
            status_url,
            max_wait_seconds=max_wait_seconds,
            min_poll=min_poll,
            max_poll=max_poll,
            sleep=sleep,
        )
        report.manifest = manifest
        _check_tokenless_files(client, manifest, status_url)
        for export_file in manifest.output:
            stats = report.files.setdefault(url_without_query(export_file.url), NdjsonStats())
            resources = stream_ndjson(
                client, export_file.url, requires_access_token=manifest.requires_access_token, stats=stats
            )
            async with aclosing(resources):
                async for resource in resources:
                    resource_type = str(resource["resourceType"])
                    report.resources_by_type[resource_type] = (
                        report.resources_by_type.get(resource_type, 0) + 1
                    )
                    yield resource_type, resource
        await _read_error_files(client, manifest, report)
    finally:
        if delete_when_done:
            report.deleted = await _delete_quietly(client, status_url)


def _check_tokenless_files(client: FhirClient, manifest: ExportManifest, status_url: str) -> None:
    """Refuse the export before any file is read when a file to be read without the token is on a
    host chartbrief may not contact. Reading the others and moving `_since` on would lose the
    changes in the refused ones for good, so the whole export fails, naming each refused file."""
    if manifest.requires_access_token:
        return
    refused = []
    for export_file in [*manifest.output, *manifest.error]:
        reason = tokenless_refusal(export_file.url, client.base_url, client.file_hosts)
        if reason is not None:
            refused.append(f"{url_without_query(export_file.url)} ({export_file.type}: {reason})")
    if refused:
        log.warning("bulk.export.files_refused", files=len(refused))
        raise BulkExportError(
            f"bulk export at {url_without_query(status_url)}: refusing to read {len(refused)} file(s) served "
            f"without the access token: {'; '.join(refused)}. Only https files on the FHIR server's host "
            "are read, or on a host listed in CHARTBRIEF_FHIR__BULK_FILE_HOSTS",
            status=200,
            url=url_without_query(status_url),
        )


async def _read_error_files(client: FhirClient, manifest: ExportManifest, report: ExportReport) -> None:
    for export_file in manifest.error:
        stats = report.files.setdefault(url_without_query(export_file.url), NdjsonStats())
        outcomes = stream_ndjson(
            client, export_file.url, requires_access_token=manifest.requires_access_token, stats=stats
        )
        async with aclosing(outcomes):
            async for outcome in outcomes:
                report.error_count += 1
                if len(report.error_outcomes) < MAX_REPORTED:
                    report.error_outcomes.append(outcome)
    if report.error_count:
        # Counts only: diagnostics can echo resource content.
        log.warning("bulk.export.errors", outcomes=report.error_count, files=len(manifest.error))


async def _delete_quietly(client: FhirClient, status_url: str) -> bool:
    # Cleanup must not hide the export's own result or error: a failed DELETE is only logged.
    try:
        return await delete_export(client, status_url)
    except FhirError as exc:
        log.warning("bulk.delete.failed", status_path=httpx.URL(status_url).path, status=exc.status)
        return False
