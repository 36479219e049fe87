"""Fetching a record: chartbrief's `fetch_record` against SMART's `fhirclient` reading the same resources.

For the fixture patient with the most resources, both clients read the same record from the local
FHIR server: the Patient, a search of every type chartbrief summarizes with chartbrief's own search
parameters and page size (every next page followed; the Observations up to the same limit), the
Medications the orders name by reference and the note attachments stored apart from their
resource. chartbrief sends its searches side by side (`fhir.max_concurrency`); fhirclient, the way
its API is used, one search and one page after another. Both parse what they read into models
(chartbrief validates with fhir.resources, fhirclient builds its own model objects).

Each is timed directly against the server and through `DelayProxyProcess`, which adds 50 ms to every
request as an EHR across a network would; the proxy counts the requests. The ratio is fhirclient's
seconds over chartbrief's. Both must have read the same resources: the counts per type are
compared, and any difference is a note and a figure of the section, never hidden.

What it must not do: log or report anything of the record but resource types, counts and ids.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.delay_proxy import DelayProxyProcess
from bench.performance.common import Bar, BenchContext, Section, amedian_seconds, median_seconds, ratio
from fhir_adapters.auth.scopes import SEARCHED_TYPES
from fhir_adapters.client import FhirClient
from fhir_adapters.client.search import next_link
from fhir_adapters.fetch import SearchParams, fetch_record, medication_ids, note_attachments, search_params
from fhir_adapters.models import PatientRecord
from fhir_adapters.text import UnsupportedContent, ensure_supported
from service.config import FhirSettings
from service.fhir import fhir_client

DELAY_SECONDS = 0.050
TINY_DELAY_SECONDS = 0.005
TARGETS = {"fetch_speedup_50ms": ">= 3"}


@dataclass
class Received:
    """What one client read: resources per type (the Patient, search results, Medication reads) and
    attachments per URL read (`Binary`)."""

    counts: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# ---------------------------------------------------------------------------
# chartbrief
# ---------------------------------------------------------------------------


class _Recording:
    """A `FhirSource` around `FhirClient` that counts what it hands to `fetch_record` (used for the
    untimed run that compares the two clients' resources, not for the timed ones)."""

    def __init__(self, client: FhirClient, received: Received) -> None:
        self._client = client
        self._received = received
        self.limits = client.limits

    async def read(self, resource_type: str, id: str) -> dict[str, Any]:
        resource = await self._client.read(resource_type, id)
        self._received.counts[resource_type] += 1
        return resource

    def search(self, resource_type: str, params: SearchParams) -> AsyncIterator[dict[str, Any]]:
        return self._client.search(resource_type, params)

    async def search_all(
        self, resource_type: str, params: SearchParams, *, limit: int | None = None
    ) -> list[dict[str, Any]]:
        found = await self._client.search_all(resource_type, params, limit=limit)
        self._received.counts[resource_type] += sum(
            1 for r in found if r.get("resourceType") == resource_type
        )
        return found

    async def binary(self, url: str) -> tuple[bytes, str]:
        content = await self._client.binary(url)
        self._received.counts["Binary"] += 1
        return content


async def chartbrief_fetch(
    base: str, patient_id: str, settings: FhirSettings, received: Received | None = None
) -> PatientRecord:
    """One fetch as the pipeline does it: a client from the FHIR settings, `fetch_record` with the
    settings' concurrency and Observation limit."""
    async with fhir_client(settings, base_url=base) as client:
        source = client if received is None else _Recording(client, received)
        return await fetch_record(
            source,
            patient_id,
            observation_limit=settings.observation_limit,
            max_concurrency=settings.max_concurrency,
        )


# ---------------------------------------------------------------------------
# fhirclient
# ---------------------------------------------------------------------------


def fhirclient_fetch(base: str, patient_id: str, settings: FhirSettings) -> Received:
    """The same record with SMART's fhirclient: `Model.read`, `Model.where(...).perform_resources_iter`
    (which follows every next link), one request after another. It works on fhirclient's model
    objects as a user of the library would (nothing is turned back into JSON)."""
    from fhirclient import client as smart_client
    from fhirclient.models import patient as patient_model

    smart = smart_client.FHIRClient(settings={"app_id": "chartbrief-bench", "api_base": base})
    server = smart.server
    received = Received()
    patient_model.Patient.read(patient_id, server)
    received.counts["Patient"] += 1
    found: dict[str, list[Any]] = {}
    for rtype in SEARCHED_TYPES:
        model = _model_class(rtype)
        params = dict(search_params(rtype, patient_id)) | {"_count": str(settings.page_size)}
        limit = settings.observation_limit if rtype == "Observation" else None
        items: list[Any] = []
        for resource in model.where(struct=params).perform_resources_iter(server):
            if resource.resource_type != rtype:
                continue
            items.append(resource)
            if limit is not None and len(items) >= limit:
                break  # the iterator is lazy: no further page is requested
        found[rtype] = items
        received.counts[rtype] += len(items)
    medication = _model_class("Medication")
    for mid in medication_ids(_medication_references(found.get("MedicationRequest", []))):
        medication.read(mid, server)
        received.counts["Medication"] += 1
    for url in attachment_urls(
        _attachment_views(found.get("DocumentReference", []), found.get("DiagnosticReport", []))
    ):
        server.request_data(url)
        received.counts["Binary"] += 1
    return received


def plain_fetch(base: str, patient_id: str, settings: FhirSettings) -> Received:
    """The same requests as `fhirclient_fetch`, one after another, with nothing done to the answers but
    `json.loads` (to find the next link): the time the server and the transfer take, which no client
    can go below by sending its requests one at a time."""
    received = Received()
    with httpx.Client(timeout=settings.timeout_seconds, headers={"Accept": "application/fhir+json"}) as http:
        http.get(f"{base}/Patient/{patient_id}").raise_for_status()
        received.counts["Patient"] += 1
        found: dict[str, list[dict[str, Any]]] = {}
        for rtype in SEARCHED_TYPES:
            limit = settings.observation_limit if rtype == "Observation" else None
            items: list[dict[str, Any]] = []
            url: str | None = f"{base}/{rtype}"
            params: dict[str, str] | None = dict(search_params(rtype, patient_id)) | {
                "_count": str(settings.page_size)
            }
            while url is not None and (limit is None or len(items) < limit):
                response = http.get(url, params=params)
                response.raise_for_status()
                bundle = response.json()
                items.extend(
                    e["resource"]
                    for e in bundle.get("entry") or []
                    if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == rtype
                )
                url, params = next_link(bundle), None
            found[rtype] = items[:limit] if limit is not None else items
            received.counts[rtype] += len(found[rtype])
        for mid in medication_ids(found.get("MedicationRequest", [])):
            http.get(f"{base}/Medication/{mid}").raise_for_status()
            received.counts["Medication"] += 1
        for link in attachment_urls(
            [*found.get("DocumentReference", []), *found.get("DiagnosticReport", [])]
        ):
            http.get(link if "://" in link else f"{base}/{link}").raise_for_status()
            received.counts["Binary"] += 1
    return received


def first_pages(base: str, patient_id: str, settings: FhirSettings) -> tuple[float, float]:
    """Seconds for the first page of every search: one after another, then all at once. Equal times
    mean the server answers concurrent requests one at a time, and concurrency hides only the
    network's part of a fetch, never the server's."""
    requests = [
        (f"{base}/{rtype}", dict(search_params(rtype, patient_id)) | {"_count": str(settings.page_size)})
        for rtype in SEARCHED_TYPES
    ]

    async def measure() -> tuple[float, float]:
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(timeout=settings.timeout_seconds, limits=limits) as http:
            # Open every connection first, so that neither figure includes connecting.
            await asyncio.gather(*(http.get(f"{base}/metadata") for _ in requests))
            started = time.perf_counter()
            for url, params in requests:
                (await http.get(url, params=params)).raise_for_status()
            sequential = time.perf_counter() - started
            started = time.perf_counter()
            answers = await asyncio.gather(*(http.get(url, params=params) for url, params in requests))
            concurrent = time.perf_counter() - started
            for answer in answers:
                answer.raise_for_status()
            return sequential, concurrent

    return asyncio.run(measure())


def _medication_references(requests: list[Any]) -> list[dict[str, Any]]:
    """The `medicationReference` of fhirclient MedicationRequests, as `medication_ids` reads them."""
    return [
        {"medicationReference": {"reference": r.medicationReference.reference}}
        for r in requests
        if r.medicationReference is not None
    ]


def _attachment_views(documents: list[Any], reports: list[Any]) -> list[dict[str, Any]]:
    """What `attachment_urls` needs of fhirclient DocumentReferences and DiagnosticReports."""

    def attachment(a: Any) -> dict[str, Any]:
        return {"url": a.url, "data": a.data, "contentType": a.contentType}

    views: list[dict[str, Any]] = []
    for d in documents:
        content = [{"attachment": attachment(c.attachment)} for c in d.content or [] if c.attachment]
        views.append(
            {"resourceType": "DocumentReference", "id": d.id, "status": d.status, "content": content}
        )
    for r in reports:
        forms = [attachment(a) for a in r.presentedForm or []]
        views.append({"resourceType": "DiagnosticReport", "id": r.id, "presentedForm": forms})
    return views


def attachment_urls(owners: list[dict[str, Any]]) -> list[str]:
    """The attachment URLs chartbrief reads: attachments without inline data, of a type it can decode,
    of documents not entered in error (DocumentReferences and DiagnosticReports, as JSON).

    >>> doc = {"resourceType": "DocumentReference", "id": "d", "status": "current",
    ...        "content": [{"attachment": {"url": "Binary/1", "contentType": "text/plain"}},
    ...                    {"attachment": {"data": "aGk=", "contentType": "text/plain"}}]}
    >>> attachment_urls([doc, doc | {"id": "e", "status": "entered-in-error"}])
    ['Binary/1']
    """
    kept = [o for o in owners if o.get("status") != "entered-in-error"]
    urls: list[str] = []
    for item in note_attachments(kept):
        attachment = item.attachment
        if attachment.get("data") or not attachment.get("url"):
            continue
        declared = attachment.get("contentType")
        if isinstance(declared, str) and declared:
            try:
                ensure_supported(declared)
            except UnsupportedContent:
                continue
        urls.append(str(attachment["url"]))
    return urls


def _model_class(resource_type: str) -> Any:
    """fhirclient's model class of a resource type (`fhirclient.models.condition.Condition`)."""
    import importlib

    module = importlib.import_module(f"fhirclient.models.{resource_type.lower()}")
    return getattr(module, resource_type)


# ---------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------


def count_differences(ours: dict[str, int], theirs: dict[str, int]) -> dict[str, dict[str, int]]:
    """Types whose counts differ: {type: {"chartbrief": n, "fhirclient": m}}.

    >>> count_differences({"Condition": 3, "Binary": 1}, {"Condition": 3, "Medication": 2})
    {'Binary': {'chartbrief': 1, 'fhirclient': 0}, 'Medication': {'chartbrief': 0, 'fhirclient': 2}}
    """
    return {
        rtype: {"chartbrief": ours.get(rtype, 0), "fhirclient": theirs.get(rtype, 0)}
        for rtype in sorted(set(ours) | set(theirs))
        if ours.get(rtype, 0) != theirs.get(rtype, 0)
    }


def run(ctx: BenchContext) -> Section:
    """Time both clients on `ctx.largest`, directly and through the delay proxy."""
    settings = FhirSettings()
    patient_id = str(ctx.largest.id)
    repetitions = 1 if ctx.tiny else max(1, ctx.repetitions)
    delay = TINY_DELAY_SECONDS if ctx.tiny else DELAY_SECONDS
    base = ctx.fhir_base.rstrip("/")
    section = Section(key="fetch", title="Fetching a record", targets=dict(TARGETS))

    # Untimed: warms both clients (imports, model classes, the server's caches) and records what
    # each of them read, for the comparison.
    ours = Received()
    record = asyncio.run(chartbrief_fetch(base, patient_id, settings, ours))
    theirs = fhirclient_fetch(base, patient_id, settings)

    def time_chartbrief(target: str) -> float:
        async def measure() -> float:
            seconds, _ = await amedian_seconds(
                repetitions, lambda: chartbrief_fetch(target, patient_id, settings)
            )
            return seconds

        return asyncio.run(measure())

    def time_fhirclient(target: str) -> float:
        seconds, _ = median_seconds(repetitions, lambda: fhirclient_fetch(target, patient_id, settings))
        return seconds

    cb_direct = time_chartbrief(base)
    fc_direct = time_fhirclient(base)
    plain = plain_fetch(base, patient_id, settings)
    plain_direct, _ = median_seconds(repetitions, lambda: plain_fetch(base, patient_id, settings))
    pages = [first_pages(base, patient_id, settings) for _ in range(repetitions)]
    pages_sequential = statistics.median(p[0] for p in pages)
    pages_concurrent = statistics.median(p[1] for p in pages)
    # In a child process: its forwarding must not compete with the client measured for this interpreter.
    with DelayProxyProcess(base, delay=delay) as proxy:
        proxy.reset()
        cb_proxied = time_chartbrief(proxy.base_url)
        cb_requests, cb_in_flight, cb_slept = proxy.requests, proxy.max_in_flight, proxy.delayed_seconds
        proxy.reset()
        fc_proxied = time_fhirclient(proxy.base_url)
        fc_requests, fc_in_flight, fc_slept = proxy.requests, proxy.max_in_flight, proxy.delayed_seconds

    ours_counts, theirs_counts = ours.as_dict(), theirs.as_dict()
    cb_per_fetch, fc_per_fetch = cb_requests // repetitions, fc_requests // repetitions
    differences = count_differences(ours_counts, theirs_counts)
    delay_ms = round(delay * 1000, 3)
    section.ratios = {
        "fetch_speedup_50ms": ratio(fc_proxied, cb_proxied),
        "fetch_speedup_direct": ratio(fc_direct, cb_direct),
    }
    section.figures = {
        "patient_id": patient_id,
        "patient_resources_loaded": ctx.largest.resources,
        "delay_ms": delay_ms,
        "repetitions": repetitions,
        "page_size": settings.page_size,
        "max_concurrency": settings.max_concurrency,
        "observation_limit": settings.observation_limit,
        "chartbrief_direct_s": round(cb_direct, 4),
        "fhirclient_direct_s": round(fc_direct, 4),
        "chartbrief_proxied_s": round(cb_proxied, 4),
        "fhirclient_proxied_s": round(fc_proxied, 4),
        # The same requests with no client work: the server's and the transfer's share of the times.
        "plain_sequential_direct_s": round(plain_direct, 4),
        "plain_counts_match": plain.as_dict() == theirs_counts,
        "first_pages_sequential_s": round(pages_sequential, 4),
        "first_pages_concurrent_s": round(pages_concurrent, 4),
        # Per fetch: the proxy counted every repetition.
        "chartbrief_requests": cb_per_fetch,
        "fhirclient_requests": fc_per_fetch,
        "chartbrief_max_in_flight": cb_in_flight,
        "fhirclient_max_in_flight": fc_in_flight,
        "chartbrief_delay_slept_s": round(cb_slept / repetitions, 4),
        "fhirclient_delay_slept_s": round(fc_slept / repetitions, 4),
        "chartbrief_resources": sum(ours_counts.values()),
        "fhirclient_resources": sum(theirs_counts.values()),
        "chartbrief_counts": ours_counts,
        "fhirclient_counts": theirs_counts,
        "count_differences": differences,
        "chartbrief_kept": {rtype: len(items) for rtype, items in sorted(record.resources.items())},
        "chartbrief_skipped": len(record.skipped),
        "chartbrief_notes": len(record.notes),
    }
    section.table = [
        _row("chartbrief", "direct", cb_direct, None, sum(ours_counts.values())),
        _row("fhirclient", "direct", fc_direct, None, sum(theirs_counts.values())),
        _row(
            "chartbrief",
            f"+{delay_ms:g} ms",
            cb_proxied,
            cb_per_fetch,
            sum(ours_counts.values()),
        ),
        _row(
            "fhirclient",
            f"+{delay_ms:g} ms",
            fc_proxied,
            fc_per_fetch,
            sum(theirs_counts.values()),
        ),
    ]
    section.bars = [
        Bar("chartbrief, direct", round(cb_direct, 4), "s"),
        Bar("fhirclient, direct", round(fc_direct, 4), "s"),
        Bar(f"chartbrief, +{delay_ms:g} ms", round(cb_proxied, 4), "s"),
        Bar(f"fhirclient, +{delay_ms:g} ms", round(fc_proxied, 4), "s"),
    ]
    section.notes = [
        f"Patient {patient_id} ({ctx.largest.resources} resources loaded); median of {repetitions} "
        f"fetch(es) each; the proxy adds {delay_ms:g} ms to every request.",
        f"Both read with _count={settings.page_size}, the first {settings.observation_limit} Observations "
        f"(newest first); chartbrief sends up to {settings.max_concurrency} requests at once "
        f"(at most {cb_in_flight} seen), fhirclient one at a time.",
        f"Requests per fetch: chartbrief {cb_per_fetch}, fhirclient {fc_per_fetch}.",
        f"The same requests sent one by one with no parsing but json.loads take {plain_direct:.3f} s "
        "directly: the server's and the transfer's part of both clients' times.",
        f"The {len(SEARCHED_TYPES)} searches' first pages take {pages_sequential:.3f} s one after another"
        f" and {pages_concurrent:.3f} s all at once, directly: "
        + (
            "the server answers concurrent requests one at a time, so concurrency hides only the delay."
            if pages_concurrent > 0.7 * pages_sequential
            else "the server answers concurrent requests in parallel."
        ),
    ]
    if differences:
        section.notes.append(
            "The two clients did NOT read the same resources: "
            + "; ".join(
                f"{t} chartbrief {d['chartbrief']} / fhirclient {d['fhirclient']}"
                for t, d in differences.items()
            )
        )
    else:
        section.notes.append(
            f"Both read the same resources: {sum(ours_counts.values())} ({_counts_text(ours_counts)})."
        )
    if delay != DELAY_SECONDS:
        section.notes.append(
            f"Smoke run: the delay is {delay_ms:g} ms, not 50 ms; `fetch_speedup_50ms` is that delay's ratio."
        )
    return section


def _row(client: str, link: str, seconds: float, requests: int | None, resources: int) -> dict[str, Any]:
    return {
        "client": client,
        "link": link,
        "seconds": round(seconds, 4),
        "requests": "-" if requests is None else requests,
        "resources": resources,
    }


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{t} {n}" for t, n in counts.items())
