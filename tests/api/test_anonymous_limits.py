"""What a caller without credentials can make the service do: rate limits per client address on
/launch and /callback, a bound on unexpired sign-in states and on audit rows of refusals, request
bodies refused over the limit before they are read, and expired states and sessions purged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner
from sqlalchemy import func, select

from service.cli.main import cli
from service.db.launch import TokenCipher, create_state, save_session
from service.db.models import AppSession, AuditEvent, LaunchState
from service.runtime import open_store
from tests.api.conftest import app_settings, running_app
from tests.smart_ehr.server import TestEhr


def count(app: Any, model: type[Any]) -> int:
    with app.state.runtime.db() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


async def launches(client: httpx.AsyncClient, ehr: TestEhr, n: int, **headers: str) -> list[httpx.Response]:
    return [
        await client.get(
            "/launch", params={"iss": ehr.base_url, "launch": ehr.launch("p-1")}, headers=headers
        )
        for _ in range(n)
    ]


async def test_launches_from_one_address_over_the_limit_get_429_with_retry_after(
    ehr: TestEhr, tmp_path: Path
) -> None:
    settings = app_settings(tmp_path, ehr, api={"anonymous_rate_limit": "5/minute"})
    async with running_app(settings) as (client, app):
        answers = await launches(client, ehr, 12)
        callback = await client.get("/callback", params={"state": "x", "code": "y"})
        states = count(app, LaunchState)
    assert [a.status_code for a in answers] == [302] * 5 + [429] * 7
    refused = answers[-1]
    assert 1 <= int(refused.headers["retry-after"]) <= 61
    assert "too many requests" in refused.text.lower() or "busy" in refused.text.lower()
    assert callback.status_code == 429  # the same budget: /callback is anonymous too
    assert states == 5


async def test_the_api_form_of_the_refusal_is_an_operation_outcome(tmp_path: Path) -> None:
    from service.api.throttle import Throttle
    from service.errors import TooManyRequests

    throttle = Throttle.from_settings(
        app_settings(tmp_path, api={"anonymous_rate_limit": "1/hour"}).api, state_ttl_seconds=600
    )
    await throttle.check(throttle.anonymous, "anonymous", "198.51.100.1", "requests")
    try:
        await throttle.check(throttle.anonymous, "anonymous", "198.51.100.1", "requests")
    except TooManyRequests as exc:
        assert exc.status == 429 and exc.code == "throttled"
        assert 3000 < exc.retry_after <= 3601
    else:
        raise AssertionError("the second request within the hour was not refused")
    # Another address has its own budget.
    await throttle.check(throttle.anonymous, "anonymous", "198.51.100.2", "requests")


async def test_unexpired_sign_in_states_per_address_are_bounded(ehr: TestEhr, tmp_path: Path) -> None:
    settings = app_settings(
        tmp_path, ehr, api={"anonymous_rate_limit": "1000/minute", "launch_states_per_client": 3}
    )
    async with running_app(settings) as (client, app):
        answers = await launches(client, ehr, 10)
        states = count(app, LaunchState)
    assert [a.status_code for a in answers] == [302] * 3 + [429] * 7
    assert states == 3


async def test_refused_launches_cannot_fill_the_audit_table(ehr: TestEhr, tmp_path: Path) -> None:
    settings = app_settings(
        tmp_path, ehr, api={"anonymous_rate_limit": "1000/minute", "refusal_audits_per_client": "4/minute"}
    )
    async with running_app(settings) as (client, app):
        answers = [
            await client.get("/launch", params={"iss": "https://evil.example.org/fhir", "launch": "x"})
            for _ in range(30)
        ]
        bad_states = [await client.get("/callback", params={"state": "nope", "code": "c"}) for _ in range(30)]
        audited = count(app, AuditEvent)
    assert {a.status_code for a in answers} == {403}  # every one still refused
    assert {a.status_code for a in bad_states} == {400}
    assert audited == 4


async def test_forwarded_for_counts_only_from_a_trusted_proxy(ehr: TestEhr, tmp_path: Path) -> None:
    limits = {"anonymous_rate_limit": "2/minute"}
    # The test client connects from 127.0.0.1: untrusted, X-Forwarded-For is the caller's own claim.
    async with running_app(app_settings(tmp_path / "a", ehr, api=limits)) as (client, _app):
        spoofed = [
            (await launches(client, ehr, 1, **{"X-Forwarded-For": f"203.0.113.{i}"}))[0] for i in range(4)
        ]
    assert [a.status_code for a in spoofed] == [302, 302, 429, 429]
    trusted = {**limits, "trusted_proxies": ["127.0.0.1"]}
    async with running_app(app_settings(tmp_path / "b", ehr, api=trusted)) as (client, _app):
        behind = [
            (await launches(client, ehr, 1, **{"X-Forwarded-For": f"203.0.113.{i}"}))[0] for i in range(4)
        ]
        same = await launches(client, ehr, 3, **{"X-Forwarded-For": "203.0.113.200"})
    assert [a.status_code for a in behind] == [302] * 4
    assert [a.status_code for a in same] == [302, 302, 429]


# -- request bodies ------------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_refused_413_before_authentication(tmp_path: Path) -> None:
    settings = app_settings(tmp_path, api={"max_body_bytes": 64 * 1024})
    big = b'{"patient": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    async with running_app(settings) as (client, _app):
        declared = await client.post(
            "/api/summaries", content=big, headers={"content-type": "application/json"}
        )
        small = await client.post("/api/summaries", json={"patient": "p1"})
    assert declared.status_code == 413
    assert declared.json()["resourceType"] == "OperationOutcome"
    assert declared.json()["issue"][0]["code"] == "too-long"
    assert "CHARTBRIEF_API__MAX_BODY_BYTES" in declared.json()["issue"][0]["diagnostics"]
    assert small.status_code == 401  # under the limit, authentication answers as before


async def test_a_chunked_body_is_read_only_up_to_the_limit(tmp_path: Path) -> None:
    settings = app_settings(tmp_path, api={"max_body_bytes": 64 * 1024})
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(640):  # 40 MiB in all, if anyone read it
            sent += 1
            yield b"x" * 65536

    async with running_app(settings) as (client, _app):
        answer = await client.post(
            "/review/approve", content=chunks(), headers={"content-type": "application/x-www-form-urlencoded"}
        )
    assert "content-length" not in {k.lower() for k in answer.request.headers}
    assert answer.status_code == 413
    assert sent < 640  # the service stopped reading long before the end


# -- purging -------------------------------------------------------------------------------------


def _expired_rows(db: Any, cipher: TokenCipher) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=2)
    for _ in range(3):
        create_state(
            db,
            browser_session="b" * 43,
            iss="https://ehr.example.org/fhir",
            code_verifier="v" * 43,
            redirect_uri="https://testserver/callback",
            ttl_seconds=60,
            now=long_ago,
        )
    for _ in range(2):
        save_session(
            db,
            cipher,
            browser_session="b" * 43,
            iss="https://ehr.example.org/fhir",
            patient_id="p-1",
            encounter_id=None,
            fhir_user="Practitioner/1",
            scope="launch",
            need_patient_banner=False,
            token_set={"access_token": "t"},
            ttl_seconds=300,
            now=long_ago,
        )


async def test_the_service_purges_expired_states_and_sessions_on_its_own(tmp_path: Path) -> None:
    settings = app_settings(tmp_path, api={"purge_interval_seconds": 1})
    async with running_app(settings) as (_client, app):
        runtime = app.state.runtime
        _expired_rows(runtime.db, runtime.cipher)
        assert (count(app, LaunchState), count(app, AppSession)) == (3, 2)
        for _ in range(100):  # the next round is at most a second away
            if count(app, LaunchState) + count(app, AppSession) == 0:
                break
            await asyncio.sleep(0.05)
        assert (count(app, LaunchState), count(app, AppSession)) == (0, 0)


def test_db_purge_deletes_expired_states_and_sessions_and_says_how_many(tmp_path: Path) -> None:
    settings = app_settings(tmp_path)
    store = open_store(settings)
    try:
        _expired_rows(store.sessions, TokenCipher(settings.smart.session_secret.get_secret_value()))
        create_state(
            store.sessions,
            browser_session="b" * 43,
            iss="https://ehr.example.org/fhir",
            code_verifier="v" * 43,
            redirect_uri="https://testserver/callback",
        )
    finally:
        store.close()
    result = CliRunner().invoke(cli, ["db", "purge", "--db-url", settings.db.url])
    assert result.exit_code == 0, result.output
    assert "purged 3 sign-in states and 2 sessions" in result.output
    again = CliRunner().invoke(cli, ["db", "purge", "--db-url", settings.db.url])
    assert "purged 0 sign-in states and 0 sessions" in again.output  # the live state stays
