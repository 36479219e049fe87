"""The nightly batch against a real FHIR R4 server (one process, SQLite).

Each test gets its own local server with every Synthea fixture loaded, because it changes records
and counts the summaries on the server. What is checked on the server is what matters to the EHR:
every patient ends with exactly one current chartbrief DocumentReference, and no idempotency key
is ever written twice, whatever was killed on the way.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters.auth.oauth import generate_key
from fhir_adapters.auth.scopes import DEFAULT_SYSTEM_SCOPES
from fhir_adapters.client import FhirClient
from service.batch import BatchRequest, run_batch
from service.batch.connect import open_fhir
from service.batch.selection import since_with_overlap
from service.config import BackendSettings, Settings
from service.db.batch import DONE, OPEN_STATES, BatchRepository
from service.dev.devserver import (
    LOAD_TIMEOUT_SECONDS,
    REPO_ROOT,
    LocalFhirServer,
    LocalFhirServerError,
    synthea_files,
)
from service.dev.sandbox import LoadedPatient, LoadFailure, load_files
from service.llm.base import Generation, GenerationRequest
from service.llm.fake import FakeEngine
from tests.integration.conftest import run_in_private_loop

pytestmark = pytest.mark.integration

SUMMARY_SYSTEM = "urn:chartbrief:summary"
NO_CLAIMS = '{"claims": []}'
RUN_TIMEOUT_SECONDS = 900


# -- helpers shared with the PostgreSQL test --------------------------------------------------------


def start_loaded_server(
    overrides: dict[str, Any] | None = None,
) -> tuple[LocalFhirServer, list[LoadedPatient]]:
    """A fresh local FHIR server with every Synthea fixture loaded."""
    server = LocalFhirServer(overrides=overrides)
    try:
        server.start()
    except LocalFhirServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    failures: list[LoadFailure] = []

    async def load() -> list[LoadedPatient]:
        async with FhirClient(server.base_url, timeout=LOAD_TIMEOUT_SECONDS) as client:
            return await load_files(client, synthea_files(), failures=failures)

    try:
        loaded = run_in_private_loop(load())
    except BaseException:
        server.stop()
        raise
    if failures:
        server.stop()
        pytest.fail(f"fixtures did not load: {[f.source_file for f in failures]}", pytrace=False)
    return server, loaded


def summaries_by_patient(fhir_base: str, patient_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every DocumentReference chartbrief wrote for each patient (any status)."""

    async def read() -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        async with FhirClient(fhir_base) as client:
            for pid in patient_ids:
                docs = await client.search_all("DocumentReference", {"subject": f"Patient/{pid}"})
                found[pid] = [
                    d for d in docs if any(i.get("system") == SUMMARY_SYSTEM for i in d.get("identifier", []))
                ]
        return found

    return run_in_private_loop(read())


def keys_of(docs: list[dict[str, Any]]) -> list[str]:
    return [i["value"] for d in docs for i in d["identifier"] if i.get("system") == SUMMARY_SYSTEM]


def batch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli.batch", *args]


def subprocess_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTBRIEF_")}
    env.update(settings)
    env["CHARTBRIEF_LOG_FORMAT"] = "json"
    return env


# -- one process, in-process API ------------------------------------------------------------------


@pytest.fixture
def loaded_server() -> Iterator[tuple[str, list[LoadedPatient]]]:
    server, loaded = start_loaded_server()
    try:
        yield server.base_url, loaded
    finally:
        server.stop()


def _settings(fhir_base: str, tmp_path: Path, **batch: Any) -> Settings:
    return Settings(
        fhir={"base_url": fhir_base},  # type: ignore[arg-type]
        db={"url": f"sqlite:///{tmp_path}/cb.db"},  # type: ignore[arg-type]
        batch={"retry_wait_seconds": 1, "heartbeat_seconds": 1, **batch},  # type: ignore[arg-type]
        # The record-wide prompt: one scripted answer per patient, whatever notes each has.
        prompt="summary/v1",
    )


def _scripted_engine(outputs: int) -> FakeEngine:
    engine = FakeEngine()
    for _ in range(outputs):
        engine.enqueue(NO_CLAIMS)
    return engine


def _touch_a_condition(fhir_base: str, patient_id: str) -> None:
    async def touch() -> None:
        async with FhirClient(fhir_base) as client:
            # A new version of a Condition, or of the Patient for a record without conditions.
            conditions = await client.search_all("Condition", {"patient": patient_id}, limit=1)
            if conditions:
                conditions[0].setdefault("note", []).append({"text": "Reviewed at the quarterly visit."})
                await client.update(conditions[0])
            else:
                patient = await client.read("Patient", patient_id)
                touched = {"url": "urn:chartbrief:test:touched", "valueBoolean": True}
                patient.setdefault("extension", []).append(touched)
                await client.update(patient)

    run_in_private_loop(touch())


def test_first_run_summarizes_everyone_then_only_what_changed(
    loaded_server: tuple[str, list[LoadedPatient]], tmp_path: Path
) -> None:
    fhir_base, loaded = loaded_server
    everyone = sorted(p.id for p in loaded)
    settings = _settings(fhir_base, tmp_path)
    engine = _scripted_engine(len(everyone) + 2)

    first = run_in_private_loop(run_batch(settings, BatchRequest(), engine=engine)).last
    assert first is not None
    assert (first.selected, first.summarized, first.failed) == (len(everyone), len(everyone), 0)
    assert first.since is None and first.watermark is not None
    docs = summaries_by_patient(fhir_base, everyone)
    assert {pid: len(d) for pid, d in docs.items()} == dict.fromkeys(everyone, 1)

    generated = len(engine.history)
    quiet = run_in_private_loop(run_batch(settings, BatchRequest(), engine=engine)).last
    assert quiet is not None
    since = since_with_overlap(first.watermark, settings.batch.watermark_overlap_seconds)
    assert (quiet.summarized, quiet.failed, quiet.since) == (0, 0, since)
    assert len(engine.history) == generated, "nothing changed: no generation"

    touched = sorted(everyone[:2])
    for pid in touched:
        _touch_a_condition(fhir_base, pid)
    second = run_in_private_loop(run_batch(settings, BatchRequest(), engine=engine)).last
    assert second is not None
    assert (second.summarized, second.failed) == (2, 0)
    repo = BatchRepository.from_url(settings.db.url)
    try:
        done = sorted(i.patient_id for i in repo.items(second.run) if i.state == DONE)
    finally:
        repo.close()
    assert done == touched
    after = summaries_by_patient(fhir_base, everyone)
    for pid in everyone:
        current = [d for d in after[pid] if d["status"] == "current"]
        assert len(current) == 1, f"Patient/{pid} must have one current summary"
        assert len(after[pid]) == (2 if pid in touched else 1)
        assert len(set(keys_of(after[pid]))) == len(after[pid]), "no key written twice"


def test_patients_file_and_failures_are_reported_with_reasons(
    loaded_server: tuple[str, list[LoadedPatient]], tmp_path: Path
) -> None:
    fhir_base, loaded = loaded_server
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{loaded[0].id}\nno-such-patient\n# a comment\nnot valid!\n")
    settings = _settings(fhir_base, tmp_path)
    report = run_in_private_loop(
        run_batch(settings, BatchRequest(patients_file=ids), engine=_scripted_engine(2))
    ).last
    assert report is not None
    assert (report.selected, report.summarized, report.failed, report.selection_problems) == (2, 1, 1, 1)
    (failure,) = report.failures
    assert failure.patient == "no-such-patient"
    assert failure.reason.startswith("FhirNotFound")
    assert failure.attempts == 1, "a missing patient is not retried"


def test_bulk_export_selects_everyone_first_then_only_the_changed_patients(
    loaded_server: tuple[str, list[LoadedPatient]], tmp_path: Path
) -> None:
    fhir_base, loaded = loaded_server
    settings = _settings(fhir_base, tmp_path)
    engine = _scripted_engine(len(loaded) + 2)
    first = run_in_private_loop(run_batch(settings, BatchRequest(bulk=True), engine=engine)).last
    assert first is not None
    assert (first.selection, first.selected, first.summarized, first.failed) == (
        "bulk",
        len(loaded),
        len(loaded),
        0,
    )
    assert first.transaction_time is not None

    touched = loaded[0].id
    _touch_a_condition(fhir_base, touched)
    second = run_in_private_loop(run_batch(settings, BatchRequest(bulk=True), engine=engine)).last
    assert second is not None
    # `_since` is the last export's transactionTime; the summaries written since are chartbrief's own.
    assert second.since == first.transaction_time
    repo = BatchRepository.from_url(settings.db.url)
    try:
        assert [i.patient_id for i in repo.items(second.run)] == [touched]
    finally:
        repo.close()
    assert second.summarized == 1


# The batch's default scopes, plus what this test server asks for a transaction: it authorizes
# `POST [base]` as a whole (a create on `*`), not entry by entry as an EHR does.
BATCH_SCOPE = f"{DEFAULT_SYSTEM_SCOPES} system/*.c"


class PausingEngine(FakeEngine):
    """A scripted engine whose every answer takes `pause` seconds, like a slow model."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    async def generate(self, request: GenerationRequest) -> Generation:
        await asyncio.sleep(self.pause)
        return await super().generate(request)


def test_a_batch_authenticates_with_backend_services_and_outlives_its_tokens(tmp_path: Path) -> None:
    pem, jwk = generate_key("ES384")
    key_file = tmp_path / "backend.pem"
    key_file.write_bytes(pem)
    token_lifetime = 2
    client = {"client_id": "chartbrief-batch", "jwks": {"keys": [jwk]}, "scopes": "system/*.*"}
    overrides = {
        "server_auth": {"types": ["smart"], "smart_clients": [client], "token_lifetime": token_lifetime}
    }
    small = [p for p in synthea_files() if p.name.startswith(("Kermit", "Luigi"))]
    with LocalFhirServer(overrides=overrides) as server:
        settings = _settings(server.base_url, tmp_path).model_copy(
            update={
                "backend": BackendSettings(
                    client_id="chartbrief-batch", private_key_path=key_file, alg="ES384", scope=BATCH_SCOPE
                )
            }
        )

        async def load() -> None:
            # Loading writes every resource type: a wider scope than the batch asks for.
            loader = settings.model_copy(
                update={"backend": settings.backend.model_copy(update={"scope": "system/*.*"})}
            )
            async with open_fhir(loader) as conn:
                assert len(await load_files(conn.client, small)) == len(small)

        run_in_private_loop(load())
        # Each generation outlasts a token: the run only ends well if tokens are renewed mid-run.
        engine = PausingEngine(pause=token_lifetime * 1.5)
        for _ in range(len(small) + 1):
            engine.enqueue(NO_CLAIMS)
        report = run_in_private_loop(run_batch(settings, BatchRequest(), engine=engine)).last
    assert report is not None
    assert (report.selected, report.summarized, report.failed) == (len(small), len(small), 0)


# -- a real process, killed ------------------------------------------------------------------------


@pytest.mark.model
def test_a_run_killed_midway_resumes_and_writes_every_summary_exactly_once(
    loaded_server: tuple[str, list[LoadedPatient]], tmp_path: Path
) -> None:
    """`chartbrief batch run` with the real default model, SIGKILLed after its first summaries;
    `batch run --resume` finishes it."""
    fhir_base, loaded = loaded_server
    everyone = sorted(p.id for p in loaded)
    db_url = f"sqlite:///{tmp_path}/cb.db"
    env = subprocess_env(
        CHARTBRIEF_FHIR__BASE_URL=fhir_base,
        CHARTBRIEF_DB__URL=db_url,
        CHARTBRIEF_LLM__N_THREADS="2",
        CHARTBRIEF_LLM__MAX_TOKENS="64",  # the real model, shorter answers: the test is about the batch
    )
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(  # noqa: S603 - our own CLI
        batch_command("run", "--json"), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        open_at_kill = _wait_until_some_done(db_url, first, minimum=2)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert open_at_kill > 0, "the run finished before it could be killed"

    resumed = subprocess.run(  # noqa: S603
        batch_command("run", "--resume", "--json"),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout)
    assert (report["selected"], report["summarized"], report["failed"]) == (len(everyone), len(everyone), 0)
    docs = summaries_by_patient(fhir_base, everyone)
    assert {pid: len(d) for pid, d in docs.items()} == dict.fromkeys(everyone, 1)


def _wait_until_some_done(db_url: str, process: subprocess.Popen[bytes], *, minimum: int) -> int:
    """Wait until the run has `minimum` items done; how many were still open then."""
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return 0
        if Path(db_url.removeprefix("sqlite:///")).exists():
            repo = BatchRepository.from_url(db_url)
            try:
                runs = repo.list_runs(limit=1)
                if runs:
                    counts = repo.state_counts(runs[0].id)
                    if counts.get(DONE, 0) >= minimum:
                        return sum(counts.get(s, 0) for s in OPEN_STATES)
            finally:
                repo.close()
        time.sleep(0.5)
    raise AssertionError("the batch made no progress in time")
