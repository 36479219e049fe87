"""The FHIR side as this deployment configures it: the client and the write options, from `Settings`.

`fhir_adapters` takes plain values and never reads settings; this is the one place that turns
`Settings.fhir` into a `FhirClient` and `Settings.writer` into `WriteOptions`. A caller that
talks to another server than the configured one (an EHR launch's `iss`) passes `base_url` and
keeps every other setting.

What it must not do: open a connection (the client does that on its first request), or send the
configured static bearer token to any server but the configured one.
"""

from __future__ import annotations

import httpx

from fhir_adapters.auth import StaticToken, TokenProvider
from fhir_adapters.client import FhirClient
from fhir_adapters.client.search import ReadLimits
from fhir_adapters.write.draft import WriteOptions
from service.config import FhirSettings, SettingsError, WriterSettings


def fhir_client(
    settings: FhirSettings,
    *,
    base_url: str | None = None,
    http: httpx.AsyncClient | None = None,
    auth: TokenProvider | None = None,
) -> FhirClient:
    """A client for `base_url` (default: the configured server) with the configured timeouts,
    paging and retries.

    Without `auth`, the configured static bearer token is used, and only for the configured
    server: it was issued for that one.
    """
    base = base_url or settings.base_url
    if not base:
        raise SettingsError("no FHIR server configured: set CHARTBRIEF_FHIR__BASE_URL or pass --fhir-base")
    if auth is None and settings.bearer_token and base_url in (None, settings.base_url):
        auth = StaticToken(settings.bearer_token)
    return FhirClient(
        base,
        http=http,
        auth=auth,
        timeout=settings.timeout_seconds,
        page_size=settings.page_size,
        max_attempts=settings.max_attempts,
        backoff_initial=settings.backoff_initial_seconds,
        backoff_max=settings.backoff_max_seconds,
        limits=ReadLimits(
            max_pages=settings.max_pages_per_search,
            max_resources=settings.max_resources_per_search,
            max_response_bytes=settings.max_response_bytes,
            max_attachment_bytes=settings.max_attachment_bytes,
        ),
        file_hosts=settings.bulk_file_hosts,
    )


def write_options(settings: WriterSettings) -> WriteOptions:
    """How drafts are written, from `Settings.writer`."""
    return WriteOptions(
        identifier_system=settings.identifier_system,
        loinc_type=settings.loinc_type,
        include_structured_json=settings.include_structured_json,
    )
