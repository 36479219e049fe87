"""`chartbrief batch status|report|worker` against a recorded run."""

from __future__ import annotations

import json

from click.testing import CliRunner

from service.cli.batch import batch as batch_cli
from service.config import Settings
from service.db.batch import DONE, FAILED, RUN_COMPLETED_WITH_FAILURES, BatchRepository, ItemOutcome
from tests.service.batch.conftest import BASE

# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_status_and_report_read_a_run(settings: Settings, repo: BatchRepository) -> None:
    run_id = repo.create_run(fhir_base=BASE, mode="local", selection="changed", patient_ids=["a", "b"])
    repo.start_item(run_id, "a", "w")
    repo.finish_item(run_id, "a", ItemOutcome(state=DONE, prompt_tokens=30, completion_tokens=12))
    repo.set_state(run_id, "b", FAILED, error="FhirNotFound: FHIR server answered 404")
    repo.finish_run_if_done(run_id)
    runner = CliRunner()
    env = {"CHARTBRIEF_DB__URL": settings.db.url}
    report = runner.invoke(batch_cli, ["report", str(run_id), "--json"], env=env)
    assert report.exit_code == 0, report.output
    data = json.loads(report.stdout)
    assert (data["summarized"], data["failed"], data["tokens"]) == (1, 1, 42)
    assert data["failures"][0]["reason"].startswith("FhirNotFound")
    text = runner.invoke(batch_cli, ["report", str(run_id)], env=env)
    assert "Patient/b after 0 attempt(s): FhirNotFound" in text.output
    status = runner.invoke(batch_cli, ["status"], env=env)
    assert status.exit_code == 0 and f"run {run_id} {RUN_COMPLETED_WITH_FAILURES}" in status.output
    missing = runner.invoke(batch_cli, ["report", "999"], env=env)
    assert missing.exit_code == 2 and "no batch run 999" in missing.output


def test_cli_worker_refuses_sqlite(settings: Settings) -> None:
    out = CliRunner().invoke(batch_cli, ["worker"], env={"CHARTBRIEF_DB__URL": settings.db.url})
    assert out.exit_code == 2
    assert "needs PostgreSQL" in out.output
