"""Many machines on one PostgreSQL database: the batch as Procrastinate jobs, one per patient.

`chartbrief batch run` (with `CHARTBRIEF_DB__URL=postgresql+psycopg://...`) selects the patients,
records the run and its items, defers one `summarize_patient` job per patient and waits while
`chartbrief batch worker` processes (on this machine or any other that reaches the database and
the FHIR server) do the work. Procrastinate provides what a home-made queue would get wrong:

- a queueing lock per patient (a patient is never waiting twice) and a lock (never summarized by
  two workers at once);
- retries with a doubling wait for failures worth retrying (`RetryLater`); the item records each
  attempt and gives up after `batch.max_attempts` with the reason;
- worker heartbeats: the jobs of a worker that stopped beating (killed, machine gone) are found by
  `get_stalled_jobs` and retried — by a periodic task on the workers and by a waiting `batch run`;
- periodic tasks: that recovery every minute, and the nightly run itself (`batch.schedule`).

What it must not do: keep anything in memory that a restarted worker would need (the database
holds it all), or log PHI (run and patient ids, counts, error classes only).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import procrastinate
import psycopg
import structlog
from procrastinate.exceptions import AlreadyEnqueued, ProcrastinateException
from procrastinate.jobs import Job
from procrastinate.retry import BaseRetryStrategy, RetryDecision
from procrastinate.schema import SchemaManager
from sqlalchemy.engine import make_url

from fhir_adapters.client import backoff_seconds
from service.batch.connect import FhirConnection, open_fhir, services_for
from service.batch.items import interrupted_error, outcome_for, record_failure
from service.batch.report import BatchReport, LogProgress, ProgressSink, RunOutcome, UsageMeter, report_for
from service.batch.request import BatchError, BatchRequest
from service.batch.selection import create_run, select_patients
from service.config import BatchSettings, Settings
from service.db.batch import (
    FAILED,
    OPEN_STATES,
    QUEUED,
    RUN_RUNNING,
    BatchRepository,
    ItemOutcome,
    Run,
    as_utc,
    process_name,
)
from service.db.store import in_thread
from service.llm.base import Engine
from service.pipeline import Services, summarize_patient
from service.runtime import EngineSlot, open_store

log = structlog.get_logger(__name__)

TASK_SUMMARIZE = "chartbrief.batch.summarize_patient"
TASK_RECOVER = "chartbrief.batch.recover_stalled"
TASK_NIGHTLY = "chartbrief.batch.nightly"
RECOVER_CRON = "* * * * *"
# Serializes applying Procrastinate's schema when several workers start on a fresh database.
_QUEUE_SCHEMA_LOCK_KEY = 0x63627071  # "cbpq"
# A stuck run (no item finished for this many stall periods) gets its lost jobs deferred again.
RECONCILE_AFTER_STALL_PERIODS = 2


class RetryLater(Exception):
    """A patient failed in a way worth retrying; Procrastinate reschedules its job with backoff."""


# ---------------------------------------------------------------------------------------------------
# Pure
# ---------------------------------------------------------------------------------------------------


def libpq_conninfo(sqlalchemy_url: str) -> str:
    """The SQLAlchemy URL of the database as a libpq connection URI, for Procrastinate's pool.

    >>> libpq_conninfo("postgresql+psycopg://cb:pw@db:5432/chartbrief?options=-csearch_path%3Dcb")
    'postgresql://cb:pw@db:5432/chartbrief?options=-csearch_path%3Dcb'
    """
    url = make_url(sqlalchemy_url)
    if url.get_backend_name() != "postgresql":
        raise BatchError(
            f"CHARTBRIEF_DB__URL: the batch queue needs PostgreSQL, not {url.get_backend_name()}"
        )
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def patient_lock(fhir_base: str, patient_id: str) -> str:
    """The lock and queueing lock of a patient's job: one per patient per FHIR server.

    >>> patient_lock("http://h/fhir", "p1").endswith(":p1")
    True
    >>> patient_lock("http://h/fhir", "p1") == patient_lock("http://other/fhir", "p1")
    False
    """
    server = hashlib.sha256(fhir_base.encode()).hexdigest()[:12]
    return f"chartbrief:{server}:{patient_id}"


class BackoffRetry(BaseRetryStrategy):
    """Retry `RetryLater` with a doubling wait; anything else is not retried (the item already says
    why it failed). `max_job_attempts` is a backstop: the item's own count decides first."""

    def __init__(self, *, initial_seconds: float, max_seconds: float, max_job_attempts: int) -> None:
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds
        self.max_job_attempts = max_job_attempts

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if not isinstance(exception, RetryLater) or job.attempts + 1 >= self.max_job_attempts:
            return None
        wait = backoff_seconds(job.attempts + 1, self.initial_seconds, self.max_seconds)
        # `retry_at`, not `retry_in`: Procrastinate types `retry_in` seconds as whole ints.
        return RetryDecision(retry_at=datetime.now(UTC) + timedelta(seconds=wait))


# ---------------------------------------------------------------------------------------------------
# The worker's state: opened once per process, shared by its jobs
# ---------------------------------------------------------------------------------------------------


class WorkerRuntime:
    """What a worker process holds: the model (loaded at its first patient), the database, and one
    FHIR client per server its runs name."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        self.settings = settings
        self.name = process_name()
        self.repo = BatchRepository.from_url(settings.db.url)
        self.store = open_store(settings)
        self._model = EngineSlot(settings, engine)
        self._connections: dict[str, FhirConnection] = {}
        self._stack = AsyncExitStack()

    def engine(self) -> Engine:
        return self._model.get()

    async def services(self, fhir_base: str) -> Services:
        conn = self._connections.get(fhir_base)
        if conn is None:
            conn = await self._stack.enter_async_context(open_fhir(self.settings, fhir_base))
            self._connections[fhir_base] = conn
        return services_for(self.settings, conn.client, self.engine(), self.store)

    async def aclose(self) -> None:
        await self._stack.aclose()
        await self._model.aclose()
        self.store.close()
        self.repo.close()


async def summarize_job(runtime: WorkerRuntime, run_id: int, patient_id: str) -> str:
    """One patient of one run, as a worker does it; the item's new state.

    A job delivered again for an item already final does nothing. An item whose earlier attempts
    all ended with their worker dying is failed rather than tried forever. The run's bookkeeping is
    database work, done in a thread (`in_thread`) like every store call from async code.
    """
    repo, batch = runtime.repo, runtime.settings.batch
    started = await in_thread(_start_job, runtime, run_id, patient_id)
    if isinstance(started, str):
        return started
    run, attempts = started
    svc = await runtime.services(run.fhir_base)
    meter = UsageMeter()
    try:
        result = await summarize_patient(svc, patient_id, skip_unchanged=True)
    except Exception as exc:  # noqa: BLE001 - recorded on the item, retried within bounds
        cpu, wall = meter.take()
        state = await in_thread(
            _record_job_failure, repo, run_id, patient_id, attempts, exc, batch, cpu, wall
        )
        if state == QUEUED:
            raise RetryLater(f"{type(exc).__name__} on attempt {attempts}") from exc
        return state
    cpu, wall = meter.take()
    outcome = await in_thread(outcome_for, svc, result, as_utc(run.started_at) or datetime.now(UTC), cpu)
    await in_thread(_record_job_done, repo, run_id, patient_id, outcome, cpu, wall)
    log.info(
        "batch.item.done",
        run=run_id,
        state=outcome.state,
        tokens=outcome.prompt_tokens + outcome.completion_tokens,
        seconds=round(outcome.seconds, 2),
        document_reference=outcome.document_reference,
    )
    return outcome.state


def _start_job(runtime: WorkerRuntime, run_id: int, patient_id: str) -> tuple[Run, int] | str:
    """The run and the item's attempt number, or the state that ends the job here."""
    repo, batch = runtime.repo, runtime.settings.batch
    run = repo.get_run(run_id)
    if run is None or run.status != RUN_RUNNING:
        log.info("batch.job.run_closed", run=run_id, patient_id=patient_id)
        return "closed"
    attempts = repo.start_item(run_id, patient_id, runtime.name)
    if attempts is None:
        log.info("batch.job.already_final", run=run_id, patient_id=patient_id)
        return "final"
    if attempts > batch.max_attempts:
        repo.set_state(run_id, patient_id, FAILED, error=interrupted_error(attempts - 1))
        repo.finish_run_if_done(run_id)
        return FAILED
    return run, attempts


def _record_job_failure(
    repo: BatchRepository,
    run_id: int,
    patient_id: str,
    attempts: int,
    exc: BaseException,
    batch: BatchSettings,
    cpu: float,
    wall: float,
) -> str:
    repo.add_usage(run_id, cpu_seconds=cpu, machine_seconds=wall)
    state = record_failure(repo, run_id, patient_id, attempts, exc, batch.max_attempts)
    if state != QUEUED:
        repo.finish_run_if_done(run_id)
    return state


def _record_job_done(
    repo: BatchRepository, run_id: int, patient_id: str, outcome: ItemOutcome, cpu: float, wall: float
) -> None:
    repo.finish_item(run_id, patient_id, outcome)
    repo.add_usage(run_id, cpu_seconds=cpu, machine_seconds=wall)
    repo.finish_run_if_done(run_id)


# ---------------------------------------------------------------------------------------------------
# The Procrastinate app
# ---------------------------------------------------------------------------------------------------


def build_app(settings: Settings, runtime: WorkerRuntime | None = None) -> procrastinate.App:
    """The Procrastinate app with chartbrief's tasks. A `batch run` builds it without a runtime (it
    only defers); a worker passes its `WorkerRuntime`."""
    batch = settings.batch
    connector = procrastinate.PsycopgConnector(
        conninfo=libpq_conninfo(settings.db.url), min_size=1, max_size=max(4, batch.worker_concurrency + 3)
    )
    app = procrastinate.App(connector=connector)
    retry = BackoffRetry(
        initial_seconds=batch.retry_wait_seconds,
        max_seconds=batch.retry_wait_max_seconds,
        max_job_attempts=batch.max_attempts * 2 + 2,
    )

    def need_runtime() -> WorkerRuntime:
        if runtime is None:
            raise RuntimeError("this process only defers jobs; run them with `chartbrief batch worker`")
        return runtime

    @app.task(name=TASK_SUMMARIZE, queue=batch.queue, retry=retry)
    async def summarize(run_id: int, patient_id: str) -> str:
        return await summarize_job(need_runtime(), run_id, patient_id)

    @app.periodic(cron=RECOVER_CRON, periodic_id="recover-stalled")
    @app.task(name=TASK_RECOVER, queue=batch.queue, queueing_lock=TASK_RECOVER, pass_context=True)
    async def recover(context: procrastinate.JobContext, timestamp: int) -> None:  # noqa: ARG001 - periodic
        await recover_stalled(context.app, batch.stalled_after_seconds)

    if batch.schedule and settings.fhir.base_url:

        @app.periodic(cron=batch.schedule, periodic_id="nightly")
        @app.task(name=TASK_NIGHTLY, queue=batch.queue, queueing_lock=TASK_NIGHTLY, pass_context=True)
        async def nightly(context: procrastinate.JobContext, timestamp: int) -> None:  # noqa: ARG001
            repo = need_runtime().repo
            await start_queue_run(settings, BatchRequest(wait=False), context.app, repo)

    return app


def quiet_procrastinate() -> None:
    """Procrastinate logs each job at INFO in plain text (task arguments included); chartbrief's own
    structured lines say what matters, so only its warnings are kept."""
    logging.getLogger("procrastinate").setLevel(logging.WARNING)


async def workers_alive(app: procrastinate.App, stalled_after_seconds: float) -> int:
    """How many workers sent a heartbeat recently."""
    row = await app.connector.execute_query_one_async(
        "SELECT count(*) AS n FROM procrastinate_workers "
        "WHERE last_heartbeat > NOW() - (%(seconds)s || ' SECOND')::INTERVAL",
        seconds=stalled_after_seconds,
    )
    return int(row["n"])


async def ensure_queue_schema(settings: Settings) -> None:
    """Apply Procrastinate's schema once, if the database does not have it yet."""
    conninfo = libpq_conninfo(settings.db.url)
    try:
        connection = await psycopg.AsyncConnection.connect(conninfo, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise BatchError(f"CHARTBRIEF_DB__URL: cannot connect to PostgreSQL ({type(exc).__name__})") from exc
    async with connection as conn:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_QUEUE_SCHEMA_LOCK_KEY,))
        cursor = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
        row = await cursor.fetchone()
        if not (row and row[0]):
            # The schema file is trusted SQL shipped with Procrastinate; no parameters, so no % escaping.
            await conn.execute(SchemaManager.get_schema())
            log.info("batch.queue.schema_applied")
        await conn.commit()


async def recover_stalled(app: procrastinate.App, stalled_after_seconds: float) -> int:
    """Retry the jobs of workers that stopped sending heartbeats (killed, machine lost)."""
    recovered = 0
    for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_after_seconds):
        try:
            await app.job_manager.retry_job(job)
        except ProcrastinateException as exc:
            log.warning("batch.queue.recover_failed", job=job.id, error_class=type(exc).__name__)
            continue
        recovered += 1
        log.warning("batch.queue.recovered", job=job.id, task=job.task_name, worker=job.worker_id)
    return recovered


async def defer_patients(app: procrastinate.App, fhir_base: str, run_id: int, patient_ids: list[str]) -> int:
    """One job per patient; a patient whose job is already waiting is not queued again."""
    task = app.tasks[TASK_SUMMARIZE]
    deferred = 0
    for patient_id in patient_ids:
        lock = patient_lock(fhir_base, patient_id)
        try:
            await task.configure(lock=lock, queueing_lock=lock).defer_async(
                run_id=run_id, patient_id=patient_id
            )
        except AlreadyEnqueued:
            log.info("batch.queue.already_waiting", run=run_id, patient_id=patient_id)
            continue
        deferred += 1
    log.info("batch.queue.deferred", run=run_id, jobs=deferred, patients=len(patient_ids))
    return deferred


async def reconcile(app: procrastinate.App, repo: BatchRepository, run_id: int, fhir_base: str) -> int:
    """Defer again the open items that have no waiting or running job (a job lost to a failure
    outside the task, or a run whose deferring was cut short)."""
    live: set[str] = set()
    for status in ("todo", "doing"):
        for job in await app.job_manager.list_jobs_async(task=TASK_SUMMARIZE, status=status):
            if job.task_kwargs.get("run_id") == run_id:
                live.add(str(job.task_kwargs.get("patient_id")))
    orphans = [p for p in repo.patients_in_state(run_id, OPEN_STATES) if p not in live]
    if orphans:
        log.warning("batch.queue.orphans", run=run_id, patients=len(orphans))
        return await defer_patients(app, fhir_base, run_id, orphans)
    return 0


async def start_queue_run(
    settings: Settings, request: BatchRequest, app: procrastinate.App, repo: BatchRepository
) -> tuple[int, int | None]:
    """(run to wait for, run resumed or None): an unfinished run of this server gets its open items
    deferred again and is the one returned; otherwise a new run is selected and deferred."""
    base = str(settings.fhir.base_url)
    async with open_fhir(settings, base) as conn:
        unfinished = repo.unfinished_run(conn.client.base_url)
        if unfinished is not None:
            await defer_patients(
                app, unfinished.fhir_base, unfinished.id, repo.patients_in_state(unfinished.id, [QUEUED])
            )
            await reconcile(app, repo, unfinished.id, unfinished.fhir_base)
            log.info("batch.resume", run=unfinished.id)
            return unfinished.id, unfinished.id
        if request.resume:
            raise BatchError(f"no unfinished batch run of {conn.client.base_url} to resume")
        started = datetime.now(UTC)
        selection = await select_patients(conn, repo, settings, request)
        run_id = create_run(repo, selection, fhir_base=conn.client.base_url, mode="queue", started_at=started)
        await defer_patients(app, conn.client.base_url, run_id, selection.patient_ids)
        repo.finish_run_if_done(run_id)  # nothing selected: finished at once
        return run_id, None


async def wait_for_run(
    app: procrastinate.App,
    repo: BatchRepository,
    run_id: int,
    settings: Settings,
    progress: ProgressSink,
    *,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> None:
    """Follow a run the workers are doing until it is final, recovering stalled jobs meanwhile."""
    batch = settings.batch
    last_done, last_change = -1, time.monotonic()
    while True:
        run = repo.get_run(run_id)
        if run is None:
            raise BatchError(f"batch run {run_id} disappeared from the database")
        counts = repo.state_counts(run_id)
        total = sum(counts.values())
        done = total - sum(counts.get(s, 0) for s in OPEN_STATES)
        progress.update(done, total)
        if run.status != RUN_RUNNING:
            return
        now = time.monotonic()
        if done == total:
            repo.finish_run_if_done(run_id)  # the last worker died between its item and the run
            await sleep(batch.poll_seconds)
            continue
        if done != last_done:
            last_done, last_change = done, now
        await recover_stalled(app, batch.stalled_after_seconds)
        if now - last_change > batch.stalled_after_seconds * RECONCILE_AFTER_STALL_PERIODS:
            await reconcile(app, repo, run_id, run.fhir_base)
            if not await workers_alive(app, batch.stalled_after_seconds):
                log.warning("batch.queue.no_workers", run=run_id, hint="start `chartbrief batch worker`")
            last_change = now
        await sleep(batch.poll_seconds)


async def run_batch_on_queue(
    settings: Settings,
    request: BatchRequest,
    repo: BatchRepository,
    *,
    progress_factory: Callable[[int], ProgressSink] | None = None,
) -> RunOutcome:
    """`chartbrief batch run` on PostgreSQL: defer, then (unless `wait` is off) wait and report."""
    meter = UsageMeter()
    quiet_procrastinate()
    await ensure_queue_schema(settings)
    app = build_app(settings)
    reports: list[BatchReport] = []
    async with app.open_async():
        run_id, resumed = await start_queue_run(settings, request, app, repo)
        reports.append(await _follow(app, repo, run_id, settings, request, progress_factory))
        if resumed is not None and not request.resume and request.wait:
            # The unfinished run is final now: the new run starts from its watermark.
            run_id, _ = await start_queue_run(settings, request, app, repo)
            report = await _follow(app, repo, run_id, settings, request, progress_factory)
            report.resumed_from = resumed
            reports.append(report)
    cpu, _ = meter.take()
    repo.add_usage(run_id, cpu_seconds=cpu)  # the selection's share; the workers add their own
    return RunOutcome(reports)


async def _follow(
    app: procrastinate.App,
    repo: BatchRepository,
    run_id: int,
    settings: Settings,
    request: BatchRequest,
    progress_factory: Callable[[int], ProgressSink] | None,
) -> BatchReport:
    if request.wait:
        progress = progress_factory(run_id) if progress_factory else LogProgress(run_id)
        try:
            await wait_for_run(app, repo, run_id, settings, progress)
        finally:
            progress.close()
    return report_for(repo, run_id, settings)


async def run_worker(
    settings: Settings,
    *,
    engine: Engine | None = None,
    concurrency: int | None = None,
    wait: bool = True,
) -> None:
    """`chartbrief batch worker`: run jobs until stopped (SIGINT/SIGTERM finish the current job)."""
    quiet_procrastinate()
    await ensure_queue_schema(settings)
    runtime = WorkerRuntime(settings, engine=engine)
    app = build_app(settings, runtime)
    try:
        # Load the model before taking jobs: loading blocks the event loop, and a worker that sends
        # no heartbeat for `stalled_after_seconds` would see its job handed to another worker.
        runtime.engine()
        async with app.open_async():
            await recover_stalled(app, settings.batch.stalled_after_seconds)
            log.info("batch.worker.start", worker=runtime.name, queue=settings.batch.queue)
            await app.run_worker_async(
                queues=[settings.batch.queue],
                name=runtime.name,
                concurrency=concurrency or settings.batch.worker_concurrency,
                wait=wait,
                update_heartbeat_interval=settings.batch.heartbeat_seconds,
                stalled_worker_timeout=settings.batch.stalled_after_seconds,
                delete_jobs="successful",
            )
    finally:
        with contextlib.suppress(Exception):
            await runtime.aclose()
        log.info("batch.worker.stop", worker=runtime.name)


__all__ = [
    "BackoffRetry",
    "RetryLater",
    "WorkerRuntime",
    "build_app",
    "defer_patients",
    "ensure_queue_schema",
    "libpq_conninfo",
    "patient_lock",
    "reconcile",
    "recover_stalled",
    "run_batch_on_queue",
    "run_worker",
    "start_queue_run",
    "summarize_job",
    "wait_for_run",
]
