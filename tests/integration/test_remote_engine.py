"""The model-server pool against a real `python -m llama_cpp.server` running the default model."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from service.db.store import SqlSummaryStore
from service.dev.devserver import free_port
from service.dev.sandbox import LoadedPatient
from service.fhir import fhir_client
from service.llm import create_engine
from service.llm.model_files import default_model_path
from service.llm.remote import RemoteLlamaPool
from service.pipeline import Services, summarize_patient
from tests.integration.conftest import run_in_private_loop

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server",
                "--model", str(default_model_path()),
                "--host", "127.0.0.1", "--port", str(port),
                "--n_ctx", "2048", "--seed", "42",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start:\n{log.read_text()[-3000:]}", pytrace=False)
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_small_batch_runs_through_a_real_llama_cpp_server_and_is_written_back(
    llama_server: str, fhir_base: str, loaded_patients: dict[str, LoadedPatient], tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # a pool member that is down: requests move past it
    settings = Settings(
        fhir={"base_url": fhir_base},  # type: ignore[arg-type]
        db={"url": f"sqlite:///{tmp_path}/cb.db"},  # type: ignore[arg-type]
        llm={"servers": [dead, llama_server], "n_ctx": 2048},  # type: ignore[arg-type]  # the server's --n_ctx
        prompt="summary/v1",  # one request per patient, whatever notes it has: the pool is counted
    )
    engine = create_engine(settings.llm)
    assert isinstance(engine, RemoteLlamaPool)
    patients = [loaded_patients[name].id for name in sorted(loaded_patients)[:2]]

    async def run() -> list:
        store = SqlSummaryStore.from_url(settings.db.url)
        async with fhir_client(settings.fhir) as client:
            svc = Services(settings=settings, client=client, engine=engine, store=store)
            try:
                return [await summarize_patient(svc, pid) for pid in patients]
            finally:
                store.close()
                await engine.aclose()

    results = run_in_private_loop(run())
    for result in results:
        assert result.completion_tokens > 0
        assert result.write is not None and result.write.document_reference.startswith("DocumentReference/")
        assert len(result.kept) + len(result.dropped) >= 1
    served = {s.base_url: s.served for s in engine.pool.servers}
    assert served[llama_server] == len(patients)
    assert served[dead] == 0
