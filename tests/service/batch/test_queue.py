"""The queue's retry policy for Procrastinate jobs (pure: no database)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from procrastinate.jobs import Job

from fhir_adapters.client import backoff_seconds
from service.batch.queue import BackoffRetry, RetryLater


@pytest.mark.parametrize("attempts", [0, 1, 2])
def test_queue_retries_a_retry_later_with_a_doubling_wait(attempts: int) -> None:
    policy = BackoffRetry(initial_seconds=10, max_seconds=1000, max_job_attempts=5)
    job = Job(queue="q", lock=None, queueing_lock=None, task_name="t", attempts=attempts)
    before = datetime.now(UTC)
    decision = policy.get_retry_decision(exception=RetryLater("503"), job=job)
    assert decision is not None and decision.retry_at is not None
    wait = (decision.retry_at - before).total_seconds()
    assert wait == pytest.approx(backoff_seconds(attempts + 1, 10, 1000), abs=1.0)
    assert policy.get_retry_decision(exception=ValueError("bug"), job=job) is None


def test_queue_stops_retrying_at_the_backstop() -> None:
    policy = BackoffRetry(initial_seconds=1, max_seconds=1, max_job_attempts=3)
    job = Job(queue="q", lock=None, queueing_lock=None, task_name="t", attempts=2)
    assert policy.get_retry_decision(exception=RetryLater("503"), job=job) is None
