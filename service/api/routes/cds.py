"""CDS Hooks 2.0 endpoints: discovery, the `patient-view` card and card feedback.

```
GET  /cds-services                               discovery (one patient-view service)
POST /cds-services/chartbrief-summary            a card from the latest summary, within cds.budget_seconds
POST /cds-services/chartbrief-summary/feedback   accepted / overridden outcomes of a card
```

Every POST carries the CDS client's JWT (checked by `service.cds.tokens`). The summary is read
from the request's prefetch, else from `fhirServer` with `fhirAuthorization`'s token, else from
chartbrief's own FHIR server (Backend Services credentials, `CHARTBRIEF_FHIR__*`) when
`fhirServer` is that server; none of them = 412. Whether the record changed since the summary is
asked of the same server in what is left of the budget (`service.cds.freshness`). A missing or stale
summary is queued through the REST API's job registry and work admission (their bounds hold); the
hook never waits for it.

What it must not do: generate a summary inside the request, log a token or the card text, or
send the EHR's token anywhere but the request's own fhirServer.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from fhir_adapters.auth import StaticToken
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirError
from service.api.deps import get_runtime
from service.api.errors import TooManyRequests, Unauthenticated, Unavailable
from service.cds.cards import (
    SERVICE_ID,
    Freshness,
    HookRequest,
    HookRequestError,
    discovery,
    latest_from_prefetch,
    parse_request,
    preparing_card,
    state_of,
    summary_card,
)
from service.cds.freshness import changes_since, check_freshness
from service.cds.tokens import CdsTokenVerifier, StoredJti
from service.config import Settings
from service.db.store import StoredSummary, in_thread
from service.fhir import fhir_client
from service.governance.records import CDS_OUTCOMES, record_cds_feedback

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/cds-services", tags=["cds-hooks"])


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def service_url(request: Request) -> str:
    settings = get_runtime(request).settings
    base = settings.cds.service_base_url or settings.smart.public_base_url
    return f"{base.rstrip('/')}/cds-services/{SERVICE_ID}"


async def _caller(request: Request) -> dict[str, Any]:
    runtime = get_runtime(request)
    state = request.app.state
    if getattr(state, "cds_seen_jti", None) is None:
        state.cds_seen_jti = StoredJti(runtime.db)
    verifier = CdsTokenVerifier(
        runtime.http,
        issuers={c.issuer: c.jwks_url for c in runtime.settings.cds.clients},
        algorithms=runtime.settings.api.jwt_algorithms,
        leeway_seconds=runtime.settings.api.leeway_seconds,
        max_token_age_seconds=runtime.settings.cds.max_token_age_seconds,
        cache_seconds=runtime.settings.api.jwks_cache_seconds,
        seen=state.cds_seen_jti,
    )
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return await verifier.verify(token.strip() if scheme.lower() == "bearer" else None, service_url(request))


@router.get("", summary="CDS Hooks discovery")
async def cds_discovery(request: Request) -> JSONResponse:
    return JSONResponse(discovery(get_runtime(request).settings.writer.identifier_system))


def known_fhir_servers(settings: Settings) -> set[str]:
    """The FHIR servers chartbrief may read a hook's record from: the EHRs it launches from
    (smart.allowed_issuers) and its own (fhir.base_url)."""
    servers = [*settings.smart.allowed_issuers, settings.fhir.base_url or ""]
    return {s.rstrip("/") for s in servers if s}


def _reader(request: Request, hook: HookRequest) -> FhirClient | None:
    runtime = get_runtime(request)
    if hook.fhir_server and hook.fhir_server.rstrip("/") not in known_fhir_servers(runtime.settings):
        # The EHR's token goes to no server the deployment does not name, whoever signed the hook.
        raise HookRequestError(
            "fhirServer is not a FHIR server chartbrief is configured for "
            "(smart.allowed_issuers, fhir.base_url)"
        )
    if hook.access_token and hook.fhir_server:
        return fhir_client(
            runtime.settings.fhir,
            base_url=hook.fhir_server,
            http=runtime.http,
            auth=StaticToken(hook.access_token),
        )
    own = runtime.service_client
    if own is not None and (
        hook.fhir_server is None or hook.fhir_server.rstrip("/") == own.base_url.rstrip("/")
    ):
        return own
    return None


async def _latest(
    request: Request, hook: HookRequest
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, FhirClient | None]:
    """(document, patient, reader): the latest chartbrief DocumentReference, the Patient, and the
    client that may ask the FHIR server whether the record changed since (None: nothing may), or 412."""
    given, doc = latest_from_prefetch(hook.prefetch)
    patient = hook.prefetch.get("patient") if isinstance(hook.prefetch.get("patient"), dict) else None
    if given and patient is not None:
        try:
            return doc, patient, _reader(request, hook)
        except HookRequestError:
            # A complete prefetch needs no server; an unnamed fhirServer is simply not asked.
            return doc, patient, None
    client = _reader(request, hook)
    if client is None:
        raise HookRequestError(
            "prefetch 'summary' and 'patient' are missing and neither fhirAuthorization nor chartbrief's own "
            "FHIR server can read them",
            status=412,
        )
    if not given:
        system = get_runtime(request).settings.writer.identifier_system
        params = {
            "patient": hook.patient_id,
            "identifier": f"{system}|",
            "_sort": "-date",
            "_count": "1",
        }
        found = await client.search_all("DocumentReference", params, limit=1)
        docs = [r for r in found if r.get("resourceType") == "DocumentReference"]
        doc = docs[0] if docs else None
    if patient is None:
        patient = await client.read("Patient", hook.patient_id)
    return doc, patient, client


async def _freshness(
    request: Request,
    hook: HookRequest,
    reader: FhirClient | None,
    doc: dict[str, Any],
    row: StoredSummary | None,
    deadline: float,
) -> Freshness:
    """Whether the record changed since `doc`, asked before `deadline`; unchecked (with the reason)
    when nothing may ask, the document has no time, the server fails or time runs out."""
    settings = get_runtime(request).settings
    since = changes_since(doc, settings.batch.watermark_overlap_seconds)
    if reader is None:
        return Freshness(checked=False, reason="chartbrief has no access to the FHIR server for this hook")
    if since is None:
        return Freshness(checked=False, reason="the summary carries no date")
    try:
        async with asyncio.timeout_at(deadline):
            return await check_freshness(
                reader,
                hook.patient_id,
                since,
                types=settings.batch.change_types,
                inputs=frozenset(row.inputs) if row is not None else frozenset(),
                identifier_system=settings.writer.identifier_system,
            )
    except TimeoutError:
        log.info("cds.freshness_over_budget")
        return Freshness(checked=False, reason="the FHIR server did not answer in time")
    except FhirError as exc:
        log.warning("cds.freshness_failed", error=type(exc).__name__)
        return Freshness(checked=False, reason="the FHIR server refused the search")


def _queue(request: Request, hook: HookRequest, who: str) -> bool:
    """Start a summary job for the patient, within the REST API's bounds; False when none could be."""
    runtime = get_runtime(request)
    if runtime.service_client is None or runtime.model.engine is None:
        return False
    if runtime.jobs.unfinished_for(hook.patient_id) is not None:
        # Every view of the chart asks; one summary in the making is enough.
        log.info("cds.already_queued")
        return True
    from service.api.deps import get_pipeline
    from service.api.routes.api import describe_failure
    from service.pipeline import summarize_patient

    try:
        place = runtime.admission.admit(who, "job")
    except TooManyRequests:
        log.info("cds.queue_full")
        return False
    svc = get_pipeline(request).services(runtime.service_client)

    async def run() -> dict[str, Any]:
        result = await summarize_patient(svc, hook.patient_id, skip_unchanged=True)
        return result.to_json()

    try:
        runtime.jobs.submit(
            run,
            patient_id=hook.patient_id,
            encounter_id=None,
            requested_by=who,
            place=place,
            describe_error=describe_failure,
        )
    except BaseException:
        place.release()
        raise
    return True


def _launch_url(request: Request, hook: HookRequest) -> str:
    settings = get_runtime(request).settings
    iss = hook.fhir_server or settings.fhir.base_url or ""
    return f"{settings.smart.public_base_url.rstrip('/')}/launch?{urlencode({'iss': iss})}"


@router.post(f"/{SERVICE_ID}", summary="patient-view: the latest chartbrief summary as a card")
async def patient_view(request: Request) -> JSONResponse:
    try:
        claims = await _caller(request)
    except (Unauthenticated, Unavailable) as exc:
        return _error(exc.status, exc.message)
    try:
        hook = parse_request(await _json(request))
    except HookRequestError as exc:
        return _error(exc.status, str(exc))
    runtime = get_runtime(request)
    who = f"cds:{claims['iss']}"
    launch = _launch_url(request, hook)
    deadline = asyncio.get_running_loop().time() + runtime.settings.cds.budget_seconds
    try:
        async with asyncio.timeout_at(deadline):
            doc, patient, reader = await _latest(request, hook)
            row = await in_thread(runtime.store.latest_for_patient, _base(request, hook), hook.patient_id)
    except HookRequestError as exc:
        return _error(exc.status, str(exc))
    except TimeoutError:
        log.info("cds.over_budget")
        return JSONResponse({"cards": [preparing_card(launch, queued=_queue(request, hook, who))]})
    except FhirError as exc:
        log.warning("cds.fhir_failed", error=type(exc).__name__)
        return JSONResponse({"cards": []})
    if doc is None:
        return JSONResponse({"cards": [preparing_card(launch, queued=_queue(request, hook, who))]})
    # The row's inputs say which versions the summary read; only the row of this very document.
    if row is not None and row.document_reference != f"DocumentReference/{doc.get('id')}":
        row = None
    summary_id = row.id if row is not None else None
    freshness = await _freshness(request, hook, reader, doc, row, deadline)
    queued = state_of(doc, patient, freshness) == "stale" and _queue(request, hook, who)
    card = summary_card(
        doc,
        patient,
        summary_id=summary_id,
        launch_url=launch,
        now=datetime.now(UTC),
        queued=queued,
        freshness=freshness,
    )
    log.info("cds.card", summary_id=summary_id, indicator=card["indicator"])
    return JSONResponse({"cards": [card]})


def _base(request: Request, hook: HookRequest) -> str:
    own = get_runtime(request).service_client
    return own.base_url if own is not None else (hook.fhir_server or "")


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:
        raise HookRequestError("the request body is not JSON") from exc


@router.post(f"/{SERVICE_ID}/feedback", summary="Outcomes of chartbrief cards")
async def feedback(request: Request) -> JSONResponse:
    try:
        claims = await _caller(request)
    except (Unauthenticated, Unavailable) as exc:
        return _error(exc.status, exc.message)
    try:
        body = await _json(request)
    except HookRequestError as exc:
        return _error(400, str(exc))
    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        return _error(400, "feedback must be a non-empty list")
    runtime = get_runtime(request)
    for n, item in enumerate(items):
        card = item.get("card") if isinstance(item, dict) else None
        outcome = item.get("outcome") if isinstance(item, dict) else None
        if not isinstance(card, str) or outcome not in CDS_OUTCOMES:
            return _error(400, f"feedback[{n}] needs card (a uuid) and outcome accepted or overridden")
    for item in items:
        summary_id = item["card"].split(".")[0]
        reasons = override_reason_codes(item)
        await in_thread(
            record_cds_feedback,
            runtime.db,
            outcome=item["outcome"],
            summary_id=None if summary_id == "none" else summary_id[:36],
            reasons=reasons,
            who=f"cds:{claims['iss']}",
        )
    return JSONResponse({}, status_code=200)


def override_reason_codes(item: dict[str, Any]) -> list[str]:
    """The reason codes of a feedback item's `overrideReason` (CDS Hooks 2.0: one object with a
    `reason` Coding; a list is taken too). Its `userComment` is free text and is never kept.

    >>> override_reason_codes({"overrideReason": {"reason": {"code": "already-known"}, "userComment": "x"}})
    ['already-known']
    >>> override_reason_codes({"outcome": "accepted"})
    []
    """
    raw = item.get("overrideReason", item.get("overrideReasons"))
    given = raw if isinstance(raw, list) else [raw]
    codes = []
    for reason in given:
        coding = reason.get("reason") if isinstance(reason, dict) else None
        code = coding.get("code") if isinstance(coding, dict) else None
        if isinstance(code, str) and code:
            codes.append(code)
    return codes
