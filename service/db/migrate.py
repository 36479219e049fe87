"""Schema migrations (Alembic): `chartbrief db upgrade`, and the same on first use of a store.

The migration scripts in service/db/migrations/versions are the schema's source of truth; a test
checks that they produce exactly the tables the models declare. On PostgreSQL an upgrade runs
under an advisory lock, on SQLite under an exclusive lock of a file beside the database (SQLite
commits each DDL statement as it goes), so several processes starting on an empty database do not
race: the later ones wait, then find the schema there.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_LOCK_KEY = 0x63686272  # "chbr": one key for every chartbrief schema change


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "service/db/migrations/versions holds no migration"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """Hold an exclusive lock of `<database>.migrate-lock` (SQLite files only; else nothing)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{Path(database).expanduser()}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the database to `revision`; returns the revision it is at afterwards."""
    with _sqlite_file_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        command.upgrade(alembic_config(conn), revision)
    return current_revision(engine)


def ensure_schema(engine: Engine) -> None:
    """Upgrade to head unless the database is there already (one cheap query when it is)."""
    if current_revision(engine) != head_revision():
        upgrade(engine)


def open_database(url: str) -> Engine:
    """An engine for `url` with the schema at the newest migration (a SQLite file's folder is created)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, future=True, pool_pre_ping=True)
    ensure_schema(engine)
    return engine
