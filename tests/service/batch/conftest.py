"""What every batch test starts from: settings on a temporary SQLite database, and its run repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config import Settings
from service.db.batch import BatchRepository

BASE = "http://127.0.0.1:8998/fhir"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        fhir={"base_url": BASE, "max_attempts": 1},  # type: ignore[arg-type]
        db={"url": f"sqlite:///{tmp_path}/cb.db"},  # type: ignore[arg-type]
        batch={"retry_wait_seconds": 0, "max_attempts": 3, "heartbeat_seconds": 60},  # type: ignore[arg-type]
    )


@pytest.fixture
def repo(settings: Settings) -> Iterator[BatchRepository]:
    r = BatchRepository.from_url(settings.db.url)
    yield r
    r.close()
