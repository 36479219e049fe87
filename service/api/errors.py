"""How the web service says no: FHIR OperationOutcome JSON for the REST API, a short page for people.

The error tree of the HTTP boundary:

    ApiError (status, FHIR issue code, a message fit for the caller)
    |- Unauthenticated   401  no, expired, malformed or wrongly addressed credentials
    |- Forbidden         403  valid credentials, but not for this patient / scope / action
    |- NotFound          404
    |- Conflict          409  the draft changed since it was opened
    |- BadRequest        400  a request that names a field wrongly
    |- BadGateway        502  the EHR (its FHIR server, SMART configuration or token endpoint) or the
    |                         model failed
    `- Unavailable       503  model not loaded yet, no FHIR server configured

Messages never carry a token, a note or a name; they name the field, the setting or the id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FHIR_JSON = "application/fhir+json"


class ApiError(Exception):
    status = 500
    code = "exception"  # FHIR IssueType

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class Unauthenticated(ApiError):
    status = 401
    code = "login"

    def __init__(self, message: str, *, error: str = "invalid_token") -> None:
        # RFC 6750: tell the client which scheme and why, without echoing what it sent.
        challenge = f'Bearer realm="chartbrief", error="{error}"'
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not-found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class BadRequest(ApiError):
    status = 400
    code = "invalid"


class BadGateway(ApiError):
    status = 502
    code = "exception"


class Unavailable(ApiError):
    status = 503
    code = "transient"


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
        413: "too-costly",
        415: "not-supported",
        422: "invalid",
        429: "throttled",
        503: "transient",
    }.get(status, "exception")
