"""SMART App Launch 2.2 on the app's side: discovery, PKCE, the authorize URL, the token exchange,
refresh, and the checks on what the EHR's authorization server answers.

```
discover(http, iss)                -> SmartConfiguration   GET {iss}/.well-known/smart-configuration
new_pkce()                         -> (verifier, S256 challenge)
authorize_url(config, ...)         -> the URL the browser is sent to (response_type=code, aud=iss, PKCE)
exchange_code(http, config, ...)   -> TokenSet              POST token_endpoint, grant_type=authorization_code
refresh_tokens(http, config, ...)  -> TokenSet              POST token_endpoint, grant_type=refresh_token
RefreshingToken                    a `TokenProvider` for `FhirClient` that refreshes 60 s before expiry
```

Client authentication follows `SmartClient`: `private_key_jwt` (a signed client assertion, RS384 or
ES384) when it holds a private key, `client_secret_basic` when it holds a secret, otherwise a public
client (client_id in the form, PKCE as its only proof). An `id_token` in a token response is verified
against the server's JWKS (signature RS256/RS384/ES384, iss, aud = client_id, exp) before its
`fhirUser` is believed.

Errors: one class, `SmartError`, whose message is fit for a person (it says what was wrong and
with which endpoint or field) and never contains a token, code, verifier, secret or key.
`oauth_error` carries the server's OAuth error code (`invalid_grant`, ...) when it sent one, so a
caller can tell "launch again" apart from "the EHR is down" without matching on text.

What this module must not do: log or show in `repr()` any token, authorization code, PKCE
verifier, client secret or private key; talk to an endpoint over plain http anywhere but loopback
(unless the caller allows it for development); trust an id_token it could not verify; hand-roll
any cryptography (authlib and joserfc do PKCE and JWTs).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote_plus

import httpx
import structlog
from authlib.common.security import generate_token
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwk, jwt
from joserfc.errors import ExpiredTokenError, JoseError, MissingClaimError

from fhir_adapters.auth import TokenProvider

JsonObject = dict[str, Any]

_log = structlog.get_logger(__name__)

SMART_CONFIGURATION_PATH = ".well-known/smart-configuration"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


ID_TOKEN_ALGORITHMS = ("RS256", "RS384", "ES384")
CLIENT_ASSERTION_ALGORITHMS = ("RS384", "ES384")
# A client assertion lives well under the 300 s SMART allows, so a server with a little clock
# skew still accepts it.
CLIENT_ASSERTION_LIFETIME_SECONDS = 240
REFRESH_LEEWAY_SECONDS = 60.0
# A token response without expires_in: assume short-lived rather than forever.
DEFAULT_EXPIRES_IN_SECONDS = 300
CLOCK_SKEW_SECONDS = 60
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_RELATIVE_REFERENCE = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})")
_BEARER = "Bearer"
_TOKEN_FIELDS = frozenset({"access_token", "refresh_token", "id_token"})


class SmartError(Exception):
    """A SMART step failed; the message says why for a person and never carries a secret."""

    def __init__(self, message: str, *, oauth_error: str | None = None) -> None:
        super().__init__(message)
        self.oauth_error = oauth_error


# ---------------------------------------------------------------------------
# Plain data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SmartConfiguration:
    """What `{iss}/.well-known/smart-configuration` says about an EHR's authorization server."""

    issuer: str | None
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str | None
    capabilities: tuple[str, ...]
    code_challenge_methods_supported: tuple[str, ...]
    raw: JsonObject = field(repr=False)

    def supports(self, capability: str) -> bool:
        """True when the server lists `capability` (e.g. `launch-ehr`, `client-confidential-asymmetric`)."""
        return capability in self.capabilities


@dataclass(frozen=True)
class SmartClient:
    """How chartbrief authenticates at the token endpoint.

    private_key_jwt when `private_key_pem` is given, client_secret_basic when `client_secret` is
    given, otherwise a public client. Giving both is refused: the EHR registered one method.
    """

    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    private_key_pem: str | None = field(default=None, repr=False)
    kid: str | None = None
    alg: str = "RS384"

    def __post_init__(self) -> None:
        if not self.client_id.strip():
            raise ValueError("SmartClient.client_id is empty")
        if self.client_secret is not None and self.private_key_pem is not None:
            raise ValueError(
                "SmartClient: give either client_secret (client_secret_basic) or private_key_pem "
                "(private_key_jwt), not both"
            )
        if self.client_secret is not None and not self.client_secret:
            raise ValueError("SmartClient.client_secret is empty (leave it unset for a public client)")
        if self.private_key_pem is not None:
            if self.alg not in CLIENT_ASSERTION_ALGORITHMS:
                raise ValueError(
                    f"SmartClient.alg {self.alg!r} is not allowed for client assertions; "
                    f"use one of {', '.join(CLIENT_ASSERTION_ALGORITHMS)}"
                )
            _signing_key(self.private_key_pem, self.alg)  # fail now, not at the first launch

    @property
    def auth_method(self) -> str:
        """`private_key_jwt`, `client_secret_basic` or `none` (public client)."""
        if self.private_key_pem is not None:
            return "private_key_jwt"
        if self.client_secret is not None:
            return "client_secret_basic"
        return "none"

    def public_jwks(self) -> JsonObject:
        """The JWKS to register with the EHR for private_key_jwt (public part only)."""
        if self.private_key_pem is None:
            raise ValueError("SmartClient has no private key: it has no JWKS to publish")
        key = _signing_key(self.private_key_pem, self.alg)
        public = dict(key.as_dict(private=False))
        public.update({"kid": self._kid(key), "alg": self.alg, "use": "sig"})
        return {"keys": [public]}

    def _kid(self, key: jwk.Key) -> str:
        return self.kid or key.thumbprint()

    def __repr__(self) -> str:
        return f"SmartClient(client_id={self.client_id!r}, auth_method={self.auth_method!r})"


@dataclass(frozen=True)
class TokenSet:
    """What the token endpoint granted, with the launch context that came along.

    `raw_claims` is the token response without its three tokens (context parameters such as
    `intent` or `smart_style_url` survive there). Never logged; `repr()` hides every token.
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_at: float
    scope: str
    refresh_token: str | None = field(repr=False)
    id_token: str | None = field(repr=False)
    patient: str | None
    encounter: str | None
    fhir_context: tuple[JsonObject, ...]
    need_patient_banner: bool
    fhir_user: str | None
    raw_claims: JsonObject = field(repr=False)

    @property
    def granted_scopes(self) -> frozenset[str]:
        return frozenset(split_scopes(self.scope))

    @property
    def fhir_user_reference(self) -> str | None:
        """`fhirUser` as a relative reference (`Practitioner/123`), whether it came absolute or not."""
        return relative_reference(self.fhir_user) if self.fhir_user else None

    def seconds_left(self, now: float) -> float:
        return self.expires_at - now

    def needs_refresh(self, now: float, leeway: float = REFRESH_LEEWAY_SECONDS) -> bool:
        return self.seconds_left(now) < leeway

    def to_dict(self) -> JsonObject:
        """JSON-ready form for encrypted storage (it holds the tokens: encrypt it, never log it)."""
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_at": self.expires_at,
            "scope": self.scope,
            "refresh_token": self.refresh_token,
            "id_token": self.id_token,
            "patient": self.patient,
            "encounter": self.encounter,
            "fhir_context": [dict(item) for item in self.fhir_context],
            "need_patient_banner": self.need_patient_banner,
            "fhir_user": self.fhir_user,
            "raw_claims": dict(self.raw_claims),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenSet:
        """The inverse of `to_dict` (a missing or mistyped field is a `ValueError` naming it)."""
        try:
            return cls(
                access_token=str(data["access_token"]),
                token_type=str(data["token_type"]),
                expires_at=float(data["expires_at"]),
                scope=str(data["scope"]),
                refresh_token=_optional_str(data.get("refresh_token")),
                id_token=_optional_str(data.get("id_token")),
                patient=_optional_str(data.get("patient")),
                encounter=_optional_str(data.get("encounter")),
                fhir_context=tuple(dict(item) for item in data.get("fhir_context") or ()),
                need_patient_banner=bool(data.get("need_patient_banner", True)),
                fhir_user=_optional_str(data.get("fhir_user")),
                raw_claims=dict(data.get("raw_claims") or {}),
            )
        except KeyError as exc:
            raise ValueError(f"stored token set has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"stored token set is malformed ({type(exc).__name__})") from None

    def __repr__(self) -> str:
        return (
            f"TokenSet(token_type={self.token_type!r}, expires_at={self.expires_at:.0f}, "
            f"scope={self.scope!r}, patient={self.patient!r}, encounter={self.encounter!r}, "
            f"refreshable={self.refresh_token is not None}, access_token=<redacted>)"
        )

    __str__ = __repr__


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def split_scopes(scope: str | Iterable[str]) -> tuple[str, ...]:
    """Scopes as a tuple, order kept, duplicates dropped.

    >>> split_scopes("launch  openid launch")
    ('launch', 'openid')
    >>> split_scopes(["openid", "fhirUser"])
    ('openid', 'fhirUser')
    """
    items = scope.split() if isinstance(scope, str) else [s.strip() for s in scope]
    return tuple(dict.fromkeys(s for s in items if s))


def relative_reference(url_or_reference: str) -> str | None:
    """`Type/id` from a relative reference or an absolute resource URL; None when it is neither.

    >>> relative_reference("https://ehr.example.org/fhir/Practitioner/dr-1")
    'Practitioner/dr-1'
    >>> relative_reference("Practitioner/dr-1")
    'Practitioner/dr-1'
    >>> relative_reference("not a reference") is None
    True
    """
    parts = url_or_reference.rstrip("/").split("/")
    if len(parts) < 2:
        return None
    candidate = "/".join(parts[-2:])
    return candidate if _RELATIVE_REFERENCE.fullmatch(candidate) else None


def is_loopback(url: str) -> bool:
    """True when the URL's host is the local machine.

    >>> is_loopback("http://127.0.0.1:8080/fhir"), is_loopback("http://ehr.example.org/fhir")
    (True, False)
    """
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL:
        return False
    return host in _LOOPBACK_HOSTS


def _endpoint(body: Mapping[str, Any], name: str, where: str, *, allow_http: bool) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise SmartError(f"{where} has no {name}: the EHR cannot be used for a SMART launch")
    return _checked_url(value.strip(), f"{where} {name}", allow_http=allow_http)


def _checked_url(value: str, what: str, *, allow_http: bool) -> str:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise SmartError(f"{what} ({value!r}) is not a valid URL") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise SmartError(f"{what} ({value!r}) must be an absolute http(s) URL")
    if url.scheme == "http" and not allow_http and not is_loopback(value):
        # Codes and tokens cross this connection: plain http is for a developer's own machine.
        raise SmartError(f"{what} ({value!r}) must use https (plain http is accepted only on loopback)")
    return value


def _string_tuple(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(item for item in value if isinstance(item, str))


def parse_smart_configuration(body: object, iss: str, *, allow_http: bool = False) -> SmartConfiguration:
    """Check a smart-configuration document and keep what chartbrief needs (pure)."""
    where = f"the SMART configuration of {iss}"
    if not isinstance(body, dict):
        raise SmartError(f"{where} is not a JSON object")
    authorization = _endpoint(body, "authorization_endpoint", where, allow_http=allow_http)
    token = _endpoint(body, "token_endpoint", where, allow_http=allow_http)
    methods = _string_tuple(body.get("code_challenge_methods_supported"))
    if "S256" not in methods:
        raise SmartError(
            f"{where} does not list S256 in code_challenge_methods_supported; "
            "chartbrief only launches with PKCE S256"
        )
    jwks_uri = body.get("jwks_uri")
    issuer = body.get("issuer")
    return SmartConfiguration(
        issuer=issuer.strip() if isinstance(issuer, str) and issuer.strip() else None,
        authorization_endpoint=authorization,
        token_endpoint=token,
        jwks_uri=(
            _checked_url(jwks_uri.strip(), f"{where} jwks_uri", allow_http=allow_http)
            if isinstance(jwks_uri, str) and jwks_uri.strip()
            else None
        ),
        capabilities=_string_tuple(body.get("capabilities")),
        code_challenge_methods_supported=methods,
        raw=dict(body),
    )


def new_pkce() -> tuple[str, str]:
    """A fresh PKCE pair: (code_verifier, its S256 code_challenge).

    The verifier is 64 characters of the RFC 7636 alphabet; it stays server-side until the
    token exchange.
    """
    verifier = cast(str, generate_token(64))
    return verifier, cast(str, create_s256_code_challenge(verifier))


def authorize_url(
    config: SmartConfiguration,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str | Iterable[str],
    state: str,
    aud: str,
    code_challenge: str,
    launch: str | None,
) -> str:
    """The authorization request URL (response_type=code, PKCE S256, aud = the FHIR base).

    >>> config = parse_smart_configuration({
    ...     "authorization_endpoint": "http://127.0.0.1:9/authorize", "token_endpoint": "http://127.0.0.1:9/token",
    ...     "code_challenge_methods_supported": ["S256"]}, "http://127.0.0.1:9/fhir")
    >>> authorize_url(config, client_id="cb", redirect_uri="http://127.0.0.1:8000/callback",
    ...     scope="launch openid", state="s1", aud="http://127.0.0.1:9/fhir", code_challenge="c1",
    ...     launch="L1")  # doctest: +NORMALIZE_WHITESPACE
    'http://127.0.0.1:9/authorize?response_type=code&client_id=cb&redirect_uri=http%3A%2F%2F127.0.0.1%3A8000%2Fcallback&scope=launch+openid&state=s1&aud=http%3A%2F%2F127.0.0.1%3A9%2Ffhir&code_challenge=c1&code_challenge_method=S256&launch=L1'
    """
    scopes = split_scopes(scope)
    for name, value in (
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("state", state),
        ("aud", aud),
        ("code_challenge", code_challenge),
    ):
        if not value or not value.strip():
            raise ValueError(f"authorize_url: {name} is empty")
    if not scopes:
        raise ValueError("authorize_url: scope is empty")
    if launch is not None and "launch" not in scopes:
        raise ValueError("authorize_url: an EHR launch (launch=...) needs the `launch` scope")
    params: list[tuple[str, str]] = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("scope", " ".join(scopes)),
        ("state", state),
        ("aud", aud),
        ("code_challenge", code_challenge),
        ("code_challenge_method", "S256"),
    ]
    if launch is not None:
        params.append(("launch", launch))
    endpoint = httpx.URL(config.authorization_endpoint)
    existing = list(endpoint.params.multi_items())
    return str(endpoint.copy_with(params=existing + params))


def _signing_key(private_key_pem: str, alg: str) -> jwk.Key:
    key_type = "EC" if alg.startswith("ES") else "RSA"
    try:
        key = jwk.import_key(private_key_pem, key_type)
    except (JoseError, ValueError, TypeError) as exc:
        # The message names the problem, never the key material.
        raise ValueError(f"the client private key is not a PEM {key_type} key usable with {alg}") from exc
    if not key.is_private:
        raise ValueError("the client key PEM holds a public key; private_key_jwt needs the private key")
    return key


def client_assertion(client: SmartClient, token_endpoint: str, *, now: float) -> str:
    """A signed private_key_jwt assertion: iss = sub = client_id, aud = token endpoint, unique jti."""
    if client.private_key_pem is None:
        raise ValueError("client_assertion: the SmartClient has no private key")
    key = _signing_key(client.private_key_pem, client.alg)
    header = {"alg": client.alg, "kid": client._kid(key), "typ": "JWT"}
    issued = int(now)
    claims = {
        "iss": client.client_id,
        "sub": client.client_id,
        "aud": token_endpoint,
        "iat": issued,
        "exp": issued + CLIENT_ASSERTION_LIFETIME_SECONDS,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(header, claims, key, algorithms=[client.alg])


def client_authentication(
    client: SmartClient, token_endpoint: str, *, now: float
) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, form fields) that authenticate `client` at the token endpoint."""
    if client.private_key_pem is not None:
        return {}, {
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": client_assertion(client, token_endpoint, now=now),
        }
    if client.client_secret is not None:
        # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding.
        pair = f"{quote_plus(client.client_id)}:{quote_plus(client.client_secret)}"
        encoded = base64.b64encode(pair.encode("utf-8")).decode("ascii")
        return {"Authorization": f"Basic {encoded}"}, {}
    return {}, {"client_id": client.client_id}


def _fhir_id(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _FHIR_ID.fullmatch(value):
        # It ends up in request paths and in the patient-context check: refuse anything odd.
        raise SmartError(f"the token response's {name} is not a valid FHIR id")
    return value


def _fhir_context(value: object) -> tuple[JsonObject, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SmartError("the token response's fhirContext is not a list")
    items = tuple(item for item in value if isinstance(item, dict))
    if len(items) != len(value):
        _log.warning("smart.fhir_context_skipped", skipped=len(value) - len(items))
    return items


def _expires_at(body: Mapping[str, Any], now: float) -> float:
    value = body.get("expires_in")
    if value is None:
        return now + DEFAULT_EXPIRES_IN_SECONDS
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise SmartError("the token response's expires_in is not a number of seconds")
    return now + float(value)


def parse_token_response(
    body: object,
    *,
    now: float,
    previous: TokenSet | None = None,
    fhir_user: str | None = None,
) -> TokenSet:
    """A token endpoint's JSON answer as a `TokenSet` (pure; the id_token is checked before this).

    With `previous` (a refresh), what the answer leaves out is kept from the old set: refresh
    token, scope, id_token, fhirUser and the launch context. A refresh that names another
    patient than the launch is refused.
    """
    if not isinstance(body, dict):
        raise SmartError("the token response is not a JSON object")
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise SmartError("the token response has no access_token")
    token_type = body.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise SmartError(f"the token response's token_type is {token_type!r}; chartbrief needs Bearer")
    scope = body.get("scope")
    if not isinstance(scope, str) or not scope.strip():
        if previous is None:
            raise SmartError("the token response has no scope: the granted scopes cannot be checked")
        scope = previous.scope
    patient = _fhir_id(body.get("patient"), "patient")
    encounter = _fhir_id(body.get("encounter"), "encounter")
    context = _fhir_context(body.get("fhirContext"))
    banner = body.get("need_patient_banner")
    if banner is not None and not isinstance(banner, bool):
        raise SmartError("the token response's need_patient_banner is not a boolean")
    refresh_token = body.get("refresh_token")
    id_token = body.get("id_token")
    raw = {k: v for k, v in body.items() if k not in _TOKEN_FIELDS}
    if previous is not None:
        if patient is not None and previous.patient is not None and patient != previous.patient:
            raise SmartError("the refreshed token names another patient than the launch; refusing it")
        patient = patient or previous.patient
        encounter = encounter or previous.encounter
        context = context or previous.fhir_context
        banner = previous.need_patient_banner if banner is None else banner
        refresh_token = refresh_token or previous.refresh_token
        id_token = id_token or previous.id_token
        fhir_user = fhir_user or previous.fhir_user
    return TokenSet(
        access_token=access_token,
        token_type=_BEARER,
        expires_at=_expires_at(body, now),
        scope=" ".join(split_scopes(scope)),
        refresh_token=refresh_token if isinstance(refresh_token, str) and refresh_token else None,
        id_token=id_token if isinstance(id_token, str) and id_token else None,
        patient=patient,
        encounter=encounter,
        fhir_context=context,
        # Absent means the app cannot know the EHR shows one: show our own.
        need_patient_banner=True if banner is None else banner,
        fhir_user=fhir_user,
        raw_claims=raw,
    )


def verify_id_token(
    id_token: str, jwks: Mapping[str, Any], *, issuer: str, client_id: str, now: float
) -> JsonObject:
    """The claims of an id_token whose signature, iss, aud and exp check out; else `SmartError`."""
    try:
        key_set = jwk.KeySet.import_key_set(cast(Any, dict(jwks)))
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise SmartError("the EHR's JWKS holds no usable key to verify the id_token") from exc
    try:
        token = jwt.decode(id_token, key_set, algorithms=list(ID_TOKEN_ALGORITHMS))
        registry = jwt.JWTClaimsRegistry(
            now=int(now),
            leeway=CLOCK_SKEW_SECONDS,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": client_id},
            sub={"essential": True},
            exp={"essential": True},
        )
        registry.validate(token.claims)
    except ExpiredTokenError as exc:
        raise SmartError("the id_token has expired") from exc
    except MissingClaimError as exc:
        raise SmartError(f"the id_token lacks a required claim ({exc.description})") from exc
    except (JoseError, ValueError) as exc:
        # Name the failure kind (bad signature, wrong audience, ...), never the token.
        raise SmartError(f"the id_token did not verify ({type(exc).__name__})") from exc
    return dict(token.claims)


def fhir_user_claim(claims: Mapping[str, Any]) -> str | None:
    """`fhirUser` (SMART 2) or `profile` (SMART 1) from verified id_token claims."""
    for name in ("fhirUser", "profile"):
        value = claims.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


# ---------------------------------------------------------------------------
# IO
# ---------------------------------------------------------------------------


async def _get_json(http: httpx.AsyncClient, url: str, what: str) -> object:
    try:
        response = await http.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise SmartError(f"{what} could not be read ({type(exc).__name__})") from exc
    if response.status_code != 200:
        raise SmartError(f"{what} answered HTTP {response.status_code}")
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SmartError(f"{what} is not JSON") from exc


async def discover(http: httpx.AsyncClient, iss: str, *, allow_http: bool = False) -> SmartConfiguration:
    """Read and check `{iss}/.well-known/smart-configuration`.

    `allow_http` lets a development setup use plain-http endpoints off loopback; production
    callers leave it off.
    """
    base = iss.strip().rstrip("/")
    _checked_url(base, "the EHR's FHIR base (iss)", allow_http=allow_http)
    url = f"{base}/{SMART_CONFIGURATION_PATH}"
    body = await _get_json(http, url, f"the SMART configuration of {base}")
    config = parse_smart_configuration(body, base, allow_http=allow_http)
    _log.info("smart.discovered", iss=base, capabilities=len(config.capabilities))
    return config


async def _token_request(
    http: httpx.AsyncClient,
    config: SmartConfiguration,
    client: SmartClient,
    form: dict[str, str],
    *,
    previous: TokenSet | None,
) -> TokenSet:
    now = time.time()
    headers, auth_fields = client_authentication(client, config.token_endpoint, now=now)
    headers = {"Accept": "application/json", **headers}
    grant = form["grant_type"]
    try:
        response = await http.post(config.token_endpoint, data={**form, **auth_fields}, headers=headers)
    except httpx.HTTPError as exc:
        raise SmartError(f"the EHR's token endpoint could not be reached ({type(exc).__name__})") from exc
    body = _json_or_none(response)
    if response.status_code != 200:
        error, description = _oauth_error(body)
        _log.warning("smart.token_refused", grant_type=grant, status=response.status_code, error=error)
        detail = ""
        if error:
            detail = f": {error} ({description})" if description else f": {error}"
        raise SmartError(
            f"the EHR's token endpoint refused the {grant} request (HTTP {response.status_code}){detail}",
            oauth_error=error,
        )
    if body is None:
        raise SmartError("the EHR's token endpoint answered with something that is not JSON")
    fhir_user = None
    id_token = body.get("id_token") if isinstance(body, dict) else None
    if isinstance(id_token, str) and id_token:
        claims = await _verified_id_token_claims(http, config, client, id_token, now=now)
        fhir_user = fhir_user_claim(claims)
    token_set = parse_token_response(body, now=now, previous=previous, fhir_user=fhir_user)
    _log.info(
        "smart.token",
        grant_type=grant,
        patient_id=token_set.patient,
        encounter_id=token_set.encounter,
        scopes=len(token_set.granted_scopes),
        expires_in=round(token_set.seconds_left(now)),
        refreshable=token_set.refresh_token is not None,
    )
    return token_set


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _oauth_error(body: object) -> tuple[str | None, str | None]:
    if not isinstance(body, dict):
        return None, None
    error = body.get("error")
    description = body.get("error_description")
    return (
        error if isinstance(error, str) and error else None,
        description[:200] if isinstance(description, str) and description else None,
    )


async def _verified_id_token_claims(
    http: httpx.AsyncClient, config: SmartConfiguration, client: SmartClient, id_token: str, *, now: float
) -> JsonObject:
    if config.jwks_uri is None:
        raise SmartError("the EHR sent an id_token but its SMART configuration has no jwks_uri to verify it")
    if config.issuer is None:
        raise SmartError("the EHR sent an id_token but its SMART configuration has no issuer to check it")
    jwks = await _get_json(http, config.jwks_uri, "the EHR's JWKS")
    if not isinstance(jwks, dict):
        raise SmartError("the EHR's JWKS is not a JSON object")
    return verify_id_token(id_token, jwks, issuer=config.issuer, client_id=client.client_id, now=now)


async def exchange_code(
    http: httpx.AsyncClient,
    config: SmartConfiguration,
    client: SmartClient,
    *,
    code: str,
    redirect_uri: str,
    code_verifier: str,
) -> TokenSet:
    """Trade the authorization code (with its PKCE verifier) for tokens and the launch context."""
    for name, value in (("code", code), ("redirect_uri", redirect_uri), ("code_verifier", code_verifier)):
        if not value:
            raise SmartError(f"cannot exchange the authorization code: {name} is missing")
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": code_verifier,
    }
    return await _token_request(http, config, client, form, previous=None)


async def refresh_tokens(
    http: httpx.AsyncClient, config: SmartConfiguration, client: SmartClient, token_set: TokenSet
) -> TokenSet:
    """A new access token from the refresh token; the launch context of `token_set` is kept."""
    if token_set.refresh_token is None:
        raise SmartError("the session has no refresh token: launch the app again from the EHR")
    form = {"grant_type": "refresh_token", "refresh_token": token_set.refresh_token}
    return await _token_request(http, config, client, form, previous=token_set)


OnRefresh = Callable[[TokenSet], Awaitable[None] | None]


class RefreshingToken(TokenProvider):
    """A `TokenProvider` for one launch session: refreshes shortly before expiry or after a 401.

    Concurrent requests share one refresh (a lock). `on_refresh` gets each new `TokenSet` so the
    app can store it (encrypted); an error there propagates, because a rotated refresh token that
    was not stored would strand the session. Without a refresh token the current access token is
    returned as is and the server's 401 surfaces as the client's `FhirAuthError`. A refresh the
    EHR refuses raises `SmartError` (its `oauth_error` is usually `invalid_grant`: launch again).
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        config: SmartConfiguration,
        client: SmartClient,
        token_set: TokenSet,
        *,
        on_refresh: OnRefresh | None = None,
        leeway: float = REFRESH_LEEWAY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._config = config
        self._client = client
        self._token_set = token_set
        self._on_refresh = on_refresh
        self._leeway = leeway
        self._clock = clock
        self._stale = False
        self._lock = asyncio.Lock()

    @property
    def token_set(self) -> TokenSet:
        return self._token_set

    async def token(self) -> str:
        if not self._should_refresh():
            return self._token_set.access_token
        async with self._lock:
            # Another request may have refreshed while this one waited for the lock.
            if self._should_refresh():
                await self._refresh()
            return self._token_set.access_token

    async def invalidate(self) -> None:
        self._stale = True

    def _should_refresh(self) -> bool:
        if self._token_set.refresh_token is None:
            return False
        return self._stale or self._token_set.needs_refresh(self._clock(), self._leeway)

    async def _refresh(self) -> None:
        new = await refresh_tokens(self._http, self._config, self._client, self._token_set)
        self._token_set = new
        self._stale = False
        if self._on_refresh is not None:
            result = self._on_refresh(new)
            if inspect.isawaitable(result):
                await result

    def __repr__(self) -> str:
        return f"RefreshingToken(patient={self._token_set.patient!r}, access_token=<redacted>)"

    __str__ = __repr__


__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "RefreshingToken",
    "SmartClient",
    "SmartConfiguration",
    "SmartError",
    "TokenSet",
    "authorize_url",
    "client_assertion",
    "client_authentication",
    "discover",
    "exchange_code",
    "fhir_user_claim",
    "is_loopback",
    "new_pkce",
    "parse_smart_configuration",
    "parse_token_response",
    "refresh_tokens",
    "relative_reference",
    "split_scopes",
    "verify_id_token",
]
