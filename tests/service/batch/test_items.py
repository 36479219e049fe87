"""The per-patient state machine: what a failure means, resume after a dead process, a run's liveness,
and the items as the database keeps them."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from fhir_adapters.client import backoff_seconds
from fhir_adapters.errors import (
    FhirAuthError,
    FhirBadRequest,
    FhirConflict,
    FhirNotFound,
    FhirRateLimited,
    FhirServerError,
    FhirTransportError,
)
from service.batch.items import (
    after_failure,
    describe_error,
    is_retryable,
    item_outcome,
    resume_plan,
    run_is_alive,
)
from service.db.batch import (
    DONE,
    FAILED,
    QUEUED,
    RUN_COMPLETED_WITH_FAILURES,
    SKIPPED,
    BatchRepository,
    ItemOutcome,
    Run,
)
from service.llm.base import EngineError
from tests.service.batch.conftest import BASE

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
    """Both runners wait between a patient's attempts with the FHIR client's backoff, without jitter."""
    waits = [backoff_seconds(n, 5, 30) for n in range(1, 6)]
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


def test_an_unchanged_result_recorded_during_this_run_counts_as_summarized() -> None:
    started = datetime(2024, 1, 1, 2, 0, tzinfo=UTC)
    unchanged = result("p", unchanged=True)
    before = item_outcome(unchanged, run_started=started, recorded_at=started - timedelta(days=1))
    during = item_outcome(
        unchanged, run_started=started, recorded_at=started + timedelta(minutes=5), recorded_tokens=(90, 10)
    )
    assert before.state == SKIPPED
    assert (during.state, during.prompt_tokens, during.completion_tokens) == (DONE, 90, 10)
