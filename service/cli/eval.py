"""`chartbrief eval`: score the verifier on labelled claims, and summaries on whole records."""

from __future__ import annotations

import click

from service.cli.common import ChartbriefGroup
from service.cli.eval_claims import claims
from service.cli.eval_run import run_eval


@click.group(name="eval", cls=ChartbriefGroup)
def eval_group() -> None:
    """Measure quality: the verifier on labelled claims, summaries on whole records."""


eval_group.add_command(claims)
eval_group.add_command(run_eval)
