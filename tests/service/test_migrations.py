"""The migrations are the schema: they build exactly the tables the models declare, on SQLite and
PostgreSQL, and `chartbrief db upgrade` applies them."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import Engine, create_engine, inspect, text

from service.cli.main import cli
from service.db import batch as _batch  # noqa: F401 - the batch tables are part of the metadata
from service.db.migrate import current_revision, head_revision, upgrade
from service.db.models import Base
from service.db.store import SqlSummaryStore

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _differences(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def test_migrations_build_exactly_the_declared_tables_on_sqlite(tmp_path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/m.db")
    assert current_revision(engine) is None
    assert upgrade(engine) == head_revision()
    assert _differences(engine) == []
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
    assert upgrade(engine) == head_revision()  # idempotent


def test_summaries_recorded_before_the_seed_column_read_back_without_a_seed(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    engine = create_engine(url)
    assert upgrade(engine, "0002") == "0002"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO summaries (id, created_at, fhir_base, patient_id, idempotency_key, inputs,"
                " prompt_id, prompt_version, prompt_sha256, model_name, model_file, model_sha256,"
                " sampling, prompt_tokens, completion_tokens, claims_kept, claims_dropped, seconds_fetch,"
                " seconds_generate, seconds_total, outcome) VALUES ('r1', '2026-12-01 10:00:00', 'b',"
                " 'p1', 'k1', '[]', 'summary', 'v1', 'a', 'm', 'm.gguf', 'b', 'temperature=0.0 seed=42',"
                " 0, 0, 0, 0, 0, 0, 0, 'written')"
            )
        )
    engine.dispose()
    store = SqlSummaryStore.from_url(url)  # upgrades to head on first use
    try:
        assert current_revision(store.engine) == head_revision()
        row = store.find("b", "k1")
        assert row is not None and row.seed is None and row.sampling == "temperature=0.0 seed=42"
    finally:
        store.close()


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    admin = create_engine(PG_URL)
    try:
        with admin.connect():
            pass
    except Exception as exc:  # no server: skip, saying why
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}")
    schema = f"mig_{uuid.uuid4().hex[:8]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_migrations_build_exactly_the_declared_tables_on_postgresql(pg_engine: Engine) -> None:
    assert upgrade(pg_engine) == head_revision()
    assert _differences(pg_engine) == []


def test_db_upgrade_command_reports_the_revision(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    result = CliRunner().invoke(cli, ["db", "upgrade", "--db-url", url])
    assert result.exit_code == 0, result.output
    assert f"database at revision {head_revision()} (was empty)" in result.output
    again = CliRunner().invoke(cli, ["db", "current", "--db-url", url])
    assert f"current {head_revision()}" in again.output


def test_processes_starting_together_on_a_new_sqlite_file_all_find_the_schema(tmp_path) -> None:
    # SQLite commits each DDL statement as it goes: without the migration lock, a second process
    # sees half a schema and its own upgrade fails with "table ... already exists".
    url = f"sqlite:///{tmp_path}/fresh.db"
    start = tmp_path / "go"
    script = (
        "import pathlib, sys, time\n"
        "from service.db.migrate import open_database\n"
        "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.005)\n"
        "open_database(sys.argv[1])\n"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script, url, str(start)], stderr=subprocess.PIPE)  # noqa: S603
        for _ in range(4)
    ]
    time.sleep(1.5)  # every interpreter has imported and waits at the line
    start.touch()
    errors = [p.communicate(timeout=120)[1].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], errors
    assert current_revision(create_engine(url)) == head_revision()
