"""The web service's defences against a hostile browser or network: ids checked whole, cookies that
no sibling host can plant, a browser id the caller cannot choose, HSTS and no API docs in production.

The EHR here is the test authorization server (tests/smart_ehr) with no FHIR server behind it: the
launches ask for no patient banner, so nothing reads the record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select

from service.db.models import LaunchState
from tests.api.conftest import NO_FHIR, REDIRECT_URI, app_settings, authorize, running_app
from tests.smart_ehr.server import TestEhr

# A development deployment on loopback: plain http, so the cookies keep their bare names.
DEV_BASE = "http://127.0.0.1:8000"
SECRET = "s" * 48


@pytest.fixture(scope="module")
def ehr() -> Iterator[TestEhr]:
    with TestEhr(NO_FHIR, redirect_uris=[REDIRECT_URI, f"{DEV_BASE}/callback"]) as server:
        yield server


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """The response's Set-Cookie headers by cookie name (the whole header, lower-cased)."""
    return {h.split("=", 1)[0]: h.lower() for h in response.headers.get_list("set-cookie")}


def browser_cookie_value(response: httpx.Response) -> str | None:
    """The browser id a response sets, under either cookie name."""
    for header in response.headers.get_list("set-cookie"):
        name, rest = header.split("=", 1)
        if name in ("cb_browser", "__Host-cb_browser"):
            return rest.split(";", 1)[0]
    return None


async def sign_in(client: httpx.AsyncClient, ehr: TestEhr) -> tuple[httpx.Response, httpx.Response]:
    """/launch -> the EHR's authorize -> /callback; the /launch and /callback answers."""
    launch = ehr.launch("p-1", need_patient_banner=False)
    started = await client.get("/launch", params={"iss": ehr.base_url, "launch": launch})
    assert started.status_code == 302, started.text
    callback = urlsplit(await authorize(started.headers["location"]))
    done = await client.get(f"{callback.path}?{callback.query}")
    assert done.status_code == 303, done.text
    return started, done


def production(tmp_path: Path, ehr: TestEhr | None = None, **sections: Any) -> Any:
    smart = {"session_secret": SECRET, **sections.pop("smart", {})}
    return app_settings(tmp_path, ehr, environment="production", smart=smart, **sections)


# -- ids are checked whole ----------------------------------------------------------------------


async def test_a_document_id_followed_by_a_newline_is_refused_with_400(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, _app):
        await sign_in(client, ehr)
        page = await client.get("/review?doc=abc%0A")
        assert page.status_code == 400, page.text
        assert "doc is not a valid FHIR id" in page.text
        form = {"document_reference": "abc\n", "version": "1", "csrf_token": "unused"}
        action = await client.post("/review/approve", data=form)
        assert action.status_code == 400, action.text
        assert "document_reference is not a valid FHIR id" in action.text


# -- cookies ------------------------------------------------------------------------------------


async def test_over_https_the_cookies_carry_the_host_prefix_secure_path_and_no_domain(
    ehr: TestEhr, tmp_path: Path
) -> None:
    async with running_app(app_settings(tmp_path, ehr)) as (client, _app):
        started, done = await sign_in(client, ehr)
        cookies = {**set_cookies(started), **set_cookies(done)}
        assert {"__Host-cb_browser", "__Host-cb_session"} <= set(cookies)
        assert "cb_browser" not in cookies and "cb_session" not in cookies
        for name in ("__Host-cb_browser", "__Host-cb_session"):
            attributes = [a.strip() for a in cookies[name].split(";")]
            assert "secure" in attributes and "path=/" in attributes and "httponly" in attributes
            assert not any(a.startswith("domain=") for a in attributes)
        assert (await client.get("/review")).status_code == 200
        # The same values under the bare names (as a sibling host could set them) open nothing.
        planted = {
            "cb_browser": client.cookies["__Host-cb_browser"],
            "cb_session": client.cookies["__Host-cb_session"],
        }
        client.cookies.clear()
        for name, value in planted.items():
            client.cookies.set(name, value)
        assert (await client.get("/review")).status_code == 401


async def test_over_plain_http_in_development_the_bare_cookie_names_work(
    ehr: TestEhr, tmp_path: Path
) -> None:
    settings = app_settings(tmp_path, ehr, smart={"public_base_url": DEV_BASE})
    async with running_app(settings) as (client, _app):
        started, done = await sign_in(client, ehr)
        assert "cb_browser" in set_cookies(started) and "cb_session" in set_cookies(done)
        assert not any(name.startswith("__Host-") for name in {**set_cookies(started), **set_cookies(done)})
        assert (await client.get("/review")).status_code == 200


async def test_launch_mints_a_new_browser_id_even_when_the_browser_sends_one(
    ehr: TestEhr, tmp_path: Path
) -> None:
    planted = "attacker-known-browser-id-0123456789abcdef"
    async with running_app(app_settings(tmp_path, ehr)) as (client, app):
        # Both names: whichever the service reads, the value is one the attacker chose.
        client.cookies.set("__Host-cb_browser", planted)
        client.cookies.set("cb_browser", planted)
        launch = ehr.launch("p-1", need_patient_banner=False)
        started = await client.get("/launch", params={"iss": ehr.base_url, "launch": launch})
        assert started.status_code == 302, started.text
        with app.state.runtime.db() as s:
            (row,) = s.scalars(select(LaunchState)).all()
        assert row.browser_session_hash != hashlib.sha256(planted.encode()).hexdigest()
        minted = browser_cookie_value(started)
        assert minted is not None and minted != planted
        assert row.browser_session_hash == hashlib.sha256(minted.encode()).hexdigest()


# -- production -----------------------------------------------------------------------------------


async def test_production_answers_carry_hsts_and_development_answers_do_not(tmp_path: Path) -> None:
    (tmp_path / "prod").mkdir()
    async with running_app(production(tmp_path / "prod")) as (client, _app):
        prod = [await client.get(path) for path in ("/healthz", "/review", "/api/summaries/unknown")]
    (tmp_path / "dev").mkdir()
    async with running_app(app_settings(tmp_path / "dev")) as (client, _app):
        dev = await client.get("/healthz")
    for response in prod:
        hsts = response.headers["strict-transport-security"]
        assert "max-age=" in hsts and int(hsts.split("max-age=")[1].split(";")[0]) >= 31536000
    assert "strict-transport-security" not in dev.headers


@pytest.mark.parametrize(
    ("environment", "docs_enabled", "served"),
    [
        ("production", None, False),
        ("production", True, True),
        ("development", None, True),
        ("development", False, False),
    ],
)
async def test_api_docs_are_off_in_production_unless_turned_on(
    tmp_path: Path, environment: str, docs_enabled: bool | None, served: bool
) -> None:
    api = {} if docs_enabled is None else {"docs_enabled": docs_enabled}
    settings = (
        production(tmp_path, api=api) if environment == "production" else app_settings(tmp_path, api=api)
    )
    async with running_app(settings) as (client, _app):
        docs = await client.get("/docs")
        schema = await client.get("/openapi.json")
    expected = 200 if served else 404
    assert (docs.status_code, schema.status_code) == (expected, expected)
    if served:
        assert "/api/summaries" in schema.json()["paths"]
