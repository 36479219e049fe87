"""`chartbrief` - the command-line entry. Each command lives in its own module and calls one
function of the service layer."""

from __future__ import annotations

import click

from service.cli.apikey import apikey
from service.cli.batch import batch
from service.cli.common import ChartbriefGroup
from service.cli.db import db
from service.cli.eval import eval_group
from service.cli.keys import keys
from service.cli.models import models
from service.cli.monitor import monitor
from service.cli.recall import recall
from service.cli.sandbox import sandbox
from service.cli.serve import serve
from service.cli.summarize import summarize


@click.group(cls=ChartbriefGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chartbrief")
def cli() -> None:
    """Grounded, AI-labelled clinical summaries from a FHIR R4 server, with a local model."""


cli.add_command(summarize)
cli.add_command(sandbox)
cli.add_command(keys)
cli.add_command(apikey)
cli.add_command(serve)
cli.add_command(batch)
cli.add_command(db)
cli.add_command(eval_group)
cli.add_command(monitor)
cli.add_command(recall)
cli.add_command(models)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
