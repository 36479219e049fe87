"""Shared fixtures: one real FHIR R4 server per test session, with the Synthea fixtures loaded.

`fhir_base` is `CHARTBRIEF_TEST_FHIR_BASE` when set (HAPI or any other R4 server; nothing here
assumes sekmet), else a local sekmet server started for the session and stopped at its end.
`loaded_patients` loads every bundle in tests/fixtures/synthea into that server once.

Every test starts from a clean environment (`clean_environment`): no `CHARTBRIEF_*` setting of
the shell running the tests reaches it (only the `CHARTBRIEF_TEST_*` knobs of the tests
themselves), and the database a default `Settings()` opens is a file in the test's own folder.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from fhir_adapters.client import FhirClient
from service.dev.devserver import (
    LOAD_TIMEOUT_SECONDS,
    LocalFhirServer,
    LocalFhirServerError,
    synthea_files,
)
from service.dev.sandbox import LoadedPatient, LoadFailure, load_files

pytest_plugins = ["tests.phi_scan", "pytester"]

EXTERNAL_BASE_ENV = "CHARTBRIEF_TEST_FHIR_BASE"
TEST_KNOBS = "CHARTBRIEF_TEST_"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Settings come from the test, never from the shell: strip `CHARTBRIEF_*` (the tests' own
    `CHARTBRIEF_TEST_*` knobs aside) and point the default database at a private folder."""
    for name in list(os.environ):
        if name.startswith("CHARTBRIEF_") and not name.startswith(TEST_KNOBS):
            monkeypatch.delenv(name)
    home = tmp_path_factory.mktemp("chartbrief-home")
    monkeypatch.setenv("CHARTBRIEF_DB__URL", f"sqlite:///{home / 'chartbrief.db'}")

T = TypeVar("T")


def run_in_private_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion in a loop of its own, leaving the test loops untouched."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@pytest.fixture(scope="session")
def fhir_base() -> Iterator[str]:
    external = os.environ.get(EXTERNAL_BASE_ENV, "").strip()
    if external:
        yield external.rstrip("/")
        return
    server = LocalFhirServer()
    try:
        server.start()
    except LocalFhirServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server.base_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def loaded_patients(fhir_base: str) -> dict[str, LoadedPatient]:
    """The fixture bundles loaded once per session, keyed by file name; fails if any did not load."""
    files = synthea_files()
    failures: list[LoadFailure] = []

    async def load() -> list[LoadedPatient]:
        async with FhirClient(fhir_base, timeout=LOAD_TIMEOUT_SECONDS) as client:
            return await load_files(client, files, failures=failures)

    loaded = run_in_private_loop(load())
    if failures:
        details = "\n".join(f"  {f.source_file}: {f.reason}" for f in failures)
        pytest.fail(
            f"{len(failures)} of {len(files)} Synthea fixtures did not load:\n{details}", pytrace=False
        )
    return {p.source_file: p for p in loaded}
