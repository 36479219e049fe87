"""The batch core without a model or a real server: selection (FHIR mocked at the transport), the item
state machine, resume, the one-process runner (pipeline stages replaced by scripted ones), the report."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import respx
from click.testing import CliRunner

from fhir_adapters.errors import (
    FhirAuthError,
    FhirBadRequest,
    FhirConflict,
    FhirNotFound,
    FhirRateLimited,
    FhirServerError,
    FhirTransportError,
)
from service.cli.batch import batch as batch_cli
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
    Run,
    RunItem,
)
from service.jobs import (
    BatchRequest,
    LocalRunner,
    Stages,
    after_failure,
    build_report,
    describe_error,
    is_retryable,
    item_outcome,
    open_fhir,
    parse_patient_ids,
    patient_of,
    progress_figures,
    requeue_interrupted,
    resume_plan,
    retry_delay,
    run_is_alive,
    select_patients,
    services_for,
    since_with_overlap,
)
from service.llm.base import EngineError
from service.llm.fake import FakeEngine

BASE = "http://127.0.0.1:8998/fhir"
SERVER_DATE = "Tue, 02 Jan 2024 03:04:05 GMT"
AI_SYSTEM = "urn:chartbrief:summary"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        fhir={"base_url": BASE, "max_attempts": 1},  # type: ignore[arg-type]
        db={"url": f"sqlite:///{tmp_path}/cb.db"},  # type: ignore[arg-type]
        batch={"retry_wait_seconds": 0, "max_attempts": 3, "heartbeat_seconds": 60},  # type: ignore[arg-type]
    )


@pytest.fixture
def repo(settings: Settings) -> Iterator[BatchRepository]:
    r = BatchRepository.from_url(settings.db.url)
    yield r
    r.close()


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def cond(pid: str, rid: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": f"Patient/{pid}"}}


def fhir_server(router: respx.MockRouter, by_type: dict[str, list[dict[str, Any]]]) -> list[httpx.Request]:
    """A FHIR server answering metadata (with its Date) and searches from `by_type`; returns the requests."""
    seen: list[httpx.Request] = []
    headers = {"Date": SERVER_DATE, "Content-Type": "application/fhir+json"}

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        resource_type = request.url.path.rsplit("/", 1)[-1]
        if resource_type == "metadata":
            return httpx.Response(200, json={"resourceType": "CapabilityStatement"}, headers=headers)
        return httpx.Response(200, json=searchset(by_type.get(resource_type, [])), headers=headers)

    router.get(url__startswith=BASE).mock(side_effect=answer)
    return seen


def finished_run(
    repo: BatchRepository, *, watermark: str, failed: Sequence[str] = (), label: str = "changed"
) -> int:
    run_id = repo.create_run(
        fhir_base=BASE, mode="local", selection=label, patient_ids=["x", *failed], watermark=watermark
    )
    repo.start_item(run_id, "x", "w")
    repo.finish_item(run_id, "x", ItemOutcome(state=DONE))
    for pid in failed:
        repo.set_state(run_id, pid, FAILED, error="FhirServerError: 503")
    assert repo.finish_run_if_done(run_id)
    return run_id


# -- selection ----------------------------------------------------------------------------------------


def test_patient_file_ids_skip_comments_duplicates_and_name_bad_lines() -> None:
    ids, problems = parse_patient_ids("p1\n  p2  # ward 3\n\nPatient/p3\np1\nbad id\n", "night.txt")
    assert ids == ["p1", "p2", "p3"]
    assert problems == ["night.txt line 6: 'bad id' is not a FHIR id"]


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"resourceType": "Patient", "id": "p9"}, "p9"),
        ({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/a"}}, "a"),
        ({"resourceType": "Observation", "subject": {"reference": f"{BASE}/Patient/b/_history/2"}}, "b"),
        ({"resourceType": "Observation", "subject": {"reference": "Group/g"}}, None),
        ({"resourceType": "Observation"}, None),
    ],
)
def test_patient_of_reads_the_patient_a_resource_is_about(
    resource: dict[str, Any], expected: str | None
) -> None:
    assert patient_of(resource) == expected


async def test_first_run_selects_everyone_and_takes_the_servers_date_as_watermark(
    settings: Settings, repo: BatchRepository
) -> None:
    with respx.mock(assert_all_called=False) as router:
        seen = fhir_server(router, {"Patient": [{"resourceType": "Patient", "id": i} for i in ("a", "b")]})
        async with open_fhir(settings) as conn:
            selection = await select_patients(conn, repo, settings, BatchRequest())
    assert selection.patient_ids == ["a", "b"]
    assert selection.since is None
    # The server's clock, not this machine's.
    assert selection.watermark == "2024-01-02T03:04:05Z"
    assert [r.url.path.rsplit("/", 1)[-1] for r in seen] == ["metadata", "Patient"]


async def test_next_run_selects_patients_changed_since_the_watermark_but_not_for_our_own_summaries(
    settings: Settings, repo: BatchRepository
) -> None:
    finished_run(repo, watermark="2024-01-01T00:00:00Z")
    ours = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "identifier": [{"system": AI_SYSTEM, "value": "k"}],
        "subject": {"reference": "Patient/summarized-last-night"},
    }
    note = {"resourceType": "DocumentReference", "id": "d2", "subject": {"reference": "Patient/c"}}
    with respx.mock(assert_all_called=False) as router:
        seen = fhir_server(
            router,
            {
                "Condition": [cond("a", "1"), cond("b", "2"), cond("a", "3")],
                "DocumentReference": [ours, note],
                "AllergyIntolerance": [
                    {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/d"}}
                ],
            },
        )
        async with open_fhir(settings) as conn:
            selection = await select_patients(conn, repo, settings, BatchRequest())
    assert selection.patient_ids == ["c", "a", "b", "d"]  # search order: Encounter, DocumentReference, ...
    # The watermark moved back by the overlap (a second-precision clock; `gt` skips that whole second).
    since = since_with_overlap("2024-01-01T00:00:00Z", settings.batch.watermark_overlap_seconds)
    assert selection.since == since
    searched = [r for r in seen if not r.url.path.endswith("metadata")]
    assert {r.url.path.rsplit("/", 1)[-1] for r in searched} == set(settings.batch.change_types)
    assert all(r.url.params["_lastUpdated"] == f"gt{since}" for r in searched)


async def test_a_server_refusing_elements_is_searched_again_without(
    settings: Settings, repo: BatchRepository
) -> None:
    finished_run(repo, watermark="2024-01-01T00:00:00Z")
    settings = settings.model_copy(
        update={"batch": settings.batch.model_copy(update={"change_types": ["Condition"]})}
    )
    calls: list[dict[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("metadata"):
            return httpx.Response(
                200, json={"resourceType": "CapabilityStatement"}, headers={"Date": SERVER_DATE}
            )
        calls.append(dict(request.url.params))
        if "_elements" in request.url.params:
            return httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": []})
        return httpx.Response(200, json=searchset([cond("a", "1")]))

    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=BASE).mock(side_effect=answer)
        async with open_fhir(settings) as conn:
            selection = await select_patients(conn, repo, settings, BatchRequest())
    assert selection.patient_ids == ["a"]
    assert ["_elements" in c for c in calls] == [True, False]


async def test_patients_that_failed_last_run_are_carried_over_and_overlap_moves_since_back(
    settings: Settings, repo: BatchRepository
) -> None:
    finished_run(repo, watermark="2024-01-01T00:10:00Z", failed=["broken"])
    settings = settings.model_copy(
        update={"batch": settings.batch.model_copy(update={"watermark_overlap_seconds": 600})}
    )
    with respx.mock(assert_all_called=False) as router:
        fhir_server(router, {"Condition": [cond("a", "1")]})
        async with open_fhir(settings) as conn:
            selection = await select_patients(conn, repo, settings, BatchRequest())
    assert selection.patient_ids == ["a", "broken"]
    assert selection.carried_over == 1
    assert selection.since == "2024-01-01T00:00:00Z"


async def test_group_and_file_runs_neither_use_nor_move_the_changed_watermark(
    settings: Settings, repo: BatchRepository, tmp_path: Path
) -> None:
    finished_run(repo, watermark="2024-01-01T00:00:00Z", label="group:g1")
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("p1\n")
    group = {"resourceType": "Group", "id": "g1", "member": [{"entity": {"reference": "Patient/m1"}}]}
    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/Group/g1").mock(return_value=httpx.Response(200, json=group))
        fhir_server(router, {"Patient": [{"resourceType": "Patient", "id": "all"}]})
        async with open_fhir(settings) as conn:
            by_group = await select_patients(conn, repo, settings, BatchRequest(group_id="g1"))
            by_file = await select_patients(conn, repo, settings, BatchRequest(patients_file=ids_file))
            changed = await select_patients(conn, repo, settings, BatchRequest())
    assert (by_group.label, by_group.patient_ids) == ("group:g1", ["m1"])
    assert (by_file.label, by_file.patient_ids) == ("file:ids.txt", ["p1"])
    # No earlier "changed" run: the group run's watermark is not used, everyone is selected.
    assert (changed.since, changed.patient_ids) == (None, ["all"])


# -- state machine -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "retryable", "expected"),
    [(1, True, QUEUED), (2, True, QUEUED), (3, True, FAILED), (1, False, FAILED)],
)
def test_a_failure_is_queued_again_until_attempts_run_out(
    attempts: int, retryable: bool, expected: str
) -> None:
    assert after_failure(attempts, 3, retryable) == expected


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (FhirServerError("503", status=503), True),
        (FhirTransportError("down"), True),
        (FhirRateLimited("429", status=429), True),
        (FhirConflict("412", status=412), True),
        (EngineError("model server timed out"), True),
        (FhirNotFound("404", status=404), False),
        (FhirAuthError("403", status=403), False),
        (FhirBadRequest("400", status=400), False),
        (ValueError("Observation/1: valueQuantity has no value"), False),
    ],
)
def test_errors_are_retried_only_when_another_attempt_may_pass(error: Exception, retryable: bool) -> None:
    assert is_retryable(error) is retryable


def test_error_reasons_keep_our_own_messages_and_drop_foreign_text() -> None:
    ours = describe_error(FhirServerError("FHIR server answered 503 to GET /fhir/Patient/p1", status=503))
    assert ours == "FhirServerError: FHIR server answered 503 to GET /fhir/Patient/p1"
    # Text of an unknown exception could quote the record: only its class is kept.
    assert describe_error(RuntimeError("Jane Doe, born 1950-01-01")) == "RuntimeError"
    assert len(describe_error(EngineError("x" * 1000))) <= 300


def test_resume_requeues_interrupted_items_and_fails_those_out_of_attempts() -> None:
    plan = resume_plan([("fresh", 1), ("unlucky", 3)], max_attempts=3)
    assert plan["fresh"][0] == QUEUED
    assert plan["unlucky"][0] == FAILED
    assert "Interrupted" in plan["unlucky"][1]


def test_retry_waits_double_up_to_the_cap() -> None:
    waits = [retry_delay(n, 5, 30) for n in range(1, 6)]
    assert waits == [min(5 * 2 ** (n - 1), 30) for n in range(1, 6)]


def test_a_run_is_dead_when_its_process_is_gone_or_silent() -> None:
    now = datetime.now(UTC)
    host = socket.gethostname()

    def run(owner: str, beat_age: float) -> Run:
        return Run(owner=owner, started_at=now, heartbeat_at=now - timedelta(seconds=beat_age))

    alive = {os.getpid()}

    def check(r: Run) -> bool:
        return run_is_alive(
            r, now=now, this_host=host, stalled_after_seconds=60, pid_alive=alive.__contains__
        )

    assert check(run(f"{host}:{os.getpid()}", 1))
    assert not check(run(f"{host}:999999", 1)), "killed on this host: resume at once"
    assert not check(run(f"{host}:{os.getpid()}", 120)), "silent past the stall limit"
    assert check(run("other-host:1", 1)), "another host's fresh heartbeat is trusted"


# -- repository ---------------------------------------------------------------------------------------


def test_items_count_attempts_and_a_job_for_a_final_item_does_nothing(repo: BatchRepository) -> None:
    run_id = repo.create_run(fhir_base=BASE, mode="local", selection="changed", patient_ids=["a", "b", "a"])
    assert repo.state_counts(run_id) == {QUEUED: 2}
    assert repo.start_item(run_id, "a", "w1") == 1
    repo.set_state(run_id, "a", QUEUED, error="FhirServerError: 503")
    assert repo.start_item(run_id, "a", "w1") == 2
    repo.finish_item(run_id, "a", ItemOutcome(state=DONE, prompt_tokens=7))
    assert repo.start_item(run_id, "a", "w2") is None
    assert repo.start_item(run_id, "nobody", "w2") is None
    item = repo.item(run_id, "a")
    assert item is not None and (item.state, item.attempts, item.error) == (DONE, 2, None)


def test_a_run_closes_only_when_nothing_is_open_and_says_if_some_failed(repo: BatchRepository) -> None:
    run_id = repo.create_run(fhir_base=BASE, mode="queue", selection="changed", patient_ids=["a", "b"])
    repo.start_item(run_id, "a", "w")
    repo.finish_item(run_id, "a", ItemOutcome(state=DONE, prompt_tokens=10, completion_tokens=5))
    assert not repo.finish_run_if_done(run_id)
    repo.set_state(run_id, "b", FAILED, error="FhirNotFound: 404")
    assert repo.finish_run_if_done(run_id)
    assert not repo.finish_run_if_done(run_id), "only one closer wins"
    run = repo.get_run(run_id)
    assert run is not None
    assert (run.status, run.summarized, run.failed, run.prompt_tokens) == (
        RUN_COMPLETED_WITH_FAILURES,
        1,
        1,
        10,
    )


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
        return Stages(prepare=self.prepare, unchanged=self.unchanged, complete=self.complete)  # type: ignore[arg-type]

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


def result(patient: str, *, unchanged: bool = False) -> Any:
    return SimpleNamespace(
        unchanged=unchanged,
        idempotency_key=f"key-{patient}",
        write=SimpleNamespace(document_reference=f"DocumentReference/doc-{patient}"),
        prompt_tokens=0 if unchanged else 100,
        completion_tokens=0 if unchanged else 20,
        seconds=0.1,
        seconds_fetch=0.03,
        seconds_generate=0.06,
    )


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
    flaky = [FhirServerError(f"FHIR server answered 503 (try {n})", status=503) for n in range(5)]
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


def test_an_unchanged_result_recorded_during_this_run_counts_as_summarized() -> None:
    started = datetime(2024, 1, 1, 2, 0, tzinfo=UTC)
    unchanged = result("p", unchanged=True)
    before = item_outcome(unchanged, run_started=started, recorded_at=started - timedelta(days=1))
    during = item_outcome(
        unchanged, run_started=started, recorded_at=started + timedelta(minutes=5), recorded_tokens=(90, 10)
    )
    assert before.state == SKIPPED
    assert (during.state, during.prompt_tokens, during.completion_tokens) == (DONE, 90, 10)


# -- report -------------------------------------------------------------------------------------------


def test_report_adds_up_tokens_cpu_and_cost_per_thousand_summaries(settings: Settings) -> None:
    started = datetime(2024, 1, 1, 2, 0, tzinfo=UTC)
    run = Run(
        id=4,
        status=RUN_COMPLETED,
        mode="local",
        fhir_base=BASE,
        selection="changed",
        selection_problems=0,
        started_at=started,
        finished_at=started + timedelta(seconds=240),
        cpu_seconds=300.0,
        machine_seconds=200.0,
    )
    items = [
        RunItem(patient_id="a", state=DONE, attempts=1, prompt_tokens=1000, completion_tokens=200),
        RunItem(patient_id="b", state=DONE, attempts=1, prompt_tokens=1400, completion_tokens=400),
        RunItem(patient_id="c", state=SKIPPED, attempts=1, prompt_tokens=0, completion_tokens=0),
        RunItem(
            patient_id="d",
            state=FAILED,
            attempts=3,
            error="FhirServerError: 503",
            prompt_tokens=0,
            completion_tokens=0,
        ),
    ]
    price = settings.batch.price_per_machine_hour
    report = build_report(run, items, settings.batch, now=started)
    tokens = 1000 + 200 + 1400 + 400
    assert (report.selected, report.summarized, report.skipped_unchanged, report.failed) == (4, 2, 1, 1)
    assert report.tokens == tokens
    assert report.tokens_per_summary == tokens / 2
    assert report.cpu_seconds_per_summary == 300.0 / 2
    assert report.cost_per_1000_summaries == pytest.approx(200.0 / 3600 / 2 * 1000 * price, abs=1e-4)
    assert report.patients_per_minute == pytest.approx(3 / (240 / 60))
    data = report.to_json()
    assert data["failures"] == [{"patient": "d", "attempts": 3, "reason": "FhirServerError: 503"}]
    assert json.loads(json.dumps(data)) == data


def test_progress_rate_and_time_left() -> None:
    rate, eta = progress_figures(done=4, total=10, elapsed_seconds=120)
    assert rate == 4 / 2
    assert eta == (10 - 4) / (4 / 120)


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_status_and_report_read_a_run(settings: Settings, repo: BatchRepository) -> None:
    run_id = repo.create_run(fhir_base=BASE, mode="local", selection="changed", patient_ids=["a", "b"])
    repo.start_item(run_id, "a", "w")
    repo.finish_item(run_id, "a", ItemOutcome(state=DONE, prompt_tokens=30, completion_tokens=12))
    repo.set_state(run_id, "b", FAILED, error="FhirNotFound: FHIR server answered 404")
    repo.finish_run_if_done(run_id)
    runner = CliRunner()
    env = {"CHARTBRIEF_DB__URL": settings.db.url}
    report = runner.invoke(batch_cli, ["report", str(run_id), "--json"], env=env)
    assert report.exit_code == 0, report.output
    data = json.loads(report.stdout)
    assert (data["summarized"], data["failed"], data["tokens"]) == (1, 1, 42)
    assert data["failures"][0]["reason"].startswith("FhirNotFound")
    text = runner.invoke(batch_cli, ["report", str(run_id)], env=env)
    assert "Patient/b after 0 attempt(s): FhirNotFound" in text.output
    status = runner.invoke(batch_cli, ["status"], env=env)
    assert status.exit_code == 0 and f"run {run_id} {RUN_COMPLETED_WITH_FAILURES}" in status.output
    missing = runner.invoke(batch_cli, ["report", "999"], env=env)
    assert missing.exit_code == 2 and "no batch run 999" in missing.output


def test_cli_worker_refuses_sqlite(settings: Settings) -> None:
    out = CliRunner().invoke(batch_cli, ["worker"], env={"CHARTBRIEF_DB__URL": settings.db.url})
    assert out.exit_code == 2
    assert "needs PostgreSQL" in out.output


# -- the queue's retry policy (pure) ------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [0, 1, 2])
def test_queue_retries_a_retry_later_with_a_doubling_wait(attempts: int) -> None:
    from procrastinate.jobs import Job

    from service.queue import BackoffRetry, RetryLater

    policy = BackoffRetry(initial_seconds=10, max_seconds=1000, max_job_attempts=5)
    job = Job(queue="q", lock=None, queueing_lock=None, task_name="t", attempts=attempts)
    before = datetime.now(UTC)
    decision = policy.get_retry_decision(exception=RetryLater("503"), job=job)
    assert decision is not None and decision.retry_at is not None
    wait = (decision.retry_at - before).total_seconds()
    assert wait == pytest.approx(retry_delay(attempts + 1, 10, 1000), abs=1.0)
    assert policy.get_retry_decision(exception=ValueError("bug"), job=job) is None


def test_queue_stops_retrying_at_the_backstop() -> None:
    from procrastinate.jobs import Job

    from service.queue import BackoffRetry, RetryLater

    policy = BackoffRetry(initial_seconds=1, max_seconds=1, max_job_attempts=3)
    job = Job(queue="q", lock=None, queueing_lock=None, task_name="t", attempts=2)
    assert policy.get_retry_decision(exception=RetryLater("503"), job=job) is None
