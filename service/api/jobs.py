"""Summary jobs started through the REST API: run in the background, looked up by id.

A job is an asyncio task in this process; its outcome is kept in memory (bounded: the oldest
finished jobs are forgotten first) and the summary itself is recorded in the summary store and
written to the EHR, where it outlives the process. A restart forgets job ids, never summaries:
`GET /api/patients/{id}/summaries/latest` still finds them.

How many jobs may wait or run is not decided here: the route takes a place from the process's
`WorkAdmission` (`service.api.limits`) before submitting, and the job gives it back when its task
ends, however it ends.

What it must not do: log a job's result (it holds the summary text), or let one failing job
affect another.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from service.api.limits import Place

log = structlog.get_logger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed"]
Runner = Callable[[], Awaitable[dict[str, Any]]]


@dataclass
class Job:
    id: str
    patient_id: str
    encounter_id: str | None
    requested_by: str  # principal subject: an id, never a secret
    kind: str = "summary"  # which face started it: "summary" (REST API, CDS) or "fhir-operation"
    status: JobStatus = "queued"
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    result: dict[str, Any] | None = field(default=None, repr=False)
    error: str | None = None  # a message fit for the caller (no PHI)

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "patient": self.patient_id,
            "encounter": self.encounter_id,
            "created": _iso(self.created_at),
            "finished": _iso(self.finished_at) if self.finished_at else None,
            "error": self.error,
            "result": self.result,
        }


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class JobRegistry:
    """Runs jobs with bounded concurrency and remembers at most `max_jobs` of them."""

    def __init__(self, max_jobs: int, *, concurrency: int = 2) -> None:
        self.max_jobs = max_jobs
        self.on_failure: Callable[[], None] | None = None  # told of each failed job (the metrics count them)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(concurrency)

    def submit(
        self,
        runner: Runner,
        *,
        patient_id: str,
        encounter_id: str | None,
        requested_by: str,
        describe_error: Callable[[BaseException], str],
        place: Place | None = None,
        kind: str = "summary",
    ) -> Job:
        """Start `runner` as a task; `place`, if given, is given back when the task ends."""
        job = Job(
            id=secrets.token_urlsafe(16),
            patient_id=patient_id,
            encounter_id=encounter_id,
            requested_by=requested_by,
            kind=kind,
        )
        self._jobs[job.id] = job
        self._forget_oldest()
        task = asyncio.create_task(self._run(job, runner, describe_error, place))
        self._tasks[job.id] = task
        if place is not None:
            # A task cancelled before its first step never enters `_run`: only a callback sees it end.
            task.add_done_callback(lambda _task: place.release())
        return job

    @property
    def live(self) -> int:
        """Jobs whose task has not ended yet (queued or running)."""
        return len(self._tasks)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def unfinished_for(self, patient_id: str, kind: str = "summary") -> Job | None:
        """A queued or running job of `kind` for the patient, if any (so a second ask waits on it)."""
        return next(
            (j for j in self._jobs.values() if j.patient_id == patient_id and j.kind == kind and not j.done),
            None,
        )

    async def _run(
        self,
        job: Job,
        runner: Runner,
        describe_error: Callable[[BaseException], str],
        place: Place | None,
    ) -> None:
        try:
            async with self._slots:
                job.status = "running"
                job.result = await runner()
                job.status = "succeeded"
                if place is not None:
                    place.finish()
        except asyncio.CancelledError:
            job.status, job.error = "failed", "the service stopped before the summary was finished"
            raise
        except Exception as exc:  # one job's failure is reported on the job, never raised further
            job.status, job.error = "failed", describe_error(exc)
            if self.on_failure is not None:
                self.on_failure()
            log.warning("api.job_failed", job_id=job.id, patient_id=job.patient_id, error=type(exc).__name__)
        finally:
            job.finished_at = time.time()
            self._tasks.pop(job.id, None)

    def _forget_oldest(self) -> None:
        while len(self._jobs) > self.max_jobs:
            oldest = next((jid for jid, j in self._jobs.items() if j.done), None)
            if oldest is None:
                return  # every remembered job is still running: keep them all
            del self._jobs[oldest]

    async def wait(self, job_id: str) -> None:
        """Wait for a job to finish (tests and graceful shutdown)."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.wait({task})

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
