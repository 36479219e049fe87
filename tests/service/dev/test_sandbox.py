"""The Synthea sandbox loader without a server: target discovery, placeholders, bundle handling,
and the order of calls against a fake FHIR server."""

from __future__ import annotations

import asyncio
import copy
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from structlog.testing import capture_logs

from fhir_adapters.bundle_source import read_bundle
from fhir_adapters.errors import FhirBadRequest, FhirTransportError
from service.dev.sandbox import (
    TARGET_CONCURRENCY,
    ConditionalTarget,
    LoadFailure,
    SandboxError,
    as_transaction,
    conditional_targets,
    created_id,
    display_name,
    ensure_targets,
    load_bundle,
    load_files,
    parse_conditional_reference,
    practitioner_name,
    target_resource,
    with_shared_providers,
)

SYNTHEA = Path(__file__).resolve().parents[2] / "fixtures" / "synthea"
# Synthea 3.x (conditional references to providers) and 2.4 (providers inline) samples.
SYNTHEA_3 = next(SYNTHEA.glob("Beatris270_Bogan287_*.json.gz"))
SYNTHEA_24 = next(SYNTHEA.glob("Kermit_Trantow_*.json"))


@pytest.fixture(scope="module")
def bundle_3x() -> dict[str, Any]:
    return read_bundle(SYNTHEA_3)


@pytest.fixture(scope="module")
def bundle_24() -> dict[str, Any]:
    return read_bundle(SYNTHEA_24)


def references_with_displays(node: Any) -> dict[str, set[str | None]]:
    """Independent walk: every `reference` containing '?' and the displays it appears with."""
    found: dict[str, set[str | None]] = defaultdict(set)

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            ref = value.get("reference")
            if isinstance(ref, str) and "?" in ref:
                found[ref].add(value.get("display"))
            for child in value.values():
                walk(child)
        elif isinstance(value, list):
            for child in value:
                walk(child)

    walk(node)
    return found


def count_of(bundle: dict[str, Any], resource_type: str) -> int:
    return sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type)


# --- conditional_targets ------------------------------------------------------------------------


def test_conditional_targets_cover_every_conditional_reference_once(bundle_3x: dict[str, Any]) -> None:
    references = references_with_displays(bundle_3x["entry"])
    targets = conditional_targets(bundle_3x)

    assert references, "the 3.x fixture is expected to use conditional references"
    as_references = {f"{t.resource_type}?identifier={t.system}|{t.value}" for t in targets}
    assert as_references == set(references)
    assert len(targets) == len(as_references)
    assert {t.resource_type for t in targets} == {"Practitioner", "Organization", "Location"}


def test_conditional_targets_take_a_display_even_when_some_references_lack_one(
    bundle_3x: dict[str, Any],
) -> None:
    references = references_with_displays(bundle_3x["entry"])
    partly_displayed = [r for r, displays in references.items() if None in displays and len(displays) > 1]
    assert partly_displayed, "Synthea omits the display on some practitioner references"

    by_reference = {
        f"{t.resource_type}?identifier={t.system}|{t.value}": t for t in conditional_targets(bundle_3x)
    }
    for reference in partly_displayed:
        assert by_reference[reference].display in references[reference] - {None}


def test_conditional_targets_prefer_the_most_frequent_display() -> None:
    ref = "Organization?identifier=urn:x|1"
    bundle = {
        "entry": [
            {"resource": {"a": {"reference": ref, "display": "Rare"}}},
            {
                "resource": {
                    "b": [{"reference": ref, "display": "Common"}, {"reference": ref, "display": "Common"}]
                }
            },
            {"resource": {"c": {"reference": ref}}},
        ]
    }
    assert conditional_targets(bundle) == [ConditionalTarget("Organization", "urn:x", "1", "Common")]


def test_a_synthea_24_bundle_has_no_conditional_targets(bundle_24: dict[str, Any]) -> None:
    assert conditional_targets(bundle_24) == []


@pytest.mark.parametrize(
    "reference",
    ["Practitioner?name=Smith", "Practitioner?identifier=9999", "Practitioner?identifier=|9", "urn:uuid:abc"],
)
def test_references_that_are_not_type_identifier_system_value_are_not_targets(reference: str) -> None:
    assert parse_conditional_reference(reference) is None
    assert conditional_targets({"entry": [{"resource": {"x": {"reference": reference}}}]}) == []


# --- target_resource ----------------------------------------------------------------------------


def test_every_placeholder_for_a_real_fixture_is_valid_and_carries_its_identifier(
    bundle_3x: dict[str, Any],
) -> None:
    for target in conditional_targets(bundle_3x):
        resource = target_resource(target)
        # the same structural check a strict server applies on the way in
        get_fhir_model_class(target.resource_type).model_validate(resource)
        assert resource["resourceType"] == target.resource_type
        assert resource["identifier"] == [{"system": target.system, "value": target.value}]
        assert target.display is not None
        if target.resource_type == "Practitioner":
            assert resource["name"][0]["text"] == target.display
        else:
            assert resource["name"] == target.display


def test_practitioner_name_splits_prefix_given_and_family() -> None:
    name = practitioner_name("Dr. Elisa944 Rojo930")
    assert name == {
        "text": "Dr. Elisa944 Rojo930",
        "prefix": ["Dr."],
        "given": ["Elisa944"],
        "family": "Rojo930",
    }


def test_a_placeholder_without_display_has_no_name() -> None:
    resource = target_resource(ConditionalTarget("Practitioner", "http://hl7.org/fhir/sid/us-npi", "1", None))
    assert "name" not in resource
    get_fhir_model_class("Practitioner").model_validate(resource)


def test_no_placeholder_is_made_for_a_type_with_required_content() -> None:
    with pytest.raises(ValueError, match="Encounter"):
        target_resource(ConditionalTarget("Encounter", "urn:x", "1", None))


def test_target_criteria_escape_search_specials_and_encode_for_a_query() -> None:
    target = ConditionalTarget("Organization", "urn:x", "a,b&c", None)
    assert target.criteria == "identifier=urn:x|a%5C%2Cb%26c"
    assert target.search_value == "urn:x|a\\,b&c"


# --- bundle types and shared providers ----------------------------------------------------------


def test_a_collection_becomes_a_transaction_of_posts_keeping_full_urls(bundle_3x: dict[str, Any]) -> None:
    collection = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": e["fullUrl"], "resource": e["resource"]} for e in bundle_3x["entry"]],
    }
    transaction = as_transaction(collection, "c.json")
    assert transaction["type"] == "transaction"
    assert [e["fullUrl"] for e in transaction["entry"]] == [e["fullUrl"] for e in bundle_3x["entry"]]
    assert all(
        e["request"] == {"method": "POST", "url": e["resource"]["resourceType"]} for e in transaction["entry"]
    )


def test_a_batch_is_loaded_as_one_transaction(bundle_24: dict[str, Any]) -> None:
    batch = {**bundle_24, "type": "batch"}
    assert as_transaction(batch, "b.json")["type"] == "transaction"
    assert as_transaction(batch, "b.json")["entry"] == bundle_24["entry"]


@pytest.mark.parametrize("bundle_type", ["document", "searchset", None])
def test_other_bundle_types_are_refused_naming_the_file(bundle_type: str | None) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": bundle_type,
        "entry": [{"resource": {"resourceType": "Patient"}}],
    }
    with pytest.raises(SandboxError, match=r"f\.json: Bundle\.type"):
        as_transaction(bundle, "f.json")


def test_a_transaction_entry_without_request_is_refused_naming_it() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": {"resourceType": "Patient"}}],
    }
    with pytest.raises(SandboxError, match=r"entry\[0\]"):
        as_transaction(bundle, "f.json")


def test_inline_providers_become_conditional_creates_without_touching_the_input(
    bundle_24: dict[str, Any],
) -> None:
    original = copy.deepcopy(bundle_24)
    shared = with_shared_providers(bundle_24)

    assert bundle_24 == original
    providers = [
        e for e in shared["entry"] if e["resource"]["resourceType"] in ("Practitioner", "Organization")
    ]
    assert providers
    for entry in providers:
        identifier = entry["resource"]["identifier"][0]
        assert entry["request"]["ifNoneExist"] == f"identifier={identifier['system']}|{identifier['value']}"
    others = [e for e in shared["entry"] if e not in providers]
    assert all("ifNoneExist" not in e["request"] for e in others)


def test_a_provider_identifier_used_twice_in_one_bundle_stays_a_plain_post() -> None:
    org = {"resourceType": "Organization", "identifier": [{"system": "urn:x", "value": "1"}]}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": org, "request": {"method": "POST", "url": "Organization"}} for _ in range(2)],
    }
    assert all("ifNoneExist" not in e["request"] for e in with_shared_providers(bundle)["entry"])


# --- results ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        {"response": {"status": "201 Created", "location": "Patient/p-1/_history/1"}},
        {"response": {"status": "201", "location": "http://h:8080/fhir/Patient/p-1/_history/1"}},
        {"resource": {"resourceType": "Patient", "id": "p-1"}, "response": {"status": "201"}},
    ],
)
def test_the_patient_id_is_found_in_any_transaction_response_shape(entry: dict[str, Any]) -> None:
    response = {"resourceType": "Bundle", "type": "transaction-response", "entry": [{"response": {}}, entry]}
    assert created_id(response, 1, "Patient") == "p-1"


def test_display_name_prefers_the_official_name(bundle_3x: dict[str, Any]) -> None:
    patient = next(e["resource"] for e in bundle_3x["entry"] if e["resource"]["resourceType"] == "Patient")
    official = next(n for n in patient["name"] if n.get("use") == "official")
    assert display_name(patient) == " ".join([*official["given"], official["family"]])


# --- against a fake server ----------------------------------------------------------------------


class FakeFhirServer:
    """Conditional create by criteria, transactions answered HAPI-style (relative locations)."""

    def __init__(self, *, reject_transaction: Exception | None = None) -> None:
        self.by_criteria: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.transactions: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.reject_transaction = reject_transaction

    async def create(self, resource: dict[str, Any], *, if_none_exist: str | None = None) -> dict[str, Any]:
        self.calls.append(f"create {resource['resourceType']} {if_none_exist}")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0)  # let other creates start, so concurrency is observable
        self.in_flight -= 1
        rtype = resource["resourceType"]
        key = f"{rtype}?{if_none_exist}" if if_none_exist else f"{rtype}#{len(self.calls)}"
        if key not in self.by_criteria:
            self.by_criteria[key] = {**resource, "id": f"{rtype.lower()}-{len(self.by_criteria)}"}
        return self.by_criteria[key]

    async def transaction(self, bundle: dict[str, Any], *, idempotent: bool = False) -> dict[str, Any]:
        self.calls.append("transaction")
        if self.reject_transaction is not None:
            raise self.reject_transaction
        self.transactions.append(bundle)
        entries = [
            {
                "response": {
                    "status": "201 Created",
                    "location": f"{e['resource']['resourceType']}/{i}/_history/1",
                }
            }
            for i, e in enumerate(bundle["entry"])
        ]
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}


async def test_load_bundle_creates_every_target_conditionally_before_the_transaction(
    bundle_3x: dict[str, Any],
) -> None:
    server = FakeFhirServer()
    targets = conditional_targets(bundle_3x)

    loaded = await load_bundle(server, bundle_3x, source_file=SYNTHEA_3.name)

    assert server.calls[-1] == "transaction"
    assert sorted(server.calls[:-1]) == sorted(f"create {t.resource_type} {t.criteria}" for t in targets)
    patient_index = next(
        i for i, e in enumerate(bundle_3x["entry"]) if e["resource"]["resourceType"] == "Patient"
    )
    assert loaded.id == str(patient_index)
    assert loaded.resources == len(bundle_3x["entry"])
    assert loaded.source_file == SYNTHEA_3.name
    assert loaded.name == display_name(bundle_3x["entry"][patient_index]["resource"])
    # the bundle goes to the server as Synthea wrote it: references stay conditional for it to resolve
    assert server.transactions[0]["entry"] == bundle_3x["entry"]


async def test_targets_are_created_at_most_eight_at_a_time() -> None:
    server = FakeFhirServer()
    targets = [ConditionalTarget("Organization", "urn:x", str(i), f"Org {i}") for i in range(30)]

    ids = await ensure_targets(server, targets)

    assert len(set(ids.values())) == 30
    assert 1 < server.max_in_flight <= TARGET_CONCURRENCY


async def test_ensuring_targets_twice_returns_the_same_resources() -> None:
    server = FakeFhirServer()
    targets = [
        ConditionalTarget("Practitioner", "http://hl7.org/fhir/sid/us-npi", str(i), None) for i in range(5)
    ]

    assert await ensure_targets(server, targets) == await ensure_targets(server, targets)
    assert len(server.by_criteria) == 5


async def test_load_bundle_refuses_conditional_references_it_cannot_satisfy() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "link": [{"other": {"reference": "Patient?identifier=urn:x|1"}}],
                },
                "request": {"method": "POST", "url": "Patient"},
            }
        ],
    }
    server = FakeFhirServer()
    with pytest.raises(SandboxError, match="Patient"):
        await load_bundle(server, bundle, source_file="x.json")
    assert server.calls == []


async def test_load_bundle_logs_counts_and_ids_but_no_name(bundle_3x: dict[str, Any]) -> None:
    with capture_logs() as logs:
        loaded = await load_bundle(FakeFhirServer(), bundle_3x, source_file=SYNTHEA_3.name)
    text = json.dumps(logs)
    assert any(entry.get("patient_id") == loaded.id for entry in logs)
    for given in loaded.name.split():
        assert given not in text
    assert SYNTHEA_3.name not in text


async def test_load_files_skips_and_reports_a_bad_file_and_loads_the_rest(tmp_path: Path) -> None:
    bad = tmp_path / "Somebody_Name_1.json"
    bad.write_text('{"resourceType": "Patient"}')
    failures: list[LoadFailure] = []

    with capture_logs() as logs:
        loaded = await load_files(FakeFhirServer(), [SYNTHEA_24, bad, SYNTHEA_3], failures=failures)

    assert [p.source_file for p in loaded] == [SYNTHEA_24.name, SYNTHEA_3.name]
    assert [f.source_file for f in failures] == [bad.name]
    assert "not a FHIR Bundle" in failures[0].reason
    assert "Somebody_Name" not in json.dumps(logs)


async def test_load_files_reports_a_bundle_the_server_rejects(tmp_path: Path) -> None:
    failures: list[LoadFailure] = []
    rejection = FhirBadRequest("FHIR server answered 400 to POST http://h/fhir", status=400)

    loaded = await load_files(FakeFhirServer(reject_transaction=rejection), [SYNTHEA_24], failures=failures)

    assert loaded == []
    assert failures and failures[0].source_file == SYNTHEA_24.name and "400" in failures[0].reason


async def test_load_files_stops_when_the_server_is_unreachable() -> None:
    server = FakeFhirServer(reject_transaction=FhirTransportError("unreachable"))
    with pytest.raises(FhirTransportError):
        await load_files(server, [SYNTHEA_24, SYNTHEA_3])
    assert server.calls.count("transaction") == 1
