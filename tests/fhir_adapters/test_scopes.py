"""Every scope list chartbrief asks for comes from one declaration of what it reads and writes.

The checks run the real fetch and the real write-back builder and hold what they touched
against the scopes an EHR launch and SMART Backend Services ask for, so a type fetch starts
reading (or the writer starts writing) without a scope fails here, not at a hospital.
"""

from __future__ import annotations

import doctest
from typing import Any

import pytest

import fhir_adapters.auth.scopes
from fhir_adapters.auth.scopes import (
    CHANGE_TYPES,
    DEFAULT_SCOPES,
    DEFAULT_SYSTEM_SCOPES,
    READS,
    SEARCHED_TYPES,
    STANDALONE_SCOPES,
    WRITES,
)
from fhir_adapters.errors import FhirAuthError
from fhir_adapters.fetch import fetch_record
from fhir_adapters.normalize import normalize
from fhir_adapters.write.draft import WriteOptions, build_transaction
from service.api.routes.launch import launch_scopes
from service.api.security import scopes_allow
from service.config import BatchSettings
from service.structured import StructuredSummary, build_structured, not_read
from tests.fakes import FakeFhirSource, bundle_patient, load_synthea
from tests.fhir_adapters.test_writer import make_draft, previous_doc

INTERACTION = {"read": "r", "search": "s", "binary": "r"}


def test_scopes_module_doctests_pass() -> None:
    assert doctest.testmod(fhir_adapters.auth.scopes).failed == 0


@pytest.fixture
def scoped_source() -> tuple[FakeFhirSource, str]:
    """Beatris' record plus a note stored as Binary and an order naming its drug by reference."""
    bundle = load_synthea("Beatris270")
    source = FakeFhirSource.from_bundle(bundle)
    patient_id = str(bundle_patient(bundle)["id"])
    url = source.add_binary(b"Plan: follow up in 2 weeks.", "text/plain", id="note-bin")
    source.add(
        {
            "resourceType": "DocumentReference",
            "id": "doc-bin",
            "status": "current",
            "subject": {"reference": f"Patient/{patient_id}"},
            "date": "2024-01-15T10:00:00Z",
            "content": [{"attachment": {"contentType": "text/plain", "url": url}}],
        }
    )
    drug = source.add({"resourceType": "Medication", "id": "drug-1", "code": {"text": "Metformin"}})
    source.add(
        {
            "resourceType": "MedicationRequest",
            "id": "order-1",
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{patient_id}"},
            "medicationReference": {"reference": f"Medication/{drug['id']}"},
        }
    )
    return source, patient_id


@pytest.mark.parametrize(
    ("scopes", "context"),
    [(DEFAULT_SCOPES, "patient"), (STANDALONE_SCOPES, "patient"), (DEFAULT_SYSTEM_SCOPES, "system")],
    ids=["ehr-launch", "standalone-launch", "backend-services"],
)
async def test_every_request_fetch_makes_is_allowed_by_the_scopes_asked_for(
    scoped_source: tuple[FakeFhirSource, str], scopes: str, context: str
) -> None:
    source, patient_id = scoped_source
    granted = scopes.split()

    record = await fetch_record(source, patient_id, encounter_id=None)

    touched = {(rtype, INTERACTION[kind]) for kind, rtype, _ in source.calls}
    assert {"Binary", "Medication", "Procedure", "Immunization", "DiagnosticReport"} <= {t for t, _ in touched}
    refused = sorted(f"{t}.{i}" for t, i in touched if context not in scopes_allow(granted, t, i))
    assert refused == []
    assert any(n.source.id == "doc-bin" for n in record.notes)
    assert [s for s in record.skipped if s.resource_type in ("Binary", "Medication")] == []


def test_the_declaration_covers_what_fetch_searches_and_the_batch_watches() -> None:
    declared = {r.resource_type for r in READS}
    assert set(SEARCHED_TYPES) <= declared
    assert set(CHANGE_TYPES) == {"Patient", *SEARCHED_TYPES}
    assert BatchSettings().change_types == list(CHANGE_TYPES)


def _write_entries() -> list[tuple[str, str]]:
    """(type, letter) of every entry the write-back transaction sends when it supersedes a draft."""
    bundle: dict[str, Any] = build_transaction(make_draft(), WriteOptions(), previous=previous_doc())
    letters = {"POST": "c", "PUT": "u"}
    return [(e["resource"]["resourceType"], letters[e["request"]["method"]]) for e in bundle["entry"]]


def test_every_write_is_declared_and_allowed_by_the_backend_scopes() -> None:
    entries = _write_entries()
    declared = {(w.resource_type, w.letter) for w in WRITES}
    assert set(entries) <= declared
    granted = DEFAULT_SYSTEM_SCOPES.split()
    assert [f"{t}.{x}" for t, x in entries if "system" not in scopes_allow(granted, t, x)] == []


def test_an_ehr_launch_asks_to_read_every_type_fetch_reads_and_for_the_updates_review_makes() -> None:
    asked = launch_scopes(None, ehr_launch=True).split()
    for read in READS:
        for letter in read.letters:
            assert "patient" in scopes_allow(asked, read.resource_type, letter), (read.resource_type, letter)
    for write in WRITES:
        assert "patient" in scopes_allow(asked, write.resource_type, write.letter), write
    for needed in ("Procedure", "Immunization", "DiagnosticReport", "Binary"):
        assert "patient" in scopes_allow(asked, needed, "r")


async def test_a_refused_type_is_named_at_the_top_of_the_coded_summary_and_in_the_not_shown_line(
    scoped_source: tuple[FakeFhirSource, str],
) -> None:
    source, patient_id = scoped_source
    for rtype in ("Procedure", "Immunization"):
        source.refuse(rtype, FhirAuthError(f"FHIR server answered 403 to GET {rtype}", status=403))

    record = await fetch_record(source, patient_id)
    structured = build_structured(normalize(record))
    markdown = structured.to_markdown()

    assert structured.missing_types == ("Procedure", "Immunization")
    first = markdown.splitlines()[0]
    assert first.startswith("**Incomplete record:**") and "Procedure, Immunization" in first
    shown = [line for line in markdown.splitlines() if line.startswith("_Not shown (could not be used)")]
    assert len(shown) == 1 and "Procedure: none read (search refused by the server (status 403))" in shown[0]
    again = StructuredSummary.from_json(structured.to_json())
    assert again.not_read == structured.not_read and again.missing_types == structured.missing_types


def test_a_complete_record_has_no_warning_and_no_not_shown_line() -> None:
    structured = StructuredSummary(sections=(), not_read=not_read([]))
    assert structured.incomplete_line() is None and structured.not_read_line() is None
    assert "Incomplete" not in structured.to_markdown()
