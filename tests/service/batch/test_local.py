"""The one-process runner with the pipeline stages replaced by scripted ones: look-ahead reads,
retries, give-up, unchanged patients, resume."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from fhir_adapters.errors import FhirNotFound, FhirServerError
from service.batch.connect import services_for
from service.batch.items import requeue_interrupted
from service.batch.local import LocalRunner, Stages
from service.batch.report import build_report
from service.config import Settings
from service.db.batch import (
    DONE,
    FAILED,
    QUEUED,
    RUN_COMPLETED,
    RUN_COMPLETED_WITH_FAILURES,
    SKIPPED,
    BatchRepository,
    ItemOutcome,
)
from service.llm.fake import FakeEngine
from tests.service.batch.conftest import BASE
from tests.service.batch.test_items import result

# -- the one-process runner ---------------------------------------------------------------------------


@dataclass
class ScriptedStages:
    """Pipeline stages that take time and fail as scripted, and log when each stage ran."""

    prepare_seconds: float = 0.03
    complete_seconds: float = 0.06
    failures: dict[str, list[Exception]] = field(default_factory=dict)  # per patient, in order
    unchanged_patients: set[str] = field(default_factory=set)
    events: list[tuple[str, str, float]] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)

    def stages(self) -> Stages:
        return Stages(prepare=self.prepare, unchanged=self.unchanged, complete=self.complete)

    def _mark(self, patient: str, what: str) -> None:
        self.events.append((patient, what, asyncio.get_running_loop().time()))

    async def prepare(self, svc: Any, patient: str) -> Any:
        self._mark(patient, "prepare-start")
        await asyncio.sleep(self.prepare_seconds)
        self._mark(patient, "prepare-end")
        return SimpleNamespace(patient_id=patient)

    def unchanged(self, svc: Any, prep: Any) -> Any:
        if prep.patient_id in self.unchanged_patients:
            return result(prep.patient_id, unchanged=True)
        return None

    async def complete(self, svc: Any, prep: Any) -> Any:
        self._mark(prep.patient_id, "complete-start")
        await asyncio.sleep(self.complete_seconds)
        self._mark(prep.patient_id, "complete-end")
        scripted = self.failures.get(prep.patient_id)
        if scripted:
            raise scripted.pop(0)
        self.completed.append(prep.patient_id)
        return result(prep.patient_id)

    def at(self, patient: str, what: str) -> float:
        return next(t for p, w, t in self.events if p == patient and w == what)


class NoRecords:
    def find(self, fhir_base: str, key: str) -> None:
        return None


async def run_local(
    settings: Settings, repo: BatchRepository, patients: list[str], scripted: ScriptedStages, **batch: Any
) -> tuple[int, list[float]]:
    settings = settings.model_copy(update={"batch": settings.batch.model_copy(update=batch)})
    run_id = repo.create_run(fhir_base=BASE, mode="local", selection="changed", patient_ids=patients)
    run = repo.get_run(run_id)
    assert run is not None
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    svc = services_for(settings, SimpleNamespace(base_url=BASE), FakeEngine(), NoRecords())  # type: ignore[arg-type]
    await LocalRunner(svc, repo, run, stages=scripted.stages(), sleep=no_wait).execute()
    return run_id, waits


async def test_runner_reads_the_next_patient_while_the_model_works_on_the_current(
    settings: Settings, repo: BatchRepository
) -> None:
    overlapped = ScriptedStages()
    await run_local(settings, repo, ["p1", "p2", "p3"], overlapped, prefetch=2)
    assert overlapped.at("p2", "prepare-end") < overlapped.at("p1", "complete-end")
    assert overlapped.at("p3", "prepare-start") < overlapped.at("p2", "complete-end")

    sequential = ScriptedStages()
    await run_local(settings, repo, ["q1", "q2"], sequential, prefetch=0)
    assert sequential.at("q2", "prepare-start") >= sequential.at("q1", "complete-start")


@pytest.mark.parametrize("prefetch", [1, 2])
async def test_runner_never_reads_more_than_prefetch_patients_ahead_of_the_model(
    settings: Settings, repo: BatchRepository, prefetch: int
) -> None:
    scripted = ScriptedStages(prepare_seconds=0.005, complete_seconds=0.04)
    patients = [f"p{n}" for n in range(6)]
    await run_local(settings, repo, patients, scripted, prefetch=prefetch)
    # At each read, the patients read but not yet taken by the model (that one included).
    ahead = [
        sum(1 for p in patients if scripted.at(p, "prepare-start") <= t < scripted.at(p, "complete-start"))
        for t in (scripted.at(p, "prepare-start") for p in patients)
    ]
    assert max(ahead) == prefetch


async def test_runner_retries_a_transient_failure_then_succeeds(
    settings: Settings, repo: BatchRepository
) -> None:
    scripted = ScriptedStages(failures={"p2": [FhirServerError("FHIR server answered 503", status=503)]})
    run_id, waits = await run_local(settings, repo, ["p1", "p2"], scripted, retry_wait_seconds=7)
    assert sorted(scripted.completed) == ["p1", "p2"]
    assert waits == [7.0]
    item = repo.item(run_id, "p2")
    assert item is not None and (item.state, item.attempts) == (DONE, 2)
    run = repo.get_run(run_id)
    assert run is not None and run.status == RUN_COMPLETED


async def test_runner_gives_up_after_max_attempts_and_reports_the_reason(
    settings: Settings, repo: BatchRepository
) -> None:
    flaky: list[Exception] = [
        FhirServerError(f"FHIR server answered 503 (try {n})", status=503) for n in range(5)
    ]
    scripted = ScriptedStages(
        failures={"p1": flaky, "p2": [FhirNotFound("FHIR server answered 404", status=404)]}
    )
    run_id, waits = await run_local(settings, repo, ["p1", "p2", "p3"], scripted, max_attempts=3)
    p1, p2 = repo.item(run_id, "p1"), repo.item(run_id, "p2")
    assert p1 is not None and (p1.state, p1.attempts) == (FAILED, 3)
    assert p1.error is not None and p1.error.startswith("FhirServerError: FHIR server answered 503 (try 2)")
    assert p2 is not None and (p2.state, p2.attempts) == (FAILED, 1), "a permanent error is not retried"
    assert len(waits) == 2
    report = build_report(repo.get_run(run_id), repo.items(run_id), settings.batch, now=datetime.now(UTC))  # type: ignore[arg-type]
    assert (report.summarized, report.failed, report.status) == (1, 2, RUN_COMPLETED_WITH_FAILURES)
    assert {f.patient: f.reason.split(":")[0] for f in report.failures} == {
        "p1": "FhirServerError",
        "p2": "FhirNotFound",
    }


async def test_runner_skips_unchanged_patients_without_generating(
    settings: Settings, repo: BatchRepository
) -> None:
    scripted = ScriptedStages(unchanged_patients={"same"})
    run_id, _ = await run_local(settings, repo, ["same", "new"], scripted)
    assert scripted.completed == ["new"]
    assert repo.state_counts(run_id) == {SKIPPED: 1, DONE: 1}


async def test_a_resumed_run_keeps_done_items_and_finishes_the_rest(
    settings: Settings, repo: BatchRepository
) -> None:
    run_id = repo.create_run(fhir_base=BASE, mode="local", selection="changed", patient_ids=["d", "r", "q"])
    repo.start_item(run_id, "d", "dead:1")
    repo.finish_item(run_id, "d", ItemOutcome(state=DONE))
    repo.start_item(run_id, "r", "dead:1")  # the process died while summarizing "r"
    assert requeue_interrupted(repo, run_id, settings.batch.max_attempts) == {"r": QUEUED}
    run = repo.get_run(run_id)
    assert run is not None
    scripted = ScriptedStages()
    svc = services_for(settings, SimpleNamespace(base_url=BASE), FakeEngine(), NoRecords())  # type: ignore[arg-type]
    await LocalRunner(svc, repo, run, stages=scripted.stages()).execute()
    assert sorted(scripted.completed) == ["q", "r"]
    item = repo.item(run_id, "r")
    assert item is not None and (item.state, item.attempts) == (DONE, 2)
