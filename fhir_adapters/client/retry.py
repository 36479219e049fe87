"""When to try a FHIR request again: Retry-After, HTTP dates and exponential backoff. Pure.

The client's retries and the batch's waits both read a server's `Retry-After` and `Date`
headers here, and back off by the same rule, so a server is asked to wait for the same way
everywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# A server asking for a longer pause than this is better treated as down for this attempt.
RETRY_AFTER_CAP_SECONDS = 60.0


def parse_http_date(value: str | None) -> datetime | None:
    """The time in an HTTP date (a `Date` or `Retry-After` header), or None when missing or unreadable.

    A date without a zone is taken as UTC, as HTTP dates always are.

    >>> parse_http_date("Mon, 23 Nov 2026 16:09:18 GMT").isoformat()
    '2026-11-23T16:09:18+00:00'
    >>> parse_http_date("yesterday") is None
    True
    """
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP date); None if unusable.

    >>> parse_retry_after("3", datetime(2024, 1, 1, tzinfo=UTC))
    3.0
    >>> parse_retry_after("Mon, 01 Jan 2024 00:00:10 GMT", datetime(2024, 1, 1, tzinfo=UTC))
    10.0
    >>> parse_retry_after("soon", datetime(2024, 1, 1, tzinfo=UTC)) is None
    True
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    when = parse_http_date(text)
    return None if when is None else max(0.0, (when - now).total_seconds())


def backoff_seconds(attempt: int, initial: float, cap: float, jitter: float = 0.0) -> float:
    """Wait after failed attempt `attempt` (1-based): initial * 2^(attempt-1) + jitter, capped.

    >>> [backoff_seconds(n, 0.5, 3.0) for n in (1, 2, 3, 4)]
    [0.5, 1.0, 2.0, 3.0]
    """
    exponent = min(attempt - 1, 62)  # no overflow for absurd attempt counts
    return min(initial * 2.0**exponent + jitter, cap)
