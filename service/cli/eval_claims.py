"""`chartbrief eval claims`: the verifier scored on a labelled claim corpus."""

from __future__ import annotations

import json
from pathlib import Path

import click

from service.cli.common import ChartbriefCommand, json_option
from service.eval.claims import evaluate, render_text, write_report


@click.command(cls=ChartbriefCommand, name="claims")
@click.option(
    "--bundles",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder holding the corpus's bundle files (.json / .json.gz), searched recursively.",
)
@click.option(
    "--claims",
    "corpus",
    required=True,
    type=click.Path(path_type=Path),
    help="Labelled claims, one JSON object a line (bundle, patient, text, cites, label, kind).",
)
@json_option("the report")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write claims.json here.")
def claims(bundles: Path, corpus: Path, as_json: bool, out: Path | None) -> None:
    """Score the claim verifier: supported kept, unsupported-or-contradicted kept, per kind, and
    every misjudged claim with the verifier's reason."""
    result, _judged = evaluate(corpus, bundles)
    if out is not None:
        write_report(result, out)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(render_text(result), nl=False)
