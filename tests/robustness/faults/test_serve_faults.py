"""`chartbrief serve` killed with SIGKILL mid-summary, with the FHIR server behind the fault proxy:
a restarted serve on the same database summarizes the patient again, and the server holds neither
a duplicate nor a half-written summary.

The serve process is real (a subprocess started as in bench/load.py, with the stand-in
OpenAI-compatible model server from there); the write-back is one FHIR transaction, so a kill can
only leave it unsent, sent and committed, or committed with the answer lost - never half of it.
What it must not do: leave a serve process or the held proxy request behind when a test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.load import ThreadServer, create_key, fake_model_app, serve
from service.dev.devserver import free_port
from service.dev.sandbox import LoadedPatient
from tests.robustness.faults.conftest import assert_whole_and_unique, chartbrief_documents
from tests.robustness.faults.helpers import FAST_FHIR, touch_record, within_deadline
from tests.robustness.faults.proxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    with ThreadServer(fake_model_app(0.0)) as model:
        yield f"http://{HOST}:{model.port}/v1"


@pytest.fixture
def env(proxy: FaultProxy, model_url: str, tmp_path: Path) -> dict[str, str]:
    return (
        dict(os.environ)
        | FAST_FHIR
        | {
            "CHARTBRIEF_DB__URL": f"sqlite:///{tmp_path}/serve.db",
            "CHARTBRIEF_LOG_LEVEL": "WARNING",
            "CHARTBRIEF_FHIR__BASE_URL": proxy.base_url,
            "CHARTBRIEF_LLM__SERVERS": json.dumps([model_url]),
        }
    )


@pytest.fixture
def patient(loaded_patients: dict[str, LoadedPatient], fhir_base: str) -> str:
    patient_id = loaded_patients[SMALL].id
    # A new record version: the summary about to be killed has a key never written before.
    touch_record(fhir_base, patient_id)
    return patient_id


@contextlib.contextmanager
def running(env: dict[str, str], work: Path) -> Iterator[tuple[str, int]]:
    """A ready serve subprocess on a free port: its URL and pid; killed for good on the way out."""
    port = free_port()
    with serve(env | {"CHARTBRIEF_SMART__PUBLIC_BASE_URL": f"http://{HOST}:{port}"}, port, 0, work) as served:
        try:
            yield served.url, served.process.pid
        finally:
            if served.process.poll() is None:
                served.process.kill()
            served.process.wait(timeout=20)


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def summarize_to_the_end(url: str, key: str, patient_id: str) -> dict[str, Any]:
    """POST /api/summaries and follow the job until it is done; the finished job."""

    def run() -> dict[str, Any]:
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, timeout=30) as http:
            accepted = http.post("/api/summaries", json={"patient": patient_id}, headers=auth)
            assert accepted.status_code == 202, accepted.text
            while True:
                job = http.get(accepted.headers["location"], headers=auth)
                assert job.status_code == 200, job.text
                if job.json()["status"] in ("succeeded", "failed"):
                    return dict(job.json())
                time.sleep(0.1)

    return within_deadline("the summary job after the restart", run)


def assert_restart_completes(
    env: dict[str, str], work: Path, key: str, fhir_base: str, patient_id: str
) -> None:
    with running(env, work) as (url, _):
        job = summarize_to_the_end(url, key, patient_id)
    assert job["status"] == "succeeded", job
    docs = assert_whole_and_unique(fhir_base, patient_id)
    assert [d for d in docs if d["status"] == "current"], "no current summary after the restart"


def test_serve_killed_mid_stream_restarts_and_completes_without_duplicates(
    proxy: FaultProxy, env: dict[str, str], tmp_path: Path, patient: str, fhir_base: str
) -> None:
    key = create_key(env, "faults")
    with running(env, tmp_path) as (url, pid):

        def first_event() -> str:
            auth = {"Authorization": f"Bearer {key}"}
            with (
                httpx.Client(base_url=url, timeout=30) as http,
                http.stream(
                    "POST", "/api/summaries/stream", json={"patient": patient}, headers=auth
                ) as response,
            ):
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        kill9(pid)
                        return line
            raise AssertionError("the stream ended without an event")

        event = within_deadline("the first stream event", first_event)
        assert event.removeprefix("event:").strip() != "error", event
    assert_whole_and_unique(fhir_base, patient)
    assert_restart_completes(env, tmp_path, key, fhir_base, patient)


WRITE_KILLS: dict[str, Fault] = {
    "held transaction, forwarded after the kill": Fault("hold", method="POST", times=1),
    "transaction committed, answer lost, then killed": Fault("drop_after_forward", method="POST", times=None),
}


@pytest.mark.parametrize("fault", WRITE_KILLS.values(), ids=WRITE_KILLS.keys())
def test_serve_killed_during_write_back_restarts_and_completes_without_duplicates(
    proxy: FaultProxy, env: dict[str, str], tmp_path: Path, patient: str, fhir_base: str, fault: Fault
) -> None:
    key = create_key(env, "faults")
    before = len(chartbrief_documents(fhir_base, patient))
    proxy.arm(fault)
    try:
        with running(env, tmp_path) as (url, pid):
            auth = {"Authorization": f"Bearer {key}"}
            accepted = httpx.post(f"{url}/api/summaries", json={"patient": patient}, headers=auth, timeout=30)
            assert accepted.status_code == 202, accepted.text
            within_deadline("the write-back reaching the proxy", lambda: _wait_for_write(proxy, fault))
            kill9(pid)
        if fault.kind == "hold":
            # The serve that sent it is gone; the transaction still reaches the server (the worst
            # case: committed with nobody to hear it), before the restarted serve looks.
            proxy.release.set()
            within_deadline(
                "the held transaction landing", lambda: _wait_for_summary(fhir_base, patient, before)
            )
        proxy.clear()
        assert_whole_and_unique(fhir_base, patient)
        assert_restart_completes(env, tmp_path, key, fhir_base, patient)
    finally:
        proxy.release.set()


def _wait_for_write(proxy: FaultProxy, fault: Fault) -> None:
    while fault.fired < 1 or (fault.kind == "hold" and not proxy.held.is_set()):
        time.sleep(0.02)


def _wait_for_summary(fhir_base: str, patient_id: str, before: int) -> None:
    while len(chartbrief_documents(fhir_base, patient_id)) <= before:
        time.sleep(0.1)


def test_a_transaction_held_past_the_kill_lands_after_the_restarted_serve_wrote_and_duplicates_nothing(
    proxy: FaultProxy,
    env: dict[str, str],
    tmp_path: Path,
    patient: str,
    fhir_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forwarded = _count_forwarded_posts(proxy, monkeypatch)
    key = create_key(env, "faults")
    fault = Fault("hold", method="POST", times=1)
    proxy.arm(fault)
    try:
        with running(env, tmp_path) as (url, pid):
            auth = {"Authorization": f"Bearer {key}"}
            accepted = httpx.post(f"{url}/api/summaries", json={"patient": patient}, headers=auth, timeout=30)
            assert accepted.status_code == 202, accepted.text
            within_deadline("the write-back reaching the proxy", lambda: _wait_for_write(proxy, fault))
            kill9(pid)
        # The killed serve's transaction is still in flight while the restarted one writes the
        # same summary; it reaches the server last.
        with running(env, tmp_path) as (url, _):
            job = summarize_to_the_end(url, key, patient)
        assert job["status"] == "succeeded", job
        written = forwarded["POST"]
        proxy.release.set()
        within_deadline(
            "the held transaction landing", lambda: _wait_until(lambda: forwarded["POST"] > written)
        )
        docs = assert_whole_and_unique(fhir_base, patient)
        assert [d for d in docs if d["status"] == "current"], "no current summary after the late transaction"
    finally:
        proxy.release.set()


def _count_forwarded_posts(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many requests per method the proxy has had answered by the server, from now on."""
    counts: dict[str, int] = {"POST": 0}
    original = proxy._forward

    async def forward(request: Any) -> Any:
        try:
            return await original(request)
        finally:
            counts[request.method] = counts.get(request.method, 0) + 1

    monkeypatch.setattr(proxy, "_forward", forward)
    return counts


def _wait_until(condition: Any) -> None:
    while not condition():
        time.sleep(0.05)


SERVE_FAULTS: dict[str, list[Fault]] = {
    "503 burst on reads": [Fault("503", method="GET", times=3)],
    "503 burst on the transaction": [Fault("503", method="POST", times=2)],
    "503 on every request": [Fault("503", times=None)],
    "server stops mid-request": [Fault("stop", skip=3)],
    "server stops at the transaction": [Fault("stop", method="POST")],
}


@pytest.mark.parametrize("faults", SERVE_FAULTS.values(), ids=SERVE_FAULTS.keys())
def test_a_serve_job_under_a_fhir_fault_ends_with_a_clear_outcome_never_a_500(
    proxy: FaultProxy, env: dict[str, str], tmp_path: Path, patient: str, fhir_base: str, faults: list[Fault]
) -> None:
    key = create_key(env, "faults")
    with running(env, tmp_path) as (url, _):
        proxy.arm(*faults)
        job = summarize_to_the_end(url, key, patient)
        assert sum(proxy.injected.values()) >= 1, "the fault was not injected"
        assert job["status"] in ("succeeded", "failed"), job
        print(f"job under the fault: {job['status']} {job['error'] or ''}")
        if job["status"] == "failed":
            assert job["error"], "a failed job without a message"
            assert not job["error"].startswith("unexpected failure"), job["error"]
        proxy.clear()
        assert_whole_and_unique(fhir_base, patient)
        again = summarize_to_the_end(url, key, patient)
    assert again["status"] == "succeeded", again
    docs = assert_whole_and_unique(fhir_base, patient)
    assert [d for d in docs if d["status"] == "current"], "no current summary once the fault is gone"


def test_a_serve_stream_whose_fhir_server_stops_mid_request_ends_with_an_error_event_never_a_500(
    proxy: FaultProxy, env: dict[str, str], tmp_path: Path, patient: str, fhir_base: str
) -> None:
    key = create_key(env, "faults")
    with running(env, tmp_path) as (url, _):
        proxy.arm(Fault("stop", skip=3))

        def events() -> list[tuple[str, str]]:
            auth = {"Authorization": f"Bearer {key}"}
            got: list[tuple[str, str]] = []
            name = ""
            with (
                httpx.Client(base_url=url, timeout=30) as http,
                http.stream(
                    "POST", "/api/summaries/stream", json={"patient": patient}, headers=auth
                ) as response,
            ):
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        name = line.removeprefix("event:").strip()
                    elif line.startswith("data:") and name:
                        got.append((name, line.removeprefix("data:").strip()))
            return got

        got = within_deadline("the stream under a stopped FHIR server", events)
        assert proxy.injected["stop"] >= 1, "the fault was not injected"
        assert [n for n, _ in got][-1:] == ["error"], [n for n, _ in got]
        outcome = json.loads(got[-1][1])
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["diagnostics"], outcome
        proxy.clear()
    assert_whole_and_unique(fhir_base, patient)
