"""Static API keys for service accounts that call the REST API.

A key's secret (`cbk_` + 32 random bytes, urlsafe base64) is shown once, when it is created; the
table keeps its sha256 and its first 8 characters (to find the row without scanning every key).
`verify` compares hashes in constant time and ignores revoked keys. A key carries scopes and may be
limited to one patient.

What this module must not do: store, log or return a secret after `create`, or accept a revoked key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime

import structlog
from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import ApiKey

_log = structlog.get_logger(__name__)

SECRET_TAG = "cbk_"  # noqa: S105 - a public marker, not a secret: it lets scanners spot leaked keys
SECRET_BYTES = 32
PREFIX_CHARS = 8
MAX_SECRET_CHARS = 200
# Both checked with fullmatch: `$` would also accept a value followed by a newline.
_SCOPE = re.compile(r"[A-Za-z0-9/._*:-]{1,100}")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def hash_secret(secret: str) -> str:
    """sha256 (hex) of a key's secret: 256 random bits need no slow hash.

    >>> hash_secret("cbk_x") == hash_secret("cbk_x") != hash_secret("cbk_y")
    True
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """Distinct scopes in the given order; ValueError naming the bad one.

    >>> check_scopes(["summaries.read", "summaries.read", "summaries.write"])
    ['summaries.read', 'summaries.write']
    """
    out: list[str] = []
    for scope in scopes:
        if not isinstance(scope, str) or not _SCOPE.fullmatch(scope):
            raise ValueError(f"scope {scope!r} is not valid: use letters, digits and / . _ * : -")
        if scope not in out:
            out.append(scope)
    if not out:
        raise ValueError("an API key needs at least one scope")
    return out


def create(
    db: sessionmaker[Session],
    name: str,
    scopes: Iterable[str],
    patient_id: str | None = None,
    *,
    now: datetime | None = None,
) -> tuple[str, str]:
    """Create a key; returns (id, secret). The secret is not stored and cannot be shown again."""
    name = (name or "").strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise ValueError("API key name must be 1-100 printable characters")
    checked = check_scopes(scopes)
    if patient_id is not None and not _FHIR_ID.fullmatch(patient_id):
        raise ValueError(f"patient_id {patient_id!r} is not a valid FHIR id")
    secret = SECRET_TAG + secrets.token_urlsafe(SECRET_BYTES)
    row = ApiKey(
        name=name,
        key_hash=hash_secret(secret),
        prefix=secret[:PREFIX_CHARS],
        scopes=checked,
        patient_id=patient_id,
        created_at=now or datetime.now(UTC),
    )
    with db.begin() as s:
        s.add(row)
        s.flush()
        key_id = row.id
    _log.info("apikey.created", key_id=key_id, scopes=len(checked), patient_scoped=patient_id is not None)
    return key_id, secret


def verify(db: sessionmaker[Session], secret: str) -> ApiKey | None:
    """The live (not revoked) key with this secret, detached from the session; None otherwise."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_TAG) or len(secret) > MAX_SECRET_CHARS:
        return None
    wanted = hash_secret(secret)
    found: ApiKey | None = None
    with db() as s:
        candidates = s.scalars(
            select(ApiKey).where(ApiKey.prefix == secret[:PREFIX_CHARS], ApiKey.revoked_at.is_(None))
        ).all()
        # Every candidate is compared (no early exit), each in constant time.
        for row in candidates:
            if hmac.compare_digest(row.key_hash, wanted):
                found = row
        if found is not None:
            s.expunge(found)
    return found


def revoke(db: sessionmaker[Session], key_id: str, *, now: datetime | None = None) -> bool:
    """Revoke a key; False when no live key has this id."""
    with db.begin() as s:
        result = s.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=now or datetime.now(UTC))
            .execution_options(synchronize_session=False)
        )
        done = isinstance(result, CursorResult) and result.rowcount == 1
    _log.info("apikey.revoked" if done else "apikey.revoke_missed", key_id=key_id)
    return done


def list_keys(db: sessionmaker[Session], *, include_revoked: bool = True) -> list[ApiKey]:
    """Every key (without secrets), oldest first, detached from the session."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    with db() as s:
        rows = list(s.scalars(query).all())
        s.expunge_all()
    return rows
