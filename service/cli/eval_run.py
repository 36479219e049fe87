"""`chartbrief eval run`: summarize patients without writing back and report what the summaries are worth."""

from __future__ import annotations

import click


@click.command(name="run")
def run_eval() -> None:
    """Summarize patients (from bundle files or a FHIR server) and write report.json + report.html."""
    raise click.ClickException("not yet")
