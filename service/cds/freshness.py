"""Whether a patient's record changed after their latest chartbrief summary was written.

A card that says "approved" while new results came in since would be trusted wrongly. So the card
asks the FHIR server, inside its time budget, for resources of every type a summary reads
(`batch.change_types`, the same list the nightly batch uses to find changed patients) updated after
the summary: `<type>?patient=<id>&_lastUpdated=gt<since>`, all types at once. The FHIR server's own
clock decides, as it does for the batch's watermark.

`since` is the earlier of the document's `date` and its `meta.lastUpdated` (an approval updates the
document later and must hide no change made before it), moved back by
`batch.watermark_overlap_seconds` (servers keep `_lastUpdated` to the second and `gt` excludes that
second). A resource found at the version the summary read (its recorded `inputs`) is not a change;
neither is a document chartbrief itself wrote (AI-asserted).

What it must not do: hold the card past its budget (what is not answered in time is reported as
unchecked, never as fresh), or log anything but types and counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import structlog

from fhir_adapters.client import FhirClient
from service.batch.selection import fhir_instant
from service.cds.cards import Freshness, instant_of
from service.safety import is_ai_asserted

log = structlog.get_logger(__name__)

# Changed resources read per type: enough to name what changed, never a whole record.
PER_TYPE_LIMIT = 20


def changes_since(doc: Mapping[str, Any], overlap_seconds: int) -> str | None:
    """The `_lastUpdated` lower bound for a summary document, or None when it carries no time.

    >>> changes_since({"date": "2026-03-01T10:00:05Z", "meta": {"lastUpdated": "2026-03-02T08:00:00Z"}}, 2)
    '2026-03-01T10:00:03Z'
    >>> changes_since({"date": "2026-03-01T12:00:00+02:00"}, 0)
    '2026-03-01T10:00:00Z'
    >>> changes_since({"date": "not a date"}, 2) is None
    True
    """
    times = [
        t
        for t in (instant_of(doc.get("date")), instant_of((doc.get("meta") or {}).get("lastUpdated")))
        if t is not None
    ]
    if not times:
        return None
    return fhir_instant(min(times) - timedelta(seconds=overlap_seconds))


def versioned(resource: Mapping[str, Any]) -> str:
    """`Type/id/_history/v` as recorded in a summary's inputs (`Type/id` without a version).

    >>> versioned({"resourceType": "Observation", "id": "o1", "meta": {"versionId": "3"}})
    'Observation/o1/_history/3'
    """
    ref = f"{resource.get('resourceType')}/{resource.get('id')}"
    version = (resource.get("meta") or {}).get("versionId")
    return f"{ref}/_history/{version}" if version else ref


def is_change(resource: Mapping[str, Any], inputs: Collection[str], identifier_system: str) -> bool:
    """True unless the summary read this very version, or chartbrief wrote the resource.

    >>> obs = {"resourceType": "Observation", "id": "o1", "meta": {"versionId": "2"}}
    >>> [is_change(obs, {f"Observation/o1/_history/{v}"}, "urn:x") for v in (2, 1)]
    [False, True]
    >>> mine = {"resourceType": "DocumentReference", "id": "d", "identifier": [{"system": "urn:x"}]}
    >>> is_change(mine, (), "urn:x")
    False
    """
    if is_ai_asserted(dict(resource), identifier_system):
        return False
    return versioned(resource) not in inputs


def changed_counts(
    found: Iterable[Mapping[str, Any]], inputs: Collection[str], identifier_system: str
) -> dict[str, int]:
    """Changed resources by type, types in first-seen order.

    >>> changed_counts([{"resourceType": "Observation", "id": "1"}, {"resourceType": "Condition", "id": "2"},
    ...     {"resourceType": "Observation", "id": "3"}], (), "urn:x")
    {'Observation': 2, 'Condition': 1}
    """
    counts: dict[str, int] = {}
    for resource in found:
        if is_change(resource, inputs, identifier_system):
            kind = str(resource.get("resourceType"))
            counts[kind] = counts.get(kind, 0) + 1
    return counts


async def check_freshness(
    client: FhirClient,
    patient_id: str,
    since: str,
    *,
    types: Sequence[str],
    inputs: Collection[str],
    identifier_system: str,
) -> Freshness:
    """Ask every type at once; the caller bounds the time (a timeout cancels every search)."""

    async def one(resource_type: str) -> list[dict[str, Any]]:
        params = {"_lastUpdated": f"gt{since}", "_count": str(PER_TYPE_LIMIT)}
        if resource_type == "Patient":
            params["_id"] = patient_id
        else:
            params["patient"] = patient_id
        found = await client.search_all(resource_type, params, limit=PER_TYPE_LIMIT)
        return [r for r in found if r.get("resourceType") == resource_type]

    answers = await asyncio.gather(*(one(t) for t in types))
    changed = changed_counts((r for found in answers for r in found), inputs, identifier_system)
    log.info("cds.freshness", types=len(types), changed=sum(changed.values()))
    return Freshness(checked=True, changed=changed)
