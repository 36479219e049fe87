"""The active model as operators and clinicians see it: name, quantization and sha256 prefix in `/readyz`
and on the review screen, never a path or a file name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from service.dev.sandbox import LoadedPatient
from service.llm.fake import FAKE_IDENTITY, FakeEngine
from tests.api.conftest import REDIRECT_URI, app_settings, launch_session, running_app
from tests.smart_ehr.server import TestEhr

IDENTITY = replace(
    FAKE_IDENTITY,
    name="SmolLM2-135M-Instruct",
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    quantization="Q4_1",
    sha256="1a2b3c4d5e6f" + "7" * 52,
)
LINE = "SmolLM2-135M-Instruct Q4_1 · sha256 1a2b3c4d5e6f"


async def test_readyz_names_the_model_by_name_quantization_and_sha256_prefix_never_its_file(
    tmp_path: Path,
) -> None:
    async with running_app(app_settings(tmp_path), engine=FakeEngine(IDENTITY)) as (client, _app):
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"] == {
        "name": "SmolLM2-135M-Instruct",
        "quantization": "Q4_1",
        "sha256": "1a2b3c4d5e6f",
    }
    body = json.dumps(ready.json())
    assert ".gguf" not in body and "/" not in body and "7" * 52 not in body


@pytest.fixture(scope="module")
def ehr_fhir(fhir_base: str) -> Iterator[TestEhr]:
    with TestEhr(fhir_base, redirect_uris=[REDIRECT_URI]) as server:
        yield server


@pytest.mark.integration
async def test_the_review_screen_shows_the_active_model(
    ehr_fhir: TestEhr, tmp_path: Path, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = next(iter(loaded_patients.values())).id
    async with running_app(app_settings(tmp_path, ehr_fhir), engine=FakeEngine(IDENTITY)) as (client, _app):
        await launch_session(client, ehr_fhir, patient)
        page = await client.get("/review")
    assert page.status_code == 200, page.text
    assert f"Model: {LINE}" in page.text
    assert ".gguf" not in page.text
