"""`create_app(settings)`: the FastAPI application, built from settings, with nothing global.

The lifespan opens what the process shares (one httpx client, the record store and its
sessionmaker, the SMART client, the FHIR client of the REST API, the job registry) and loads the
model in a worker thread, so `/healthz` answers at once and `/readyz` says when the model is
there. Routes reach each part through its dependency in `service.api.deps`.

Errors: `ApiError` and HTTP errors become FHIR OperationOutcome JSON under `/api` and a short
HTML page elsewhere; anything unexpected is a 500 whose log line names the exception type only.

What it must not do: start in production with the development session secret, log a query
string (the callback's carries the authorization code and state), or serve a page without its
security headers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from wsgiref.simple_server import WSGIServer

import httpx
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import start_http_server
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_adapters.client import FhirClient
from fhir_adapters.errors import ChartbriefError
from service import runtime as runtime_parts
from service.api.deps import (
    STATIC_DIR,
    TEMPLATES_DIR,
    DiscoveryCache,
    ModelSlot,
    Runtime,
    smart_client_from,
)
from service.api.errors import FHIR_JSON, ApiError, Unauthenticated, issue_code_for_status, operation_outcome
from service.api.jobs import JobRegistry
from service.api.limits import WorkAdmission
from service.api.routes import api, cds, fhir_operation, health, launch, metrics, review
from service.api.security import JwtVerifier, SecurityHeaders, frame_ancestor_origins, page_csp
from service.api.throttle import BodyLimit, Throttle
from service.config import Settings, web_settings_problems
from service.db.launch import TokenCipher, purge_expired
from service.db.store import in_thread
from service.errors import fault_of
from service.fhir import fhir_client
from service.llm import create_engine
from service.llm.base import Engine, EngineError

log = structlog.get_logger(__name__)


def create_app(
    settings: Settings, *, engine: Engine | None = None, http: httpx.AsyncClient | None = None
) -> FastAPI:
    """The chartbrief web service. `engine` / `http` are used as given (and not closed) when passed."""
    problems = web_settings_problems(settings)
    if problems:
        raise ValueError("; ".join(problems))
    smart_client = smart_client_from(settings.smart)  # a bad key file fails here, not at the first launch
    secret = settings.smart.session_secret.get_secret_value()
    cipher = TokenCipher(secret)
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_http = http is None
        shared = http or runtime_parts.http_client(settings, max_connections=64)
        store = runtime_parts.open_store(settings)
        runtime = Runtime(
            settings=settings,
            http=shared,
            store=store,
            cipher=cipher,
            smart_client=smart_client,
            discovery=DiscoveryCache(shared, allow_http=settings.environment == "development"),
            jobs=JobRegistry(settings.api.max_jobs),
            admission=WorkAdmission.from_settings(settings.api),
            templates=templates,
            csrf_secret=secret.encode("utf-8"),
            verifier=_verifier(settings, shared),
            service_client=_service_client(settings, shared),
            model=ModelSlot(engine=engine),
        )
        app.state.runtime = runtime
        metrics_server = _watch(runtime)
        if settings.api.purge_interval_seconds > 0:
            purge = asyncio.create_task(_purge_every(runtime, settings.api.purge_interval_seconds))
            runtime.background.add(purge)
            purge.add_done_callback(runtime.background.discard)
        if engine is None:
            task = asyncio.create_task(_load_engine(runtime.model, settings))
            runtime.background.add(task)
            task.add_done_callback(runtime.background.discard)
        log.info("api.started", environment=settings.environment, issuers=len(settings.smart.allowed_issuers))
        try:
            yield
        finally:
            for task in list(runtime.background):
                task.cancel()
            await runtime.jobs.aclose()
            if runtime.service_client is not None:
                await runtime.service_client.aclose()
            if engine is None and runtime.model.engine is not None:
                await runtime.model.engine.aclose()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            store.close()
            if own_http:
                await shared.aclose()

    docs = settings.api.docs_enabled
    if docs is None:
        docs = settings.environment == "development"
    app = FastAPI(
        title="chartbrief",
        summary="AI-drafted, source-checked clinical summaries from FHIR, reviewed by clinicians.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    for module in (health, metrics, launch, review, api, cds, fhir_operation):
        app.include_router(module.router)
    _install_error_handlers(app, templates)
    csp = page_csp(frame_ancestor_origins(settings.smart.frame_ancestors, settings.smart.allowed_issuers))
    app.state.throttle = Throttle.from_settings(
        settings.api, state_ttl_seconds=settings.smart.state_ttl_seconds
    )
    app.add_middleware(BodyLimit, max_bytes=settings.api.max_body_bytes)
    app.add_middleware(SecurityHeaders, csp=csp, hsts=settings.environment == "production")
    app.add_middleware(RequestLog)
    return app


def _watch(runtime: Runtime) -> WSGIServer | None:
    """Tell the metrics what they count, and serve them on their own port if one is set."""
    figures = runtime.metrics
    figures.watch(in_flight=lambda: runtime.admission.in_flight, jobs_live=lambda: runtime.jobs.live)
    figures.watch_database(runtime.db)
    figures.watch_model(lambda: runtime.model.engine.identity if runtime.model.engine is not None else None)
    runtime.admission.on_refusal = figures.refused
    runtime.jobs.on_failure = figures.summary_failed
    port = runtime.settings.metrics.port
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=runtime.settings.metrics.host, registry=figures.registry)
    log.info("api.metrics_port", port=port)
    return server


async def _purge_every(runtime: Runtime, seconds: int) -> None:
    """Delete expired sign-in states and sessions now and every `seconds` (`chartbrief db purge`)."""
    while True:
        try:
            purged = await in_thread(purge_expired, runtime.db)
        except SQLAlchemyError as exc:
            # The next round tries again; a database that stays away shows in /readyz.
            log.warning("api.purge_failed", error=type(exc).__name__)
        else:
            log.info("api.purged", launch_states=purged.launch_states, sessions=purged.sessions)
        await asyncio.sleep(seconds)


def _service_client(settings: Settings, http: httpx.AsyncClient) -> FhirClient | None:
    """The REST API's own FHIR server, with chartbrief's credentials (`runtime.credentials`)."""
    base = settings.fhir.base_url
    if not base:
        return None
    return fhir_client(settings.fhir, http=http, auth=runtime_parts.credentials(settings, http, base))


def _verifier(settings: Settings, http: httpx.AsyncClient) -> JwtVerifier | None:
    api = settings.api
    if not api.jwt_issuer or not api.jwks_url:
        return None
    return JwtVerifier(
        http,
        issuer=api.jwt_issuer,
        jwks_url=api.jwks_url,
        audience=api.audience or settings.smart.public_base_url,
        algorithms=api.jwt_algorithms,
        leeway_seconds=api.leeway_seconds,
        cache_seconds=api.jwks_cache_seconds,
    )


async def _load_engine(model: ModelSlot, settings: Settings) -> None:
    started = time.perf_counter()
    try:
        model.engine = await asyncio.to_thread(create_engine, settings.llm)
    except EngineError as exc:
        model.error = str(exc)
        log.error("api.model_failed", error=type(exc).__name__)
        return
    log.info("api.model_ready", seconds=round(time.perf_counter() - started, 2))


# -- request ids and one log line per request ---------------------------------------------------


class RequestLog:
    """Gives each request an id (response header `X-Request-ID`, log context, audit rows) and logs
    one line: method, path (never the query string), status, milliseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode("ascii")))
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not scope.get("path", "").startswith("/static/"):
                log.info(
                    "http.request",
                    method=scope.get("method"),
                    path=scope.get("path"),
                    status=status,
                    ms=round((time.perf_counter() - started) * 1000, 1),
                )
            structlog.contextvars.unbind_contextvars("request_id")


# -- errors ------------------------------------------------------------------------------------


def _is_api(request: Request) -> bool:
    return request.url.path.startswith(("/api", "/fhir"))


def error_response(
    request: Request,
    templates: Jinja2Templates,
    *,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> Response:
    """OperationOutcome JSON for the API, a short page for people."""
    if _is_api(request):
        return JSONResponse(
            operation_outcome(code, message), status_code=status, headers=headers, media_type=FHIR_JSON
        )
    title = {
        401: "Please open chartbrief from the EHR",
        403: "Not allowed",
        404: "Not found",
        409: "The draft changed",
        413: "This request is too large",
        429: "chartbrief is busy",
        503: "Not ready yet",
    }.get(status, "Something went wrong" if status >= 500 else "This request cannot be used")
    page = templates.TemplateResponse(
        request, "error.html", {"title": title, "message": message, "hint": None}, status_code=status
    )
    for name, value in (headers or {}).items():
        if name.lower() != "www-authenticate":
            page.headers[name] = value
    return page


def _install_error_handlers(app: FastAPI, templates: Jinja2Templates) -> None:
    @app.exception_handler(ChartbriefError)
    async def chartbrief_error(request: Request, exc: ChartbriefError) -> Response:
        # The web service's one translation of chartbrief's errors (the table is service.errors).
        fault = fault_of(exc)
        headers = exc.headers if isinstance(exc, ApiError) else {}
        if fault.http_status == 401 and not headers:
            headers = Unauthenticated("").headers
        if fault.http_status >= 500 and not isinstance(exc, ApiError):
            log.warning("api.failed", path=request.url.path, error=type(exc).__name__)
        return error_response(
            request,
            templates,
            status=fault.http_status,
            code=fault.issue,
            message=fault.says(exc),
            headers=headers,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return error_response(
            request,
            templates,
            status=exc.status_code,
            code=issue_code_for_status(exc.status_code),
            message=message,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'request'}: {err.get('msg')}"
            for err in exc.errors()
        )
        return error_response(request, templates, status=400, code="invalid", message=problems[:500])

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("api.unexpected_error", path=request.url.path, error=type(exc).__name__)
        return error_response(
            request,
            templates,
            status=500,
            code="exception",
            message="chartbrief failed to handle this request; the error was logged (without patient data)",
        )


__all__ = ["create_app", "error_response"]
