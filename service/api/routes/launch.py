"""SMART App Launch 2.2: `GET /launch` (EHR or standalone) and `GET /callback`.

```
EHR   ──GET /launch?iss=..&launch=..──►  iss on the allow-list? discovery, PKCE, state (DB, bound to
                                          the cb_browser cookie) ──302──► EHR /authorize (aud=iss)
EHR   ──GET /callback?code=..&state=..─►  state single-use, unexpired, same browser; code + verifier
                                          ──► token endpoint; patient context required; tokens
                                          stored encrypted; cb_session cookie ──303──► /review
```

A launch without `launch` is a standalone launch: scope `launch/patient` and the configured
standalone EHR (or the `iss` given, if it is allowed).

What it must not do: follow an `iss` that is not on the allow-list, accept a state twice, put a
token or code anywhere but the token request, or log the query string.
"""

from __future__ import annotations

import re

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.auth.launch import TokenSet, authorize_url, exchange_code, new_pkce
from fhir_adapters.auth.oauth import SmartError, split_scopes
from fhir_adapters.auth.scopes import DEFAULT_SCOPES, STANDALONE_SCOPES, review_scopes
from service.api.deps import (
    CipherDep,
    DatabaseDep,
    DiscoveryDep,
    HttpDep,
    SettingsDep,
    SmartClientDep,
)
from service.api.errors import BadGateway, BadRequest, Forbidden
from service.api.security import scopes_allow
from service.api.sessions import (
    BROWSER_COOKIE,
    SESSION_COOKIE,
    new_browser_session,
    read_cookie,
    set_cookie,
)
from service.api.throttle import Throttle, ThrottleDep
from service.config import SmartSettings
from service.db import audit
from service.db.launch import StateError, consume_state, create_state, end_session, save_session
from service.db.store import in_thread

log = structlog.get_logger(__name__)

router = APIRouter(tags=["SMART launch"], include_in_schema=True)

# Approve, edit, reject and supersede PUT the draft and its Provenance: they need `.u` as well as
# the narrow create/read set of an EHR launch.
REVIEW_SCOPES = review_scopes("patient")
# What a session cannot work without: (resource, interaction) pairs the granted scopes must allow.
REQUIRED_RIGHTS = (
    ("Patient", "r"),
    ("DocumentReference", "r"),
    ("DocumentReference", "c"),
    ("Provenance", "c"),
)
MAX_LAUNCH_CHARS = 500
_OAUTH_ERROR = re.compile(r"[a-z_]{1,64}")


def launch_scopes(configured: str | None, *, ehr_launch: bool) -> str:
    """The scopes to request: the configured ones (or chartbrief's narrow set) plus what review needs,
    with `launch` for an EHR launch and `launch/patient` for a standalone one.

    >>> launch_scopes("launch openid patient/Patient.rs", ehr_launch=False).split()[:2]
    ['launch/patient', 'openid']
    >>> "patient/DocumentReference.u" in launch_scopes(None, ehr_launch=True)
    True
    >>> launch_scopes("launch openid user/*.cruds", ehr_launch=True)
    'launch openid user/*.cruds'
    """
    base = (
        split_scopes(configured)
        if configured
        else split_scopes(DEFAULT_SCOPES if ehr_launch else STANDALONE_SCOPES)
    )
    wanted = "launch" if ehr_launch else "launch/patient"
    rest = [s for s in base if s not in ("launch", "launch/patient")]
    # Only what the configured scopes do not already cover (user/*.cruds covers every update).
    review = [s for s in REVIEW_SCOPES if not scopes_allow(rest, s.split("/")[1].split(".")[0], "u")]
    return " ".join(split_scopes([wanted, *rest, *review]))


def missing_rights(granted: frozenset[str]) -> list[str]:
    """The required (resource, interaction) pairs the granted scopes do not cover, as `Type.x`.

    >>> missing_rights(frozenset({"patient/*.rs", "patient/DocumentReference.c"}))
    ['Provenance.c']
    """
    return [
        f"{rtype}.{action}" for rtype, action in REQUIRED_RIGHTS if not scopes_allow(granted, rtype, action)
    ]


def _target_issuer(smart: SmartSettings, iss: str | None, launch: str | None) -> str:
    if launch is not None and not iss:
        raise BadRequest("an EHR launch needs the iss parameter (the EHR's FHIR base URL)")
    if launch is not None and len(launch) > MAX_LAUNCH_CHARS:
        raise BadRequest(f"the launch parameter is longer than {MAX_LAUNCH_CHARS} characters")
    target = iss.strip().rstrip("/") if iss else smart.standalone_iss()
    if target is None:
        raise BadRequest(
            "no iss was given and no EHR is configured for a standalone launch "
            "(CHARTBRIEF_SMART__STANDALONE_ISSUER)"
        )
    if target not in smart.allowed_issuers:
        log.warning("launch.iss_refused")
        raise Forbidden(
            "this EHR (iss) is not on chartbrief's list of allowed EHRs; an administrator can add it "
            "to CHARTBRIEF_SMART__ALLOWED_ISSUERS"
        )
    return target


@router.get("/launch", summary="Start a SMART launch (EHR launch with `launch`, standalone without)")
async def launch(
    request: Request,
    settings: SettingsDep,
    db: DatabaseDep,
    discovery: DiscoveryDep,
    throttle: ThrottleDep,
    iss: str | None = None,
    launch: str | None = None,
) -> Response:
    smart = settings.smart
    client = throttle.client(request)
    await throttle.check(throttle.anonymous, "anonymous", client, "requests")
    try:
        target = _target_issuer(smart, iss, launch)
    except Forbidden:
        await _refused(db, request, throttle, client, "iss not on the allow-list")
        raise
    # Each launch stores a state row: bounded per client for as long as a state can live.
    await throttle.check(throttle.launch_states, "launch-states", client, "sign-in attempts")
    try:
        config = await discovery.get(target)
    except SmartError as exc:
        raise BadGateway(f"the EHR's SMART configuration cannot be used: {exc}") from exc
    verifier, challenge = new_pkce()
    # Always a new browser session: one chosen by the caller could be a value planted in a victim's
    # browser, binding the victim's sign-in to a session the attacker knows.
    browser = new_browser_session()
    state = await in_thread(
        create_state,
        db,
        browser_session=browser,
        iss=target,
        code_verifier=verifier,
        redirect_uri=smart.redirect_uri,
        launch=launch,
        ttl_seconds=smart.state_ttl_seconds,
    )
    url = authorize_url(
        config,
        client_id=smart.client_id,
        redirect_uri=smart.redirect_uri,
        scope=launch_scopes(smart.scope, ehr_launch=launch is not None),
        state=state,
        aud=target,
        code_challenge=challenge,
        launch=launch,
    )
    log.info("launch.authorize", standalone=launch is None)
    response = RedirectResponse(url, status_code=302)
    set_cookie(response, smart, BROWSER_COOKIE, browser, max_age=smart.session_ttl_seconds)
    return response


async def _refused(
    db: sessionmaker[Session], request: Request, throttle: Throttle, client: str, detail: str
) -> None:
    """The audit row of a launch refused before anyone is known (no session, no fhirUser yet); past
    the per-client budget of such rows the refusal is only logged, so refusals cannot fill the table."""
    if not await throttle.allow(throttle.refusal_audits, "refusal-audits", client):
        log.warning("launch.refusal_not_audited", detail=detail)
        return
    await in_thread(
        audit.record,
        db,
        actor="unauthenticated",
        action="launch",
        outcome="denied",
        detail=detail,
        request_id=request.state.request_id,
    )


@router.get("/callback", summary="The EHR's redirect after authorization")
async def callback(
    request: Request,
    settings: SettingsDep,
    db: DatabaseDep,
    cipher: CipherDep,
    discovery: DiscoveryDep,
    http: HttpDep,
    smart_client: SmartClientDep,
    throttle: ThrottleDep,
    code: str | None = None,
    state: str | None = None,
    error: str | None = None,
) -> Response:
    client = throttle.client(request)
    await throttle.check(throttle.anonymous, "anonymous", client, "requests")
    browser = read_cookie(request, settings.smart, BROWSER_COOKIE) or ""
    if not state:
        await _refused(db, request, throttle, client, "state missing")
        raise BadRequest("the EHR's answer has no state; start the launch again from the EHR")
    try:
        row = await in_thread(consume_state, db, state, browser)
    except StateError as exc:
        await _refused(db, request, throttle, client, f"state {exc.problem}")
        raise BadRequest(str(exc)) from exc
    if error:
        shown = error if _OAUTH_ERROR.fullmatch(error) else "an error"
        raise Forbidden(
            f"the EHR did not authorize chartbrief ({shown}); start the launch again from the EHR"
        )
    if not code:
        raise BadRequest("the EHR's answer has no authorization code; start the launch again from the EHR")
    try:
        config = await discovery.get(row.iss)
        token_set = await exchange_code(
            http,
            config,
            smart_client,
            code=code,
            redirect_uri=row.redirect_uri,
            code_verifier=row.code_verifier,
        )
    except SmartError as exc:
        await _refused(db, request, throttle, client, "state accepted, but the token exchange failed")
        if exc.oauth_error:
            raise Forbidden(f"the EHR refused the sign-in: {exc}") from exc
        raise BadGateway(f"the EHR's token endpoint could not be used: {exc}") from exc
    _check_grant(token_set)
    smart = settings.smart
    fhir_user = token_set.fhir_user_reference
    session_id = await in_thread(
        save_session,
        db,
        cipher,
        browser_session=browser,
        iss=row.iss,
        patient_id=token_set.patient,
        encounter_id=token_set.encounter,
        fhir_user=fhir_user,
        scope=token_set.scope,
        need_patient_banner=token_set.need_patient_banner,
        token_set=token_set.to_dict(),
        ttl_seconds=smart.session_ttl_seconds,
    )
    previous = read_cookie(request, smart, SESSION_COOKIE)
    if previous:
        # A new launch replaces the browser's old session instead of leaving it usable.
        await in_thread(end_session, db, previous)
    await in_thread(
        audit.record,
        db,
        actor=fhir_user or "unidentified-user",
        action="launch",
        outcome="ok",
        patient_id=token_set.patient,
        detail="standalone launch" if row.launch is None else "EHR launch",
        request_id=request.state.request_id,
    )
    response = RedirectResponse("/review", status_code=303)
    set_cookie(response, smart, SESSION_COOKIE, session_id, max_age=smart.session_ttl_seconds)
    return response


def _check_grant(token_set: TokenSet) -> None:
    if token_set.patient is None:
        raise Forbidden(
            "the EHR gave no patient context: chartbrief summarizes one patient and must be launched "
            "from a patient's chart"
        )
    missing = missing_rights(token_set.granted_scopes)
    if missing:
        raise Forbidden(
            "the EHR granted too few permissions for chartbrief to read the record and save the draft "
            f"(missing: {', '.join(missing)})"
        )
