"""`FhirClient`: the one async client chartbrief uses to talk to a FHIR R4 server.

Every HTTP exchange, whatever its body, goes through ONE send path: `request` resolves the URL
(the bearer token only ever goes to the configured server's origin, under its base path), retries idempotent
requests on transport errors, 429 and 5xx (tenacity: bounded, exponential backoff with jitter,
honouring Retry-After); each attempt (`_attempt`) renews the token once on 401 and maps every
other non-2xx answer to `fhir_adapters.errors`; each exchange (`_send`) sets the headers and the
token, translates httpx's errors, and logs one PHI-free line (method, path without the query
string, status, elapsed ms, attempt). JSON reads and writes, Binary, the chunked `stream`
(Bulk Data NDJSON) and Bulk Data's kick-off and status polls all use it.

On top of it: read / vread / search (paging, de-duplication, restart of an expired paging
snapshot) / create (conditional) / update / transaction / Binary / metadata.

What it must not do: parse resources into models (that is `fetch`/`normalize`), log a query
string, a body or a token, retry a non-idempotent write, or send the token anywhere but under
the configured base URL (not another host, and not another path on the server's host).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from fhir_adapters.auth import TokenProvider
from fhir_adapters.client.bodies import (
    body_failure,
    decode_binary,
    error_outcome,
    has_body,
    json_object,
    read_capped,
    within_cap,
)
from fhir_adapters.client.retry import RETRY_AFTER_CAP_SECONDS, backoff_seconds, parse_retry_after
from fhir_adapters.client.search import (
    JsonObject,
    ReadLimits,
    SearchParams,
    SearchResults,
    bundle_resources,
    check_id,
    check_type,
    next_link,
    resolve_url,
    resource_key,
    same_origin,
    search_query,
    tokenless_refusal,
    type_of,
    url_without_query,
    within_base,
)
from fhir_adapters.errors import (
    FhirBadRequest,
    FhirError,
    FhirNotFound,
    FhirRateLimited,
    FhirResponseTooLarge,
    FhirRetryableError,
    FhirTransportError,
    FhirUnexpectedResponse,
    error_for_status,
)

FHIR_JSON = "application/fhir+json"
NDJSON = "application/fhir+ndjson"

_log = structlog.get_logger(__name__)


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
        limits: ReadLimits | None = None,
        file_hosts: Sequence[str] = (),
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
        self.limits = limits or ReadLimits()
        # Hosts besides the server's own that files read without the token may come from.
        self.file_hosts = tuple(file_hosts)
        self._auth = auth
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max

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
        path = f"{check_type(resource_type)}/{check_id(id, 'id')}"
        response = await self.request("GET", path, idempotent=True)
        return json_object(response, f"read {resource_type}", response.request.url)

    async def vread(self, resource_type: str, id: str, version: str) -> JsonObject:
        path = f"{check_type(resource_type)}/{check_id(id, 'id')}/_history/{check_id(version, 'version')}"
        response = await self.request("GET", path, idempotent=True)
        return json_object(response, f"vread {resource_type}", response.request.url)

    async def capabilities(self) -> JsonObject:
        response = await self.request("GET", "metadata", idempotent=True)
        return json_object(response, "metadata", response.request.url)

    async def search(
        self, resource_type: str, params: SearchParams | None = None
    ) -> AsyncGenerator[JsonObject, None]:
        """Yield every resource of every page, each `resourceType/id` once, up to the read limits.

        Next links are followed verbatim. A next page answering 404/410 means the server
        dropped its paging snapshot (HAPI: "unknown paging ID"): the search restarts once
        from page one, and resources already yielded are not yielded again. At a page,
        resource or page-size cap the search ends early (`search_all` says which one).
        """
        async with aclosing(self._search(resource_type, params, SearchResults())) as resources:
            async for resource in resources:
                yield resource

    async def _search(
        self, resource_type: str, params: SearchParams | None, out: SearchResults
    ) -> AsyncGenerator[JsonObject, None]:
        """`search`, setting `out.truncated` when a read limit ends it early."""
        limits = self.limits
        count = 0
        first_url = check_type(resource_type)
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
            except FhirResponseTooLarge as exc:
                out.truncated = (
                    f"truncated: search page {pages + 1} is larger than {exc.limit} bytes "
                    "(fhir.max_response_bytes); it and any later pages were not read"
                )
                _log.warning(
                    "fhir.search.truncated", resource_type=resource_type, cap="bytes", pages_read=pages
                )
                return
            except FhirNotFound:
                if page_params is not None or restarted:
                    raise
                restarted = True
                _log.warning("fhir.search.restart", resource_type=resource_type, pages_read=pages)
                url, page_params = first_url, first_params
                visited.clear()
                continue
            pages += 1
            link = next_link(bundle)
            for resource in bundle_resources(bundle):
                key = resource_key(resource)
                if key is not None:
                    if key in seen:
                        continue
                    seen.add(key)
                if count >= limits.max_resources:
                    out.truncated = (
                        f"truncated: search stopped at {limits.max_resources} resources "
                        "(fhir.max_resources_per_search); later results were not read"
                    )
                    _log.warning("fhir.search.truncated", resource_type=resource_type, cap="resources")
                    return
                count += 1
                yield resource
            if link is None:
                return
            if pages >= limits.max_pages:
                out.truncated = (
                    f"truncated: search stopped after {limits.max_pages} pages "
                    "(fhir.max_pages_per_search); later pages were not read"
                )
                _log.warning(
                    "fhir.search.truncated", resource_type=resource_type, cap="pages", pages_read=pages
                )
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
    ) -> SearchResults:
        """All resources of a search as a list, stopping (and not fetching further pages) at `limit`.

        `truncated` on the result names the read limit that ended the search early, if one did
        (reaching `limit` is the caller's choice, not a truncation).
        """
        results = SearchResults()
        if limit is not None and limit <= 0:
            return results
        async with aclosing(self._search(resource_type, params, results)) as resources:
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
        cap = self.limits.max_attachment_bytes
        # A Binary's base64 is a third larger than the bytes it carries, plus a little JSON.
        response = await self.request("GET", url, idempotent=True, max_bytes=cap + cap // 3 + 4096)
        content_type = response.headers.get("content-type", "application/octet-stream")
        if "json" in content_type.lower():
            try:
                body = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                body = None
            if isinstance(body, dict) and body.get("resourceType") == "Binary":
                content, binary_type = decode_binary(body, response.request.url)
                return within_cap(content, cap, response.request.url), binary_type
        return within_cap(response.content, cap, response.request.url), content_type

    async def stream(
        self, url: str, *, send_token: bool = True, accept: str = NDJSON
    ) -> AsyncGenerator[bytes, None]:
        """GET `url` and yield its body in chunks as they arrive; the whole body is never held.

        With `send_token` the URL must be under the FHIR server's base URL and carries the bearer
        token (renewed once on 401). Without it, any absolute http(s) URL may be read and no
        Authorization header is sent: Bulk Data files served with `requiresAccessToken: false`
        (pre-signed storage URLs, for instance). Opening the response is retried like any
        idempotent GET; once a chunk has been yielded nothing is retried, since the caller has
        seen it. Failures map to `fhir_adapters.errors` as for any request, a connection lost
        mid-body included. Wrap it in `contextlib.aclosing` to release the connection early.
        """
        response = await self.request(
            "GET", url, headers={"Accept": accept}, idempotent=True, send_token=send_token, stream=True
        )
        target = response.request.url
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            raise body_failure(exc, target) from exc
        finally:
            await response.aclose()

    # -- writes --------------------------------------------------------------

    async def create(self, resource: JsonObject, *, if_none_exist: str | None = None) -> JsonObject:
        """POST a new resource. Retried only when conditional (If-None-Exist makes it idempotent)."""
        resource_type = type_of(resource, "create")
        headers = {"Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        response = await self.request(
            "POST", resource_type, json=resource, headers=headers, idempotent=if_none_exist is not None
        )
        return await self._representation(response, f"create {resource_type}")

    async def update(self, resource: JsonObject, *, if_match: str | None = None) -> JsonObject:
        """PUT `Type/id` (idempotent, so retried). `if_match` e.g. `W/"3"` guards against lost updates."""
        resource_type = type_of(resource, "update")
        rid = resource.get("id")
        if not isinstance(rid, str):
            raise ValueError(f"update {resource_type}: the resource has no id")
        headers = {"Prefer": "return=representation"}
        if if_match:
            headers["If-Match"] = if_match
        response = await self.request(
            "PUT", f"{resource_type}/{check_id(rid, 'id')}", json=resource, headers=headers, idempotent=True
        )
        return await self._representation(response, f"update {resource_type}")

    async def transaction(self, bundle: JsonObject, *, idempotent: bool = False) -> JsonObject:
        """POST a transaction/batch Bundle to the base. Retry only if every entry is conditional."""
        if bundle.get("resourceType") != "Bundle":
            raise ValueError("transaction: resourceType must be 'Bundle'")
        headers = {"Prefer": "return=representation"}
        response = await self.request(
            "POST", self.base_url, json=bundle, headers=headers, idempotent=idempotent
        )
        return json_object(response, "transaction", response.request.url)

    async def _representation(self, response: httpx.Response, what: str) -> JsonObject:
        """The written resource: the body if the server sent it, else a GET of its Location."""
        if has_body(response):
            body = json_object(response, what, response.request.url)
            if body.get("resourceType") != "OperationOutcome":
                return body
        location = response.headers.get("location") or response.headers.get("content-location")
        if not location:
            raise FhirUnexpectedResponse(
                f"{what}: the server sent neither the resource nor a Location header",
                status=response.status_code,
                url=url_without_query(response.request.url),
            )
        got = await self.request("GET", location, idempotent=True)
        return json_object(got, what, got.request.url)

    async def _search_page(self, url: str, params: list[tuple[str, str]] | None) -> JsonObject:
        response = await self.request("GET", url, params=params, idempotent=True)
        bundle = json_object(response, "search", response.request.url)
        if bundle.get("resourceType") != "Bundle":
            raise FhirUnexpectedResponse(
                f"search: expected a Bundle, got {bundle.get('resourceType')!r}",
                status=response.status_code,
                url=url_without_query(response.request.url),
            )
        return bundle

    # -- the one send path ---------------------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        json: JsonObject | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool,
        send_token: bool = True,
        stream: bool = False,
        max_bytes: int | None = None,
    ) -> httpx.Response:
        """Send one logical request and return its 2xx response; raise a `FhirError` for anything else.

        `url` is relative to the base, or absolute under it; with `send_token=False` it may
        be any absolute http(s) URL and no token is sent. Idempotent requests are retried on
        `FhirRetryableError` up to `max_attempts`. With `stream` the response comes back open,
        its body unread: the caller reads it and must close it. For REST interactions use the
        methods above; this is for protocols on top of FHIR REST (Bulk Data's kick-off and polls).
        Without `stream` the body is read up to `max_bytes` (default: the limits' response cap)
        and a longer one is abandoned there with `FhirResponseTooLarge`.
        """
        target = self._target(url) if send_token else self._tokenless_target(url)
        content = None if json is None else _encode(json)
        cap = self.limits.max_response_bytes if max_bytes is None else max_bytes
        exchange = _Exchange(method, target, params, content, headers, send_token, stream, cap)
        if not idempotent:
            return await self._attempt(exchange, attempt=1)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(FhirRetryableError),
            before_sleep=_log_retry(method, target),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(exchange, attempt=attempt.retry_state.attempt_number)
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _target(self, url: str) -> httpx.URL:
        try:
            target = httpx.URL(resolve_url(self.base_url, url))
        except httpx.InvalidURL as exc:
            message = f"not a valid URL for the FHIR server {self.base_url}"
            raise FhirBadRequest(message, url=self.base_url) from exc
        if not within_base(target, self.base_url):
            # The token is for this server's FHIR API only: neither another host nor another path
            # on its host (an admin console, a sibling base) ever sees it.
            raise FhirBadRequest(
                f"refusing to send the token to {target.scheme}://{target.host}{target.path}: it is not "
                f"the FHIR server's origin and base path ({self.base_url})",
                url=url_without_query(target),
            )
        return target

    def _tokenless_target(self, url: str) -> httpx.URL:
        target = _absolute_target(self.base_url, url)
        refusal = tokenless_refusal(target, self.base_url, self.file_hosts)
        if refusal is not None:
            raise FhirBadRequest(
                f"refusing to read {url_without_query(target)} without the token: {refusal}",
                url=url_without_query(target),
            )
        return target

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, FhirRateLimited) and error.retry_after is not None:
            return min(error.retry_after, RETRY_AFTER_CAP_SECONDS)
        # Full-range jitter on top of the exponential step keeps many workers from retrying in step.
        jitter = random.uniform(0, self._backoff_initial)  # noqa: S311 - timing, not security
        return backoff_seconds(state.attempt_number, self._backoff_initial, self._backoff_max, jitter)

    async def _attempt(self, exchange: _Exchange, *, attempt: int) -> httpx.Response:
        """One attempt: send, renew the token once on 401, map a non-2xx answer to an error."""
        response = await self._send(exchange, attempt=attempt)
        if response.status_code == 401 and exchange.send_token and self._auth is not None:
            await response.aclose()
            await self._auth.invalidate()
            response = await self._send(exchange, attempt=attempt)
        if response.is_success:
            if not exchange.stream:
                await read_capped(response, exchange.max_bytes)
            return response
        outcome = await error_outcome(response)
        raise error_for_status(
            response.status_code,
            method=exchange.method,
            url=url_without_query(exchange.url),
            outcome=outcome,
            retry_after=parse_retry_after(response.headers.get("retry-after"), datetime.now(UTC)),
        )

    async def _send(self, exchange: _Exchange, *, attempt: int) -> httpx.Response:
        """One HTTP exchange and its one log line; httpx errors are translated here and only here."""
        method, url = exchange.method, exchange.url
        headers = {"Accept": FHIR_JSON, **(exchange.headers or {})}
        if exchange.content is not None:
            headers["Content-Type"] = FHIR_JSON
        if exchange.send_token and self._auth is not None:
            headers["Authorization"] = f"Bearer {await self._auth.token()}"
        params = tuple(exchange.params) if exchange.params else None
        request = self._http.build_request(
            method, url, params=params, content=exchange.content, headers=headers
        )
        started = time.perf_counter()
        try:
            # Always streamed: a body is read (up to its cap) only once its status is known.
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            _log_exchange(method, url, None, started, attempt, error=type(exc).__name__)
            raise FhirTransportError(
                f"{self._where(url)} unreachable ({type(exc).__name__}) for {method} {url.path}",
                url=url_without_query(url),
            ) from exc
        except httpx.HTTPError as exc:
            _log_exchange(method, url, None, started, attempt, error=type(exc).__name__)
            raise FhirUnexpectedResponse(
                f"unreadable answer from {self._where(url)} ({type(exc).__name__}) for {method} {url.path}",
                url=url_without_query(url),
            ) from exc
        _log_exchange(method, url, response.status_code, started, attempt)
        return response

    def _where(self, url: httpx.URL) -> str:
        """The server an error names: the FHIR base, or the other host a file was read from."""
        if same_origin(url, self.base_url):
            return f"the FHIR server at {self.base_url}"
        return f"{url.scheme}://{url.host}"


@dataclass(frozen=True, slots=True)
class _Exchange:
    """What one logical request sends on every attempt (so a retry sends exactly the same)."""

    method: str
    url: httpx.URL
    params: Sequence[tuple[str, str]] | None
    content: bytes | None
    headers: Mapping[str, str] | None
    send_token: bool
    stream: bool
    max_bytes: int


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
