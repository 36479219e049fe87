"""`chartbrief apikey create|list|revoke`: API keys for service accounts calling the REST API.

The secret is printed once, by `create`, and never stored: only its sha256 is. `list` shows ids,
names, scopes and state, never a secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy.orm import Session, sessionmaker

from service.cli.common import EXIT_BAD_INPUT, ChartbriefGroup, build_settings, db_url_option, fail
from service.db import apikeys
from service.db.store import SqlSummaryStore


@contextmanager
def _database(db_url: str | None) -> Iterator[sessionmaker[Session]]:
    settings = build_settings(db__url=db_url)
    store = SqlSummaryStore.from_url(settings.db.url)
    try:
        yield store.sessions
    finally:
        store.close()


@click.group(cls=ChartbriefGroup)
def apikey() -> None:
    """Create, list and revoke API keys for service accounts (hashed; the secret is shown once)."""


@apikey.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    help="A scope the key grants (repeat for several), e.g. --scope summaries.read.",
)
@click.option("--patient", default=None, help="Limit the key to this one Patient id.")
@db_url_option
def create(name: str, scopes: tuple[str, ...], patient: str | None, db_url: str | None) -> None:
    """Create a key named NAME and print its secret once."""
    with _database(db_url) as db:
        try:
            key_id, secret = apikeys.create(db, name, scopes, patient)
        except ValueError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
    click.echo(f"id:     {key_id}")
    click.echo(f"secret: {secret}")
    click.echo("Store the secret now: it is not kept and cannot be shown again.", err=True)


@apikey.command("list")
@db_url_option
def list_command(db_url: str | None) -> None:
    """List keys: id, name, scopes, patient limit, created, revoked."""
    with _database(db_url) as db:
        keys = apikeys.list_keys(db)
    if not keys:
        click.echo("no API keys")
        return
    for key in keys:
        state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        patient = f" patient={key.patient_id}" if key.patient_id else ""
        created = f"created {key.created_at:%Y-%m-%d}"
        click.echo(f"{key.id}  {key.name}  {' '.join(key.scopes)}{patient}  {created}  {state}")


@apikey.command("revoke")
@click.argument("key_id")
@db_url_option
def revoke(key_id: str, db_url: str | None) -> None:
    """Revoke the key KEY_ID (from `chartbrief apikey list`)."""
    with _database(db_url) as db:
        done = apikeys.revoke(db, key_id)
    if not done:
        fail(f"no active API key with id {key_id}", EXIT_BAD_INPUT)
    click.echo(f"revoked {key_id}")
