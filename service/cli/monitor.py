"""`chartbrief monitor`: clinicians' review outcomes per model file and prompt version, week by week.

Reads chartbrief's database only (summaries, review outcomes, rejection reasons) and prints a table, or
one JSON object with `--json`. The figures are computed by `service.governance.monitor`.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from service.cli.common import (
    EXIT_BAD_INPUT,
    ChartbriefCommand,
    build_settings,
    db_url_option,
    fail,
    json_option,
)
from service.db import audit
from service.db.store import SqlSummaryStore
from service.governance.monitor import TABLE_COLUMNS, monitor_report, table_rows
from service.governance.records import review_outcomes, summaries

TABLE_WIDTH = 200  # wide enough for the per-week table on one line per row


def parse_since(value: str | None) -> datetime | None:
    """`--since` as an aware instant: a date (`2026-11-30`, midnight UTC) or an ISO instant.

    >>> parse_since("2026-11-30")
    datetime.datetime(2026, 11, 30, 0, 0, tzinfo=datetime.timezone.utc)
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter("use a date (2026-11-30) or an ISO instant (2026-11-30T08:00:00Z)") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def render(report: dict[str, Any]) -> str:
    """The report as terminal tables: per model and prompt, then per week, then rejection reasons."""
    out = io.StringIO()
    console = Console(file=out, width=TABLE_WIDTH, no_color=True, highlight=False, markup=False)
    since = f" since {report['since']}" if report["since"] else ""
    overall = report["overall"]
    console.print(
        f"{overall['summaries']} draft(s){since}: {overall['reviewed']} reviewed, "
        f"{overall['pending']} pending, {overall['superseded']} superseded unreviewed"
    )
    for title, groups, first in (
        ("By model and prompt", report["by_model_prompt"], 1),
        ("By week (ISO week of the draft)", report["by_week"], 0),
    ):
        table = Table(title=title, title_justify="left")
        for column in TABLE_COLUMNS[first:]:
            table.add_column(column, justify="left" if column in ("week", "model", "prompt") else "right")
        for row in table_rows(groups):
            table.add_row(*row[first:])
        console.print(table)
    for group in report["by_model_prompt"]:
        reasons = group["rejection_reasons"]
        if not reasons and not group["rejections_without_reason"]:
            continue
        console.print(
            f"Rejection reasons, {group['model_name']} {group['model_sha256'][:12]} {group['prompt']}:"
        )
        for item in reasons:
            console.print(f"  {item['count']:>3}  {item['reason']}")
        if group["rejections_without_reason"]:
            console.print(f"  {group['rejections_without_reason']:>3}  (no reason given)")
    for group in report.get("cds_feedback") or []:
        reasons = ", ".join(f"{r['reason']} {r['count']}" for r in group["override_reasons"])
        console.print(
            f"CDS cards, {group['model_name']} {group['model_sha256'][:12]} {group['prompt']}: "
            f"{group['accepted']} accepted, {group['overridden']} overridden"
            + (f" (override reasons: {reasons})" if reasons else "")
        )
    return out.getvalue()


@click.command(cls=ChartbriefCommand)
@click.option("--since", "since_text", default=None, help="Only drafts created on or after DATE (ISO).")
@json_option("the report")
@db_url_option
def monitor(since_text: str | None, as_json: bool, db_url: str | None) -> None:
    """Approval, edit and rejection rates, edit size, rejection reasons and time to review."""
    try:
        since = parse_since(since_text)
    except click.BadParameter as exc:
        fail(f"--since {since_text!r}: {exc.message}", EXIT_BAD_INPUT)
    settings = build_settings(db__url=db_url)
    store = SqlSummaryStore.from_url(settings.db.url)
    try:
        report = monitor_report(
            summaries(store.sessions),
            review_outcomes(store.sessions),
            audit.rejections(store.sessions),
            since=since,
        )
    finally:
        store.close()
    click.echo(json.dumps(report, indent=2) if as_json else render(report), nl=as_json)
