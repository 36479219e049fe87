"""The batch's way into a FHIR server: the server's clock and chartbrief's credentials (from
`service.runtime`, the composition root), and the pipeline services on top.

A batch runs unattended, so it authenticates with SMART Backend Services (or a static token), and
every answer's `Date` header is remembered: the watermark of an incremental run is the server's
time, never this machine's. Both runners (local and queue) open their servers here.

What it must not do: read or log anything of a patient (it opens connections, nothing more).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager

from service import runtime
from service.batch.request import BatchError
from service.config import Settings
from service.runtime import FhirConnection, ServerClock
from service.runtime import services as services_for


@asynccontextmanager
async def open_fhir(settings: Settings, fhir_base: str | None = None) -> AsyncGenerator[FhirConnection, None]:
    """`runtime.open_fhir` for `fhir_base`, or the configured server; a batch without one is refused."""
    base = fhir_base or settings.fhir.base_url
    if not base:
        raise BatchError("no FHIR server configured: set CHARTBRIEF_FHIR__BASE_URL or pass --fhir-base")
    async with runtime.open_fhir(settings, base) as conn:
        yield conn


__all__ = ["FhirConnection", "ServerClock", "open_fhir", "services_for"]
