"""`chartbrief batch ...`: nightly summarization of the patients whose record changed.

`run` selects and summarizes (or, on PostgreSQL, defers to the workers and waits), `status` and
`report` read the runs back, `worker` runs a Procrastinate worker. Exit codes are those of every
command (see `service.cli.common`), plus 5 when a run finished with failed patients, so cron and
systemd see it.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click
from sqlalchemy.engine import make_url

from service.batch import (
    BatchReport,
    BatchRequest,
    LogProgress,
    open_run_status,
    progress_figures,
    report_for,
    run_batch,
    run_progress,
)
from service.cli.common import (
    EXIT_BAD_INPUT,
    ChartbriefGroup,
    build_settings,
    db_url_option,
    fail,
    fhir_base_option,
    json_option,
    model_path_option,
    run,
)
from service.config import Settings
from service.db.batch import RUN_COMPLETED_WITH_FAILURES, BatchRepository
from service.errors import EXIT_BATCH_FAILURES
from service.logging import configure_logging


@click.group(cls=ChartbriefGroup)
def batch() -> None:
    """Summarize every patient whose record changed; resumable, on one machine or many."""


@batch.command("run")
@fhir_base_option
@click.option(
    "--patients",
    "patients_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="File of patient ids, one per line (# comments allowed), instead of the changed patients.",
)
@click.option("--group", "group_id", default=None, help="Summarize the members of this Group.")
@click.option(
    "--bulk",
    is_flag=True,
    help="Find the changed patients with a Bulk Data $export (with --group: Group level).",
)
@click.option("--resume", is_flag=True, help="Only finish the unfinished run of this server.")
@click.option("--no-wait", is_flag=True, help="PostgreSQL: defer the jobs to the workers and return at once.")
@json_option("the run's report")
@db_url_option
@model_path_option
@click.pass_context
@run
async def run_command(
    ctx: click.Context,
    fhir_base: str,
    patients_file: Path | None,
    group_id: str | None,
    bulk: bool,
    resume: bool,
    no_wait: bool,
    as_json: bool,
    db_url: str | None,
    model_path: str | None,
) -> None:
    """Select patients and summarize them; an unfinished earlier run is finished first."""
    settings = build_settings(fhir__base_url=fhir_base, db__url=db_url, llm__model_path=model_path)
    request = BatchRequest(
        patients_file=patients_file, group_id=group_id, bulk=bulk, resume=resume, wait=not no_wait
    )
    terminal = sys.stderr.isatty()
    if terminal and settings.log_level == "INFO":
        # The bar replaces the per-request lines; warnings still show.
        configure_logging(fmt=settings.log_format, level="WARNING")
    engine = (ctx.obj or {}).get("engine")
    outcome = await run_batch(
        settings, request, engine=engine, progress_factory=RichProgress if terminal else LogProgress
    )
    report = outcome.last
    if report is None:  # pragma: no cover - run_batch always reports or raises
        fail("the batch produced no report", 1)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for each in outcome.reports:
            click.echo(render_report(each))
    if any(r.status == RUN_COMPLETED_WITH_FAILURES for r in outcome.reports):
        sys.exit(EXIT_BATCH_FAILURES)


@batch.command("status")
@click.argument("run_id", type=int, required=False)
@json_option("the runs")
@db_url_option
def status_command(run_id: int | None, as_json: bool, db_url: str | None) -> None:
    """Progress of one run, or the latest runs."""
    settings = build_settings(db__url=db_url)
    repo = _open_repo(settings)
    try:
        runs = open_run_status(repo, run_id)
        if run_id is not None and not runs:
            fail(f"no batch run {run_id}", EXIT_BAD_INPUT)
        now = datetime.now(UTC)
        rows = [run_progress(repo, r, now=now) for r in runs]
    finally:
        repo.close()
    if as_json:
        click.echo(json.dumps(rows[0] if run_id is not None else rows, indent=2))
        return
    if not rows:
        click.echo("no batch runs yet")
    for row in rows:
        click.echo(render_status(row))


@batch.command("report")
@click.argument("run_id", type=int)
@json_option("the report")
@db_url_option
def report_command(run_id: int, as_json: bool, db_url: str | None) -> None:
    """What a run selected, summarized, skipped and failed (with reasons), and what it cost."""
    settings = build_settings(db__url=db_url)
    repo = _open_repo(settings)
    try:
        report = report_for(repo, run_id, settings)
    finally:
        repo.close()
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else render_report(report))


@batch.command("worker")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=None,
    help="Patients at once (default CHARTBRIEF_BATCH__WORKER_CONCURRENCY).",
)
@click.option("--burst", is_flag=True, help="Exit once the queue is empty instead of waiting for more jobs.")
@db_url_option
@model_path_option
@click.pass_context
@run
async def worker_command(
    ctx: click.Context, concurrency: int | None, burst: bool, db_url: str | None, model_path: str | None
) -> None:
    """Run batch jobs from the PostgreSQL queue until stopped (SIGTERM/SIGINT end it cleanly)."""
    settings = build_settings(db__url=db_url, llm__model_path=model_path)
    if make_url(settings.db.url).get_backend_name() != "postgresql":
        fail(
            "batch worker needs PostgreSQL (CHARTBRIEF_DB__URL=postgresql+psycopg://...); with SQLite, "
            "`chartbrief batch run` does the work itself",
            EXIT_BAD_INPUT,
        )
    from service.batch.queue import run_worker  # deferred: procrastinate is only needed here

    await run_worker(settings, engine=(ctx.obj or {}).get("engine"), concurrency=concurrency, wait=not burst)


def _open_repo(settings: Settings) -> BatchRepository:
    try:
        return BatchRepository.from_url(settings.db.url)
    except Exception as exc:  # noqa: BLE001 - any driver error: one clear line
        fail(f"cannot open the database CHARTBRIEF_DB__URL ({type(exc).__name__})", EXIT_BAD_INPUT)


# -- rendering -----------------------------------------------------------------------------------------


def render_report(r: BatchReport) -> str:
    since = f" since {r.since}" if r.since else (" (first run: everyone)" if r.selection == "changed" else "")
    lines = [
        f"run {r.run} ({r.status}, {r.mode}) on {r.fhir_base}: {r.selection}{since}",
        f"selected {r.selected}: summarized {r.summarized}, skipped unchanged {r.skipped_unchanged}, "
        f"failed {r.failed}" + (f", still open {r.open}" if r.open else ""),
        f"time {r.seconds:.1f} s"
        + (f" ({r.patients_per_minute} patients/min)" if r.patients_per_minute else "")
        + f"; tokens {r.tokens}"
        + (f" ({r.tokens_per_summary} per summary)" if r.tokens_per_summary is not None else "")
        + f"; CPU {r.cpu_seconds:.1f} s"
        + (f" ({r.cpu_seconds_per_summary} per summary)" if r.cpu_seconds_per_summary is not None else ""),
    ]
    if r.cost_per_1000_summaries is not None:
        lines.append(
            f"cost: {r.cost_per_1000_summaries} {r.currency} per 1000 summaries at "
            f"{r.price_per_machine_hour} {r.currency} per machine hour "
            f"({r.machine_seconds:.1f} machine seconds)"
        )
    if r.selection_problems:
        lines.append(f"{r.selection_problems} selection entries skipped (see the log)")
    if r.failures:
        lines.append("failed:")
        lines += [f"  - Patient/{f.patient} after {f.attempts} attempt(s): {f.reason}" for f in r.failures]
    return "\n".join(lines)


def render_status(row: dict[str, object]) -> str:
    states = row["states"]
    assert isinstance(states, dict)
    detail = ", ".join(f"{k} {v}" for k, v in states.items() if v)
    rate = f", {row['per_minute']}/min" if row.get("per_minute") else ""
    eta = f", about {row['eta_seconds']:.0f} s left" if isinstance(row.get("eta_seconds"), float) else ""
    return (
        f"run {row['run']} {row['status']} ({row['mode']}, {row['selection']}, started {row['started']}): "
        f"{row['done']}/{row['total']} done{rate}{eta}" + (f" [{detail}]" if detail else "")
    )


class RichProgress:
    """A progress bar on the terminal: done/total, patients per minute, time left."""

    def __init__(self, run_id: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn(f"run {run_id}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            console=Console(stderr=True),
        )
        self._task = self._progress.add_task("batch", total=None, rate="", eta="")
        self._progress.start()
        self._origin: tuple[int, float] | None = None

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._origin is None:
            self._origin = (done, now)  # a resumed run: the rate counts what this process did
        first, started = self._origin
        rate, eta = progress_figures(done - first, total - first, now - started)
        self._progress.update(
            self._task,
            completed=done,
            total=total,
            rate=f"{rate}/min" if rate is not None else "",
            eta=f"~{eta:.0f} s left" if eta is not None and done < total else "",
        )

    def close(self) -> None:
        self._progress.stop()


if __name__ == "__main__":
    batch(prog_name="chartbrief batch")
