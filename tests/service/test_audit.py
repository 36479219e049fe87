"""Specifications of `audit.audited`, the one way an action is audited: an `ok` row with the detail the
block chose, or the row its failure rule chooses, and the error always raised again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db import audit
from service.db.store import SqlSummaryStore


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    store = SqlSummaryStore.from_url(f"sqlite:///{tmp_path}/cb.db")
    yield store.sessions
    store.close()


def refused_only(exc: Exception) -> tuple[audit.Outcome, str] | None:
    return ("denied", "refused") if isinstance(exc, PermissionError) else None


async def test_a_block_that_succeeds_writes_one_ok_row_with_its_detail(db: sessionmaker[Session]) -> None:
    async with audit.audited(
        db, actor="Practitioner/1", action="view", failure=refused_only, patient_id="p1", request_id="r1"
    ) as entry:
        entry.detail = "version 2"
    (row,) = audit.list_for_patient(db, "p1")
    assert (row.action, row.outcome, row.detail, row.request_id) == ("view", "ok", "version 2", "r1")


async def test_a_failure_writes_the_row_its_rule_chooses_and_is_raised_again(
    db: sessionmaker[Session],
) -> None:
    with pytest.raises(PermissionError):
        async with audit.audited(
            db, actor="Practitioner/1", action="view", failure=refused_only, patient_id="p1"
        ):
            raise PermissionError("no")
    (row,) = audit.list_for_patient(db, "p1")
    assert (row.outcome, row.detail) == ("denied", "refused")


async def test_a_failure_the_rule_does_not_claim_leaves_no_row(db: sessionmaker[Session]) -> None:
    with pytest.raises(KeyError):
        async with audit.audited(
            db, actor="Practitioner/1", action="view", failure=refused_only, patient_id="p1"
        ):
            raise KeyError("elsewhere")
    assert audit.list_for_patient(db, "p1") == []
