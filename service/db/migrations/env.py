"""Alembic environment: chartbrief's tables, on the connection `service.db.migrate` hands over."""

from __future__ import annotations

from alembic import context

from service.db import batch as _batch  # noqa: F401 - registers the batch tables on Base.metadata
from service.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("chartbrief migrations run online only: `chartbrief db upgrade`")
run_migrations_online()
