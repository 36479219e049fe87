"""The REST API for other systems: start a summary, follow it, read the latest, or stream one.

```
POST /api/summaries                      {"patient": id, "encounter": id?} -> 202 {id, status}
GET  /api/summaries/{job_id}             the job: queued / running / succeeded (with the result) / failed
GET  /api/patients/{id}/summaries/latest the latest recorded summary and its document's state
POST /api/summaries/stream               the same summary as server-sent events
```

Authentication: `Authorization: Bearer <token>` where the token is a JWT of the configured issuer
(checked against its JWKS: signature, iss, aud, exp) or a chartbrief API key (`cbk_...`).
Authorization: SMART scopes on DocumentReference (`.c` to create, `.r`/`.s` to read) or the
API-key scopes `summaries.write` / `summaries.read`, accepted from
- a token with a `patient` claim (patient context), or an API key limited to a patient: that
  patient only;
- a system-level service account (`system/` scopes) or an unlimited API key: any patient;
- a user-level token (`user/` scopes, no patient claim): refused, because the summary is read and
  made with chartbrief's own FHIR credentials and would reach every patient. With
  `CHARTBRIEF_API__USER_TOKENS=check-at-ehr` the EHR decides instead: before anything else
  `Patient/{id}` is read at `CHARTBRIEF_FHIR__BASE_URL` with the caller's own token, on every
  request (nothing is cached, so one user's answer never serves another); 200 allows, anything
  else refuses.
Every refusal is 403 and audited. Errors are FHIR OperationOutcome JSON.

The API's FHIR server is `CHARTBRIEF_FHIR__BASE_URL` with chartbrief's own credentials: the
caller's token authorizes the call to chartbrief and goes nowhere else, except to that server
for the user-level check above.

What it must not do: log a caller's token or send it anywhere but the configured FHIR base URL,
or say whether a job of another patient exists (it answers like an unknown job).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from fhir_adapters.auth import StaticToken
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import ChartbriefError, FhirAuthError, FhirError, FhirNotFound
from service.api.deps import (
    AdmissionDep,
    ApiFhirDep,
    DatabaseDep,
    JobsDep,
    PipelineDep,
    StoreDep,
    VerifierDep,
    get_http,
    get_settings,
)
from service.api.errors import (
    ApiError,
    BadGateway,
    BadRequest,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unauthenticated,
    Unavailable,
    operation_outcome,
)
from service.api.limits import Place, WorkAdmission, WorkKind
from service.api.security import Principal, looks_like_jwt, scopes_allow
from service.api.views import source_views, stored_markdown
from service.config import SettingsError
from service.db import apikeys, audit
from service.db.apikeys import SECRET_TAG
from service.db.store import in_thread
from service.errors import UNEXPECTED, fault_of
from service.fhir import fhir_client
from service.pipeline import Services, summarize_patient
from service.streaming import Finished, Prepared, Token, stream_summary

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/api", tags=["summaries"])

FHIR_ID = r"^[A-Za-z0-9\-.]{1,64}$"
Interaction = Literal["create", "read"]
# API-key scopes (chartbrief's own names) and the SMART interaction each one covers.
KEY_SCOPES: dict[Interaction, tuple[str, ...]] = {
    "create": ("summaries.write",),
    "read": ("summaries.read", "summaries.write"),
}
SMART_LETTERS: dict[Interaction, tuple[str, ...]] = {"create": ("c",), "read": ("r", "s")}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description + " (OperationOutcome)"}
    for status, description in (
        (400, "Bad request"),
        (401, "No, expired or invalid credentials"),
        (403, "Not allowed for this patient or scope"),
        (404, "Not found"),
        (429, "Too many summaries queued or running, for this client or in all (with Retry-After)"),
        (503, "Model loading or no FHIR server configured"),
    )
}


class SummaryRequest(BaseModel):
    patient: str = Field(pattern=FHIR_ID, description="Patient id on the FHIR server.")
    encounter: str | None = Field(default=None, pattern=FHIR_ID, description="Focus Encounter id.")


# -- who is calling -------------------------------------------------------------------------------


def bearer_credential(request: Request) -> str:
    """The token of `Authorization: Bearer <token>`, or `Unauthenticated` saying what is wrong."""
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated(
            "this API needs a bearer token (Authorization: Bearer ...)", error="invalid_request"
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("use the Bearer scheme: Authorization: Bearer <token>", error="invalid_request")
    return token


async def bearer_principal(request: Request, db: DatabaseDep, verifier: VerifierDep) -> Principal:
    token = bearer_credential(request)
    if token.startswith(SECRET_TAG):
        key = await in_thread(apikeys.verify, db, token)
        if key is None:
            raise Unauthenticated("the API key is unknown or revoked")
        return Principal(
            kind="api-key", subject=f"apikey:{key.id}", scopes=frozenset(key.scopes), patient=key.patient_id
        )
    if looks_like_jwt(token):
        if verifier is None:
            raise Unauthenticated("this service is configured to accept no JWTs (CHARTBRIEF_API__JWT_ISSUER)")
        return await verifier.verify(token)
    raise Unauthenticated("the bearer token is neither a JWT nor a chartbrief API key")


PrincipalDep = Annotated[Principal, Depends(bearer_principal)]


def contexts_for(principal: Principal, interaction: Interaction) -> set[str]:
    """The levels (patient/user/system) at which the caller may do `interaction` on summaries.

    >>> p = Principal("jwt", "x", frozenset({"patient/DocumentReference.rs"}), patient="p1")
    >>> sorted(contexts_for(p, "read")), sorted(contexts_for(p, "create"))
    (['patient'], [])
    """
    contexts: set[str] = set()
    for letter in SMART_LETTERS[interaction]:
        contexts |= scopes_allow(principal.scopes, "DocumentReference", letter)
    if principal.kind == "api-key" and principal.scopes & set(KEY_SCOPES[interaction]):
        contexts.add("system")
    return contexts


USER_TOKENS_REFUSED = (
    "a user-level token (user/ scopes, no patient claim) is not accepted for patient data: use a "
    "patient-context token, a system-level service account or an API key "
    "(CHARTBRIEF_API__USER_TOKENS=refuse)"
)


def scope_problem(
    principal: Principal, contexts: set[str], interaction: Interaction, patient_id: str
) -> str | None:
    """Why the caller's rights do not reach `patient_id`, or None: a user-level token alone counts as
    no right here (`needs_ehr_check` says whether it may still be asked about).

    >>> user = Principal("jwt", "dr", frozenset({"user/DocumentReference.rs"}))
    >>> scope_problem(user, {"user"}, "read", "p1") is None
    True
    >>> scope_problem(Principal("jwt", "x", frozenset(), patient="p2"), {"patient"}, "read", "p1")
    'the token is limited to another patient'
    """
    if not contexts:
        needed = (
            "DocumentReference.c or summaries.write"
            if interaction == "create"
            else ("DocumentReference.r/.s or summaries.read")
        )
        return f"the token's scopes do not allow this (it needs {needed})"
    if principal.patient is not None and principal.patient != patient_id:
        return "the token is limited to another patient"
    if principal.patient is None and principal.patient_limited(contexts):
        return "the token has patient-level scopes but names no patient"
    return None


def needs_ehr_check(principal: Principal, contexts: set[str]) -> bool:
    """True when only user-level rights, with no patient in context, would allow the call.

    A patient claim (the EHR put that patient in the token's context) or system-level rights (a
    service account, an API key) settle it; `user/` scopes alone say what the user may do at the
    EHR, which chartbrief, reading with its own credentials, cannot see.

    >>> needs_ehr_check(Principal("jwt", "dr", frozenset()), {"user", "patient"})
    True
    >>> needs_ehr_check(Principal("jwt", "dr", frozenset(), patient="p1"), {"user"})
    False
    """
    return principal.patient is None and "system" not in contexts and "user" in contexts


async def ehr_allows(request: Request, patient_id: str) -> str | None:
    """Ask the EHR whether the caller may read `Patient/{patient_id}`: None if it answered 200,
    else why not. Only the configured FHIR base URL ever sees the caller's token, and nothing is
    kept: the next request asks again."""
    settings = get_settings(request)
    try:
        client = fhir_client(
            settings.fhir, http=get_http(request), auth=StaticToken(bearer_credential(request))
        )
    except SettingsError as exc:
        raise Unavailable(
            "user-level tokens are checked at the EHR's FHIR server, and none is configured "
            "(CHARTBRIEF_FHIR__BASE_URL)"
        ) from exc
    try:
        await client.read("Patient", patient_id)
    except (FhirAuthError, FhirNotFound) as exc:
        status = f"HTTP {exc.status}" if exc.status else type(exc).__name__
        return f"the EHR does not let this user read Patient/{patient_id} ({status})"
    return None


async def authorize(
    db: sessionmaker[Session],
    request: Request,
    principal: Principal,
    interaction: Interaction,
    patient_id: str,
) -> None:
    """Allow, or audit the refusal and raise 403 with a reason the caller can act on."""
    contexts = contexts_for(principal, interaction)
    problem = scope_problem(principal, contexts, interaction, patient_id)
    detail = f"{principal.kind} access"
    failure: ApiError | None = None
    if problem is None and needs_ehr_check(principal, contexts):
        if get_settings(request).api.user_tokens == "refuse":
            problem = USER_TOKENS_REFUSED
        else:
            detail = "user-level jwt access, allowed by the EHR"
            try:
                problem = await ehr_allows(request, patient_id)
            except FhirError as exc:
                # Fail closed: an EHR that cannot answer has not allowed anything.
                failure = BadGateway(
                    f"the EHR's FHIR server could not confirm this user's access to Patient/{patient_id} "
                    f"({type(exc).__name__}); try again later"
                )
            except Unavailable as exc:
                failure = exc
    refusal = problem or (failure.message if failure is not None else None)
    await in_thread(
        audit.record,
        db,
        actor=principal.subject,
        action=f"api.{interaction}",
        outcome="denied" if refusal else "ok",
        patient_id=patient_id,
        detail=refusal or detail,
        request_id=request.state.request_id,
    )
    if failure is not None:
        raise failure
    if problem:
        raise Forbidden(problem)


def describe_failure(exc: BaseException) -> str:
    """A job's error message: the kind of failure, never patient data (`service.errors`)."""
    fault = fault_of(exc)
    return f"unexpected failure: {type(exc).__name__}" if fault is UNEXPECTED else fault.says(exc)


# -- routes ---------------------------------------------------------------------------------------


@router.post("/summaries", status_code=202, responses=ERROR_RESPONSES, summary="Start a summary (a job)")
async def create_summary(
    body: SummaryRequest,
    request: Request,
    principal: PrincipalDep,
    db: DatabaseDep,
    fhir: ApiFhirDep,
    pipeline: PipelineDep,
    jobs: JobsDep,
    admission: AdmissionDep,
) -> JSONResponse:
    await authorize(db, request, principal, "create", body.patient)
    svc = pipeline.services(fhir.ready())
    place = await take_place(admission, db, request, principal, body.patient, "job")

    async def run() -> dict[str, Any]:
        result = await summarize_patient(svc, body.patient, encounter_id=body.encounter, skip_unchanged=True)
        return result.to_json()

    try:
        job = jobs.submit(
            run,
            patient_id=body.patient,
            encounter_id=body.encounter,
            requested_by=principal.subject,
            describe_error=describe_failure,
            place=place,
        )
    except BaseException:
        place.release()
        raise
    location = f"/api/summaries/{job.id}"
    return JSONResponse(
        {"id": job.id, "status": job.status, "links": {"self": location}},
        status_code=202,
        headers={"Location": location},
    )


@router.get(
    "/summaries/{job_id}", responses=ERROR_RESPONSES, summary="A summary job and, once done, its result"
)
async def get_summary(
    job_id: str, request: Request, principal: PrincipalDep, db: DatabaseDep, jobs: JobsDep
) -> JSONResponse:
    unknown = NotFound(f"no summary job {job_id[:64]!r} (jobs are remembered until the service restarts)")
    job = jobs.get(job_id)
    if job is None:
        raise unknown
    try:
        await authorize(db, request, principal, "read", job.patient_id)
    except Forbidden as exc:
        # Audited as denied by `authorize`; the caller learns no more than for an unknown id, so a
        # job id cannot be used to find out that a job (of some other patient) exists.
        raise unknown from exc
    return JSONResponse(job.to_json())


@router.get(
    "/patients/{patient_id}/summaries/latest",
    responses=ERROR_RESPONSES,
    summary="The latest summary recorded for a patient",
)
async def latest_summary(
    patient_id: str,
    request: Request,
    principal: PrincipalDep,
    db: DatabaseDep,
    fhir: ApiFhirDep,
    store: StoreDep,
) -> JSONResponse:
    if not is_fhir_id(patient_id):
        raise BadRequest("patient id is not a valid FHIR id ([A-Za-z0-9-.]{1,64})")
    await authorize(db, request, principal, "read", patient_id)
    client = fhir.ready()
    row = await in_thread(store.latest_for_patient, client.base_url, patient_id)
    if row is None:
        raise NotFound(f"no summary is recorded for Patient/{patient_id}")
    body: dict[str, Any] = {
        "id": row.id,
        "created": row.created_at.isoformat(),
        "patient": row.patient_id,
        "encounter": row.encounter_id,
        "outcome": row.outcome,
        "document_reference": row.document_reference,
        "provenance": row.provenance,
        "claims_kept": row.claims_kept,
        "claims_dropped": row.claims_dropped,
        "model": {"name": row.model_name, "sha256": row.model_sha256, "sampling": row.sampling},
        "prompt": {"id": row.prompt_id, "version": row.prompt_version, "sha256": row.prompt_sha256},
        "document": None,
    }
    if row.document_reference:
        body["document"] = await _document_state(client, row.document_reference)
    return JSONResponse(body)


async def _document_state(client: FhirClient, reference: str) -> dict[str, Any] | None:
    rtype, _, rid = reference.partition("/")
    try:
        doc = await client.read(rtype, rid)
    except FhirError as exc:
        log.warning("api.document_unreadable", document_reference=reference, error=type(exc).__name__)
        return None
    return {
        "status": doc.get("status"),
        "docStatus": doc.get("docStatus"),
        "version": (doc.get("meta") or {}).get("versionId"),
        "markdown": stored_markdown(doc),
    }


@router.post("/summaries/stream", responses=ERROR_RESPONSES, summary="Make a summary and stream it (SSE)")
async def stream_summary_events(
    body: SummaryRequest,
    request: Request,
    principal: PrincipalDep,
    db: DatabaseDep,
    fhir: ApiFhirDep,
    pipeline: PipelineDep,
    admission: AdmissionDep,
) -> Response:
    await authorize(db, request, principal, "create", body.patient)
    svc = pipeline.services(fhir.ready())
    place = await take_place(admission, db, request, principal, body.patient, "api-stream")
    # The background task covers a response whose body is never iterated (HEAD, a send that fails
    # first); the generator's own exit covers a client that goes away mid-stream.
    return EventSourceResponse(
        _api_events(svc, body, place), ping=15, background=BackgroundTask(place.release)
    )


async def take_place(
    admission: WorkAdmission,
    db: sessionmaker[Session],
    request: Request,
    principal: Principal,
    patient_id: str,
    kind: WorkKind,
) -> Place:
    """A place for the caller's summary, or the 429 - audited with the counts, nothing else."""
    try:
        return admission.admit(principal.subject, kind)
    except TooManyRequests as exc:
        await in_thread(
            audit.record,
            db,
            actor=principal.subject,
            action="api.create",
            outcome="denied",
            patient_id=patient_id,
            detail=exc.message,
            request_id=request.state.request_id,
        )
        raise


async def _api_events(svc: Services, body: SummaryRequest, place: Place) -> AsyncIterator[dict[str, str]]:
    try:
        async with aclosing(_api_summary_events(svc, body)) as events:
            async for item in events:
                yield item
        place.finish()
    finally:
        place.release()


async def _api_summary_events(svc: Services, body: SummaryRequest) -> AsyncGenerator[dict[str, str], None]:
    try:
        async with aclosing(stream_summary(svc, body.patient, encounter_id=body.encounter)) as events:
            async for event in events:
                if isinstance(event, Prepared):
                    prep = event.prep
                    sources = {
                        v.key: {"reference": v.reference, "date": v.date, "text": v.text, "value": v.value}
                        for v in source_views(prep.ctx, prep.structured.cited_keys())
                    }
                    data = {"structured": prep.structured.to_json(), "sources": sources}
                    yield {"event": "structured", "data": json.dumps(data, ensure_ascii=False)}
                elif isinstance(event, Token):
                    yield {"event": "token", "data": json.dumps({"text": event.text}, ensure_ascii=False)}
                elif isinstance(event, Finished):
                    yield {"event": "result", "data": json.dumps(event.result.to_json(), ensure_ascii=False)}
    except ChartbriefError as exc:
        outcome = operation_outcome(fault_of(exc).issue, describe_failure(exc))
        yield {"event": "error", "data": json.dumps(outcome)}


def is_fhir_id(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "-.") for c in value)
