"""The FHIR client: `FhirClient` (one send path, `fhir_client`) over pure helpers for search, paging
and URLs (`search`), for retry timing (`retry`) and for reading bodies under a cap (`bodies`).

Callers import from here; the modules below are the client's own layout.
"""

from fhir_adapters.client.bodies import operation_outcome
from fhir_adapters.client.fhir_client import FHIR_JSON, NDJSON, FhirClient
from fhir_adapters.client.retry import (
    RETRY_AFTER_CAP_SECONDS,
    backoff_seconds,
    parse_http_date,
    parse_retry_after,
)
from fhir_adapters.client.search import (
    JsonObject,
    SearchParams,
    bundle_resources,
    next_link,
    resolve_url,
    resource_key,
    same_origin,
    search_query,
    url_without_query,
    within_base,
)

__all__ = [
    "FHIR_JSON",
    "NDJSON",
    "RETRY_AFTER_CAP_SECONDS",
    "FhirClient",
    "JsonObject",
    "SearchParams",
    "backoff_seconds",
    "bundle_resources",
    "next_link",
    "operation_outcome",
    "parse_http_date",
    "parse_retry_after",
    "resolve_url",
    "resource_key",
    "same_origin",
    "search_query",
    "url_without_query",
    "within_base",
]
