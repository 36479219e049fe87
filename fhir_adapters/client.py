"""The one async client chartbrief uses to talk to a FHIR R4 server.

Every call goes through `FhirClient._request`, which sets the FHIR headers and the bearer
token, retries idempotent requests on transport errors, 429 and 5xx (tenacity: bounded,
exponential backoff with jitter, honouring Retry-After), renews the token once on 401, maps
every other answer to `fhir_adapters.errors`, and logs one PHI-free line per HTTP exchange
(method, path without the query string, status, elapsed ms, attempt).

On top of it: read / vread / search (paging, de-duplication, restart of an expired paging
snapshot) / create (conditional) / update / transaction / Binary / metadata, and `stream`, a
chunked GET for large files such as Bulk Data NDJSON (the token only goes to the server's origin).

What it must not do: parse resources into models (that is `fetch`/`normalize`), log a
query string, a body or a token, retry a non-idempotent write, or send the token to any host
other than the configured server's origin.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import httpx
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from fhir_adapters.auth import StaticToken, TokenProvider
from fhir_adapters.errors import (
    FhirBadRequest,
    FhirError,
    FhirNotFound,
    FhirRateLimited,
    FhirRetryableError,
    FhirTransportError,
    FhirUnexpectedResponse,
    error_for_status,
)

if TYPE_CHECKING:
    from service.config import FhirSettings

JsonObject = dict[str, Any]
SearchParams = Mapping[str, str | Sequence[str]]

FHIR_JSON = "application/fhir+json"
# A server asking for a longer pause than this is better treated as down for this attempt.
RETRY_AFTER_CAP_SECONDS = 60.0

_log = structlog.get_logger(__name__)


# ---------------------------------------------------------------------------
# Pure helpers (no IO)
# ---------------------------------------------------------------------------


def url_without_query(url: httpx.URL | str) -> str:
    """The URL with its query string and fragment removed (what errors carry and logs may show).

    >>> url_without_query("http://h:8080/fhir/Patient?name=Smith#x")
    'http://h:8080/fhir/Patient'
    """
    return str(httpx.URL(url).copy_with(query=None, fragment=None))


def resolve_url(base_url: str, link: str) -> str:
    """Resolve a link the server gave against the FHIR base URL.

    Absolute links are kept verbatim; `/path` is taken on the base's origin; anything else is
    relative to the base itself (FHIR's `[base]/Type?...`), not to its parent as RFC 3986 would.

    >>> resolve_url("http://h/fhir", "Patient?page=2")
    'http://h/fhir/Patient?page=2'
    >>> resolve_url("http://h/fhir", "?_getpages=abc")
    'http://h/fhir?_getpages=abc'
    >>> resolve_url("http://h/fhir", "/other/Binary/1")
    'http://h/other/Binary/1'
    >>> resolve_url("http://h/fhir", "https://x/fhir/Patient?page=2")
    'https://x/fhir/Patient?page=2'
    """
    link = link.strip()
    parsed = httpx.URL(link)
    if parsed.is_absolute_url:
        return link
    if link.startswith("/"):
        return str(httpx.URL(base_url).copy_with(raw_path=link.encode("ascii")))
    if link.startswith("?") or not link:
        return base_url + link
    return f"{base_url}/{link}"


def same_origin(a: httpx.URL | str, b: httpx.URL | str) -> bool:
    """True when both URLs share scheme, host and (effective) port.

    >>> same_origin("https://h/fhir", "https://h:443/other")
    True
    >>> same_origin("https://h/fhir", "https://evil.example/fhir")
    False
    """
    ua, ub = httpx.URL(a), httpx.URL(b)
    return (ua.scheme, ua.host, _port(ua)) == (ub.scheme, ub.host, _port(ub))


def _port(url: httpx.URL) -> int | None:
    if url.port is not None:
        return url.port
    return {"http": 80, "https": 443}.get(url.scheme)


def search_query(params: SearchParams | None, page_size: int) -> list[tuple[str, str]]:
    """Search parameters as ordered pairs, repeated keys for lists, `_count` added unless given.

    >>> search_query({"patient": "1", "code": ["a", "b"]}, 50)
    [('patient', '1'), ('code', 'a'), ('code', 'b'), ('_count', '50')]
    >>> search_query({"_count": "10"}, 50)
    [('_count', '10')]
    """
    pairs: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        if isinstance(value, str):
            pairs.append((key, value))
        else:
            pairs.extend((key, str(item)) for item in value)
    if not any(key == "_count" for key, _ in pairs):
        pairs.append(("_count", str(page_size)))
    return pairs


def next_link(bundle: JsonObject) -> str | None:
    """The URL of `link[relation=next]`, if the Bundle has one.

    >>> next_link({"link": [{"relation": "self", "url": "a"}, {"relation": "next", "url": "b"}]})
    'b'
    >>> next_link({"link": []}) is None
    True
    """
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            if isinstance(url, str) and url.strip():
                return url
    return None


def bundle_resources(bundle: JsonObject) -> list[JsonObject]:
    """`entry[].resource` of every entry (search.mode match and include alike)."""
    resources: list[JsonObject] = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            resources.append(resource)
    return resources


def resource_key(resource: JsonObject) -> str | None:
    """`resourceType/id`, or None when the resource has no id (it cannot be de-duplicated)."""
    rid = resource.get("id")
    if rid is None:
        return None
    return f"{resource.get('resourceType')}/{rid}"


def parse_http_date(value: str | None) -> datetime | None:
    """The time in an HTTP date (a `Date` or `Retry-After` header), or None when missing or unreadable.

    A date without a zone is taken as UTC, as HTTP dates always are.

    >>> parse_http_date("Mon, 23 Nov 2026 16:09:18 GMT").isoformat()
    '2026-11-23T16:09:18+00:00'
    >>> parse_http_date("yesterday") is None
    True
    """
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP date); None if unusable.

    >>> parse_retry_after("3", datetime(2024, 1, 1, tzinfo=UTC))
    3.0
    >>> parse_retry_after("Mon, 01 Jan 2024 00:00:10 GMT", datetime(2024, 1, 1, tzinfo=UTC))
    10.0
    >>> parse_retry_after("soon", datetime(2024, 1, 1, tzinfo=UTC)) is None
    True
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    when = parse_http_date(text)
    return None if when is None else max(0.0, (when - now).total_seconds())


def backoff_seconds(attempt: int, initial: float, cap: float, jitter: float = 0.0) -> float:
    """Wait after failed attempt `attempt` (1-based): initial * 2^(attempt-1) + jitter, capped.

    >>> [backoff_seconds(n, 0.5, 3.0) for n in (1, 2, 3, 4)]
    [0.5, 1.0, 2.0, 3.0]
    """
    exponent = min(attempt - 1, 62)  # no overflow for absurd attempt counts
    return min(initial * 2.0**exponent + jitter, cap)


def _check_type(resource_type: str) -> str:
    if not resource_type.isascii() or not resource_type.isalpha() or not resource_type[:1].isupper():
        raise ValueError(f"resource type {resource_type!r} is not a FHIR resource type name")
    return resource_type


def _type_of(resource: JsonObject, what: str) -> str:
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise ValueError(f"{what}: the resource has no resourceType")
    return _check_type(resource_type)


def _check_id(value: str, field: str) -> str:
    # FHIR id: [A-Za-z0-9\-\.]{1,64}. Anything else could change the request path.
    ok = 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "-.") for c in value)
    if not ok:
        raise ValueError(f"{field} {value!r} is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}})")
    return value


def _json_object(response: httpx.Response, what: str, url: httpx.URL) -> JsonObject:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FhirUnexpectedResponse(
            f"{what}: the server's answer is not JSON ({response.headers.get('content-type', 'no type')})",
            status=response.status_code,
            url=url_without_query(url),
        ) from exc
    if not isinstance(body, dict):
        raise FhirUnexpectedResponse(
            f"{what}: the server's answer is JSON but not an object",
            status=response.status_code,
            url=url_without_query(url),
        )
    return body


def _operation_outcome(response: httpx.Response) -> JsonObject | None:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


def _has_body(response: httpx.Response) -> bool:
    return bool(response.content.strip())


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


class FhirClient:
    """An async FHIR R4 client over one shared `httpx.AsyncClient`."""

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.AsyncClient | None = None,
        auth: TokenProvider | None = None,
        timeout: float = 30.0,
        page_size: int = 100,
        max_attempts: int = 4,
        backoff_initial: float = 0.5,
        backoff_max: float = 8.0,
    ) -> None:
        base = httpx.URL(base_url.strip())
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"FHIR base URL {base_url!r} must be an absolute http(s) URL")
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.base_url = url_without_query(base).rstrip("/")
        self.page_size = page_size
        self.max_attempts = max_attempts
        self._auth = auth
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max

    @classmethod
    def from_settings(
        cls,
        settings: FhirSettings,
        *,
        http: httpx.AsyncClient | None = None,
        auth: TokenProvider | None = None,
    ) -> FhirClient:
        """Build from `Settings.fhir`; a configured static bearer token is used when no `auth` is given."""
        if not settings.base_url:
            raise ValueError("no FHIR server configured: set CHARTBRIEF_FHIR__BASE_URL or pass --fhir-base")
        if auth is None and settings.bearer_token:
            auth = StaticToken(settings.bearer_token)
        return cls(
            settings.base_url,
            http=http,
            auth=auth,
            timeout=settings.timeout_seconds,
            page_size=settings.page_size,
            max_attempts=settings.max_attempts,
            backoff_initial=settings.backoff_initial_seconds,
            backoff_max=settings.backoff_max_seconds,
        )

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r})"

    async def aclose(self) -> None:
        """Close the HTTP client if this FhirClient created it (a shared one belongs to its owner)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- reads ---------------------------------------------------------------

    async def read(self, resource_type: str, id: str) -> JsonObject:
        path = f"{_check_type(resource_type)}/{_check_id(id, 'id')}"
        response = await self._request("GET", path, idempotent=True)
        return _json_object(response, f"read {resource_type}", response.request.url)

    async def vread(self, resource_type: str, id: str, version: str) -> JsonObject:
        path = f"{_check_type(resource_type)}/{_check_id(id, 'id')}/_history/{_check_id(version, 'version')}"
        response = await self._request("GET", path, idempotent=True)
        return _json_object(response, f"vread {resource_type}", response.request.url)

    async def capabilities(self) -> JsonObject:
        response = await self._request("GET", "metadata", idempotent=True)
        return _json_object(response, "metadata", response.request.url)

    async def search(
        self, resource_type: str, params: SearchParams | None = None
    ) -> AsyncIterator[JsonObject]:
        """Yield every resource of every page, each `resourceType/id` once.

        Next links are followed verbatim. A next page answering 404/410 means the server
        dropped its paging snapshot (HAPI: "unknown paging ID"): the search restarts once
        from page one, and resources already yielded are not yielded again.
        """
        first_url = _check_type(resource_type)
        first_params = search_query(params, self.page_size)
        seen: set[str] = set()
        visited: set[str] = set()
        url = first_url
        page_params: list[tuple[str, str]] | None = first_params
        restarted = False
        pages = 0
        while True:
            try:
                bundle = await self._search_page(url, page_params)
            except FhirNotFound:
                if page_params is not None or restarted:
                    raise
                restarted = True
                _log.warning("fhir.search.restart", resource_type=resource_type, pages_read=pages)
                url, page_params = first_url, first_params
                visited.clear()
                continue
            pages += 1
            for resource in bundle_resources(bundle):
                key = resource_key(resource)
                if key is not None:
                    if key in seen:
                        continue
                    seen.add(key)
                yield resource
            link = next_link(bundle)
            if link is None:
                return
            url = resolve_url(self.base_url, link)
            if url in visited:
                # A server that links back to a page already read would loop forever.
                _log.warning("fhir.search.loop", resource_type=resource_type, pages_read=pages)
                return
            visited.add(url)
            page_params = None

    async def search_all(
        self, resource_type: str, params: SearchParams | None = None, *, limit: int | None = None
    ) -> list[JsonObject]:
        """All resources of a search as a list, stopping (and not fetching further pages) at `limit`."""
        results: list[JsonObject] = []
        if limit is not None and limit <= 0:
            return results
        async with aclosing(self.search(resource_type, params)) as resources:
            async for resource in resources:
                results.append(resource)
                if limit is not None and len(results) >= limit:
                    break
        return results

    async def binary(self, url: str) -> tuple[bytes, str]:
        """Content of an attachment URL: (bytes, content type).

        A FHIR Binary resource is decoded from its base64 `data`; any other answer is returned
        as raw bytes with the response's Content-Type. Only the configured server's origin is
        ever contacted.
        """
        response = await self._request("GET", url, idempotent=True)
        content_type = response.headers.get("content-type", "application/octet-stream")
        if "json" in content_type.lower():
            try:
                body = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                body = None
            if isinstance(body, dict) and body.get("resourceType") == "Binary":
                return self._decode_binary(body, response.request.url)
        return response.content, content_type

    @staticmethod
    def _decode_binary(body: JsonObject, url: httpx.URL) -> tuple[bytes, str]:
        data = body.get("data") or ""
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise FhirUnexpectedResponse(
                f"Binary/{body.get('id', '?')}: data is not valid base64", url=url_without_query(url)
            ) from exc
        return decoded, str(body.get("contentType") or "application/octet-stream")

    # -- streaming -----------------------------------------------------------

    async def stream(
        self, url: str, *, send_token: bool = True, accept: str = "application/fhir+ndjson"
    ) -> AsyncIterator[bytes]:
        """GET `url` and yield its body in chunks as they arrive; the whole body is never held.

        With `send_token` the URL must be on the FHIR server's origin and carries the bearer
        token (renewed once on 401). Without it, any absolute http(s) URL may be read and no
        Authorization header is sent: Bulk Data files served with `requiresAccessToken: false`
        (pre-signed storage URLs, for instance). Opening the response is retried like any
        idempotent GET; once a chunk has been yielded nothing is retried, since the caller has
        seen it. Failures map to `fhir_adapters.errors` as in `_request`, a connection lost
        mid-body included. Wrap it in `contextlib.aclosing` to release the connection early.
        """
        target = self._target(url) if send_token else _absolute_target(self.base_url, url)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(FhirRetryableError),
            before_sleep=_log_retry("GET", target),
            reraise=True,
        )
        response: httpx.Response | None = None
        async for attempt in retrying:
            with attempt:
                response = await self._open_stream(
                    target, accept, send_token, attempt=attempt.retry_state.attempt_number
                )
        if response is None:  # pragma: no cover - tenacity either returns a response or raises
            raise AssertionError("unreachable: tenacity re-raises the last error")
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.TransportError as exc:
            raise FhirTransportError(
                f"connection to {target.host} lost ({type(exc).__name__}) while reading GET {target.path}",
                url=url_without_query(target),
            ) from exc
        except httpx.HTTPError as exc:
            raise FhirUnexpectedResponse(
                f"unreadable body from {target.host} ({type(exc).__name__}) for GET {target.path}",
                url=url_without_query(target),
            ) from exc
        finally:
            await response.aclose()

    async def _open_stream(
        self, url: httpx.URL, accept: str, send_token: bool, *, attempt: int
    ) -> httpx.Response:
        """Send the GET with a streamed body; return it open if 2xx, else read the error and raise."""
        response = await self._send_streaming(url, accept, send_token, attempt=attempt)
        if response.status_code == 401 and send_token and self._auth is not None:
            await response.aclose()
            await self._auth.invalidate()
            response = await self._send_streaming(url, accept, send_token, attempt=attempt)
        if response.is_success:
            return response
        outcome: JsonObject | None = None
        try:
            # An error answer is a short OperationOutcome: read it whole so the error can carry it.
            await response.aread()
            outcome = _operation_outcome(response)
        except httpx.HTTPError:
            outcome = None  # the status alone still says what went wrong
        finally:
            await response.aclose()
        raise error_for_status(
            response.status_code,
            method="GET",
            url=url_without_query(url),
            outcome=outcome,
            retry_after=parse_retry_after(response.headers.get("retry-after"), datetime.now(UTC)),
        )

    async def _send_streaming(
        self, url: httpx.URL, accept: str, send_token: bool, *, attempt: int
    ) -> httpx.Response:
        headers = {"Accept": accept}
        if send_token and self._auth is not None:
            headers["Authorization"] = f"Bearer {await self._auth.token()}"
        request = self._http.build_request("GET", url, headers=headers)
        started = time.perf_counter()
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            _log_exchange("GET", url, None, started, attempt, error=type(exc).__name__)
            raise FhirTransportError(
                f"{url.scheme}://{url.host} unreachable ({type(exc).__name__}) for GET {url.path}",
                url=url_without_query(url),
            ) from exc
        except httpx.HTTPError as exc:
            _log_exchange("GET", url, None, started, attempt, error=type(exc).__name__)
            raise FhirUnexpectedResponse(
                f"unreadable answer from {url.scheme}://{url.host} ({type(exc).__name__}) for GET {url.path}",
                url=url_without_query(url),
            ) from exc
        _log_exchange("GET", url, response.status_code, started, attempt)
        return response

    # -- writes --------------------------------------------------------------

    async def create(self, resource: JsonObject, *, if_none_exist: str | None = None) -> JsonObject:
        """POST a new resource. Retried only when conditional (If-None-Exist makes it idempotent)."""
        resource_type = _type_of(resource, "create")
        headers = {"Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        response = await self._request(
            "POST", resource_type, json=resource, headers=headers, idempotent=if_none_exist is not None
        )
        return await self._representation(response, f"create {resource_type}")

    async def update(self, resource: JsonObject, *, if_match: str | None = None) -> JsonObject:
        """PUT `Type/id` (idempotent, so retried). `if_match` e.g. `W/"3"` guards against lost updates."""
        resource_type = _type_of(resource, "update")
        rid = resource.get("id")
        if not isinstance(rid, str):
            raise ValueError(f"update {resource_type}: the resource has no id")
        headers = {"Prefer": "return=representation"}
        if if_match:
            headers["If-Match"] = if_match
        response = await self._request(
            "PUT", f"{resource_type}/{_check_id(rid, 'id')}", json=resource, headers=headers, idempotent=True
        )
        return await self._representation(response, f"update {resource_type}")

    async def transaction(self, bundle: JsonObject, *, idempotent: bool = False) -> JsonObject:
        """POST a transaction/batch Bundle to the base. Retry only if every entry is conditional."""
        if bundle.get("resourceType") != "Bundle":
            raise ValueError("transaction: resourceType must be 'Bundle'")
        headers = {"Prefer": "return=representation"}
        response = await self._request(
            "POST", self.base_url, json=bundle, headers=headers, idempotent=idempotent
        )
        return _json_object(response, "transaction", response.request.url)

    async def _representation(self, response: httpx.Response, what: str) -> JsonObject:
        """The written resource: the body if the server sent it, else a GET of its Location."""
        if _has_body(response):
            body = _json_object(response, what, response.request.url)
            if body.get("resourceType") != "OperationOutcome":
                return body
        location = response.headers.get("location") or response.headers.get("content-location")
        if not location:
            raise FhirUnexpectedResponse(
                f"{what}: the server sent neither the resource nor a Location header",
                status=response.status_code,
                url=url_without_query(response.request.url),
            )
        got = await self._request("GET", location, idempotent=True)
        return _json_object(got, what, got.request.url)

    # -- the one request path -----------------------------------------------

    async def _search_page(self, url: str, params: list[tuple[str, str]] | None) -> JsonObject:
        response = await self._request("GET", url, params=params, idempotent=True)
        bundle = _json_object(response, "search", response.request.url)
        if bundle.get("resourceType") != "Bundle":
            raise FhirUnexpectedResponse(
                f"search: expected a Bundle, got {bundle.get('resourceType')!r}",
                status=response.status_code,
                url=url_without_query(response.request.url),
            )
        return bundle

    def _target(self, url: str) -> httpx.URL:
        try:
            target = httpx.URL(resolve_url(self.base_url, url))
        except httpx.InvalidURL as exc:
            message = f"not a valid URL for the FHIR server {self.base_url}"
            raise FhirBadRequest(message, url=self.base_url) from exc
        if not same_origin(target, self.base_url):
            # The token is for this server only; a link elsewhere is never followed.
            raise FhirBadRequest(
                f"refusing to contact {target.scheme}://{target.host}: it is not the FHIR server's "
                f"origin ({self.base_url})",
                url=url_without_query(target),
            )
        return target

    async def _request(
        self,
        method: str,
        url: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        json: JsonObject | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool,
    ) -> httpx.Response:
        """Send one logical request (relative to the base, or absolute on its origin).

        Returns a 2xx response; raises a `FhirError` for anything else. Idempotent requests
        are retried on `FhirRetryableError` up to `max_attempts`.
        """
        target = self._target(url)
        content = None if json is None else _encode(json)
        if not idempotent:
            return await self._attempt(method, target, params, content, headers, attempt=1)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(FhirRetryableError),
            before_sleep=_log_retry(method, target),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(
                    method, target, params, content, headers, attempt=attempt.retry_state.attempt_number
                )
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, FhirRateLimited) and error.retry_after is not None:
            return min(error.retry_after, RETRY_AFTER_CAP_SECONDS)
        # Full-range jitter on top of the exponential step keeps many workers from retrying in step.
        jitter = random.uniform(0, self._backoff_initial)  # noqa: S311 - timing, not security
        return backoff_seconds(state.attempt_number, self._backoff_initial, self._backoff_max, jitter)

    async def _attempt(
        self,
        method: str,
        url: httpx.URL,
        params: Sequence[tuple[str, str]] | None,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        *,
        attempt: int,
    ) -> httpx.Response:
        """One attempt: send, renew the token once on 401, map a non-2xx answer to an error."""
        response = await self._exchange(method, url, params, content, headers, attempt=attempt)
        if response.status_code == 401 and self._auth is not None:
            await self._auth.invalidate()
            response = await self._exchange(method, url, params, content, headers, attempt=attempt)
        if response.is_success:
            return response
        raise error_for_status(
            response.status_code,
            method=method,
            url=url_without_query(url),
            outcome=_operation_outcome(response),
            retry_after=parse_retry_after(response.headers.get("retry-after"), datetime.now(UTC)),
        )

    async def _exchange(
        self,
        method: str,
        url: httpx.URL,
        params: Sequence[tuple[str, str]] | None,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        *,
        attempt: int,
    ) -> httpx.Response:
        """One HTTP exchange and its one log line; httpx errors are translated here and only here."""
        request_headers = {"Accept": FHIR_JSON, **(headers or {})}
        if content is not None:
            request_headers["Content-Type"] = FHIR_JSON
        if self._auth is not None:
            request_headers["Authorization"] = f"Bearer {await self._auth.token()}"
        started = time.perf_counter()
        try:
            response = await self._http.request(
                method, url, params=list(params) if params else None, content=content, headers=request_headers
            )
        except httpx.TransportError as exc:
            _log_exchange(method, url, None, started, attempt, error=type(exc).__name__)
            raise FhirTransportError(
                f"FHIR server unreachable at {self.base_url} ({type(exc).__name__}) for {method} {url.path}",
                url=url_without_query(url),
            ) from exc
        except httpx.HTTPError as exc:
            _log_exchange(method, url, None, started, attempt, error=type(exc).__name__)
            raise FhirUnexpectedResponse(
                f"unreadable answer from {self.base_url} ({type(exc).__name__}) for {method} {url.path}",
                url=url_without_query(url),
            ) from exc
        _log_exchange(method, url, response.status_code, started, attempt)
        return response


def _absolute_target(base_url: str, url: str) -> httpx.URL:
    """`url` resolved against the base; any origin, but it must be an absolute http(s) URL."""
    try:
        target = httpx.URL(resolve_url(base_url, url))
    except httpx.InvalidURL as exc:
        raise FhirBadRequest("not a valid URL", url=base_url) from exc
    if target.scheme not in ("http", "https") or not target.host:
        raise FhirBadRequest(
            f"refusing to read {target.scheme or 'a relative'} URL: only http(s) URLs can be streamed",
            url=url_without_query(target),
        )
    return target


def _encode(body: JsonObject) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _log_exchange(
    method: str, url: httpx.URL, status: int | None, started: float, attempt: int, *, error: str | None = None
) -> None:
    # Path only: a query string can carry search values such as names.
    fields: dict[str, Any] = {
        "method": method,
        "path": url.path,
        "status": status,
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
        "attempt": attempt,
    }
    if error is not None:
        fields["error"] = error
    if status is not None and status < 400:
        _log.info("fhir.request", **fields)
    else:
        _log.warning("fhir.request", **fields)


def _log_retry(method: str, url: httpx.URL) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        _log.warning(
            "fhir.retry",
            method=method,
            path=url.path,
            attempt=state.attempt_number,
            wait_s=round(state.next_action.sleep, 3) if state.next_action is not None else None,
            error=type(error).__name__ if error is not None else None,
            status=error.status if isinstance(error, FhirError) else None,
        )

    return before_sleep
