"""A run's report and progress figures."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from service.batch.report import build_report, progress_figures
from service.config import Settings
from service.db.batch import DONE, FAILED, RUN_COMPLETED, SKIPPED, Run, RunItem
from tests.service.batch.conftest import BASE

# -- report -------------------------------------------------------------------------------------------


def test_report_adds_up_tokens_cpu_and_cost_per_thousand_summaries(settings: Settings) -> None:
    started = datetime(2024, 1, 1, 2, 0, tzinfo=UTC)
    run = Run(
        id=4,
        status=RUN_COMPLETED,
        mode="local",
        fhir_base=BASE,
        selection="changed",
        selection_problems=0,
        started_at=started,
        finished_at=started + timedelta(seconds=240),
        cpu_seconds=300.0,
        machine_seconds=200.0,
    )
    items = [
        RunItem(patient_id="a", state=DONE, attempts=1, prompt_tokens=1000, completion_tokens=200),
        RunItem(patient_id="b", state=DONE, attempts=1, prompt_tokens=1400, completion_tokens=400),
        RunItem(patient_id="c", state=SKIPPED, attempts=1, prompt_tokens=0, completion_tokens=0),
        RunItem(
            patient_id="d",
            state=FAILED,
            attempts=3,
            error="FhirServerError: 503",
            prompt_tokens=0,
            completion_tokens=0,
        ),
    ]
    price = settings.batch.price_per_machine_hour
    report = build_report(run, items, settings.batch, now=started)
    tokens = 1000 + 200 + 1400 + 400
    assert (report.selected, report.summarized, report.skipped_unchanged, report.failed) == (4, 2, 1, 1)
    assert report.tokens == tokens
    assert report.tokens_per_summary == tokens / 2
    assert report.cpu_seconds_per_summary == 300.0 / 2
    assert report.cost_per_1000_summaries == pytest.approx(200.0 / 3600 / 2 * 1000 * price, abs=1e-4)
    assert report.patients_per_minute == pytest.approx(3 / (240 / 60))
    data = report.to_json()
    assert data["failures"] == [{"patient": "d", "attempts": 3, "reason": "FhirServerError: 503"}]
    assert json.loads(json.dumps(data)) == data


def test_progress_rate_and_time_left() -> None:
    rate, eta = progress_figures(done=4, total=10, elapsed_seconds=120)
    assert rate == 4 / 2
    assert eta == (10 - 4) / (4 / 120)
