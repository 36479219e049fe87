"""The pipeline's store calls: every one runs in a worker thread, never on the event loop's thread
(a synchronous SQLAlchemy query there would stall every other request while the database answers)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.db.store import MemorySummaryStore, StoredSummary
from service.llm.fake import FakeEngine
from service.pipeline import Services, summarize_patient
from service.streaming import Finished, stream_summary
from tests.fakes import FakeFhirSource, bundle_patient, load_synthea

# A record without notes: the default prompt then makes no model call.
PATIENT = "Luigi_Wiegand"


class _Server(FakeFhirSource):
    base_url = "http://fhir.test/r4"


class ThreadRecordingStore:
    """A `MemorySummaryStore` that notes the thread each call runs on."""

    def __init__(self) -> None:
        self.memory = MemorySummaryStore()
        self.threads: list[tuple[str, int]] = []

    def record(self, fields: dict[str, Any]) -> str:
        self.threads.append(("record", threading.get_ident()))
        return self.memory.record(fields)

    def latest_for_patient(self, fhir_base: str, patient_id: str) -> StoredSummary | None:
        self.threads.append(("latest_for_patient", threading.get_ident()))
        return self.memory.latest_for_patient(fhir_base, patient_id)

    def find(self, fhir_base: str, idempotency_key: str) -> StoredSummary | None:
        self.threads.append(("find", threading.get_ident()))
        return self.memory.find(fhir_base, idempotency_key)


@pytest.fixture
def services(tmp_path: Path) -> tuple[Services, ThreadRecordingStore, str]:
    bundle = load_synthea(PATIENT)
    store = ThreadRecordingStore()
    svc = Services(
        settings=Settings(db={"url": f"sqlite:///{tmp_path / 'db.sqlite'}"}),
        client=_Server.from_bundle(bundle),  # type: ignore[arg-type]
        engine=FakeEngine(),
        store=store,
    )
    return svc, store, str(bundle_patient(bundle)["id"])


def _on_the_loop(store: ThreadRecordingStore, loop_thread: int) -> list[str]:
    return [call for call, thread in store.threads if thread == loop_thread]


async def test_a_summary_is_recorded_off_the_event_loop(
    services: tuple[Services, ThreadRecordingStore, str],
) -> None:
    svc, store, pid = services

    result = await summarize_patient(svc, pid, dry_run=True)

    assert [call for call, _ in store.threads] == ["record"]
    assert _on_the_loop(store, threading.get_ident()) == []
    row = store.memory.find(svc.client.base_url, result.idempotency_key)
    assert row is not None and row.seed == svc.settings.llm.seed == 42, "the row records the seed sampled"


async def test_the_unchanged_check_asks_the_store_off_the_event_loop(
    services: tuple[Services, ThreadRecordingStore, str],
) -> None:
    svc, store, pid = services
    first = await summarize_patient(svc, pid, dry_run=True)
    row = store.memory.find(svc.client.base_url, first.idempotency_key)
    assert row is not None
    written = dataclasses.replace(row, outcome="written", document_reference="DocumentReference/d1")
    store.memory.records[(svc.client.base_url, first.idempotency_key)] = written
    store.threads.clear()

    again = await summarize_patient(svc, pid, skip_unchanged=True)

    assert again.unchanged and again.write is not None
    assert again.write.document_reference == "DocumentReference/d1"
    assert [call for call, _ in store.threads] == ["find"]
    assert _on_the_loop(store, threading.get_ident()) == []


async def test_a_streamed_summary_is_recorded_off_the_event_loop(
    services: tuple[Services, ThreadRecordingStore, str],
) -> None:
    svc, store, pid = services

    events = [event async for event in stream_summary(svc, pid, dry_run=True)]

    assert isinstance(events[-1], Finished)
    assert [call for call, _ in store.threads] == ["record"]
    assert _on_the_loop(store, threading.get_ident()) == []
