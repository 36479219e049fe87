"""Nightly batch summarization: choose the patients, summarize each once, survive crashes, report.

A run goes: selection -> one queued item per patient -> each item `running` -> `done`, `skipped`
or `failed`. Runs and items live in the database (`service.db.batch`), so a run killed at any
point is finished by `chartbrief batch run --resume` or by the next run, and the write-back's
idempotency identifier keeps a retried patient from being written twice.

The modules, each importing only those listed before it:

- `request`: what the command was asked to do (`BatchRequest`) and `BatchError`;
- `connect`: the FHIR client with the batch's credentials and the server's clock;
- `selection`: who a run summarizes (ids file, Group, changed since the watermark, Bulk Data);
- `items`: the per-patient state machine (outcomes, retries, resume, failure records);
- `report`: the run's report, progress lines and machine-time meter;
- `local`: the one-process runner (SQLite, the default);
- `queue`: Procrastinate jobs run by `chartbrief batch worker` processes (PostgreSQL).

`run_batch` below picks the runner by the database. The queue runner is imported only when the
database is PostgreSQL, so a SQLite install never loads Procrastinate.

What the package must not do: log or store PHI (patient and resource ids, counts and timings
only), hold a whole population's records in memory, or trust the local clock for the watermark.
"""

from __future__ import annotations

from collections.abc import Callable

from service.batch.local import run_batch_locally
from service.batch.report import (
    BatchReport,
    LogProgress,
    ProgressSink,
    RunOutcome,
    open_run_status,
    progress_figures,
    report_for,
    run_progress,
)
from service.batch.request import BatchError, BatchRequest
from service.config import Settings
from service.db.batch import BatchRepository
from service.llm.base import Engine


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
    if not settings.fhir.base_url:
        raise BatchError("no FHIR server configured: set CHARTBRIEF_FHIR__BASE_URL or pass --fhir-base")
    repo = BatchRepository.from_url(settings.db.url)
    try:
        if repo.is_postgresql:
            from service.batch.queue import run_batch_on_queue  # Procrastinate only where it is used

            return await run_batch_on_queue(settings, request, repo, progress_factory=progress_factory)
        return await run_batch_locally(settings, request, repo, engine, progress_factory)
    finally:
        repo.close()


__all__ = [
    "BatchError",
    "BatchReport",
    "BatchRequest",
    "LogProgress",
    "ProgressSink",
    "RunOutcome",
    "open_run_status",
    "progress_figures",
    "report_for",
    "run_batch",
    "run_progress",
]
