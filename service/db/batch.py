"""Batch runs and their items, and the repository that reads and moves them.

A `Run` is one nightly (or ad hoc) batch over one FHIR server; a `RunItem` is one patient in it,
moving through the states `queued -> running -> done | skipped | failed` (and back to `queued`
for a retry or after a crash). `chartbrief batch status` and `batch report` read these rows; the
one-process runner and the Procrastinate workers write them.

What it must not do: decide anything (what to retry, when a run is dead: that is
`service.batch.items`), or store PHI: patient ids, resource ids, counts, timings and error classes only.
Every change is one short transaction, so several workers on PostgreSQL can share a run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    func,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from service.db.models import Base

# Item states. `skipped` = skipped unchanged: its summary of the same inputs, prompt and model stands.
QUEUED, RUNNING, DONE, SKIPPED, FAILED = "queued", "running", "done", "skipped", "failed"
ITEM_STATES = (QUEUED, RUNNING, DONE, SKIPPED, FAILED)
OPEN_STATES = (QUEUED, RUNNING)

# Run states.
RUN_RUNNING = "running"
RUN_COMPLETED = "completed"
RUN_COMPLETED_WITH_FAILURES = "completed_with_failures"
RUN_FINAL_STATES = (RUN_COMPLETED, RUN_COMPLETED_WITH_FAILURES)

# Two workers creating the tables at once on a fresh PostgreSQL database would collide.


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they were written in UTC."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def process_name() -> str:
    """`host:pid` of this process, as recorded on runs and items."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Run(Base):
    __tablename__ = "batch_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(String(30), default=RUN_RUNNING, index=True)
    mode: Mapped[str] = mapped_column(String(10))  # local (one process) | queue (Procrastinate workers)
    fhir_base: Mapped[str] = mapped_column(String(500), index=True)
    # changed | bulk | bulk-group:<id> (incremental: each starts where the last finished run of its kind
    # began) | group:<id> | file:<name>
    selection: Mapped[str] = mapped_column(String(200))
    since: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the watermark it selected from
    watermark: Mapped[str | None] = mapped_column(String(40), nullable=True)  # server time at its start
    transaction_time: Mapped[str | None] = mapped_column(String(40), nullable=True)  # Bulk Data manifest
    selection_problems: Mapped[int] = mapped_column(Integer, default=0)
    selected: Mapped[int] = mapped_column(Integer, default=0)
    summarized: Mapped[int] = mapped_column(Integer, default=0)
    skipped_unchanged: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    machine_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    owner: Mapped[str | None] = mapped_column(String(300), nullable=True)  # host:pid driving it
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RunItem(Base):
    __tablename__ = "batch_run_items"
    __table_args__ = (UniqueConstraint("run_id", "patient_id", name="uq_batch_item_run_patient"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("batch_runs.id", ondelete="CASCADE"), index=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(10), default=QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(String(300), nullable=True)  # error class + short reason
    queued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    seconds_fetch: Mapped[float] = mapped_column(Float, default=0.0)
    seconds_generate: Mapped[float] = mapped_column(Float, default=0.0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    document_reference: Mapped[str | None] = mapped_column(String(200), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(300), nullable=True)


@dataclass(frozen=True)
class ItemOutcome:
    """What one finished patient cost and wrote."""

    state: str  # DONE | SKIPPED
    seconds: float = 0.0
    seconds_fetch: float = 0.0
    seconds_generate: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cpu_seconds: float = 0.0
    document_reference: str | None = None


@dataclass
class BatchRepository:
    engine: Engine
    sessions: sessionmaker[Session]

    @classmethod
    def from_url(cls, url: str) -> BatchRepository:
        from service.db.migrate import open_database  # the migrations import this module's tables

        engine = open_database(url)
        return cls(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    # -- runs ----------------------------------------------------------------------------------------

    def create_run(
        self,
        *,
        fhir_base: str,
        mode: str,
        selection: str,
        patient_ids: Sequence[str],
        since: str | None = None,
        watermark: str | None = None,
        transaction_time: str | None = None,
        selection_problems: int = 0,
        owner: str | None = None,
        started_at: datetime | None = None,
    ) -> int:
        """A new running run with one queued item per distinct patient id, in the order given.
        `started_at`: when its selection began (default now)."""
        unique = list(dict.fromkeys(patient_ids))
        now = utcnow()
        with self.sessions.begin() as s:
            run = Run(
                fhir_base=fhir_base,
                mode=mode,
                selection=selection,
                since=since,
                watermark=watermark,
                transaction_time=transaction_time,
                selection_problems=selection_problems,
                selected=len(unique),
                owner=owner,
                started_at=started_at or now,
                heartbeat_at=now,
            )
            s.add(run)
            s.flush()
            s.add_all(RunItem(run_id=run.id, patient_id=pid, queued_at=now) for pid in unique)
            return run.id

    def get_run(self, run_id: int) -> Run | None:
        with self.sessions() as s:
            return s.get(Run, run_id)

    def list_runs(self, *, fhir_base: str | None = None, limit: int = 20) -> list[Run]:
        with self.sessions() as s:
            query = select(Run).order_by(Run.id.desc()).limit(limit)
            if fhir_base is not None:
                query = query.where(Run.fhir_base == fhir_base)
            return list(s.scalars(query))

    def unfinished_run(self, fhir_base: str) -> Run | None:
        """The latest run of this server that has not reached a final state."""
        with self.sessions() as s:
            return s.scalars(
                select(Run)
                .where(Run.fhir_base == fhir_base, Run.status == RUN_RUNNING)
                .order_by(Run.id.desc())
                .limit(1)
            ).first()

    def last_finished_run(self, fhir_base: str, selection: str) -> Run | None:
        """The latest finished run of this server with the same selection kind: its watermark (or Bulk
        Data transactionTime) and its failed patients start the next incremental run."""
        with self.sessions() as s:
            return s.scalars(
                select(Run)
                .where(
                    Run.fhir_base == fhir_base,
                    Run.selection == selection,
                    Run.status.in_(RUN_FINAL_STATES),
                )
                .order_by(Run.id.desc())
                .limit(1)
            ).first()

    def take_over(self, run_id: int, owner: str) -> None:
        """Record that this process now drives the run (resume)."""
        with self.sessions.begin() as s:
            s.execute(update(Run).where(Run.id == run_id).values(owner=owner, heartbeat_at=utcnow()))

    def heartbeat(self, run_id: int) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Run).where(Run.id == run_id).values(heartbeat_at=utcnow()))

    def add_usage(self, run_id: int, *, cpu_seconds: float = 0.0, machine_seconds: float = 0.0) -> None:
        """Add to the run's CPU and machine seconds (an increment, so several workers may add)."""
        if cpu_seconds <= 0 and machine_seconds <= 0:
            return
        with self.sessions.begin() as s:
            s.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(
                    cpu_seconds=Run.cpu_seconds + max(cpu_seconds, 0.0),
                    machine_seconds=Run.machine_seconds + max(machine_seconds, 0.0),
                    heartbeat_at=utcnow(),
                )
            )

    def finish_run_if_done(self, run_id: int) -> bool:
        """Close the run when no item is queued or running; True if this call closed it.

        Safe when several workers finish their last items at once: only one update matches.
        """
        with self.sessions.begin() as s:
            counts = _state_counts(s, run_id)
            if any(counts.get(state, 0) for state in OPEN_STATES):
                return False
            tokens = s.execute(
                select(
                    func.coalesce(func.sum(RunItem.prompt_tokens), 0),
                    func.coalesce(func.sum(RunItem.completion_tokens), 0),
                ).where(RunItem.run_id == run_id)
            ).one()
            failed = counts.get(FAILED, 0)
            result = s.execute(
                update(Run)
                .where(Run.id == run_id, Run.status == RUN_RUNNING)
                .values(
                    status=RUN_COMPLETED_WITH_FAILURES if failed else RUN_COMPLETED,
                    finished_at=utcnow(),
                    summarized=counts.get(DONE, 0),
                    skipped_unchanged=counts.get(SKIPPED, 0),
                    failed=failed,
                    prompt_tokens=int(tokens[0]),
                    completion_tokens=int(tokens[1]),
                )
            )
            return bool(getattr(result, "rowcount", 0))

    # -- items ---------------------------------------------------------------------------------------

    def items(self, run_id: int) -> list[RunItem]:
        with self.sessions() as s:
            return list(s.scalars(select(RunItem).where(RunItem.run_id == run_id).order_by(RunItem.id)))

    def item(self, run_id: int, patient_id: str) -> RunItem | None:
        with self.sessions() as s:
            return s.scalars(
                select(RunItem).where(RunItem.run_id == run_id, RunItem.patient_id == patient_id)
            ).first()

    def patients_in_state(self, run_id: int, states: Iterable[str]) -> list[str]:
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(RunItem.patient_id)
                    .where(RunItem.run_id == run_id, RunItem.state.in_(list(states)))
                    .order_by(RunItem.id)
                )
            )

    def state_counts(self, run_id: int) -> dict[str, int]:
        with self.sessions() as s:
            return _state_counts(s, run_id)

    def start_item(self, run_id: int, patient_id: str, worker: str) -> int | None:
        """Mark the item running and count the attempt; its attempt number, or None when the item is
        already final (a job delivered twice) or unknown."""
        with self.sessions.begin() as s:
            query = select(RunItem).where(RunItem.run_id == run_id, RunItem.patient_id == patient_id)
            if self.is_postgresql:
                query = query.with_for_update()
            row = s.scalars(query).first()
            if row is None or row.state not in OPEN_STATES:
                return None
            row.state = RUNNING
            row.attempts += 1
            row.started_at = utcnow()
            row.worker = worker
            return row.attempts

    def finish_item(self, run_id: int, patient_id: str, outcome: ItemOutcome) -> None:
        with self.sessions.begin() as s:
            s.execute(
                update(RunItem)
                .where(RunItem.run_id == run_id, RunItem.patient_id == patient_id)
                .values(
                    state=outcome.state,
                    error=None,
                    finished_at=utcnow(),
                    seconds=outcome.seconds,
                    seconds_fetch=outcome.seconds_fetch,
                    seconds_generate=outcome.seconds_generate,
                    prompt_tokens=outcome.prompt_tokens,
                    completion_tokens=outcome.completion_tokens,
                    cpu_seconds=outcome.cpu_seconds,
                    document_reference=outcome.document_reference,
                )
            )

    def set_state(self, run_id: int, patient_id: str, state: str, *, error: str | None = None) -> None:
        """Move an item to `queued` (a retry) or `failed` (given up), keeping the last error."""
        if state not in ITEM_STATES:
            raise ValueError(f"unknown item state {state!r}")
        values: dict[str, Any] = {"state": state, "error": error[:300] if error else error}
        if state == FAILED:
            values["finished_at"] = utcnow()
        with self.sessions.begin() as s:
            s.execute(
                update(RunItem)
                .where(RunItem.run_id == run_id, RunItem.patient_id == patient_id)
                .values(**values)
            )

    def running_items(self, run_id: int) -> list[tuple[str, int]]:
        """(patient id, attempts) of the items marked running."""
        with self.sessions() as s:
            rows = s.execute(
                select(RunItem.patient_id, RunItem.attempts)
                .where(RunItem.run_id == run_id, RunItem.state == RUNNING)
                .order_by(RunItem.id)
            ).all()
            return [(str(r[0]), int(r[1])) for r in rows]


def _state_counts(s: Session, run_id: int) -> dict[str, int]:
    rows = s.execute(
        select(RunItem.state, func.count()).where(RunItem.run_id == run_id).group_by(RunItem.state)
    ).all()
    return {str(state): int(n) for state, n in rows}


__all__ = [
    "DONE",
    "FAILED",
    "ITEM_STATES",
    "OPEN_STATES",
    "QUEUED",
    "RUNNING",
    "RUN_COMPLETED",
    "RUN_COMPLETED_WITH_FAILURES",
    "RUN_FINAL_STATES",
    "RUN_RUNNING",
    "SKIPPED",
    "BatchRepository",
    "ItemOutcome",
    "Run",
    "RunItem",
    "as_utc",
    "process_name",
]
