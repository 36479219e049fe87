"""SMART Backend Services: a system token for nightly batch work, with no user present.

`BackendServicesToken` is a `TokenProvider` for `FhirClient`: it signs a client assertion (JWT,
RS384 or ES384, header `alg, kid, typ=JWT`, claims `iss = sub = client_id`, `aud` = the token
endpoint, `exp` <= now + 300 s, a unique `jti`), trades it for an access token with
`grant_type=client_credentials`, caches the token and gets a new one before `expires_in` runs
out (or at once after the FHIR server answered 401). `generate_key()` makes the key pair whose
public half, as a JWKS, is registered with the EHR.

JOSE work is done by joserfc. Must not: log or repr a token, an assertion or a private key.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import structlog
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from fhir_adapters.scopes import DEFAULT_SYSTEM_SCOPES

log = structlog.get_logger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
Alg = Literal["RS384", "ES384"]


class BackendAuthError(Exception):
    """The token endpoint refused us or could not be reached; the message says why (no secrets)."""


def generate_key(alg: Alg = "RS384", kid: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """A new private key (PKCS#8 PEM) and its public JWK (with `kid`, `alg`, `use=sig`)."""
    key: RSAKey | ECKey = (
        RSAKey.generate_key(2048, private=True)
        if alg == "RS384"
        else ECKey.generate_key("P-384", private=True)
    )
    public = key.as_dict(private=False)
    public.update({"kid": kid or key.thumbprint(), "alg": alg, "use": "sig", "key_ops": ["verify"]})
    return key.as_pem(private=True), public


def public_jwk(private_pem: bytes, alg: Alg, kid: str | None = None) -> dict[str, Any]:
    key = _import_key(private_pem, alg)
    public = key.as_dict(private=False)
    public.update({"kid": kid or key.thumbprint(), "alg": alg, "use": "sig", "key_ops": ["verify"]})
    return public


def _import_key(private_pem: bytes, alg: Alg) -> RSAKey | ECKey:
    try:
        return RSAKey.import_key(private_pem) if alg == "RS384" else ECKey.import_key(private_pem)
    except (ValueError, TypeError, JoseError) as exc:
        raise BackendAuthError(f"the private key is not a {alg} key in PEM form") from exc


@dataclass(frozen=True)
class BackendClient:
    """The registration chartbrief holds at the EHR."""

    client_id: str
    private_key_pem: bytes = field(repr=False)
    alg: Alg = "RS384"
    kid: str | None = None
    scope: str = DEFAULT_SYSTEM_SCOPES
    token_url: str | None = None  # None: discovered from {fhir_base}/.well-known/smart-configuration

    def assertion(self, token_url: str, now: float) -> str:
        key = _import_key(self.private_key_pem, self.alg)
        header = {"alg": self.alg, "kid": self.kid or key.thumbprint(), "typ": "JWT"}
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "exp": int(now) + 240,
            "iat": int(now),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(header, claims, key, algorithms=[self.alg])


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
        url = f"{self._fhir_base}/.well-known/smart-configuration"
        try:
            response = await self._http.get(url, headers={"Accept": "application/json"})
            config = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError) as exc:
            raise BackendAuthError(f"cannot read {url}: {type(exc).__name__}") from exc
        token_url = config.get("token_endpoint") if isinstance(config, dict) else None
        if not isinstance(token_url, str) or not token_url:
            raise BackendAuthError(f"{url} names no token_endpoint (HTTP {response.status_code})")
        return token_url

    async def _fetch(self) -> _Cached:
        if self._token_url is None:
            self._token_url = await self._discover()
        now = self._clock()
        form = {
            "grant_type": "client_credentials",
            "scope": self._client.scope,
            "client_assertion_type": ASSERTION_TYPE,
            # The assertion is judged by the server's clock: always sign with the wall clock.
            "client_assertion": self._client.assertion(self._token_url, time.time()),
        }
        try:
            response = await self._http.post(
                self._token_url, data=form, headers={"Accept": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise BackendAuthError(
                f"token endpoint {self._token_url} unreachable: {type(exc).__name__}"
            ) from exc
        body = _json(response)
        if response.status_code != 200 or not isinstance(body.get("access_token"), str):
            reason = body.get("error_description") or body.get("error") or f"HTTP {response.status_code}"
            raise BackendAuthError(
                f"token endpoint {self._token_url} refused client {self._client.client_id}: {reason}"
            )
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 300.0
        self.fetched += 1
        scope = str(body.get("scope") or "")
        log.info(
            "backend_token",
            client_id=self._client.client_id,
            expires_in=int(lifetime),
            scopes=len(scope.split()),
        )
        return _Cached(token=body["access_token"], expires_at=now + lifetime, scope=scope, lifetime=lifetime)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
