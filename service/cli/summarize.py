"""`chartbrief summarize`: one patient from any FHIR R4 server, written back unless --dry-run."""

from __future__ import annotations

import json

import click

from service.cli.common import (
    ChartbriefCommand,
    build_settings,
    db_url_option,
    fhir_base_option,
    json_option,
    model_path_option,
    run,
)
from service.pipeline import SummaryResult, summarize_patient
from service.runtime import open_services


@click.command(cls=ChartbriefCommand)
@fhir_base_option
@click.option("--patient", required=True, help="Patient id on that server.")
@click.option("--encounter", default=None, help="Focus the summary on this Encounter id.")
@click.option("--dry-run", is_flag=True, help="Summarize and print, but write nothing to the server.")
@json_option("the summary")
@db_url_option
@model_path_option
@click.pass_context
@run
async def summarize(
    ctx: click.Context,
    fhir_base: str,
    patient: str,
    encounter: str | None,
    dry_run: bool,
    as_json: bool,
    db_url: str | None,
    model_path: str | None,
) -> None:
    """Summarize one patient with the local model and write the AI-labelled draft back."""
    settings = build_settings(fhir__base_url=fhir_base, db__url=db_url, llm__model_path=model_path)
    # An embedding program (or a test) may hand over an already-loaded engine through ctx.obj.
    engine = (ctx.obj or {}).get("engine")
    async with open_services(settings, engine=engine) as svc:
        result = await summarize_patient(svc, patient, encounter_id=encounter, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(render_text(result))


def render_text(r: SummaryResult) -> str:
    """The human view: the document, then what was dropped and why, then the figures."""
    out = [r.markdown.rstrip(), ""]
    if r.dropped:
        out.append(f"Dropped by grounding ({len(r.dropped)}) - NOT part of the summary:")
        out += [f"  x {d.claim.text!r} [{', '.join(d.claim.citations)}]: {d.reason}" for d in r.dropped]
        out.append("")
    if r.skipped:
        out.append(f"Skipped while reading ({len(r.skipped)}):")
        out += [f"  - {s.resource}: {s.reason}" for s in r.skipped[:20]]
        if len(r.skipped) > 20:
            out.append(f"  ... and {len(r.skipped) - 20} more")
        out.append("")
    w = r.write
    if r.dry_run or w is None:
        written = "dry run: nothing written"
    elif w.created:
        written = f"wrote {w.document_reference}, {w.provenance}, {w.device}"
        if w.superseded:
            written += f" (supersedes {w.superseded})"
    else:
        written = f"unchanged: {w.document_reference} already holds this summary; nothing written"
    out.append(
        f"patient {r.patient}: claims kept {len(r.kept)}, dropped {len(r.dropped)}; facts {r.facts}; "
        f"tokens {r.prompt_tokens} in / {r.completion_tokens} out; {r.seconds:.1f}s "
        f"(fetch {r.seconds_fetch:.1f}s, model {r.seconds_generate:.1f}s); {written}"
    )
    out.append(
        f"model {r.model.file_name} sha256:{r.model.sha256[:12]}...; prompt {r.prompt.id}/{r.prompt.version} "
        f"sha256:{r.prompt.sha256[:12]}..."
    )
    return "\n".join(out)
