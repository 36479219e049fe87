"""What the routes share, opened once by the app's lifespan, and the `Annotated` dependencies that hand
each route only the part it touches.

`Runtime` is what the lifespan opened (settings, the shared httpx client, the record store and its
sessionmaker, the token cipher, the SMART client, the model once loaded, the job registry, the
admission of model work); it lives on `app.state.runtime` and nothing here is a module-level global.
Routes never take it whole: they declare what they use (`SettingsDep`, `DatabaseDep`, `StoreDep`,
`TemplatesDep`, `ModelDep`, `PipelineDep`, `ApiFhirDep`, `AdmissionDep`, ...), so a route's
signature says what it touches.

Store calls from a route (or anything async below it) run in a worker thread through
`service.db.store.in_thread`: the database's sessions are synchronous, the event loop is not theirs.

What it must not do: open anything per request that could be shared, or keep per-user state.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import httpx
from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.auth.oauth import SmartClient, SmartConfiguration, discover
from fhir_adapters.client import FhirClient
from service.api.errors import Unavailable
from service.api.jobs import JobRegistry
from service.api.limits import WorkAdmission
from service.api.security import JwtVerifier
from service.config import Settings, SmartSettings
from service.db.launch import TokenCipher
from service.db.store import SqlSummaryStore, SummaryStore
from service.llm.base import Engine
from service.metrics import Metrics
from service.pipeline import Services

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"
DISCOVERY_TTL_SECONDS = 3600.0


class DiscoveryCache:
    """SMART configurations by issuer, refetched after an hour (an EHR rarely moves its endpoints)."""

    def __init__(
        self, http: httpx.AsyncClient, *, allow_http: bool, ttl: float = DISCOVERY_TTL_SECONDS
    ) -> None:
        self._http = http
        self._allow_http = allow_http
        self._ttl = ttl
        self._configs: dict[str, tuple[float, SmartConfiguration]] = {}
        # One lock per issuer (single flight per key): concurrent launches from one EHR share its
        # fetch, and a slow EHR holds up only its own launches. Issuers are the allowed ones only.
        self._locks: dict[str, asyncio.Lock] = {}

    def _fresh(self, iss: str) -> SmartConfiguration | None:
        cached = self._configs.get(iss)
        if cached is not None and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        return None

    async def get(self, iss: str) -> SmartConfiguration:
        config = self._fresh(iss)
        if config is not None:
            return config
        async with self._locks.setdefault(iss, asyncio.Lock()):
            config = self._fresh(iss)
            if config is None:
                config = await discover(self._http, iss, allow_http=self._allow_http)
                self._configs[iss] = (time.monotonic(), config)
            return config


def smart_client_from(settings: SmartSettings) -> SmartClient:
    """The SMART client chartbrief authenticates as: private_key_jwt, client secret, or public."""
    if settings.private_key_path is not None:
        path = settings.private_key_path.expanduser()
        try:
            pem = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(
                f"CHARTBRIEF_SMART__PRIVATE_KEY_PATH: cannot read {path} ({type(exc).__name__})"
            ) from exc
        try:
            return SmartClient(
                settings.client_id,
                private_key_pem=pem,
                kid=settings.private_key_kid,
                alg=settings.private_key_alg,
            )
        except ValueError as exc:
            raise ValueError(f"CHARTBRIEF_SMART__PRIVATE_KEY_PATH: {exc}") from exc
    secret = settings.client_secret.get_secret_value() if settings.client_secret else None
    return SmartClient(settings.client_id, client_secret=secret or None)


@dataclass
class ModelSlot:
    """The model, loaded in a worker thread after start-up: empty while loading, or why it failed."""

    engine: Engine | None = None
    error: str | None = None

    @property
    def state(self) -> Literal["loaded", "failed", "loading"]:
        if self.engine is not None:
            return "loaded"
        return "failed" if self.error else "loading"

    def ready(self) -> Engine:
        """The loaded model, or `Unavailable` (503) saying whether it is loading or failed."""
        if self.engine is None:
            if self.error:
                raise Unavailable(f"the model could not be loaded: {self.error}")
            raise Unavailable("the model is still loading; try again in a moment")
        return self.engine


@dataclass(frozen=True)
class Pipeline:
    """What a route needs to run the summary pipeline, once it has decided to: the model is asked for
    only then, so a refused or malformed request is answered as such while the model loads."""

    settings: Settings
    store: SummaryStore
    model: ModelSlot
    metrics: Metrics | None = None

    def services(self, client: FhirClient) -> Services:
        """`Services` reading and writing through `client` (a session's EHR, or the API's server)."""
        observer = self.metrics.summary_done if self.metrics is not None else None
        engine, store = self.model.ready(), self.store
        return Services(settings=self.settings, client=client, engine=engine, store=store, observer=observer)


@dataclass(frozen=True)
class ApiFhir:
    """The REST API's FHIR server (`CHARTBRIEF_FHIR__BASE_URL`, chartbrief's own credentials), if set."""

    client: FhirClient | None

    def ready(self) -> FhirClient:
        """The client, or `Unavailable` (503) naming the setting that is missing."""
        if self.client is None:
            raise Unavailable("no FHIR server is configured for the API (CHARTBRIEF_FHIR__BASE_URL)")
        return self.client


@dataclass
class Runtime:
    """What the lifespan opened and closes; the dependencies below hand out its parts."""

    settings: Settings
    http: httpx.AsyncClient
    store: SqlSummaryStore
    cipher: TokenCipher
    smart_client: SmartClient
    discovery: DiscoveryCache
    jobs: JobRegistry
    admission: WorkAdmission
    templates: Jinja2Templates
    csrf_secret: bytes
    verifier: JwtVerifier | None = None
    service_client: FhirClient | None = None  # settings.fhir: the REST API's FHIR server
    model: ModelSlot = field(default_factory=ModelSlot)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def db(self) -> sessionmaker[Session]:
        return self.store.sessions


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_settings(request: Request) -> Settings:
    return get_runtime(request).settings


def get_database(request: Request) -> sessionmaker[Session]:
    """The sessionmaker of chartbrief's database: audit, launch state, sessions, API keys."""
    return get_runtime(request).db


def get_store(request: Request) -> SummaryStore:
    return get_runtime(request).store


def get_templates(request: Request) -> Jinja2Templates:
    return get_runtime(request).templates


def get_model(request: Request) -> ModelSlot:
    return get_runtime(request).model


def get_jobs(request: Request) -> JobRegistry:
    return get_runtime(request).jobs


def get_admission(request: Request) -> WorkAdmission:
    return get_runtime(request).admission


def get_csrf_secret(request: Request) -> bytes:
    return get_runtime(request).csrf_secret


def get_cipher(request: Request) -> TokenCipher:
    return get_runtime(request).cipher


def get_http(request: Request) -> httpx.AsyncClient:
    return get_runtime(request).http


def get_discovery(request: Request) -> DiscoveryCache:
    return get_runtime(request).discovery


def get_smart_client(request: Request) -> SmartClient:
    return get_runtime(request).smart_client


def get_verifier(request: Request) -> JwtVerifier | None:
    return get_runtime(request).verifier


def get_pipeline(request: Request) -> Pipeline:
    runtime = get_runtime(request)
    metrics = runtime.metrics
    return Pipeline(settings=runtime.settings, store=runtime.store, model=runtime.model, metrics=metrics)


def get_api_fhir(request: Request) -> ApiFhir:
    return ApiFhir(get_runtime(request).service_client)


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[sessionmaker[Session], Depends(get_database)]
StoreDep = Annotated[SummaryStore, Depends(get_store)]
TemplatesDep = Annotated[Jinja2Templates, Depends(get_templates)]
ModelDep = Annotated[ModelSlot, Depends(get_model)]
JobsDep = Annotated[JobRegistry, Depends(get_jobs)]
AdmissionDep = Annotated[WorkAdmission, Depends(get_admission)]
CsrfSecretDep = Annotated[bytes, Depends(get_csrf_secret)]
CipherDep = Annotated[TokenCipher, Depends(get_cipher)]
HttpDep = Annotated[httpx.AsyncClient, Depends(get_http)]
DiscoveryDep = Annotated[DiscoveryCache, Depends(get_discovery)]
SmartClientDep = Annotated[SmartClient, Depends(get_smart_client)]
VerifierDep = Annotated[JwtVerifier | None, Depends(get_verifier)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
ApiFhirDep = Annotated[ApiFhir, Depends(get_api_fhir)]
