"""Who a batch run summarizes, and the watermark the next incremental run starts from.

A file of ids, a Group's members, or by default everyone changed since the last finished run of the
same kind (`_lastUpdated=gt<watermark>` over `batch.change_types`; the first run takes every
Patient). The watermark is the FHIR server's own time (its `Date` header) at the start of a run,
never this machine's clock. With Bulk Data, a `$export` with `_since` = the last run's
`transactionTime` names the changed patients instead. Patients that failed last time are carried
over, so none is silently dropped.

What it must not do: hold a population's records (only patient ids are kept), count chartbrief's
own summaries as a change, or log PHI (ids and counts only).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from fhir_adapters.auth.scopes import SEARCHED_TYPES
from fhir_adapters.bulk.export import export_resources
from fhir_adapters.bulk.manifest import ExportReport
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirBadRequest
from service.batch.connect import FhirConnection
from service.batch.request import FHIR_ID, BatchError, BatchRequest
from service.config import Settings
from service.db.batch import FAILED, BatchRepository, process_name
from service.safety import is_ai_asserted

log = structlog.get_logger(__name__)

_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
MAX_REPORTED_PROBLEMS = 50


# ---------------------------------------------------------------------------------------------------
# Pure: selection input
# ---------------------------------------------------------------------------------------------------


def parse_patient_ids(text: str, source: str = "patients file") -> tuple[list[str], list[str]]:
    """Patient ids from a file: one per line, `Patient/<id>` accepted, blank lines and `#` comments
    ignored, duplicates kept once. A bad line is skipped and named in the problems.

    >>> parse_patient_ids("a1\\n# night shift\\nPatient/b-2\\n\\na1\\nnot an id!\\n")
    (['a1', 'b-2'], ["patients file line 6: 'not an id!' is not a FHIR id"])
    """
    ids: list[str] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        value = line.removeprefix("Patient/")
        if not FHIR_ID.fullmatch(value):
            problems.append(f"{source} line {number}: {line[:70]!r} is not a FHIR id")
            continue
        ids.append(value)
    return list(dict.fromkeys(ids)), problems


def group_member_ids(group: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The active Patient members of a Group; other members are skipped and named.

    >>> group_member_ids({"id": "g", "member": [{"entity": {"reference": "Patient/1"}},
    ...     {"entity": {"reference": "Practitioner/2"}}, {"entity": {"reference": "Patient/3"},
    ...     "inactive": True}]})
    (['1'], ['Group/g member[1]: Practitioner/2 is not a Patient', 'Group/g member[2]: inactive'])
    """
    ids: list[str] = []
    problems: list[str] = []
    where = f"Group/{group.get('id', '?')}"
    for index, member in enumerate(group.get("member") or []):
        entity = member.get("entity") if isinstance(member, dict) else None
        reference = entity.get("reference") if isinstance(entity, dict) else None
        if not isinstance(reference, str):
            problems.append(f"{where} member[{index}]: no entity.reference")
            continue
        if member.get("inactive") is True:
            problems.append(f"{where} member[{index}]: inactive")
            continue
        patient = patient_id_of_reference(reference)
        if patient is None:
            problems.append(f"{where} member[{index}]: {reference[:80]} is not a Patient")
            continue
        ids.append(patient)
    return list(dict.fromkeys(ids)), problems


def patient_id_of_reference(reference: str) -> str | None:
    """The id in a Patient reference, relative, absolute or versioned.

    >>> [patient_id_of_reference(r) for r in ("Patient/1", "http://h/fhir/Patient/a-2/_history/3",
    ...     "Group/1", "urn:uuid:x")]
    ['1', 'a-2', None, None]
    """
    match = _PATIENT_REF.search(reference.strip())
    return match.group(1) if match else None


def patient_of(resource: dict[str, Any]) -> str | None:
    """The patient a resource is about: a Patient's own id, else its subject or patient reference."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and FHIR_ID.fullmatch(rid) else None
    for element in ("subject", "patient"):
        target = resource.get(element)
        reference = target.get("reference") if isinstance(target, dict) else None
        if isinstance(reference, str):
            found = patient_id_of_reference(reference)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------------------
# Pure: the watermark's time
# ---------------------------------------------------------------------------------------------------


def fhir_instant(when: datetime) -> str:
    """A FHIR instant in UTC, to the second (the precision of an HTTP Date header).

    >>> fhir_instant(datetime(2024, 5, 1, 22, 0, 7, 900000, tzinfo=UTC))
    '2024-05-01T22:00:07Z'
    """
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instant(value: str) -> datetime:
    """A FHIR instant (any offset, optional fraction) as an aware datetime.

    >>> parse_instant("2024-05-01T22:00:07.123+02:00").isoformat()
    '2024-05-01T20:00:07.123000+00:00'
    """
    parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone: not a FHIR instant")
    return parsed.astimezone(UTC)


def since_with_overlap(watermark: str, overlap_seconds: int) -> str:
    """The `_lastUpdated` lower bound: the watermark moved back by the configured overlap.

    >>> since_with_overlap("2024-05-01T22:00:07Z", 60)
    '2024-05-01T21:59:07Z'
    """
    return fhir_instant(parse_instant(watermark) - timedelta(seconds=overlap_seconds))


# ---------------------------------------------------------------------------------------------------
# IO: asking the FHIR server
# ---------------------------------------------------------------------------------------------------


@dataclass
class Selection:
    label: str
    patient_ids: list[str]
    since: str | None = None
    watermark: str | None = None
    transaction_time: str | None = None
    problems: list[str] = field(default_factory=list)
    carried_over: int = 0


async def server_time(conn: FhirConnection) -> str | None:
    """The FHIR server's time now, from the Date header of a cheap request; None if it sends none."""
    await conn.client.capabilities()
    return fhir_instant(conn.clock.latest) if conn.clock.latest is not None else None


async def changed_patients(
    client: FhirClient, since: str, resource_types: Sequence[str], identifier_system: str
) -> list[str]:
    """Patients with any resource of `resource_types` updated after `since`, in first-seen order.

    Documents chartbrief itself wrote (AI-asserted) do not count: the last run's own summaries
    would otherwise select every patient it touched.
    """
    found: dict[str, None] = {}
    for resource_type in resource_types:
        element = "id" if resource_type == "Patient" else SEARCHED_TYPES.get(resource_type, "subject")
        params: dict[str, str] = {"_lastUpdated": f"gt{since}"}
        # Only the reference is needed; DocumentReference keeps its identifier and meta for the AI check.
        if resource_type != "DocumentReference":
            params["_elements"] = element
        before = len(found)
        try:
            await _collect(client, resource_type, params, identifier_system, found)
        except FhirBadRequest:
            if "_elements" not in params:
                raise
            log.info("batch.select.elements_refused", resource_type=resource_type)
            params.pop("_elements")
            await _collect(client, resource_type, params, identifier_system, found)
        log.info("batch.select.changed", resource_type=resource_type, new_patients=len(found) - before)
    return list(found)


async def _collect(
    client: FhirClient,
    resource_type: str,
    params: dict[str, str],
    identifier_system: str,
    found: dict[str, None],
) -> None:
    async with aclosing(client.search(resource_type, params)) as resources:
        async for res in resources:
            if resource_type == "DocumentReference" and is_ai_asserted(res, identifier_system):
                continue
            patient = patient_of(res)
            if patient is not None:
                found.setdefault(patient, None)


async def all_patients(client: FhirClient) -> list[str]:
    found: dict[str, None] = {}
    async with aclosing(client.search("Patient", {"_elements": "id"})) as resources:
        async for res in resources:
            patient = patient_of(res)
            if patient is not None:
                found.setdefault(patient, None)
    return list(found)


async def bulk_changed_patients(
    client: FhirClient,
    settings: Settings,
    *,
    group_id: str | None,
    since: str | None,
) -> tuple[list[str], str | None, list[str]]:
    """Patients named by a Bulk Data export (streamed, one resource at a time), the manifest's
    `transactionTime`, and what the export reported as problems."""
    types = list(settings.batch.change_types) if since else ["Patient"]
    report = ExportReport()
    found: dict[str, None] = {}
    exported = export_resources(
        client,
        group_id=group_id,
        types=types,
        since=since,
        report=report,
        max_wait_seconds=settings.batch.bulk_max_wait_seconds,
    )
    async with aclosing(exported) as resources:
        async for resource_type, res in resources:
            if resource_type == "DocumentReference" and is_ai_asserted(
                res, settings.writer.identifier_system
            ):
                continue
            patient = patient_of(res)
            if patient is not None:
                found.setdefault(patient, None)
    problems: list[str] = []
    if report.manifest is not None:
        problems += report.manifest.problems
    if report.error_count:
        problems.append(f"the export reported {report.error_count} error outcome(s)")
    if report.malformed_lines:
        problems.append(f"{report.malformed_lines} malformed NDJSON line(s) skipped")
    return list(found), report.transaction_time, problems


# ---------------------------------------------------------------------------------------------------
# The selection of a run, and the run recorded from it
# ---------------------------------------------------------------------------------------------------


async def select_patients(
    conn: FhirConnection, repo: BatchRepository, settings: Settings, request: BatchRequest
) -> Selection:
    """Who this run summarizes, and the watermark the next incremental run starts from."""
    client = conn.client
    label = request.label
    now = await server_time(conn)
    if now is None:
        log.warning("batch.select.no_server_date", fhir_base=client.base_url)
    if request.patients_file is not None:
        try:
            text = request.patients_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BatchError(
                f"--patients: cannot read {request.patients_file} ({type(exc).__name__})"
            ) from exc
        ids, problems = parse_patient_ids(text, f"--patients {request.patients_file.name}")
        return Selection(label=label, patient_ids=ids, watermark=now, problems=problems)
    if request.group_id is not None and not request.bulk:
        group = await client.read("Group", request.group_id)
        ids, problems = group_member_ids(group)
        return Selection(label=label, patient_ids=ids, watermark=now, problems=problems)
    last = repo.last_finished_run(client.base_url, label)
    carried = repo.patients_in_state(last.id, [FAILED]) if last is not None else []
    if request.bulk:
        since = last.transaction_time if last is not None else None
        ids, transaction_time, problems = await bulk_changed_patients(
            client, settings, group_id=request.group_id, since=since
        )
        return _with_carried(
            Selection(
                label, ids, since=since, watermark=now, transaction_time=transaction_time, problems=problems
            ),
            carried,
        )
    if last is None or last.watermark is None:
        return Selection(label, await all_patients(client), since=None, watermark=now)
    since = since_with_overlap(last.watermark, settings.batch.watermark_overlap_seconds)
    ids = await changed_patients(
        client, since, settings.batch.change_types, settings.writer.identifier_system
    )
    return _with_carried(Selection(label, ids, since=since, watermark=now), carried)


def _with_carried(selection: Selection, carried: Sequence[str]) -> Selection:
    """Patients that failed last time are tried again, changed or not: never silently dropped."""
    ids = list(dict.fromkeys([*selection.patient_ids, *carried]))
    selection.carried_over = len(ids) - len(selection.patient_ids)
    selection.patient_ids = ids
    return selection


def create_run(
    repo: BatchRepository,
    selection: Selection,
    *,
    fhir_base: str,
    mode: str,
    started_at: datetime | None = None,
) -> int:
    """Record a run and one queued item per selected patient; the run's id."""
    run_id = repo.create_run(
        started_at=started_at,
        fhir_base=fhir_base,
        mode=mode,
        selection=selection.label,
        patient_ids=selection.patient_ids,
        since=selection.since,
        watermark=selection.watermark,
        transaction_time=selection.transaction_time,
        selection_problems=len(selection.problems),
        owner=process_name(),
    )
    for problem in selection.problems[:MAX_REPORTED_PROBLEMS]:
        log.warning("batch.select.skipped", run=run_id, problem=problem)
    log.info(
        "batch.run.created",
        run=run_id,
        mode=mode,
        selection=selection.label,
        selected=len(selection.patient_ids),
        carried_over=selection.carried_over,
        since=selection.since,
        watermark=selection.watermark,
        problems=len(selection.problems),
    )
    return run_id
