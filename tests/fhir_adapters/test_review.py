"""Specifications of the review write-back: what approve / edit / reject put on the FHIR server,
field by field, and how they behave when the draft changed, was already acted on, or is not ours.

`MemoryFhir` is a versioned FHIR store in a dict that honours If-Match the way a server does (412 ->
`FhirConflict`) and applies a transaction all or nothing. It is reused by tests/service/test_review.py.
"""

from __future__ import annotations

import base64
import copy
import re
from typing import Any

import pytest
import respx
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.provenance import Provenance

from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirConflict, FhirNotFound
from fhir_adapters.write.draft import provenance_id
from fhir_adapters.write.review import (
    APPROVED_DESCRIPTION,
    APPROVED_EDITED_DESCRIPTION,
    EDITED_BY_URL,
    ReviewConflict,
    ReviewError,
    ReviewForbidden,
    ReviewNotFound,
    agents_of_type,
    approved_document,
    check_reviewer,
    check_when,
    draft_key,
    edit_provenance,
    edited_document,
    reject_provenance,
    rejected_document,
    verified_provenance,
)
from fhir_adapters.write.send import approve, edit, reject

JsonObject = dict[str, Any]

SYSTEM = "urn:chartbrief:summary"
KEY = "ab" * 32
DEVICE = "Device/model-1"
DR = "Practitioner/dr-1"
OTHER_DR = "Practitioner/dr-2"
WHEN = "2025-03-04T10:20:30+00:00"
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
AI_MARKDOWN = "# Patient summary (AI draft)\n\n- Hypertension [C1]\n"


def draft_doc(doc_id: str = "doc-1", *, patient: str = "p1", version: str = "1") -> JsonObject:
    """A DocumentReference shaped like the writer's, as the server returns it."""
    return {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "meta": {"versionId": version, "lastUpdated": "2025-03-04T10:00:00Z", "security": [dict(AIAST)]},
        "identifier": [{"system": SYSTEM, "value": KEY}],
        "status": "current",
        "docStatus": "preliminary",
        "type": {"coding": [{"system": "http://loinc.org", "code": "34133-9"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "date": "2025-03-04T10:00:00+00:00",
        "author": [{"reference": DEVICE}],
        "description": "AI-generated draft summary (chartbrief). Preliminary.",
        "content": [
            {
                "attachment": {
                    "contentType": "text/markdown; charset=utf-8",
                    "data": base64.b64encode(AI_MARKDOWN.encode()).decode(),
                    "title": "Clinical summary (AI draft)",
                }
            },
            {"attachment": {"contentType": "application/json", "data": base64.b64encode(b"{}").decode()}},
        ],
        "context": {"related": [{"reference": "Condition/c1/_history/1"}]},
    }


def ai_provenance(doc_id: str = "doc-1", version: str = "1") -> JsonObject:
    return {
        "resourceType": "Provenance",
        "id": provenance_id(KEY),
        "meta": {"versionId": version, "security": [dict(AIAST)]},
        "extension": [{"url": "urn:chartbrief:sampling", "valueString": "temperature=0.0 seed=42"}],
        "target": [{"reference": f"DocumentReference/{doc_id}"}],
        "recorded": "2025-03-04T10:00:00+00:00",
        "reason": [{"coding": [dict(AIAST)]}],
        "activity": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE"}]
        },
        "agent": [
            {"type": {"coding": [{"system": PARTICIPANT, "code": "author"}]}, "who": {"reference": DEVICE}}
        ],
        "entity": [{"role": "source", "what": {"reference": "Condition/c1/_history/1"}}],
    }


# The fake engine's model file (service.llm.fake.FAKE_IDENTITY): the Device a draft it wrote names.
MODEL_SHA256 = "0" * 64


def ai_device(sha256: str = MODEL_SHA256) -> JsonObject:
    """The AI-Device the writer creates for a model file, as the server returns it."""
    return {
        "resourceType": "Device",
        "id": DEVICE.split("/", 1)[1],
        "meta": {"versionId": "1", "security": [dict(AIAST)]},
        "identifier": [{"system": "urn:chartbrief:model-sha256", "value": sha256}],
        "status": "active",
    }


class MemoryFhir:
    """A versioned FHIR store: read, update (If-Match), transaction of PUTs (all or nothing).

    `before_write` runs before each write is checked (to simulate a concurrent change);
    `commit_then_conflict` makes the next transaction commit and then answer 412, as a retried
    request whose first attempt committed gets from a real server.
    """

    def __init__(self, *resources: JsonObject) -> None:
        self.history: dict[str, list[JsonObject]] = {}
        self.writes: list[str] = []
        self.transactions: list[JsonObject] = []
        self.before_write: Any = None
        self.commit_then_conflict = False
        for resource in resources:
            key = f"{resource['resourceType']}/{resource['id']}"
            self.history[key] = [copy.deepcopy(resource)]

    def current(self, ref: str) -> JsonObject:
        return copy.deepcopy(self.history[ref][-1])

    def change(self, ref: str, **fields: Any) -> None:
        """Someone else updates the resource (a new version)."""
        resource = self.current(ref)
        resource.update(fields)
        self._store(resource)

    async def read(self, resource_type: str, id: str) -> JsonObject:
        ref = f"{resource_type}/{id}"
        if ref not in self.history:
            raise FhirNotFound(f"FHIR server answered 404 to GET {ref}", status=404, url=ref)
        return self.current(ref)

    async def update(self, resource: JsonObject, *, if_match: str | None = None) -> JsonObject:
        if self.before_write:
            self.before_write()
        ref = f"{resource['resourceType']}/{resource['id']}"
        self._check(ref, if_match)
        self.writes.append(ref)
        return self._store(resource)

    async def transaction(self, bundle: JsonObject, *, idempotent: bool = False) -> JsonObject:
        if self.before_write:
            self.before_write()
        self.transactions.append(copy.deepcopy(bundle))
        entries = bundle["entry"]
        for entry in entries:  # all preconditions first: a transaction is all or nothing
            assert entry["request"]["method"] == "PUT"
            self._check(entry["request"]["url"], entry["request"].get("ifMatch"))
        out = []
        for entry in entries:
            self.writes.append(entry["request"]["url"])
            stored = self._store(entry["resource"])
            out.append({"response": {"status": "200 OK"}, "resource": stored})
        if self.commit_then_conflict:
            self.commit_then_conflict = False
            raise FhirConflict("FHIR server answered 412 to POST base", status=412)
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": out}

    def _check(self, ref: str, if_match: str | None) -> None:
        if if_match is None or ref not in self.history:
            return
        version = self.history[ref][-1].get("meta", {}).get("versionId")
        if if_match != f'W/"{version}"':
            raise FhirConflict(f"FHIR server answered 412 to PUT {ref}", status=412)

    def _store(self, resource: JsonObject) -> JsonObject:
        ref = f"{resource['resourceType']}/{resource['id']}"
        stored = copy.deepcopy(resource)
        previous = self.history.get(ref, [])
        meta = dict(stored.get("meta") or {})
        meta["versionId"] = str(len(previous) + 1)
        stored["meta"] = meta
        self.history.setdefault(ref, []).append(stored)
        return copy.deepcopy(stored)


def server(doc: JsonObject | None = None, prov: JsonObject | None = None) -> MemoryFhir:
    return MemoryFhir(doc or draft_doc(), prov or ai_provenance())


def _markdown_of(doc: JsonObject) -> str:
    return base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()


# -- pure builders -------------------------------------------------------------------------------------


def test_approved_document_is_final_keeps_the_device_and_adds_the_verifier_once() -> None:
    doc = draft_doc()
    approved = approved_document(doc, DR)
    assert approved["docStatus"] == "final"
    assert approved["status"] == "current"
    assert approved["author"] == [{"reference": DEVICE}, {"reference": DR}]
    assert approved["description"] == APPROVED_DESCRIPTION
    assert approved_document(approved, DR)["author"] == approved["author"], "the verifier is added once"
    assert doc["docStatus"] == "preliminary", "the input is not modified"


def test_approved_document_keeps_the_ai_label_and_drops_server_managed_meta() -> None:
    approved = approved_document(draft_doc(), DR)
    assert approved["meta"]["security"] == [AIAST]
    assert "versionId" not in approved["meta"] and "lastUpdated" not in approved["meta"]
    assert approved["identifier"] == [{"system": SYSTEM, "value": KEY}]
    assert approved["content"] == draft_doc()["content"], "approval does not change the text"


def test_verified_provenance_adds_one_verifier_agent_and_keeps_the_device_author() -> None:
    verified = verified_provenance(ai_provenance(), DR)
    assert verified["agent"][0]["who"] == {"reference": DEVICE}
    assert verified["agent"][1] == {
        "type": {"coding": [{"system": PARTICIPANT, "code": "verifier", "display": "Verifier"}]},
        "who": {"reference": DR},
    }
    assert agents_of_type(verified, "verifier") == [DR]
    assert agents_of_type(verified, "author") == [DEVICE]
    assert len(verified_provenance(verified, DR)["agent"]) == 2
    assert verified["entity"] == ai_provenance()["entity"]
    assert verified["reason"] == [{"coding": [AIAST]}]


def test_edited_document_holds_the_clinicians_text_and_says_a_person_changed_it() -> None:
    text = "# Summary\n\nHypertension, well controlled.\n"
    edited = edited_document(draft_doc(), text, DR, when=WHEN)
    (content,) = edited["content"]  # the AI's structured JSON no longer describes the text
    assert _markdown_of(edited) == text
    assert content["attachment"]["contentType"].startswith("text/markdown")
    assert content["attachment"]["creation"] == WHEN
    assert "edited by a clinician" in content["attachment"]["title"]
    assert edited["extension"] == [{"url": EDITED_BY_URL, "valueReference": {"reference": DR}}]
    assert "edited by a clinician" in edited["description"]
    assert edited["docStatus"] == "preliminary", "an edit is not an approval"
    assert edited["meta"]["security"] == [AIAST], "it still holds AI-written text"
    assert {"reference": DR} in edited["author"] and {"reference": DEVICE} in edited["author"]
    assert approved_document(edited, DR)["description"] == APPROVED_EDITED_DESCRIPTION


def test_edit_provenance_targets_the_new_version_and_names_the_previous_as_revision() -> None:
    prov = edit_provenance("doc-1", new_version="3", previous_version="2", editor=DR, when=WHEN)
    assert prov["target"] == [{"reference": "DocumentReference/doc-1/_history/3"}]
    assert prov["entity"] == [
        {"role": "revision", "what": {"reference": "DocumentReference/doc-1/_history/2"}}
    ]
    assert prov["activity"]["coding"][0]["code"] == "UPDATE"
    assert prov["activity"]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
    assert agents_of_type(prov, "author") == [DR]
    assert prov["recorded"] == WHEN
    assert "reason" not in prov, "a person's edit is not labelled AI-asserted"
    Provenance.model_validate(prov)


def test_rejected_document_is_entered_in_error_and_its_provenance_names_who_but_no_reason() -> None:
    rejected = rejected_document(draft_doc())
    assert rejected["status"] == "entered-in-error"
    assert rejected["docStatus"] == "preliminary"
    prov = reject_provenance("doc-1", version="1", who=DR, when=WHEN)
    assert prov["activity"]["coding"][0]["code"] == "NULLIFY"
    assert prov["target"] == [{"reference": "DocumentReference/doc-1"}]
    assert prov["entity"] == [
        {"role": "removal", "what": {"reference": "DocumentReference/doc-1/_history/1"}}
    ]
    assert agents_of_type(prov, "performer") == [DR]
    assert agents_of_type(prov, "verifier") == [], "a rejection is not a verification"
    Provenance.model_validate(prov)


def test_review_provenance_ids_are_valid_fhir_ids_stable_per_version_and_distinct_per_action() -> None:
    a = edit_provenance("doc-1", new_version="2", previous_version="1", editor=DR, when=WHEN)["id"]
    b = edit_provenance("doc-1", new_version="2", previous_version="1", editor=OTHER_DR, when="x")["id"]
    c = edit_provenance("doc-1", new_version="3", previous_version="2", editor=DR, when=WHEN)["id"]
    r = reject_provenance("doc-1", version="2", who=DR, when=WHEN)["id"]
    assert a == b, "a retried edit overwrites its Provenance"
    assert len({a, c, r, provenance_id(KEY)}) == 4
    assert all(FHIR_ID.match(i) for i in (a, c, r))


def test_every_builder_output_parses_as_an_r4_resource() -> None:
    DocumentReference.model_validate(approved_document(draft_doc(), DR))
    DocumentReference.model_validate(edited_document(draft_doc(), "text", DR, when=WHEN))
    DocumentReference.model_validate(rejected_document(draft_doc()))
    Provenance.model_validate(verified_provenance(ai_provenance(), DR))


def test_only_documents_with_the_chartbrief_identifier_are_drafts() -> None:
    assert draft_key(draft_doc(), SYSTEM) == KEY
    note = draft_doc()
    note["identifier"] = [{"system": "urn:other", "value": KEY}]
    with pytest.raises(ReviewError, match="not written by chartbrief"):
        draft_key(note, SYSTEM)
    with pytest.raises(ReviewError, match="not a DocumentReference"):
        draft_key({"resourceType": "Composition", "identifier": [{"system": SYSTEM, "value": KEY}]}, SYSTEM)


@pytest.mark.parametrize(
    ("reference", "ok"),
    [
        ("Practitioner/dr-1", True),
        ("PractitionerRole/r.2", True),
        ("https://ehr.example.org/fhir/Practitioner/123", True),
        ("Patient/p1", False),
        ("RelatedPerson/x", False),
        ("Practitioner/", False),
        ("Practitioner/a b", False),
        ("", False),
    ],
)
def test_only_a_practitioner_can_review(reference: str, ok: bool) -> None:
    if ok:
        assert check_reviewer(reference) == reference
    else:
        with pytest.raises(ReviewError, match="verifier must be a Practitioner"):
            check_reviewer(reference)


def test_the_time_of_an_action_must_be_a_zoned_instant() -> None:
    assert check_when("2025-01-01T00:00:00Z") == "2025-01-01T00:00:00Z"
    for bad in ("2025-01-01T00:00:00", "yesterday", ""):
        with pytest.raises(ReviewError, match="when must"):
            check_when(bad)


# -- approve -------------------------------------------------------------------------------------------


async def test_approve_writes_document_and_provenance_in_one_transaction_guarded_by_if_match() -> None:
    fhir = server()
    doc = await approve(fhir, "doc-1", verifier=DR, when=WHEN, version="1")
    assert doc["docStatus"] == "final" and doc["meta"]["versionId"] == "2"
    (bundle,) = fhir.transactions
    requests = [e["request"] for e in bundle["entry"]]
    assert requests == [
        {"method": "PUT", "url": "DocumentReference/doc-1", "ifMatch": 'W/"1"'},
        {"method": "PUT", "url": f"Provenance/{provenance_id(KEY)}", "ifMatch": 'W/"1"'},
    ]
    prov = fhir.current(f"Provenance/{provenance_id(KEY)}")
    assert agents_of_type(prov, "verifier") == [DR]
    assert {"reference": DR} in fhir.current("DocumentReference/doc-1")["author"]


async def test_approve_of_a_version_the_clinician_did_not_see_raises_conflict_and_writes_nothing() -> None:
    fhir = server()
    fhir.change("DocumentReference/doc-1", description="changed elsewhere")
    with pytest.raises(ReviewConflict, match="changed since you opened it"):
        await approve(fhir, "doc-1", verifier=DR, when=WHEN, version="1")
    assert fhir.writes == []


async def test_a_change_between_read_and_write_raises_conflict_and_the_transaction_writes_nothing() -> None:
    fhir = server()
    fhir.before_write = lambda: fhir.change("DocumentReference/doc-1", description="x")
    with pytest.raises(ReviewConflict):
        await approve(fhir, "doc-1", verifier=DR, when=WHEN)
    assert agents_of_type(fhir.current(f"Provenance/{provenance_id(KEY)}"), "verifier") == []


async def test_approve_whose_first_attempt_committed_is_not_reported_as_a_conflict() -> None:
    fhir = server()
    fhir.commit_then_conflict = True
    doc = await approve(fhir, "doc-1", verifier=DR, when=WHEN, version="1")
    assert doc["docStatus"] == "final"


async def test_approving_twice_by_the_same_clinician_writes_nothing_more() -> None:
    fhir = server()
    await approve(fhir, "doc-1", verifier=DR, when=WHEN, version="1")
    writes = len(fhir.writes)
    again = await approve(fhir, "doc-1", verifier=DR, when=WHEN, version="1")
    assert again["docStatus"] == "final"
    assert len(fhir.writes) == writes


async def test_a_draft_approved_by_one_clinician_cannot_be_approved_by_another() -> None:
    fhir = server()
    await approve(fhir, "doc-1", verifier=DR, when=WHEN)
    with pytest.raises(ReviewError, match="already approved"):
        await approve(fhir, "doc-1", verifier=OTHER_DR, when=WHEN)


@pytest.mark.parametrize(
    ("status", "message"), [("entered-in-error", "rejected"), ("superseded", "superseded")]
)
async def test_rejected_or_superseded_drafts_cannot_be_approved(status: str, message: str) -> None:
    doc = draft_doc()
    doc["status"] = status
    with pytest.raises(ReviewError, match=message):
        await approve(server(doc), "doc-1", verifier=DR, when=WHEN)


async def test_a_document_chartbrief_did_not_write_is_never_touched() -> None:
    doc = draft_doc()
    doc["identifier"] = [{"system": "urn:hospital:notes", "value": "n1"}]
    fhir = server(doc)
    for action in (
        approve(fhir, "doc-1", verifier=DR, when=WHEN),
        edit(fhir, "doc-1", markdown="x", editor=DR, when=WHEN),
        reject(fhir, "doc-1", who=DR, when=WHEN),
    ):
        with pytest.raises(ReviewError, match="not written by chartbrief"):
            await action
    assert fhir.writes == []


async def test_the_configured_identifier_system_decides_what_is_a_draft() -> None:
    with pytest.raises(ReviewError):
        await approve(server(), "doc-1", verifier=DR, when=WHEN, identifier_system="urn:hospital:ai-summary")


async def test_actions_on_another_patients_document_are_forbidden_and_write_nothing() -> None:
    fhir = server(draft_doc(patient="p2"))
    for action in (
        approve(fhir, "doc-1", verifier=DR, when=WHEN, patient_id="p1"),
        edit(fhir, "doc-1", markdown="x", editor=DR, when=WHEN, patient_id="p1"),
        reject(fhir, "doc-1", who=DR, when=WHEN, patient_id="p1"),
    ):
        with pytest.raises(ReviewForbidden):
            await action
    assert fhir.writes == []


async def test_a_missing_document_or_provenance_is_not_found() -> None:
    with pytest.raises(ReviewNotFound, match="DocumentReference/nope"):
        await approve(server(), "nope", verifier=DR, when=WHEN)
    only_doc = MemoryFhir(draft_doc())
    with pytest.raises(ReviewNotFound, match="Provenance"):
        await approve(only_doc, "doc-1", verifier=DR, when=WHEN)
    assert only_doc.writes == []


async def test_a_412_from_the_real_client_becomes_review_conflict() -> None:
    base = "http://fhir.test/fhir"
    doc, prov = draft_doc(), ai_provenance()
    with respx.mock(base_url=base, assert_all_called=True) as router:
        router.get("/DocumentReference/doc-1").respond(json=doc)
        router.get(f"/Provenance/{prov['id']}").respond(json=prov)
        outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "conflict"}]}
        router.post("").respond(412, json=outcome)
        async with FhirClient(base, max_attempts=1) as client:
            with pytest.raises(ReviewConflict):
                await approve(client, "doc-1", verifier=DR, when=WHEN)
        assert router.calls.last.request.method == "GET", "the state was re-read before reporting a conflict"
        sent = [c.request for c in router.calls if c.request.method == "POST"]
        assert len(sent) == 1 and b'"ifMatch":"W/\\"1\\""' in sent[0].content


# -- edit and reject -----------------------------------------------------------------------------------


async def test_edit_saves_a_new_version_and_a_provenance_of_the_persons_change() -> None:
    fhir = server()
    text = "# Summary\n\nEdited by me.\n"
    saved = await edit(fhir, "doc-1", markdown=text, editor=DR, when=WHEN, version="1")
    assert saved["meta"]["versionId"] == "2"
    assert _markdown_of(fhir.current("DocumentReference/doc-1")) == text
    assert _markdown_of(fhir.history["DocumentReference/doc-1"][0]) == AI_MARKDOWN, (
        "the AI text stays in history"
    )
    prov_refs = [r for r in fhir.history if r.startswith("Provenance/cb-ed-")]
    (prov_ref,) = prov_refs
    prov = fhir.current(prov_ref)
    assert prov["target"] == [{"reference": "DocumentReference/doc-1/_history/2"}]
    assert prov["entity"][0]["what"] == {"reference": "DocumentReference/doc-1/_history/1"}
    assert fhir.current("DocumentReference/doc-1")["docStatus"] == "preliminary"


async def test_edit_then_approve_gives_a_final_document_with_the_edited_text() -> None:
    fhir = server()
    saved = await edit(fhir, "doc-1", markdown="Mine.", editor=DR, when=WHEN, version="1")
    doc = await approve(fhir, "doc-1", verifier=DR, when=WHEN, version=saved["meta"]["versionId"])
    assert doc["docStatus"] == "final"
    assert _markdown_of(doc) == "Mine."
    assert doc["description"] == APPROVED_EDITED_DESCRIPTION
    assert [a["reference"] for a in doc["author"]] == [DEVICE, DR]


async def test_edit_refuses_empty_text_approved_drafts_and_stale_versions() -> None:
    fhir = server()
    with pytest.raises(ReviewError, match="markdown is empty"):
        await edit(fhir, "doc-1", markdown="  \n", editor=DR, when=WHEN)
    with pytest.raises(ReviewConflict):
        await edit(fhir, "doc-1", markdown="x", editor=DR, when=WHEN, version="7")
    await approve(fhir, "doc-1", verifier=DR, when=WHEN)
    with pytest.raises(ReviewError, match="already approved"):
        await edit(fhir, "doc-1", markdown="x", editor=DR, when=WHEN)


async def test_an_edit_whose_first_attempt_committed_is_not_a_conflict_and_gets_its_provenance() -> None:
    fhir = server()
    calls = 0

    async def commit_then_412_once(resource: JsonObject, *, if_match: str | None = None) -> JsonObject:
        nonlocal calls
        calls += 1
        stored = await MemoryFhir.update(fhir, resource, if_match=if_match)
        if calls == 1:
            raise FhirConflict("FHIR server answered 412", status=412)
        return stored

    fhir.update = commit_then_412_once  # type: ignore[method-assign]
    saved = await edit(fhir, "doc-1", markdown="Mine.", editor=DR, when=WHEN, version="1")
    assert saved["meta"]["versionId"] == "2"
    assert _markdown_of(fhir.current("DocumentReference/doc-1")) == "Mine."
    assert any(r.startswith("Provenance/cb-ed-") for r in fhir.history)


async def test_reject_marks_the_draft_entered_in_error_with_a_provenance_and_is_idempotent() -> None:
    fhir = server()
    doc = await reject(fhir, "doc-1", who=DR, reason="Wrong patient history", when=WHEN, version="1")
    assert doc["status"] == "entered-in-error"
    (bundle,) = fhir.transactions
    assert bundle["entry"][0]["request"]["ifMatch"] == 'W/"1"'
    assert "Wrong patient history" not in repr(fhir.history), "the reason never reaches the EHR"
    writes = len(fhir.writes)
    again = await reject(fhir, "doc-1", who=DR, when=WHEN, version="1")
    assert again["status"] == "entered-in-error" and len(fhir.writes) == writes


async def test_reject_refuses_an_approved_draft_and_a_stale_version() -> None:
    fhir = server()
    with pytest.raises(ReviewConflict):
        await reject(fhir, "doc-1", who=DR, when=WHEN, version="2")
    await approve(fhir, "doc-1", verifier=DR, when=WHEN)
    with pytest.raises(ReviewError, match="already approved"):
        await reject(fhir, "doc-1", who=DR, when=WHEN)
    assert fhir.current("DocumentReference/doc-1")["status"] == "current"
