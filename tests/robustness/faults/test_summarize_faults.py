"""`chartbrief summarize` through the fault proxy: every fault ends in a summary or a clear one-line
error, and the server never holds a partial or duplicate summary.

Reads hit by a fault are retried by the client or refused with a message naming the server; the
write-back (one transaction POST) hit by a fault is retried without duplicating (the
DocumentReference is created `ifNoneExist` on its idempotency key, the Provenance PUT to an id
derived from it), and a later run finishes what a failed one left.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner, Result

from service.cli.main import cli
from service.dev.sandbox import LoadedPatient
from service.llm.fake import FakeEngine
from tests.robustness.faults.conftest import assert_whole_and_unique, chartbrief_documents
from tests.robustness.faults.helpers import FAST_FHIR, set_env, touch_record, within_deadline
from tests.robustness.faults.proxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"


def summarize(proxy: FaultProxy, patient_id: str) -> Result:
    runner = CliRunner()
    return within_deadline(
        "chartbrief summarize",
        lambda: runner.invoke(
            cli,
            ["summarize", "--patient", patient_id, "--json", "--fhir-base", proxy.base_url],
            obj={"engine": _engine()},
        ),
    )


def _engine() -> FakeEngine:
    engine = FakeEngine()
    engine.enqueue('{"claims": []}')
    return engine


def assert_clear_outcome(result: Result) -> None:
    """Success, or a chartbrief error as one line and its exit code (never a traceback)."""
    if result.exit_code == 0:
        return
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("chartbrief: ")]
    assert len(errors) == 1, result.output[-2000:]


@pytest.fixture
def patient(loaded_patients: dict[str, LoadedPatient], monkeypatch: pytest.MonkeyPatch) -> str:
    set_env(monkeypatch, FAST_FHIR)
    return loaded_patients[SMALL].id


READ_FAULTS: dict[str, list[Fault]] = {
    "latency": [Fault("latency", method="GET", times=None, seconds=0.05)],
    "reset": [Fault("reset", method="GET", times=2)],
    "429 storm": [Fault("429", method="GET", times=3, seconds=1)],
    "500 burst": [Fault("500", method="GET", times=2)],
    "503 burst": [Fault("503", method="GET", times=3)],
    "truncated body": [Fault("truncated", method="GET", skip=1, times=2)],
    "invalid json": [Fault("invalid_json", method="GET", skip=1, times=1)],
    "slow body": [Fault("slow_body", method="GET", times=3, seconds=0.4)],
    "wrong content type": [Fault("wrong_content_type", method="GET", skip=1, times=1)],
    "stops after 3 requests": [Fault("stop", skip=3)],
}


@pytest.mark.parametrize("faults", READ_FAULTS.values(), ids=READ_FAULTS.keys())
def test_a_fault_while_reading_ends_in_a_summary_or_a_clear_error(
    proxy: FaultProxy, patient: str, fhir_base: str, faults: list[Fault]
) -> None:
    touch_record(fhir_base, patient)
    proxy.arm(*faults)
    result = summarize(proxy, patient)
    assert sum(proxy.injected.values()) >= 1, "the fault was not injected"
    assert_clear_outcome(result)
    assert_whole_and_unique(fhir_base, patient)
    proxy.clear()
    again = summarize(proxy, patient)
    assert again.exit_code == 0, again.output
    written = _json_of(again)
    docs = assert_whole_and_unique(fhir_base, patient)
    assert [d for d in docs if d["status"] == "current"], "a current summary after the fault is gone"
    assert written["idempotency_key"] in _keys(docs)


WRITE_FAULTS: dict[str, list[Fault]] = {
    "reset before the transaction": [Fault("reset", method="POST", times=1)],
    "500 on the transaction": [Fault("500", method="POST", times=1)],
    "429 on the transaction": [Fault("429", method="POST", times=2, seconds=1)],
    "answer lost after the server committed": [Fault("drop_after_forward", method="POST", times=1)],
    "answer lost on every try": [Fault("drop_after_forward", method="POST", times=None)],
    "truncated transaction answer": [Fault("truncated", method="POST", times=1)],
    "invalid json transaction answer": [Fault("invalid_json", method="POST", times=1)],
    "server stops at the transaction": [Fault("stop", method="POST")],
}


@pytest.mark.parametrize("faults", WRITE_FAULTS.values(), ids=WRITE_FAULTS.keys())
def test_a_fault_during_write_back_never_duplicates_and_the_next_run_completes(
    proxy: FaultProxy, patient: str, fhir_base: str, faults: list[Fault]
) -> None:
    touch_record(fhir_base, patient)
    proxy.arm(*faults)
    result = summarize(proxy, patient)
    assert sum(proxy.injected.values()) >= 1, "the fault was not injected"
    assert_clear_outcome(result)
    assert_whole_and_unique(fhir_base, patient)
    proxy.clear()
    again = summarize(proxy, patient)
    assert again.exit_code == 0, again.output
    key = _json_of(again)["idempotency_key"]
    docs = assert_whole_and_unique(fhir_base, patient)
    assert _keys(docs).count(key) == 1, "the summary is on the server exactly once"
    assert len(chartbrief_documents(fhir_base, patient)) == len(docs)


def _keys(docs: list[dict[str, Any]]) -> list[str]:
    return [i["value"] for d in docs for i in d["identifier"] if i.get("system") == "urn:chartbrief:summary"]


def _json_of(result: Result) -> dict[str, Any]:
    """The --json document of a run whose log lines share its stdout."""
    lines = result.stdout.splitlines()
    return dict(json.loads("\n".join(lines[lines.index("{") :])))
