"""The composition root: how a chartbrief process opens what it shares, from `Settings`, in one place.

Every entry point builds its parts here, and nothing here is global:
- `chartbrief summarize` (and the other one-shot commands) open `open_services`;
- the web service's lifespan takes its HTTP client, its store, its model slot and the REST API's
  credentials from `http_client`, `open_store`, `EngineSlot` and `credentials`;
- `chartbrief batch run` and `chartbrief batch worker` open each FHIR server with `open_fhir`
  (credentials, the server's clock) and the model with `EngineSlot`, and join them with `services`.

Credentials are chosen in one place (`credentials`): SMART Backend Services when configured, else the
static bearer token (sent only to the configured server), else none. A model is loaded at its first
use (`EngineSlot.get`), so a night with nothing to summarize, or a command refused for a bad
argument, never pays for a model load; it is closed by whoever opened it, never when it was given.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from fhir_adapters.auth import StaticToken, TokenProvider
from fhir_adapters.auth.backend import BackendClient, BackendServicesToken
from fhir_adapters.auth.scopes import DEFAULT_SYSTEM_SCOPES
from fhir_adapters.client import FhirClient, parse_http_date
from service.config import Settings, SettingsError
from service.db.store import SqlSummaryStore, SummaryStore
from service.fhir import fhir_client
from service.llm import create_engine
from service.llm.base import Engine
from service.pipeline import Services

ResponseHook = Callable[[httpx.Response], Awaitable[None]]


def http_client(
    settings: Settings, *, max_connections: int = 32, on_response: Sequence[ResponseHook] = ()
) -> httpx.AsyncClient:
    """The HTTP client a process shares for FHIR, SMART and JWKS requests (the FHIR timeout)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.fhir.timeout_seconds),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=16),
        event_hooks={"response": list(on_response)},
    )


def credentials(settings: Settings, http: httpx.AsyncClient, fhir_base: str) -> TokenProvider | None:
    """chartbrief's own credentials for `fhir_base`: SMART Backend Services when configured, else the
    static bearer token when `fhir_base` is the configured server, else none."""
    backend = settings.backend
    if backend.enabled:
        path = backend.private_key_path
        assert path is not None  # checked by BackendSettings
        try:
            pem = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise SettingsError(
                f"CHARTBRIEF_BACKEND__PRIVATE_KEY_PATH: cannot read {path} ({type(exc).__name__})"
            ) from exc
        client = BackendClient(
            client_id=str(backend.client_id),
            private_key_pem=pem,
            alg=backend.alg,
            kid=backend.kid,
            scope=backend.scope or DEFAULT_SYSTEM_SCOPES,
            token_url=backend.token_url,
        )
        return BackendServicesToken(http, fhir_base, client)
    configured = (settings.fhir.base_url or "").rstrip("/")
    if settings.fhir.bearer_token and fhir_base.rstrip("/") == configured:
        return StaticToken(settings.fhir.bearer_token)
    return None


def open_store(settings: Settings) -> SqlSummaryStore:
    """The summary store of `CHARTBRIEF_DB__URL` (schema at the newest migration)."""
    return SqlSummaryStore.from_url(settings.db.url)


class EngineSlot:
    """The model: the one given, or loaded from `Settings.llm` at the first `get()`; closed by
    `aclose()` only when loaded here."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self._settings = settings
        self._engine = engine
        self._owned = False

    def get(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self._settings.llm)
            self._owned = True
        return self._engine

    async def aclose(self) -> None:
        if self._owned and self._engine is not None:
            await self._engine.aclose()
            self._engine = None
            self._owned = False

    async def __aenter__(self) -> EngineSlot:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ServerClock:
    """Remembers the FHIR server's time from the `Date` header of each answer (an httpx hook)."""

    def __init__(self) -> None:
        self.latest: datetime | None = None

    async def observe(self, response: httpx.Response) -> None:
        when = parse_http_date(response.headers.get("date"))
        if when is not None:
            self.latest = when


@dataclass
class FhirConnection:
    client: FhirClient
    clock: ServerClock


@asynccontextmanager
async def open_fhir(settings: Settings, fhir_base: str) -> AsyncGenerator[FhirConnection, None]:
    """A client for `fhir_base` on its own HTTP client, with chartbrief's credentials, whose answers
    keep a `ServerClock` current (an unattended run's watermark is the server's time)."""
    clock = ServerClock()
    http = http_client(settings, on_response=[clock.observe])
    try:
        auth = credentials(settings, http, fhir_base)
        client = fhir_client(settings.fhir, base_url=fhir_base.rstrip("/"), http=http, auth=auth)
        yield FhirConnection(client=client, clock=clock)
    finally:
        await http.aclose()


def services(settings: Settings, client: FhirClient, engine: Engine, store: SummaryStore) -> Services:
    """Pipeline services reading and writing through `client` (its server is the settings' server)."""
    scoped = settings.model_copy(
        update={"fhir": settings.fhir.model_copy(update={"base_url": client.base_url})}
    )
    return Services(settings=scoped, client=client, engine=engine, store=store)


@asynccontextmanager
async def open_services(
    settings: Settings, *, engine: Engine | None = None
) -> AsyncGenerator[Services, None]:
    """Ready `Services` for the configured FHIR server; the model is loaded before the first FHIR
    request is made, so a missing model fails fast."""
    base = settings.fhir.base_url
    if not base:
        raise SettingsError("no FHIR server configured: set CHARTBRIEF_FHIR__BASE_URL or pass --fhir-base")
    async with EngineSlot(settings, engine) as model:
        loaded = model.get()
        store = open_store(settings)
        try:
            async with open_fhir(settings, base) as conn:
                yield services(settings, conn.client, loaded, store)
        finally:
            store.close()


__all__ = [
    "EngineSlot",
    "FhirConnection",
    "ServerClock",
    "credentials",
    "http_client",
    "open_fhir",
    "open_services",
    "open_store",
    "services",
]
