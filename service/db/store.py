"""The summary record store (`SummaryStore`): SQLAlchemy 2, SQLite file by default, PostgreSQL at scale.

It records; it never decides what to write to the EHR (the idempotency identifier on the
server does that). A retried summary with the same key updates its row instead of adding one.

`SummaryStore` is the seam the pipeline sees: three calls that take and return plain data
(`StoredSummary`, never a live ORM row), met by `SqlSummaryStore` and by `MemorySummaryStore`
(tests, and runs whose summaries must not reach the database).

The rule for async code: every synchronous database call made from a coroutine goes through
`in_thread` (a worker thread), so no query holds the event loop. SQLAlchemy sessions here are
synchronous; a coroutine that calls them directly stalls every other request while SQLite or
PostgreSQL answers.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, ParamSpec, Protocol, TypeVar

from anyio import to_thread
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.migrate import open_database
from service.db.models import SummaryRow

P = ParamSpec("P")
T = TypeVar("T")

# A rerun that found its summary already on the server keeps the ids first written.
_KEPT_WHEN_ABSENT = frozenset({"document_reference", "provenance", "device"})


async def in_thread(call: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`call(*args, **kwargs)` in a worker thread: how async code makes a synchronous database call."""
    return await to_thread.run_sync(functools.partial(call, *args, **kwargs))


@dataclass(frozen=True)
class StoredSummary:
    """One recorded summary, as plain data: what was read, with which prompt and model, and what
    was written."""

    id: str
    created_at: datetime
    fhir_base: str
    patient_id: str
    encounter_id: str | None
    idempotency_key: str
    inputs: list[str]
    prompt_id: str
    prompt_version: str
    prompt_sha256: str
    model_name: str
    model_file: str
    model_sha256: str
    sampling: str
    prompt_tokens: int
    completion_tokens: int
    claims_kept: int
    claims_dropped: int
    seconds_fetch: float
    seconds_generate: float
    seconds_total: float
    outcome: str  # written | unchanged | dry-run
    document_reference: str | None
    provenance: str | None
    device: str | None
    superseded: str | None
    seed: int | None = None  # the sampling seed, when the row was recorded with one


_RECORD_FIELDS = tuple(f.name for f in fields(StoredSummary))


class SummaryStore(Protocol):
    def record(self, fields: dict[str, Any]) -> str: ...

    def latest_for_patient(self, fhir_base: str, patient_id: str) -> StoredSummary | None: ...

    def find(self, fhir_base: str, idempotency_key: str) -> StoredSummary | None: ...


def _updates(fields: Mapping[str, Any]) -> dict[str, Any]:
    """What a rerun of the same key changes on its row: everything, except the written ids it lacks.

    >>> _updates({"outcome": "unchanged", "document_reference": None})
    {'outcome': 'unchanged'}
    """
    return {k: v for k, v in fields.items() if v is not None or k not in _KEPT_WHEN_ABSENT}


def _record_of(row: SummaryRow) -> StoredSummary:
    return StoredSummary(**{name: getattr(row, name) for name in _RECORD_FIELDS})


@dataclass
class SqlSummaryStore:
    engine: Engine
    sessions: sessionmaker[Session]

    @classmethod
    def from_url(cls, url: str) -> SqlSummaryStore:
        engine = open_database(url)
        return cls(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))

    def record(self, fields: dict[str, Any]) -> str:
        """Insert the summary's row, or update the row of the same key on the same server."""
        with self.sessions.begin() as s:
            row = s.scalars(
                select(SummaryRow).where(
                    SummaryRow.idempotency_key == fields["idempotency_key"],
                    SummaryRow.fhir_base == fields["fhir_base"],
                )
            ).first()
            if row is None:
                row = SummaryRow(**fields)
                s.add(row)
            else:
                for k, v in _updates(fields).items():
                    setattr(row, k, v)
            s.flush()
            return row.id

    def latest_for_patient(self, fhir_base: str, patient_id: str) -> StoredSummary | None:
        with self.sessions() as s:
            row = s.scalars(
                select(SummaryRow)
                .where(SummaryRow.fhir_base == fhir_base, SummaryRow.patient_id == patient_id)
                .order_by(SummaryRow.created_at.desc())
            ).first()
            return _record_of(row) if row is not None else None

    def find(self, fhir_base: str, idempotency_key: str) -> StoredSummary | None:
        with self.sessions() as s:
            row = s.scalars(
                select(SummaryRow).where(
                    SummaryRow.idempotency_key == idempotency_key, SummaryRow.fhir_base == fhir_base
                )
            ).first()
            return _record_of(row) if row is not None else None

    def count(self) -> int:
        with self.sessions() as s:
            return len(s.scalars(select(SummaryRow.id)).all())

    def close(self) -> None:
        self.engine.dispose()


_DEFAULTS: dict[str, Any] = {
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "claims_kept": 0,
    "claims_dropped": 0,
    "seconds_fetch": 0.0,
    "seconds_generate": 0.0,
    "seconds_total": 0.0,
    "encounter_id": None,
    "document_reference": None,
    "provenance": None,
    "device": None,
    "superseded": None,
    "seed": None,
}


@dataclass
class MemorySummaryStore:
    """A `SummaryStore` in memory, with the database's rules (one record per key and server, a rerun
    keeps the ids first written): for tests, and for runs that must not reach the database."""

    records: dict[tuple[str, str], StoredSummary] = field(default_factory=dict)

    def record(self, fields: dict[str, Any]) -> str:
        key = (str(fields["fhir_base"]), str(fields["idempotency_key"]))
        old = self.records.get(key)
        if old is None:
            new = {"id": str(uuid.uuid4()), "created_at": datetime.now(UTC), **_DEFAULTS, **fields}
        else:
            new = {**{name: getattr(old, name) for name in _RECORD_FIELDS}, **_updates(fields)}
        self.records[key] = StoredSummary(**new)
        return self.records[key].id

    def latest_for_patient(self, fhir_base: str, patient_id: str) -> StoredSummary | None:
        mine = [r for r in self.records.values() if r.fhir_base == fhir_base and r.patient_id == patient_id]
        # Newest first, and of two recorded in the same instant the later one.
        return max(reversed(mine), key=lambda r: r.created_at, default=None)

    def find(self, fhir_base: str, idempotency_key: str) -> StoredSummary | None:
        return self.records.get((fhir_base, idempotency_key))
