"""SMART launch state and app sessions, kept server-side.

- `create_state` / `consume_state`: the OAuth `state` of one authorize round trip. Random (32 bytes),
  stored only as its sha256, bound to the browser session that started it, expiring, and single
  use: consuming is one atomic `UPDATE ... WHERE used_at IS NULL`, so two callbacks racing with the
  same state cannot both win.
- `save_session` / `load_session` / `update_tokens` / `end_session`: the clinician's session after
  the callback. The cookie holds a random id; the table holds its sha256 and the token set encrypted
  with Fernet under a key derived from the configured session secret (`TokenCipher`).

What this module must not do: store or log a raw state, session id or token, or let a state be used
twice, after its expiry, or from another browser.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import delete, or_, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.errors import ChartbriefError
from service.db.models import AppSession, LaunchState

_log = structlog.get_logger(__name__)

STATE_BYTES = 32
STATE_TTL_SECONDS = 600  # an authorize round trip is seconds; ten minutes covers a slow login
SESSION_TTL_SECONDS = 8 * 3600  # one clinical shift
MIN_SECRET_CHARS = 32
# Anything longer than this was not made by `create_state` / `save_session`; refused before hashing.
MAX_RAW_CHARS = 200
_HKDF_INFO = b"chartbrief app-session token encryption v1"

StateProblem = Literal["unknown", "used", "expired", "other-browser"]

_STATE_MESSAGES: dict[StateProblem, str] = {
    "unknown": "this sign-in request is unknown to chartbrief; start the launch again from the EHR",
    "used": "this sign-in request was already used; start the launch again from the EHR",
    "expired": "this sign-in request expired; start the launch again from the EHR",
    "other-browser": "this sign-in request was started in another browser; start the launch again here",
}


class StateError(ChartbriefError):
    """The `state` of a callback cannot be accepted; `problem` says why, the message is for a person."""

    def __init__(self, problem: StateProblem) -> None:
        super().__init__(_STATE_MESSAGES[problem])
        self.problem: StateProblem = problem


class SessionCipherError(ChartbriefError):
    """The session secret is unusable, or a stored token set cannot be decrypted with it."""


def digest(raw: str) -> str:
    """sha256 (hex) of a random secret value (state, session id, browser-session cookie).

    A plain hash is enough: the values are 256-bit random, so nothing can be guessed from the hash.

    >>> len(digest("x"))
    64
    """
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; every time chartbrief stores is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _plausible(raw: str) -> bool:
    return isinstance(raw, str) and 0 < len(raw) <= MAX_RAW_CHARS


class TokenCipher:
    """Fernet encryption of token sets under a key derived (HKDF-SHA256) from the session secret."""

    __slots__ = ("_fernet",)

    def __init__(self, secret: str) -> None:
        if not isinstance(secret, str) or len(secret) < MIN_SECRET_CHARS:
            raise SessionCipherError(
                f"the session secret must be at least {MIN_SECRET_CHARS} characters "
                "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
            secret.encode("utf-8")
        )
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def encrypt(self, token_set: Mapping[str, Any]) -> str:
        blob = json.dumps(dict(token_set), sort_keys=True, separators=(",", ":")).encode("utf-8")
        return self._fernet.encrypt(blob).decode("ascii")

    def decrypt(self, sealed: str) -> dict[str, Any]:
        try:
            value = json.loads(self._fernet.decrypt(sealed.encode("ascii")))
        except (InvalidToken, ValueError) as exc:
            raise SessionCipherError(
                "a stored token set cannot be decrypted: the session secret changed or the row is damaged"
            ) from exc
        if not isinstance(value, dict):
            raise SessionCipherError("a stored token set is not a JSON object")
        return value

    def __repr__(self) -> str:
        return "TokenCipher(<redacted>)"


# -- launch state --------------------------------------------------------------------------------------


def create_state(
    db: sessionmaker[Session],
    *,
    browser_session: str,
    iss: str,
    code_verifier: str,
    redirect_uri: str,
    launch: str | None = None,
    ttl_seconds: int = STATE_TTL_SECONDS,
    now: datetime | None = None,
) -> str:
    """Store a new launch state and return the raw value to put in the authorize URL."""
    if not _plausible(browser_session):
        raise ValueError("browser_session is empty or too long: set the browser-session cookie first")
    if not code_verifier:
        raise ValueError("code_verifier is empty: PKCE is required for every launch")
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
    raw = secrets.token_urlsafe(STATE_BYTES)
    created = _now(now)
    with db.begin() as s:
        s.add(
            LaunchState(
                state_hash=digest(raw),
                browser_session_hash=digest(browser_session),
                iss=iss,
                code_verifier=code_verifier,
                launch=launch,
                redirect_uri=redirect_uri,
                created_at=created,
                expires_at=created + timedelta(seconds=ttl_seconds),
            )
        )
    return raw


def consume_state(
    db: sessionmaker[Session], raw_state: str, browser_session: str, *, now: datetime | None = None
) -> LaunchState:
    """The launch state for a callback, marked used; StateError if unknown, used, expired or from
    another browser. A state presented from another browser is burnt too: it leaked."""
    if not _plausible(raw_state):
        _log.warning("launch.state_refused", problem="unknown")
        raise StateError("unknown")
    key = digest(raw_state)
    at = _now(now)
    with db.begin() as s:
        result = s.execute(
            update(LaunchState)
            .where(LaunchState.state_hash == key, LaunchState.used_at.is_(None))
            .values(used_at=at)
            .execution_options(synchronize_session=False)
        )
        claimed = isinstance(result, CursorResult) and result.rowcount == 1
        row = s.get(LaunchState, key)
        if row is not None:
            s.expunge(row)
    problem: StateProblem | None = None
    if row is None:
        problem = "unknown"
    elif not claimed:
        problem = "used"
    elif _aware(row.expires_at) <= at:
        problem = "expired"
    elif not hmac.compare_digest(row.browser_session_hash, digest(browser_session or "")):
        problem = "other-browser"
    if problem is not None or row is None:
        _log.warning("launch.state_refused", problem=problem or "unknown")
        raise StateError(problem or "unknown")
    return row


@dataclass(frozen=True)
class Purged:
    """Rows `purge_expired` deleted."""

    launch_states: int
    sessions: int

    @property
    def total(self) -> int:
        return self.launch_states + self.sessions


def purge_expired(db: sessionmaker[Session], *, now: datetime | None = None) -> Purged:
    """Delete launch states that expired or were used, and app sessions (with their encrypted tokens)
    past their expiry."""
    at = _now(now)
    with db.begin() as s:
        states = s.execute(
            delete(LaunchState)
            .where(or_(LaunchState.expires_at <= at, LaunchState.used_at.is_not(None)))
            .execution_options(synchronize_session=False)
        )
        sessions = s.execute(
            delete(AppSession).where(AppSession.expires_at <= at).execution_options(synchronize_session=False)
        )
    purged = Purged(launch_states=_count(states), sessions=_count(sessions))
    _log.info("launch.purged", launch_states=purged.launch_states, sessions=purged.sessions)
    return purged


def _count(result: object) -> int:
    return result.rowcount if isinstance(result, CursorResult) else 0


# -- app sessions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionData:
    """A live app session as the API needs it. `token_set` is decrypted and never shown in repr."""

    id: str  # the raw id (the cookie value) it was loaded with
    iss: str
    patient_id: str | None
    encounter_id: str | None
    fhir_user: str | None
    scope: str
    need_patient_banner: bool
    expires_at: datetime
    created_at: datetime
    token_set: dict[str, Any] = field(repr=False)

    @property
    def granted_scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split())


def save_session(
    db: sessionmaker[Session],
    cipher: TokenCipher,
    *,
    browser_session: str,
    iss: str,
    patient_id: str | None,
    encounter_id: str | None,
    fhir_user: str | None,
    scope: str,
    need_patient_banner: bool,
    token_set: Mapping[str, Any],
    ttl_seconds: int = SESSION_TTL_SECONDS,
    now: datetime | None = None,
) -> str:
    """Store a new app session and return its raw id (the cookie value; only its hash is stored)."""
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
    raw_id = secrets.token_urlsafe(STATE_BYTES)
    created = _now(now)
    with db.begin() as s:
        s.add(
            AppSession(
                id=digest(raw_id),
                browser_session_hash=digest(browser_session),
                iss=iss,
                patient_id=patient_id,
                encounter_id=encounter_id,
                fhir_user=fhir_user,
                scope=scope,
                need_patient_banner=need_patient_banner,
                token_set_encrypted=cipher.encrypt(token_set),
                created_at=created,
                expires_at=created + timedelta(seconds=ttl_seconds),
            )
        )
    _log.info("session.created", patient_id=patient_id, encounter_id=encounter_id)
    return raw_id


def load_session(
    db: sessionmaker[Session],
    cipher: TokenCipher,
    session_id: str,
    *,
    browser_session: str | None = None,
    now: datetime | None = None,
) -> SessionData | None:
    """The live session for a cookie value, or None when unknown, expired, from another browser
    (when `browser_session` is given) or undecryptable (the secret changed: the user launches again)."""
    if not _plausible(session_id):
        return None
    with db() as s:
        row = s.get(AppSession, digest(session_id))
    if row is None or _aware(row.expires_at) <= _now(now):
        return None
    if browser_session is not None and not hmac.compare_digest(
        row.browser_session_hash, digest(browser_session)
    ):
        _log.warning("session.other_browser", patient_id=row.patient_id)
        return None
    try:
        token_set = cipher.decrypt(row.token_set_encrypted)
    except SessionCipherError:
        _log.warning("session.undecryptable", patient_id=row.patient_id)
        return None
    return SessionData(
        id=session_id,
        iss=row.iss,
        patient_id=row.patient_id,
        encounter_id=row.encounter_id,
        fhir_user=row.fhir_user,
        scope=row.scope,
        need_patient_banner=row.need_patient_banner,
        expires_at=_aware(row.expires_at),
        created_at=_aware(row.created_at),
        token_set=token_set,
    )


def update_tokens(
    db: sessionmaker[Session],
    cipher: TokenCipher,
    session_id: str,
    token_set: Mapping[str, Any],
    *,
    scope: str | None = None,
) -> bool:
    """Replace a session's stored token set (after a refresh); False when the session is gone."""
    if not _plausible(session_id):
        return False
    values: dict[str, Any] = {"token_set_encrypted": cipher.encrypt(token_set)}
    if scope is not None:
        values["scope"] = scope
    with db.begin() as s:
        result = s.execute(
            update(AppSession)
            .where(AppSession.id == digest(session_id))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return isinstance(result, CursorResult) and result.rowcount == 1


def end_session(db: sessionmaker[Session], session_id: str) -> bool:
    """Delete a session (sign-out); False when there was none."""
    if not _plausible(session_id):
        return False
    with db.begin() as s:
        result = s.execute(
            delete(AppSession)
            .where(AppSession.id == digest(session_id))
            .execution_options(synchronize_session=False)
        )
        return isinstance(result, CursorResult) and result.rowcount == 1
