"""`chartbrief sandbox load`: put Synthea test patients into a FHIR sandbox (HAPI's or a local one)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from service.cli.common import EXIT_BAD_INPUT, ChartbriefGroup, build_settings, fail, fhir_base_option, run
from service.dev.sandbox import LoadFailure, load_files
from service.fhir import fhir_client


@click.group(cls=ChartbriefGroup)
def sandbox() -> None:
    """Developer sandbox: load Synthea patients."""


@sandbox.command("load")
@fhir_base_option
@click.option("--json", "as_json", is_flag=True, help='Print {"patients": [{id, name, source_file}]}.')
@click.option(
    "--timeout",
    default=300.0,
    show_default=True,
    type=click.FloatRange(1, 3600),
    help="Seconds one request may take (a 1,000-entry transaction is slow on some servers).",
)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@run
async def load(fhir_base: str, as_json: bool, timeout: float, files: tuple[Path, ...]) -> None:
    """Load Synthea transaction bundles (.json or .json.gz) into a FHIR server.

    Synthea 3.x conditional references to practitioners, organizations and locations are
    created first, so every bundle loads on a fresh server.
    """
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}", EXIT_BAD_INPUT)
    settings = build_settings(fhir__base_url=fhir_base, fhir__timeout_seconds=timeout)
    failures: list[LoadFailure] = []
    async with fhir_client(settings.fhir) as client:
        loaded = await load_files(client, list(files), failures=failures)
    if as_json:
        payload = {
            "patients": [{"id": p.id, "name": p.name, "source_file": p.source_file} for p in loaded],
            "failed": [{"source_file": f.source_file, "reason": f.reason} for f in failures],
        }
        click.echo(json.dumps(payload, indent=2))
    else:
        for p in loaded:
            click.echo(f"{p.id}\t{p.name}\t{p.source_file}\t{p.resources} resources")
    for f in failures:
        click.echo(f"chartbrief: not loaded: {f.source_file}: {f.reason}", err=True)
    if failures:
        raise SystemExit(EXIT_BAD_INPUT)
