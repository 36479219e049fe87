"""SMART App Launch 2.2 on the app's side: PKCE, the authorize URL, the code exchange, refresh, and
the launch context the EHR's token endpoint hands over.

```
new_pkce()                         -> (verifier, S256 challenge)
authorize_url(config, ...)         -> the URL the browser is sent to (response_type=code, aud=iss, PKCE)
exchange_code(http, config, ...)   -> TokenSet              POST token_endpoint, grant_type=authorization_code
refresh_tokens(http, config, ...)  -> TokenSet              POST token_endpoint, grant_type=refresh_token
RefreshingToken                    a `TokenProvider` for `FhirClient` that refreshes 60 s before expiry
```

Discovery, client authentication, the token request itself and the id_token check are OAuth
shared with Backend Services (`fhir_adapters.auth.oauth`); what is SMART-launch specific is kept
here: the launch context (`patient`, `encounter`, `fhirContext`, `need_patient_banner`), `fhirUser`,
and the rule that a refresh never changes the patient. Errors are `oauth.SmartError`. authlib makes
the PKCE pair (`generate_token`, `create_s256_code_challenge`) and writes the authorization URL
(`prepare_grant_uri`); the token requests go out on the caller's shared client through `oauth`.

What this module must not do: log or show in `repr()` any token, authorization code or PKCE
verifier; trust an id_token it could not verify; hand-roll any cryptography.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import structlog
from authlib.common.security import generate_token  # type: ignore[import-untyped]  # no type information
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]

from fhir_adapters.auth import TokenProvider
from fhir_adapters.auth.oauth import (
    DEFAULT_EXPIRES_IN_SECONDS,
    JsonObject,
    SmartClient,
    SmartConfiguration,
    SmartError,
    client_authentication,
    post_token_request,
    verified_id_token_claims,
)
from fhir_adapters.auth.scopes import split_scopes

_log = structlog.get_logger(__name__)

REFRESH_LEEWAY_SECONDS = 60.0
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_RELATIVE_REFERENCE = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})")
_BEARER = "Bearer"
_TOKEN_FIELDS = frozenset({"access_token", "refresh_token", "id_token"})


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


# -- the authorization request ----------------------------------------------------------------------


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

    >>> from fhir_adapters.auth.oauth import parse_smart_configuration
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
    # authlib appends the parameters in this order after the endpoint's own query; None is left out.
    url = prepare_grant_uri(
        config.authorization_endpoint,
        client_id,
        "code",
        redirect_uri=redirect_uri,
        scope=" ".join(scopes),
        state=state,
        aud=aud,
        code_challenge=code_challenge,
        code_challenge_method="S256",
        launch=launch,
    )
    return cast(str, url)


# -- the token response -----------------------------------------------------------------------------


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


def fhir_user_claim(claims: Mapping[str, Any]) -> str | None:
    """`fhirUser` (SMART 2) or `profile` (SMART 1) from verified id_token claims."""
    for name in ("fhirUser", "profile"):
        value = claims.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


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


# -- IO --------------------------------------------------------------------------------------------


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
    grant = form["grant_type"]
    answer = await post_token_request(
        http, config.token_endpoint, {**form, **auth_fields}, headers=headers, what="the EHR's token endpoint"
    )
    body = answer.body
    if answer.status != 200:
        error, description = answer.oauth_error()
        _log.warning("smart.token_refused", grant_type=grant, status=answer.status, error=error)
        detail = ""
        if error:
            detail = f": {error} ({description})" if description else f": {error}"
        raise SmartError(
            f"the EHR's token endpoint refused the {grant} request (HTTP {answer.status}){detail}",
            oauth_error=error,
        )
    if body is None:
        raise SmartError("the EHR's token endpoint answered with something that is not JSON")
    fhir_user = None
    id_token = body.get("id_token") if isinstance(body, dict) else None
    if isinstance(id_token, str) and id_token:
        claims = await verified_id_token_claims(http, config, client.client_id, id_token, now=now)
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
