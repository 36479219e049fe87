"""SMART Backend Services: a system token for nightly batch work, with no user present.

`BackendServicesToken` is a `TokenProvider` for `FhirClient`: it signs a client assertion (JWT,
RS384 or ES384, header `alg, kid, typ=JWT`, claims `iss = sub = client_id`, `aud` = the token
endpoint, `exp` <= now + 300 s, a unique `jti`), trades it for an access token with
`grant_type=client_credentials`, caches the token and gets a new one before `expires_in` runs
out (or at once after the FHIR server answered 401). The key pair whose public half is
registered with the EHR comes from `oauth.generate_key`.

Discovery, the assertion and the token request are the OAuth shared with the EHR launch
(`fhir_adapters.auth.oauth`); their `SmartError`s become `BackendAuthError` here, the one error
a batch has to handle. Must not: log or repr a token, an assertion or a private key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import structlog

from fhir_adapters.auth.oauth import (
    CLIENT_ASSERTION_TYPE,
    DEFAULT_EXPIRES_IN_SECONDS,
    AssertionAlg,
    SmartError,
    post_token_request,
    read_smart_configuration,
    sign_assertion,
    smart_configuration_url,
)
from fhir_adapters.auth.scopes import DEFAULT_SYSTEM_SCOPES
from fhir_adapters.errors import ChartbriefError

log = structlog.get_logger(__name__)


class BackendAuthError(ChartbriefError):
    """The token endpoint refused us or could not be reached; the message says why (no secrets)."""


@dataclass(frozen=True)
class BackendClient:
    """The registration chartbrief holds at the EHR."""

    client_id: str
    private_key_pem: bytes = field(repr=False)
    alg: AssertionAlg = "RS384"
    kid: str | None = None
    scope: str = DEFAULT_SYSTEM_SCOPES
    token_url: str | None = None  # None: discovered from {fhir_base}/.well-known/smart-configuration

    def assertion(self, token_url: str, now: float) -> str:
        """The signed client assertion for one token request (`now`: the wall clock)."""
        try:
            return sign_assertion(
                self.client_id, token_url, self.private_key_pem, alg=self.alg, kid=self.kid, now=now
            )
        except ValueError as exc:
            raise BackendAuthError(str(exc)) from exc


@dataclass
class _Cached:
    token: str = field(repr=False)
    expires_at: float
    scope: str
    lifetime: float

    def due(self, now: float, margin: float) -> bool:
        """Renew `margin` seconds early, or halfway for tokens shorter than twice the margin."""
        return self.expires_at - min(margin, self.lifetime / 2) <= now


class BackendServicesToken:
    """A cached, self-renewing system token (`TokenProvider`)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        fhir_base: str,
        client: BackendClient,
        *,
        renew_margin_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._fhir_base = fhir_base.rstrip("/")
        self._client = client
        self._margin = renew_margin_seconds
        self._clock = clock
        self._token_url = client.token_url
        self._cached: _Cached | None = None
        self._lock = asyncio.Lock()
        self.fetched = 0  # tokens obtained so far (a count, for reports and tests)

    def __repr__(self) -> str:
        return f"BackendServicesToken(client_id={self._client.client_id!r}, fhir_base={self._fhir_base!r})"

    @property
    def granted_scope(self) -> str | None:
        return self._cached.scope if self._cached else None

    async def token(self) -> str:
        async with self._lock:
            cached = self._cached
            if cached is None or cached.due(self._clock(), self._margin):
                cached = self._cached = await self._fetch()
            return cached.token

    async def invalidate(self) -> None:
        async with self._lock:
            self._cached = None

    async def _discover(self) -> str:
        url = smart_configuration_url(self._fhir_base)
        try:
            config = await read_smart_configuration(self._http, self._fhir_base)
        except SmartError as exc:
            raise BackendAuthError(f"cannot read {url}: {exc}") from exc
        token_url = config.get("token_endpoint") if isinstance(config, dict) else None
        if not isinstance(token_url, str) or not token_url:
            raise BackendAuthError(f"{url} names no token_endpoint")
        return token_url

    async def _fetch(self) -> _Cached:
        if self._token_url is None:
            self._token_url = await self._discover()
        now = self._clock()
        form = {
            "grant_type": "client_credentials",
            "scope": self._client.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            # The assertion is judged by the server's clock: always sign with the wall clock.
            "client_assertion": self._client.assertion(self._token_url, time.time()),
        }
        try:
            answer = await post_token_request(
                self._http, self._token_url, form, what=f"token endpoint {self._token_url}"
            )
        except SmartError as exc:
            raise BackendAuthError(str(exc)) from exc
        body = answer.body if isinstance(answer.body, dict) else {}
        access_token = body.get("access_token")
        if answer.status != 200 or not isinstance(access_token, str):
            error, description = answer.oauth_error()
            reason = description or error or f"HTTP {answer.status}"
            raise BackendAuthError(
                f"token endpoint {self._token_url} refused client {self._client.client_id}: {reason}"
            )
        expires_in = body.get("expires_in")
        lifetime = (
            float(expires_in)
            if isinstance(expires_in, int | float) and expires_in > 0
            else float(DEFAULT_EXPIRES_IN_SECONDS)
        )
        self.fetched += 1
        scope = str(body.get("scope") or "")
        log.info(
            "backend_token",
            client_id=self._client.client_id,
            expires_in=int(lifetime),
            scopes=len(scope.split()),
        )
        return _Cached(token=access_token, expires_at=now + lifetime, scope=scope, lifetime=lifetime)
