"""One patient of a run, as a state machine: `queued -> running -> done | skipped | failed`.

`done`: a summary was written in this run; `skipped`: its summary of the same inputs, prompt and
model stands (one hash, no generation); `failed`: after `batch.max_attempts`, with the error class
and a short reason. A failure worth retrying puts the item back in `queued`; an item left `running`
by a process that died is queued again, or failed once it has used every attempt. Both runners
(local and queue) decide with these functions, so a patient fares the same on one machine or many.

What it must not do: store or log text that might quote a record (error reasons keep chartbrief's
own messages and only the class of anything else), or loop on a patient that kills its process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime

import httpx
import structlog

from fhir_adapters.auth.backend import BackendAuthError
from fhir_adapters.errors import FhirConflict, FhirError, FhirRetryableError
from service.batch.request import BatchError
from service.db.batch import (
    DONE,
    FAILED,
    QUEUED,
    SKIPPED,
    BatchRepository,
    ItemOutcome,
    Run,
    as_utc,
)
from service.llm.base import EngineError
from service.pipeline import Services, SummaryResult
from service.prompts import PromptError

log = structlog.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------
# Pure: what a failure means
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


# ---------------------------------------------------------------------------------------------------
# Pure: whether the process driving a run is still alive
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# What a result means for its item
# ---------------------------------------------------------------------------------------------------


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
    skipped = ItemOutcome(
        state=SKIPPED,
        seconds=result.seconds,
        seconds_fetch=result.seconds_fetch,
        seconds_generate=result.seconds_generate,
        cpu_seconds=cpu_seconds,
        document_reference=write.document_reference if write else None,
    )
    if not result.unchanged:
        return replace(
            skipped,
            state=DONE,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )
    recorded = as_utc(recorded_at)
    if recorded is not None and recorded >= run_started:
        return replace(
            skipped, state=DONE, prompt_tokens=recorded_tokens[0], completion_tokens=recorded_tokens[1]
        )
    return skipped


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
# Recording failures and interruptions
# ---------------------------------------------------------------------------------------------------


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
