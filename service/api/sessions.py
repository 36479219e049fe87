"""The clinician's browser session: cookies, the stored launch session, and its FHIR client.

Two cookies, both HttpOnly, Secure and SameSite (configurable, Lax by default), holding random
values only. When chartbrief is served over https (`smart.public_base_url`) their names carry the
`__Host-` prefix, so the browser keeps them only if they are Secure, for Path=/ and without a Domain:
no sibling host can plant one. Over plain http (development on loopback) the bare names are used.

- `cb_browser` - the browser session. Minted fresh at every `/launch` (a value the browser sends is
  never reused); the launch state is bound to it, so a callback from another browser is refused, and
  the app session is bound to it too.
- `cb_session` - the app session id, set at `/callback`. The tokens it stands for stay in the
  database, encrypted (`service.db.launch`); they never reach the browser.

`SessionServices` (the `SessionServicesDep` dependency) builds, once a route has checked the request,
the pipeline's `Services` for one session: a FHIR client for the session's EHR whose bearer token
refreshes itself before expiry and whose refreshed tokens are stored again (encrypted) at once.

What it must not do: put a token in a cookie, a page, a URL or a log line.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

import httpx
import structlog
from fastapi import Depends, Request, Response
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.auth.launch import RefreshingToken, TokenSet
from fhir_adapters.auth.oauth import SmartClient
from fhir_adapters.client import FhirClient
from service.api.deps import (
    CipherDep,
    CsrfSecretDep,
    DatabaseDep,
    DiscoveryCache,
    DiscoveryDep,
    HttpDep,
    Pipeline,
    PipelineDep,
    SettingsDep,
    SmartClientDep,
)
from service.api.errors import Unauthenticated
from service.api.security import csrf_token
from service.config import FhirSettings, SmartSettings
from service.db.launch import SessionData, TokenCipher, load_session, update_tokens
from service.db.store import in_thread
from service.fhir import fhir_client
from service.pipeline import Services

log = structlog.get_logger(__name__)

BROWSER_COOKIE = "cb_browser"
SESSION_COOKIE = "cb_session"
NO_SESSION = (
    "There is no active chartbrief session in this browser (it ended or expired). "
    "Open chartbrief again from the patient's chart in your EHR."
)


def new_browser_session() -> str:
    return secrets.token_urlsafe(32)


def cookie_name(smart: SmartSettings, name: str) -> str:
    """The name a cookie goes by: `__Host-` + `name` when chartbrief is served over https.

    >>> cookie_name(SmartSettings(public_base_url="https://cb.example.org"), BROWSER_COOKIE)
    '__Host-cb_browser'
    >>> cookie_name(SmartSettings(public_base_url="http://127.0.0.1:8000"), BROWSER_COOKIE)
    'cb_browser'
    """
    return f"__Host-{name}" if smart.public_base_url.startswith("https://") else name


def read_cookie(request: Request, smart: SmartSettings, name: str) -> str | None:
    return request.cookies.get(cookie_name(smart, name))


def set_cookie(response: Response, smart: SmartSettings, name: str, value: str, *, max_age: int) -> None:
    # `__Host-` requires exactly this: Secure, Path=/ and no Domain attribute.
    response.set_cookie(
        cookie_name(smart, name),
        value,
        max_age=max_age,
        path="/",
        secure=True,
        httponly=True,
        samesite=smart.cookie_samesite,
    )


@dataclass(frozen=True)
class ReviewSession:
    """A live launch session, as the review routes use it."""

    data: SessionData
    csrf: str

    @property
    def patient_id(self) -> str:
        # The callback refuses a launch without a patient, so every stored session has one.
        assert self.data.patient_id is not None
        return self.data.patient_id

    @property
    def encounter_id(self) -> str | None:
        return self.data.encounter_id

    @property
    def fhir_user(self) -> str | None:
        return self.data.fhir_user

    @property
    def actor(self) -> str:
        """Who is acting, for the audit trail: the fhirUser, else the session's hash-free marker."""
        return self.data.fhir_user or "unidentified-user"


async def review_session(
    request: Request, db: DatabaseDep, cipher: CipherDep, csrf_secret: CsrfSecretDep, settings: SettingsDep
) -> ReviewSession:
    """The session behind the request's cookies; `Unauthenticated` (a page saying how to launch) if none."""
    session_id = read_cookie(request, settings.smart, SESSION_COOKIE)
    browser = read_cookie(request, settings.smart, BROWSER_COOKIE)
    if not session_id or not browser:
        raise Unauthenticated(NO_SESSION, error="invalid_request")
    data = await in_thread(load_session, db, cipher, session_id, browser_session=browser)
    if data is None or data.patient_id is None:
        raise Unauthenticated(NO_SESSION)
    return ReviewSession(data=data, csrf=csrf_token(csrf_secret, session_id))


ReviewSessionDep = Annotated[ReviewSession, Depends(review_session)]


@dataclass(frozen=True)
class SessionServices:
    """Opens the pipeline's `Services` for a session's EHR, acting as the session's clinician."""

    http: httpx.AsyncClient
    discovery: DiscoveryCache
    smart_client: SmartClient
    cipher: TokenCipher
    db: sessionmaker[Session]
    fhir: FhirSettings
    pipeline: Pipeline

    async def client(self, session: ReviewSession) -> FhirClient:
        """A FHIR client for the session's EHR, carrying (and refreshing) the session's access token."""
        config = await self.discovery.get(session.data.iss)
        token_set = TokenSet.from_dict(session.data.token_set)
        session_id = session.data.id

        async def store_refreshed(new: TokenSet) -> None:
            # A rotated refresh token that is not stored would strand the session: store it now.
            stored = await in_thread(
                update_tokens, self.db, self.cipher, session_id, new.to_dict(), scope=new.scope
            )
            if not stored:
                log.warning("session.refresh_not_stored", patient_id=session.data.patient_id)

        auth = RefreshingToken(self.http, config, self.smart_client, token_set, on_refresh=store_refreshed)
        return fhir_client(self.fhir, base_url=session.data.iss, http=self.http, auth=auth)

    async def open(self, session: ReviewSession) -> Services:
        """The pipeline's `Services` on the session's EHR (503 while the model loads)."""
        return self.pipeline.services(await self.client(session))


def session_services(
    http: HttpDep,
    discovery: DiscoveryDep,
    smart_client: SmartClientDep,
    cipher: CipherDep,
    db: DatabaseDep,
    settings: SettingsDep,
    pipeline: PipelineDep,
) -> SessionServices:
    return SessionServices(
        http=http,
        discovery=discovery,
        smart_client=smart_client,
        cipher=cipher,
        db=db,
        fhir=settings.fhir,
        pipeline=pipeline,
    )


SessionServicesDep = Annotated[SessionServices, Depends(session_services)]
