"""Bounds on what a caller without credentials can make the service do, and on request bodies.

- `client_address`: the address a limit is kept for - the peer, or (only when the peer is one of
  `api.trusted_proxies`) the nearest untrusted address of `X-Forwarded-For`.
- `Throttle`: moving-window limits per client address (the `limits` library; in memory, or shared
  through `api.rate_limit_storage_uri`). `check` raises `TooManyRequests` (429 with Retry-After);
  `allow` only answers, for writes that are skipped rather than refused (audit rows of refusals).
- `BodyLimit`: ASGI middleware refusing a body over `api.max_body_bytes` with 413 before any route
  parses it, by its Content-Length or, for a chunked body, as soon as the bytes read pass the limit.

What it must not do: trust a forwarded header from a peer that is not a configured proxy, read a
body past the limit, or log an address.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request
from limits import RateLimitItem, parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import FHIR_JSON, PayloadTooLarge, TooManyRequests, operation_outcome
from service.config import ApiSettings

log = structlog.get_logger(__name__)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        return None


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[IpNetwork]) -> str:
    """The address limits are counted for.

    >>> nets = [ipaddress.ip_network("10.0.0.0/8")]
    >>> client_address("10.0.0.2", "203.0.113.9, 10.0.0.7", nets)
    '203.0.113.9'
    >>> client_address("198.51.100.4", "203.0.113.9", nets)
    '198.51.100.4'
    """
    address = peer or "unknown"
    peer_ip = _address(address)
    if forwarded_for is None or peer_ip is None or not any(peer_ip in net for net in trusted):
        return address
    # Right to left: each trusted proxy appended the address it was reached from.
    for hop in reversed(forwarded_for.split(",")):
        hop_ip = _address(hop)
        if hop_ip is None:
            return address
        if not any(hop_ip in net for net in trusted):
            return str(hop_ip)
    return address


def _storage_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else f"async+{uri}"


@dataclass(frozen=True)
class Throttle:
    """The rate limits of the anonymous endpoints, per client address."""

    limiter: MovingWindowRateLimiter
    trusted: tuple[IpNetwork, ...]
    anonymous: RateLimitItem
    launch_states: RateLimitItem
    refusal_audits: RateLimitItem

    @classmethod
    def from_settings(cls, api: ApiSettings, *, state_ttl_seconds: int) -> Throttle:
        storage = storage_from_string(_storage_uri(api.rate_limit_storage_uri))
        return cls(
            limiter=MovingWindowRateLimiter(storage),
            trusted=tuple(ipaddress.ip_network(p, strict=False) for p in api.trusted_proxies),
            anonymous=parse(api.anonymous_rate_limit),
            # Every state lives state_ttl_seconds: N per that window bounds a client's unexpired states.
            launch_states=parse(f"{api.launch_states_per_client}/{state_ttl_seconds} second"),
            refusal_audits=parse(api.refusal_audits_per_client),
        )

    def client(self, request: Request) -> str:
        peer = request.client.host if request.client else None
        return client_address(peer, request.headers.get("x-forwarded-for"), self.trusted)

    async def check(self, item: RateLimitItem, bucket: str, client: str, what: str) -> None:
        """Count one request of `client` in `bucket`; 429 with Retry-After once the limit is reached."""
        if await self.limiter.hit(item, bucket, client):
            return
        stats = await self.limiter.get_window_stats(item, bucket, client)
        retry_after = max(1, int(stats.reset_time - time.time()) + 1)
        log.warning("throttle.refused", bucket=bucket, retry_after=retry_after)
        raise TooManyRequests(
            f"too many {what} from this address (limit {item}); try again in {retry_after} seconds",
            retry_after=retry_after,
        )

    async def allow(self, item: RateLimitItem, bucket: str, client: str) -> bool:
        """Count one event of `client` in `bucket`; False once over the limit (the event is skipped)."""
        return await self.limiter.hit(item, bucket, client)


def get_throttle(request: Request) -> Throttle:
    throttle: Throttle = request.app.state.throttle
    return throttle


ThrottleDep = Annotated[Throttle, Depends(get_throttle)]


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413) before the application reads them whole."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, send)
            return
        seen = 0
        too_large = False
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    raise PayloadTooLarge(self._message())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if too_large:
                # Whatever the app makes of a body it never got whole (its parser may call the
                # failure a 400), the answer is the 413.
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not too_large or started:
                raise
        if too_large and not started:
            await self._refuse(scope, send)

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes (CHARTBRIEF_API__MAX_BODY_BYTES)"

    async def _refuse(self, scope: Scope, send: Send) -> None:
        log.warning("http.body_too_large", path=scope.get("path"), limit=self.max_bytes)
        body = json.dumps(operation_outcome(PayloadTooLarge.code, self._message())).encode("utf-8")
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", FHIR_JSON.encode("ascii")),
                    (b"content-length", str(len(body)).encode("ascii")),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


__all__ = ["BodyLimit", "Throttle", "ThrottleDep", "client_address", "get_throttle"]
