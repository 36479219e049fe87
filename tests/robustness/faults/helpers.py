"""What the fault tests share: running a command with a deadline, changing a record, the settings."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from fhir_adapters.client import FhirClient
from tests.conftest import run_in_private_loop

T = TypeVar("T")
# The safety net of every command run under a fault: far above what a fault costs (seconds), so an
# expiry means a hang, not a slow machine.
DEADLINE_SECONDS = 90.0

# Quick retries: the faults are short bursts, and the suite must stay fast.
FAST_FHIR = {
    "CHARTBRIEF_FHIR__TIMEOUT_SECONDS": "5",
    "CHARTBRIEF_FHIR__BACKOFF_INITIAL_SECONDS": "0.05",
    "CHARTBRIEF_FHIR__BACKOFF_MAX_SECONDS": "0.2",
    "CHARTBRIEF_FHIR__MAX_ATTEMPTS": "4",
    "CHARTBRIEF_PROMPT": "summary/v1",
}


def within_deadline(what: str, fn: Callable[[], T], seconds: float = DEADLINE_SECONDS) -> T:
    """`fn()` in a worker thread; a test failure naming `what` if it has not returned in time."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    try:
        return future.result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"{what} hung: no outcome within {seconds:.0f}s", pytrace=False)
    finally:
        pool.shutdown(wait=False)


def touch_record(fhir_base: str, patient_id: str) -> None:
    """A new version of the Patient, so the next summary has a new idempotency key and is written."""

    async def touch() -> None:
        async with FhirClient(fhir_base) as client:
            patient = await client.read("Patient", patient_id)
            patient.setdefault("extension", []).append(
                {"url": "urn:chartbrief:test:faults", "valueString": patient["meta"]["versionId"]}
            )
            await client.update(patient)

    run_in_private_loop(touch())


def set_env(monkeypatch: pytest.MonkeyPatch, values: dict[str, Any]) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))
