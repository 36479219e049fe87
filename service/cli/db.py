"""`chartbrief db upgrade | current | purge`: the database schema, by Alembic migrations, and the
removal of expired sign-in states and sessions (which `chartbrief serve` also does on a schedule)."""

from __future__ import annotations

import click
from sqlalchemy import create_engine

from service.cli.common import ChartbriefGroup, build_settings, db_url_option
from service.db.launch import purge_expired
from service.db.migrate import current_revision, head_revision, upgrade
from service.runtime import open_store


@click.group(cls=ChartbriefGroup)
def db() -> None:
    """Database schema (SQLite by default, PostgreSQL for many workers)."""


@db.command("upgrade")
@db_url_option
@click.option("--revision", default="head", show_default=True)
def upgrade_cmd(db_url: str | None, revision: str) -> None:
    """Apply the migrations up to REVISION."""
    settings = build_settings(db__url=db_url)
    engine = create_engine(settings.db.url)
    try:
        before = current_revision(engine)
        after = upgrade(engine, revision)
    finally:
        engine.dispose()
    click.echo(f"database at revision {after} (was {before or 'empty'})")


@db.command("current")
@db_url_option
def current_cmd(db_url: str | None) -> None:
    """Show the database's revision and the newest one."""
    settings = build_settings(db__url=db_url)
    engine = create_engine(settings.db.url)
    try:
        click.echo(f"current {current_revision(engine) or 'empty'}, newest {head_revision()}")
    finally:
        engine.dispose()


@db.command("purge")
@db_url_option
def purge_cmd(db_url: str | None) -> None:
    """Delete expired or used sign-in states and expired sessions (with their encrypted tokens)."""
    settings = build_settings(db__url=db_url)
    store = open_store(settings)
    try:
        purged = purge_expired(store.sessions)
    finally:
        store.close()
    click.echo(f"purged {purged.launch_states} sign-in states and {purged.sessions} sessions")
