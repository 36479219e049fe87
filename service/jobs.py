"""Nightly batch summarization: choose the patients, summarize each once, survive crashes, report.

A run goes: selection -> one queued item per patient -> each item `running` -> `done` (a summary
was written in this run), `skipped` (its summary of the same inputs, prompt and model stands:
one hash, no generation) or `failed` (after `batch.max_attempts`, with the error class and a
short reason). Runs and items live in the database (`service.db.batch`), so a run killed at any
point is finished by `chartbrief batch run --resume` or by the next run, and the write-back's
idempotency identifier keeps a retried patient from being written twice.

Selection: a file of ids, a Group's members, or by default everyone changed since the last
finished run of the same kind (`_lastUpdated=gt<watermark>` over `batch.change_types`; the first
run takes every Patient). The watermark is the FHIR server's own time (its `Date` header) at the
start of a run, never this machine's clock. With Bulk Data, a `$export` with `_since` = the last
run's `transactionTime` names the changed patients instead.

Where the work happens:
- SQLite (the default): this process. The FHIR reads of the next patients (`prepare_summary`)
  overlap the model's generation for the current one.
- PostgreSQL: `service.queue` defers one Procrastinate job per patient; `chartbrief batch worker`
  processes on any number of machines run them; this module then only waits and reports.

What it must not do: log or store PHI (patient and resource ids, counts and timings only), hold a
whole population's records in memory (items are read one patient at a time), or trust the local
clock for the watermark.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
import structlog
from sqlalchemy.exc import SQLAlchemyError

from fhir_adapters.auth import StaticToken, TokenProvider
from fhir_adapters.backend_auth import (
    DEFAULT_SYSTEM_SCOPES,
    BackendAuthError,
    BackendClient,
    BackendServicesToken,
)
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirBadRequest, FhirConflict, FhirError, FhirRetryableError
from fhir_adapters.fetch import SEARCHED_TYPES
from service.config import BatchSettings, Settings
from service.db.batch import (
    DONE,
    FAILED,
    OPEN_STATES,
    QUEUED,
    RUN_RUNNING,
    SKIPPED,
    BatchRepository,
    ItemOutcome,
    Run,
    RunItem,
    as_utc,
    process_name,
)
from service.db.store import SqlSummaryStore, SummaryStore
from service.llm import create_engine
from service.llm.base import Engine, EngineError
from service.pipeline import (
    PreparedSummary,
    Services,
    SummaryResult,
    complete_summary,
    narrate_summary,
    prepare_summary,
    unchanged_result,
)
from service.prompts import PromptError
from service.safety import is_ai_asserted

log = structlog.get_logger(__name__)

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
MAX_REPORTED_PROBLEMS = 50


class BatchError(Exception):
    """A batch cannot start or go on: the message says why and what to do (no PHI)."""


# ---------------------------------------------------------------------------------------------------
# Pure: selection input
# ---------------------------------------------------------------------------------------------------


def parse_patient_ids(text: str, source: str = "patients file") -> tuple[list[str], list[str]]:
    """Patient ids from a file: one per line, `Patient/<id>` accepted, blank lines and `#` comments
    ignored, duplicates kept once. A bad line is skipped and named in the problems.

    >>> parse_patient_ids("a1\\n# night shift\\nPatient/b-2\\n\\na1\\nnot an id!\\n")
    (['a1', 'b-2'], ["patients file line 6: 'not an id!' is not a FHIR id"])
    """
    ids: list[str] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        value = line.removeprefix("Patient/")
        if not _FHIR_ID.fullmatch(value):
            problems.append(f"{source} line {number}: {line[:70]!r} is not a FHIR id")
            continue
        ids.append(value)
    return list(dict.fromkeys(ids)), problems


def group_member_ids(group: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The active Patient members of a Group; other members are skipped and named.

    >>> group_member_ids({"id": "g", "member": [{"entity": {"reference": "Patient/1"}},
    ...     {"entity": {"reference": "Practitioner/2"}}, {"entity": {"reference": "Patient/3"},
    ...     "inactive": True}]})
    (['1'], ['Group/g member[1]: Practitioner/2 is not a Patient', 'Group/g member[2]: inactive'])
    """
    ids: list[str] = []
    problems: list[str] = []
    where = f"Group/{group.get('id', '?')}"
    for index, member in enumerate(group.get("member") or []):
        entity = member.get("entity") if isinstance(member, dict) else None
        reference = entity.get("reference") if isinstance(entity, dict) else None
        if not isinstance(reference, str):
            problems.append(f"{where} member[{index}]: no entity.reference")
            continue
        if member.get("inactive") is True:
            problems.append(f"{where} member[{index}]: inactive")
            continue
        patient = patient_id_of_reference(reference)
        if patient is None:
            problems.append(f"{where} member[{index}]: {reference[:80]} is not a Patient")
            continue
        ids.append(patient)
    return list(dict.fromkeys(ids)), problems


def patient_id_of_reference(reference: str) -> str | None:
    """The id in a Patient reference, relative, absolute or versioned.

    >>> [patient_id_of_reference(r) for r in ("Patient/1", "http://h/fhir/Patient/a-2/_history/3",
    ...     "Group/1", "urn:uuid:x")]
    ['1', 'a-2', None, None]
    """
    match = _PATIENT_REF.search(reference.strip())
    return match.group(1) if match else None


def patient_of(resource: dict[str, Any]) -> str | None:
    """The patient a resource is about: a Patient's own id, else its subject or patient reference."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and _FHIR_ID.fullmatch(rid) else None
    for element in ("subject", "patient"):
        target = resource.get(element)
        reference = target.get("reference") if isinstance(target, dict) else None
        if isinstance(reference, str):
            found = patient_id_of_reference(reference)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------------------
# Pure: time
# ---------------------------------------------------------------------------------------------------


def fhir_instant(when: datetime) -> str:
    """A FHIR instant in UTC, to the second (the precision of an HTTP Date header).

    >>> fhir_instant(datetime(2024, 5, 1, 22, 0, 7, 900000, tzinfo=UTC))
    '2024-05-01T22:00:07Z'
    """
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instant(value: str) -> datetime:
    """A FHIR instant (any offset, optional fraction) as an aware datetime.

    >>> parse_instant("2024-05-01T22:00:07.123+02:00").isoformat()
    '2024-05-01T20:00:07.123000+00:00'
    """
    parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone: not a FHIR instant")
    return parsed.astimezone(UTC)


def since_with_overlap(watermark: str, overlap_seconds: int) -> str:
    """The `_lastUpdated` lower bound: the watermark moved back by the configured overlap.

    >>> since_with_overlap("2024-05-01T22:00:07Z", 60)
    '2024-05-01T21:59:07Z'
    """
    return fhir_instant(parse_instant(watermark) - timedelta(seconds=overlap_seconds))


def parse_http_date(value: str | None) -> datetime | None:
    """The time in an HTTP `Date` header, or None when missing or unreadable.

    >>> parse_http_date("Mon, 23 Nov 2026 16:09:18 GMT").isoformat()
    '2026-11-23T16:09:18+00:00'
    >>> parse_http_date("yesterday") is None
    True
    """
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class ServerClock:
    """Remembers the FHIR server's time from the `Date` header of each answer (an httpx hook)."""

    def __init__(self) -> None:
        self.latest: datetime | None = None

    async def observe(self, response: httpx.Response) -> None:
        when = parse_http_date(response.headers.get("date"))
        if when is not None:
            self.latest = when


# ---------------------------------------------------------------------------------------------------
# Pure: the item state machine
# ---------------------------------------------------------------------------------------------------


def is_retryable(exc: BaseException) -> bool:
    """Worth another attempt later: the server or the model failed for now, not for good."""
    if isinstance(exc, FhirRetryableError | FhirConflict):
        return True
    if isinstance(exc, FhirError | PromptError | BackendAuthError):
        return False
    return isinstance(exc, EngineError | TimeoutError | OSError | httpx.TransportError)


def describe_error(exc: BaseException) -> str:
    """Error class and a short reason, safe to store and log.

    chartbrief's own errors say what failed without patient data (`str(FhirError)` is status,
    method and path); any other exception text might quote a record, so only its class is kept.

    >>> describe_error(EngineError("model server http://m:8080/v1 timed out"))
    'EngineError: model server http://m:8080/v1 timed out'
    >>> describe_error(KeyError("Smith"))
    'KeyError'
    """
    name = type(exc).__name__
    if isinstance(exc, FhirError | EngineError | PromptError | BackendAuthError | BatchError):
        reason = " ".join(str(exc).split())
        return f"{name}: {reason}"[:300] if reason else name
    return name


def after_failure(attempts: int, max_attempts: int, retryable: bool) -> str:
    """The state of an item whose attempt number `attempts` failed: queued again, or failed for good.

    >>> after_failure(1, 3, True), after_failure(3, 3, True), after_failure(1, 3, False)
    ('queued', 'failed', 'failed')
    """
    return QUEUED if retryable and attempts < max_attempts else FAILED


def interrupted_error(attempts: int) -> str:
    return f"Interrupted: the process summarizing this patient ended without a result ({attempts} attempt(s))"


def resume_plan(running: Iterable[tuple[str, int]], max_attempts: int) -> dict[str, tuple[str, str]]:
    """What becomes of items left `running` by a process that died: queued again, or failed once
    they have used every attempt (a patient that kills the process each time must not loop).

    >>> resume_plan([("a", 1), ("b", 3)], 3)["a"][0], resume_plan([("a", 1), ("b", 3)], 3)["b"][0]
    ('queued', 'failed')
    """
    return {
        patient: (QUEUED if attempts < max_attempts else FAILED, interrupted_error(attempts))
        for patient, attempts in running
    }


def retry_delay(attempt: int, initial: float, cap: float) -> float:
    """Seconds before retry number `attempt` (1-based): doubling from `initial`, capped.

    >>> [retry_delay(n, 30, 100) for n in (1, 2, 3, 4)]
    [30.0, 60.0, 100.0, 100.0]
    """
    return float(min(initial * 2 ** min(max(attempt - 1, 0), 30), cap))


def run_is_alive(
    run: Run,
    *,
    now: datetime,
    this_host: str,
    stalled_after_seconds: float,
    pid_alive: Callable[[int], bool],
) -> bool:
    """Whether the process that drives a running run is still at it.

    Dead when its heartbeat is older than `stalled_after_seconds`, or, on this very host, when its
    process no longer exists (a SIGKILLed run is resumed at once, without waiting).
    """
    beat = as_utc(run.heartbeat_at) or as_utc(run.started_at)
    if beat is None or (now - beat).total_seconds() > stalled_after_seconds:
        return False
    host, _, pid = (run.owner or "").rpartition(":")
    if host == this_host and pid.isdigit():
        return pid_alive(int(pid))
    return True


def pid_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def item_outcome(
    result: SummaryResult,
    *,
    run_started: datetime,
    recorded_at: datetime | None,
    recorded_tokens: tuple[int, int] = (0, 0),
    cpu_seconds: float = 0.0,
) -> ItemOutcome:
    """What a pipeline result means for its item.

    An unchanged result whose record was written after this run started was summarized by this
    run (by a process that died before marking the item done): it counts as done, with the
    tokens it cost then, not as skipped.
    """
    write = result.write
    doc = write.document_reference if write else None
    timings = {
        "seconds": result.seconds,
        "seconds_fetch": result.seconds_fetch,
        "seconds_generate": result.seconds_generate,
        "cpu_seconds": cpu_seconds,
        "document_reference": doc,
    }
    if not result.unchanged:
        return ItemOutcome(
            state=DONE,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            **timings,  # type: ignore[arg-type]
        )
    recorded = as_utc(recorded_at)
    if recorded is not None and recorded >= run_started:
        return ItemOutcome(
            state=DONE,
            prompt_tokens=recorded_tokens[0],
            completion_tokens=recorded_tokens[1],
            **timings,  # type: ignore[arg-type]
        )
    return ItemOutcome(state=SKIPPED, **timings)  # type: ignore[arg-type]


def outcome_for(
    svc: Services, result: SummaryResult, run_started: datetime, cpu_seconds: float = 0.0
) -> ItemOutcome:
    """`item_outcome` with the record store's row of an unchanged result looked up."""
    recorded_at: datetime | None = None
    tokens = (0, 0)
    if result.unchanged:
        row = svc.store.find(svc.client.base_url, result.idempotency_key)
        if row is not None:
            recorded_at, tokens = row.created_at, (row.prompt_tokens, row.completion_tokens)
    return item_outcome(
        result,
        run_started=run_started,
        recorded_at=recorded_at,
        recorded_tokens=tokens,
        cpu_seconds=cpu_seconds,
    )


# ---------------------------------------------------------------------------------------------------
# Pure: the report
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    patient: str
    attempts: int
    reason: str


@dataclass
class BatchReport:
    run: int
    status: str
    mode: str
    fhir_base: str
    selection: str
    since: str | None
    watermark: str | None
    transaction_time: str | None
    started: str
    finished: str | None
    selected: int
    summarized: int
    skipped_unchanged: int
    failed: int
    open: int  # queued or running: not final yet
    failures: list[Failure]
    selection_problems: int
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    cpu_seconds: float
    machine_seconds: float
    price_per_machine_hour: float
    currency: str
    resumed_from: int | None = None
    gpu_seconds: float | None = None  # not measured: in-process CPU or remote servers

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def tokens_per_summary(self) -> float | None:
        return round(self.tokens / self.summarized, 1) if self.summarized else None

    @property
    def cpu_seconds_per_summary(self) -> float | None:
        return round(self.cpu_seconds / self.summarized, 2) if self.summarized else None

    @property
    def cost_per_1000_summaries(self) -> float | None:
        """Machine time spent per written summary, times 1000, at the configured hourly price."""
        if not self.summarized:
            return None
        hours_per_summary = self.machine_seconds / 3600.0 / self.summarized
        return round(hours_per_summary * 1000 * self.price_per_machine_hour, 4)

    @property
    def patients_per_minute(self) -> float | None:
        handled = self.summarized + self.skipped_unchanged
        return round(handled / (self.seconds / 60.0), 2) if handled and self.seconds > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "status": self.status,
            "mode": self.mode,
            "fhir_base": self.fhir_base,
            "selection": self.selection,
            "since": self.since,
            "watermark": self.watermark,
            "transaction_time": self.transaction_time,
            "started": self.started,
            "finished": self.finished,
            "selected": self.selected,
            "summarized": self.summarized,
            "skipped_unchanged": self.skipped_unchanged,
            "failed": self.failed,
            "failures": [
                {"patient": f.patient, "attempts": f.attempts, "reason": f.reason} for f in self.failures
            ],
            "open": self.open,
            "selection_problems": self.selection_problems,
            "seconds": round(self.seconds, 2),
            "patients_per_minute": self.patients_per_minute,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens": self.tokens,
            "tokens_per_summary": self.tokens_per_summary,
            "cpu_seconds": round(self.cpu_seconds, 2),
            "cpu_seconds_per_summary": self.cpu_seconds_per_summary,
            "gpu_seconds": self.gpu_seconds,
            "machine_seconds": round(self.machine_seconds, 2),
            "cost": {
                "price_per_machine_hour": self.price_per_machine_hour,
                "currency": self.currency,
                "per_1000_summaries": self.cost_per_1000_summaries,
            },
            "resumed_from": self.resumed_from,
        }


def build_report(run: Run, items: Sequence[RunItem], batch: BatchSettings, *, now: datetime) -> BatchReport:
    """The report of a run from its rows. Counts and tokens come from the items, so a report of a
    run still going (or interrupted) is as true as one of a finished run."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.state] = counts.get(item.state, 0) + 1
    started = as_utc(run.started_at) or now
    finished = as_utc(run.finished_at)
    failures = [
        Failure(patient=i.patient_id, attempts=i.attempts, reason=i.error or "unknown")
        for i in items
        if i.state == FAILED
    ]
    return BatchReport(
        run=run.id,
        status=run.status,
        mode=run.mode,
        fhir_base=run.fhir_base,
        selection=run.selection,
        since=run.since,
        watermark=run.watermark,
        transaction_time=run.transaction_time,
        started=started.isoformat(timespec="seconds"),
        finished=finished.isoformat(timespec="seconds") if finished else None,
        selected=len(items),
        summarized=counts.get(DONE, 0),
        skipped_unchanged=counts.get(SKIPPED, 0),
        failed=counts.get(FAILED, 0),
        open=sum(counts.get(s, 0) for s in OPEN_STATES),
        failures=failures,
        selection_problems=run.selection_problems,
        seconds=max(((finished or now) - started).total_seconds(), 0.0),
        prompt_tokens=sum(i.prompt_tokens for i in items),
        completion_tokens=sum(i.completion_tokens for i in items),
        cpu_seconds=run.cpu_seconds,
        machine_seconds=run.machine_seconds,
        price_per_machine_hour=batch.price_per_machine_hour,
        currency=batch.currency,
    )


def progress_figures(done: int, total: int, elapsed_seconds: float) -> tuple[float | None, float | None]:
    """(patients per minute, seconds left) from the progress so far; None until it can be told.

    >>> progress_figures(3, 10, 60.0)
    (3.0, 140.0)
    >>> progress_figures(0, 10, 5.0)
    (None, None)
    """
    if done <= 0 or elapsed_seconds <= 0:
        return None, None
    rate = done / elapsed_seconds
    return round(rate * 60, 2), round(max(total - done, 0) / rate, 1)


# ---------------------------------------------------------------------------------------------------
# Progress and usage
# ---------------------------------------------------------------------------------------------------


class ProgressSink(Protocol):
    """Where progress goes: a bar on a terminal (the CLI's), log lines otherwise."""

    def update(self, done: int, total: int) -> None: ...

    def close(self) -> None: ...


class LogProgress:
    """Plain log lines with done/total, rate and ETA: at most one every `every_seconds`, and the last."""

    def __init__(self, run_id: int | None = None, *, every_seconds: float = 15.0) -> None:
        self.run_id = run_id
        self.every_seconds = every_seconds
        self._started = time.monotonic()
        self._first_done: int | None = None
        self._last_logged = 0.0
        self._last: tuple[int, int] | None = None

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._first_done is None:
            self._first_done = done  # a resumed run: rate counts what this process did
            self._started = now
        if (done, total) == self._last:
            return
        if done < total and now - self._last_logged < self.every_seconds:
            return
        self._last_logged, self._last = now, (done, total)
        rate, eta = progress_figures(done - self._first_done, total - self._first_done, now - self._started)
        log.info("batch.progress", run=self.run_id, done=done, total=total, per_minute=rate, eta_seconds=eta)

    def close(self) -> None:
        return None


def cpu_seconds_now() -> float:
    """User + system CPU seconds of this process so far (all its threads, the model's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class UsageMeter:
    """CPU and wall seconds since the last `take()`, so a process adds its share as it goes (a
    SIGKILL loses at most one heartbeat of it)."""

    def __init__(self) -> None:
        self._cpu = cpu_seconds_now()
        self._wall = time.monotonic()

    def take(self) -> tuple[float, float]:
        cpu, wall = cpu_seconds_now(), time.monotonic()
        delta = (cpu - self._cpu, wall - self._wall)
        self._cpu, self._wall = cpu, wall
        return delta


# ---------------------------------------------------------------------------------------------------
# IO: opening the FHIR client and the services
# ---------------------------------------------------------------------------------------------------


def token_provider(settings: Settings, http: httpx.AsyncClient, fhir_base: str) -> TokenProvider | None:
    """SMART Backend Services when configured, else the static bearer token, else none."""
    backend = settings.backend
    if backend.enabled:
        path = backend.private_key_path
        assert path is not None  # checked by BackendSettings
        try:
            pem = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise BatchError(
                f"CHARTBRIEF_BACKEND__PRIVATE_KEY_PATH: cannot read {path} ({type(exc).__name__})"
            ) from exc
        client = BackendClient(
            client_id=str(backend.client_id),
            private_key_pem=pem,
            alg=backend.alg,
            kid=backend.kid,
            scope=backend.scope or DEFAULT_SYSTEM_SCOPES,
            token_url=backend.token_url,
        )
        return BackendServicesToken(http, fhir_base, client)
    if settings.fhir.bearer_token:
        return StaticToken(settings.fhir.bearer_token)
    return None


@dataclass
class FhirConnection:
    client: FhirClient
    clock: ServerClock


@asynccontextmanager
async def open_fhir(settings: Settings, fhir_base: str | None = None) -> AsyncIterator[FhirConnection]:
    """A FHIR client whose answers keep a `ServerClock` current, with the batch's credentials."""
    base = fhir_base or settings.fhir.base_url
    if not base:
        raise BatchError("no FHIR server configured: set CHARTBRIEF_FHIR__BASE_URL or pass --fhir-base")
    clock = ServerClock()
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.fhir.timeout_seconds),
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        event_hooks={"response": [clock.observe]},
    )
    try:
        auth = token_provider(settings, http, base)
        fhir = settings.fhir.model_copy(update={"base_url": base.rstrip("/")})
        client = FhirClient.from_settings(fhir, http=http, auth=auth)
        yield FhirConnection(client=client, clock=clock)
    finally:
        await http.aclose()


def services_for(settings: Settings, client: FhirClient, engine: Engine, store: SummaryStore) -> Services:
    """Pipeline services for one FHIR server (a worker may serve runs of several)."""
    scoped = settings.model_copy(
        update={"fhir": settings.fhir.model_copy(update={"base_url": client.base_url})}
    )
    return Services(settings=scoped, client=client, engine=engine, store=store)


def generation_slots(settings: Settings) -> int:
    """How many summaries one process generates at once (see `batch.concurrency`)."""
    if settings.batch.concurrency is not None:
        return settings.batch.concurrency
    if settings.llm.servers:
        return len(settings.llm.servers) * settings.llm.per_server_concurrency
    return 1


# ---------------------------------------------------------------------------------------------------
# IO: selection
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchRequest:
    """What `chartbrief batch run` was asked to do."""

    patients_file: Path | None = None
    group_id: str | None = None
    bulk: bool = False
    resume: bool = False
    wait: bool = True  # PostgreSQL: wait for the workers and report (False: enqueue and return)

    def check(self) -> None:
        if self.patients_file is not None and (self.group_id is not None or self.bulk):
            raise BatchError("--patients cannot be combined with --group or --bulk")
        if self.group_id is not None and not _FHIR_ID.fullmatch(self.group_id):
            raise BatchError(f"--group {self.group_id!r} is not a FHIR id ([A-Za-z0-9-.]{{1,64}})")

    @property
    def label(self) -> str:
        """The selection's kind; incremental kinds take their watermark from the last run of the same kind."""
        if self.patients_file is not None:
            return f"file:{self.patients_file.name}"[:200]
        if self.bulk:
            return "bulk" if self.group_id is None else f"bulk-group:{self.group_id}"
        if self.group_id is not None:
            return f"group:{self.group_id}"
        return "changed"


@dataclass
class Selection:
    label: str
    patient_ids: list[str]
    since: str | None = None
    watermark: str | None = None
    transaction_time: str | None = None
    problems: list[str] = field(default_factory=list)
    carried_over: int = 0


async def server_time(conn: FhirConnection) -> str | None:
    """The FHIR server's time now, from the Date header of a cheap request; None if it sends none."""
    await conn.client.capabilities()
    return fhir_instant(conn.clock.latest) if conn.clock.latest is not None else None


async def changed_patients(
    client: FhirClient, since: str, resource_types: Sequence[str], identifier_system: str
) -> list[str]:
    """Patients with any resource of `resource_types` updated after `since`, in first-seen order.

    Documents chartbrief itself wrote (AI-asserted) do not count: the last run's own summaries
    would otherwise select every patient it touched.
    """
    found: dict[str, None] = {}
    for resource_type in resource_types:
        element = "id" if resource_type == "Patient" else SEARCHED_TYPES.get(resource_type, "subject")
        params: dict[str, str] = {"_lastUpdated": f"gt{since}"}
        # Only the reference is needed; DocumentReference keeps its identifier and meta for the AI check.
        if resource_type != "DocumentReference":
            params["_elements"] = element
        before = len(found)
        try:
            await _collect(client, resource_type, params, identifier_system, found)
        except FhirBadRequest:
            if "_elements" not in params:
                raise
            log.info("batch.select.elements_refused", resource_type=resource_type)
            params.pop("_elements")
            await _collect(client, resource_type, params, identifier_system, found)
        log.info("batch.select.changed", resource_type=resource_type, new_patients=len(found) - before)
    return list(found)


async def _collect(
    client: FhirClient,
    resource_type: str,
    params: dict[str, str],
    identifier_system: str,
    found: dict[str, None],
) -> None:
    async with aclosing(client.search(resource_type, params)) as resources:
        async for res in resources:
            if resource_type == "DocumentReference" and is_ai_asserted(res, identifier_system):
                continue
            patient = patient_of(res)
            if patient is not None:
                found.setdefault(patient, None)


async def all_patients(client: FhirClient) -> list[str]:
    found: dict[str, None] = {}
    async with aclosing(client.search("Patient", {"_elements": "id"})) as resources:
        async for res in resources:
            patient = patient_of(res)
            if patient is not None:
                found.setdefault(patient, None)
    return list(found)


async def bulk_changed_patients(
    client: FhirClient,
    settings: Settings,
    *,
    group_id: str | None,
    since: str | None,
) -> tuple[list[str], str | None, list[str]]:
    """Patients named by a Bulk Data export (streamed, one resource at a time), the manifest's
    `transactionTime`, and what the export reported as problems."""
    from fhir_adapters.bulk import ExportReport, export_resources  # deferred: only --bulk needs it

    types = list(settings.batch.change_types) if since else ["Patient"]
    report = ExportReport()
    found: dict[str, None] = {}
    exported = export_resources(
        client,
        group_id=group_id,
        types=types,
        since=since,
        report=report,
        max_wait_seconds=settings.batch.bulk_max_wait_seconds,
    )
    async with aclosing(exported) as resources:
        async for resource_type, res in resources:
            if resource_type == "DocumentReference" and is_ai_asserted(
                res, settings.writer.identifier_system
            ):
                continue
            patient = patient_of(res)
            if patient is not None:
                found.setdefault(patient, None)
    problems: list[str] = []
    if report.manifest is not None:
        problems += report.manifest.problems
    if report.error_count:
        problems.append(f"the export reported {report.error_count} error outcome(s)")
    if report.malformed_lines:
        problems.append(f"{report.malformed_lines} malformed NDJSON line(s) skipped")
    return list(found), report.transaction_time, problems


async def select_patients(
    conn: FhirConnection, repo: BatchRepository, settings: Settings, request: BatchRequest
) -> Selection:
    """Who this run summarizes, and the watermark the next incremental run starts from."""
    client = conn.client
    label = request.label
    now = await server_time(conn)
    if now is None:
        log.warning("batch.select.no_server_date", fhir_base=client.base_url)
    if request.patients_file is not None:
        try:
            text = request.patients_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BatchError(
                f"--patients: cannot read {request.patients_file} ({type(exc).__name__})"
            ) from exc
        ids, problems = parse_patient_ids(text, f"--patients {request.patients_file.name}")
        return Selection(label=label, patient_ids=ids, watermark=now, problems=problems)
    if request.group_id is not None and not request.bulk:
        group = await client.read("Group", request.group_id)
        ids, problems = group_member_ids(group)
        return Selection(label=label, patient_ids=ids, watermark=now, problems=problems)
    last = repo.last_finished_run(client.base_url, label)
    carried = repo.patients_in_state(last.id, [FAILED]) if last is not None else []
    if request.bulk:
        since = last.transaction_time if last is not None else None
        ids, transaction_time, problems = await bulk_changed_patients(
            client, settings, group_id=request.group_id, since=since
        )
        return _with_carried(
            Selection(
                label, ids, since=since, watermark=now, transaction_time=transaction_time, problems=problems
            ),
            carried,
        )
    if last is None or last.watermark is None:
        return Selection(label, await all_patients(client), since=None, watermark=now)
    since = since_with_overlap(last.watermark, settings.batch.watermark_overlap_seconds)
    ids = await changed_patients(
        client, since, settings.batch.change_types, settings.writer.identifier_system
    )
    return _with_carried(Selection(label, ids, since=since, watermark=now), carried)


def _with_carried(selection: Selection, carried: Sequence[str]) -> Selection:
    """Patients that failed last time are tried again, changed or not: never silently dropped."""
    ids = list(dict.fromkeys([*selection.patient_ids, *carried]))
    selection.carried_over = len(ids) - len(selection.patient_ids)
    selection.patient_ids = ids
    return selection


def create_run(
    repo: BatchRepository,
    selection: Selection,
    *,
    fhir_base: str,
    mode: str,
    started_at: datetime | None = None,
) -> int:
    run_id = repo.create_run(
        started_at=started_at,
        fhir_base=fhir_base,
        mode=mode,
        selection=selection.label,
        patient_ids=selection.patient_ids,
        since=selection.since,
        watermark=selection.watermark,
        transaction_time=selection.transaction_time,
        selection_problems=len(selection.problems),
        owner=process_name(),
    )
    for problem in selection.problems[:MAX_REPORTED_PROBLEMS]:
        log.warning("batch.select.skipped", run=run_id, problem=problem)
    log.info(
        "batch.run.created",
        run=run_id,
        mode=mode,
        selection=selection.label,
        selected=len(selection.patient_ids),
        carried_over=selection.carried_over,
        since=selection.since,
        watermark=selection.watermark,
        problems=len(selection.problems),
    )
    return run_id


# ---------------------------------------------------------------------------------------------------
# IO: one process does the work (SQLite, or any database with `mode=local`)
# ---------------------------------------------------------------------------------------------------


async def _prepare(svc: Services, patient_id: str) -> PreparedSummary:
    return await prepare_summary(svc, patient_id)


async def _generate_and_complete(svc: Services, prep: PreparedSummary) -> SummaryResult:
    return await complete_summary(svc, prep, await narrate_summary(svc, prep))


@dataclass(frozen=True)
class Stages:
    """The pipeline as the runner drives it: read (may run ahead), the unchanged check (a hash),
    then generate + ground + write. Tests pass their own to observe overlap and failures."""

    prepare: Callable[[Services, str], Awaitable[PreparedSummary]] = _prepare
    unchanged: Callable[[Services, PreparedSummary], SummaryResult | None] = unchanged_result
    complete: Callable[[Services, PreparedSummary], Awaitable[SummaryResult]] = _generate_and_complete


@dataclass
class _Prepared:
    patient_id: str
    attempts: int
    prep: PreparedSummary | None = None
    error: BaseException | None = None


class LocalRunner:
    """Runs the open items of one run in this process: `prefetch` patients are read from the FHIR
    server while the model works on earlier ones; `slots` generations run at once."""

    def __init__(
        self,
        svc: Services,
        repo: BatchRepository,
        run: Run,
        *,
        progress: ProgressSink | None = None,
        stages: Stages | None = None,
        usage: UsageMeter | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.svc = svc
        self.stages = stages or Stages()
        self.repo = repo
        self.run = run
        self.batch = svc.settings.batch
        self.progress = progress
        self.slots = generation_slots(svc.settings)
        self.worker = process_name()
        self.run_started = as_utc(run.started_at) or datetime.now(UTC)
        self._sleep = sleep
        self._usage = usage or UsageMeter()

    async def execute(self) -> None:
        self._report_progress()
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            round_number = 0
            while pending := self.repo.patients_in_state(self.run.id, [QUEUED]):
                if round_number:
                    delay = retry_delay(
                        round_number, self.batch.retry_wait_seconds, self.batch.retry_wait_max_seconds
                    )
                    log.info("batch.retry_round", run=self.run.id, patients=len(pending), wait_s=delay)
                    await self._sleep(delay)
                await self._round(pending)
                round_number += 1
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._flush_usage()
        self.repo.finish_run_if_done(self.run.id)
        self._report_progress()

    async def _round(self, pending: list[str]) -> None:
        queue: asyncio.Queue[_Prepared | None] = asyncio.Queue()
        # At most `prefetch` patients read (or being read) that no generation has taken yet: their
        # records are in memory, so the look-ahead is bounded.
        ahead = asyncio.Semaphore(max(self.batch.prefetch, 1))
        producer = asyncio.create_task(self._produce(pending, queue, ahead))
        consumers = [asyncio.create_task(self._consume(queue, ahead)) for _ in range(self.slots)]
        try:
            await producer
            for _ in consumers:
                await queue.put(None)
            await asyncio.gather(*consumers)
        finally:
            for task in (producer, *consumers):
                task.cancel()

    async def _produce(
        self, pending: list[str], queue: asyncio.Queue[_Prepared | None], ahead: asyncio.Semaphore
    ) -> None:
        for patient_id in pending:
            await ahead.acquire()
            attempts = self.repo.start_item(self.run.id, patient_id, self.worker)
            if attempts is None:
                ahead.release()
                continue
            item = _Prepared(patient_id, attempts)
            with structlog.contextvars.bound_contextvars(patient_id=patient_id):
                try:
                    item.prep = await self.stages.prepare(self.svc, patient_id)
                except Exception as exc:  # noqa: BLE001 - every failure is recorded on the item
                    item.error = exc
            await queue.put(item)
            if self.batch.prefetch == 0:
                await queue.join()  # no look-ahead: the next read waits until this patient is done

    async def _consume(self, queue: asyncio.Queue[_Prepared | None], ahead: asyncio.Semaphore) -> None:
        while (item := await queue.get()) is not None:
            ahead.release()
            try:
                with structlog.contextvars.bound_contextvars(patient_id=item.patient_id):
                    await self._finish(item)
            finally:
                queue.task_done()
                self._report_progress()
        queue.task_done()

    async def _finish(self, item: _Prepared) -> None:
        try:
            if item.error is not None:
                raise item.error
            assert item.prep is not None
            result = self.stages.unchanged(self.svc, item.prep)
            if result is None:
                result = await self.stages.complete(self.svc, item.prep)
        except Exception as exc:  # noqa: BLE001 - recorded, retried within bounds, reported
            record_failure(
                self.repo, self.run.id, item.patient_id, item.attempts, exc, self.batch.max_attempts
            )
            return
        outcome = outcome_for(self.svc, result, self.run_started)
        self.repo.finish_item(self.run.id, item.patient_id, outcome)
        log.info(
            "batch.item.done",
            run=self.run.id,
            state=outcome.state,
            tokens=outcome.prompt_tokens + outcome.completion_tokens,
            seconds=round(outcome.seconds, 2),
            document_reference=outcome.document_reference,
        )

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.batch.heartbeat_seconds)
            try:
                self._flush_usage()
            except SQLAlchemyError as exc:  # a busy database must not stop the run; the next beat retries
                log.warning("batch.heartbeat_failed", run=self.run.id, error_class=type(exc).__name__)

    def _flush_usage(self) -> None:
        cpu, wall = self._usage.take()
        self.repo.add_usage(self.run.id, cpu_seconds=cpu, machine_seconds=wall)

    def _report_progress(self) -> None:
        if self.progress is None:
            return
        counts = self.repo.state_counts(self.run.id)
        total = sum(counts.values())
        self.progress.update(total - sum(counts.get(s, 0) for s in OPEN_STATES), total)


def record_failure(
    repo: BatchRepository, run_id: int, patient_id: str, attempts: int, exc: BaseException, max_attempts: int
) -> str:
    """Queue the item again or fail it for good; the new state."""
    reason = describe_error(exc)
    state = after_failure(attempts, max_attempts, is_retryable(exc))
    repo.set_state(run_id, patient_id, state, error=reason)
    log.warning(
        "batch.item.failed",
        run=run_id,
        patient_id=patient_id,
        attempt=attempts,
        error_class=type(exc).__name__,
        final=state == FAILED,
    )
    return state


def requeue_interrupted(repo: BatchRepository, run_id: int, max_attempts: int) -> dict[str, str]:
    """Items a dead process left running: queued again, or failed once out of attempts."""
    plan = resume_plan(repo.running_items(run_id), max_attempts)
    for patient_id, (state, reason) in plan.items():
        repo.set_state(run_id, patient_id, state, error=reason)
    if plan:
        log.info(
            "batch.resume.requeued",
            run=run_id,
            requeued=sum(1 for s, _ in plan.values() if s == QUEUED),
            failed=sum(1 for s, _ in plan.values() if s == FAILED),
        )
    return {patient: state for patient, (state, _) in plan.items()}


# ---------------------------------------------------------------------------------------------------
# IO: the whole command
# ---------------------------------------------------------------------------------------------------


def report_for(repo: BatchRepository, run_id: int, settings: Settings) -> BatchReport:
    run = repo.get_run(run_id)
    if run is None:
        raise BatchError(f"no batch run {run_id} in {settings.db.url.split('://', 1)[0]} database")
    return build_report(run, repo.items(run_id), settings.batch, now=datetime.now(UTC))


def check_can_resume(run: Run, settings: Settings) -> None:
    if run.mode == "local" and run_is_alive(
        run,
        now=datetime.now(UTC),
        this_host=process_name().rpartition(":")[0],
        stalled_after_seconds=settings.batch.stalled_after_seconds,
        pid_alive=pid_exists,
    ):
        raise BatchError(
            f"batch run {run.id} is still in progress (process {run.owner}); wait for it, or stop it and "
            "run `chartbrief batch run --resume`"
        )


@dataclass
class RunOutcome:
    """The reports of what this command did: a resumed run first, then the new run (if any)."""

    reports: list[BatchReport]

    @property
    def last(self) -> BatchReport | None:
        return self.reports[-1] if self.reports else None


async def run_batch(
    settings: Settings,
    request: BatchRequest,
    *,
    engine: Engine | None = None,
    progress_factory: Callable[[int], ProgressSink] | None = None,
) -> RunOutcome:
    """`chartbrief batch run`: finish an unfinished run of this server first, then (unless
    `--resume`) select and summarize a new one. PostgreSQL hands the work to the workers."""
    request.check()
    base = settings.fhir.base_url
    if not base:
        raise BatchError("no FHIR server configured: set CHARTBRIEF_FHIR__BASE_URL or pass --fhir-base")
    repo = BatchRepository.from_url(settings.db.url)
    try:
        if repo.is_postgresql:
            from service.queue import run_batch_on_queue  # deferred: procrastinate is only needed here

            return await run_batch_on_queue(settings, request, repo, progress_factory=progress_factory)
        return await _run_batch_locally(settings, request, repo, engine, progress_factory)
    finally:
        repo.close()


async def _run_batch_locally(
    settings: Settings,
    request: BatchRequest,
    repo: BatchRepository,
    engine: Engine | None,
    progress_factory: Callable[[int], ProgressSink] | None,
) -> RunOutcome:
    base = str(settings.fhir.base_url)
    reports: list[BatchReport] = []
    async with open_fhir(settings, base) as conn, _LazyEngine(settings, engine) as engines:
        store = SqlSummaryStore.from_url(settings.db.url)
        try:
            unfinished = repo.unfinished_run(conn.client.base_url)
            if unfinished is not None:
                check_can_resume(unfinished, settings)
                repo.take_over(unfinished.id, process_name())
                requeue_interrupted(repo, unfinished.id, settings.batch.max_attempts)
                log.info("batch.resume", run=unfinished.id)
                await _execute_local(settings, conn, store, engines, repo, unfinished.id, progress_factory)
                reports.append(report_for(repo, unfinished.id, settings))
            elif request.resume:
                raise BatchError(f"no unfinished batch run of {conn.client.base_url} to resume")
            if request.resume:
                return RunOutcome(reports)
            started, usage = datetime.now(UTC), UsageMeter()  # the selection is part of the run's cost
            selection = await select_patients(conn, repo, settings, request)
            run_id = create_run(
                repo, selection, fhir_base=conn.client.base_url, mode="local", started_at=started
            )
            await _execute_local(settings, conn, store, engines, repo, run_id, progress_factory, usage)
            report = report_for(repo, run_id, settings)
            report.resumed_from = reports[0].run if reports else None
            reports.append(report)
            return RunOutcome(reports)
        finally:
            store.close()


async def _execute_local(
    settings: Settings,
    conn: FhirConnection,
    store: SummaryStore,
    engines: _LazyEngine,
    repo: BatchRepository,
    run_id: int,
    progress_factory: Callable[[int], ProgressSink] | None,
    usage: UsageMeter | None = None,
) -> None:
    run = repo.get_run(run_id)
    assert run is not None
    progress = progress_factory(run_id) if progress_factory else LogProgress(run_id)
    try:
        if repo.patients_in_state(run_id, [QUEUED]):
            svc = services_for(settings, conn.client, engines.get(), store)
            await LocalRunner(svc, repo, run, progress=progress, usage=usage).execute()
        else:
            if usage is not None:
                cpu, wall = usage.take()
                repo.add_usage(run_id, cpu_seconds=cpu, machine_seconds=wall)
            repo.finish_run_if_done(run_id)
    finally:
        progress.close()
    final = repo.get_run(run_id)
    log.info("batch.run.finished", run=run_id, status=final.status if final else None)


class _LazyEngine:
    """The model, loaded only when a run has a patient to summarize: a night with no change costs a
    few searches, not a model load."""

    def __init__(self, settings: Settings, engine: Engine | None) -> None:
        self._settings = settings
        self._engine = engine
        self._owned = False

    def get(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self._settings.llm)
            self._owned = True
        return self._engine

    async def __aenter__(self) -> _LazyEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._owned and self._engine is not None:
            await self._engine.aclose()


def open_run_status(repo: BatchRepository, run_id: int | None) -> list[Run]:
    """Runs for `batch status`: one, or the most recent ones."""
    if run_id is not None:
        run = repo.get_run(run_id)
        return [run] if run is not None else []
    return repo.list_runs(limit=10)


def run_progress(repo: BatchRepository, run: Run, *, now: datetime) -> dict[str, Any]:
    """A run's progress for `batch status`: counts by state, rate and ETA."""
    counts = repo.state_counts(run.id)
    total = sum(counts.values())
    done = total - sum(counts.get(s, 0) for s in OPEN_STATES)
    started = as_utc(run.started_at) or now
    finished = as_utc(run.finished_at)
    rate, eta = progress_figures(done, total, ((finished or now) - started).total_seconds())
    return {
        "run": run.id,
        "status": run.status,
        "mode": run.mode,
        "selection": run.selection,
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds") if finished else None,
        "done": done,
        "total": total,
        "states": {state: counts.get(state, 0) for state in (QUEUED, "running", DONE, SKIPPED, FAILED)},
        "per_minute": rate,
        "eta_seconds": eta if run.status == RUN_RUNNING else None,
    }


__all__ = [
    "BatchError",
    "BatchReport",
    "BatchRequest",
    "FhirConnection",
    "LocalRunner",
    "LogProgress",
    "ProgressSink",
    "RunOutcome",
    "Selection",
    "ServerClock",
    "after_failure",
    "build_report",
    "changed_patients",
    "describe_error",
    "group_member_ids",
    "is_retryable",
    "open_fhir",
    "parse_patient_ids",
    "patient_of",
    "progress_figures",
    "record_failure",
    "requeue_interrupted",
    "resume_plan",
    "retry_delay",
    "run_batch",
    "run_is_alive",
    "select_patients",
    "services_for",
]
