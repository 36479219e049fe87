"""The batch on one machine: this process reads, summarizes and records every patient of a run.

Used with SQLite (the default) and any database whose runs are `mode=local`. The FHIR reads of
the next patients (`prepare_summary`) overlap the model's generation for the current one, at most
`batch.prefetch` patients ahead, so a population's records are never all in memory; `slots`
generations run at once. Failures worth retrying come back in later rounds, after a doubling
wait. A heartbeat keeps the run's machine time current, so a run killed at any point is finished
by `chartbrief batch run --resume` or by the next run.

What it must not do: load the model for a night with nothing to summarize, take over a run
another live process is driving, or log PHI (patient and resource ids, counts and timings only).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError

from fhir_adapters.client import backoff_seconds
from service.batch.connect import FhirConnection, open_fhir, services_for
from service.batch.items import outcome_for, pid_exists, record_failure, requeue_interrupted, run_is_alive
from service.batch.report import BatchReport, LogProgress, ProgressSink, RunOutcome, UsageMeter, report_for
from service.batch.request import BatchError, BatchRequest
from service.batch.selection import create_run, select_patients
from service.config import Settings
from service.db.batch import OPEN_STATES, QUEUED, BatchRepository, Run, as_utc, process_name
from service.db.store import SummaryStore, in_thread
from service.llm.base import Engine
from service.pipeline import (
    PreparedSummary,
    Services,
    SummaryResult,
    complete_summary,
    narrate_summary,
    prepare_summary,
    unchanged_result,
)
from service.runtime import EngineSlot, open_store

log = structlog.get_logger(__name__)


def generation_slots(settings: Settings) -> int:
    """How many summaries one process generates at once (see `batch.concurrency`)."""
    if settings.batch.concurrency is not None:
        return settings.batch.concurrency
    if settings.llm.servers:
        return len(settings.llm.servers) * settings.llm.per_server_concurrency
    return 1


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


class _Once:
    """`call`, called at most once however often this is."""

    def __init__(self, call: Callable[[], None]) -> None:
        self._call: Callable[[], None] | None = call

    def __call__(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call()


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
        await self._report_progress()
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            round_number = 0
            while pending := await in_thread(self.repo.patients_in_state, self.run.id, [QUEUED]):
                if round_number:
                    delay = backoff_seconds(
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
            await self._flush_usage()
        await in_thread(self.repo.finish_run_if_done, self.run.id)
        await self._report_progress()

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
            attempts = await in_thread(self.repo.start_item, self.run.id, patient_id, self.worker)
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
            taken = _Once(ahead.release)
            try:
                with structlog.contextvars.bound_contextvars(patient_id=item.patient_id):
                    await self._finish(item, taken)
            finally:
                taken()
                queue.task_done()
                await self._report_progress()
        queue.task_done()

    async def _finish(self, item: _Prepared, taken: Callable[[], None]) -> None:
        """Check, generate and record one read patient; `taken()` once the model has it (the reader
        may then read the next)."""
        try:
            if item.error is not None:
                raise item.error
            assert item.prep is not None
            result = await in_thread(self.stages.unchanged, self.svc, item.prep)
            taken()
            if result is None:
                result = await self.stages.complete(self.svc, item.prep)
        except Exception as exc:  # noqa: BLE001 - recorded, retried within bounds, reported
            await in_thread(
                record_failure,
                self.repo,
                self.run.id,
                item.patient_id,
                item.attempts,
                exc,
                self.batch.max_attempts,
            )
            return
        outcome = await in_thread(outcome_for, self.svc, result, self.run_started)
        await in_thread(self.repo.finish_item, self.run.id, item.patient_id, outcome)
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
                await self._flush_usage()
            except SQLAlchemyError as exc:  # a busy database must not stop the run; the next beat retries
                log.warning("batch.heartbeat_failed", run=self.run.id, error_class=type(exc).__name__)

    async def _flush_usage(self) -> None:
        cpu, wall = self._usage.take()
        await in_thread(self.repo.add_usage, self.run.id, cpu_seconds=cpu, machine_seconds=wall)

    async def _report_progress(self) -> None:
        if self.progress is None:
            return
        counts = await in_thread(self.repo.state_counts, self.run.id)
        total = sum(counts.values())
        self.progress.update(total - sum(counts.get(s, 0) for s in OPEN_STATES), total)


# ---------------------------------------------------------------------------------------------------
# The whole command, locally
# ---------------------------------------------------------------------------------------------------


def check_can_resume(run: Run, settings: Settings) -> None:
    """Refuse to take over a local run whose process is still alive: two drivers would both work
    its items and both count its machine time."""
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


async def run_batch_locally(
    settings: Settings,
    request: BatchRequest,
    repo: BatchRepository,
    engine: Engine | None,
    progress_factory: Callable[[int], ProgressSink] | None,
) -> RunOutcome:
    """`chartbrief batch run` in this process: finish this server's unfinished run first, then
    (unless `--resume`) select and summarize a new one."""
    base = str(settings.fhir.base_url)
    reports: list[BatchReport] = []
    async with open_fhir(settings, base) as conn, EngineSlot(settings, engine) as engines:
        store = open_store(settings)
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
    engines: EngineSlot,
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
