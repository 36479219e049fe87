"""Specifications of the summary record store, met alike by the SQL store and the in-memory fake: one
record per key and server, a rerun keeps the ids first written, and what comes back is plain data."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.db.store import MemorySummaryStore, SqlSummaryStore, StoredSummary, SummaryStore, in_thread

BASE = "http://fhir.test/fhir"


def fields(key: str = "k1", patient: str = "p1", **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "fhir_base": BASE,
        "patient_id": patient,
        "encounter_id": None,
        "idempotency_key": key,
        "inputs": ["Patient/p1/_history/1"],
        "prompt_id": "summary",
        "prompt_version": "v1",
        "prompt_sha256": "a" * 64,
        "model_name": "fake-model",
        "model_file": "fake.gguf",
        "model_sha256": "b" * 64,
        "sampling": "temperature=0.0",
        "outcome": "written",
        "document_reference": "DocumentReference/d1",
        "provenance": "Provenance/pv1",
        "device": "Device/m1",
    }
    return data | changes


@pytest.fixture(params=["sql", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SummaryStore]:
    if request.param == "memory":
        yield MemorySummaryStore()
        return
    sql = SqlSummaryStore.from_url(f"sqlite:///{tmp_path}/cb.db")
    yield sql
    sql.close()


def test_a_recorded_summary_is_found_by_key_and_server_as_plain_data(store: SummaryStore) -> None:
    row_id = store.record(fields())
    found = store.find(BASE, "k1")
    assert isinstance(found, StoredSummary)
    assert (found.id, found.document_reference, found.inputs) == (
        row_id,
        "DocumentReference/d1",
        ["Patient/p1/_history/1"],
    )
    assert store.find("http://other.test/fhir", "k1") is None


def test_a_rerun_of_the_same_key_updates_its_record_and_keeps_the_ids_first_written(
    store: SummaryStore,
) -> None:
    first = store.record(fields())
    again = store.record(fields(outcome="unchanged", document_reference=None, provenance=None, device=None))
    found = store.find(BASE, "k1")
    assert again == first and found is not None
    assert (found.outcome, found.document_reference, found.device) == (
        "unchanged",
        "DocumentReference/d1",
        "Device/m1",
    )


def test_the_latest_summary_of_a_patient_is_the_newest_of_that_server(store: SummaryStore) -> None:
    store.record(fields("k1"))
    newest = store.record(fields("k2", document_reference="DocumentReference/d2"))
    store.record(fields("k3", patient="p2"))
    latest = store.latest_for_patient(BASE, "p1")
    assert latest is not None and latest.id == newest
    assert store.latest_for_patient(BASE, "p9") is None


def test_the_sampling_seed_is_recorded_as_a_number_and_absent_when_not_given(store: SummaryStore) -> None:
    store.record(fields("k1", seed=43))
    store.record(fields("k2"))
    first, second = store.find(BASE, "k1"), store.find(BASE, "k2")
    assert first is not None and second is not None
    assert (first.seed, second.seed) == (43, None)


async def test_in_thread_runs_a_database_call_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    ran_on = await in_thread(threading.get_ident)
    assert ran_on != loop_thread
    assert await in_thread(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    assert asyncio.get_running_loop().is_running()
