"""The web service's settings sections: the SMART launch and review screen (`smart`) and the REST
API (`api`), with the URL checks they share with the rest of `service.config`.

Part of chartbrief's one settings object (`service.config.Settings`), split out so each module stays
small; import from `service.config`, which re-exports these. Nothing here reads the environment.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from limits import parse as parse_rate
from pydantic import BaseModel, Field, HttpUrl, SecretStr, field_validator, model_validator

_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
# The development default of `smart.session_secret`; production refuses to start with it.
PLACEHOLDER_SESSION_SECRET = "development-only-session-secret-change-me"  # noqa: S105 - a known placeholder
MIN_SESSION_SECRET_CHARS = 32


def _http_url(value: str, field: str) -> str:
    """`value` without a trailing slash, after checking it is an absolute http(s) URL."""
    try:
        HttpUrl(value)
    except ValueError as exc:
        raise ValueError(f"{field}: {value!r} is not an absolute http(s) URL") from exc
    return value.rstrip("/")


def _is_plain_http_off_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme != "https" and parts.hostname not in _LOOPBACK


class SmartSettings(BaseModel):
    client_id: str = Field(
        default="chartbrief", min_length=1, description="OAuth client id registered with the EHR."
    )
    client_secret: SecretStr | None = Field(
        default=None,
        description="Client secret of a confidential client (client_secret_basic); empty = public client "
        "or private_key_jwt. Never logged.",
    )
    private_key_path: Path | None = Field(
        default=None,
        description="PEM private key for private_key_jwt client authentication (takes precedence over the "
        "secret).",
    )
    private_key_kid: str | None = Field(
        default=None, description="Key id (kid) of that key in the JWKS registered with the EHR."
    )
    private_key_alg: Literal["RS384", "ES384"] = Field(
        default="RS384", description="Signing algorithm of the private_key_jwt client assertion."
    )
    allowed_issuers: list[str] = Field(
        default_factory=list,
        description="FHIR base URLs (iss) allowed to launch chartbrief, as a JSON list "
        '(["https://ehr/fhir"]); any other iss is refused.',
    )
    standalone_issuer: str | None = Field(
        default=None,
        description="FHIR base for a standalone launch (/launch without iss); must be one of "
        "allowed_issuers. Empty = the only allowed issuer when there is exactly one.",
    )
    public_base_url: str = Field(
        default="http://127.0.0.1:8000",
        description="chartbrief's own URL as the browser reaches it; the redirect_uri is this + /callback.",
    )
    scope: str | None = Field(
        default=None,
        description="Scopes requested at launch; empty = the narrow SMART v2 set chartbrief needs.",
    )
    session_secret: SecretStr = Field(
        default=SecretStr(PLACEHOLDER_SESSION_SECRET),
        description="Secret (at least 32 characters) that encrypts stored tokens and signs CSRF tokens; "
        "production refuses the development placeholder.",
    )
    session_ttl_seconds: int = Field(
        default=8 * 3600, ge=300, le=24 * 3600, description="Lifetime of a review session after launch."
    )
    state_ttl_seconds: int = Field(
        default=600,
        ge=60,
        le=3600,
        description="How long an authorize request may take before its state expires.",
    )
    frame_ancestors: list[str] = Field(
        default_factory=list,
        description="Origins allowed to embed the review screen (CSP frame-ancestors), as a JSON list; "
        "empty = the origins of allowed_issuers.",
    )
    cookie_samesite: Literal["lax", "strict", "none"] = Field(
        default="lax",
        description="SameSite of chartbrief's cookies; `none` only when the EHR embeds it from another site.",
    )

    @field_validator("allowed_issuers", "frame_ancestors")
    @classmethod
    def _check_urls(cls, v: list[str]) -> list[str]:
        return [_http_url(url.strip(), "a URL in the list") for url in v]

    @field_validator("standalone_issuer")
    @classmethod
    def _check_standalone(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v.strip(), "standalone_issuer")

    @field_validator("public_base_url")
    @classmethod
    def _check_public(cls, v: str) -> str:
        return _http_url(v.strip(), "public_base_url")

    @model_validator(mode="after")
    def _standalone_is_allowed(self) -> SmartSettings:
        if self.standalone_issuer and self.standalone_issuer not in self.allowed_issuers:
            raise ValueError(
                "CHARTBRIEF_SMART__STANDALONE_ISSUER must be one of CHARTBRIEF_SMART__ALLOWED_ISSUERS"
            )
        return self

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_base_url}/callback"

    def standalone_iss(self) -> str | None:
        """The FHIR base a launch without `iss` goes to, if one can be chosen without guessing."""
        if self.standalone_issuer:
            return self.standalone_issuer
        return self.allowed_issuers[0] if len(self.allowed_issuers) == 1 else None


ApiAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


class ApiSettings(BaseModel):
    jwt_issuer: str | None = Field(
        default=None,
        description="Issuer (iss) of the bearer JWTs the REST API accepts; empty = JWTs are refused "
        "(API keys still work).",
    )
    jwks_url: str | None = Field(default=None, description="JWKS URL with that issuer's public keys.")
    audience: str | None = Field(
        default=None,
        description="The aud a JWT must carry; empty = smart.public_base_url.",
    )
    jwt_algorithms: list[ApiAlgorithm] = Field(
        default_factory=lambda: list[ApiAlgorithm](["RS256", "RS384", "ES256", "ES384"]),
        min_length=1,
        description="Accepted JWT signature algorithms (asymmetric only: never none or HMAC).",
    )
    leeway_seconds: int = Field(
        default=30, ge=0, le=300, description="Clock skew allowed on exp / nbf / iat."
    )
    jwks_cache_seconds: int = Field(
        default=300, ge=0, le=86400, description="How long fetched JWKS keys are reused before a refetch."
    )
    max_jobs: int = Field(
        default=1000,
        ge=10,
        le=100000,
        description="Summary jobs remembered in memory for GET /api/summaries/{id}; the oldest finished "
        "go first.",
    )
    # One model on 2 cores runs one summary at a time: a few queued behind it keep it busy, more only
    # make callers wait longer than a retry would.
    max_queued_work: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="Summaries queued or running in this process at once (API jobs, API streams, "
        "review-screen streams, regenerates); past it a new one is refused with 429 and Retry-After.",
    )
    max_queued_work_per_client: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Of those, at most this many for one client (an API key, a JWT subject or a review "
        "session); at most CHARTBRIEF_API__MAX_QUEUED_WORK.",
    )
    work_estimate_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        description="Expected seconds of one summary, for Retry-After until this process has timed its own "
        "(then the mean of the recent ones).",
    )
    docs_enabled: bool | None = Field(
        default=None,
        description="Serve the OpenAPI docs at /docs and /openapi.json; empty = on in development, off in "
        "production (the docs page loads a script from a CDN and needs 'unsafe-inline').",
    )
    anonymous_rate_limit: str = Field(
        default="30/minute",
        description="Requests one client address may make to the endpoints that need no credentials "
        "(/launch, /callback), as `N/second|minute|hour`; more get 429 with Retry-After.",
    )
    launch_states_per_client: int = Field(
        default=20,
        ge=1,
        le=10000,
        description="Launches one client address may start within smart.state_ttl_seconds (so at most this "
        "many of its sign-in states are unexpired); more get 429.",
    )
    refusal_audits_per_client: str = Field(
        default="10/minute",
        description="Audit rows written for refused anonymous requests of one client address, as "
        "`N/second|minute|hour`; refusals beyond it are counted in the log only.",
    )
    rate_limit_storage_uri: str = Field(
        default="memory://",
        description="Where the rate-limit counters live: memory:// (one process) or redis://host:6379/0 "
        "(shared by several processes).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description='Addresses or networks (JSON list, e.g. ["10.0.0.0/8"]) of reverse proxies whose '
        "X-Forwarded-For names the client; empty = limits count the connecting address.",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest request body accepted; a larger one is refused with 413 before it is read.",
    )
    purge_interval_seconds: int = Field(
        default=900,
        ge=0,
        le=7 * 86400,
        description="How often the service deletes expired sign-in states and sessions (0 = never; "
        "`chartbrief db purge` does it by hand).",
    )

    @field_validator("anonymous_rate_limit", "refusal_audits_per_client")
    @classmethod
    def _check_rate(cls, v: str) -> str:
        try:
            parse_rate(v)
        except ValueError as exc:
            raise ValueError(f"{v!r} is not a rate such as 30/minute") from exc
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an IP address or network") from exc
        return [item.strip() for item in v]

    @field_validator("rate_limit_storage_uri")
    @classmethod
    def _check_storage(cls, v: str) -> str:
        if urlsplit(v.removeprefix("async+")).scheme not in ("memory", "redis", "rediss", "redis+unix"):
            raise ValueError(f"{v!r}: use memory:// or a redis:// URL")
        return v

    user_tokens: Literal["refuse", "check-at-ehr"] = Field(
        default="refuse",
        description="A user-level JWT (user/ scopes, no patient claim) asking for a patient's summary: "
        "refuse = 403 (chartbrief's own FHIR credentials would otherwise reach every patient); "
        "check-at-ehr = first read Patient/{id} at CHARTBRIEF_FHIR__BASE_URL with the caller's own "
        "token, allowed only on 200 (asked on every request, never cached).",
    )

    @field_validator("jwt_issuer", "jwks_url", "audience")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        # An audience may be any string in principle; chartbrief's is its own URL.
        return None if v is None else v.strip().rstrip("/")

    @model_validator(mode="after")
    def _issuer_needs_keys(self) -> ApiSettings:
        if self.jwt_issuer and not self.jwks_url:
            raise ValueError("CHARTBRIEF_API__JWKS_URL is needed when CHARTBRIEF_API__JWT_ISSUER is set")
        if self.jwks_url:
            _http_url(self.jwks_url, "jwks_url")
        return self

    @model_validator(mode="after")
    def _client_share_fits(self) -> ApiSettings:
        if self.max_queued_work_per_client > self.max_queued_work:
            raise ValueError(
                f"CHARTBRIEF_API__MAX_QUEUED_WORK_PER_CLIENT ({self.max_queued_work_per_client}) is more "
                f"than CHARTBRIEF_API__MAX_QUEUED_WORK ({self.max_queued_work})"
            )
        return self


class CdsClient(BaseModel):
    issuer: str = Field(description="The iss this CDS client (EHR) puts in its JWTs.")
    jwks_url: str = Field(description="The JWKS URL with that client's public keys (a jku must equal it).")


class CdsSettings(BaseModel):
    clients: list[CdsClient] = Field(
        default_factory=list,
        description="CDS clients allowed to call the CDS Hooks service (issuer + JWKS URL); empty = "
        "every hook request is refused with 401.",
    )
    service_base_url: str | None = Field(
        default=None,
        description="Public base URL of the CDS services (the JWT aud is <this>/cds-services/"
        "chartbrief-summary); empty = smart.public_base_url.",
    )
    budget_seconds: float = Field(
        default=1.5, gt=0, le=10, description="Time a hook answer may take; past it the card says a "
        "summary is being prepared."
    )
    max_token_age_seconds: int = Field(
        default=300, ge=10, le=3600, description="How old a CDS client's JWT (its iat) may be."
    )


class MetricsSettings(BaseModel):
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Serve /metrics on this port of its own (no authentication: bind it to an address only "
        "Prometheus reaches, CHARTBRIEF_METRICS__HOST); then the main port has no /metrics. Empty = "
        "/metrics on the main port, behind CHARTBRIEF_METRICS__BEARER_TOKEN.",
    )
    host: str = Field(
        default="127.0.0.1", min_length=1, description="Address the metrics port binds to."
    )
    bearer_token: SecretStr | None = Field(
        default=None,
        description="The token Prometheus sends (`Authorization: Bearer`) to read /metrics on the main port. "
        "Empty and no CHARTBRIEF_METRICS__PORT = /metrics is off (404).",
    )
