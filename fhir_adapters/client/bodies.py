"""Reading a FHIR server's answer bodies: under a byte cap, as JSON, as an OperationOutcome, as a Binary.

The client streams every response and reads its body here, so no body is held beyond its cap: a
longer one is abandoned there (`FhirResponseTooLarge`), never read whole and checked afterwards.

What it must not do: send anything, or put a body's content into an error message or a log.
"""

from __future__ import annotations

import base64
import binascii
import json

import httpx

from fhir_adapters.client.search import JsonObject, url_without_query
from fhir_adapters.errors import (
    FhirError,
    FhirResponseTooLarge,
    FhirTransportError,
    FhirUnexpectedResponse,
)


def body_failure(exc: httpx.HTTPError, url: httpx.URL) -> FhirError:
    """What a failure while reading a body from `url` is: a lost connection (retryable) or an
    unreadable body (a broken encoding, a protocol error)."""
    if isinstance(exc, httpx.TransportError):
        return FhirTransportError(
            f"connection to {url.host} lost ({type(exc).__name__}) while reading GET {url.path}",
            url=url_without_query(url),
        )
    return FhirUnexpectedResponse(
        f"unreadable body from {url.host} ({type(exc).__name__}) for GET {url.path}",
        url=url_without_query(url),
    )


async def read_capped(response: httpx.Response, limit: int) -> None:
    """Read the body into `response` (so `.content` and `.json()` work), stopping past `limit`."""
    url = response.request.url
    try:
        declared = int(response.headers.get("content-length", ""))
    except ValueError:
        declared = -1
    body = bytearray()
    try:
        if declared <= limit:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    break
    except httpx.HTTPError as exc:
        raise body_failure(exc, url) from exc
    finally:
        await response.aclose()
    if declared > limit or len(body) > limit:
        raise FhirResponseTooLarge(
            f"the answer to {response.request.method} {url.path} is larger than {limit} bytes; not read",
            limit=limit,
            url=url_without_query(url),
        )
    # What httpx's own aread() stores; set here because the body was read under a cap.
    response._content = bytes(body)


def within_cap(content: bytes, limit: int, url: httpx.URL) -> bytes:
    if len(content) > limit:
        raise FhirResponseTooLarge(
            f"the attachment at {url.path} is larger than {limit} bytes; not read",
            limit=limit,
            url=url_without_query(url),
        )
    return content


def json_object(response: httpx.Response, what: str, url: httpx.URL) -> JsonObject:
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


def operation_outcome(response: httpx.Response) -> JsonObject | None:
    """The OperationOutcome an answer carries, or None (not JSON, or another resource)."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


ERROR_BODY_CAP = 1024 * 1024


async def error_outcome(response: httpx.Response) -> JsonObject | None:
    """The OperationOutcome of an error answer (read up to a small cap), then the response closed."""
    try:
        await read_capped(response, ERROR_BODY_CAP)
    except FhirError:
        return None  # the status alone still says what went wrong
    return operation_outcome(response)


def has_body(response: httpx.Response) -> bool:
    return bool(response.content.strip())


def decode_binary(body: JsonObject, url: httpx.URL) -> tuple[bytes, str]:
    data = body.get("data") or ""
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise FhirUnexpectedResponse(
            f"Binary/{body.get('id', '?')}: data is not valid base64", url=url_without_query(url)
        ) from exc
    return decoded, str(body.get("contentType") or "application/octet-stream")
