"""Fixtures for the web service: a running app behind httpx's ASGI transport, and a test EHR.

`TestEhr` (tests/smart_ehr) is a real SMART authorization server on a loopback port; here its FHIR
proxy points at a closed port unless a test needs the real FHIR server (tests/integration fixtures).
The app is reached as https://testserver so its Secure cookies travel like in a browser.
`fhir_base` / `loaded_patients` are the integration fixtures, imported here to be shared.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from service.api import create_app
from service.config import Settings
from service.llm.base import Engine
from service.llm.fake import FAKE_IDENTITY, FakeEngine
from tests.smart_ehr.server import TestEhr

APP_BASE = "https://testserver"
REDIRECT_URI = f"{APP_BASE}/callback"
# Nothing listens here: an EHR whose FHIR server is never reached in a test.
NO_FHIR = "http://127.0.0.1:9/fhir"


@pytest.fixture(scope="module")
def ehr() -> Iterator[TestEhr]:
    with TestEhr(NO_FHIR, redirect_uris=[REDIRECT_URI]) as server:
        yield server


def app_settings(tmp_path: Path, ehr: TestEhr | None = None, **sections: Any) -> Settings:
    smart: dict[str, Any] = {"public_base_url": APP_BASE}
    if ehr is not None:
        smart["allowed_issuers"] = [ehr.base_url]
    smart.update(sections.pop("smart", {}))
    # The scripted engines here answer as the record-wide prompt asks (claims citing coded keys such
    # as A1), and the test patients have few or no notes: these tests are about the app, not about
    # which prompt writes the narrative (tests/service/test_narrative.py is).
    data: dict[str, Any] = {
        "db": {"url": f"sqlite:///{tmp_path}/chartbrief.db"},
        "smart": smart,
        "prompt": "summary/v1",
    }
    data.update(sections)
    return Settings.model_validate(data)


@asynccontextmanager
async def running_app(
    settings: Settings, *, engine: Engine | None = None, load_model: bool = False
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app with its lifespan run, and an httpx client that talks to it in-process.

    Without `engine` a FakeEngine stands in, unless `load_model` asks the app to load the model
    from its settings itself."""
    if engine is None and not load_model:
        engine = FakeEngine()
    app = create_app(settings, engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=APP_BASE) as client:
            yield client, app


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def authorize(location: str) -> str:
    """Follow the app's authorize redirect at the test EHR; return where the EHR sends the browser."""
    async with httpx.AsyncClient() as browser:
        answer = await browser.get(location)
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


async def launch_session(client: httpx.AsyncClient, ehr: TestEhr, patient_id: str, **launch: Any) -> None:
    """A whole EHR launch: /launch -> EHR authorize -> /callback; leaves the session cookie set."""
    params = {"iss": ehr.base_url, "launch": ehr.launch(patient_id, **launch)}
    started = await client.get("/launch", params=params)
    assert started.status_code == 302, started.text
    callback = await authorize(started.headers["location"])
    path = urlsplit(callback)
    done = await client.get(f"{path.path}?{path.query}")
    assert done.status_code == 303, done.text


def scripted_engine(tag: str, *outputs: str) -> FakeEngine:
    """A FakeEngine with its own identity: drafts written in one test never share an idempotency key
    with another test's (the FHIR server is shared by the whole session)."""
    engine = FakeEngine(identity=replace(FAKE_IDENTITY, sampling=f"{FAKE_IDENTITY.sampling} test={tag}"))
    for output in outputs:
        engine.enqueue(output)
    return engine


async def read_events(client: httpx.AsyncClient, url: str) -> list[tuple[str, dict[str, Any]]]:
    """Every server-sent event of a stream, as (event name, decoded JSON data)."""
    events: list[tuple[str, dict[str, Any]]] = []
    async with client.stream("GET", url) as response:
        assert response.status_code == 200, await response.aread()
        name = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ").strip()
            elif line.startswith("data: ") and name:
                events.append((name, json.loads(line.removeprefix("data: "))))
                name = None
    return events


def form_field(html: str, name: str) -> str:
    """The value of a hidden form field in rendered HTML."""
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match is not None, f"no form field {name!r}"
    return match.group(1)
