"""What the review screen shows, built from plain data: stored drafts, sources, the banner, jobs."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any

from fastapi.templating import Jinja2Templates

from fhir_adapters.models import ClinicalContext, Fact, SourceRef
from service.api.deps import TEMPLATES_DIR
from service.api.jobs import JobRegistry
from service.api.views import banner_view, cited_keys, draft_view, narrative_view, stored_source_views
from service.conflicts import Conflict
from service.grounding import Claim, DroppedClaim
from service.structured import Line, Section, StructuredSummary


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
    structured.update(changes.pop("json", {}))
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


# ---------------------------------------------------------------------------
# Conflicts and the weight of removed statements, rendered
# ---------------------------------------------------------------------------

CONFLICT = Conflict(
    "allergies", "Record lists 1 active allergy (Peanuts)", ("A1",), "the note of 2023-10-02 says no known allergies", ("N1",)
)  # fmt: skip
DROPPED = [
    DroppedClaim(Claim("Has diabetes.", ("C1",)), "not in cited sources", "unsupported", "low"),
    DroppedClaim(
        Claim("Has no known allergies.", ("A1",)), "negates A1: active allergy", "contradicted", "high"
    ),
    DroppedClaim(Claim("A1c 9.1 on 2020-01-01.", ("L1",)), "9.1 is not in L1", "unsupported", "medium"),
]


def render(name: str, **context: Any) -> str:
    return Jinja2Templates(directory=str(TEMPLATES_DIR)).get_template(name).render(**context)


def text_of(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def test_the_coded_part_shows_each_conflict_first_citing_both_sides_as_buttons() -> None:
    structured = StructuredSummary((Section("Allergies", (Line("Peanuts", ("A1",)),)),), (CONFLICT,))

    html = render("_structured.html", structured=structured)

    assert html.index('id="conflicts"') < html.index("From the coded record")
    conflict = html[
        html.index('<li class="conflict"') : html.index("</li>", html.index('<li class="conflict"'))
    ]
    assert '<button type="button" class="cite" data-key="A1"' in conflict
    assert '<button type="button" class="cite" data-key="N1"' in conflict
    assert "Conflict (allergies): Record lists 1 active allergy (Peanuts) A1 ; " in text_of(conflict)
    assert "the note of 2023-10-02 says no known allergies N1 ." in text_of(conflict)
    assert {"A1", "N1"} <= cited_keys(structured, None)  # their sources are sent with the part


def test_without_conflicts_the_coded_part_has_no_conflict_block() -> None:
    html = render("_structured.html", structured=StructuredSummary((Section("Allergies", (Line("None"),)),)))
    assert 'id="conflicts"' not in html


def test_removed_statements_are_collapsed_with_their_weight_in_the_summary_line() -> None:
    html = render(
        "_narrative.html", narrative=narrative_view([Claim("Allergic to peanuts.", ("A1",))], DROPPED)
    )

    details = html[html.index("<details") :]
    assert details.startswith('<details class="dropped" id="dropped-claims"')
    assert " open" not in details[: details.index(">")]
    summary = text_of(details[details.index("<summary>") : details.index("</summary>")])
    assert summary == (
        "Removed by the source check &mdash; NOT part of the summary (3) 1 contradicts the record 1 high 1 medium 1 low"
    )
    items = re.findall(r'<li class="dropped-claim[^"]*".*?</li>', details, re.S)
    assert len(items) == 3
    # The contradiction comes first, as a warning; the rest by severity, each with its badge.
    assert 'class="dropped-claim contradicted"' in items[0]
    assert text_of(items[0]).startswith("high Contradicts the record: Has no known allergies.")
    assert [re.search(r'data-severity="(\w+)"', i)[1] for i in items] == ["high", "medium", "low"]  # type: ignore[index]
    assert "Contradicts the record" not in items[1] + items[2]


def test_stored_drops_keep_their_verdict_and_severity_and_old_drafts_show_no_badge() -> None:
    dropped = [
        {"text": "No known allergies.", "citations": ["A1"], "reason": "negates A1", "verdict": "contradicted",
         "severity": "high"},
        {"text": "Has diabetes.", "citations": ["A1"], "reason": "not in cited sources"},
        {"text": "Odd.", "citations": [], "reason": "x", "verdict": "bogus", "severity": "extreme"},
    ]  # fmt: skip
    view = draft_view(stored_doc(json={"dropped": dropped}))

    assert view.narrative is not None
    assert [(d.verdict, d.severity) for d in view.narrative.dropped] == [
        ("contradicted", "high"),
        ("unsupported", None),
        ("unsupported", None),
    ]
    html = render("_narrative.html", narrative=view.narrative)
    assert "1 contradicts the record" in text_of(html) and "1 high" in text_of(html)
    assert html.count('class="badge severity-') == 2  # one in the summary line, one on the rated item


def test_a_stored_draft_shows_its_conflicts_again() -> None:
    structured = StructuredSummary((Section("Allergies", (Line("Peanuts", ("A1",)),)),), (CONFLICT,))
    view = draft_view(stored_doc(json={"structured": structured.to_json()}))

    assert view.structured is not None and view.structured.conflicts == (CONFLICT,)
    assert "Conflict (allergies)" in text_of(render("_structured.html", structured=view.structured))


def test_model_text_in_a_removed_statement_is_escaped() -> None:
    hostile = DroppedClaim(Claim("<script>alert(1)</script>", ("A1",)), "x", "contradicted", "high")
    html = render("_narrative.html", narrative=narrative_view([], [hostile]))
    assert "<script>" not in html and "&lt;script&gt;" in html
