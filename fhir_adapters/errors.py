"""The errors a FHIR server exchange can end in: one tree, mapped from the HTTP status.

```
FhirError                      status, outcome (OperationOutcome JSON or None), url (no query), diagnostics
├── FhirRetryableError         worth another attempt for an idempotent request
│   ├── FhirTransportError     timeout, refused or dropped connection (no status)
│   ├── FhirRateLimited        429; retry_after seconds when the server said
│   └── FhirServerError        5xx
└── FhirPermanentError         the same request will fail the same way
    ├── FhirBadRequest         400, 422, or a request chartbrief refuses to send
    ├── FhirAuthError          401, 403
    ├── FhirNotFound           404, 410
    ├── FhirConflict           409, 412
    └── FhirUnexpectedResponse any other status, or a body that is not the JSON expected
        └── FhirResponseTooLarge   a body over the configured byte cap (reading stopped there)
```

Callers branch on the class, never on the message text. `str(error)` is PHI-free (status,
method, path): it may be logged. `diagnostics` is the server's own explanation and may echo
request content (search values, resource text): show it to a person, do not log it.

This module does no IO and knows nothing about httpx; the client's one send path is the one place
that translates third-party exceptions into these.
"""

from __future__ import annotations

from typing import Any

GENERIC_DIAGNOSTICS = "the server gave no diagnostics"


class ChartbriefError(Exception):
    """The root of every error chartbrief raises on purpose, in both packages.

    `service.errors` draws the whole tree and gives each class its exit code and HTTP status.
    """


class FhirError(ChartbriefError):
    """Base of every error raised by the FHIR client."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
        url: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome
        self.url = url

    @property
    def diagnostics(self) -> str:
        """The OperationOutcome's issue texts joined, or a generic phrase when there are none."""
        return outcome_diagnostics(self.outcome) or GENERIC_DIAGNOSTICS


class FhirRetryableError(FhirError):
    """A failure that may pass on another attempt (only idempotent requests are retried)."""


class FhirTransportError(FhirRetryableError):
    """The server could not be reached or did not answer in time."""


class FhirRateLimited(FhirRetryableError):
    """429 Too Many Requests."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = 429,
        outcome: dict[str, Any] | None = None,
        url: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, outcome=outcome, url=url)
        self.retry_after = retry_after


class FhirServerError(FhirRetryableError):
    """5xx: the server failed."""


class FhirPermanentError(FhirError):
    """A failure that another attempt of the same request would repeat."""


class FhirBadRequest(FhirPermanentError):
    """400/422: the server rejected the request; or a request refused before sending."""


class FhirAuthError(FhirPermanentError):
    """401/403: missing, expired or insufficient credentials."""


class FhirNotFound(FhirPermanentError):
    """404/410: no such resource (or an expired search page)."""


class FhirConflict(FhirPermanentError):
    """409/412: a version conflict or a failed precondition (If-Match, If-None-Exist)."""


class FhirUnexpectedResponse(FhirPermanentError):
    """A status chartbrief does not handle, or a body that is not the JSON expected."""


class FhirResponseTooLarge(FhirUnexpectedResponse):
    """A body larger than the byte cap for its kind; reading stopped at the cap. `limit` in bytes."""

    def __init__(self, message: str, *, limit: int, url: str = "") -> None:
        super().__init__(message, url=url)
        self.limit = limit


_PERMANENT_BY_STATUS: dict[int, type[FhirPermanentError]] = {
    400: FhirBadRequest,
    422: FhirBadRequest,
    401: FhirAuthError,
    403: FhirAuthError,
    404: FhirNotFound,
    410: FhirNotFound,
    409: FhirConflict,
    412: FhirConflict,
}


def outcome_diagnostics(outcome: dict[str, Any] | None) -> str:
    """Join `issue[].diagnostics` and `issue[].details.text` of an OperationOutcome ('' if none).

    >>> outcome_diagnostics({"issue": [{"diagnostics": "Unknown paging ID"}, {"details": {"text": "gone"}}]})
    'Unknown paging ID; gone'
    >>> outcome_diagnostics(None)
    ''
    """
    if not isinstance(outcome, dict):
        return ""
    texts: list[str] = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        diagnostics = issue.get("diagnostics")
        if isinstance(diagnostics, str) and diagnostics.strip():
            texts.append(diagnostics.strip())
        details = issue.get("details")
        text = details.get("text") if isinstance(details, dict) else None
        if isinstance(text, str) and text.strip() and text.strip() not in texts:
            texts.append(text.strip())
    return "; ".join(texts)


def error_for_status(
    status: int,
    *,
    method: str,
    url: str,
    outcome: dict[str, Any] | None = None,
    retry_after: float | None = None,
) -> FhirError:
    """The error for a non-2xx answer, chosen by status alone. `url` must already lack its query.

    >>> type(error_for_status(410, method="GET", url="http://h/fhir/Patient/1")).__name__
    'FhirNotFound'
    >>> error_for_status(503, method="GET", url="http://h/fhir/metadata").status
    503
    """
    message = f"FHIR server answered {status} to {method} {url}"
    if status == 429:
        return FhirRateLimited(message, status=status, outcome=outcome, url=url, retry_after=retry_after)
    if 500 <= status <= 599:
        return FhirServerError(message, status=status, outcome=outcome, url=url)
    error_cls = _PERMANENT_BY_STATUS.get(status, FhirUnexpectedResponse)
    return error_cls(message, status=status, outcome=outcome, url=url)
