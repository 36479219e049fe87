"""OAuth 2 as SMART uses it, shared by the EHR launch and Backend Services.

```
discover(http, iss)                 -> SmartConfiguration  GET {iss}/.well-known/smart-configuration
read_smart_configuration(http, b)   -> the raw document     (Backend Services only needs token_endpoint)
private_key / generate_key / public_jwk                    a client's signing key and its public JWK
sign_assertion(...)                 -> a signed private_key_jwt assertion (RS384 or ES384)
SmartClient, client_authentication  how chartbrief authenticates at a token endpoint
post_token_request(http, url, form) -> TokenAnswer          POST a token request, errors translated
JwksCache, jwks_cache(http)         the one cache of JWKS documents (id_tokens and the API's bearer JWTs)
verify_id_token / verified_id_token_claims                 an id_token checked against the server's JWKS
```

authlib signs the private_key_jwt client assertion (`rfc7523.private_key_jwt_sign`) and, in
`launch`, makes the PKCE pair and the authorization URL; its OAuth2 clients are not used, because
each is an `httpx.AsyncClient` of its own and chartbrief keeps one shared client per process, so
every request here goes through the caller's `http`.

Client authentication follows `SmartClient`: `private_key_jwt` (a signed client assertion, RS384
or ES384) when it holds a private key, `client_secret_basic` when it holds a secret, otherwise a
public client (client_id in the form). An `id_token` is verified against the server's JWKS
(signature RS256/RS384/ES384, iss, aud = client_id, exp) before its `fhirUser` is believed.

JWKS documents are read through `JwksCache`: one per shared HTTP client (`jwks_cache(http)`), so
the id_token check and `service.api.security.JwtVerifier` share one fetch of an issuer's keys. A
set is reused for a while (5 minutes by default); a token whose `kid` it lacks makes one refetch,
at most every 30 s per URL; a failed fetch is not retried for 10 s (`JWKS_FAILURE_SECONDS`).

Errors: one class, `SmartError`, whose message is fit for a person (it says what was wrong and
with which endpoint or field) and never contains a token, code, verifier, secret or key.
`oauth_error` carries the server's OAuth error code (`invalid_grant`, ...) when it sent one, so a
caller can tell "launch again" apart from "the EHR is down" without matching on text.

What this module must not do: log or show in `repr()` any token, assertion, client secret or
private key; talk to an endpoint over plain http anywhere but loopback (unless the caller allows
it for development); trust an id_token it could not verify; accept an HMAC or unsigned JWT where a
JWKS is the trust anchor; hand-roll any cryptography (joserfc does the JWTs and keys).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote_plus

import httpx
import structlog
from joserfc import jwk, jwt
from joserfc.errors import ExpiredTokenError, InvalidKeyIdError, JoseError, MissingClaimError

from fhir_adapters.auth.keys import (
    AssertionAlg as AssertionAlg,  # re-exported: part of this module's interface
)
from fhir_adapters.auth.keys import generate_key as generate_key
from fhir_adapters.auth.keys import private_key as private_key
from fhir_adapters.auth.keys import public_jwk as public_jwk
from fhir_adapters.auth.keys import sign_assertion as sign_assertion
from fhir_adapters.auth.scopes import split_scopes as split_scopes  # part of this module's interface too
from fhir_adapters.errors import ChartbriefError

JsonObject = dict[str, Any]

_log = structlog.get_logger(__name__)

SMART_CONFIGURATION_PATH = ".well-known/smart-configuration"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ID_TOKEN_ALGORITHMS = ("RS256", "RS384", "ES384")
CLIENT_ASSERTION_ALGORITHMS: tuple[AssertionAlg, ...] = ("RS384", "ES384")
# A token response without expires_in: assume short-lived rather than forever.
DEFAULT_EXPIRES_IN_SECONDS = 300
CLOCK_SKEW_SECONDS = 60
# A JWKS is reused this long; a token with a kid the cached set lacks refetches it, at most this often.
JWKS_MAX_AGE_SECONDS = 300.0
MIN_JWKS_REFETCH_SECONDS = 30.0
# A JWKS fetch that failed is not tried again for this long: during an issuer's outage every token
# would otherwise make its own request (a flood of tokens becomes a flood at the issuer), and each
# caller waits out the failure anyway. Short, so a recovered issuer is used again within seconds.
JWKS_FAILURE_SECONDS = 10.0
EHR_JWKS = "the EHR's JWKS"
_ASYMMETRIC = re.compile(r"(RS|PS|ES)(256|384|512)|ES256K|EdDSA|Ed25519|Ed448")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class SmartError(ChartbriefError):
    """A SMART step failed; the message says why for a person and never carries a secret."""

    def __init__(self, message: str, *, oauth_error: str | None = None) -> None:
        super().__init__(message)
        self.oauth_error = oauth_error


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
            private_key(self.private_key_pem, self.alg)  # fail now, not at the first launch

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
        return {"keys": [public_jwk(self.private_key_pem, self.alg, self.kid)]}

    def __repr__(self) -> str:
        return f"SmartClient(client_id={self.client_id!r}, auth_method={self.auth_method!r})"


def client_assertion(client: SmartClient, token_endpoint: str, *, now: float) -> str:
    """The private_key_jwt assertion of an app client that holds a private key."""
    if client.private_key_pem is None:
        raise ValueError("client_assertion: the SmartClient has no private key")
    return sign_assertion(
        client.client_id, token_endpoint, client.private_key_pem, alg=client.alg, kid=client.kid, now=now
    )


def client_authentication(
    client: SmartClient, token_endpoint: str, *, now: float
) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, form fields) that authenticate `client` at the token endpoint."""
    if client.private_key_pem is not None:
        assertion = client_assertion(client, token_endpoint, now=now)
        return {}, {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion}
    if client.client_secret is not None:
        # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding (authlib's
        # encode_client_secret_basic leaves them raw, so a secret with `:` or `+` would break).
        pair = f"{quote_plus(client.client_id)}:{quote_plus(client.client_secret)}"
        encoded = base64.b64encode(pair.encode("utf-8")).decode("ascii")
        return {"Authorization": f"Basic {encoded}"}, {}
    return {}, {"client_id": client.client_id}


# -- plain helpers -----------------------------------------------------------------------------------


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


# -- JWTs signed by a server's JWKS -----------------------------------------------------------------


def asymmetric_algorithms(algorithms: Iterable[str]) -> list[str]:
    """The asymmetric signature algorithms among `algorithms`: `none` and HMAC never verify a JWKS token.

    >>> asymmetric_algorithms(["HS256", "none", "RS384", "ES384", "RSA-OAEP", "EdDSA"])
    ['RS384', 'ES384', 'EdDSA']
    """
    return [name for name in algorithms if _ASYMMETRIC.fullmatch(name)]


def _id_token_refused(exc: Exception) -> SmartError:
    if isinstance(exc, ExpiredTokenError):
        return SmartError("the id_token has expired")
    if isinstance(exc, MissingClaimError):
        return SmartError(f"the id_token lacks a required claim ({exc.description})")
    # Name the failure kind (bad signature, wrong audience, ...), never the token.
    return SmartError(f"the id_token did not verify ({type(exc).__name__})")


def _checked_id_token_claims(claims: Mapping[str, Any], *, issuer: str, client_id: str, now: float) -> None:
    jwt.JWTClaimsRegistry(
        now=int(now),
        leeway=CLOCK_SKEW_SECONDS,
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": client_id},
        sub={"essential": True},
        exp={"essential": True},
    ).validate(dict(claims))


def verify_id_token(
    id_token: str, jwks: Mapping[str, Any] | jwk.KeySet, *, issuer: str, client_id: str, now: float
) -> JsonObject:
    """The claims of an id_token whose signature, iss, aud and exp check out; else `SmartError` (pure)."""
    try:
        key_set = jwks if isinstance(jwks, jwk.KeySet) else jwk.KeySet.import_key_set(cast(Any, dict(jwks)))
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise SmartError("the EHR's JWKS holds no usable key to verify the id_token") from exc
    try:
        token = jwt.decode(id_token, key_set, algorithms=list(ID_TOKEN_ALGORITHMS))
        _checked_id_token_claims(token.claims, issuer=issuer, client_id=client_id, now=now)
    except (JoseError, ValueError) as exc:
        raise _id_token_refused(exc) from exc
    return dict(token.claims)


@dataclass(frozen=True)
class _Jwks:
    keys: jwk.KeySet
    fetched_at: float


class JwksCache:
    """JWKS documents by URL, for everything in one process that verifies a server's JWTs.

    A key set is reused for `max_age` seconds (each caller says how long); a token whose `kid`
    the cached set lacks makes one refetch (the issuer rotated its keys), at most once every
    `min_refetch_seconds` per URL, so a flood of forged tokens cannot hammer the issuer. A fetch
    that failed is remembered for `failure_seconds`: until then every caller gets the same
    `SmartError` without a request (or, for a kid refetch, the keys already held). Concurrent
    callers wait for one fetch. The HTTP client is the caller's: the cache holds
    public keys only, never a connection of its own.
    """

    def __init__(
        self,
        *,
        min_refetch_seconds: float = MIN_JWKS_REFETCH_SECONDS,
        failure_seconds: float = JWKS_FAILURE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.min_refetch_seconds = min_refetch_seconds
        self.failure_seconds = failure_seconds
        self._clock = clock
        self._documents: dict[str, _Jwks] = {}
        self._attempted: dict[str, float] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # URL -> (when, the SmartError's message)
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetches = 0  # JWKS requests sent so far (a count, for reports and tests)

    def __repr__(self) -> str:
        return f"JwksCache(urls={len(self._documents)}, fetches={self.fetches})"

    async def key_set(
        self,
        http: httpx.AsyncClient,
        jwks_uri: str,
        *,
        what: str = EHR_JWKS,
        max_age: float = JWKS_MAX_AGE_SECONDS,
        refresh: bool = False,
        now: float | None = None,
    ) -> jwk.KeySet:
        """The key set at `jwks_uri`, fetched when not cached or older than `max_age` seconds.

        `refresh` (a token named a kid the cached set lacks) fetches it again unless the last
        attempt is under `min_refetch_seconds` old. A failed fetch is a `SmartError` naming `what`,
        and is answered from memory for `failure_seconds` (see the class).
        """
        at = self._clock() if now is None else now
        async with self._locks.setdefault(jwks_uri, asyncio.Lock()):
            cached = self._documents.get(jwks_uri)
            throttled = at - self._attempted.get(jwks_uri, -float("inf")) < self.min_refetch_seconds
            if cached is None or at - cached.fetched_at > max_age or (refresh and not throttled):
                failed = self._failed.get(jwks_uri)
                if failed is not None and at - failed[0] < self.failure_seconds:
                    if refresh and cached is not None:
                        return cached.keys
                    raise SmartError(failed[1])
                try:
                    cached = await self._fetch(http, jwks_uri, what, at)
                except SmartError as exc:
                    self._failed[jwks_uri] = (at, str(exc))
                    raise
                self._failed.pop(jwks_uri, None)
            return cached.keys

    async def _fetch(self, http: httpx.AsyncClient, jwks_uri: str, what: str, at: float) -> _Jwks:
        self._attempted[jwks_uri] = at
        self.fetches += 1
        document = await fetch_jwks(http, jwks_uri, what)
        try:
            keys = jwk.KeySet.import_key_set(cast(Any, document))
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise SmartError(f"{what} holds no usable key") from exc
        entry = self._documents[jwks_uri] = _Jwks(keys, at)
        _log.info("auth.jwks_fetched", jwks_uri=jwks_uri, keys=len(keys.keys))
        return entry

    async def decode(
        self,
        http: httpx.AsyncClient,
        token: str,
        jwks_uri: str,
        *,
        algorithms: Iterable[str],
        what: str = EHR_JWKS,
        max_age: float = JWKS_MAX_AGE_SECONDS,
        now: float | None = None,
    ) -> jwt.Token:
        """`token` once its signature checks out against a key of the JWKS at `jwks_uri`.

        Only the asymmetric ones of `algorithms` are accepted. The claims are not validated here
        (iss, aud and exp are the caller's). Raises joserfc's `JoseError`s (`InvalidKeyIdError`
        when no published key has the token's kid, even after the refetch), `ValueError` for a
        malformed token or no usable algorithm, and `SmartError` when the JWKS cannot be read.
        """
        allowed = asymmetric_algorithms(algorithms)
        if not allowed:
            # joserfc reads an empty list as "its defaults", which include HMAC.
            raise ValueError("no asymmetric signature algorithm is allowed")
        keys = await self.key_set(http, jwks_uri, what=what, max_age=max_age, now=now)
        try:
            return jwt.decode(token, keys, algorithms=allowed)
        except InvalidKeyIdError:
            # The issuer may have rotated its keys since they were read.
            keys = await self.key_set(http, jwks_uri, what=what, max_age=max_age, refresh=True, now=now)
            return jwt.decode(token, keys, algorithms=allowed)


_CACHES: weakref.WeakKeyDictionary[httpx.AsyncClient, JwksCache] = weakref.WeakKeyDictionary()


def jwks_cache(http: httpx.AsyncClient) -> JwksCache:
    """The JWKS cache that goes with one shared HTTP client (made on first use, gone with the client)."""
    cache = _CACHES.get(http)
    if cache is None:
        cache = _CACHES[http] = JwksCache()
    return cache


# -- IO ------------------------------------------------------------------------------------------------


async def get_json(http: httpx.AsyncClient, url: str, what: str) -> object:
    """The JSON document at `url` (200 only); `what` names it in the SmartError otherwise."""
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


def smart_configuration_url(fhir_base: str) -> str:
    """Where a FHIR server publishes its SMART configuration.

    >>> smart_configuration_url("https://ehr.example.org/fhir/")
    'https://ehr.example.org/fhir/.well-known/smart-configuration'
    """
    return f"{fhir_base.strip().rstrip('/')}/{SMART_CONFIGURATION_PATH}"


async def read_smart_configuration(http: httpx.AsyncClient, fhir_base: str) -> object:
    """The SMART configuration document as the server sent it (unchecked: callers keep what they need)."""
    base = fhir_base.strip().rstrip("/")
    return await get_json(http, smart_configuration_url(base), f"the SMART configuration of {base}")


async def discover(http: httpx.AsyncClient, iss: str, *, allow_http: bool = False) -> SmartConfiguration:
    """Read and check `{iss}/.well-known/smart-configuration` for an app launch.

    `allow_http` lets a development setup use plain-http endpoints off loopback; production
    callers leave it off.
    """
    base = iss.strip().rstrip("/")
    _checked_url(base, "the EHR's FHIR base (iss)", allow_http=allow_http)
    body = await read_smart_configuration(http, base)
    config = parse_smart_configuration(body, base, allow_http=allow_http)
    _log.info("smart.discovered", iss=base, capabilities=len(config.capabilities))
    return config


@dataclass(frozen=True)
class TokenAnswer:
    """A token endpoint's answer: its status and its JSON body (None when the body is not JSON)."""

    status: int
    body: object = field(repr=False)

    def oauth_error(self) -> tuple[str | None, str | None]:
        """The OAuth `error` code and a short `error_description`, when the server sent them."""
        if not isinstance(self.body, dict):
            return None, None
        error = self.body.get("error")
        description = self.body.get("error_description")
        return (
            error if isinstance(error, str) and error else None,
            description[:200] if isinstance(description, str) and description else None,
        )


async def post_token_request(
    http: httpx.AsyncClient,
    token_endpoint: str,
    form: Mapping[str, str],
    *,
    headers: Mapping[str, str] | None = None,
    what: str = "the token endpoint",
) -> TokenAnswer:
    """POST a token request form; the answer whatever its status, or SmartError if unreachable."""
    try:
        response = await http.post(
            token_endpoint, data=dict(form), headers={"Accept": "application/json", **(headers or {})}
        )
    except httpx.HTTPError as exc:
        raise SmartError(f"{what} could not be reached ({type(exc).__name__})") from exc
    try:
        body: object = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    return TokenAnswer(response.status_code, body)


async def fetch_jwks(http: httpx.AsyncClient, jwks_uri: str, what: str = EHR_JWKS) -> JsonObject:
    """A server's JWKS document as it sent it (uncached: `JwksCache` is the reader to use)."""
    jwks = await get_json(http, jwks_uri, what)
    if not isinstance(jwks, dict):
        raise SmartError(f"{what} is not a JSON object")
    return jwks


async def verified_id_token_claims(
    http: httpx.AsyncClient,
    config: SmartConfiguration,
    client_id: str,
    id_token: str,
    *,
    now: float,
    jwks: JwksCache | None = None,
) -> JsonObject:
    """The claims of an id_token the server's JWKS verifies (its issuer and jwks_uri are required).

    The keys come from `jwks`, by default the cache of `http` (`jwks_cache`).
    """
    if config.jwks_uri is None:
        raise SmartError("the EHR sent an id_token but its SMART configuration has no jwks_uri to verify it")
    if config.issuer is None:
        raise SmartError("the EHR sent an id_token but its SMART configuration has no issuer to check it")
    cache = jwks if jwks is not None else jwks_cache(http)
    try:
        token = await cache.decode(http, id_token, config.jwks_uri, algorithms=ID_TOKEN_ALGORITHMS, now=now)
        _checked_id_token_claims(token.claims, issuer=config.issuer, client_id=client_id, now=now)
    except (JoseError, ValueError) as exc:
        raise _id_token_refused(exc) from exc
    return dict(token.claims)
