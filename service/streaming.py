"""The pipeline of `service.pipeline.summarize_patient`, as a stream of events for a watching reader.

The review screen and the streaming REST endpoint show a summary while it is made: the coded,
structured part as soon as the record is read (`Prepared`), the model's output piece by piece
as it is written (`Token`), then the grounded result once it is checked and written back
(`Finished`). The stages are the pipeline's own functions, called in the same order with the
same inputs, so a streamed summary has the same idempotency key, document and record row as
one made by `summarize_patient`.

What it must not do: keep state between calls, log model output or note text (it carries
patient data), or write anything when the reader goes away before the model has finished (the
generator is simply closed; nothing has been written yet at that point).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import structlog

from service.narrative import Narration, run_calls
from service.pipeline import PreparedSummary, Services, SummaryResult, complete_summary, prepare_summary

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Prepared:
    """The record is read: the facts, the structured part and the summary's key are known."""

    prep: PreparedSummary


@dataclass(frozen=True)
class Token:
    """A piece of model output, exactly as written (not yet checked: never shown as fact)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The grounded summary, written back unless it was a dry run."""

    result: SummaryResult
    prep: PreparedSummary


StreamEvent = Prepared | Token | Finished


async def stream_summary(
    svc: Services,
    patient_id: str,
    *,
    encounter_id: str | None = None,
    dry_run: bool = False,
) -> AsyncGenerator[StreamEvent, None]:
    """Summarize one patient like `summarize_patient`, yielding events as the work progresses.

    The reader may stop after `Prepared` (for instance when a draft of the same key already
    exists): closing the generator then costs no generation and writes nothing.
    """
    prep = await prepare_summary(svc, patient_id, encounter_id=encounter_id)
    yield Prepared(prep)
    log.info("summary.stream", patient_id=patient_id, facts=len(prep.ctx.facts))
    narration = Narration()
    async for item in run_calls(svc.engine, prep.calls, seconds_budget=prep.seconds_budget, stream=True):
        if isinstance(item, Narration):
            narration = item
        else:
            yield Token(item)
    result = await complete_summary(svc, prep, narration, dry_run=dry_run)
    yield Finished(result=result, prep=prep)
