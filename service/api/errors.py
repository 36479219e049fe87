"""How the web service says no: FHIR OperationOutcome JSON for the REST API, a short page for people.

The refusals are the `ApiError` branch of chartbrief's one error tree (`service.errors`, which
also gives every other error its status); they are re-exported here for the routes:

    ApiError (status, FHIR issue code, a message fit for the caller)
    |- Unauthenticated   401  no, expired, malformed or wrongly addressed credentials
    |- Forbidden         403  valid credentials, but not for this patient / scope / action
    |- NotFound          404
    |- Conflict          409  the draft changed since it was opened
    |- BadRequest        400  a request that names a field wrongly
    |- PayloadTooLarge   413  a request body over the limit (refused before it is read or parsed)
    |- TooManyRequests   429  a bound reached (queued work or requests per minute), with Retry-After
    |- BadGateway        502  the EHR (its FHIR server, SMART configuration or token endpoint) or the
    |                         model failed
    `- Unavailable       503  model not loaded yet, no FHIR server configured

Messages never carry a token, a note or a name; they name the field, the setting or the id.
"""

from __future__ import annotations

from typing import Any

from service.errors import (
    ApiError,
    BadGateway,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unauthenticated,
    Unavailable,
)

FHIR_JSON = "application/fhir+json"

__all__ = [
    "FHIR_JSON",
    "ApiError",
    "BadGateway",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "TooManyRequests",
    "Unauthenticated",
    "Unavailable",
    "issue_code_for_status",
    "operation_outcome",
]


def operation_outcome(code: str, diagnostics: str, *, severity: str = "error") -> dict[str, Any]:
    """A one-issue OperationOutcome.

    >>> operation_outcome("forbidden", "not your patient")["issue"][0]["code"]
    'forbidden'
    """
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def issue_code_for_status(status: int) -> str:
    """The FHIR issue type that fits an HTTP status chartbrief did not raise itself.

    >>> [issue_code_for_status(s) for s in (401, 404, 405, 422, 500)]
    ['login', 'not-found', 'not-supported', 'invalid', 'exception']
    """
    return {
        400: "invalid",
        401: "login",
        403: "forbidden",
        404: "not-found",
        405: "not-supported",
        409: "conflict",
        413: "too-long",
        415: "not-supported",
        422: "invalid",
        429: "throttled",
        503: "transient",
    }.get(status, "exception")
