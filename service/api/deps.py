"""What the routes share, opened once by the app's lifespan and handed to routes as `Annotated` deps.

`Runtime` holds the process-wide objects (settings, the shared httpx client, the record store and
its sessionmaker, the token cipher, the SMART client, the model once loaded, the job registry).
It lives on `app.state.runtime`; nothing here is a module-level global.

What it must not do: open anything per request that could be shared, or keep per-user state.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.client import FhirClient
from fhir_adapters.smart import SmartClient, SmartConfiguration, discover
from service.api.errors import Unavailable
from service.api.jobs import JobRegistry
from service.api.security import JwtVerifier
from service.config import Settings, SmartSettings
from service.db.launch import TokenCipher
from service.db.store import SqlSummaryStore
from service.llm.base import Engine

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
        self._lock = asyncio.Lock()

    async def get(self, iss: str) -> SmartConfiguration:
        async with self._lock:
            cached = self._configs.get(iss)
            if cached is not None and time.monotonic() - cached[0] < self._ttl:
                return cached[1]
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
class Runtime:
    settings: Settings
    http: httpx.AsyncClient
    store: SqlSummaryStore
    cipher: TokenCipher
    smart_client: SmartClient
    discovery: DiscoveryCache
    jobs: JobRegistry
    templates: Jinja2Templates
    csrf_secret: bytes
    verifier: JwtVerifier | None = None
    service_client: FhirClient | None = None  # settings.fhir: the REST API's FHIR server
    engine: Engine | None = None
    engine_error: str | None = None
    background: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def db(self) -> sessionmaker[Session]:
        return self.store.sessions

    def ready_engine(self) -> Engine:
        if self.engine is None:
            if self.engine_error:
                raise Unavailable(f"the model could not be loaded: {self.engine_error}")
            raise Unavailable("the model is still loading; try again in a moment")
        return self.engine


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_engine(request: Request) -> Engine:
    return get_runtime(request).ready_engine()


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
EngineDep = Annotated[Engine, Depends(get_engine)]
