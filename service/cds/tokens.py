"""The CDS client's JWT, checked as CDS Hooks 2.0 asks before a hook request is read.

A CDS client (the EHR) signs a short-lived JWT per request with its own key and sends it as
`Authorization: Bearer`. `CdsTokenVerifier` accepts it only when
- `iss` is one of the configured issuers, and the signature checks out against the JWKS URL
  configured for that issuer (a `jku` header is accepted only when it names that same URL);
- `aud` is this service's endpoint URL, `exp` is in the future, `iat` is not in the future
  and not older than the allowed token age;
- `jti` is present and has not been seen before (seen ids are kept until their `exp`).

The keys come from the process's one JWKS cache (`fhir_adapters.auth.oauth.jwks_cache`).
The seen-`jti` memory of the web service is chartbrief's database (`StoredJti`), so every process
behind a balancer refuses a replay; `SeenJti` keeps them in this process only.

What it must not do: log or echo a token, accept `none` or HMAC-signed tokens, fetch keys from
a URL the configuration does not name, or read a claim before the signature is checked.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
import structlog
from joserfc import jws
from joserfc.errors import InvalidKeyIdError, JoseError
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.auth.oauth import JwksCache, SmartError, asymmetric_algorithms, jwks_cache
from service.api.errors import Unauthenticated, Unavailable
from service.db.models import CdsTokenId
from service.db.store import in_thread

log = structlog.get_logger(__name__)


class JtiMemory(Protocol):
    async def first_use(self, issuer: str, jti: str, exp: float, now: float) -> bool:
        """True (and remembered) the first time `issuer`'s `jti` shows up before its expiry."""
        ...


class StoredJti:
    """Token ids already used, in chartbrief's database until their `exp`: one memory for every process.

    The insert of the id is the check: a second insert of the same id breaks the primary key.
    """

    def __init__(self, db: sessionmaker[Session]) -> None:
        self.db = db

    async def first_use(self, issuer: str, jti: str, exp: float, now: float) -> bool:
        return await in_thread(self._first_use, issuer, jti, exp, now)

    def _first_use(self, issuer: str, jti: str, exp: float, now: float) -> bool:
        key = hashlib.sha256(f"{issuer}\n{jti}".encode()).hexdigest()
        with self.db.begin() as session:
            session.execute(
                delete(CdsTokenId)
                .where(CdsTokenId.expires_at <= datetime.fromtimestamp(now, UTC))
                .execution_options(synchronize_session=False)
            )
        try:
            with self.db.begin() as session:
                session.add(CdsTokenId(key=key, expires_at=datetime.fromtimestamp(exp, UTC)))
        except IntegrityError:
            return False
        return True


class SeenJti:
    """Token ids already used, each remembered until its `exp` in this process (bounded: the oldest
    go first)."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._seen: dict[tuple[str, str], float] = {}

    async def first_use(self, issuer: str, jti: str, exp: float, now: float) -> bool:
        """True (and remembered) the first time `issuer`'s `jti` shows up before its expiry."""
        if len(self._seen) >= self.limit:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
            while len(self._seen) >= self.limit:
                self._seen.pop(next(iter(self._seen)))
        key = (issuer, jti)
        if key in self._seen and self._seen[key] > now:
            return False
        self._seen[key] = exp
        return True


class CdsTokenVerifier:
    """Checks CDS clients' JWTs against the allow-list of issuers and their JWKS URLs."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        issuers: Mapping[str, str],
        algorithms: Sequence[str] = ("RS256", "RS384", "ES256", "ES384"),
        leeway_seconds: int = 30,
        max_token_age_seconds: int = 300,
        cache_seconds: int = 300,
        clock: Callable[[], float] = time.time,
        jwks: JwksCache | None = None,
        seen: JtiMemory | None = None,
    ) -> None:
        self._http = http
        self.issuers = dict(issuers)
        self.algorithms = asymmetric_algorithms(algorithms)
        if not self.algorithms:
            raise ValueError("CdsTokenVerifier: no asymmetric algorithm to accept")
        self.leeway = leeway_seconds
        self.max_age = max_token_age_seconds
        self.cache_seconds = cache_seconds
        self._clock = clock
        self.jwks = jwks if jwks is not None else jwks_cache(http)
        self.seen: JtiMemory = seen if seen is not None else SeenJti()

    async def verify(self, token: str | None, audience: str) -> dict[str, Any]:
        """The token's claims once every rule holds, else `Unauthenticated` naming the rule."""
        if not token:
            raise Unauthenticated("a CDS Hooks request needs an Authorization: Bearer JWT")
        now = self._clock()
        try:
            unverified = jws.extract_compact(token.encode("ascii"))
            header = unverified.protected
            claims_unverified = json.loads(unverified.payload)
        except (JoseError, ValueError, UnicodeError) as exc:
            raise Unauthenticated("the bearer token is not a JWT") from exc
        issuer = claims_unverified.get("iss") if isinstance(claims_unverified, dict) else None
        if not isinstance(issuer, str) or issuer not in self.issuers:
            raise Unauthenticated("the token's iss is not an allowed CDS client (cds.clients)")
        jwks_url = self.issuers[issuer]
        jku = header.get("jku")
        if jku is not None and jku != jwks_url:
            raise Unauthenticated("the token's jku is not the JWKS URL configured for its issuer")
        try:
            decoded = await self.jwks.decode(
                self._http,
                token,
                jwks_url,
                algorithms=self.algorithms,
                what="the CDS client's JWKS",
                max_age=self.cache_seconds,
                now=now,
            )
        except SmartError as exc:
            log.warning("cds.jwks_unavailable", error=type(exc.__cause__ or exc).__name__)
            raise Unavailable("the CDS client's keys could not be read; try again later") from exc
        except InvalidKeyIdError as exc:
            raise Unauthenticated("the token is signed with a key its issuer does not publish") from exc
        except (JoseError, ValueError) as exc:
            raise Unauthenticated(
                "the token's signature does not check out against its issuer's keys"
            ) from exc
        claims = self._check_claims(dict(decoded.claims), audience, now)
        expires = float(claims["exp"]) + self.leeway
        if not await self.seen.first_use(str(claims["iss"]), claims["jti"], expires, now):
            raise Unauthenticated("the token's jti was already used (a replay)")
        return claims

    def _check_claims(self, claims: dict[str, Any], audience: str, now: float) -> dict[str, Any]:
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if audience not in auds:
            raise Unauthenticated("the token's aud is not this service's URL")
        exp, iat, jti = claims.get("exp"), claims.get("iat"), claims.get("jti")
        if not isinstance(exp, (int, float)):
            raise Unauthenticated("the token has no exp")
        if exp + self.leeway < now:
            raise Unauthenticated("the token has expired")
        if not isinstance(iat, (int, float)):
            raise Unauthenticated("the token has no iat")
        if iat - self.leeway > now:
            raise Unauthenticated("the token's iat is in the future")
        if now - iat > self.max_age + self.leeway:
            raise Unauthenticated("the token is older than cds.max_token_age_seconds")
        if not isinstance(jti, str) or not jti:
            raise Unauthenticated("the token has no jti")
        return claims
