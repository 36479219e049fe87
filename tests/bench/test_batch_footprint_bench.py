"""The `batch` and `footprint` sections of `make bench` in their tiny configuration, against a local
FHIR server holding one small fixture patient and the real default model.

What is checked is that every figure is there and the counts add up; timings are the benchmark's to
report, not this test's to judge.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.performance import batch, footprint
from bench.performance.common import BenchContext
from fhir_adapters.client import FhirClient
from service.dev.devserver import LOAD_TIMEOUT_SECONDS, LocalFhirServer, LocalFhirServerError, synthea_files
from service.dev.sandbox import LoadedPatient, LoadFailure, load_files
from tests.conftest import run_in_private_loop

pytestmark = [pytest.mark.integration, pytest.mark.model]

RUN_FIGURES = {
    "wall_seconds",
    "process_cpu_seconds",
    "selected",
    "summarized",
    "skipped_unchanged",
    "failed",
    "tokens_per_summary",
    "cpu_seconds_per_summary",
}


@pytest.fixture(scope="module")
def one_patient_server() -> Iterator[tuple[str, list[LoadedPatient]]]:
    """A server of its own (the batch section changes records): the smallest fixture loaded."""
    smallest = min(synthea_files(), key=lambda p: p.stat().st_size)
    server = LocalFhirServer()
    try:
        server.start()
    except LocalFhirServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    failures: list[LoadFailure] = []

    async def load() -> list[LoadedPatient]:
        async with FhirClient(server.base_url, timeout=LOAD_TIMEOUT_SECONDS) as client:
            return await load_files(client, [smallest], failures=failures)

    try:
        patients = run_in_private_loop(load())
        if failures or len(patients) != 1:
            pytest.fail(f"the fixture did not load: {[f.source_file for f in failures]}", pytrace=False)
        yield server.base_url, patients
    finally:
        server.stop()


@pytest.fixture
def ctx(one_patient_server: tuple[str, list[LoadedPatient]], tmp_path: Path) -> BenchContext:
    base, patients = one_patient_server
    return BenchContext(
        fhir_base=base,
        patients=patients,
        largest=max(patients, key=lambda p: p.resources),
        repetitions=3,  # tiny overrides it: one start, one run each
        tiny=True,
        work_dir=tmp_path,
    )


def test_batch_section_summarizes_everyone_then_nothing_then_exactly_the_touched(ctx: BenchContext) -> None:
    section = batch.run(ctx)

    assert section.skipped is None
    assert section.key == "batch"
    figures = section.figures
    first, unchanged, changed = figures["first_run"], figures["unchanged_rerun"], figures["two_changed_rerun"]
    for run in (first, unchanged, changed):
        assert RUN_FIGURES <= set(run), sorted(RUN_FIGURES - set(run))
        assert run["failed"] == 0, run
        assert run["wall_seconds"] > 0 and run["process_cpu_seconds"] > 0, run
        assert run["selected"] == run["summarized"] + run["skipped_unchanged"] + run["failed"], run
    selected = len(ctx.patients)
    assert figures["patients"] == selected
    assert first["selected"] == first["summarized"] == selected
    assert unchanged["summarized"] == 0
    assert unchanged["skipped_unchanged"] == selected  # the tiny run names its patients in a file
    assert figures["touched"] == min(2, selected)
    assert changed["summarized"] == figures["touched"]
    assert first["tokens_per_summary"] > 0 and first["cpu_seconds_per_summary"] > 0
    assert figures["patients_per_minute"] > 0 and figures["cli_import_seconds"] > 0
    for name in ("unchanged_rerun_fraction", "two_changed_rerun_fraction"):
        assert section.ratios[name] is not None and section.ratios[name] > 0, name
    assert section.ratios["unchanged_rerun_fraction"] == pytest.approx(
        unchanged["wall_seconds"] / first["wall_seconds"], abs=1e-3
    )
    assert "unchanged_rerun_fraction" in section.targets
    assert [row["summarized"] for row in section.table] == [selected, 0, figures["touched"]]
    assert len(section.bars) == 3 and all(bar.value > 0 for bar in section.bars)


def test_footprint_section_reports_start_memory_and_one_summary(ctx: BenchContext) -> None:
    section = footprint.run(ctx)

    assert section.skipped is None
    assert section.key == "footprint"
    figures = section.figures
    assert figures["starts"] == 1
    assert figures["ready_seconds"] > 0 and figures["baseline_import_app_seconds"] > 0
    assert figures["baseline_import_service_rss_mib"] > 0
    # the model is in memory once ready: far more than a bare interpreter
    assert figures["rss_at_ready_mib"] > figures["baseline_import_service_rss_mib"]
    assert figures["rss_after_summary_mib"] > 0
    assert figures["summary"]["status"] == 202, figures["summary"]
    assert figures["summary"]["failed"] is None, figures["summary"]
    assert figures["summary"]["result"] in ("written", "found written", "unchanged"), figures["summary"]
    ratios = section.ratios
    assert ratios["serve_rss_vs_python_baseline"] == pytest.approx(
        figures["rss_at_ready_mib"] / figures["baseline_import_service_rss_mib"], rel=0.01
    )
    assert ratios["cold_start_vs_import_baseline"] == pytest.approx(
        figures["ready_seconds"] / figures["baseline_import_app_seconds"], rel=0.01
    )
    assert ratios["serve_rss_vs_python_baseline"] > 1
    assert len(section.bars) == 3 and all(bar.value > 0 for bar in section.bars)
