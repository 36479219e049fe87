"""Review actions against a real FHIR R4 server: a draft is written by the pipeline (FakeEngine), a
clinician approves, edits, rejects or regenerates it through `service.review`, and what the server
holds afterwards is read back and checked, with the audit rows in a real SQLite database.

Each test writes its own draft: the fake model's identity carries the test's name, so each draft has
its own idempotency key.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.write.draft import provenance_id
from service import review
from service.config import Settings
from service.db import audit
from service.db.store import SqlSummaryStore
from service.dev.sandbox import LoadedPatient
from service.fhir import fhir_client
from service.llm.fake import FAKE_IDENTITY, FakeEngine
from service.pipeline import Services, summarize_patient

pytestmark = pytest.mark.integration

SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"
OTHER = "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json"
DR = "Practitioner/dr-review-1"
PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
NO_CLAIMS = '{"claims": []}'


@pytest.fixture
async def svc(fhir_base: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Services]:
    # The record-wide prompt: one scripted answer per draft, whatever notes the patient has.
    llm: dict[str, Any] = {}
    if request.node.get_closest_marker("own_sampling"):
        # A top_p of this run only: a regenerated draft's key names the sampling (not the test's
        # tag), so drafts other tests regenerated for the same patient do not collide with these.
        llm["top_p"] = 0.5 + uuid.uuid4().int % 10**6 / 10**7
    settings = Settings(
        fhir={"base_url": fhir_base},  # type: ignore[arg-type]
        db={"url": f"sqlite:///{tmp_path}/cb.db"},  # type: ignore[arg-type]
        llm=llm,  # type: ignore[arg-type]
        prompt="summary/v1",
    )
    identity = replace(FAKE_IDENTITY, sampling=f"{FAKE_IDENTITY.sampling} test={request.node.name[:40]}")
    store = SqlSummaryStore.from_url(settings.db.url)
    async with fhir_client(settings.fhir) as client:
        yield Services(settings=settings, client=client, engine=FakeEngine(identity), store=store)
    store.close()


def _db(svc: Services) -> sessionmaker[Session]:
    """The audit database of these tests: the one behind the fixture's SQL store."""
    return svc.store.sessions  # type: ignore[attr-defined,no-any-return]  # the fixture's SqlSummaryStore


async def new_draft(svc: Services, patient_id: str) -> dict[str, Any]:
    assert isinstance(svc.engine, FakeEngine)
    svc.engine.enqueue(NO_CLAIMS)
    result = await summarize_patient(svc, patient_id)
    assert result.write is not None and result.write.created
    return await svc.client.read(*result.write.document_reference.split("/"))


def agents(provenance: dict[str, Any], code: str) -> list[str]:
    return [
        a["who"]["reference"]
        for a in provenance.get("agent", [])
        if any(c["system"] == PARTICIPANT and c["code"] == code for c in a["type"]["coding"])
    ]


def markdown_of(doc: dict[str, Any]) -> str:
    return base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()


async def test_approve_makes_the_draft_final_with_the_clinician_as_author_and_verifier(
    svc: Services, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    doc = await new_draft(svc, patient)
    device = doc["author"][0]["reference"]

    outcome = await review.approve(
        svc, doc["id"], patient_id=patient, actor=DR, version=doc["meta"]["versionId"], db=_db(svc)
    )

    on_server = await svc.client.read("DocumentReference", doc["id"])
    assert on_server["docStatus"] == "final" and on_server["status"] == "current"
    assert [a["reference"] for a in on_server["author"]] == [device, DR]
    assert outcome.version == on_server["meta"]["versionId"] != doc["meta"]["versionId"]
    prov = await svc.client.read("Provenance", provenance_id(doc["identifier"][0]["value"]))
    assert agents(prov, "verifier") == [DR]
    assert agents(prov, "author") == [device], "the AI Device stays the author"
    assert prov["target"][0]["reference"] == f"DocumentReference/{doc['id']}"
    (row,) = audit.list_for_patient(svc.store.sessions, patient)  # type: ignore[attr-defined]
    assert (row.action, row.outcome, row.actor, row.resource) == (
        "approve",
        "ok",
        DR,
        f"DocumentReference/{doc['id']}",
    )


async def test_edit_saves_the_clinicians_text_as_a_new_version_with_its_own_provenance_then_approves(
    svc: Services, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    doc = await new_draft(svc, patient)
    text = "# Summary\n\nReviewed and rewritten by the clinician.\n"

    outcome = await review.edit(
        svc,
        doc["id"],
        patient_id=patient,
        actor=DR,
        markdown=text,
        version=doc["meta"]["versionId"],
        db=_db(svc),
    )

    final = await svc.client.read("DocumentReference", doc["id"])
    assert final["docStatus"] == "final" and markdown_of(final) == text
    assert outcome.version == final["meta"]["versionId"]
    original = await svc.client.vread("DocumentReference", doc["id"], doc["meta"]["versionId"])
    assert markdown_of(original) == markdown_of(doc), "the AI text stays in the history"
    # Servers match a versioned target (DocumentReference/x/_history/n) on a search by DocumentReference/x.
    provs = await svc.client.search_all("Provenance", {"target": f"DocumentReference/{doc['id']}"})
    edits = [p for p in provs if p["activity"]["coding"][0]["code"] == "UPDATE"]
    (edit_prov,) = edits
    edited_version = edit_prov["target"][0]["reference"].split("/_history/")[1]
    edited = await svc.client.vread("DocumentReference", doc["id"], edited_version)
    assert markdown_of(edited) == text and edited["docStatus"] == "preliminary"
    assert edit_prov["activity"]["coding"][0]["code"] == "UPDATE"
    assert agents(edit_prov, "author") == [DR]
    assert edit_prov["entity"] == [
        {
            "role": "revision",
            "what": {"reference": f"DocumentReference/{doc['id']}/_history/{doc['meta']['versionId']}"},
        }
    ]
    prov = await svc.client.read("Provenance", provenance_id(doc["identifier"][0]["value"]))
    assert agents(prov, "verifier") == [DR]


async def test_reject_marks_the_draft_entered_in_error_and_keeps_the_reason_out_of_the_ehr(
    svc: Services, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    doc = await new_draft(svc, patient)
    reason = "Omits the current anticoagulant"

    outcome = await review.reject(svc, doc["id"], patient_id=patient, actor=DR, reason=reason, db=_db(svc))

    on_server = await svc.client.read("DocumentReference", doc["id"])
    assert on_server["status"] == "entered-in-error" == outcome.status
    provs = await svc.client.search_all("Provenance", {"target": f"DocumentReference/{doc['id']}"})
    assert any(p["activity"]["coding"][0]["code"] == "NULLIFY" for p in provs)
    assert reason not in repr(provs) and reason not in repr(on_server)
    (rejection,) = audit.rejections(svc.store.sessions, patient_id=patient)  # type: ignore[attr-defined]
    assert rejection.reason == reason


async def test_a_stale_version_raises_conflict_and_leaves_the_draft_as_it_was(
    svc: Services, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    doc = await new_draft(svc, patient)
    changed = {k: v for k, v in doc.items() if k != "meta"}
    changed["description"] = doc["description"] + " (touched by another system)"
    await svc.client.update(changed)

    with pytest.raises(review.ReviewConflict, match="changed since you opened it"):
        await review.approve(
            svc, doc["id"], patient_id=patient, actor=DR, version=doc["meta"]["versionId"], db=_db(svc)
        )

    on_server = await svc.client.read("DocumentReference", doc["id"])
    assert on_server["docStatus"] == "preliminary"
    prov = await svc.client.read("Provenance", provenance_id(doc["identifier"][0]["value"]))
    assert agents(prov, "verifier") == []
    (row,) = audit.list_for_patient(svc.store.sessions, patient)  # type: ignore[attr-defined]
    assert row.outcome == "error"


async def test_a_session_for_one_patient_cannot_act_on_another_patients_draft(
    svc: Services, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient, other = loaded_patients[SMALL].id, loaded_patients[OTHER].id
    doc = await new_draft(svc, other)

    with pytest.raises(review.ReviewForbidden):
        await review.approve(svc, doc["id"], patient_id=patient, actor=DR, db=_db(svc))

    assert (await svc.client.read("DocumentReference", doc["id"]))["docStatus"] == "preliminary"
    (row,) = audit.list_for_patient(svc.store.sessions, patient)  # type: ignore[attr-defined]
    assert (row.outcome, row.resource) == ("denied", f"DocumentReference/{doc['id']}")


@pytest.mark.own_sampling  # other tests regenerate drafts of this patient too (API bounds)
async def test_regenerate_writes_a_fresh_draft_with_the_next_seed_that_supersedes_the_old_one(
    svc: Services, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    old = await new_draft(svc, patient)
    assert isinstance(svc.engine, FakeEngine)
    svc.engine.enqueue(NO_CLAIMS)

    result = await review.regenerate(
        svc, patient, encounter_id=None, previous_doc=old["id"], actor=DR, db=_db(svc)
    )

    assert result.write is not None and result.write.created
    assert result.write.superseded == f"DocumentReference/{old['id']}"
    assert svc.engine.history[-1].seed == 43, "the model ran with the next seed"
    new = await svc.client.read(*result.write.document_reference.split("/"))
    assert new["identifier"][0]["value"] != old["identifier"][0]["value"]
    assert new["relatesTo"] == [
        {"code": "replaces", "target": {"reference": f"DocumentReference/{old['id']}"}}
    ]
    assert (await svc.client.read("DocumentReference", old["id"]))["status"] == "superseded"
    prov = await svc.client.read(*result.write.provenance.split("/"))
    sampling = next(e["valueString"] for e in prov["extension"] if e["url"] == "urn:chartbrief:sampling")
    assert "seed=43" in sampling
    (row,) = audit.list_for_patient(svc.store.sessions, patient)  # type: ignore[attr-defined]
    assert (
        row.action == "regenerate"
        and row.outcome == "ok"
        and result.write.document_reference in (row.detail or "")
    )


# -- regenerate carries the seed as data ------------------------------------------------------------


@pytest.mark.own_sampling
async def test_every_draft_records_its_seed_and_regenerate_reads_it_from_the_row(
    svc: Services, loaded_patients: dict[str, LoadedPatient], monkeypatch: pytest.MonkeyPatch
) -> None:
    patient = loaded_patients[SMALL].id
    store = svc.store
    assert isinstance(svc.engine, FakeEngine) and isinstance(store, SqlSummaryStore)
    svc.engine.enqueue(NO_CLAIMS)
    first = await summarize_patient(svc, patient)
    assert first.write is not None and first.write.created
    row = store.find(svc.client.base_url, first.idempotency_key)
    assert row is not None and row.seed == 42, "a first draft's row holds the seed it was sampled with"

    def no_string_parsing(_sampling: str | None) -> int | None:
        raise AssertionError("the seed of a draft whose row holds one is not parsed from its sampling string")

    monkeypatch.setattr(review, "seed_of", no_string_parsing)

    svc.engine.enqueue(NO_CLAIMS)
    second = await review.regenerate(
        svc, patient, previous_doc=first.write.document_reference, actor=DR, db=store.sessions
    )
    assert second.write is not None and second.write.created
    assert svc.engine.history[-1].seed == 43
    row = store.find(svc.client.base_url, second.idempotency_key)
    assert row is not None and row.seed == 43, "the regenerated draft's row holds its seed as a number"

    svc.engine.enqueue(NO_CLAIMS)
    third = await review.regenerate(
        svc, patient, previous_doc=second.write.document_reference, actor=DR, db=store.sessions
    )
    assert third.write is not None and third.write.created
    assert third.write.superseded == second.write.document_reference
    assert svc.engine.history[-1].seed == 44
    row = store.find(svc.client.base_url, third.idempotency_key)
    assert row is not None and row.seed == 44
