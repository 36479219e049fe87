"""`chartbrief eval claims`: the verifier scored on a labelled claim corpus."""

from __future__ import annotations

import click


@click.command(name="claims")
def claims() -> None:
    """Score the claim verifier on a labelled corpus (JSONL) against its bundles."""
    raise click.ClickException("not yet")
