"""What the review screen shows, built from plain data: stored drafts, sources, the banner, jobs."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from fhir_adapters.models import ClinicalContext, Fact, SourceRef
from service.api.jobs import JobRegistry
from service.api.views import banner_view, draft_view, stored_source_views


def _attachment(content_type: str, data: bytes) -> dict[str, Any]:
    return {"attachment": {"contentType": content_type, "data": base64.b64encode(data).decode()}}


def stored_doc(**changes: Any) -> dict[str, Any]:
    structured = {
        "structured": {
            "sections": [{"title": "Allergies", "lines": [{"text": "Peanuts", "citations": ["A1"]}]}]
        },
        "narrative": [{"text": "Allergic to peanuts.", "citations": ["A1"]}],
        "dropped": [{"text": "Has diabetes.", "citations": ["A1"], "reason": "not in cited sources"}],
        "sources": {"A1": "AllergyIntolerance/a/_history/2", "C1": "Condition/c/_history/1"},
    }
    doc = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "meta": {"versionId": "3"},
        "status": "current",
        "docStatus": "preliminary",
        "content": [
            _attachment("text/markdown; charset=utf-8", b"# Summary\n"),
            _attachment("application/json", json.dumps(structured).encode()),
        ],
    }
    doc.update(changes)
    return doc


def test_a_stored_draft_is_read_back_with_its_sections_kept_and_dropped_statements() -> None:
    view = draft_view(stored_doc())
    assert (view.id, view.version, view.reference) == ("d1", "3", "DocumentReference/d1")
    assert view.markdown == "# Summary\n"
    assert view.structured is not None and view.structured.section("Allergies").lines[0].citations == ("A1",)
    assert view.narrative is not None
    assert [c.text for c in view.narrative.kept] == ["Allergic to peanuts."]
    assert [(d.text, d.reason) for d in view.narrative.dropped] == [("Has diabetes.", "not in cited sources")]
    assert view.reviewable and view.state_label == "Draft - not reviewed"


def test_only_a_current_unreviewed_draft_can_be_acted_on() -> None:
    assert not draft_view(stored_doc(docStatus="final")).reviewable
    assert not draft_view(stored_doc(status="entered-in-error")).reviewable
    assert draft_view(stored_doc(status="superseded")).state_label == "Superseded by a newer draft"


def test_an_edited_draft_without_its_json_part_still_shows_its_text() -> None:
    doc = stored_doc(
        extension=[{"url": "urn:chartbrief:edited-by", "valueReference": {"reference": "Practitioner/1"}}]
    )
    doc["content"] = doc["content"][:1]
    view = draft_view(doc)
    assert view.edited and view.markdown == "# Summary\n"
    assert view.structured is None and view.narrative is None


def test_damaged_attachments_give_an_empty_view_not_an_error() -> None:
    doc = stored_doc(content=[{"attachment": {"contentType": "application/json", "data": "%%%"}}, "junk"])
    view = draft_view(doc)
    assert view.markdown == "" and view.structured is None


def test_stored_citations_find_their_exact_source_version_or_say_it_is_gone() -> None:
    fact = Fact(
        key="A7",  # renumbered since the draft was written
        kind="allergy",
        text="Allergy to peanuts, active",
        source=SourceRef("AllergyIntolerance", "a", "2"),
        date="1994-03-30",
    )
    ctx = ClinicalContext(patient=SourceRef("Patient", "p"), patient_summary="-", facts=[fact])
    found, gone = stored_source_views(
        {"A1": "AllergyIntolerance/a/_history/2", "C1": "Condition/c/_history/1"}, ctx
    )
    assert (found.key, found.text, found.date, found.available) == (
        "A1",
        "Allergy to peanuts, active",
        "1994-03-30",
        True,
    )
    assert (gone.key, gone.reference, gone.available) == ("C1", "Condition/c/_history/1", False)


def test_the_banner_prefers_the_official_name_and_the_medical_record_number() -> None:
    patient = {
        "name": [
            {"use": "nickname", "given": ["Bo"]},
            {"use": "official", "given": ["Robert"], "family": "Lee"},
        ],
        "gender": "male",
        "birthDate": "1950-02-03",
        "identifier": [
            {"system": "urn:x", "value": "internal-1"},
            {"type": {"coding": [{"code": "MR"}]}, "value": "MRN-42"},
        ],
    }
    banner = banner_view(patient)
    assert (banner.name, banner.gender, banner.birth_date, banner.identifier) == (
        "Robert Lee",
        "male",
        "1950-02-03",
        "MRN-42",
    )
    assert banner_view({}).name == "(no name recorded)"


async def test_the_job_registry_forgets_the_oldest_finished_jobs_first() -> None:
    registry = JobRegistry(max_jobs=2)
    gate = asyncio.Event()

    async def slow() -> dict[str, Any]:
        await gate.wait()
        return {"ok": True}

    async def quick() -> dict[str, Any]:
        return {"ok": True}

    running = registry.submit(slow, patient_id="p1", encounter_id=None, requested_by="t", describe_error=str)
    first = registry.submit(quick, patient_id="p2", encounter_id=None, requested_by="t", describe_error=str)
    await registry.wait(first.id)
    second = registry.submit(quick, patient_id="p3", encounter_id=None, requested_by="t", describe_error=str)
    await registry.wait(second.id)
    assert registry.get(first.id) is None  # finished and oldest: forgotten
    assert registry.get(running.id) is not None and registry.get(running.id).status == "running"  # type: ignore[union-attr]
    gate.set()
    await registry.wait(running.id)
    assert registry.get(running.id).status == "succeeded"  # type: ignore[union-attr]
    await registry.aclose()
