"""The FHIR operation face: `Patient/{id}/$summarize`, for FHIR clients that speak operations.

```
POST /fhir/Patient/{id}/$summarize           Parameters body -> Bundle (collection)
     with Prefer: respond-async              -> 202, Content-Location: the status URL
GET  /fhir/$summarize-status/{job}            202 + X-Progress while it runs; then 200, a
                                              batch-response Bundle holding the answer
GET  /fhir/Patient/{id}/$summarize?...        always a dry run -> Bundle (collection)
GET  /fhir/metadata                           the CapabilityStatement
GET  /fhir/OperationDefinition/chartbrief-summarize
```

`Prefer: respond-async` is FHIR R4's asynchronous request pattern: the summary runs as a job of the
REST API's registry (admitted as a "job", its bounds hold) and the client polls the status URL. The
finished answer is a `batch-response` Bundle whose one entry carries the operation's response: its
status (`200 OK`, or the 4xx the synchronous call would have answered, with its OperationOutcome)
and the collection Bundle. A status URL is readable only by a caller allowed to read that patient;
any other caller, like an unknown id, gets 404. Jobs are remembered until the service restarts.

The parameters are `service.api.operation`'s one table. The answer is a collection Bundle with the
DocumentReference, the Device and the Provenance: on a real run as the FHIR server holds them after
the write (read back, with their ids and versions), on a dry run as they would be written (built by
the writer's pure builders, nothing sent). A retried POST writes nothing new: the summary of the same
inputs, prompt and model is found by its idempotency key and returned as it stands.

Who may call, and for which patient, is exactly the REST API's rule (`routes.api.authorize`, with
the `create` interaction: making a summary, even unwritten, runs the model on the patient's
record), and the same admission bounds apply (429 with Retry-After). Errors are OperationOutcome.

What it must not do: have a second way to authenticate, write anything on a GET or a dry run, or
log anything but ids and counts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirNotFound
from fhir_adapters.write.draft import build_transaction
from service.api.deps import (
    AdmissionDep,
    ApiFhirDep,
    DatabaseDep,
    JobsDep,
    Pipeline,
    PipelineDep,
    get_settings,
)
from service.api.errors import FHIR_JSON, ApiError, BadRequest, Forbidden, NotFound, operation_outcome
from service.api.jobs import JobRegistry
from service.api.limits import WorkAdmission, WorkKind
from service.api.operation import (
    OPERATION_ID,
    SummarizeRequest,
    capability_statement,
    operation_definition,
    parse_parameters,
    parse_query,
)
from service.api.routes.api import (
    ERROR_RESPONSES,
    PrincipalDep,
    authorize,
    describe_failure,
    is_fhir_id,
    take_place,
)
from service.api.security import Principal
from service.fhir import write_options
from service.pipeline import Services, SummaryResult, summarize_patient
from service.prompts import PromptError, load_prompt

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/fhir", tags=["fhir"])

VERSION = "0.1.0"
ASYNC_KIND = "fhir-operation"  # the jobs a status URL may show
POLL_SECONDS = 2
# The order of the resources in the answer (and of the entries a transaction writes them with).
ANSWER_TYPES = ("DocumentReference", "Device", "Provenance")


def _fhir(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


@router.get("/metadata", summary="The CapabilityStatement of the FHIR operation face")
async def metadata(request: Request) -> JSONResponse:
    base = get_settings(request).smart.public_base_url
    today = datetime.now(UTC).date().isoformat()
    return _fhir(capability_statement(base, date=today, version=VERSION))


@router.get(f"/OperationDefinition/{OPERATION_ID}", summary="The $summarize OperationDefinition")
async def definition(request: Request) -> JSONResponse:
    return _fhir(operation_definition(get_settings(request).smart.public_base_url))


@router.post(
    "/Patient/{patient_id}/$summarize",
    responses=ERROR_RESPONSES,
    summary="Summarize a patient (FHIR operation)",
)
async def summarize_post(
    patient_id: str,
    request: Request,
    principal: PrincipalDep,
    db: DatabaseDep,
    fhir: ApiFhirDep,
    pipeline: PipelineDep,
    admission: AdmissionDep,
    jobs: JobsDep,
) -> JSONResponse:
    patient = _patient(patient_id)
    raw = await request.body()
    if raw.strip():
        try:
            body: object = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest("the request body is not JSON (a FHIR Parameters resource)") from exc
        operation = parse_parameters(body)
    else:
        operation = SummarizeRequest()
    await authorize(db, request, principal, "create", patient)
    queue = jobs if respond_async(request.headers.get("prefer", "")) else None
    return await _summarize(
        request, principal, db, fhir.ready(), pipeline, admission, patient, operation, jobs=queue
    )


@router.get(
    "/Patient/{patient_id}/$summarize",
    responses=ERROR_RESPONSES,
    summary="Summarize a patient without writing (FHIR operation, always a dry run)",
)
async def summarize_get(
    patient_id: str,
    request: Request,
    principal: PrincipalDep,
    db: DatabaseDep,
    fhir: ApiFhirDep,
    pipeline: PipelineDep,
    admission: AdmissionDep,
) -> JSONResponse:
    patient = _patient(patient_id)
    operation = parse_query(request.query_params.multi_items())
    await authorize(db, request, principal, "create", patient)
    return await _summarize(request, principal, db, fhir.ready(), pipeline, admission, patient, operation)


def _patient(patient_id: str) -> str:
    if not is_fhir_id(patient_id):
        raise BadRequest("patient id is not a valid FHIR id ([A-Za-z0-9-.]{1,64})")
    return patient_id


def _services(pipeline: Pipeline, client: FhirClient, operation: SummarizeRequest) -> Services:
    svc = pipeline.services(client)
    return _with_prompt(svc, operation.prompt_version) if operation.prompt_version is not None else svc


async def _answer(
    svc: Services, client: FhirClient, patient: str, operation: SummarizeRequest
) -> dict[str, Any]:
    """The operation's answer (a collection Bundle); a missing Patient or Encounter is NotFound."""
    try:
        await client.read("Patient", patient)
    except FhirNotFound as exc:
        raise NotFound(f"Patient/{patient} is not on the FHIR server") from exc
    try:
        result = await summarize_patient(
            svc,
            patient,
            encounter_id=operation.encounter,
            dry_run=operation.dry_run,
            skip_unchanged=not operation.dry_run,
        )
    except FhirNotFound as exc:
        if operation.encounter is None:
            raise
        raise NotFound(f"Encounter/{operation.encounter} is not on the FHIR server") from exc
    bundle = _would_write(svc, result) if operation.dry_run else await _written(client, result)
    log.info(
        "fhir.summarized",
        dry_run=operation.dry_run,
        unchanged=result.unchanged,
        entries=len(bundle["entry"]),
    )
    return bundle


def respond_async(prefer: str) -> bool:
    """True when a Prefer header asks for FHIR's asynchronous pattern (RFC 7240 tokens).

    >>> respond_async("respond-async"), respond_async("return=minimal, Respond-Async"), respond_async("")
    (True, True, False)
    """
    tokens = (part.split(";", 1)[0].strip().lower() for part in prefer.split(","))
    return "respond-async" in tokens


def _status_url(request: Request, job_id: str) -> str:
    base = get_settings(request).smart.public_base_url.rstrip("/")
    return f"{base}/fhir/$summarize-status/{job_id}"


async def _summarize(
    request: Request,
    principal: Principal,
    db: sessionmaker[Session],
    client: FhirClient,
    pipeline: Pipeline,
    admission: WorkAdmission,
    patient: str,
    operation: SummarizeRequest,
    jobs: JobRegistry | None = None,
) -> JSONResponse:
    """The answer while the request waits; with `jobs` (Prefer: respond-async), a job instead and
    202 with the status URL to poll."""
    svc = _services(pipeline, client, operation)
    # A place before anything is fetched, like every other model work (`service.api.limits`).
    kind: WorkKind = "api-stream" if jobs is None else "job"
    place = await take_place(admission, db, request, principal, patient, kind)
    if jobs is None:
        try:
            bundle = await _answer(svc, client, patient, operation)
            place.finish()
        finally:
            place.release()
        return _fhir(bundle)

    async def run() -> dict[str, Any]:
        try:
            bundle = await _answer(svc, client, patient, operation)
        except ApiError as exc:
            # The answer the synchronous call would have given, kept as the entry's response.
            return {"status": exc.status, "outcome": operation_outcome(exc.code, exc.message)}
        return {"status": 200, "resource": bundle}

    try:
        job = jobs.submit(
            run,
            patient_id=patient,
            encounter_id=operation.encounter,
            requested_by=principal.subject,
            describe_error=describe_failure,
            place=place,
            kind=ASYNC_KIND,
        )
    except BaseException:
        place.release()
        raise
    url = _status_url(request, job.id)
    log.info("fhir.accepted", job_id=job.id, patient_id=patient)
    accepted = operation_outcome("informational", f"accepted: poll {url}", severity="information")
    return JSONResponse(accepted, status_code=202, headers={"Content-Location": url}, media_type=FHIR_JSON)


@router.get(
    "/$summarize-status/{job_id}",
    responses=ERROR_RESPONSES,
    summary="The status of an asynchronous $summarize, and its answer once done",
)
async def summarize_status(
    job_id: str, request: Request, principal: PrincipalDep, db: DatabaseDep, jobs: JobsDep
) -> JSONResponse:
    unknown = NotFound(f"no $summarize request {job_id[:64]!r} (remembered until the service restarts)")
    job = jobs.get(job_id)
    if job is None or job.kind != ASYNC_KIND:
        raise unknown
    try:
        await authorize(db, request, principal, "read", job.patient_id)
    except Forbidden as exc:
        raise unknown from exc  # audited by `authorize`; a job id tells nobody else that it exists
    if not job.done:
        return JSONResponse(
            None, status_code=202, headers={"X-Progress": job.status, "Retry-After": str(POLL_SECONDS)}
        )
    if job.status == "failed" or job.result is None:
        outcome = operation_outcome("exception", job.error or "the summary failed")
        return _fhir(outcome, status=500)
    return _fhir(batch_response(job.result))


def batch_response(result: dict[str, Any]) -> dict[str, Any]:
    """The finished asynchronous answer: one entry with the operation's own status and body.

    >>> gone = {"status": 404, "outcome": {"resourceType": "OperationOutcome"}}
    >>> batch_response(gone)["entry"][0]["response"]
    {'status': '404 Not Found', 'outcome': {'resourceType': 'OperationOutcome'}}
    """
    status = int(result["status"])
    response: dict[str, Any] = {"status": f"{status} {HTTPStatus(status).phrase}"}
    if "outcome" in result:
        response["outcome"] = result["outcome"]
    entry: dict[str, Any] = {"response": response}
    if "resource" in result:
        entry = {"resource": result["resource"], **entry}
    return {
        "resourceType": "Bundle",
        "type": "batch-response",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "entry": [entry],
    }


def _with_prompt(svc: Services, spec: str) -> Services:
    """`svc` writing with the prompt `spec`, or `BadRequest` when this service has no such prompt."""
    settings = svc.settings
    try:
        load_prompt(spec, settings.prompts_dir)
    except PromptError as exc:
        raise BadRequest(f"parameter 'promptVersion': this service has no prompt {spec!r}") from exc
    return replace(svc, settings=settings.model_copy(update={"prompt": spec}))


def _collection(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "entry": entries,
    }


def _would_write(svc: Services, result: SummaryResult) -> dict[str, Any]:
    """The resources as the write would send them (the transaction's own builders), nothing sent."""
    if result.draft is None:
        raise RuntimeError("the pipeline returned no draft for a dry run")
    transaction = build_transaction(result.draft, write_options(svc.settings.writer), previous=None)
    entries: list[dict[str, Any]] = []
    for entry in transaction["entry"]:
        resource = entry["resource"]
        full_url = entry.get("fullUrl") or f"{svc.client.base_url}/{entry['request']['url']}"
        entries.append({"fullUrl": full_url, "resource": resource})
    entries.sort(key=lambda e: ANSWER_TYPES.index(e["resource"]["resourceType"]))
    return _collection(entries)


async def _written(client: FhirClient, result: SummaryResult) -> dict[str, Any]:
    """The written resources as the FHIR server holds them now: ids and versions are the server's."""
    write = result.write
    if write is None:
        raise RuntimeError("the pipeline returned no write result for a real run")
    entries: list[dict[str, Any]] = []
    for reference in (write.document_reference, write.device, write.provenance):
        rtype, _, rid = reference.partition("/")
        resource = await client.read(rtype, rid)
        entries.append({"fullUrl": f"{client.base_url}/{rtype}/{rid}", "resource": resource})
    return _collection(entries)
