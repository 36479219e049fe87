"""Specifications of the security-relevant storage: launch state, app sessions, API keys, audit.

Every test uses a real SQLite file in a temp folder and reads the raw tables back, so "never stored
in the clear" is checked on what is actually on disk, not on what the repository returns.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from service.cli.apikey import apikey
from service.db import apikeys, audit
from service.db.launch import (
    SessionCipherError,
    StateError,
    TokenCipher,
    consume_state,
    create_state,
    digest,
    end_session,
    load_session,
    purge_expired,
    save_session,
    update_tokens,
)
from service.db.store import SqlSummaryStore

SECRET = "s" * 40
OTHER_SECRET = "t" * 40
BROWSER = "browser-cookie-value-1"
ISS = "https://ehr.example.org/fhir"
T0 = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)
TOKENS = {"access_token": "at-secret-value", "refresh_token": "rt-secret-value", "expires_at": 1.0}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cb.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[sessionmaker[Session]]:
    store = SqlSummaryStore.from_url(f"sqlite:///{db_path}")
    yield store.sessions
    store.close()


def raw_dump(db_path: Path) -> str:
    """Every value of every table, as text: what someone holding the database file can read."""
    with sqlite3.connect(db_path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return repr({t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in tables})  # noqa: S608


def new_state(db: sessionmaker[Session], **kw: object) -> str:
    args: dict[str, object] = {
        "browser_session": BROWSER,
        "iss": ISS,
        "code_verifier": "verifier-abc",
        "redirect_uri": "https://app.example.org/callback",
        "launch": "launch-123",
        "now": T0,
    }
    args.update(kw)
    return create_state(db, **args)  # type: ignore[arg-type]


# -- launch state --------------------------------------------------------------------------------------


def test_a_state_is_random_and_stored_only_as_its_hash(db: sessionmaker[Session], db_path: Path) -> None:
    states = {new_state(db) for _ in range(5)}
    assert len(states) == 5
    assert all(len(s) >= 43 for s in states), "32 random bytes, urlsafe"
    dump = raw_dump(db_path)
    for state in states:
        assert state not in dump
        assert digest(state) in dump
    assert BROWSER not in dump, "the browser cookie is stored hashed too"


def test_consuming_a_state_returns_what_the_launch_needs(db: sessionmaker[Session]) -> None:
    state = new_state(db)
    row = consume_state(db, state, BROWSER, now=T0 + timedelta(seconds=5))
    assert (row.iss, row.code_verifier, row.launch) == (ISS, "verifier-abc", "launch-123")
    assert row.redirect_uri == "https://app.example.org/callback"
    assert row.used_at is not None


def test_a_state_is_single_use(db: sessionmaker[Session]) -> None:
    state = new_state(db)
    consume_state(db, state, BROWSER, now=T0)
    with pytest.raises(StateError, match="already used") as err:
        consume_state(db, state, BROWSER, now=T0)
    assert err.value.problem == "used"


@pytest.mark.parametrize("raw", ["", "not-a-state", "x" * 5000])
def test_an_unknown_state_is_refused(db: sessionmaker[Session], raw: str) -> None:
    new_state(db)
    with pytest.raises(StateError) as err:
        consume_state(db, raw, BROWSER, now=T0)
    assert err.value.problem == "unknown"


def test_a_state_expires(db: sessionmaker[Session]) -> None:
    state = new_state(db, ttl_seconds=60)
    with pytest.raises(StateError, match="expired") as err:
        consume_state(db, state, BROWSER, now=T0 + timedelta(seconds=61))
    assert err.value.problem == "expired"
    ok = new_state(db, ttl_seconds=60)
    consume_state(db, ok, BROWSER, now=T0 + timedelta(seconds=59))


def test_a_state_from_another_browser_is_refused_and_burnt(db: sessionmaker[Session]) -> None:
    state = new_state(db)
    with pytest.raises(StateError) as err:
        consume_state(db, state, "attacker-browser", now=T0)
    assert err.value.problem == "other-browser"
    with pytest.raises(StateError) as again:
        consume_state(db, state, BROWSER, now=T0)
    assert again.value.problem == "used", "a leaked state cannot be used afterwards by anyone"


def test_two_callbacks_racing_with_one_state_have_exactly_one_winner(db: sessionmaker[Session]) -> None:
    state = new_state(db)
    results: list[str] = []
    barrier = threading.Barrier(4)

    def callback() -> None:
        barrier.wait()
        try:
            consume_state(db, state, BROWSER, now=T0)
            results.append("won")
        except StateError as exc:
            results.append(exc.problem)

    threads = [threading.Thread(target=callback) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["used", "used", "used", "won"]


def test_create_state_refuses_a_launch_without_pkce_or_browser_session(db: sessionmaker[Session]) -> None:
    with pytest.raises(ValueError, match="code_verifier"):
        new_state(db, code_verifier="")
    with pytest.raises(ValueError, match="browser_session"):
        new_state(db, browser_session="")


def test_purge_removes_expired_and_used_states_and_expired_sessions(db: sessionmaker[Session]) -> None:
    cipher = TokenCipher(SECRET)
    used = new_state(db)
    consume_state(db, used, BROWSER, now=T0)
    new_state(db, ttl_seconds=10)
    live = new_state(db, ttl_seconds=3600)
    save_session(db, cipher, **_session_fields(), ttl_seconds=10, now=T0)
    kept = save_session(db, cipher, **_session_fields(), ttl_seconds=7200, now=T0)
    purged = purge_expired(db, now=T0 + timedelta(seconds=60))
    assert (purged.launch_states, purged.sessions) == (2, 1)
    consume_state(db, live, BROWSER, now=T0 + timedelta(seconds=61))
    assert load_session(db, cipher, kept, now=T0 + timedelta(seconds=61)) is not None


# -- app sessions --------------------------------------------------------------------------------------


def _session_fields() -> dict[str, object]:
    return {
        "browser_session": BROWSER,
        "iss": ISS,
        "patient_id": "p1",
        "encounter_id": "e1",
        "fhir_user": "Practitioner/dr-1",
        "scope": "launch openid fhirUser patient/Patient.rs",
        "need_patient_banner": True,
        "token_set": TOKENS,
    }


def test_a_session_keeps_its_tokens_encrypted_and_its_id_hashed(
    db: sessionmaker[Session], db_path: Path
) -> None:
    sid = save_session(db, TokenCipher(SECRET), **_session_fields(), now=T0)  # type: ignore[arg-type]
    dump = raw_dump(db_path)
    for secret in (sid, "at-secret-value", "rt-secret-value", SECRET):
        assert secret not in dump
    assert digest(sid) in dump


def test_a_session_loads_with_its_context_and_decrypted_tokens(db: sessionmaker[Session]) -> None:
    cipher = TokenCipher(SECRET)
    sid = save_session(db, cipher, **_session_fields(), now=T0)  # type: ignore[arg-type]
    loaded = load_session(db, cipher, sid, browser_session=BROWSER, now=T0 + timedelta(minutes=5))
    assert loaded is not None
    assert (loaded.patient_id, loaded.encounter_id, loaded.fhir_user) == ("p1", "e1", "Practitioner/dr-1")
    assert loaded.need_patient_banner is True
    assert loaded.token_set == TOKENS
    assert "patient/Patient.rs" in loaded.granted_scopes
    assert "at-secret-value" not in repr(loaded)


def test_a_session_is_gone_when_expired_unknown_from_another_browser_or_under_another_secret(
    db: sessionmaker[Session],
) -> None:
    cipher = TokenCipher(SECRET)
    sid = save_session(db, cipher, **_session_fields(), ttl_seconds=60, now=T0)  # type: ignore[arg-type]
    assert load_session(db, cipher, sid, now=T0 + timedelta(seconds=61)) is None
    assert load_session(db, cipher, "unknown-session", now=T0) is None
    assert load_session(db, cipher, sid, browser_session="other", now=T0) is None
    assert load_session(db, TokenCipher(OTHER_SECRET), sid, now=T0) is None
    assert load_session(db, cipher, sid, now=T0) is not None


def test_refreshed_tokens_replace_the_stored_ones_and_sign_out_ends_the_session(
    db: sessionmaker[Session],
) -> None:
    cipher = TokenCipher(SECRET)
    sid = save_session(db, cipher, **_session_fields(), now=T0)  # type: ignore[arg-type]
    fresh = {**TOKENS, "access_token": "at-2"}
    assert update_tokens(db, cipher, sid, fresh, scope="openid patient/Patient.rs")
    loaded = load_session(db, cipher, sid, now=T0)
    assert loaded is not None and loaded.token_set["access_token"] == "at-2"
    assert loaded.scope == "openid patient/Patient.rs"
    assert end_session(db, sid)
    assert load_session(db, cipher, sid, now=T0) is None
    assert not update_tokens(db, cipher, sid, fresh)
    assert not end_session(db, sid)


def test_the_token_cipher_refuses_a_short_secret_and_hides_itself() -> None:
    with pytest.raises(SessionCipherError, match="at least 32 characters"):
        TokenCipher("changeme")
    cipher = TokenCipher(SECRET)
    assert SECRET not in repr(cipher)
    assert cipher.decrypt(cipher.encrypt(TOKENS)) == TOKENS
    with pytest.raises(SessionCipherError):
        TokenCipher(OTHER_SECRET).decrypt(cipher.encrypt(TOKENS))


# -- API keys ------------------------------------------------------------------------------------------


def test_an_api_key_secret_is_returned_once_and_only_its_hash_is_stored(
    db: sessionmaker[Session], db_path: Path
) -> None:
    key_id, secret = apikeys.create(db, "nightly batch", ["summaries.read", "summaries.write"])
    assert secret.startswith("cbk_") and len(secret) > 40
    dump = raw_dump(db_path)
    assert secret not in dump
    assert apikeys.hash_secret(secret) in dump
    assert secret[:8] in dump, "the prefix is kept for lookup"
    (listed,) = apikeys.list_keys(db)
    assert listed.id == key_id and secret not in repr(vars(listed))


def test_verify_accepts_the_secret_and_nothing_else(db: sessionmaker[Session]) -> None:
    key_id, secret = apikeys.create(db, "svc", ["summaries.read"], patient_id="p1")
    apikeys.create(db, "other", ["summaries.read"])
    found = apikeys.verify(db, secret)
    assert found is not None and found.id == key_id
    assert found.scopes == ["summaries.read"] and found.patient_id == "p1"
    for wrong in (
        secret[:-1] + ("A" if secret[-1] != "A" else "B"),
        secret[:8],
        "",
        "cbk_" + "x" * 500,
        "Bearer x",
    ):
        assert apikeys.verify(db, wrong) is None


def test_a_revoked_key_no_longer_verifies(db: sessionmaker[Session]) -> None:
    key_id, secret = apikeys.create(db, "svc", ["summaries.read"])
    assert apikeys.revoke(db, key_id)
    assert apikeys.verify(db, secret) is None
    assert not apikeys.revoke(db, key_id), "revoking twice reports nothing to revoke"
    assert not apikeys.revoke(db, "no-such-key")
    (listed,) = apikeys.list_keys(db)
    assert listed.revoked_at is not None
    assert apikeys.list_keys(db, include_revoked=False) == []


@pytest.mark.parametrize(
    ("name", "scopes", "patient", "message"),
    [
        ("", ["a"], None, "name"),
        ("svc", [], None, "at least one scope"),
        ("svc", ["has space"], None, "scope 'has space'"),
        ("svc", ["a"], "../p1", "patient_id"),
        ("svc", ["summaries.read\n"], None, "scope 'summaries.read"),  # `$` matched before a newline
        ("svc", ["a"], "p1\n", "patient_id"),
    ],
)
def test_api_key_creation_names_the_bad_field(
    db: sessionmaker[Session], name: str, scopes: list[str], patient: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        apikeys.create(db, name, scopes, patient)


def test_the_apikey_cli_prints_the_secret_once_lists_without_it_and_revokes(db_path: Path) -> None:
    env = {"CHARTBRIEF_DB__URL": f"sqlite:///{db_path}"}
    runner = CliRunner()
    created = runner.invoke(
        apikey, ["create", "batch", "--scope", "summaries.read", "--patient", "p1"], env=env
    )
    assert created.exit_code == 0, created.output
    secret = next(line.split()[-1] for line in created.stdout.splitlines() if line.startswith("secret:"))
    key_id = next(line.split()[-1] for line in created.stdout.splitlines() if line.startswith("id:"))
    listed = runner.invoke(apikey, ["list"], env=env)
    assert listed.exit_code == 0 and key_id in listed.stdout and "patient=p1" in listed.stdout
    assert secret not in listed.output
    revoked = runner.invoke(apikey, ["revoke", key_id], env=env)
    assert revoked.exit_code == 0
    again = runner.invoke(apikey, ["revoke", key_id], env=env)
    assert again.exit_code == 2 and "no active API key" in again.output
    bad = runner.invoke(apikey, ["create", "x", "--scope", "bad scope"], env=env)
    assert bad.exit_code == 2 and "scope" in bad.output
    assert "revoked" in runner.invoke(apikey, ["list"], env=env).stdout


# -- audit ---------------------------------------------------------------------------------------------


def test_audit_rows_are_listed_per_patient_newest_first(db: sessionmaker[Session]) -> None:
    for minute, (patient, action) in enumerate([("p1", "approve"), ("p2", "reject"), ("p1", "edit")]):
        audit.record(
            db,
            actor="Practitioner/dr-1",
            action=action,
            outcome="ok",
            patient_id=patient,
            resource="DocumentReference/d1",
            request_id="req-1",
            at=T0 + timedelta(minutes=minute),
        )
    rows = audit.list_for_patient(db, "p1")
    assert [r.action for r in rows] == ["edit", "approve"]
    assert rows[0].actor == "Practitioner/dr-1" and rows[0].request_id == "req-1"
    assert rows[0].at == T0 + timedelta(minutes=2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("outcome", "maybe", "outcome must be one of"),
        ("action", "Approve it!", "action"),
        ("actor", " ", "actor"),
    ],
)
def test_an_audit_row_with_a_bad_field_is_refused_naming_it(
    db: sessionmaker[Session], field: str, value: str, message: str
) -> None:
    fields = {"actor": "system", "action": "approve", "outcome": "ok"}
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        audit.record(db, **fields)  # type: ignore[arg-type]


def test_audit_detail_is_one_short_line(db: sessionmaker[Session]) -> None:
    audit.record(
        db, actor="system", action="approve", outcome="ok", patient_id="p1", detail="a\nb " + "x" * 900
    )
    (row,) = audit.list_for_patient(db, "p1")
    assert row.detail is not None and "\n" not in row.detail and len(row.detail) == audit.MAX_DETAIL_CHARS


def test_a_rejection_reason_is_stored_for_monitoring_but_never_logged(db: sessionmaker[Session]) -> None:
    reason = "Mentions the wrong diagnosis for Mrs Example"
    with capture_logs() as logs:
        audit.record_rejection(
            db,
            document_reference="DocumentReference/d1",
            patient_id="p1",
            who="Practitioner/dr-1",
            reason=reason,
        )
        audit.record_rejection(
            db, document_reference="DocumentReference/d2", patient_id="p2", who="x", reason="  "
        )
    assert reason not in repr(logs) and "Mrs Example" not in repr(logs)
    (row,) = audit.rejections(db, patient_id="p1")
    assert row.reason == reason and row.document_reference == "DocumentReference/d1"
    (blank,) = audit.rejections(db, patient_id="p2")
    assert blank.reason is None
    assert len(audit.rejections(db)) == 2
