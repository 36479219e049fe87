"""What a batch run did and cost: its report, its progress as it goes, and the machine time it used.

Counts and tokens come from the run's items in the database, so the report of a run still going
(or interrupted) is as true as one of a finished run, and every process that worked on it adds
its own CPU and wall seconds as it goes. The cost per 1000 summaries is machine time at the
configured hourly price (`batch.price_per_machine_hour`).

What it must not do: name anything but patient ids, counts, timings and error reasons.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from service.batch.request import BatchError
from service.config import BatchSettings, Settings
from service.db.batch import (
    DONE,
    FAILED,
    OPEN_STATES,
    QUEUED,
    RUN_RUNNING,
    SKIPPED,
    BatchRepository,
    Run,
    RunItem,
    as_utc,
)

log = structlog.get_logger(__name__)


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


@dataclass
class RunOutcome:
    """The reports of what this command did: a resumed run first, then the new run (if any)."""

    reports: list[BatchReport]

    @property
    def last(self) -> BatchReport | None:
        return self.reports[-1] if self.reports else None


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
# Reading runs back (`batch report`, `batch status`)
# ---------------------------------------------------------------------------------------------------


def report_for(repo: BatchRepository, run_id: int, settings: Settings) -> BatchReport:
    """The report of a recorded run, as it stands now."""
    run = repo.get_run(run_id)
    if run is None:
        raise BatchError(f"no batch run {run_id} in {settings.db.url.split('://', 1)[0]} database")
    return build_report(run, repo.items(run_id), settings.batch, now=datetime.now(UTC))


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
