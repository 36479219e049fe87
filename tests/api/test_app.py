"""The app as operators and other programs meet it: health, readiness, docs, headers, error bodies."""

from __future__ import annotations

import asyncio
import typing
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.api import create_app
from service.config import PLACEHOLDER_SESSION_SECRET, Settings
from service.db import apikeys
from tests.api.conftest import app_settings, running_app


async def test_healthz_answers_and_readyz_is_ready_with_the_database_and_a_model(tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path)) as (client, _app):
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "model": "loaded"}
    assert set(ready.json()["model"]) == {"name", "quantization", "sha256"}  # never a path or file name


async def test_readyz_is_not_ready_and_says_why_when_the_model_cannot_load(tmp_path: Path) -> None:
    settings = app_settings(
        tmp_path,
        llm={"model_path": str(tmp_path / "absent.gguf")},
        fhir={"base_url": "http://127.0.0.1:9/fhir"},
    )
    async with running_app(settings, load_model=True) as (client, app):
        assert (await client.get("/healthz")).status_code == 200
        for _ in range(200):
            ready = await client.get("/readyz")
            if ready.json()["checks"]["model"] != "loading":
                break
            await asyncio.sleep(0.05)
        assert ready.status_code == 503
        assert ready.json()["checks"]["model"] == "failed"
        # Why, for an operator, without the path or file name, to anyone who asks.
        assert "CHARTBRIEF_LLM__" in ready.json()["reason"]
        assert "absent.gguf" not in ready.text and str(tmp_path) not in ready.text
        # The API says the same to a caller, as an OperationOutcome.
        _key_id, secret = apikeys.create(app.state.runtime.db, "ehr-batch", ["summaries.write"])
        refused = await client.post(
            "/api/summaries", json={"patient": "p1"}, headers={"Authorization": f"Bearer {secret}"}
        )
        assert refused.status_code == 503
        assert refused.json()["issue"][0]["code"] == "transient"
        assert "model could not be loaded" in refused.json()["issue"][0]["diagnostics"]


async def test_readyz_fails_when_the_database_is_gone(tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path)) as (client, app):
        app.state.runtime.store.engine.dispose()
        (tmp_path / "chartbrief.db").unlink()
        (tmp_path / "chartbrief.db").mkdir()  # a directory where the file was: unopenable
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == "unreachable"


async def test_openapi_docs_are_served_and_list_the_rest_api(tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path)) as (client, _app):
        docs = await client.get("/docs")
        schema = (await client.get("/openapi.json")).json()
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert {
        "/api/summaries",
        "/api/summaries/{job_id}",
        "/api/patients/{patient_id}/summaries/latest",
    } <= set(schema["paths"])
    assert "/review/approve" not in schema["paths"]  # browser forms are not an API


async def test_every_response_carries_the_security_headers(tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path)) as (client, _app):
        page = await client.get("/review")  # an HTML page (the "launch first" page)
        api = await client.get("/api/summaries/unknown")
        static = await client.get("/static/review.js")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors" in csp
    for response in (page, api, static):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
        assert response.headers["x-request-id"]
    assert page.headers["cache-control"] == "no-store" and api.headers["cache-control"] == "no-store"
    assert api.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert static.status_code == 200 and "EventSource" in static.text


async def test_the_review_page_has_no_inline_script(tmp_path: Path) -> None:
    from service.api.deps import TEMPLATES_DIR

    for template in TEMPLATES_DIR.glob("*.html"):
        text = template.read_text()
        assert "<script>" not in text and " on" + "click=" not in text, template.name
        for tag in text.split("<script")[1:]:
            assert "src=" in tag.split(">")[0], template.name


async def test_api_errors_are_operation_outcomes_with_the_right_status(tmp_path: Path) -> None:
    async with running_app(app_settings(tmp_path)) as (client, _app):
        missing = await client.get("/api/nothing-here")
        unauthenticated = await client.post("/api/summaries", json={"patient": "p1"})
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/fhir+json")
    assert missing.json()["resourceType"] == "OperationOutcome"
    assert missing.json()["issue"][0]["code"] == "not-found"
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["issue"][0]["code"] == "login"
    assert unauthenticated.headers["www-authenticate"].startswith("Bearer")


def test_production_refuses_the_placeholder_session_secret(tmp_path: Path) -> None:
    base = {"environment": "production", "db": {"url": f"sqlite:///{tmp_path}/x.db"}}
    with pytest.raises(ValueError, match="CHARTBRIEF_SMART__SESSION_SECRET"):
        create_app(Settings.model_validate(base))
    short = Settings.model_validate({**base, "smart": {"session_secret": "too-short"}})
    with pytest.raises(ValueError, match="CHARTBRIEF_SMART__SESSION_SECRET"):
        create_app(short)
    good = Settings.model_validate({**base, "smart": {"session_secret": "r" * 48}})
    assert good.smart.session_secret != SecretStr(PLACEHOLDER_SESSION_SECRET)
    create_app(good)


def test_production_refuses_plain_http_for_the_app_and_the_ehrs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PUBLIC_BASE_URL must use https"):
        Settings.model_validate(
            {"environment": "production", "smart": {"public_base_url": "http://cb.example.org"}}
        )
    with pytest.raises(ValueError, match="ALLOWED_ISSUERS"):
        Settings.model_validate(
            {"environment": "production", "smart": {"allowed_issuers": ["http://ehr.example.org/fhir"]}}
        )


def test_a_standalone_issuer_must_be_on_the_allow_list() -> None:
    with pytest.raises(ValueError, match="STANDALONE_ISSUER"):
        Settings.model_validate({"smart": {"standalone_issuer": "https://ehr.example.org/fhir"}})


def test_serve_refuses_to_start_in_production_with_the_placeholder_secret(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from service.cli.serve import serve

    env = {"CHARTBRIEF_ENVIRONMENT": "production", "CHARTBRIEF_DB__URL": f"sqlite:///{tmp_path}/x.db"}
    result = CliRunner().invoke(serve, ["--port", "0"], env=env)
    assert result.exit_code == 2
    assert "CHARTBRIEF_SMART__SESSION_SECRET" in result.output


def test_no_route_takes_the_whole_runtime(tmp_path: Path) -> None:
    from fastapi.routing import APIRoute

    from service.api.deps import Runtime

    app = create_app(app_settings(tmp_path))
    for route in app.routes:
        if isinstance(route, APIRoute):
            hints = typing.get_type_hints(route.endpoint, include_extras=True)
            taken = [
                typing.get_args(h)[0] if typing.get_origin(h) is typing.Annotated else h
                for h in hints.values()
            ]
            assert Runtime not in taken, f"{route.path} takes the whole Runtime"
