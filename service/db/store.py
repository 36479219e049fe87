"""The summary record store (`SummaryStore`): SQLAlchemy 2, SQLite file by default, PostgreSQL at scale.

It records; it never decides what to write to the EHR (the idempotency identifier on the
server does that). A retried summary with the same key updates its row instead of adding one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.migrate import open_database
from service.db.models import SummaryRow


class SummaryStore(Protocol):
    def record(self, fields: dict[str, Any]) -> str: ...

    def latest_for_patient(self, fhir_base: str, patient_id: str) -> SummaryRow | None: ...

    def find(self, fhir_base: str, idempotency_key: str) -> SummaryRow | None: ...


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
                for k, v in fields.items():
                    # A rerun that found its summary already on the server keeps the ids first written.
                    if v is not None or k not in ("document_reference", "provenance", "device"):
                        setattr(row, k, v)
            s.flush()
            return row.id

    def latest_for_patient(self, fhir_base: str, patient_id: str) -> SummaryRow | None:
        with self.sessions() as s:
            return s.scalars(
                select(SummaryRow)
                .where(SummaryRow.fhir_base == fhir_base, SummaryRow.patient_id == patient_id)
                .order_by(SummaryRow.created_at.desc())
            ).first()

    def find(self, fhir_base: str, idempotency_key: str) -> SummaryRow | None:
        with self.sessions() as s:
            return s.scalars(
                select(SummaryRow).where(
                    SummaryRow.idempotency_key == idempotency_key, SummaryRow.fhir_base == fhir_base
                )
            ).first()

    def count(self) -> int:
        with self.sessions() as s:
            return len(s.scalars(select(SummaryRow.id)).all())

    def close(self) -> None:
        self.engine.dispose()
