"""Prometheus metrics of one chartbrief process: what it summarized, how long each stage took, what
grounding dropped, what clinicians did with the drafts, how busy the model is, and the batch's progress.

`Metrics` owns its own `CollectorRegistry` (nothing is registered globally, so two apps in one
process, as the tests run them, never share counts). The web service makes one in `create_app` and
tells it of each summary (`Services.observer`), each job failure and each refused piece of work.
What several processes share is read from chartbrief's database at scrape time (`DatabaseFigures`):
the clinicians' review outcomes (and CDS card feedback) and the latest batch run's progress, so every
process and every batch machine shows the same figures wherever Prometheus scrapes, across restarts.

What it must not do: put a patient id, a resource id, a name, a URL or any text from a record or a
claim in a label. Every label value comes from a closed set written here (`OUTCOMES`, `STAGES`,
grounding's verdicts and severities, review outcome actions, work kinds, batch item states), or
names the model file (`chartbrief_model_info`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, get_args

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.models import ModelIdentity
from service.api.limits import WorkKind
from service.db.batch import ITEM_STATES, Run, RunItem
from service.db.models import ReviewOutcomeRow
from service.governance.records import CDS_OUTCOMES, ReviewAction

if TYPE_CHECKING:
    from service.pipeline import SummaryResult

log = structlog.get_logger(__name__)

OUTCOMES = ("written", "unchanged", "dry-run", "failed")
STAGES = ("fetch", "prompt", "model", "grounding", "write")
VERDICTS = ("unsupported", "contradicted", "redundant")
SEVERITIES = ("low", "medium", "high")
REVIEW_ACTIONS = (*get_args(ReviewAction), *CDS_OUTCOMES.values())
WORK_KINDS = get_args(WorkKind)
BOUNDS = ("client", "total")

# Seconds: a fetch is tenths of a second to seconds, the model seconds to minutes on a CPU.
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The process's metrics, in a registry of their own (`registry`), exposed by `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.summaries = Counter(
            "chartbrief_summaries", "Summaries finished, by outcome.", ["outcome"], registry=r
        )
        self.stage_seconds = Histogram(
            "chartbrief_stage_seconds",
            "Seconds one summary spent in each stage (fetch, prompt, model, grounding, write).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "chartbrief_tokens",
            "Model tokens, prompt (read) and completion (written).",
            ["kind"],
            registry=r,
        )
        self.claims_kept = Counter(
            "chartbrief_claims_kept", "Statements kept: supported by their sources.", registry=r
        )
        self.claims_dropped = Counter(
            "chartbrief_claims_dropped",
            "Statements dropped and shown as dropped, by grounding's verdict and the mistake's severity.",
            ["verdict", "severity"],
            registry=r,
        )
        self.refusals = Counter(
            "chartbrief_work_refused",
            "Model work refused with 429 because a bound was full, by kind and by which bound.",
            ["kind", "bound"],
            registry=r,
        )
        self.in_flight = Gauge(
            "chartbrief_work_in_flight",
            "Summaries queued or running in this process (the API's queue).",
            registry=r,
        )
        self.jobs_live = Gauge("chartbrief_api_jobs_live", "REST API jobs not finished yet.", registry=r)
        for outcome in OUTCOMES:  # every series exists from the start, so rates work from the first scrape
            self.summaries.labels(outcome)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind)

    # --- what the service tells it --------------------------------------------------------------

    def summary_done(self, result: SummaryResult) -> None:
        """One recorded summary (the pipeline's `Services.observer`)."""
        if result.dry_run:
            outcome = "dry-run"
        elif result.write is not None and result.write.created:
            outcome = "written"
        else:
            outcome = "unchanged"
        self.summaries.labels(outcome).inc()
        stages = {
            "fetch": result.seconds_fetch,
            "prompt": result.seconds_prompt,
            "model": result.seconds_generate,
            "grounding": result.seconds_grounding,
            "write": result.seconds_write,
        }
        for stage, seconds in stages.items():
            if stage != "write" or result.write is not None:
                self.stage_seconds.labels(stage).observe(max(seconds, 0.0))
        self.tokens.labels("prompt").inc(result.prompt_tokens)
        self.tokens.labels("completion").inc(result.completion_tokens)
        self.claims_kept.inc(len(result.kept))
        for dropped in result.dropped:
            verdict = dropped.verdict if dropped.verdict in VERDICTS else "unsupported"
            severity = dropped.severity if dropped.severity in SEVERITIES else "low"
            self.claims_dropped.labels(verdict, severity).inc()

    def summary_failed(self) -> None:
        self.summaries.labels("failed").inc()

    def refused(self, kind: str, bound: str) -> None:
        self.refusals.labels(
            kind if kind in WORK_KINDS else "other", bound if bound in BOUNDS else "total"
        ).inc()

    def watch(self, *, in_flight: Callable[[], int], jobs_live: Callable[[], int]) -> None:
        """Gauges read when scraped: the admission's queue depth and the job registry's live jobs."""
        self.in_flight.set_function(lambda: float(in_flight()))
        self.jobs_live.set_function(lambda: float(jobs_live()))

    def watch_model(self, identity: Callable[[], ModelIdentity | None]) -> None:
        """`chartbrief_model_info`: the model this process summarizes with, read at each scrape
        (none while it loads), so every other figure can be joined to the exact model file."""
        self.registry.register(ModelInfo(identity))

    def watch_database(self, db: sessionmaker[Session]) -> None:
        """Review outcomes and batch progress, read from chartbrief's database at each scrape."""
        self.registry.register(DatabaseFigures(db))


class ModelInfo(Collector):
    """One sample of 1 naming the loaded model: name, file, quantization, sha256 (no record data:
    these come from the model file and the catalogue)."""

    LABELS = ("model", "file", "quantization", "sha256")

    def __init__(self, identity: Callable[[], ModelIdentity | None]) -> None:
        self.identity = identity

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "chartbrief_model_info", "The model this process summarizes with (1).", labels=list(self.LABELS)
        )

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        model = self.identity()
        if model is not None:
            family.add_metric([model.name, model.file_name, model.quantization, model.sha256], 1.0)
        yield family


class DatabaseFigures(Collector):
    """What other processes did, from the shared database: review outcomes by action (approve,
    edit, reject in the review screen; accepted / overridden CDS cards), and the latest batch run's
    items by state with whether it is still running (`chartbrief batch run`, workers elsewhere)."""

    def __init__(self, db: sessionmaker[Session]) -> None:
        self.db = db

    def describe(self) -> Iterable[Metric]:
        return list(_families())

    def collect(self) -> Iterator[Metric]:
        reviews, items, running = _families()
        outcomes: dict[str, int] = dict.fromkeys(REVIEW_ACTIONS, 0)
        counts: dict[str, int] = dict.fromkeys(ITEM_STATES, 0)
        unfinished = 0.0
        try:
            with self.db() as s:
                by_action = s.execute(
                    select(ReviewOutcomeRow.action, func.count()).group_by(ReviewOutcomeRow.action)
                )
                for action, n in by_action:
                    if action in outcomes:
                        outcomes[action] = int(n)
                latest = s.scalars(select(Run).order_by(Run.id.desc()).limit(1)).first()
                if latest is not None:
                    unfinished = 1.0 if latest.finished_at is None else 0.0
                    rows = s.execute(
                        select(RunItem.state, func.count())
                        .where(RunItem.run_id == latest.id)
                        .group_by(RunItem.state)
                    )
                    for state, n in rows:
                        if state in counts:
                            counts[state] = int(n)
        except SQLAlchemyError as exc:  # a scrape never fails because the database is away
            log.warning("metrics.batch_unreadable", error=type(exc).__name__)
        for action, n in outcomes.items():
            reviews.add_metric([action], n)
        for state, n in counts.items():
            items.add_metric([state], n)
        running.add_metric([], unfinished)
        yield reviews
        yield items
        yield running


def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        CounterMetricFamily(
            "chartbrief_review_outcomes",
            "Clinicians' review outcomes recorded (approve, edit, reject; cds_accepted, cds_overridden).",
            labels=["action"],
        ),
        GaugeMetricFamily(
            "chartbrief_batch_items", "Items of the latest batch run, by state.", labels=["state"]
        ),
        GaugeMetricFamily("chartbrief_batch_running", "1 while the latest batch run is unfinished."),
    )
