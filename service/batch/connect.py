"""The batch's way into a FHIR server: its credentials, its clock, and the pipeline services on top.

A batch runs unattended, so it authenticates with SMART Backend Services (or a static token), and
every answer's `Date` header is remembered: the watermark of an incremental run is the server's
time, never this machine's. Both runners (local and queue) open their servers here.

What it must not do: read or log anything of a patient (it opens connections, nothing more).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from fhir_adapters.auth import StaticToken, TokenProvider
from fhir_adapters.auth.backend import BackendClient, BackendServicesToken
from fhir_adapters.auth.scopes import DEFAULT_SYSTEM_SCOPES
from fhir_adapters.client import FhirClient, parse_http_date
from service.batch.request import BatchError
from service.config import Settings
from service.db.store import SummaryStore
from service.fhir import fhir_client
from service.llm.base import Engine
from service.pipeline import Services


class ServerClock:
    """Remembers the FHIR server's time from the `Date` header of each answer (an httpx hook)."""

    def __init__(self) -> None:
        self.latest: datetime | None = None

    async def observe(self, response: httpx.Response) -> None:
        when = parse_http_date(response.headers.get("date"))
        if when is not None:
            self.latest = when


def token_provider(settings: Settings, http: httpx.AsyncClient, fhir_base: str) -> TokenProvider | None:
    """SMART Backend Services when configured, else the static bearer token, else none."""
    backend = settings.backend
    if backend.enabled:
        path = backend.private_key_path
        assert path is not None  # checked by BackendSettings
        try:
            pem = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise BatchError(
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
    if settings.fhir.bearer_token:
        return StaticToken(settings.fhir.bearer_token)
    return None


@dataclass
class FhirConnection:
    client: FhirClient
    clock: ServerClock


@asynccontextmanager
async def open_fhir(settings: Settings, fhir_base: str | None = None) -> AsyncGenerator[FhirConnection, None]:
    """A FHIR client whose answers keep a `ServerClock` current, with the batch's credentials."""
    base = fhir_base or settings.fhir.base_url
    if not base:
        raise BatchError("no FHIR server configured: set CHARTBRIEF_FHIR__BASE_URL or pass --fhir-base")
    clock = ServerClock()
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.fhir.timeout_seconds),
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        event_hooks={"response": [clock.observe]},
    )
    try:
        auth = token_provider(settings, http, base)
        fhir = settings.fhir.model_copy(update={"base_url": base.rstrip("/")})
        client = fhir_client(fhir, http=http, auth=auth)
        yield FhirConnection(client=client, clock=clock)
    finally:
        await http.aclose()


def services_for(settings: Settings, client: FhirClient, engine: Engine, store: SummaryStore) -> Services:
    """Pipeline services for one FHIR server (a worker may serve runs of several)."""
    scoped = settings.model_copy(
        update={"fhir": settings.fhir.model_copy(update={"base_url": client.base_url})}
    )
    return Services(settings=scoped, client=client, engine=engine, store=store)
