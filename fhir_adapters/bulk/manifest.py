"""Bulk Data `$export` (FHIR Bulk Data Access 2.0), the pure part: what is asked, what comes back.

The kick-off's path and parameters (`kickoff_path`, `export_parameters`, `parameters_resource`),
how long to wait between status polls (`poll_delay`, `is_transient`), the completed export's
manifest (`parse_manifest`: bad entries are skipped and listed, never fatal), and NDJSON cut into
lines as bytes arrive (`LineSplitter`, `parse_ndjson_line`). `fhir_adapters.bulk.export` does
the IO with these. The report types (`ExportManifest`, `NdjsonStats`, `ExportReport`) are here
so callers can read an export's outcome without importing its IO.

Errors, added under the client's tree (`fhir_adapters.errors`):

```
FhirPermanentError
└── BulkExportError        the kick-off answer or the manifest is unusable, or the server says the
                           export failed (carries its OperationOutcome, names the status URL)
FhirRetryableError
└── BulkExportTimeout      the manifest was not ready within max_wait_seconds (the job may still finish)
```

What it must not do: any IO, or keep a line's content anywhere but in the resource it yields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fhir_adapters.auth.scopes import CHANGE_TYPES
from fhir_adapters.client import NDJSON, backoff_seconds
from fhir_adapters.errors import FhirPermanentError, FhirRetryableError

JsonObject = dict[str, Any]

# What a summary reads: the patient and every type `fetch` searches.
DEFAULT_TYPES: tuple[str, ...] = CHANGE_TYPES
# One resource per line; a DocumentReference with inline note data can be a few MB. A longer
# "line" is a broken file, and buffering it would defeat streaming.
MAX_LINE_BYTES = 32 * 1024 * 1024
# Malformed line numbers (and error-file outcomes) kept for the report; the count goes on.
MAX_REPORTED = 100

_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{0,63}")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE_FILTER = re.compile(r"[A-Z][A-Za-z]{0,63}\?\S+")


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
