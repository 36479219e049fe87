"""One error tree for chartbrief, and what each class of it means to the CLI and to the web service.

Every error chartbrief raises on purpose derives from `ChartbriefError`. The root is defined in
`fhir_adapters.errors` (the lower package, which never imports `service`), so the adapters' errors
and the service's share it; each class lives next to the code that raises it. `FAULTS` below gives
a class its exit code, its HTTP status and its FHIR issue type; a class without a row of its own
takes its nearest ancestor's. The CLI (`service.cli.common.ChartbriefCommand`) and the web service
(the one `ChartbriefError` handler in `service.api.app`) translate through `fault_of` and nowhere
else. The tree, as `draw_tree()` prints it (a test keeps this drawing equal to the classes):

```
class                                   exit  HTTP  defined in
ChartbriefError                            1   500  fhir_adapters.errors
├── ApiError                               1   500  service.errors
│   ├── BadGateway                         1   502  service.errors
│   ├── BadRequest                         1   400  service.errors
│   ├── Conflict                           1   409  service.errors
│   ├── Forbidden                          1   403  service.errors
│   ├── NotFound                           1   404  service.errors
│   ├── PayloadTooLarge                    1   413  service.errors
│   ├── TooManyRequests                    1   429  service.errors
│   ├── Unauthenticated                    1   401  service.errors
│   └── Unavailable                        1   503  service.errors
├── BackendAuthError                       3   502  fhir_adapters.auth.backend
├── BatchError                             2   400  service.batch.request
├── BundleError                            2   400  fhir_adapters.bundle_source
├── CorpusError                            2   400  service.eval.claims
├── DraftError                             1   500  fhir_adapters.write.draft
├── EncounterNotOfPatient                  2   403  fhir_adapters.fetch
├── EngineError                            4   502  service.llm.base
│   └── FakeEngineExhausted                4   502  service.llm.fake
├── EvalInputError                         2   400  service.eval.run
├── FhirError                              3   502  fhir_adapters.errors
│   ├── FhirPermanentError                 2   502  fhir_adapters.errors
│   │   ├── BulkExportError                2   502  fhir_adapters.bulk.manifest
│   │   ├── FhirAuthError                  2   403  fhir_adapters.errors
│   │   ├── FhirBadRequest                 2   502  fhir_adapters.errors
│   │   ├── FhirConflict                   2   502  fhir_adapters.errors
│   │   ├── FhirNotFound                   2   502  fhir_adapters.errors
│   │   └── FhirUnexpectedResponse         2   502  fhir_adapters.errors
│   │       └── FhirResponseTooLarge       2   502  fhir_adapters.errors
│   └── FhirRetryableError                 3   502  fhir_adapters.errors
│       ├── BulkExportTimeout              3   502  fhir_adapters.bulk.manifest
│       ├── FhirRateLimited                3   502  fhir_adapters.errors
│       ├── FhirServerError                3   502  fhir_adapters.errors
│       └── FhirTransportError             3   502  fhir_adapters.errors
├── HookRequestError                       2   400  service.cds.cards
├── LocalFhirServerError                   3   503  service.dev.devserver
├── PromptError                            4   502  service.prompts
├── RecallError                            2   400  service.governance.recall_rules
├── ReviewError                            2   400  fhir_adapters.write.review
│   ├── NotChartbriefDraft                 2   400  fhir_adapters.write.review
│   ├── ReviewConflict                     2   409  fhir_adapters.write.review
│   ├── ReviewForbidden                    2   403  fhir_adapters.write.review
│   ├── ReviewNotFound                     2   404  fhir_adapters.write.review
│   └── StaleDraft                         2   400  fhir_adapters.write.review
├── SandboxError                           2   400  service.dev.sandbox
├── SessionCipherError                     2   500  service.db.launch
├── SettingsError                          2   500  service.config
├── SmartError                             2   401  fhir_adapters.auth.oauth
├── StateError                             2   400  service.db.launch
└── UnsupportedContent                     2   422  fhir_adapters.text
```

Exit codes: 0 ok, 1 unexpected, 2 bad input (a setting, a file, an id, a refused request),
3 a server chartbrief depends on could not be reached or failed, 4 the model or the prompt could not
be used; `chartbrief batch run` exits 5 when some patients failed (a report, not an error).

What a person is told: the CLI prints `str(error)` (an operator at their own terminal; a FHIR error
adds the server's diagnostics). The web service says `Fault.says(error)`, which never carries the
server's diagnostics (they may echo record content), a token or a note. Anything that is not a
`ChartbriefError` is a bug: exit 1, HTTP 500, and only its class name is logged.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from fhir_adapters.auth.backend import BackendAuthError
from fhir_adapters.auth.oauth import SmartError
from fhir_adapters.bundle_source import BundleError
from fhir_adapters.errors import (
    ChartbriefError,
    FhirAuthError,
    FhirError,
    FhirPermanentError,
    FhirRetryableError,
)
from fhir_adapters.fetch import EncounterNotOfPatient
from fhir_adapters.text import UnsupportedContent
from fhir_adapters.write.draft import DraftError
from fhir_adapters.write.review import ReviewConflict, ReviewError, ReviewForbidden, ReviewNotFound
from service.batch.request import BatchError
from service.cds.cards import HookRequestError
from service.config import SettingsError
from service.db.launch import SessionCipherError, StateError
from service.dev.devserver import LocalFhirServerError
from service.dev.sandbox import SandboxError
from service.eval.claims import CorpusError
from service.eval.run import EvalInputError
from service.governance.recall_rules import RecallError
from service.llm.base import EngineError
from service.prompts import PromptError

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_SERVER = 3
EXIT_MODEL = 4
EXIT_BATCH_FAILURES = 5

# -- the web service's own refusals (the HTTP boundary; service.errors re-exports them) -------


class ApiError(ChartbriefError):
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


class TooManyRequests(ApiError):
    """A bound is reached (queued work, or requests per minute): try again after `retry_after` s."""

    status = 429
    code = "throttled"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})
        self.retry_after = max(1, retry_after)


class PayloadTooLarge(ApiError):
    status = 413
    code = "too-long"


Says = Callable[[BaseException], str]


def _plainly(exc: BaseException) -> str:
    return str(exc)


@dataclass(frozen=True)
class Fault:
    """What one class of error means: the exit code, the HTTP status, the FHIR issue type, and the
    sentence the web service says (from the error, without diagnostics, tokens or record text)."""

    exit_code: int
    http_status: int
    issue: str = "exception"
    says: Says = _plainly


def _fhir_failed(exc: BaseException) -> str:
    status = exc.status if isinstance(exc, FhirError) else None
    return f"the FHIR server failed: {type(exc).__name__} (HTTP {status or '-'})"


def _fhir_refused(exc: BaseException) -> str:
    status = exc.status if isinstance(exc, FhirError) else None
    return f"the EHR refused chartbrief's access (HTTP {status}); launch chartbrief again"


def _model_failed(exc: BaseException) -> str:
    return f"the model could not write the summary: {exc}"


def _http_refusal(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ApiError) else str(exc)


def _database_failed(exc: BaseException) -> str:
    return f"the database (CHARTBRIEF_DB__URL) failed: {type(exc).__name__}"


_BAD_INPUT = Fault(EXIT_BAD_INPUT, 400, "invalid")

# One row per class whose meaning differs from its parent's. Kept in the order of the drawing.
FAULTS: dict[type[BaseException], Fault] = {
    ChartbriefError: Fault(EXIT_UNEXPECTED, 500),
    BackendAuthError: Fault(EXIT_SERVER, 502, "security"),
    BatchError: _BAD_INPUT,
    BundleError: _BAD_INPUT,
    CorpusError: _BAD_INPUT,
    DraftError: Fault(EXIT_UNEXPECTED, 500),
    EncounterNotOfPatient: Fault(
        EXIT_BAD_INPUT, 403, "forbidden", lambda _: "the launch's encounter belongs to another patient"
    ),
    EngineError: Fault(EXIT_MODEL, 502, "exception", _model_failed),
    EvalInputError: _BAD_INPUT,
    HookRequestError: _BAD_INPUT,
    FhirError: Fault(EXIT_SERVER, 502, "exception", _fhir_failed),
    FhirPermanentError: Fault(EXIT_BAD_INPUT, 502, "exception", _fhir_failed),
    FhirAuthError: Fault(EXIT_BAD_INPUT, 403, "forbidden", _fhir_refused),
    FhirRetryableError: Fault(EXIT_SERVER, 502, "transient", _fhir_failed),
    LocalFhirServerError: Fault(EXIT_SERVER, 503, "transient"),
    PromptError: Fault(EXIT_MODEL, 502, "exception", _model_failed),
    RecallError: _BAD_INPUT,
    ReviewError: _BAD_INPUT,
    ReviewConflict: Fault(EXIT_BAD_INPUT, 409, "conflict"),
    ReviewForbidden: Fault(
        EXIT_BAD_INPUT,
        403,
        "forbidden",
        lambda _: "that document belongs to another patient than the one you launched with",
    ),
    ReviewNotFound: Fault(
        EXIT_BAD_INPUT, 404, "not-found", lambda _: "that draft does not exist in the chart"
    ),
    SandboxError: _BAD_INPUT,
    SessionCipherError: Fault(EXIT_BAD_INPUT, 500),
    SettingsError: Fault(EXIT_BAD_INPUT, 500),
    SmartError: Fault(
        EXIT_BAD_INPUT,
        401,
        "login",
        lambda exc: f"your EHR session could not be renewed ({exc}); launch chartbrief again",
    ),
    StateError: _BAD_INPUT,
    UnsupportedContent: Fault(EXIT_BAD_INPUT, 422, "not-supported"),
}

# The web service's own refusals carry their status and issue type.
_REFUSALS: list[type[ApiError]] = [ApiError, *ApiError.__subclasses__()]
FAULTS.update(
    {refusal: Fault(EXIT_UNEXPECTED, refusal.status, refusal.code, _http_refusal) for refusal in _REFUSALS}
)

# Errors of libraries that reach the top with a meaning of their own (the database is a server).
FOREIGN_FAULTS: dict[type[BaseException], Fault] = {
    SQLAlchemyError: Fault(EXIT_SERVER, 503, "transient", _database_failed),
}

UNEXPECTED = Fault(
    EXIT_UNEXPECTED,
    500,
    "exception",
    lambda _: "chartbrief failed to handle this request; the error was logged (without patient data)",
)


def fault_of(exc: BaseException) -> Fault:
    """The row of the nearest class of `exc` that has one (`fault_of_class`).

    >>> fault_of(PromptError("prompts/x/v9.yaml: no such file")).exit_code
    4
    >>> fault_of(ReviewNotFound("gone")).http_status
    404
    >>> fault_of(KeyError("x")) is UNEXPECTED
    True
    """
    return fault_of_class(type(exc))


def fault_of_class(cls: type[BaseException]) -> Fault:
    """The row of `cls` or of its nearest ancestor that has one; `UNEXPECTED` for anything else."""
    for ancestor in cls.__mro__:
        fault = FAULTS.get(ancestor) or FOREIGN_FAULTS.get(ancestor)
        if fault is not None:
            return fault
    return UNEXPECTED


def cli_message(exc: BaseException) -> str:
    """The one line the CLI prints: chartbrief's own text, a FHIR error with the server's diagnostics
    (the operator's own terminal), a library's error by what failed, anything else by its class."""
    if isinstance(exc, FhirError):
        where = f" ({exc.url})" if exc.url else ""
        status = f"HTTP {exc.status}: " if exc.status else ""
        return f"{type(exc).__name__}{where}: {status}{exc.diagnostics}"
    if isinstance(exc, ChartbriefError):
        return str(exc)
    fault = fault_of(exc)
    return type(exc).__name__ if fault is UNEXPECTED else fault.says(exc)


# Modules that define a class of the tree but that nothing above imports at start-up.
_DEFINING_MODULES = ("service.llm.fake",)


def _branches(cls: type[BaseException]) -> Iterator[type[BaseException]]:
    yield from sorted(cls.__subclasses__(), key=lambda sub: sub.__name__)


def _all(cls: type[BaseException]) -> Iterator[type[BaseException]]:
    yield cls
    for sub in _branches(cls):
        yield from _all(sub)


def _depth(cls: type[BaseException]) -> int:
    return 1 + max((_depth(sub) for sub in _branches(cls)), default=-1)


def draw_tree() -> str:
    """The tree of `ChartbriefError` with each class's exit code, HTTP status and module, as drawn in
    this module's docstring."""
    for module in _DEFINING_MODULES:
        importlib.import_module(module)
    width = 4 * _depth(ChartbriefError) + max(len(cls.__name__) for cls in _all(ChartbriefError)) + 1
    lines = [f"{'class':<{width}} exit  HTTP  defined in"]

    def add(cls: type[BaseException], prefix: str, stem: str) -> None:
        fault = fault_of_class(cls)
        label = f"{prefix}{cls.__name__}"
        lines.append(f"{label:<{width}} {fault.exit_code:>4}  {fault.http_status:>4}  {cls.__module__}")
        children = list(_branches(cls))
        for index, child in enumerate(children):
            last = index == len(children) - 1
            add(child, stem + ("└── " if last else "├── "), stem + ("    " if last else "│   "))

    add(ChartbriefError, "", "")
    return "\n".join(lines)


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BATCH_FAILURES",
    "EXIT_MODEL",
    "EXIT_OK",
    "EXIT_SERVER",
    "EXIT_UNEXPECTED",
    "FAULTS",
    "FOREIGN_FAULTS",
    "UNEXPECTED",
    "ChartbriefError",
    "Fault",
    "cli_message",
    "draw_tree",
    "fault_of",
    "fault_of_class",
]
