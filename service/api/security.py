"""The web service's defences: response headers, CSRF tokens, bearer-token checks and SMART scopes.

- `SecurityHeaders` (ASGI middleware) sets CSP (no inline script; frame-ancestors limited to the
  configured EHR origins), nosniff, a same-origin referrer policy and no-store on every response.
- `csrf_token` / `csrf_ok`: a token bound to the review session by HMAC; forms carry it.
- `JwtVerifier` checks a bearer JWT against the configured issuer's JWKS (signature with an
  asymmetric algorithm only, iss, aud, exp/nbf/iat). The keys come from the process's one JWKS
  cache (`fhir_adapters.auth.oauth.jwks_cache` of the shared HTTP client, the one the launch's
  id_token check reads too): reused for `cache_seconds`, refetched once when an unknown key id
  shows up (the issuer rotated its keys), at most every 30 s.
- `scopes_allow` reads SMART v1 and v2 scopes; `Principal` is who called, with what rights.

What it must not do: log or echo a token, accept `none` or HMAC-signed tokens, or trust a
token's claims before its signature is checked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from joserfc import jwt
from joserfc.errors import ExpiredTokenError, InvalidKeyIdError, JoseError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_adapters.auth.oauth import JwksCache, SmartError, asymmetric_algorithms, jwks_cache
from service.api.errors import Unauthenticated, Unavailable

log = structlog.get_logger(__name__)

DOCS_PATHS = ("/docs", "/redoc")
# Swagger UI is loaded by FastAPI from its CDN with one inline start-up script; the docs page
# shows no patient data, so it alone gets this looser policy.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
    "frame-ancestors 'none'"
)
NON_HTML_CSP = "default-src 'none'; frame-ancestors 'none'"


# -- headers -------------------------------------------------------------------------------------


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL.

    >>> origin_of("https://ehr.example.org:8443/fhir/R4")
    'https://ehr.example.org:8443'
    """
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def frame_ancestor_origins(frame_ancestors: Sequence[str], allowed_issuers: Sequence[str]) -> list[str]:
    """Who may embed the review screen: the configured origins, else the allowed EHRs' origins.

    >>> frame_ancestor_origins([], ["https://ehr.example.org/fhir", "https://ehr.example.org/r4"])
    ['https://ehr.example.org']
    """
    sources = frame_ancestors or allowed_issuers
    return list(dict.fromkeys(origin_of(u) for u in sources))


def page_csp(frame_ancestors: Iterable[str]) -> str:
    """The Content-Security-Policy of chartbrief's HTML pages: scripts and styles from itself only.

    >>> "script-src 'self';" in page_csp([])
    True
    >>> page_csp(["https://ehr.example.org"]).endswith("frame-ancestors 'self' https://ehr.example.org")
    True
    """
    ancestors = " ".join(["'self'", *frame_ancestors])
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        f"frame-ancestors {ancestors}"
    )


class SecurityHeaders:
    """ASGI middleware adding the security headers to every HTTP response.

    Pure ASGI (not BaseHTTPMiddleware) so streamed responses (server-sent events) pass through
    untouched apart from their headers.
    """

    # Production answers tell browsers to reach chartbrief over https only, for a year (RFC 6797).
    HSTS = "max-age=31536000; includeSubDomains"

    def __init__(self, app: ASGIApp, *, csp: str, hsts: bool = False) -> None:
        self.app = app
        self.csp = csp
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                # same-origin, not no-referrer: with no-referrer browsers send `Origin: null` on
                # form posts, and the Origin check of the review actions needs the real one.
                headers["Referrer-Policy"] = "same-origin"
                if self.hsts:
                    headers["Strict-Transport-Security"] = self.HSTS
                if "cache-control" not in headers and not path.startswith("/static/"):
                    # Pages and API answers carry patient data: never keep them in a shared cache.
                    headers["Cache-Control"] = "no-store"
                is_html = headers.get("content-type", "").startswith("text/html")
                if path.startswith(DOCS_PATHS):
                    headers["Content-Security-Policy"] = DOCS_CSP
                else:
                    headers["Content-Security-Policy"] = self.csp if is_html else NON_HTML_CSP
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- CSRF ----------------------------------------------------------------------------------------


def csrf_token(secret: bytes, session_id: str) -> str:
    """The CSRF token of one review session: an HMAC only the server can make.

    >>> csrf_token(b"k" * 32, "s1") == csrf_token(b"k" * 32, "s1") != csrf_token(b"k" * 32, "s2")
    True
    """
    digest = hmac.new(secret, b"chartbrief-csrf\x00" + session_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def csrf_ok(secret: bytes, session_id: str, token: str | None) -> bool:
    """Constant-time check of a submitted CSRF token."""
    if not token:
        return False
    return hmac.compare_digest(csrf_token(secret, session_id), token)


def same_origin_request(origin_header: str | None, public_base_url: str) -> bool:
    """A POST's Origin (when the browser sent one) must be chartbrief's own.

    >>> same_origin_request(None, "https://cb.example.org")
    True
    >>> same_origin_request("https://evil.example", "https://cb.example.org")
    False
    """
    if origin_header is None:
        return True
    return origin_header.rstrip("/") == origin_of(public_base_url)


# -- scopes --------------------------------------------------------------------------------------

# Checked with fullmatch: `$` would also accept a scope followed by a newline.
_SCOPE = re.compile(r"(patient|user|system)/([A-Za-z]+|\*)\.([a-z*]+)")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True)
class ScopeGrant:
    context: str  # patient | user | system
    resource: str  # a FHIR type or "*"
    actions: frozenset[str]  # subset of c r u d s


def parse_scope(scope: str) -> ScopeGrant | None:
    """One SMART scope as a grant (v2 `cruds` letters or v1 read/write/*); None for other scopes.

    A v2 scope with a query (`patient/Observation.rs?category=laboratory`) is narrower than its
    type: it is not treated as granting the whole type.

    >>> grant = parse_scope("patient/DocumentReference.rs")
    >>> grant.context, grant.resource, sorted(grant.actions)
    ('patient', 'DocumentReference', ['r', 's'])
    >>> sorted(parse_scope("system/*.write").actions)
    ['c', 'd', 'u']
    >>> parse_scope("launch") is None, parse_scope("patient/Observation.rs?category=x") is None
    (True, True)
    """
    match = _SCOPE.fullmatch(scope)
    if match is None:
        return None
    context, resource, permissions = match.groups()
    letters = _V1.get(permissions)
    if letters is None:
        if not re.fullmatch(r"c?r?u?d?s?", permissions) or not permissions:
            return None
        letters = permissions
    return ScopeGrant(context, resource, frozenset(letters))


def scopes_allow(scopes: Iterable[str], resource: str, action: str) -> set[str]:
    """The contexts (patient/user/system) in which `scopes` allow `action` on `resource`.

    >>> sorted(scopes_allow(["patient/DocumentReference.rs", "system/*.c"], "DocumentReference", "r"))
    ['patient']
    >>> scopes_allow(["patient/Observation.rs"], "DocumentReference", "r")
    set()
    """
    contexts: set[str] = set()
    for scope in scopes:
        grant = parse_scope(scope)
        if grant and grant.resource in (resource, "*") and action in grant.actions:
            contexts.add(grant.context)
    return contexts


@dataclass(frozen=True)
class Principal:
    """Who is calling the REST API and what they may do. `patient` set = that patient only."""

    kind: str  # "jwt" | "api-key"
    subject: str  # JWT sub / client_id, or "apikey:<prefix>" - an id, never a secret
    scopes: frozenset[str]
    patient: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def patient_limited(self, contexts: set[str]) -> bool:
        """True when the only rights that apply are patient-level ones (so a patient claim is needed)."""
        return bool(contexts) and contexts <= {"patient"}


# -- JWT -----------------------------------------------------------------------------------------


class JwtVerifier:
    """Verifies bearer JWTs from one issuer against its JWKS (read through the shared JWKS cache)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        issuer: str,
        jwks_url: str,
        audience: str,
        algorithms: Sequence[str],
        leeway_seconds: int = 30,
        cache_seconds: int = 300,
        clock: Callable[[], float] = time.time,
        jwks: JwksCache | None = None,
    ) -> None:
        self._http = http
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.audience = audience
        self.algorithms = asymmetric_algorithms(algorithms)
        if not self.algorithms:
            raise ValueError("JwtVerifier: no asymmetric algorithm to accept (none and HMAC never are)")
        self.leeway = leeway_seconds
        self.cache_seconds = cache_seconds
        self._clock = clock
        self.jwks = jwks if jwks is not None else jwks_cache(http)

    async def verify(self, token: str) -> Principal:
        """The caller behind a valid token, or `Unauthenticated` saying what is wrong with it."""
        now = self._clock()
        try:
            decoded = await self.jwks.decode(
                self._http,
                token,
                self.jwks_url,
                algorithms=self.algorithms,
                what="the token issuer's JWKS",
                max_age=self.cache_seconds,
                now=now,
            )
        except SmartError as exc:
            log.warning("api.jwks_unavailable", error=type(exc.__cause__ or exc).__name__)
            raise Unavailable(
                "the token issuer's keys could not be read (CHARTBRIEF_API__JWKS_URL); try again later"
            ) from exc
        except InvalidKeyIdError as exc:
            raise Unauthenticated(
                "the bearer token is signed with a key the issuer does not publish"
            ) from exc
        except JoseError as exc:
            message = "the bearer token is not a valid signed JWT from the trusted issuer"
            raise Unauthenticated(message) from exc
        except ValueError as exc:  # malformed segments that fail before joserfc's own checks
            raise Unauthenticated("the bearer token is malformed") from exc
        claims = decoded.claims
        registry = jwt.JWTClaimsRegistry(
            now=int(now),
            leeway=self.leeway,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.audience},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError as exc:
            raise Unauthenticated("the bearer token has expired") from exc
        except JoseError as exc:
            claim = getattr(exc, "claim", None) or "a claim"
            raise Unauthenticated(f"the bearer token's {claim} is not accepted here") from exc
        scope = claims.get("scope")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
        patient = claims.get("patient")
        subject = claims.get("sub") or claims.get("client_id") or "unknown"
        return Principal(
            kind="jwt",
            subject=str(subject),
            scopes=scopes,
            patient=str(patient) if patient else None,
            claims=dict(claims),
        )


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated base64url segments.

    >>> looks_like_jwt("a.b.c"), looks_like_jwt("cbk_0123456789")
    (True, False)
    """
    parts = token.split(".")
    return len(parts) == 3 and all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in parts)
