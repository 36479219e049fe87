"""`chartbrief batch run` through the fault proxy: every fault ends the run with a clear outcome,
every selected patient succeeded or failed with a reason, a second run without the fault leaves
every patient summarized, and the server never holds a partial or duplicate summary.

The batch runs in this process with a scripted engine over a few small loaded patients: on SQLite
(the local runner), and on PostgreSQL (`--no-wait`, then an in-process `batch worker --burst`) in a
database of its own whose backends are all terminated while a patient's read is held. Without
`pool_pre_ping` on the repository's engine that drop shows as a logged traceback; with it, the
worker reconnects and no patient is lost or summarized twice. The PostgreSQL test is skipped, with
the reason printed, only when no server answers at 127.0.0.1:5432.
"""

from __future__ import annotations

import concurrent.futures
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from service.cli.main import cli
from service.dev.sandbox import LoadedPatient
from service.llm.fake import FakeEngine
from tests.robustness.faults.conftest import assert_whole_and_unique
from tests.robustness.faults.helpers import (
    DEADLINE_SECONDS,
    FAST_FHIR,
    set_env,
    touch_record,
    within_deadline,
)
from tests.robustness.faults.proxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

PATIENTS = (
    "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json",
    "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json",
    "Pasquale620_Kuhn96_792a51c0-a2a4-ee26-c23c-7cb24f8a0e35.json",
)
FAST_BATCH = {
    "CHARTBRIEF_BATCH__RETRY_WAIT_SECONDS": "0.1",
    "CHARTBRIEF_BATCH__RETRY_WAIT_MAX_SECONDS": "0.2",
    "CHARTBRIEF_BATCH__HEARTBEAT_SECONDS": "1",
}
EXIT_OK, EXIT_BATCH_FAILURES = 0, 5


def _engine(outputs: int = 40) -> FakeEngine:
    engine = FakeEngine()
    for _ in range(outputs):
        engine.enqueue('{"claims": []}')
    return engine


def batch_run(proxy: FaultProxy, patients_file: Path) -> Result:
    runner = CliRunner()
    return within_deadline(
        "chartbrief batch run",
        lambda: runner.invoke(
            cli,
            ["batch", "run", "--patients", str(patients_file), "--json", "--fhir-base", proxy.base_url],
            obj={"engine": _engine()},
        ),
    )


def report_of(result: Result) -> dict[str, Any]:
    """The --json report of a run whose log lines share its stdout."""
    lines = result.stdout.splitlines()
    return dict(json.loads("\n".join(lines[lines.index("{") :])))


def assert_clear_batch_outcome(result: Result, patient_ids: list[str]) -> dict[str, Any]:
    """Exit 0 (all done) or 5 (some failed), never a traceback; the report accounts for everyone."""
    assert result.exit_code in (EXIT_OK, EXIT_BATCH_FAILURES), (
        f"exit {result.exit_code} {result.exception!r}\n{result.output[-2000:]}"
    )
    assert "Traceback" not in result.output
    report = assert_everyone_accounted_for(report_of(result), patient_ids)
    assert (result.exit_code == EXIT_BATCH_FAILURES) == bool(report["failed"])
    return report


def assert_everyone_accounted_for(report: dict[str, Any], patient_ids: list[str]) -> dict[str, Any]:
    """Every selected patient summarized, unchanged, or failed with a reason; none left open."""
    assert report["open"] == 0, f"patients left open: {report}"
    failed = {f["patient"]: f["reason"] for f in report["failures"]}
    assert all(reason for reason in failed.values()), f"a failure without a reason: {failed}"
    assert report["selected"] == len(patient_ids)
    assert report["summarized"] + report["skipped_unchanged"] + report["failed"] == len(patient_ids), report
    assert set(failed) <= set(patient_ids)
    return report


@pytest.fixture
def patients(
    loaded_patients: dict[str, LoadedPatient],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fhir_base: str,
) -> tuple[list[str], Path]:
    set_env(monkeypatch, {**FAST_FHIR, **FAST_BATCH, "CHARTBRIEF_DB__URL": f"sqlite:///{tmp_path}/cb.db"})
    ids = [loaded_patients[name].id for name in PATIENTS]
    for pid in ids:
        touch_record(fhir_base, pid)
    listing = tmp_path / "patients.txt"
    listing.write_text("\n".join(ids) + "\n")
    return ids, listing


BATCH_FAULTS: dict[str, list[Fault]] = {
    "503 burst": [Fault("503", method="GET", skip=2, times=3)],
    "reset": [Fault("reset", method="GET", skip=3, times=2)],
    "429 storm": [Fault("429", method="GET", skip=1, times=4, seconds=1)],
    # Past the selection and the first patients' reads: some summarized, the rest cut off.
    "stops mid-run": [Fault("stop", skip=40)],
    "answer lost after a transaction": [Fault("drop_after_forward", method="POST", times=1)],
}


@pytest.mark.parametrize("faults", BATCH_FAULTS.values(), ids=BATCH_FAULTS.keys())
def test_a_fault_mid_batch_ends_clearly_and_the_next_run_summarizes_everyone(
    proxy: FaultProxy, patients: tuple[list[str], Path], fhir_base: str, faults: list[Fault]
) -> None:
    ids, listing = patients
    proxy.arm(*faults)
    first = batch_run(proxy, listing)
    assert sum(proxy.injected.values()) >= 1, "the fault was not injected"
    assert_clear_batch_outcome(first, ids)
    for pid in ids:
        assert_whole_and_unique(fhir_base, pid)
    proxy.clear()
    again = batch_run(proxy, listing)
    report = assert_clear_batch_outcome(again, ids)
    assert again.exit_code == EXIT_OK, again.output[-2000:]
    assert report["failed"] == 0
    for pid in ids:
        docs = assert_whole_and_unique(fhir_base, pid)
        assert [d for d in docs if d["status"] == "current"], f"Patient/{pid}: no current summary"


# -- the database connection dropped mid-batch (PostgreSQL, the queue and one worker) ---------------

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A database of its own, so terminating its backends touches no other test's connections."""
    try:
        admin = psycopg.connect(PG_ADMIN, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        reason = f"no PostgreSQL reachable at 127.0.0.1:5432 ({type(exc).__name__})"
        print(f"SKIPPED: {reason}")  # noqa: T201 - the reason must show in the test output
        pytest.skip(reason)
    name = f"cb_faults_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield name
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def terminate_backends(database: str) -> int:
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return sum(bool(r[0]) for r in rows)


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args, obj={"engine": _engine()})


def test_the_database_dropped_mid_batch_loses_no_patient_and_duplicates_none(
    proxy: FaultProxy,
    patients: tuple[list[str], Path],
    fhir_base: str,
    pg_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids, listing = patients
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{pg_database}"
    set_env(monkeypatch, {"CHARTBRIEF_DB__URL": db_url, "CHARTBRIEF_BATCH__POLL_SECONDS": "0.5"})
    deferred = within_deadline(
        "chartbrief batch run --no-wait",
        lambda: _invoke(
            ["batch", "run", "--patients", str(listing), "--no-wait", "--fhir-base", proxy.base_url]
        ),
    )
    assert deferred.exit_code == 0, deferred.output[-2000:]
    proxy.arm(Fault("hold", method="GET", path=f"Patient/{ids[1]}", times=1))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        worker = pool.submit(_invoke, ["batch", "worker", "--burst", "--concurrency", "1"])
        assert proxy.held.wait(DEADLINE_SECONDS), "the worker never reached the held read"
        assert terminate_backends(pg_database) >= 1, "no backend of the batch to terminate"
        proxy.clear()
        first = worker.result(timeout=DEADLINE_SECONDS)
    finally:
        proxy.clear()
        pool.shutdown(wait=False)
    assert "Traceback" not in first.output, first.output[-3000:]
    assert first.exit_code == 0 or isinstance(first.exception, SystemExit), (
        f"the worker crashed: {first.exception!r}\n{first.output[-3000:]}"
    )
    assert_everyone_accounted_for(_report(1), ids)
    for pid in ids:
        assert_whole_and_unique(fhir_base, pid)
    # Whatever the drop cost, a second run without it leaves every patient summarized, once.
    again = within_deadline(
        "chartbrief batch run --no-wait",
        lambda: _invoke(
            ["batch", "run", "--patients", str(listing), "--no-wait", "--fhir-base", proxy.base_url]
        ),
    )
    assert again.exit_code == 0, again.output[-2000:]
    second = within_deadline("chartbrief batch worker", lambda: _invoke(["batch", "worker", "--burst"]))
    assert second.exit_code == 0, second.output[-3000:]
    report = assert_everyone_accounted_for(_report(2), ids)
    assert report["failed"] == 0, report["failures"]
    for pid in ids:
        docs = assert_whole_and_unique(fhir_base, pid)
        assert [d for d in docs if d["status"] == "current"], f"Patient/{pid}: no current summary"


def _report(run_id: int) -> dict[str, Any]:
    result = within_deadline(
        "chartbrief batch report", lambda: _invoke(["batch", "report", str(run_id), "--json"])
    )
    assert result.exit_code == 0, result.output[-2000:]
    return report_of(result)
