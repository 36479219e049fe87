"""Bulk Data `$export` (FHIR Bulk Data Access 2.0): kick off, poll, stream the NDJSON, clean up.

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

Errors, added under the client's tree (`fhir_adapters.errors`):

```
FhirPermanentError
└── BulkExportError        the kick-off answer or the manifest is unusable, or the server says the
                           export failed (carries its OperationOutcome, names the status URL)
FhirRetryableError
└── BulkExportTimeout      the manifest was not ready within max_wait_seconds (the job may still finish)
```

Other HTTP failures are the client's own errors (an auth error at kick-off stays `FhirAuthError`).

What it must not do: hold a whole file in memory, crash on a bad line (it is skipped and counted
with its line number), send the bearer token with a file unless the manifest says
`requiresAccessToken` and the file is on the FHIR server's origin, or log anything but paths,
ids, counts, line numbers and reasons (never a line's content, a query string or a token).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from fhir_adapters.client import (
    FhirClient,
    backoff_seconds,
    parse_retry_after,
    resolve_url,
    same_origin,
    url_without_query,
)
from fhir_adapters.errors import (
    FhirError,
    FhirNotFound,
    FhirPermanentError,
    FhirRateLimited,
    FhirRetryableError,
    FhirTransportError,
)
from fhir_adapters.scopes import CHANGE_TYPES

log = structlog.get_logger(__name__)

JsonObject = dict[str, Any]
Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]

NDJSON = "application/fhir+ndjson"
FHIR_JSON = "application/fhir+json"
# What a summary reads: the patient and every type `fetch` searches.
DEFAULT_TYPES: tuple[str, ...] = CHANGE_TYPES
# One resource per line; a DocumentReference with inline note data can be a few MB. A longer
# "line" is a broken file, and buffering it would defeat streaming.
MAX_LINE_BYTES = 32 * 1024 * 1024
# Malformed line numbers (and error-file outcomes) kept for the report; the count goes on.
MAX_REPORTED = 100
# Status polls that fail in a row (connection lost, transient outcome, bare 502-504) before giving up.
MAX_CONSECUTIVE_POLL_FAILURES = 5
MAX_PROGRESS_CHARS = 80

_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{0,63}")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE_FILTER = re.compile(r"[A-Z][A-Za-z]{0,63}\?\S+")
_GATEWAY_STATUSES = frozenset({502, 503, 504})


class BulkExportError(FhirPermanentError):
    """The export cannot be used: refused kick-off answer, failed job, or an unusable manifest."""


class BulkExportTimeout(FhirRetryableError):
    """The manifest was not ready in time; polling the same status URL later may still succeed."""


@dataclass(frozen=True)
class ExportFile:
    """One manifest entry: an NDJSON file of one resource type (`count` when the server says)."""

    type: str
    url: str
    count: int | None = None


@dataclass
class ExportManifest:
    """The completed export's manifest (Bulk Data 2.0 `transactionTime`, `output`, `error`)."""

    transaction_time: str
    request: str
    requires_access_token: bool
    output: list[ExportFile]
    error: list[ExportFile]
    # Manifest entries that were skipped, each with its position and why ("output[2]: no url").
    problems: list[str] = field(default_factory=list)


@dataclass
class NdjsonStats:
    """What reading one NDJSON file met: lines, resources, and the malformed lines skipped."""

    lines: int = 0
    resources: int = 0
    malformed: int = 0
    # (line number, reason) of the first MAX_REPORTED malformed lines.
    malformed_lines: list[tuple[int, str]] = field(default_factory=list)

    def record_malformed(self, line: int, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_lines) < MAX_REPORTED:
            self.malformed_lines.append((line, reason))


@dataclass
class ExportReport:
    """Filled in by `export_resources` as it runs; complete once its iteration has ended."""

    status_url: str | None = None
    manifest: ExportManifest | None = None
    resources_by_type: dict[str, int] = field(default_factory=dict)
    # Per output file (URL without its query string).
    files: dict[str, NdjsonStats] = field(default_factory=dict)
    # OperationOutcomes from the manifest's error files (the first MAX_REPORTED), and how many in all.
    error_outcomes: list[JsonObject] = field(default_factory=list)
    error_count: int = 0
    deleted: bool = False

    @property
    def transaction_time(self) -> str | None:
        """The `_since` for the next run, once the manifest is in (use it only if this run succeeded)."""
        return self.manifest.transaction_time if self.manifest is not None else None

    @property
    def malformed_lines(self) -> int:
        return sum(stats.malformed for stats in self.files.values())


# ---------------------------------------------------------------------------
# Pure helpers (no IO)
# ---------------------------------------------------------------------------


def kickoff_path(group_id: str | None) -> str:
    """The kick-off path relative to the FHIR base: Group level when a group is given.

    >>> kickoff_path(None)
    'Patient/$export'
    >>> kickoff_path("nightly-1")
    'Group/nightly-1/$export'
    """
    if group_id is None:
        return "Patient/$export"
    if not _FHIR_ID.fullmatch(group_id):
        raise ValueError(f"group_id {group_id!r} is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}})")
    return f"Group/{group_id}/$export"


def export_parameters(
    types: Sequence[str], since: str | None, type_filters: Sequence[str]
) -> list[tuple[str, str]]:
    """The kick-off parameters as ordered pairs, each checked; empty `types` means every type.

    >>> export_parameters(["Patient", "Condition"], "2024-01-01T00:00:00Z", ["Condition?code=1"])
    ... # doctest: +NORMALIZE_WHITESPACE
    [('_outputFormat', 'application/fhir+ndjson'), ('_type', 'Patient,Condition'),
     ('_since', '2024-01-01T00:00:00Z'), ('_typeFilter', 'Condition?code=1')]
    >>> export_parameters([], None, [])
    [('_outputFormat', 'application/fhir+ndjson')]
    >>> export_parameters(["patient"], None, [])
    Traceback (most recent call last):
    ValueError: _type: 'patient' is not a FHIR resource type name
    """
    if isinstance(types, str):
        raise ValueError("_type: pass a sequence of type names, not one string")
    for resource_type in types:
        if not _TYPE_NAME.fullmatch(resource_type):
            raise ValueError(f"_type: {resource_type!r} is not a FHIR resource type name")
    pairs = [("_outputFormat", NDJSON)]
    if types:
        pairs.append(("_type", ",".join(dict.fromkeys(types))))
    if since is not None:
        if not _INSTANT.fullmatch(since):
            raise ValueError(f"_since: {since!r} is not a FHIR instant (like 2024-01-31T22:00:00.000Z)")
        pairs.append(("_since", since))
    for type_filter in type_filters:
        if not _TYPE_FILTER.fullmatch(type_filter):
            raise ValueError(f"_typeFilter: {type_filter!r} must look like Type?param=value")
        pairs.append(("_typeFilter", type_filter))
    return pairs


def parameters_resource(pairs: Sequence[tuple[str, str]]) -> JsonObject:
    """The POST kick-off body: a Parameters resource (`_since` is an instant, the rest strings).

    >>> parameters_resource([("_type", "Patient"), ("_since", "2024-01-01T00:00:00Z")])["parameter"]
    [{'name': '_type', 'valueString': 'Patient'}, {'name': '_since', 'valueInstant': '2024-01-01T00:00:00Z'}]
    """
    parameter = [
        {"name": name, "valueInstant" if name == "_since" else "valueString": value} for name, value in pairs
    ]
    return {"resourceType": "Parameters", "parameter": parameter}


def poll_delay(retry_after: float | None, waits_without_hint: int, min_poll: float, max_poll: float) -> float:
    """Seconds to wait before the next status poll.

    The server's `Retry-After` wins, even above `max_poll` (asking sooner would only earn a 429);
    without one the wait doubles from `min_poll` up to `max_poll`.

    >>> [poll_delay(None, n, 1.0, 6.0) for n in (1, 2, 3, 4)]
    [1.0, 2.0, 4.0, 6.0]
    >>> poll_delay(30.0, 1, 1.0, 6.0), poll_delay(0.0, 1, 1.0, 6.0)
    (30.0, 1.0)
    """
    if retry_after is not None:
        return max(retry_after, min_poll)
    return backoff_seconds(max(waits_without_hint, 1), min_poll, max_poll)


def is_transient(outcome: JsonObject | None) -> bool:
    """True when an OperationOutcome marks the failure as passing (issue code `transient` or below).

    >>> is_transient({"issue": [{"severity": "error", "code": "transient"}]})
    True
    >>> is_transient({"issue": [{"severity": "error", "code": "timeout"}]})
    True
    >>> is_transient({"issue": [{"severity": "error", "code": "exception"}]}), is_transient(None)
    (False, False)
    """
    # Bulk Data 2.0: a poll failure that is not the job failing uses a code of the `transient` family.
    transient_codes = {"transient", "lock-error", "no-store", "exception-transient", "timeout", "throttled"}
    if not isinstance(outcome, dict):
        return False
    issues = outcome.get("issue")
    if not isinstance(issues, list):
        return False
    return any(isinstance(issue, dict) and issue.get("code") in transient_codes for issue in issues)


def parse_manifest(body: JsonObject, status_url: str) -> ExportManifest:
    """The manifest from a completed status answer; bad entries are skipped and listed in `problems`.

    >>> m = parse_manifest({"transactionTime": "2024-01-01T00:00:00Z", "request": "x",
    ...     "requiresAccessToken": True, "output": [{"type": "Patient", "url": "http://h/p.ndjson",
    ...     "count": 2}, {"type": "Condition"}], "error": []}, "http://h/status/1")
    >>> m.output, m.problems
    ([ExportFile(type='Patient', url='http://h/p.ndjson', count=2)], ['output[1]: no url'])
    """
    transaction_time = body.get("transactionTime")
    if not isinstance(transaction_time, str) or not transaction_time.strip():
        raise BulkExportError(
            f"the export manifest from {status_url} has no transactionTime", status=200, url=status_url
        )
    problems: list[str] = []
    output = _manifest_files(body.get("output"), "output", problems)
    # `error` in 2.0; accept `outcome` as well for servers following later drafts.
    error = _manifest_files(body.get("error"), "error", problems)
    error += _manifest_files(body.get("outcome"), "outcome", problems)
    requires_token = body.get("requiresAccessToken")
    if not isinstance(requires_token, bool):
        # Assume the token is needed: it still only ever goes to the FHIR server's own origin.
        problems.append("requiresAccessToken: missing or not a boolean, taken as true")
        requires_token = True
    request = body.get("request")
    return ExportManifest(
        transaction_time=transaction_time.strip(),
        request=request if isinstance(request, str) else "",
        requires_access_token=requires_token,
        output=output,
        error=error,
        problems=problems,
    )


def _manifest_files(entries: object, key: str, problems: list[str]) -> list[ExportFile]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        problems.append(f"{key}: not a list")
        return []
    files: list[ExportFile] = []
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object")
            continue
        url, resource_type, count = entry.get("url"), entry.get("type"), entry.get("count")
        if not isinstance(url, str) or not url.strip():
            problems.append(f"{where}: no url")
            continue
        if not isinstance(resource_type, str) or not resource_type:
            problems.append(f"{where}: no type")
            continue
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            problems.append(f"{where}: count is not a non-negative integer, ignored")
            count = None
        files.append(ExportFile(type=resource_type, url=url.strip(), count=count))
    return files


class LineSplitter:
    """Cuts a byte stream into lines as chunks arrive, holding at most one partial line.

    A line longer than `max_line_bytes` is dropped and reported as None, rather than growing the
    buffer without bound.

    >>> s = LineSplitter(max_line_bytes=10)
    >>> s.feed(b'{"a":1}\\n{"b"')
    [b'{"a":1}']
    >>> s.feed(b':2}\\n0123456789ABC')
    [b'{"b":2}']
    >>> s.feed(b'DEF\\n{}'), s.finish()
    ([None], [b'{}'])
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be at least 1, got {max_line_bytes}")
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._overlong = False

    def feed(self, chunk: bytes) -> list[bytes | None]:
        lines: list[bytes | None] = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            lines.append(self._complete(chunk[start:end]))
            start = end + 1
        self._keep(chunk[start:])
        return lines

    def finish(self) -> list[bytes | None]:
        """The last line when the stream did not end with a newline."""
        if self._overlong or self._buffer:
            return [self._complete(b"")]
        return []

    def _complete(self, tail: bytes) -> bytes | None:
        line = None if self._overlong else bytes(self._buffer) + tail
        if line is not None and len(line) > self.max_line_bytes:
            line = None
        self._buffer.clear()
        self._overlong = False
        return line

    def _keep(self, part: bytes) -> None:
        if self._overlong:
            return
        if len(self._buffer) + len(part) > self.max_line_bytes:
            self._overlong = True
            self._buffer.clear()
            return
        self._buffer += part


def parse_ndjson_line(raw: bytes | None) -> tuple[JsonObject | None, str | None]:
    """(resource, None) for a good line, (None, reason) for a bad one, (None, None) for a blank one.

    >>> parse_ndjson_line(b'{"resourceType":"Patient","id":"1"}\\r')
    ({'resourceType': 'Patient', 'id': '1'}, None)
    >>> parse_ndjson_line(b'{"resourceType":'), parse_ndjson_line(b'[1]'), parse_ndjson_line(b'{"id":"1"}')
    ((None, 'not JSON'), (None, 'not a JSON object'), (None, 'no resourceType'))
    >>> parse_ndjson_line(b'  '), parse_ndjson_line(None)
    ((None, None), (None, 'longer than the line limit'))
    """
    if raw is None:
        return None, "longer than the line limit"
    if not raw.strip():
        return None, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None, "not JSON"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    resource_type = value.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        return None, "no resourceType"
    return value, None


# ---------------------------------------------------------------------------
# IO
# ---------------------------------------------------------------------------


async def kick_off(
    client: FhirClient,
    *,
    group_id: str | None = None,
    types: Sequence[str] = DEFAULT_TYPES,
    since: str | None = None,
    type_filters: Sequence[str] = (),
) -> str:
    """Start an export and return its status URL (absolute, on the FHIR server's origin).

    POST with a Parameters body; a server that answers 405 (some Bulk Data 2.0 servers only take
    GET) is asked again with GET and query parameters. Never retried: each kick-off starts a job.
    """
    path = kickoff_path(group_id)
    pairs = export_parameters(types, since, type_filters)
    headers = {"Accept": FHIR_JSON, "Prefer": "respond-async"}
    try:
        response = await client._request(
            "POST", path, json=parameters_resource(pairs), headers=headers, idempotent=False
        )
    except FhirError as exc:
        if exc.status != 405:
            raise
        log.info("bulk.kickoff.get_fallback", path=path)
        response = await client._request("GET", path, params=pairs, headers=headers, idempotent=False)
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
            outcome=_outcome_of(response),
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
    if not same_origin(status_url, client.base_url):
        # Polling carries the bearer token, which is for the FHIR server only.
        raise BulkExportError(
            f"bulk export kick-off at {where}: the status URL is not on the FHIR server's origin "
            f"({client.base_url})",
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
        response = await client._request("GET", status_url, idempotent=False)
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


def _outcome_of(response: httpx.Response) -> JsonObject | None:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None


async def stream_ndjson(
    client: FhirClient,
    url: str,
    *,
    requires_access_token: bool = True,
    stats: NdjsonStats | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> AsyncIterator[JsonObject]:
    """Yield each resource of an NDJSON file as its bytes arrive (never the whole file in memory).

    A malformed line is skipped and recorded in `stats` with its line number and reason. With
    `requires_access_token` the file must be on the FHIR server's origin and gets the token;
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
        await client._request("DELETE", status_url, idempotent=True)
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
) -> AsyncIterator[tuple[str, JsonObject]]:
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
