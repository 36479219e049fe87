"""Regenerate carries the seed as data: a regenerated draft's summary row records the seed it was sampled
with, and the next regenerate of that draft reads the row, not the Provenance's sampling string.

Against a real FHIR R4 server (the pipeline writes the drafts with FakeEngine) and a real SQLite store.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from service import review
from service.config import Settings
from service.db.store import SqlSummaryStore
from service.dev.sandbox import LoadedPatient
from service.fhir import fhir_client
from service.llm.fake import FAKE_IDENTITY, FakeEngine
from service.pipeline import Services, summarize_patient

pytestmark = pytest.mark.integration

SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"
DR = "Practitioner/dr-seed-1"
NO_CLAIMS = '{"claims": []}'


@pytest.fixture
async def svc(fhir_base: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Services]:
    # A top_p of this run only: a regenerated draft's key names the sampling (not the test's tag), so
    # drafts other tests regenerated for the same patient on the same server do not collide with these.
    top_p = 0.5 + uuid.uuid4().int % 10**6 / 10**7
    settings = Settings(
        fhir={"base_url": fhir_base},  # type: ignore[arg-type]
        db={"url": f"sqlite:///{tmp_path}/cb.db"},  # type: ignore[arg-type]
        llm={"top_p": top_p},  # type: ignore[arg-type]
        prompt="summary/v1",
    )
    identity = replace(FAKE_IDENTITY, sampling=f"{FAKE_IDENTITY.sampling} test={request.node.name[:40]}")
    store = SqlSummaryStore.from_url(settings.db.url)
    async with fhir_client(settings.fhir) as client:
        yield Services(settings=settings, client=client, engine=FakeEngine(identity), store=store)
    store.close()


async def test_a_regenerated_draft_records_its_seed_and_the_next_regenerate_reads_it(
    svc: Services, loaded_patients: dict[str, LoadedPatient], monkeypatch: pytest.MonkeyPatch
) -> None:
    patient = loaded_patients[SMALL].id
    store = svc.store
    assert isinstance(svc.engine, FakeEngine) and isinstance(store, SqlSummaryStore)
    svc.engine.enqueue(NO_CLAIMS)
    first = await summarize_patient(svc, patient)
    assert first.write is not None and first.write.created

    svc.engine.enqueue(NO_CLAIMS)
    second = await review.regenerate(
        svc, patient, previous_doc=first.write.document_reference, actor=DR, db=store.sessions
    )
    assert second.write is not None and second.write.created
    assert svc.engine.history[-1].seed == 43
    row = store.find(svc.client.base_url, second.idempotency_key)
    assert row is not None and row.seed == 43, "the regenerated draft's row holds its seed as a number"

    def no_string_parsing(_sampling: str | None) -> int | None:
        raise AssertionError("the seed of a draft whose row holds one is not parsed from its sampling string")

    monkeypatch.setattr(review, "seed_of", no_string_parsing)
    svc.engine.enqueue(NO_CLAIMS)
    third = await review.regenerate(
        svc, patient, previous_doc=second.write.document_reference, actor=DR, db=store.sessions
    )
    assert third.write is not None and third.write.created
    assert third.write.superseded == second.write.document_reference
    assert svc.engine.history[-1].seed == 44
    row = store.find(svc.client.base_url, third.idempotency_key)
    assert row is not None and row.seed == 44
