"""The batch on PostgreSQL: Procrastinate jobs, three `chartbrief batch worker` processes, one SIGKILLed.

Needs the PostgreSQL server at 127.0.0.1:5432 (trust auth, database `test`); the test runs in a
schema of its own, dropped at the end. Skipped, with the reason printed, only when no PostgreSQL
answers there.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psycopg
import pytest

from service.db.batch import DONE, RUNNING, BatchRepository, RunItem
from service.dev.devserver import REPO_ROOT
from tests.integration.test_batch import (
    batch_command,
    start_loaded_server,
    subprocess_env,
    summaries_by_patient,
)

pytestmark = [pytest.mark.integration, pytest.mark.model]

PG = "postgresql://postgres@127.0.0.1:5432/test"
WORKERS = 3
TIMEOUT_SECONDS = 900


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema in the `test` database, as the search_path of a SQLAlchemy URL."""
    try:
        admin = psycopg.connect(PG, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        reason = f"no PostgreSQL reachable at 127.0.0.1:5432/test ({type(exc).__name__})"
        print(f"SKIPPED: {reason}")  # noqa: T201 - the reason must show in the test output
        pytest.skip(reason)
    schema = f"cb_batch_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _items(db_url: str) -> list[RunItem]:
    repo = BatchRepository.from_url(db_url)
    try:
        runs = repo.list_runs(limit=1)
        return repo.items(runs[0].id) if runs else []
    finally:
        repo.close()


def _wait_for(what: str, check: object, timeout: float = TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_three_workers_one_killed_summarize_every_patient_exactly_once(
    pg_schema: str, tmp_path: Path
) -> None:
    server, loaded = start_loaded_server()
    everyone = sorted(p.id for p in loaded)
    env = subprocess_env(
        CHARTBRIEF_FHIR__BASE_URL=server.base_url,
        CHARTBRIEF_DB__URL=pg_schema,
        CHARTBRIEF_LLM__N_THREADS="1",  # three workers share two cores
        CHARTBRIEF_LLM__MAX_TOKENS="64",
        CHARTBRIEF_BATCH__HEARTBEAT_SECONDS="1",
        CHARTBRIEF_BATCH__STALLED_AFTER_SECONDS="10",
        CHARTBRIEF_BATCH__POLL_SECONDS="0.5",
        CHARTBRIEF_BATCH__RETRY_WAIT_SECONDS="1",
        CHARTBRIEF_BATCH__SCHEDULE="",
    )
    logs: list[IO[bytes]] = []
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str, stdout: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("wb")
        logs.append(log)
        process = subprocess.Popen(  # noqa: S603 - our own CLI
            batch_command(*args), cwd=REPO_ROOT, env=env, stdout=stdout or log, stderr=log
        )
        processes.append(process)
        return process

    try:
        coordinator = start("run", "run", "--json", stdout=subprocess.PIPE)
        _wait_for("the run to be deferred", lambda: len(_items(pg_schema)) == len(everyone))
        workers = [start(f"worker{n}", "worker") for n in range(WORKERS)]
        pids = {w.pid: w for w in workers}

        def victim_item() -> RunItem | None:
            for item in _items(pg_schema):
                pid = int((item.worker or ":0").rpartition(":")[2])
                if item.state == RUNNING and pid in pids:
                    return item
            return None

        _wait_for("a worker to be summarizing", lambda: victim_item() is not None)
        victim = victim_item()
        assert victim is not None and victim.worker is not None
        killed = pids[int(victim.worker.rpartition(":")[2])]
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)

        out, _ = coordinator.communicate(timeout=TIMEOUT_SECONDS)
        assert coordinator.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
        report = json.loads(out)
        docs = summaries_by_patient(server.base_url, everyone)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for log in logs:
            log.close()
        server.stop()

    assert report["mode"] == "queue"
    assert (report["selected"], report["summarized"], report["failed"]) == (len(everyone), len(everyone), 0)
    items = {i.patient_id: i for i in _items(pg_schema)}
    assert all(i.state == DONE for i in items.values())
    assert items[victim.patient_id].attempts >= 2, "the killed worker's patient was picked up again"
    assert items[victim.patient_id].worker != victim.worker
    assert {pid: len(d) for pid, d in docs.items()} == dict.fromkeys(everyone, 1), "exactly once each"
