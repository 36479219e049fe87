"""The fault proxy in front of the session's FHIR server, the checks every fault test ends with, and
the tally "faults injected and survived n/N by kind" (terminal summary and .bench/faults.json).

A fault counts as survived when the test that injected it passed: the command finished or failed
with a clear message, and the server holds no partial or duplicate summary.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters.client import FhirClient
from service.dev.devserver import REPO_ROOT
from tests.conftest import run_in_private_loop
from tests.robustness.faults.proxy import FaultProxy

SUMMARY_SYSTEM = "urn:chartbrief:summary"
INJECTED: Counter[str] = Counter()
SURVIVED: Counter[str] = Counter()
TALLY_FILE = REPO_ROOT / ".bench" / "faults.json"
# Documents already there when a fault test starts: other tests of the session write summaries for
# the same fixture patients (other models, prompts and seeds; planted and regenerated drafts), and
# those are not this test's doing. The checks below judge what the test's own runs wrote.
_BEFORE: set[str] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.stash[_PASSED] = report.passed


_PASSED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def shared_proxy(fhir_base: str, loaded_patients: dict[str, Any]) -> Iterator[FaultProxy]:
    with FaultProxy(fhir_base) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def _documents_before(fhir_base: str, loaded_patients: dict[str, Any]) -> Iterator[None]:
    _BEFORE.clear()
    for loaded in loaded_patients.values():
        _BEFORE.update(d["id"] for d in chartbrief_documents(fhir_base, loaded.id))
    yield
    _BEFORE.clear()


@pytest.fixture
def proxy(shared_proxy: FaultProxy, request: pytest.FixtureRequest) -> Iterator[FaultProxy]:
    """The session's proxy with no fault armed; what the test injected is tallied at its end."""
    shared_proxy.clear()
    shared_proxy.injected.clear()
    yield shared_proxy
    injected = Counter(shared_proxy.injected)
    shared_proxy.clear()
    passed = request.node.stash.get(_PASSED, False)
    for kind, count in injected.items():
        INJECTED[kind] += count
        if passed:
            SURVIVED[kind] += count


def chartbrief_documents(fhir_base: str, patient_id: str) -> list[dict[str, Any]]:
    """Every DocumentReference with chartbrief's identifier for the patient, read behind the proxy."""

    async def read() -> list[dict[str, Any]]:
        async with FhirClient(fhir_base) as client:
            docs = await client.search_all("DocumentReference", {"subject": f"Patient/{patient_id}"})
        return [d for d in docs if any(i.get("system") == SUMMARY_SYSTEM for i in d.get("identifier", []))]

    return run_in_private_loop(read())


def assert_whole_and_unique(fhir_base: str, patient_id: str) -> list[dict[str, Any]]:
    """No idempotency key written twice, every summary with its one Provenance, at most one current."""
    docs = chartbrief_documents(fhir_base, patient_id)
    keys = [i["value"] for d in docs for i in d["identifier"] if i.get("system") == SUMMARY_SYSTEM]
    assert len(keys) == len(set(keys)), f"Patient/{patient_id}: an idempotency key written twice"
    written = [d for d in docs if d["id"] not in _BEFORE]
    assert sum(d["status"] == "current" for d in written) <= 1, (
        f"Patient/{patient_id}: two current summaries written"
    )

    async def provenances() -> dict[str, int]:
        async with FhirClient(fhir_base) as client:
            counts = {}
            for d in written:
                found = await client.search_all("Provenance", {"target": f"DocumentReference/{d['id']}"})
                counts[d["id"]] = len(found)
        return counts

    counts = run_in_private_loop(provenances())
    assert all(n == 1 for n in counts.values()), (
        f"Patient/{patient_id}: summaries without one Provenance {counts}"
    )
    return docs


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not INJECTED:
        return
    terminalreporter.section("faults injected and survived")
    rows = {kind: {"survived": SURVIVED[kind], "injected": INJECTED[kind]} for kind in sorted(INJECTED)}
    for kind, row in rows.items():
        terminalreporter.write_line(f"{kind:>20}: {row['survived']}/{row['injected']}")
    total = {"survived": sum(SURVIVED.values()), "injected": sum(INJECTED.values())}
    terminalreporter.write_line(f"{'all':>20}: {total['survived']}/{total['injected']}")
    path = Path(TALLY_FILE)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"by_kind": rows, "total": total}, indent=2) + "\n")
    terminalreporter.write_line(f"written to {path}")
