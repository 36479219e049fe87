"""Specifications of the write-back: the exact AI Transparency / US Core codes, the idempotency key,
the one-transaction shape, and write-once / supersede behaviour against an in-memory FHIR store."""

from __future__ import annotations

import base64
import copy
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.provenance import Provenance

from fhir_adapters.errors import FhirConflict
from fhir_adapters.models import ModelIdentity, PromptIdentity, SourceRef, SummaryDraft
from fhir_adapters.write.draft import (
    DraftError,
    WriteOptions,
    build_device,
    build_document_reference,
    build_provenance,
    build_transaction,
    idempotency_key,
    latest_previous,
    provenance_id,
    reference_from_location,
)
from fhir_adapters.write.send import write_summary

AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
AI_TYPE_SYSTEM = "http://hl7.org/fhir/uv/aitransparency/CodeSystem/AIdeviceTypeCS"
AI_KIND_URL = "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/aitransparency.AIKind"
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

MODEL = ModelIdentity(
    name="SmolLM2-135M-Instruct",
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="a" * 64,
    quantization="Q4_1",
    runtime="llama.cpp (llama-cpp-python 0.3.36)",
    sampling="temperature=0.0 seed=42 n_ctx=2048",
)
PROMPT = PromptIdentity(id="summary", version="v1", sha256="b" * 64)
PATIENT = SourceRef("Patient", "p1", "2")
ENCOUNTER = SourceRef("Encounter", "e1", "1")
INPUTS = [
    PATIENT,
    ENCOUNTER,
    SourceRef("Condition", "c1", "1"),
    SourceRef("Observation", "1", "3"),
    SourceRef("DocumentReference", "n1", "5"),
]


def make_draft(inputs: list[SourceRef] | None = None, **changes: Any) -> SummaryDraft:
    inputs = INPUTS if inputs is None else inputs
    prompt = changes.pop("prompt", PROMPT)
    model = changes.pop("model", MODEL)
    draft = SummaryDraft(
        patient=PATIENT,
        markdown="# Summary\n\n- Type 2 diabetes, HbA1c 7.2 % [O1] – stable.\n",
        structured={"conditions": [{"text": "Type 2 diabetes", "cite": "C1"}], "dropped": []},
        cited=[SourceRef("Condition", "c1", "1"), SourceRef("Observation", "1", "3")],
        inputs=inputs,
        model=model,
        prompt=prompt,
        idempotency_key=idempotency_key(inputs, prompt, model, ENCOUNTER),
        created="2024-05-01T10:00:00+00:00",
        encounter=ENCOUNTER,
        period_start="2023-01-01",
        period_end="2024-04-30",
    )
    return replace(draft, **changes)


def codings(concept: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(c["system"], c["code"]) for c in concept["coding"]]


def decode(attachment: Mapping[str, Any]) -> str:
    return base64.b64decode(attachment["data"]).decode("utf-8")


# -- idempotency key -------------------------------------------------------------------------------------


def test_key_is_the_same_for_the_same_inputs_in_any_order() -> None:
    keys = {idempotency_key(list(p), PROMPT, MODEL, ENCOUNTER) for p in itertools.permutations(INPUTS[:4])}
    assert len(keys) == 1
    (key,) = keys
    assert re.fullmatch(r"[0-9a-f]{64}", key)


def test_key_ignores_a_resource_read_twice() -> None:
    assert idempotency_key(INPUTS + INPUTS[:2], PROMPT, MODEL, None) == idempotency_key(
        INPUTS, PROMPT, MODEL, None
    )


@pytest.mark.parametrize(
    ("inputs", "prompt", "model", "encounter"),
    [
        pytest.param(
            INPUTS[:-1] + [SourceRef("DocumentReference", "n1", "6")], PROMPT, MODEL, ENCOUNTER, id="note"
        ),
        pytest.param(INPUTS[:-1], PROMPT, MODEL, ENCOUNTER, id="input-removed"),
        pytest.param(
            INPUTS + [SourceRef("Observation", "2", "1")], PROMPT, MODEL, ENCOUNTER, id="input-added"
        ),
        pytest.param(INPUTS, replace(PROMPT, version="v2"), MODEL, ENCOUNTER, id="prompt-version"),
        pytest.param(INPUTS, replace(PROMPT, sha256="c" * 64), MODEL, ENCOUNTER, id="prompt-bytes"),
        pytest.param(INPUTS, replace(PROMPT, id="discharge"), MODEL, ENCOUNTER, id="prompt-id"),
        pytest.param(INPUTS, PROMPT, replace(MODEL, sha256="d" * 64), ENCOUNTER, id="model-file"),
        pytest.param(
            INPUTS, PROMPT, replace(MODEL, sampling="temperature=0.7 seed=1"), ENCOUNTER, id="sampling"
        ),
        pytest.param(INPUTS, PROMPT, MODEL, None, id="no-encounter"),
        pytest.param(INPUTS, PROMPT, MODEL, SourceRef("Encounter", "e1", "2"), id="encounter-version"),
    ],
)
def test_key_changes_when_anything_that_decides_the_summary_changes(
    inputs: list[SourceRef], prompt: PromptIdentity, model: ModelIdentity, encounter: SourceRef | None
) -> None:
    assert idempotency_key(inputs, prompt, model, encounter) != idempotency_key(
        INPUTS, PROMPT, MODEL, ENCOUNTER
    )


def test_key_does_not_depend_on_model_labels_that_do_not_change_the_output() -> None:
    renamed = replace(MODEL, name="renamed", file_name="renamed.gguf")
    assert idempotency_key(INPUTS, PROMPT, renamed, None) == idempotency_key(INPUTS, PROMPT, MODEL, None)


def test_provenance_id_is_a_valid_fhir_id_derived_from_the_key() -> None:
    key = make_draft().idempotency_key
    pid = provenance_id(key)
    assert FHIR_ID.match(pid)
    assert pid.startswith("cb-") and key.startswith(pid[3:])
    assert provenance_id(make_draft(prompt=replace(PROMPT, version="v2")).idempotency_key) != pid


# -- Device ----------------------------------------------------------------------------------------------


def test_device_is_an_ai_device_naming_the_exact_model_file() -> None:
    device = build_device(MODEL)
    assert device["resourceType"] == "Device"
    assert codings(device["type"]) == [(AI_TYPE_SYSTEM, "Artificial-Intelligence")]
    kinds = [codings(e["valueCodeableConcept"]) for e in device["extension"] if e["url"] == AI_KIND_URL]
    assert sorted(kinds) == [
        [(AI_TYPE_SYSTEM, "Clinical-Documentation-and-Workflow")],
        [(AI_TYPE_SYSTEM, "Large-Language-Models")],
    ]
    assert device["identifier"] == [{"system": "urn:chartbrief:model-sha256", "value": MODEL.sha256}]
    assert {"name": MODEL.name, "type": "model-name"} in device["deviceName"]
    assert device["version"] == [{"value": MODEL.version_string}]
    assert MODEL.sha256 in device["version"][0]["value"] and "Q4_1" in device["version"][0]["value"]
    assert "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-Device" in device["meta"]["profile"]


def test_device_without_a_model_hash_is_refused() -> None:
    with pytest.raises(DraftError, match="sha256"):
        build_device(replace(MODEL, sha256=""))


# -- DocumentReference -----------------------------------------------------------------------------------


def test_document_reference_is_a_preliminary_ai_draft_clinical_note() -> None:
    draft = make_draft()
    doc = build_document_reference(draft, WriteOptions(), device_ref="Device/d1", replaces=None)
    assert doc["status"] == "current"
    assert doc["docStatus"] == "preliminary"
    assert doc["type"]["coding"] == [
        {"system": "http://loinc.org", "code": "34133-9", "display": "Summary of episode note"}
    ]
    assert codings(doc["category"][0]) == [
        ("http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category", "clinical-note")
    ]
    assert doc["subject"] == {"reference": "Patient/p1"}
    assert doc["date"] == draft.created
    assert doc["author"] == [{"reference": "Device/d1"}]
    assert doc["identifier"] == [{"system": "urn:chartbrief:summary", "value": draft.idempotency_key}]
    assert "AI" in doc["description"] and "review" in doc["description"]
    assert doc["meta"]["security"] == [AIAST]
    assert "relatesTo" not in doc


def test_document_reference_carries_the_markdown_and_the_structured_json() -> None:
    draft = make_draft()
    doc = build_document_reference(draft, WriteOptions(), device_ref="Device/d1", replaces=None)
    markdown, structured = (c["attachment"] for c in doc["content"])
    assert markdown["contentType"] == "text/markdown; charset=utf-8"
    assert decode(markdown) == draft.markdown  # non-ASCII survives the round trip
    assert markdown["title"] and markdown["creation"] == draft.created
    assert structured["contentType"] == "application/json"
    assert json.loads(decode(structured)) == draft.structured


def test_document_reference_context_names_encounter_period_and_cited_sources() -> None:
    draft = make_draft()
    doc = build_document_reference(draft, WriteOptions(), device_ref="Device/d1", replaces=None)
    assert doc["context"]["encounter"] == [{"reference": "Encounter/e1"}]
    assert doc["context"]["period"] == {"start": "2023-01-01", "end": "2024-04-30"}
    assert [r["reference"] for r in doc["context"]["related"]] == [ref.versioned for ref in draft.cited]


def test_progress_note_type_and_no_json_attachment_when_configured() -> None:
    settings = WriteOptions(loinc_type="11506-3", include_structured_json=False, identifier_system="urn:x")
    doc = build_document_reference(make_draft(), settings, device_ref="Device/d1", replaces=None)
    assert doc["type"]["coding"][0]["code"] == "11506-3"
    assert doc["type"]["coding"][0]["display"] == "Progress note"
    assert [c["attachment"]["contentType"] for c in doc["content"]] == ["text/markdown; charset=utf-8"]
    assert doc["identifier"][0]["system"] == "urn:x"


def test_document_reference_without_encounter_or_period_has_no_empty_context_parts() -> None:
    draft = make_draft(encounter=None, period_start=None, period_end=None, cited=[])
    doc = build_document_reference(draft, WriteOptions(), device_ref="Device/d1", replaces=None)
    assert "context" not in doc


def test_newer_summary_relates_to_the_one_it_replaces() -> None:
    doc = build_document_reference(
        make_draft(), WriteOptions(), device_ref="Device/d1", replaces="DocumentReference/old"
    )
    assert doc["relatesTo"] == [{"code": "replaces", "target": {"reference": "DocumentReference/old"}}]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"patient": SourceRef("Group", "g1")}, "patient"),
        ({"created": ""}, "created"),
    ],
)
def test_an_unwritable_draft_is_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(DraftError, match=field):
        build_transaction(make_draft(**changes), WriteOptions(), previous=None)


# -- Provenance ------------------------------------------------------------------------------------------


def test_provenance_has_one_versioned_source_entity_per_input() -> None:
    draft = make_draft()
    prov = build_provenance(draft, target="DocumentReference/x", device_ref="Device/d1")
    assert [e["what"]["reference"] for e in prov["entity"]] == [ref.versioned for ref in INPUTS]
    assert {e["role"] for e in prov["entity"]} == {"source"}
    assert "Observation/1/_history/3" in [e["what"]["reference"] for e in prov["entity"]]


def test_provenance_follows_the_ai_provenance_profile() -> None:
    draft = make_draft()
    prov = build_provenance(draft, target="DocumentReference/x", device_ref="Device/d1")
    assert prov["target"] == [{"reference": "DocumentReference/x"}]
    assert prov["recorded"] == draft.created
    assert prov["reason"] == [{"coding": [AIAST]}]
    assert codings(prov["activity"]) == [("http://terminology.hl7.org/CodeSystem/v3-DataOperation", "CREATE")]
    (agent,) = prov["agent"]
    assert codings(agent["type"]) == [
        ("http://terminology.hl7.org/CodeSystem/provenance-participant-type", "author")
    ]
    assert agent["who"] == {"reference": "Device/d1"}
    assert codings(agent["role"][0]) == [(AI_TYPE_SYSTEM, "Artificial-Intelligence")]
    assert prov["meta"]["security"] == [AIAST]
    assert (
        "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-Provenance" in prov["meta"]["profile"]
    )


def test_provenance_names_the_prompt_version_and_sampling() -> None:
    prov = build_provenance(make_draft(), target="DocumentReference/x", device_ref="Device/d1")
    ext = {e["url"]: e["valueString"] for e in prov["extension"]}
    assert ext["urn:chartbrief:prompt"] == f"summary/v1 sha256:{PROMPT.sha256}"
    assert ext["urn:chartbrief:sampling"] == MODEL.sampling


def test_every_built_resource_validates_as_r4_and_is_labelled_ai_asserted() -> None:
    bundle = build_transaction(make_draft(), WriteOptions(), previous=None)
    Bundle.model_validate(bundle)
    models = {"Device": Device, "DocumentReference": DocumentReference, "Provenance": Provenance}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        models[resource["resourceType"]].model_validate(resource)
        assert AIAST in resource["meta"]["security"]


# -- the transaction -------------------------------------------------------------------------------------


def test_transaction_writes_device_summary_and_provenance_conditionally() -> None:
    draft = make_draft()
    bundle = build_transaction(draft, WriteOptions(), previous=None)
    assert bundle["type"] == "transaction"
    device, doc, prov = bundle["entry"]
    assert device["request"] == {
        "method": "POST",
        "url": "Device",
        "ifNoneExist": f"identifier=urn:chartbrief:model-sha256|{MODEL.sha256}",
    }
    assert doc["request"] == {
        "method": "POST",
        "url": "DocumentReference",
        "ifNoneExist": f"identifier=urn:chartbrief:summary|{draft.idempotency_key}",
    }
    pid = provenance_id(draft.idempotency_key)
    assert prov["request"] == {"method": "PUT", "url": f"Provenance/{pid}"}
    assert prov["resource"]["id"] == pid
    # the new resources reference each other through their urn:uuid fullUrls
    assert device["fullUrl"].startswith("urn:uuid:") and doc["fullUrl"].startswith("urn:uuid:")
    assert doc["resource"]["author"] == [{"reference": device["fullUrl"]}]
    assert prov["resource"]["target"] == [{"reference": doc["fullUrl"]}]
    assert prov["resource"]["agent"][0]["who"] == {"reference": device["fullUrl"]}


def test_transaction_is_the_same_for_the_same_draft() -> None:
    assert build_transaction(make_draft(), WriteOptions(), previous=None) == build_transaction(
        make_draft(), WriteOptions(), previous=None
    )


def previous_doc(id_: str = "old", version: str | None = "3", key: str = "0" * 64) -> dict[str, Any]:
    doc = build_document_reference(
        make_draft(idempotency_key=key, created="2024-01-01T09:00:00+00:00"),
        WriteOptions(),
        device_ref="Device/d1",
        replaces=None,
    )
    doc["id"] = id_
    if version:
        doc["meta"] |= {"versionId": version, "lastUpdated": "2024-01-01T09:00:01Z"}
    return doc


def test_superseding_transaction_marks_the_previous_summary_superseded_guarded_by_its_version() -> None:
    previous = previous_doc()
    bundle = build_transaction(make_draft(), WriteOptions(), previous=previous)
    doc, put = bundle["entry"][1], bundle["entry"][3]
    assert put["request"] == {"method": "PUT", "url": "DocumentReference/old", "ifMatch": 'W/"3"'}
    assert put["resource"]["status"] == "superseded"
    assert put["resource"]["id"] == "old"
    assert put["resource"]["content"] == previous["content"]  # the old text is kept, only the status moves
    assert "versionId" not in put["resource"]["meta"]
    assert put["resource"]["meta"]["security"] == [AIAST]
    assert doc["resource"]["relatesTo"] == [
        {"code": "replaces", "target": {"reference": "DocumentReference/old"}}
    ]
    assert previous["status"] == "current"  # the caller's copy is not modified
    DocumentReference.model_validate(put["resource"])


def test_superseding_a_previous_of_unknown_version_sends_no_if_match() -> None:
    bundle = build_transaction(make_draft(), WriteOptions(), previous=previous_doc(version=None))
    assert "ifMatch" not in bundle["entry"][3]["request"]


def test_previous_without_an_id_is_refused() -> None:
    previous = previous_doc()
    del previous["id"]
    with pytest.raises(DraftError, match="no id"):
        build_transaction(make_draft(), WriteOptions(), previous=previous)


def test_latest_previous_picks_the_newest_current_chartbrief_summary_only() -> None:
    settings = WriteOptions()
    key = make_draft().idempotency_key
    older = previous_doc("older", key="1" * 64)
    newer = previous_doc("newer", key="2" * 64) | {"date": "2024-03-01T00:00:00+00:00"}
    same_key = previous_doc("same", key=key) | {"date": "2025-01-01T00:00:00+00:00"}
    superseded = previous_doc("gone", key="3" * 64) | {"status": "superseded", "date": "2025-01-01T00:00:00Z"}
    foreign = previous_doc("foreign", key="4" * 64) | {"identifier": [{"system": "urn:other", "value": "x"}]}
    focus = make_draft().encounter
    enc = focus.reference if focus else None
    chosen = latest_previous([older, newer, same_key, superseded, foreign], settings, key, enc)
    assert chosen is not None and chosen["id"] == "newer"
    assert latest_previous([same_key, foreign], settings, key, enc) is None


def test_latest_previous_never_supersedes_an_approved_summary_or_another_focus() -> None:
    settings = WriteOptions()
    key = make_draft().idempotency_key
    focus = make_draft().encounter
    enc = focus.reference if focus else None
    approved = previous_doc("approved", key="5" * 64) | {"docStatus": "final"}
    draft = previous_doc("draft", key="6" * 64)
    assert latest_previous([approved], settings, key, enc) is None
    assert latest_previous([approved, draft], settings, key, enc)["id"] == "draft"  # type: ignore[index]
    assert latest_previous([draft], settings, key, "Encounter/some-other") is None


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("DocumentReference/12/_history/1", "DocumentReference/12"),
        ("http://ehr.example/fhir/Provenance/cb-1/_history/2", "Provenance/cb-1"),
        ("https://ehr.example/fhir/Device/7", "Device/7"),
    ],
)
def test_reference_from_location_strips_base_and_version(location: str, expected: str) -> None:
    assert reference_from_location(location) == expected


# -- write_summary against an in-memory FHIR store -------------------------------------------------------


class FakeFhirStore:
    """A tiny FHIR store with R4 transaction semantics: conditional create, If-Match, urn:uuid rewriting.

    `conflict_after_commit` makes the next transaction commit and then answer 412, as a retried request
    whose first attempt committed would.
    """

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, dict[str, Any]]] = {}
        self.transactions: list[dict[str, Any]] = []
        self.searches: list[tuple[str, dict[str, str]]] = []
        self.conflict_after_commit = False
        self._ids = itertools.count(1)

    # -- reads
    def all(self, rtype: str) -> list[dict[str, Any]]:
        return list(self.resources.get(rtype, {}).values())

    async def search_all(
        self, resource_type: str, params: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        params = dict(params or {})
        self.searches.append((resource_type, params))
        return [copy.deepcopy(r) for r in self.all(resource_type) if self._matches(r, params)]

    @staticmethod
    def _matches(resource: dict[str, Any], params: Mapping[str, str]) -> bool:
        for name, value in params.items():
            if name == "identifier":
                system, _, val = value.partition("|")
                idents = resource.get("identifier") or []
                if not any(i.get("system") == system and (not val or i.get("value") == val) for i in idents):
                    return False
            elif name == "subject":
                if (resource.get("subject") or {}).get("reference") != value:
                    return False
            elif name == "status":
                if resource.get("status") != value:
                    return False
            else:
                raise AssertionError(f"unexpected search parameter {name}")
        return True

    # -- writes
    def _store(self, resource: dict[str, Any]) -> str:
        bucket = self.resources.setdefault(resource["resourceType"], {})
        old = bucket.get(resource["id"])
        version = int(old["meta"]["versionId"]) + 1 if old else 1
        resource["meta"] = {**(resource.get("meta") or {}), "versionId": str(version)}
        bucket[resource["id"]] = resource
        return f"{resource['resourceType']}/{resource['id']}/_history/{version}"

    def seed(self, resource: dict[str, Any]) -> dict[str, Any]:
        self._store(resource)
        return resource

    async def transaction(self, bundle: dict[str, Any], *, idempotent: bool = False) -> dict[str, Any]:
        assert idempotent, "the writer's transaction is safe to retry and must say so"
        self.transactions.append(copy.deepcopy(bundle))
        snapshot = copy.deepcopy(self.resources)
        try:
            response = self._apply(copy.deepcopy(bundle))
        except FhirConflict:
            self.resources = snapshot
            raise
        if self.conflict_after_commit:
            self.conflict_after_commit = False
            raise FhirConflict("412 PUT DocumentReference", status=412)
        return response

    def _apply(self, bundle: dict[str, Any]) -> dict[str, Any]:
        mapping: dict[str, str] = {}
        plan: list[tuple[dict[str, Any], str | None]] = []
        for entry in bundle["entry"]:
            request, resource = entry["request"], entry["resource"]
            existing = None
            if request["method"] == "POST":
                if "ifNoneExist" in request:
                    name, _, value = request["ifNoneExist"].partition("=")
                    found = [r for r in self.all(resource["resourceType"]) if self._matches(r, {name: value})]
                    existing = found[0]["id"] if found else None
                resource["id"] = existing or f"id{next(self._ids)}"
            mapping[entry.get("fullUrl", "")] = f"{resource['resourceType']}/{resource['id']}"
            plan.append((entry, existing))
        out = []
        for entry, existing in plan:
            resource, request = entry["resource"], entry["request"]
            text = json.dumps(resource)
            for urn, ref in mapping.items():
                if urn:
                    text = text.replace(f'"{urn}"', f'"{ref}"')
            resource = json.loads(text)
            if existing:
                out.append({"response": {"status": "200 OK", "location": f"{mapping[entry['fullUrl']]}"}})
                continue
            current = self.resources.get(resource["resourceType"], {}).get(resource["id"])
            if "ifMatch" in request and (
                current is None or request["ifMatch"] != f'W/"{current["meta"]["versionId"]}"'
            ):
                raise FhirConflict("412 PUT", status=412)
            location = self._store(resource)
            out.append({"response": {"status": "200 OK" if current else "201 Created", "location": location}})
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": out}


async def test_write_summary_twice_with_the_same_draft_writes_once() -> None:
    store = FakeFhirStore()
    draft = make_draft()
    first = await write_summary(store, draft, WriteOptions())
    second = await write_summary(store, draft, WriteOptions())

    assert first.created and not second.created
    assert len(store.transactions) == 1
    assert len(store.all("DocumentReference")) == 1
    assert len(store.all("Provenance")) == 1
    assert len(store.all("Device")) == 1
    assert second.document_reference == first.document_reference
    assert second.provenance == first.provenance == f"Provenance/{provenance_id(draft.idempotency_key)}"
    assert second.device == first.device
    doc = store.all("DocumentReference")[0]
    assert doc["author"] == [{"reference": first.device}]
    assert store.all("Provenance")[0]["target"] == [{"reference": first.document_reference}]


async def test_resending_the_same_transaction_creates_nothing_new() -> None:
    store = FakeFhirStore()
    bundle = build_transaction(make_draft(), WriteOptions(), previous=None)
    await store.transaction(bundle, idempotent=True)
    again = await store.transaction(bundle, idempotent=True)
    assert [len(store.all(t)) for t in ("Device", "DocumentReference", "Provenance")] == [1, 1, 1]
    assert again["entry"][1]["response"]["status"] == "200 OK"


async def test_a_changed_draft_supersedes_the_older_summary() -> None:
    store = FakeFhirStore()
    old = await write_summary(store, make_draft(), WriteOptions())
    changed = INPUTS[:-1] + [SourceRef("DocumentReference", "n1", "6")]
    new = await write_summary(store, make_draft(inputs=changed), WriteOptions())

    assert new.created and new.superseded == old.document_reference
    assert new.document_reference != old.document_reference
    docs = {f"DocumentReference/{d['id']}": d for d in store.all("DocumentReference")}
    assert docs[old.document_reference]["status"] == "superseded"
    assert docs[new.document_reference]["status"] == "current"
    assert docs[new.document_reference]["relatesTo"] == [
        {"code": "replaces", "target": {"reference": old.document_reference}}
    ]
    assert len(store.all("Device")) == 1  # same model file, same Device
    assert len(store.all("Provenance")) == 2


async def test_summaries_of_other_patients_or_other_writers_are_never_superseded() -> None:
    store = FakeFhirStore()
    other_patient = store.seed(previous_doc("other", version=None, key="5" * 64))
    other_patient["subject"] = {"reference": "Patient/p2"}
    foreign = store.seed(previous_doc("foreign", version=None, key="6" * 64))
    foreign["identifier"] = [{"system": "urn:someone-else", "value": "1"}]

    result = await write_summary(store, make_draft(), WriteOptions())

    assert result.created and result.superseded is None
    assert {d["id"]: d["status"] for d in store.all("DocumentReference")}["other"] == "current"
    assert {d["id"]: d["status"] for d in store.all("DocumentReference")}["foreign"] == "current"


async def test_a_retry_that_fails_its_if_match_after_committing_is_reported_as_already_written() -> None:
    store = FakeFhirStore()
    await write_summary(store, make_draft(), WriteOptions())
    store.conflict_after_commit = True
    changed = make_draft(inputs=INPUTS[:-1])
    result = await write_summary(store, changed, WriteOptions())

    assert not result.created
    docs = store.all("DocumentReference")
    assert len(docs) == 2
    assert [d["status"] for d in docs].count("current") == 1


async def test_a_real_conflict_is_raised_and_nothing_is_written() -> None:
    store = FakeFhirStore()
    first = await write_summary(store, make_draft(), WriteOptions())

    # Someone changes the old summary between our search and our transaction.
    class RacingStore(FakeFhirStore):
        async def transaction(self, bundle: dict[str, Any], *, idempotent: bool = False) -> dict[str, Any]:
            old = self.resources["DocumentReference"][first.document_reference.split("/")[1]]
            self._store(copy.deepcopy(old) | {"docStatus": "final"})
            return await super().transaction(bundle, idempotent=idempotent)

    racing = RacingStore()
    racing.resources = copy.deepcopy(store.resources)
    with pytest.raises(FhirConflict):
        await write_summary(racing, make_draft(inputs=INPUTS[:-1]), WriteOptions())
    assert len(racing.all("DocumentReference")) == 1
    assert racing.all("DocumentReference")[0]["docStatus"] == "final"


async def test_a_summary_written_concurrently_by_another_worker_is_not_reported_as_created() -> None:
    class LateStore(FakeFhirStore):
        """Answers the first search as if the other worker's write had not landed yet."""

        hide_next_search = False

        async def search_all(
            self, resource_type: str, params: Mapping[str, str] | None = None
        ) -> list[dict[str, Any]]:
            found = await super().search_all(resource_type, params)
            if self.hide_next_search:
                self.hide_next_search = False
                return []
            return found

    store = LateStore()
    draft = make_draft()
    first = await write_summary(store, draft, WriteOptions())
    store.hide_next_search = True
    second = await write_summary(store, draft, WriteOptions())

    assert first.created and not second.created
    assert second.document_reference == first.document_reference
    assert len(store.all("DocumentReference")) == 1
