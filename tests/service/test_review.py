"""Specifications of a review action as the app runs it: the FHIR write, one audit row per action with
the right outcome, the rejection reason kept in the database only, and the reseeding behind regenerate.

The FHIR side is `MemoryFhir` (a versioned in-memory store honouring If-Match); the database is a real
SQLite file. Regenerate against a real FHIR server is in tests/integration/test_review_actions.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from fhir_adapters.errors import FhirServerError
from fhir_adapters.write.draft import provenance_id
from service import review
from service.config import Settings
from service.db import audit
from service.db.store import MemorySummaryStore, SqlSummaryStore, SummaryStore
from service.governance.records import REVIEW_ACTIONS
from service.llm.base import GenerationRequest
from service.llm.fake import FAKE_IDENTITY, FakeEngine
from service.pipeline import Services, SummaryResult
from tests.fhir_adapters.test_review import (
    KEY,
    MODEL_SHA256,
    MemoryFhir,
    ai_device,
    ai_provenance,
    draft_doc,
)
from tests.service.test_store import fields

DR = "Practitioner/dr-1"
# What chartbrief recorded when it wrote the fixture draft: its document and its model.
OWN_ROW = {"document_reference": "DocumentReference/doc-1", "model_sha256": MODEL_SHA256}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlSummaryStore]:
    s = SqlSummaryStore.from_url(f"sqlite:///{tmp_path}/cb.db")
    yield s
    s.close()


@pytest.fixture
def fhir() -> MemoryFhir:
    return MemoryFhir(draft_doc(), ai_provenance(), ai_device())


def services(fhir: MemoryFhir, store: SummaryStore, engine: FakeEngine | None = None) -> Services:
    settings = Settings(fhir={"base_url": "http://fhir.test/fhir"})  # type: ignore[arg-type]
    return Services(settings=settings, client=fhir, engine=engine or FakeEngine(), store=store)  # type: ignore[arg-type]


def rows(db: sessionmaker[Session], patient: str = "p1") -> list[audit.AuditRecord]:
    return list(reversed(audit.list_for_patient(db, patient)))


async def test_approve_makes_the_draft_final_and_audits_who_what_and_which_request(
    fhir: MemoryFhir, store: SqlSummaryStore
) -> None:
    outcome = await review.approve(
        services(fhir, store),
        "doc-1",
        patient_id="p1",
        actor=DR,
        version="1",
        request_id="req-7",
        db=store.sessions,
    )
    assert outcome == review.ReviewOutcome("approve", "DocumentReference/doc-1", "2", "current", "final")
    (row,) = rows(store.sessions)
    assert (row.actor, row.action, row.outcome, row.resource, row.request_id) == (
        DR,
        "approve",
        "ok",
        "DocumentReference/doc-1",
        "req-7",
    )


async def test_edit_saves_the_text_then_approves_that_version_with_two_audit_rows(
    fhir: MemoryFhir, store: SqlSummaryStore
) -> None:
    outcome = await review.edit(
        services(fhir, store),
        "doc-1",
        patient_id="p1",
        actor=DR,
        markdown="My own words.",
        version="1",
        db=store.sessions,
    )
    assert outcome.doc_status == "final" and outcome.version == "3"
    assert [(r.action, r.outcome) for r in rows(store.sessions)] == [("edit", "ok"), ("approve", "ok")]
    prov = fhir.current(f"Provenance/{provenance_id(KEY)}")
    assert any(a["who"]["reference"] == DR for a in prov["agent"][1:])


async def test_another_patients_document_is_denied_audited_and_untouched(store: SqlSummaryStore) -> None:
    fhir = MemoryFhir(draft_doc(patient="p2"), ai_provenance())
    with pytest.raises(review.ReviewForbidden):
        await review.approve(services(fhir, store), "doc-1", patient_id="p1", actor=DR, db=store.sessions)
    (row,) = rows(store.sessions)
    assert (row.action, row.outcome, row.patient_id) == ("approve", "denied", "p1")
    assert fhir.writes == []


async def test_a_stale_version_is_a_conflict_audited_as_an_error(
    fhir: MemoryFhir, store: SqlSummaryStore
) -> None:
    fhir.change("DocumentReference/doc-1", description="changed by someone else")
    with pytest.raises(review.ReviewConflict):
        await review.reject(
            services(fhir, store),
            "doc-1",
            patient_id="p1",
            actor=DR,
            reason="x",
            version="1",
            db=store.sessions,
        )
    (row,) = rows(store.sessions)
    assert row.outcome == "error" and "stale version" in (row.detail or "")
    assert audit.rejections(store.sessions) == [], "a rejection that did not happen is not recorded"


async def test_a_server_failure_is_audited_and_re_raised(fhir: MemoryFhir, store: SqlSummaryStore) -> None:
    def fail() -> None:
        raise FhirServerError("FHIR server answered 503 to POST base", status=503)

    fhir.before_write = fail
    with pytest.raises(FhirServerError):
        await review.approve(services(fhir, store), "doc-1", patient_id="p1", actor=DR, db=store.sessions)
    (row,) = rows(store.sessions)
    assert row.outcome == "error" and row.detail == "FHIR server: FhirServerError 503"


async def test_reject_keeps_the_reason_in_the_database_only(fhir: MemoryFhir, store: SqlSummaryStore) -> None:
    reason = "States Mr Example had a stroke in 2019; he did not"
    with capture_logs() as logs:
        outcome = await review.reject(
            services(fhir, store),
            "doc-1",
            patient_id="p1",
            actor=DR,
            reason=reason,
            version="1",
            db=store.sessions,
        )
    assert outcome.status == "entered-in-error"
    (rejection,) = audit.rejections(store.sessions, patient_id="p1")
    assert (rejection.reason, rejection.who, rejection.document_reference) == (
        reason,
        DR,
        "DocumentReference/doc-1",
    )
    (row,) = rows(store.sessions)
    assert row.detail == "entered-in-error, reason recorded"
    for place in (json.dumps(logs, default=str), repr(rows(store.sessions)), repr(fhir.history)):
        assert "stroke" not in place and "Mr Example" not in place


async def test_audit_rows_of_every_action_carry_no_clinical_text(
    fhir: MemoryFhir, store: SqlSummaryStore
) -> None:
    svc = services(fhir, store)
    secret_text = "Confidential narrative about Jane Roe"
    await review.edit(svc, "doc-1", patient_id="p1", actor=DR, markdown=secret_text, db=store.sessions)
    dump = repr(rows(store.sessions))
    assert "Jane Roe" not in dump and "Confidential" not in dump
    assert all(r.patient_id == "p1" and r.actor == DR for r in rows(store.sessions))


# -- regenerate's reseeding ----------------------------------------------------------------------------


async def test_reseeded_services_carry_the_new_seed_in_requests_and_in_the_identity(
    fhir: MemoryFhir, store: SqlSummaryStore
) -> None:
    engine = FakeEngine()
    svc = services(fhir, store, engine)
    again = review.reseeded(svc, 43)
    assert again.settings.llm.seed == 43 and svc.settings.llm.seed == 42
    assert "seed=43" in again.engine.identity.sampling and "seed=42" not in again.engine.identity.sampling
    assert again.engine.identity.sha256 == FAKE_IDENTITY.sha256, "the same model file"
    assert svc.engine.identity == FAKE_IDENTITY
    engine.enqueue("ok")
    request = GenerationRequest(messages=[{"role": "user", "content": "x"}], max_tokens=16, seed=43)
    assert (await again.engine.generate(request)).text == "ok"
    assert engine.history == [request], "the shared engine does the work"
    await again.engine.aclose()
    assert not engine.closed, "closing the reseeded view never closes the shared engine"


def _sampling(fhir: MemoryFhir, value: str) -> None:
    """The draft's Provenance, with another sampling string."""
    prov = fhir.current(f"Provenance/{provenance_id(KEY)}")
    prov["extension"] = [{"url": "urn:chartbrief:sampling", "valueString": value}]
    fhir.history[f"Provenance/{provenance_id(KEY)}"].append(prov)


async def test_the_previous_seed_is_the_seed_recorded_on_the_drafts_summary_row(
    fhir: MemoryFhir, store: SqlSummaryStore
) -> None:
    svc = services(fhir, store)
    store.record(fields(key=KEY, seed=50, **OWN_ROW))
    _sampling(fhir, "temperature=0.7 top_p=1.0 n_ctx=2048")  # names no seed
    assert await review.previous_seed(svc, "doc-1", patient_id="p1") == 50
    _sampling(fhir, "temperature=0.7 seed=51")
    assert await review.previous_seed(svc, "doc-1", patient_id="p1") == 50, "the row, not the string"
    with pytest.raises(review.ReviewForbidden):
        await review.previous_seed(svc, "doc-1", patient_id="p9")


async def test_a_draft_whose_row_has_no_seed_falls_back_to_its_provenance(
    fhir: MemoryFhir, store: SqlSummaryStore
) -> None:
    svc = services(fhir, store)
    store.record(fields(key=KEY))  # recorded before rows carried the seed
    assert await review.previous_seed(svc, "doc-1", patient_id="p1") == 42
    _sampling(fhir, "temperature=0.7 seed=51")
    assert await review.previous_seed(svc, "DocumentReference/doc-1", patient_id="p1") == 51
    _sampling(fhir, "temperature=0.7")
    assert await review.previous_seed(svc, "doc-1", patient_id="p1") == svc.settings.llm.seed == 42
    with pytest.raises(review.ReviewForbidden):
        await review.previous_seed(svc, "doc-1", patient_id="p9")


async def test_regenerate_of_another_patients_draft_is_denied_before_any_model_run(
    store: SqlSummaryStore,
) -> None:
    fhir = MemoryFhir(draft_doc(patient="p2"), ai_provenance())
    engine = FakeEngine()
    with pytest.raises(review.ReviewForbidden):
        await review.regenerate(
            services(fhir, store, engine), "p1", previous_doc="doc-1", actor=DR, db=store.sessions
        )
    assert engine.history == []
    (row,) = rows(store.sessions)
    assert (row.action, row.outcome) == ("regenerate", "denied")


class _Summaries:
    """`summarize_patient` as regenerate calls it: each call's services, each answer scripted."""

    def __init__(self, *created: bool) -> None:
        self.created = list(created)
        self.calls: list[Services] = []

    async def __call__(self, svc: Services, patient_id: str, **_: Any) -> SummaryResult:
        self.calls.append(svc)
        seed = svc.settings.llm.seed
        svc.store.record(
            fields(key=f"k{seed}", patient=patient_id, document_reference=f"DocumentReference/d{seed}")
        )
        write = SimpleNamespace(
            created=self.created.pop(0), document_reference=f"DocumentReference/d{seed}", superseded=None
        )
        return SimpleNamespace(write=write)  # type: ignore[return-value]


async def test_regenerate_samples_one_above_the_stored_seed(
    fhir: MemoryFhir, store: SqlSummaryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.record(fields(key=KEY, seed=50, **OWN_ROW))
    _sampling(fhir, "temperature=0.0 top_p=1.0 n_ctx=2048")  # the string names no seed
    summaries = _Summaries(True)
    monkeypatch.setattr(review, "summarize_patient", summaries)

    await review.regenerate(services(fhir, store), "p1", previous_doc="doc-1", actor=DR, db=store.sessions)

    (svc,) = summaries.calls
    assert svc.settings.llm.seed == 51 and "seed=51" in svc.engine.identity.sampling
    assert svc.settings.llm.temperature == review.REGENERATE_TEMPERATURE
    # The row of the new draft records 51 because the pipeline records the seed of the settings it
    # sampled with (tests/service/test_pipeline.py; end to end: test_regenerate_seed.py).


async def test_regenerate_tries_the_next_seed_when_the_new_key_already_exists(
    fhir: MemoryFhir, store: SqlSummaryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.record(fields(key=KEY, seed=50, **OWN_ROW))
    summaries = _Summaries(False, True)
    monkeypatch.setattr(review, "summarize_patient", summaries)

    await review.regenerate(services(fhir, store), "p1", previous_doc="doc-1", actor=DR, db=store.sessions)

    assert [svc.settings.llm.seed for svc in summaries.calls] == [51, 52]
    (row,) = rows(store.sessions)
    assert (row.action, row.outcome, row.detail) == ("regenerate", "ok", "new draft DocumentReference/d52")


# -- one shape for every action ------------------------------------------------------------------------


def test_every_review_action_is_one_entry_that_monitoring_knows() -> None:
    assert set(review.ACTIONS) == set(REVIEW_ACTIONS)
    assert all(name == action.name for name, action in review.ACTIONS.items())


async def test_an_action_needs_only_the_store_protocol_and_the_audit_database(
    fhir: MemoryFhir, tmp_path: Path
) -> None:
    audit_db = SqlSummaryStore.from_url(f"sqlite:///{tmp_path}/audit.db")
    try:
        svc = services(fhir, MemorySummaryStore())
        outcome = await review.reject(
            svc, "doc-1", patient_id="p1", actor=DR, version="1", db=audit_db.sessions
        )
        assert outcome.status == "entered-in-error"
        assert [(r.action, r.outcome) for r in rows(audit_db.sessions)] == [("reject", "ok")]
    finally:
        audit_db.close()
