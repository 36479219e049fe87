"""Bulk Data $export end to end against a real FHIR server that serves it (local sekmet by default)."""

from __future__ import annotations

from collections import Counter
from contextlib import aclosing
from typing import Any

import pytest

from fhir_adapters.bulk.export import export_resources, wait_for_manifest
from fhir_adapters.bulk.manifest import BulkExportError, ExportReport
from fhir_adapters.client import FhirClient
from service.dev.sandbox import LoadedPatient

pytestmark = pytest.mark.integration

# Small waits: sekmet's jobs take about a second and answer 202 with Retry-After: 1 meanwhile.
POLLING: dict[str, Any] = {"min_poll": 0.2, "max_poll": 2.0, "max_wait_seconds": 120.0}
TYPES = ("Patient", "Condition")


async def run_export(
    client: FhirClient, *, since: str | None = None
) -> tuple[list[dict[str, Any]], ExportReport]:
    """Every exported resource (the fixture set is small enough to hold in a test) and the run's report."""
    report = ExportReport()
    resources: list[dict[str, Any]] = []
    stream = export_resources(client, types=TYPES, since=since, report=report, **POLLING)
    async with aclosing(stream):
        async for _, resource in stream:
            resources.append(resource)
    return resources, report


def subject_id(resource: dict[str, Any]) -> str:
    return str(resource.get("subject", {}).get("reference", "")).rsplit("/", 1)[-1]


async def test_a_patient_level_export_holds_every_loaded_patient_and_as_many_conditions_as_a_search(
    fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    async with FhirClient(fhir_base) as client:
        resources, report = await run_export(client)

        patient_ids = {r["id"] for r in resources if r["resourceType"] == "Patient"}
        assert {p.id for p in loaded_patients.values()} <= patient_ids
        exported = Counter(subject_id(r) for r in resources if r["resourceType"] == "Condition")
        for patient in loaded_patients.values():
            searched = await client.search_all("Condition", {"patient": patient.id})
            assert exported[patient.id] == len(searched), patient.source_file
        assert sum(exported.values()) > 0

        assert report.manifest is not None
        assert {f.type for f in report.manifest.output} == set(TYPES)
        for export_file in report.manifest.output:
            if export_file.count is not None:
                assert report.resources_by_type[export_file.type] == export_file.count
        assert report.malformed_lines == 0
        assert report.transaction_time

        # The job was deleted: its status URL is gone.
        assert report.deleted is True
        assert report.status_url is not None
        with pytest.raises(BulkExportError, match=report.status_url):
            await wait_for_manifest(client, report.status_url, **POLLING)


async def test_an_export_since_the_last_transaction_time_holds_exactly_what_changed(
    fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    async with FhirClient(fhir_base) as client:
        _, first = await run_export(client)
        assert first.transaction_time is not None

        unchanged, second = await run_export(client, since=first.transaction_time)
        assert unchanged == []
        assert second.transaction_time is not None

        patient = next(p for p in loaded_patients.values() if p.resources > 0)
        condition = (await client.search_all("Condition", {"patient": patient.id}, limit=1))[0]
        updated = await client.update(condition)
        assert updated["meta"]["versionId"] != condition["meta"]["versionId"]

        changed, _ = await run_export(client, since=second.transaction_time)
        assert [(r["resourceType"], r["id"], r["meta"]["versionId"]) for r in changed] == [
            ("Condition", condition["id"], updated["meta"]["versionId"])
        ]


async def test_a_group_level_export_holds_only_the_group_members(
    fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    members = sorted(p.id for p in loaded_patients.values())[:2]
    async with FhirClient(fhir_base) as client:
        group = await client.create(
            {
                "resourceType": "Group",
                "type": "person",
                "actual": True,
                "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in members],
            }
        )
        report = ExportReport()
        stream = export_resources(client, group_id=group["id"], types=TYPES, report=report, **POLLING)
        async with aclosing(stream):
            exported = [resource async for _, resource in stream]

    assert sorted(r["id"] for r in exported if r["resourceType"] == "Patient") == members
    assert {subject_id(r) for r in exported if r["resourceType"] == "Condition"} <= set(members)
    assert report.resources_by_type.get("Condition", 0) > 0
