"""The clinician's browser session: cookies, the stored launch session, and its FHIR client.

Two cookies, both HttpOnly, Secure and SameSite (configurable, Lax by default), holding random
values only:

- `cb_browser` - the browser session. Set at `/launch`; the launch state is bound to it, so a
  callback from another browser is refused, and the app session is bound to it too.
- `cb_session` - the app session id, set at `/callback`. The tokens it stands for stay in the
  database, encrypted (`service.db.launch`); they never reach the browser.

`session_services` builds, per request, the pipeline's `Services` for one session: a FHIR client
for the session's EHR whose bearer token refreshes itself before expiry and whose refreshed
tokens are stored again (encrypted) at once.

What it must not do: put a token in a cookie, a page, a URL or a log line.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from fhir_adapters.client import FhirClient
from fhir_adapters.smart import RefreshingToken, TokenSet
from service.api.deps import Runtime, get_runtime
from service.api.errors import Unauthenticated
from service.api.security import csrf_token
from service.db.launch import SessionData, load_session, update_tokens
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


def set_cookie(response: Response, runtime: Runtime, name: str, value: str, *, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        secure=True,
        httponly=True,
        samesite=runtime.settings.smart.cookie_samesite,
    )


def clear_cookie(response: Response, runtime: Runtime, name: str) -> None:
    response.delete_cookie(
        name, path="/", secure=True, httponly=True, samesite=runtime.settings.smart.cookie_samesite
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


async def review_session(request: Request) -> ReviewSession:
    """The session behind the request's cookies; `Unauthenticated` (a page saying how to launch) if none."""
    runtime = get_runtime(request)
    session_id = request.cookies.get(SESSION_COOKIE)
    browser = request.cookies.get(BROWSER_COOKIE)
    if not session_id or not browser:
        raise Unauthenticated(NO_SESSION, error="invalid_request")
    data = await run_in_threadpool(
        load_session, runtime.db, runtime.cipher, session_id, browser_session=browser
    )
    if data is None or data.patient_id is None:
        raise Unauthenticated(NO_SESSION)
    return ReviewSession(data=data, csrf=csrf_token(runtime.csrf_secret, session_id))


ReviewSessionDep = Annotated[ReviewSession, Depends(review_session)]


async def session_client(runtime: Runtime, session: ReviewSession) -> FhirClient:
    """A FHIR client for the session's EHR, carrying (and refreshing) the session's access token."""
    config = await runtime.discovery.get(session.data.iss)
    token_set = TokenSet.from_dict(session.data.token_set)
    session_id = session.data.id

    def store_refreshed(new: TokenSet) -> None:
        # A rotated refresh token that is not stored would strand the session: store it now.
        if not update_tokens(runtime.db, runtime.cipher, session_id, new.to_dict(), scope=new.scope):
            log.warning("session.refresh_not_stored", patient_id=session.data.patient_id)

    auth = RefreshingToken(runtime.http, config, runtime.smart_client, token_set, on_refresh=store_refreshed)
    fhir = runtime.settings.fhir
    return FhirClient(
        session.data.iss,
        http=runtime.http,
        auth=auth,
        timeout=fhir.timeout_seconds,
        page_size=fhir.page_size,
        max_attempts=fhir.max_attempts,
        backoff_initial=fhir.backoff_initial_seconds,
        backoff_max=fhir.backoff_max_seconds,
    )


async def session_services(runtime: Runtime, session: ReviewSession) -> Services:
    """The pipeline's `Services` acting as the session's clinician on the session's EHR."""
    client = await session_client(runtime, session)
    return Services(
        settings=runtime.settings, client=client, engine=runtime.ready_engine(), store=runtime.store
    )
