"""Schemathesis over the OpenAPI of the web service: no 500, every API error an OperationOutcome.

The app is `create_app(settings)` as `chartbrief serve` builds it, with a FakeEngine, the API's FHIR
server the real local one (tests/conftest.py) and bearer JWTs from a test EHR (tests/smart_ehr).
Every generated case is sent three times: without credentials, with a chartbrief API key and with
a system-level JWT, so the checks run both in front of and behind authentication. Routes outside
`/api` (the launch, the review screen) may answer HTML, but never 500.

The figures (cases and calls per kind of caller) are printed in the terminal summary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import settings
from schemathesis.python import asgi

from service.api import create_app
from service.config import Settings
from service.db import apikeys
from service.llm.fake import FakeEngine
from tests.robustness.conftest import FIGURES, PROFILE
from tests.smart_ehr.server import TestEhr

APP_BASE = "https://testserver"
NO_FHIR = "http://127.0.0.1:9/fhir"
ERROR_TYPES = ("application/fhir+json", "application/json")

pytestmark = pytest.mark.integration


def fuzz_settings(folder: Path, ehr_base: str, jwks_url: str, fhir_base: str) -> Settings:
    return Settings.model_validate(
        {
            "db": {"url": f"sqlite:///{folder}/chartbrief.db"},
            "smart": {"public_base_url": APP_BASE, "allowed_issuers": [ehr_base]},
            "api": {"jwt_issuer": ehr_base, "jwks_url": jwks_url},
            "fhir": {"base_url": fhir_base, "max_attempts": 1},
            "prompt": "summary/v1",
        }
    )


# The operations are known at collection time: the spec of an app that is never started (building
# it opens nothing). The calls go to the app of the `fuzzed` fixture, built with the same settings.
schema = schemathesis.openapi.from_dict(
    create_app(
        fuzz_settings(Path("/nonexistent"), "https://ehr.invalid/fhir", "https://ehr.invalid/jwks", NO_FHIR)
    ).openapi()
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, fhir_base: str) -> Iterator[dict[str, Any]]:
    """The app behind schemathesis' in-process ASGI client (its lifespan run), one header set per caller."""
    folder: Path = tmp_path_factory.mktemp("fuzz")
    with TestEhr(NO_FHIR, redirect_uris=[f"{APP_BASE}/callback"]) as ehr:
        engine = FakeEngine()
        app = create_app(fuzz_settings(folder, ehr.base_url, ehr.jwks_url, fhir_base), engine=engine)
        with asgi.ASGIClient(app) as client:
            _key_id, secret = apikeys.create(
                app.state.runtime.db, "fuzz", ["summaries.read", "summaries.write"]
            )
            jwt = ehr.issue_token(
                scope="system/DocumentReference.rs system/DocumentReference.c",
                audience=APP_BASE,
                subject="fuzz",
            )
            callers = {
                "anonymous": {},
                "api-key": {"Authorization": f"Bearer {secret}"},
                "jwt": {"Authorization": f"Bearer {jwt}"},
            }
            try:
                yield {"client": client, "callers": callers, "engine": engine}
            finally:
                asgi.shutdown_lifespans()


def problems_of(path: str, response: Any) -> list[str]:
    """What is wrong with one answer (empty when it is fine)."""
    status = response.status_code
    found = []
    if status == 500:
        found.append("500")
    if path.startswith("/api") and status >= 400:
        content_type = (response.headers.get("content-type") or [""])[0]
        if not content_type.startswith(ERROR_TYPES):
            found.append(f"{status} with content type {content_type!r}")
        else:
            try:
                body = json.loads(response.content)
            except ValueError:
                body = None
            if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
                found.append(f"{status} that is not an OperationOutcome")
    return found


@schema.parametrize()
@settings(PROFILE)
def test_no_request_gets_a_500_and_every_api_error_is_an_operation_outcome(
    case: Any, fuzzed: dict[str, Any]
) -> None:
    FIGURES["fuzz: api cases generated"] += 1
    # A FakeEngine without scripted outputs answers every summary with an empty claim list.
    fuzzed["engine"].enqueue('{"claims": []}')
    failures = []
    for caller, headers in fuzzed["callers"].items():
        response = case.call(
            base_url="http://testserver", session=fuzzed["client"], headers=headers, timeout=20
        )
        FIGURES[f"fuzz: api calls ({caller})"] += 1
        if response.status_code >= 500:
            FIGURES["fuzz: api 5xx answers"] += 1
        for problem in problems_of(case.path, response):
            failures.append(f"{caller}: {case.method} {case.formatted_path}: {problem}")
    assert not failures, "\n".join(failures) + "\nreproduce with: " + case.as_curl_command()
