"""Admission of model work: how many summaries may be queued or running in this process, in total
and per client, and the 429 that says so once either bound is reached.

Model work is whatever may read a patient's record and run the model for a request: an API job
(`POST /api/summaries`), an API stream, a review-screen stream, a regenerate. Each takes a `Place`
before it fetches anything or starts a task, and gives it back when it finishes, fails, is
cancelled or its client goes away; giving it back twice is harmless, so every exit path may do it.
A client is an API key, a JWT subject or a review session (`client` is an id chosen by the route).

Retry-After is an estimate of when the oldest place of the full bound frees: the mean duration of
the recently finished work (`work_estimate_seconds` until there is any) less that place's age.

What it must not do: make a caller wait for a place (a request that cannot be served now is told so
at once), hold anything of the work itself, or log more than the client id and counts.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import structlog

from service.config import ApiSettings
from service.errors import TooManyRequests

log = structlog.get_logger(__name__)

WorkKind = Literal["job", "api-stream", "review-stream", "regenerate"]
RECENT_RUNS = 20
MAX_RETRY_AFTER = 3600


@dataclass(eq=False)
class Place:
    """One admitted piece of work; `finish()` when it ran to its end, `release()` on any other exit."""

    admission: WorkAdmission = field(repr=False)
    client: str
    kind: WorkKind
    started: float
    released: bool = False

    def finish(self) -> None:
        """Give the place back and count its duration towards the Retry-After estimate."""
        if not self.released:
            self.admission.measure(self.admission.clock() - self.started)
        self.release()

    def release(self) -> None:
        """Give the place back without timing it (failed, cancelled, disconnected)."""
        if not self.released:
            self.released = True
            self.admission.give_back(self)


class WorkAdmission:
    """Counts the places taken, in total and per client, and refuses one past either bound."""

    def __init__(
        self,
        *,
        max_total: int,
        max_per_client: int,
        estimate_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.clock = clock
        self._default_estimate = estimate_seconds
        self._recent: deque[float] = deque(maxlen=RECENT_RUNS)
        self._by_client: dict[str, list[Place]] = {}
        # Told of each refusal as (kind, "client" | "total"): the metrics count them.
        self.on_refusal: Callable[[WorkKind, str], None] | None = None

    @classmethod
    def from_settings(cls, api: ApiSettings) -> WorkAdmission:
        return cls(
            max_total=api.max_queued_work,
            max_per_client=api.max_queued_work_per_client,
            estimate_seconds=api.work_estimate_seconds,
        )

    @property
    def in_flight(self) -> int:
        return sum(len(places) for places in self._by_client.values())

    def in_flight_for(self, client: str) -> int:
        return len(self._by_client.get(client, ()))

    def estimate_seconds(self) -> float:
        """How long one piece of work takes: the recent mean, or the configured guess before any."""
        if not self._recent:
            return self._default_estimate
        return sum(self._recent) / len(self._recent)

    def admit(self, client: str, kind: WorkKind) -> Place:
        """A place for `client`'s work, or `TooManyRequests` (429 with Retry-After) when a bound is full."""
        mine = self._by_client.get(client, [])
        total = self.in_flight
        if len(mine) >= self.max_per_client:
            self._refuse(
                client,
                kind,
                "client",
                mine,
                f"this client already has {len(mine)} of at most {self.max_per_client} summaries queued or "
                "running (CHARTBRIEF_API__MAX_QUEUED_WORK_PER_CLIENT)",
            )
        if total >= self.max_total:
            everyone = [p for places in self._by_client.values() for p in places]
            self._refuse(
                client,
                kind,
                "total",
                everyone,
                f"chartbrief is busy: {total} of at most {self.max_total} summaries are queued or running "
                "(CHARTBRIEF_API__MAX_QUEUED_WORK)",
            )
        place = Place(self, client, kind, self.clock())
        self._by_client.setdefault(client, []).append(place)
        return place

    @contextmanager
    def hold(self, client: str, kind: WorkKind) -> Iterator[Place]:
        """A place for the length of a `with` block: finished if the block ends, released if it raises."""
        place = self.admit(client, kind)
        try:
            yield place
        except BaseException:
            place.release()
            raise
        place.finish()

    def retry_after(self, places: list[Place]) -> int:
        """Seconds until the oldest of `places` is expected to free (at least 1, or a tenth of a run)."""
        estimate = self.estimate_seconds()
        now = self.clock()
        oldest = min((p.started for p in places), default=now)
        remaining = max(estimate - (now - oldest), estimate / 10)
        return min(MAX_RETRY_AFTER, max(1, math.ceil(remaining)))

    def measure(self, seconds: float) -> None:
        self._recent.append(max(0.0, seconds))

    def give_back(self, place: Place) -> None:
        places = self._by_client.get(place.client)
        if places is None or place not in places:
            return
        places.remove(place)
        if not places:
            del self._by_client[place.client]

    def _refuse(self, client: str, kind: WorkKind, bound: str, full: list[Place], message: str) -> None:
        retry_after = self.retry_after(full)
        if self.on_refusal is not None:
            self.on_refusal(kind, bound)
        log.warning(
            "work.refused",
            client=client,
            kind=kind,
            client_in_flight=self.in_flight_for(client),
            in_flight=self.in_flight,
            retry_after=retry_after,
        )
        raise TooManyRequests(f"{message}; try again in {retry_after} s", retry_after=retry_after)
