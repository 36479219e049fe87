"""Choosing a run's patients (FHIR mocked at the transport): ids files, Groups, changed since the
server-clock watermark, carried-over failures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from service.batch.connect import open_fhir
from service.batch.request import BatchRequest
from service.batch.selection import parse_patient_ids, patient_of, select_patients, since_with_overlap
from service.config import Settings
from service.db.batch import DONE, FAILED, BatchRepository, ItemOutcome
from tests.service.batch.conftest import BASE

SERVER_DATE = "Tue, 02 Jan 2024 03:04:05 GMT"
AI_SYSTEM = "urn:chartbrief:summary"


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def cond(pid: str, rid: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": f"Patient/{pid}"}}


def fhir_server(router: respx.MockRouter, by_type: dict[str, list[dict[str, Any]]]) -> list[httpx.Request]:
    """A FHIR server answering metadata (with its Date) and searches from `by_type`; returns the requests."""
    seen: list[httpx.Request] = []
    headers = {"Date": SERVER_DATE, "Content-Type": "application/fhir+json"}

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        resource_type = request.url.path.rsplit("/", 1)[-1]
        if resource_type == "metadata":
            return httpx.Response(200, json={"resourceType": "CapabilityStatement"}, headers=headers)
        return httpx.Response(200, json=searchset(by_type.get(resource_type, [])), headers=headers)

    router.get(url__startswith=BASE).mock(side_effect=answer)
    return seen


def finished_run(
    repo: BatchRepository, *, watermark: str, failed: Sequence[str] = (), label: str = "changed"
) -> int:
    run_id = repo.create_run(
        fhir_base=BASE, mode="local", selection=label, patient_ids=["x", *failed], watermark=watermark
    )
    repo.start_item(run_id, "x", "w")
    repo.finish_item(run_id, "x", ItemOutcome(state=DONE))
    for pid in failed:
        repo.set_state(run_id, pid, FAILED, error="FhirServerError: 503")
    assert repo.finish_run_if_done(run_id)
    return run_id


# -- selection ----------------------------------------------------------------------------------------


def test_patient_file_ids_skip_comments_duplicates_and_name_bad_lines() -> None:
    ids, problems = parse_patient_ids("p1\n  p2  # ward 3\n\nPatient/p3\np1\nbad id\n", "night.txt")
    assert ids == ["p1", "p2", "p3"]
    assert problems == ["night.txt line 6: 'bad id' is not a FHIR id"]


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"resourceType": "Patient", "id": "p9"}, "p9"),
        ({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/a"}}, "a"),
        ({"resourceType": "Observation", "subject": {"reference": f"{BASE}/Patient/b/_history/2"}}, "b"),
        ({"resourceType": "Observation", "subject": {"reference": "Group/g"}}, None),
        ({"resourceType": "Observation"}, None),
    ],
)
def test_patient_of_reads_the_patient_a_resource_is_about(
    resource: dict[str, Any], expected: str | None
) -> None:
    assert patient_of(resource) == expected


async def test_first_run_selects_everyone_and_takes_the_servers_date_as_watermark(
    settings: Settings, repo: BatchRepository
) -> None:
    with respx.mock(assert_all_called=False) as router:
        seen = fhir_server(router, {"Patient": [{"resourceType": "Patient", "id": i} for i in ("a", "b")]})
        async with open_fhir(settings) as conn:
            selection = await select_patients(conn, repo, settings, BatchRequest())
    assert selection.patient_ids == ["a", "b"]
    assert selection.since is None
    # The server's clock, not this machine's.
    assert selection.watermark == "2024-01-02T03:04:05Z"
    assert [r.url.path.rsplit("/", 1)[-1] for r in seen] == ["metadata", "Patient"]


async def test_next_run_selects_patients_changed_since_the_watermark_but_not_for_our_own_summaries(
    settings: Settings, repo: BatchRepository
) -> None:
    finished_run(repo, watermark="2024-01-01T00:00:00Z")
    ours = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "identifier": [{"system": AI_SYSTEM, "value": "k"}],
        "subject": {"reference": "Patient/summarized-last-night"},
    }
    note = {"resourceType": "DocumentReference", "id": "d2", "subject": {"reference": "Patient/c"}}
    with respx.mock(assert_all_called=False) as router:
        seen = fhir_server(
            router,
            {
                "Condition": [cond("a", "1"), cond("b", "2"), cond("a", "3")],
                "DocumentReference": [ours, note],
                "AllergyIntolerance": [
                    {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/d"}}
                ],
            },
        )
        async with open_fhir(settings) as conn:
            selection = await select_patients(conn, repo, settings, BatchRequest())
    assert selection.patient_ids == ["c", "a", "b", "d"]  # search order: Encounter, DocumentReference, ...
    # The watermark moved back by the overlap (a second-precision clock; `gt` skips that whole second).
    since = since_with_overlap("2024-01-01T00:00:00Z", settings.batch.watermark_overlap_seconds)
    assert selection.since == since
    searched = [r for r in seen if not r.url.path.endswith("metadata")]
    assert {r.url.path.rsplit("/", 1)[-1] for r in searched} == set(settings.batch.change_types)
    assert all(r.url.params["_lastUpdated"] == f"gt{since}" for r in searched)


async def test_a_server_refusing_elements_is_searched_again_without(
    settings: Settings, repo: BatchRepository
) -> None:
    finished_run(repo, watermark="2024-01-01T00:00:00Z")
    settings = settings.model_copy(
        update={"batch": settings.batch.model_copy(update={"change_types": ["Condition"]})}
    )
    calls: list[dict[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("metadata"):
            return httpx.Response(
                200, json={"resourceType": "CapabilityStatement"}, headers={"Date": SERVER_DATE}
            )
        calls.append(dict(request.url.params))
        if "_elements" in request.url.params:
            return httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": []})
        return httpx.Response(200, json=searchset([cond("a", "1")]))

    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=BASE).mock(side_effect=answer)
        async with open_fhir(settings) as conn:
            selection = await select_patients(conn, repo, settings, BatchRequest())
    assert selection.patient_ids == ["a"]
    assert ["_elements" in c for c in calls] == [True, False]


async def test_patients_that_failed_last_run_are_carried_over_and_overlap_moves_since_back(
    settings: Settings, repo: BatchRepository
) -> None:
    finished_run(repo, watermark="2024-01-01T00:10:00Z", failed=["broken"])
    settings = settings.model_copy(
        update={"batch": settings.batch.model_copy(update={"watermark_overlap_seconds": 600})}
    )
    with respx.mock(assert_all_called=False) as router:
        fhir_server(router, {"Condition": [cond("a", "1")]})
        async with open_fhir(settings) as conn:
            selection = await select_patients(conn, repo, settings, BatchRequest())
    assert selection.patient_ids == ["a", "broken"]
    assert selection.carried_over == 1
    assert selection.since == "2024-01-01T00:00:00Z"


async def test_group_and_file_runs_neither_use_nor_move_the_changed_watermark(
    settings: Settings, repo: BatchRepository, tmp_path: Path
) -> None:
    finished_run(repo, watermark="2024-01-01T00:00:00Z", label="group:g1")
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("p1\n")
    group = {"resourceType": "Group", "id": "g1", "member": [{"entity": {"reference": "Patient/m1"}}]}
    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/Group/g1").mock(return_value=httpx.Response(200, json=group))
        fhir_server(router, {"Patient": [{"resourceType": "Patient", "id": "all"}]})
        async with open_fhir(settings) as conn:
            by_group = await select_patients(conn, repo, settings, BatchRequest(group_id="g1"))
            by_file = await select_patients(conn, repo, settings, BatchRequest(patients_file=ids_file))
            changed = await select_patients(conn, repo, settings, BatchRequest())
    assert (by_group.label, by_group.patient_ids) == ("group:g1", ["m1"])
    assert (by_file.label, by_file.patient_ids) == ("file:ids.txt", ["p1"])
    # No earlier "changed" run: the group run's watermark is not used, everyone is selected.
    assert (changed.since, changed.patient_ids) == (None, ["all"])
