"""Loading the Synthea fixtures into a real FHIR R4 server (local sekmet, or CHARTBRIEF_TEST_FHIR_BASE)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_adapters.bundle_source import read_bundle
from fhir_adapters.client import FhirClient
from service.dev.devserver import (
    LOAD_TIMEOUT_SECONDS,
    LocalFhirServer,
    LocalFhirServerError,
    synthea_files,
)
from service.dev.sandbox import (
    LoadedPatient,
    as_transaction,
    conditional_targets,
    display_name,
    ensure_targets,
    with_shared_providers,
)
from tests.integration.conftest import EXTERNAL_BASE_ENV

pytestmark = pytest.mark.integration

FIXTURES = synthea_files()
SYNTHEA_3X = [p for p in FIXTURES if conditional_targets(read_bundle(p))]
SYNTHEA_24 = [p for p in FIXTURES if p not in SYNTHEA_3X]


def short_id(path: Path) -> str:
    # The uuid tail of the file name: test ids then carry no patient name.
    return path.name.split("_")[-1].split(".")[0][:8]


def of_type(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


@pytest.fixture
async def client(fhir_base: str) -> AsyncIterator[FhirClient]:
    async with FhirClient(fhir_base, timeout=LOAD_TIMEOUT_SECONDS) as fhir:
        yield fhir


def test_fixtures_include_both_synthea_generations() -> None:
    assert SYNTHEA_3X, "no Synthea 3.x fixture (conditional references) found"
    assert SYNTHEA_24, "no Synthea 2.4 fixture (inline providers) found"


def test_every_fixture_loaded(loaded_patients: dict[str, LoadedPatient]) -> None:
    assert sorted(loaded_patients) == [p.name for p in FIXTURES]


@pytest.mark.parametrize("path", FIXTURES, ids=short_id)
async def test_loaded_patient_is_readable_with_all_its_encounters(
    path: Path, loaded_patients: dict[str, LoadedPatient], client: FhirClient
) -> None:
    bundle = read_bundle(path)
    loaded = loaded_patients[path.name]

    patient = await client.read("Patient", loaded.id)
    encounters = await client.search_all("Encounter", {"patient": loaded.id})

    assert display_name(patient) == display_name(of_type(bundle, "Patient")[0]) == loaded.name
    assert loaded.resources == len(bundle["entry"])
    assert len(encounters) == len(of_type(bundle, "Encounter"))


@pytest.mark.parametrize("path", SYNTHEA_3X, ids=short_id)
async def test_creating_a_fixtures_targets_twice_makes_no_duplicate(path: Path, client: FhirClient) -> None:
    targets = conditional_targets(read_bundle(path))

    first = await ensure_targets(client, targets)
    second = await ensure_targets(client, targets)

    assert first == second
    for target in targets:
        matches = await client.search_all(target.resource_type, {"identifier": target.search_value})
        assert [m["id"] for m in matches] == [first[target]], target.resource_type


@pytest.mark.parametrize("path", SYNTHEA_3X, ids=short_id)
async def test_conditional_references_point_at_the_placeholders_after_loading(
    path: Path, loaded_patients: dict[str, LoadedPatient], client: FhirClient
) -> None:
    targets = conditional_targets(read_bundle(path))
    placeholders = await ensure_targets(client, targets)
    practitioners = {f"Practitioner/{placeholders[t]}" for t in targets if t.resource_type == "Practitioner"}
    encounters = await client.search_all("Encounter", {"patient": loaded_patients[path.name].id})

    referenced = {
        # Type/id, whether the server answers with relative or absolute references
        "/".join(p["individual"]["reference"].split("/")[-2:])
        for e in encounters
        for p in e.get("participant") or []
        if "individual" in p
    }
    assert referenced
    assert referenced <= practitioners


@pytest.mark.parametrize("path", SYNTHEA_24, ids=short_id)
async def test_inline_providers_are_reused_not_duplicated_on_a_second_load(
    path: Path, loaded_patients: dict[str, LoadedPatient], client: FhirClient
) -> None:
    assert loaded_patients[path.name]
    shared = with_shared_providers(as_transaction(read_bundle(path), path.name))
    providers = [e for e in shared["entry"] if "ifNoneExist" in e["request"]]
    assert providers

    # Post only the providers again (no patient): each must resolve to the copy already there.
    response = await client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": providers})

    assert [e["response"]["status"].split()[0] for e in response["entry"]] == ["200"] * len(providers)
    for entry in providers:
        resource = entry["resource"]
        identifier = resource["identifier"][0]
        criteria = {"identifier": f"{identifier['system']}|{identifier['value']}"}
        assert len(await client.search_all(resource["resourceType"], criteria)) == 1, resource["resourceType"]


# --- the local server harness -------------------------------------------------------------------


def test_a_missing_local_server_says_how_to_install_it(tmp_path: Path) -> None:
    server = LocalFhirServer(executable=tmp_path / "no-such-sekmet")
    with pytest.raises(LocalFhirServerError, match="make test"):
        server.start()


def test_a_server_that_dies_at_start_is_reported_with_its_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "sekmet"
    fake.write_text("#!/bin/sh\necho 'address already in use' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = LocalFhirServer(executable=fake, startup_timeout=20)

    with pytest.raises(LocalFhirServerError, match="status 3") as error:
        server.start()

    assert "address already in use" in str(error.value)
    assert server.log_path is None  # its temp folder is gone


@pytest.mark.skipif(
    bool(os.environ.get(EXTERNAL_BASE_ENV, "").strip()),
    reason=f"{EXTERNAL_BASE_ENV} names the server under test",
)
def test_a_local_server_answers_metadata_while_running_and_is_gone_after_stop() -> None:
    with LocalFhirServer() as server:
        base = server.base_url
        assert httpx.get(f"{base}/metadata", timeout=10).json()["fhirVersion"].startswith("4.0")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/metadata", timeout=2)
