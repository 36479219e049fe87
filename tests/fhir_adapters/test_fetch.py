"""fetch_record over an in-memory FHIR source loaded with real Synthea bundles."""

from __future__ import annotations

import base64
import doctest
from typing import Any

import pytest

import fhir_adapters.auth.scopes
import fhir_adapters.fetch
from fhir_adapters.errors import FhirAuthError, FhirBadRequest, FhirNotFound, FhirServerError
from fhir_adapters.fetch import EncounterNotOfPatient, FhirSource, fetch_record
from fhir_adapters.text import text_sha256
from tests.fakes import FakeFhirSource, bundle_patient, bundle_resources, load_synthea

BEATRIS = "Beatris270"


@pytest.fixture
def bundle() -> dict[str, Any]:
    return load_synthea(BEATRIS)


@pytest.fixture
def source(bundle: dict[str, Any]) -> FakeFhirSource:
    return FakeFhirSource.from_bundle(bundle)


@pytest.fixture
def patient_id(bundle: dict[str, Any]) -> str:
    return str(bundle_patient(bundle)["id"])


def b64(text: str, encoding: str = "utf-8") -> str:
    return base64.b64encode(text.encode(encoding)).decode("ascii")


def document(patient_id: str, id: str, attachment: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": id,
        "status": "current",
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": "2024-01-15T10:00:00Z",
        "content": [{"attachment": attachment}],
        **extra,
    }


def skip_reasons(record: Any) -> dict[str, str]:
    return {s.resource: s.reason for s in record.skipped}


def test_fetch_module_doctests_pass() -> None:
    assert doctest.testmod(fhir_adapters.fetch).failed == 0


def test_fake_source_satisfies_the_fhir_source_protocol(source: FakeFhirSource) -> None:
    assert isinstance(source, FhirSource)


async def test_fetch_reads_every_searched_type_for_the_patient(
    bundle: dict[str, Any], source: FakeFhirSource, patient_id: str
) -> None:
    record = await fetch_record(source, patient_id, observation_limit=5000)

    assert record.patient["id"] == patient_id
    for rtype in fhir_adapters.auth.scopes.SEARCHED_TYPES:
        expected = {r["id"] for r in bundle_resources(bundle, rtype)}
        assert {r["id"] for r in record.of_type(rtype)} == expected, rtype
    assert record.skipped == []


async def test_fetch_keeps_the_raw_json_including_extensions(
    bundle: dict[str, Any], source: FakeFhirSource, patient_id: str
) -> None:
    record = await fetch_record(source, patient_id)

    assert record.patient["extension"] == bundle_patient(bundle)["extension"]
    assert all("data" in r["content"][0]["attachment"] for r in record.of_type("DocumentReference"))
    assert all(r["meta"]["versionId"] == "1" for r in record.of_type("Condition"))


async def test_fetch_decodes_current_and_superseded_notes_and_records_their_status(
    bundle: dict[str, Any], source: FakeFhirSource, patient_id: str
) -> None:
    record = await fetch_record(source, patient_id)

    docs = bundle_resources(bundle, "DocumentReference")
    by_id = {n.source.id: n for n in record.notes}
    assert set(by_id) == {d["id"] for d in docs}
    for doc in docs:
        note = by_id[doc["id"]]
        raw = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode("utf-8")
        # Same words in the same order; only runs of blank lines and trailing spaces are tidied.
        assert " ".join(note.text.split()) == " ".join(raw.split())
        assert note.text.splitlines()[0] == raw.strip().splitlines()[0]
        assert "\n\n\n" not in note.text
        assert note.status == doc["status"]
        assert note.content_type == "text/plain"
        assert note.sha256 == text_sha256(raw)
    statuses = sorted(n.status or "" for n in record.notes)
    assert statuses.count("current") == sum(d["status"] == "current" for d in docs) == 1
    assert statuses.count("superseded") == len(docs) - 1


async def test_fetch_keeps_one_copy_of_notes_repeated_in_presented_form_the_document_reference_one(
    bundle: dict[str, Any], source: FakeFhirSource, patient_id: str
) -> None:
    record = await fetch_record(source, patient_id)

    doc_texts = {
        text_sha256(base64.b64decode(d["content"][0]["attachment"]["data"]).decode())
        for d in bundle_resources(bundle, "DocumentReference")
    }
    report_texts = {
        text_sha256(base64.b64decode(form["data"]).decode())
        for r in bundle_resources(bundle, "DiagnosticReport")
        for form in r.get("presentedForm", [])
    }
    assert report_texts and report_texts <= doc_texts  # the bundle repeats every note
    assert len(record.notes) == len(doc_texts | report_texts)
    assert {n.source.resource_type for n in record.notes} == {"DocumentReference"}
    assert len({n.sha256 for n in record.notes}) == len(record.notes)


async def test_fetch_keeps_a_presented_form_note_with_no_document_reference_copy(
    source: FakeFhirSource, patient_id: str
) -> None:
    source.add(
        {
            "resourceType": "DiagnosticReport",
            "id": "dr-only",
            "status": "final",
            "code": {"text": "Discharge summary"},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": "2024-02-01T09:00:00Z",
            "presentedForm": [
                {"contentType": "text/plain", "data": b64("Discharged home.\nFollow up in 2 weeks.")}
            ],
        }
    )

    record = await fetch_record(source, patient_id)

    (note,) = [n for n in record.notes if n.source.id == "dr-only"]
    assert note.source.resource_type == "DiagnosticReport"
    assert note.text == "Discharged home.\nFollow up in 2 weeks."
    assert note.title == "Discharge summary"
    assert note.date == "2024-02-01T09:00:00Z"


async def test_fetch_strips_html_read_through_a_relative_binary_url(
    source: FakeFhirSource, patient_id: str
) -> None:
    html = (
        "<html><head><title>x</title><style>.a{color:red}</style><script>track('visit')</script></head>"
        "<body><h1>Progress note</h1><p>BP improved on <b>lisinopril</b> &amp; diet.</p>"
        "<ul><li>Repeat A1c in 3 months</li></ul></body></html>"
    )
    url = source.add_binary(html.encode(), "text/html", id="html-note")
    source.add(document(patient_id, "doc-html", {"contentType": "text/html; charset=utf-8", "url": url}))

    record = await fetch_record(source, patient_id)

    (note,) = [n for n in record.notes if n.source.id == "doc-html"]
    assert note.text == "Progress note\nBP improved on lisinopril & diet.\nRepeat A1c in 3 months"
    assert note.content_type == "text/html"
    assert ("binary", "Binary", {"url": "Binary/html-note"}) in source.calls


async def test_fetch_reads_an_absolute_binary_url_and_uses_its_content_type_when_undeclared(
    source: FakeFhirSource, patient_id: str
) -> None:
    source.add_binary(b"# Plan\n- **Stop** warfarin", "text/markdown", id="md")
    source.add(document(patient_id, "doc-md", {"url": "https://ehr.example.org/fhir/Binary/md"}))

    record = await fetch_record(source, patient_id)

    (note,) = [n for n in record.notes if n.source.id == "doc-md"]
    assert note.text == "# Plan\n- **Stop** warfarin"
    assert note.content_type == "text/markdown"


async def test_fetch_honours_the_attachment_charset(source: FakeFhirSource, patient_id: str) -> None:
    text = "Café au lait spots noted; naïve to insulin."
    source.add(
        document(
            patient_id,
            "doc-latin1",
            {"contentType": "text/plain; charset=ISO-8859-1", "data": b64(text, "latin-1")},
        )
    )

    record = await fetch_record(source, patient_id)

    (note,) = [n for n in record.notes if n.source.id == "doc-latin1"]
    assert note.text == text


async def test_fetch_skips_an_unsupported_attachment_with_its_reason_and_reads_no_bytes(
    source: FakeFhirSource, patient_id: str
) -> None:
    url = source.add_binary(b"%PDF-1.7", "application/pdf", id="pdf")
    source.add(document(patient_id, "doc-pdf", {"contentType": "application/pdf", "url": url}))
    source.add(
        document(patient_id, "doc-pdf-inline", {"contentType": "application/pdf", "data": b64("%PDF")})
    )

    record = await fetch_record(source, patient_id)

    reasons = skip_reasons(record)
    assert reasons["DocumentReference/doc-pdf#content[0]"] == "unsupported contentType application/pdf"
    assert reasons["DocumentReference/doc-pdf-inline#content[0]"] == "unsupported contentType application/pdf"
    assert not any(n.source.id.startswith("doc-pdf") for n in record.notes)
    assert not any(kind == "binary" for kind, _, _ in source.calls)
    # The DocumentReference itself was read; only its attachment could not be used.
    assert "doc-pdf" in {r["id"] for r in record.of_type("DocumentReference")}


@pytest.mark.parametrize(
    ("attachment", "reason"),
    [
        (
            {"contentType": "text/plain", "url": "Binary/missing"},
            "attachment url could not be read (status 404)",
        ),
        ({"contentType": "text/plain"}, "attachment has neither data nor url"),
        ({"contentType": "text/plain; charset=klingon", "data": b64("x")}, "unknown charset klingon"),
        ({"data": b64("no type")}, "missing contentType"),
        ({"contentType": "text/html", "data": b64("<script>only()</script>")}, "attachment has no text"),
    ],
)
async def test_fetch_skips_an_unreadable_attachment_with_its_reason(
    source: FakeFhirSource, patient_id: str, attachment: dict[str, Any], reason: str
) -> None:
    source.add(document(patient_id, "doc-bad", attachment))

    record = await fetch_record(source, patient_id)

    assert skip_reasons(record)["DocumentReference/doc-bad#content[0]"] == reason
    assert not any(n.source.id == "doc-bad" for n in record.notes)


async def test_fetch_skips_a_document_whose_base64_data_is_invalid(
    source: FakeFhirSource, patient_id: str
) -> None:
    source.add(document(patient_id, "doc-b64", {"contentType": "text/plain", "data": "not base64!"}))

    record = await fetch_record(source, patient_id)

    assert "content.0.attachment.data" in skip_reasons(record)["DocumentReference/doc-b64"]
    assert not any(n.source.id == "doc-b64" for n in record.notes)


async def test_fetch_skips_an_attachment_the_client_refuses_to_read(patient_id: str) -> None:
    class OneOriginSource(FakeFhirSource):
        async def binary(self, url: str) -> tuple[bytes, str]:
            if url.startswith("https://elsewhere.example"):
                raise FhirBadRequest("refusing to contact https://elsewhere.example")
            return await super().binary(url)

    source = OneOriginSource.from_bundle(load_synthea(BEATRIS))
    source.add(
        document(patient_id, "doc-far", {"contentType": "text/plain", "url": "https://elsewhere.example/x"})
    )

    record = await fetch_record(source, patient_id)

    assert skip_reasons(record)["DocumentReference/doc-far#content[0]"] == (
        "attachment url could not be read (FhirBadRequest)"
    )


async def test_fetch_drops_entered_in_error_documents(source: FakeFhirSource, patient_id: str) -> None:
    source.add(
        document(
            patient_id,
            "doc-eie",
            {"contentType": "text/plain", "data": b64("Wrong chart")},
            status="entered-in-error",
        )
    )

    record = await fetch_record(source, patient_id)

    assert skip_reasons(record)["DocumentReference/doc-eie"] == "status entered-in-error"
    assert "doc-eie" not in {r["id"] for r in record.of_type("DocumentReference")}
    assert not any(n.source.id == "doc-eie" for n in record.notes)


async def test_fetch_skips_an_invalid_resource_with_the_field_and_keeps_the_others(
    bundle: dict[str, Any], source: FakeFhirSource, patient_id: str
) -> None:
    source.add(
        {
            "resourceType": "Condition",
            "id": "broken",
            "clinicalStatus": "active",  # must be a CodeableConcept
            "code": {"text": "Asthma"},
            "subject": {"reference": f"Patient/{patient_id}"},
        }
    )
    source.add({"resourceType": "Observation", "id": "bad-date", "status": "final", "code": {"text": "x"},
                "subject": {"reference": f"Patient/{patient_id}"},
                "effectiveDateTime": "yesterday"})  # fmt: skip

    record = await fetch_record(source, patient_id, observation_limit=5000)

    reasons = skip_reasons(record)
    assert "clinicalStatus" in reasons["Condition/broken"]
    assert "effectiveDateTime" in reasons["Observation/bad-date"]
    assert len(record.skipped) == 2
    assert len(record.of_type("Condition")) == len(bundle_resources(bundle, "Condition"))
    assert "broken" not in {r["id"] for r in record.of_type("Condition")}


async def test_fetch_skips_resources_a_server_returns_for_another_patient(
    source: FakeFhirSource, patient_id: str
) -> None:
    source.add_stray(
        {
            "resourceType": "Condition",
            "id": "other",
            "code": {"text": "Gout"},
            "subject": {"reference": "Patient/someone-else"},
        }
    )

    record = await fetch_record(source, patient_id)

    assert skip_reasons(record) == {"Condition/other": "subject does not reference the requested patient"}
    assert "other" not in {r["id"] for r in record.of_type("Condition")}


async def test_fetch_of_an_unknown_patient_raises_not_found_before_any_search() -> None:
    source = FakeFhirSource.from_bundle(load_synthea("Luigi"))

    with pytest.raises(FhirNotFound):
        await fetch_record(source, "no-such-patient")
    assert [kind for kind, _, _ in source.calls] == ["read"]


@pytest.mark.parametrize("limit", [1, 2, 6])
async def test_fetch_never_has_more_calls_in_flight_than_max_concurrency(
    bundle: dict[str, Any], patient_id: str, limit: int
) -> None:
    source = FakeFhirSource.from_bundle(bundle, delay=0.005)
    for i in range(4):
        url = source.add_binary(f"<p>note {i}</p>".encode(), "text/html")
        source.add(document(patient_id, f"doc-url-{i}", {"contentType": "text/html", "url": url}))

    record = await fetch_record(source, patient_id, max_concurrency=limit)

    assert source.max_in_flight == limit  # bounded, and the searches really overlap up to it
    assert sum(kind == "binary" for kind, _, _ in source.calls) == 4
    assert {f"note {i}" for i in range(4)} <= {n.text for n in record.notes}


async def test_fetch_keeps_only_the_most_recent_observations_up_to_the_limit(
    bundle: dict[str, Any], source: FakeFhirSource, patient_id: str
) -> None:
    record = await fetch_record(source, patient_id, observation_limit=10)

    dates = sorted((o["effectiveDateTime"] for o in bundle_resources(bundle, "Observation")), reverse=True)
    kept = record.of_type("Observation")
    assert len(kept) == 10
    assert min(o["effectiveDateTime"] for o in kept) >= dates[9]
    searches = [
        details for kind, rtype, details in source.calls if kind == "search" and rtype == "Observation"
    ]
    assert searches == [{"patient": patient_id, "_sort": "-date", "_limit": 10}]


async def test_fetch_chooses_the_newest_observations_itself_when_the_server_cannot_sort(
    bundle: dict[str, Any], source: FakeFhirSource, patient_id: str
) -> None:
    source.supports_sort = False

    record = await fetch_record(source, patient_id, observation_limit=10)

    newest = sorted(
        bundle_resources(bundle, "Observation"), key=lambda o: o["effectiveDateTime"], reverse=True
    )
    kept = record.of_type("Observation")
    assert [o["effectiveDateTime"] for o in kept] == [o["effectiveDateTime"] for o in newest[:10]]
    assert record.skipped == []


async def test_fetch_with_an_encounter_sets_the_focus_and_still_reads_everything(
    bundle: dict[str, Any], source: FakeFhirSource, patient_id: str
) -> None:
    encounter_id = bundle_resources(bundle, "Encounter")[3]["id"]

    record = await fetch_record(source, patient_id, encounter_id=encounter_id)

    assert record.encounter_id == encounter_id
    assert ("read", "Encounter", {"id": encounter_id}) in source.calls
    assert len(record.of_type("Encounter")) == len(bundle_resources(bundle, "Encounter"))
    assert len(record.notes) == len(bundle_resources(bundle, "DocumentReference"))


async def test_fetch_with_an_unknown_encounter_raises_not_found(
    source: FakeFhirSource, patient_id: str
) -> None:
    with pytest.raises(FhirNotFound):
        await fetch_record(source, patient_id, encounter_id="nope")


async def test_fetch_skips_a_malformed_focus_encounter_and_still_reads_the_record(
    source: FakeFhirSource, patient_id: str
) -> None:
    source.add({"resourceType": "Encounter", "id": "odd", "status": "finished", "class": "AMB",
                "subject": {"reference": f"Patient/{patient_id}"}})  # fmt: skip

    record = await fetch_record(source, patient_id, encounter_id="odd")

    assert [s.resource for s in record.skipped] == ["Encounter/odd"]
    assert "class" in record.skipped[0].reason
    assert record.encounter_id == "odd"
    assert record.notes


async def test_fetch_refuses_an_encounter_of_another_patient(source: FakeFhirSource, patient_id: str) -> None:
    source.add({"resourceType": "Encounter", "id": "theirs", "status": "finished",
                "class": {"code": "AMB"}, "subject": {"reference": "Patient/someone-else"}})  # fmt: skip

    with pytest.raises(EncounterNotOfPatient, match="Encounter/theirs"):
        await fetch_record(source, patient_id, encounter_id="theirs")


async def test_fetch_records_a_refused_search_and_keeps_the_other_types(
    bundle: dict[str, Any], source: FakeFhirSource, patient_id: str
) -> None:
    source.refuse("Procedure", FhirAuthError("FHIR server answered 403 to GET Procedure", status=403))

    record = await fetch_record(source, patient_id)

    assert skip_reasons(record) == {"Procedure": "search refused by the server (status 403)"}
    assert record.of_type("Procedure") == []
    assert len(record.of_type("Condition")) == len(bundle_resources(bundle, "Condition"))


async def test_fetch_lets_a_retryable_server_error_propagate(source: FakeFhirSource, patient_id: str) -> None:
    source.refuse("Condition", FhirServerError("FHIR server answered 503 to GET Condition", status=503))

    with pytest.raises(FhirServerError):
        await fetch_record(source, patient_id)


async def test_fetch_of_a_patient_without_notes_has_no_notes_and_nothing_skipped() -> None:
    bundle = load_synthea("Luigi")
    source = FakeFhirSource.from_bundle(bundle)

    record = await fetch_record(source, str(bundle_patient(bundle)["id"]))

    assert record.notes == []
    assert record.skipped == []
    assert len(record.of_type("Observation")) == len(bundle_resources(bundle, "Observation"))


@pytest.mark.parametrize(("field", "value"), [("max_concurrency", 0), ("observation_limit", 0)])
async def test_fetch_rejects_a_non_positive_setting_naming_it(
    source: FakeFhirSource, patient_id: str, field: str, value: int
) -> None:
    with pytest.raises(ValueError, match=field):
        await fetch_record(source, patient_id, **{field: value})
