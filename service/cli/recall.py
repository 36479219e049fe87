"""`chartbrief recall`: the summaries a model file or a prompt version produced, from chartbrief's database
and from the FHIR server (through Provenance); `--mark` puts the unreviewed ones under recall.

Approved summaries are listed for a clinician to re-check and are never changed. The work is done by
`service.governance.recall`; this command parses, calls it, and prints a table or one JSON object.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from service.cli.common import (
    ChartbriefCommand,
    build_settings,
    db_url_option,
    json_option,
    optional_fhir_base_option,
    run,
)
from service.db.store import SqlSummaryStore
from service.fhir import fhir_client
from service.governance.recall import RecallReport, run_recall
from service.governance.recall_rules import Criterion, RecallError, parse_criterion

ACTION_TEXT = {
    "marked": "put under recall now",
    "already-marked": "already under recall",
    "to-mark": "unreviewed: --mark would put it under recall",
    "re-check": "APPROVED: a clinician must re-check it",
    "conflict": "changed while marking: run again",
    "none": "-",
}


def render(report: RecallReport) -> str:
    """One line per summary, then the counts."""
    lines = [f"recall {report.criterion.label} on {report.fhir_base or 'the database only'}"]
    for item in report.summaries:
        where = "+".join(sorted(item.found_in))
        lines.append(
            f"  {item.document_reference or '(not written)'}  patient {item.patient_id or '?'}  "
            f"{item.prompt or '?'}  {item.state}  [{where}]  {ACTION_TEXT.get(item.action, item.action)}"
        )
    counts = report.counts()
    summary = (
        ", ".join(f"{n} {ACTION_TEXT.get(a, a).split(':')[0]}" for a, n in counts.items()) or "none found"
    )
    lines.append(f"{len(report.summaries)} summary(ies): {summary}")
    return "\n".join(lines)


@click.command(cls=ChartbriefCommand)
@click.option("--model-sha", default=None, help="The model file's sha256 (or a unique prefix of 12+ hex).")
@click.option("--prompt-version", default=None, help="A prompt version: v1, or id/version (summary/v1).")
@click.option("--mark", is_flag=True, help="Put the unreviewed summaries under recall (needs --reason).")
@click.option("--reason", default=None, help="Why, shown to the reviewing clinician (no patient details).")
@json_option("the report")
@optional_fhir_base_option
@db_url_option
@run
async def recall(
    model_sha: str | None,
    prompt_version: str | None,
    mark: bool,
    reason: str | None,
    as_json: bool,
    fhir_base: str | None,
    db_url: str | None,
) -> None:
    """Every summary of a model file or prompt version; --mark sets unreviewed ones under recall.

    Without --fhir-base only the database is searched."""
    criterion: Criterion = parse_criterion(model_sha, prompt_version)
    if mark and not (reason or "").strip():
        raise RecallError("--mark needs --reason TEXT: the reviewing clinician is shown why")
    if mark and not fhir_base:
        raise RecallError(
            "--mark needs the FHIR server: pass --fhir-base URL or set CHARTBRIEF_FHIR__BASE_URL"
        )
    settings = build_settings(db__url=db_url, fhir__base_url=fhir_base)
    store = SqlSummaryStore.from_url(settings.db.url)
    try:
        client = fhir_client(settings.fhir) if fhir_base else None
        try:
            report = await run_recall(
                criterion,
                db=store.sessions,
                client=client,
                mark=mark,
                reason=reason,
                when=datetime.now(UTC).isoformat(timespec="seconds"),
            )
        finally:
            if client is not None:
                await client.aclose()
    finally:
        store.close()
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else render(report))
