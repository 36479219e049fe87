"""One patient, end to end: fetch -> normalize -> structured part + model narrative -> grounding
-> write-back -> record.

This module wires the stages; each stage lives in its own module and is tested there. It must
not hold state between calls: everything it needs is passed in (`Services`), so the CLI, the
API and batch workers share it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from fhir_adapters.client import FhirClient
from fhir_adapters.fetch import fetch_record
from fhir_adapters.models import (
    ClinicalContext,
    ModelIdentity,
    PatientRecord,
    PromptIdentity,
    Skipped,
    SourceRef,
    SummaryDraft,
)
from fhir_adapters.normalize import normalize
from fhir_adapters.write.draft import idempotency_key
from fhir_adapters.write.send import WriteResult, write_summary
from service.config import Settings
from service.db.store import SummaryStore, in_thread
from service.fhir import write_options
from service.grounding import Claim, DroppedClaim, GroundingResult, ground
from service.llm.base import Engine
from service.narrative import (
    TIME_BUDGET,
    Narration,
    NoteCall,
    NotePlan,
    NotesRead,
    narrate,
    plan_notes,
    quotations,
    statements_of,
    unread_note,
)
from service.prompts import PackedContext, build_request, load_prompt
from service.safety import (
    md_escape,
    neutralized_claims,
    neutralized_coded,
    neutralized_dropped,
    quarantine_instructions,
    without_ai_documents,
)
from service.structured import StructuredSummary, build_structured

log = structlog.get_logger(__name__)

AI_BANNER = (
    "> **AI-generated draft - not reviewed.** Written by a local language model from this patient's "
    "record. Every statement cites its sources; a clinician must review it before it is used."
)


@dataclass(frozen=True)
class Services:
    """What the pipeline needs, opened once by the caller and shared across patients."""

    settings: Settings
    client: FhirClient
    engine: Engine
    store: SummaryStore
    observer: Callable[[SummaryResult], None] | None = None  # told of each recorded summary (metrics)


@dataclass
class SummaryResult:
    patient: str
    encounter: str | None
    idempotency_key: str
    model: ModelIdentity
    prompt: PromptIdentity
    markdown: str
    structured: StructuredSummary
    kept: list[Claim]
    dropped: list[DroppedClaim]
    omitted: dict[str, int]
    skipped: list[Skipped]
    inputs: list[SourceRef]
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    seconds_fetch: float
    seconds_generate: float
    finish_reason: str | None = None
    seconds_prompt: float = 0.0  # normalize, pack and render the model request
    seconds_grounding: float = 0.0
    seconds_write: float = 0.0
    write: WriteResult | None = None
    dry_run: bool = False
    facts: int = 0
    unchanged: bool = False  # an earlier summary of the same key stands; nothing was generated
    notes: int = 0  # notes in the record
    # A prompt that reads the notes: the ones read, and the others with their reasons.
    notes_read: NotesRead | None = None
    # The draft as built (written, or on a dry run what would have been): the FHIR face returns it.
    draft: SummaryDraft | None = None

    def to_json(self) -> dict[str, Any]:
        """The CLI's `--json` object."""
        w = self.write
        return {
            "patient": self.patient,
            "encounter": self.encounter,
            "document_reference": w.document_reference if w else None,
            "provenance": w.provenance if w else None,
            "device": w.device if w else None,
            "created": w.created if w else False,
            "superseded": w.superseded if w else None,
            "dry_run": self.dry_run,
            "unchanged": self.unchanged,
            "idempotency_key": self.idempotency_key,
            "claims_kept": len(self.kept),
            "claims_dropped": len(self.dropped),
            "kept": [
                {"text": c.text, "citations": list(c.citations), "written_by": c.origin} for c in self.kept
            ],
            "claims_quoted": sum(c.origin == "quote" for c in self.kept),
            "claims_contradicted": sum(d.contradicted for d in self.dropped),
            "dropped": [
                {
                    "text": d.claim.text,
                    "citations": list(d.claim.citations),
                    "reason": d.reason,
                    "verdict": d.verdict,
                    "severity": d.severity,
                }
                for d in self.dropped
            ],
            "facts": self.facts,
            "omitted_from_prompt": self.omitted,
            "notes": self.notes,
            "notes_read": self.notes_read.to_json() if self.notes_read else None,
            "skipped": [{"resource": s.resource, "reason": s.reason} for s in self.skipped],
            "truncated": [{"resource": s.resource, "reason": s.reason} for s in self.skipped if s.truncated],
            "inputs": len(self.inputs),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "seconds": round(self.seconds, 3),
            "seconds_fetch": round(self.seconds_fetch, 3),
            "seconds_generate": round(self.seconds_generate, 3),
            "model": {
                "name": self.model.name,
                "file": self.model.file_name,
                "sha256": self.model.sha256,
                "quantization": self.model.quantization,
                "runtime": self.model.runtime,
                "sampling": self.model.sampling,
            },
            "prompt": {"id": self.prompt.id, "version": self.prompt.version, "sha256": self.prompt.sha256},
            "markdown": self.markdown,
        }


def cited_refs(ctx: ClinicalContext, keys: set[str]) -> list[SourceRef]:
    """The distinct resources behind a set of citation keys, in the context's order."""
    seen: dict[str, SourceRef] = {}
    for fact in ctx.facts:
        if fact.key in keys and fact.source.reference not in seen:
            seen[fact.source.reference] = fact.source
    return list(seen.values())


def compose_markdown(
    ctx: ClinicalContext,
    structured: StructuredSummary,
    kept: list[Claim],
    dropped: list[DroppedClaim],
    omitted: dict[str, int],
    notes: NotesRead | None = None,
) -> str:
    """The document a clinician reads in the EHR. Pure.

    Only grounded statements appear as text; dropped ones are counted, never written as fact
    (their text and reasons travel in the structured JSON attachment and the result). `notes`:
    what a prompt that reads the notes read and left unread (None for a record-wide prompt).
    """
    # Every text from the record or the model goes in through md_escape: literal, one line, never
    # markup (a note's link, image, tag, heading or table stays words on the reader's screen).
    lines = [
        "# Patient summary (AI draft)",
        "",
        AI_BANNER,
        "",
        f"Patient: {md_escape(ctx.patient_summary)}",
        "",
    ]
    lines.append(structured.to_markdown().rstrip())
    if notes is None:
        lines += ["", "## Narrative (model-written, each statement verified against its sources)", ""]
    else:
        lines += ["", "## From the notes (each statement checked against the note it cites)", ""]
    if kept:
        lines += [_statement_line(c) for c in kept]
    elif notes is not None and not notes.total:
        lines.append("_The record holds no notes; the coded sections above are the summary._")
    elif notes is not None:
        lines.append(
            "_No statement from the notes could be verified against them; see the coded sections above._"
        )
    else:
        lines.append(
            "_No model statement could be verified against the record; see the coded sections above._"
        )
    if kept and notes is not None:
        quoted = sum(c.origin == "quote" for c in kept)
        lines += [
            "",
            f"_{len(kept) - quoted} statement(s) written by the model, {quoted} quoted from the notes._",
        ]
    if dropped:
        lines += [
            "",
            f"_{len(dropped)} model statement(s) removed: the cited sources do not support them "
            "or they add nothing to the coded part._",
        ]
    if omitted:
        left = md_escape(", ".join(f"{n} {kind}" for kind, n in sorted(omitted.items())))
        lines += ["", f"_Not shown to the model (context window): {left}._"]
    if notes is not None and notes.total:
        # "_..._" around note titles, which come from the record.
        lines += ["", f"_{md_escape(notes.summary_line().removeprefix('_').removesuffix('._'))}._"]
    keys = sorted(structured.cited_keys() | {k for c in kept for k in c.citations}, key=_key_order)
    by_key = ctx.by_key()
    lines += ["", "## Sources", ""]
    for key in keys:
        fact = by_key.get(key)
        if fact is not None:
            when = f", {md_escape(fact.date)}" if fact.date else ""
            lines.append(f"- [{key}] {md_escape(fact.source.versioned)}{when}")
    return "\n".join(lines) + "\n"


def _statement_line(claim: Claim) -> str:
    cites = ", ".join(claim.citations)
    if claim.origin == "quote":
        return f"- \u201c{md_escape(claim.text)}\u201d (quoted from the note) [{cites}]"
    return f"- {md_escape(claim.text)} [{cites}]"


def _key_order(key: str) -> tuple[str, int]:
    prefix = key.rstrip("0123456789")
    digits = key[len(prefix) :]
    return (prefix, int(digits) if digits else 0)


def structured_json(
    structured: StructuredSummary,
    kept: list[Claim],
    dropped: list[DroppedClaim],
    ctx: ClinicalContext,
    notes: NotesRead | None = None,
) -> dict[str, Any]:
    by_key = ctx.by_key()
    keys = (
        structured.cited_keys()
        | {k for c in kept for k in c.citations}
        | {k for d in dropped for k in d.claim.citations if k in by_key}
    )
    return {
        "structured": structured.to_json(),
        "narrative": [{"text": c.text, "citations": list(c.citations), "written_by": c.origin} for c in kept],
        "dropped": [
            {
                "text": d.claim.text,
                "citations": list(d.claim.citations),
                "reason": d.reason,
                "verdict": d.verdict,
                "severity": d.severity,
            }
            for d in dropped
        ],
        "sources": {k: by_key[k].source.versioned for k in sorted(keys, key=_key_order) if k in by_key},
        "notes": None if notes is None else notes.to_json(),
    }


@dataclass
class PreparedSummary:
    """Everything decided before the model runs: what was read, what the model will see, the key."""

    patient_id: str
    encounter_id: str | None
    ctx: ClinicalContext
    structured: StructuredSummary
    calls: tuple[NoteCall, ...]  # the model calls: one per note read, or one over the record
    prompt: PromptIdentity
    packed: PackedContext
    model: ModelIdentity
    inputs: list[SourceRef]
    idempotency_key: str
    notes: int
    started: float
    seconds_fetch: float
    plan: NotePlan | None = None  # a prompt that reads the notes: which, and why not the others
    seconds_budget: float = 60.0
    quotations: bool = True
    seconds_prompt: float = 0.0


async def prepare_summary(
    svc: Services,
    patient_id: str,
    *,
    encounter_id: str | None = None,
    record: PatientRecord | None = None,
) -> PreparedSummary:
    """Fetch, normalize and build the model request; compute the idempotency key. No generation.

    `record`: one already read from another source (bundle files, an export); then nothing is
    fetched from `svc.client`, and everything after the fetch is the same.
    """
    settings = svc.settings
    started = time.perf_counter()
    if record is None:
        record = await fetch_record(
            svc.client,
            patient_id,
            encounter_id=encounter_id,
            observation_limit=settings.fhir.observation_limit,
            max_concurrency=settings.fhir.max_concurrency,
        )
    record = without_ai_documents(record, settings.writer.identifier_system)
    fetched = time.perf_counter()
    ctx = neutralized_coded(quarantine_instructions(normalize(record)))
    template = load_prompt(settings.prompt, settings.prompts_dir)
    plan: NotePlan | None = None
    options: dict[str, str] | None = None
    if template.reads == "notes":
        narrative = settings.narrative
        plan = plan_notes(template, ctx, svc.engine, settings.llm, narrative)
        calls = plan.calls
        packed = PackedContext(facts_included=[], omitted={}, text="")
        # What decides the text besides prompt and model (the time budget is a guard, not a choice).
        options = {"max_notes": str(narrative.max_notes), "quotations": str(narrative.quotations).lower()}
    else:
        request, _rendered, packed = build_request(template, ctx, svc.engine, settings.llm)
        calls = (NoteCall(None, request),)
    model = svc.engine.identity
    inputs = record.sources
    return PreparedSummary(
        patient_id=patient_id,
        encounter_id=encounter_id,
        ctx=ctx,
        structured=build_structured(ctx, show_administrative=settings.narrative.show_administrative),
        calls=calls,
        prompt=template.identity,
        packed=packed,
        model=model,
        inputs=inputs,
        idempotency_key=idempotency_key(inputs, template.identity, model, ctx.encounter, options),
        notes=len(record.notes),
        started=started,
        seconds_fetch=fetched - started,
        seconds_prompt=time.perf_counter() - fetched,
        plan=plan,
        seconds_budget=settings.narrative.seconds_budget,
        quotations=settings.narrative.quotations,
    )


async def narrate_summary(svc: Services, prep: PreparedSummary) -> Narration:
    """The model's part: every planned call, within the time budget."""
    return await narrate(svc.engine, prep.calls, seconds_budget=prep.seconds_budget)


async def complete_summary(
    svc: Services, prep: PreparedSummary, narration: Narration, *, dry_run: bool = False
) -> SummaryResult:
    """Ground the model's output, write the draft back (unless dry run), record it."""
    ctx, structured = prep.ctx, prep.structured
    grounding_started, (kept, dropped) = time.perf_counter(), ground_narration(prep, narration)
    notes = notes_read(prep, narration)
    markdown = compose_markdown(ctx, structured, kept, dropped, prep.packed.omitted, notes)
    grounded = GroundingResult(kept=kept, dropped=dropped)
    cited_keys = structured.cited_keys() | {k for c in grounded.kept for k in c.citations}
    draft = SummaryDraft(
        patient=ctx.patient,
        markdown=markdown,
        structured=structured_json(structured, grounded.kept, dropped, ctx, notes),
        cited=cited_refs(ctx, cited_keys),
        inputs=prep.inputs,
        model=prep.model,
        prompt=prep.prompt,
        idempotency_key=prep.idempotency_key,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        encounter=ctx.encounter,
        **_period(ctx),
    )
    write_started = time.perf_counter()
    write = None if dry_run else await write_summary(svc.client, draft, write_options(svc.settings.writer))
    result = SummaryResult(
        patient=prep.patient_id,
        encounter=prep.encounter_id,
        idempotency_key=prep.idempotency_key,
        model=prep.model,
        prompt=prep.prompt,
        markdown=markdown,
        structured=structured,
        kept=grounded.kept,
        dropped=dropped,
        omitted=prep.packed.omitted,
        skipped=ctx.skipped,
        inputs=prep.inputs,
        prompt_tokens=narration.prompt_tokens,
        completion_tokens=narration.completion_tokens,
        finish_reason=narration.finish_reason,
        seconds=time.perf_counter() - prep.started,
        seconds_fetch=prep.seconds_fetch,
        seconds_generate=narration.seconds,
        seconds_prompt=prep.seconds_prompt,
        seconds_grounding=write_started - grounding_started,
        seconds_write=time.perf_counter() - write_started if write is not None else 0.0,
        write=write,
        dry_run=dry_run,
        facts=len(ctx.facts),
        notes=notes.total if notes else prep.notes,
        notes_read=notes,
        draft=draft,
    )
    await _record(svc, result)
    log.info(
        "summary.done", kept=len(result.kept), dropped=len(result.dropped), seconds=round(result.seconds, 2),
        written=bool(write and write.created), document_reference=write.document_reference if write else None,
    )
    return result


def unchanged_result(svc: Services, prep: PreparedSummary) -> SummaryResult | None:
    """The earlier summary of exactly these inputs, prompt and model, if one was written: then a
    rerun costs one hash and no generation.

    It asks the store, synchronously: async code calls it as `await in_thread(unchanged_result, ...)`.
    """
    row = svc.store.find(svc.client.base_url, prep.idempotency_key)
    if row is None or not row.document_reference:
        return None
    write = WriteResult(
        document_reference=row.document_reference,
        provenance=row.provenance or "",
        device=row.device or "",
        created=False,
    )
    log.info("summary.unchanged", document_reference=row.document_reference)
    return SummaryResult(
        patient=prep.patient_id,
        encounter=prep.encounter_id,
        idempotency_key=prep.idempotency_key,
        model=prep.model,
        prompt=prep.prompt,
        markdown="",
        structured=prep.structured,
        kept=[],
        dropped=[],
        omitted=prep.packed.omitted,
        skipped=prep.ctx.skipped,
        inputs=prep.inputs,
        prompt_tokens=0,
        completion_tokens=0,
        seconds=time.perf_counter() - prep.started,
        seconds_fetch=prep.seconds_fetch,
        seconds_generate=0.0,
        write=write,
        facts=len(prep.ctx.facts),
        unchanged=True,
    )


async def summarize_patient(
    svc: Services,
    patient_id: str,
    *,
    encounter_id: str | None = None,
    dry_run: bool = False,
    skip_unchanged: bool = False,
) -> SummaryResult:
    """One patient end to end. `skip_unchanged`: return the recorded summary of the same key without
    generating (a regenerated draft is `service.review.regenerate`: another seed, another key)."""
    structlog.contextvars.bind_contextvars(patient_id=patient_id)
    try:
        prep = await prepare_summary(svc, patient_id, encounter_id=encounter_id)
        if skip_unchanged and not dry_run:
            earlier = await in_thread(unchanged_result, svc, prep)
            if earlier is not None:
                return earlier
        log.info(
            "summary.generate",
            facts=len(prep.ctx.facts),
            notes=prep.notes,
            packed=len(prep.packed.facts_included),
        )
        narration = await narrate_summary(svc, prep)
        return await complete_summary(svc, prep, narration, dry_run=dry_run)
    finally:
        structlog.contextvars.unbind_contextvars("patient_id")


def ground_narration(prep: PreparedSummary, narration: Narration) -> tuple[list[Claim], list[DroppedClaim]]:
    """The reduce step and the check: the calls' statements merged, made inert, grounded; then, for
    a read note the model said nothing verifiable about, its key lines quoted (grounded too)."""
    ctx = prep.ctx
    claims, unparsable = statements_of(narration)
    # The one place model text enters the summary: made inert (no HTML, link, image or URL) before
    # it is checked, so what is verified is what the markdown, the JSON and the review screen show.
    claims, unparsable = neutralized_claims(claims), neutralized_dropped(unparsable)
    # A prompt that reads the notes is there to say what the coded part cannot: what only restates
    # it is dropped as redundant. (The record-wide prompt is asked to restate; its claims stand.)
    coded = prep.structured.to_markdown() if prep.plan is not None else None
    grounded = ground(claims, ctx, coded=coded)
    kept, dropped = list(grounded.kept), unparsable + grounded.dropped
    if prep.plan is not None and prep.quotations:
        said = {key for claim in kept for key in claim.citations}
        quotes = [
            quote
            for output in narration.outputs
            if output.key is not None and output.key not in said and output.key in prep.plan.views
            for quote in quotations(prep.plan.views[output.key])
        ]
        # Quotations are record text: made inert like model text, and checked like it (a line that
        # only restates a coded line is not worth quoting).
        quoted = ground(neutralized_claims(quotes), ctx, coded=coded)
        kept += [q for q in quoted.kept if _new_text(q, kept)]
    return kept, dropped


def _new_text(claim: Claim, kept: list[Claim]) -> bool:
    same = " ".join(claim.text.lower().split())
    return all(" ".join(k.text.lower().split()) != same for k in kept)


def notes_read(prep: PreparedSummary, narration: Narration) -> NotesRead | None:
    plan = prep.plan
    if plan is None:
        return None
    unread = list(plan.unread)
    unread += [unread_note(plan.views[key], TIME_BUDGET) for key in narration.late]
    read = tuple(o.key for o in narration.outputs if o.key is not None)
    return NotesRead(total=plan.notes, read=read, unread=tuple(unread), max_notes=plan.max_notes)


def _period(ctx: ClinicalContext) -> dict[str, str | None]:
    dates = sorted(f.date for f in ctx.facts if f.date and f.kind != "patient")
    return {"period_start": dates[0] if dates else None, "period_end": dates[-1] if dates else None}


async def _record(svc: Services, r: SummaryResult) -> None:
    w = r.write
    await in_thread(
        svc.store.record,
        {
            "fhir_base": svc.client.base_url,
            "patient_id": r.patient,
            "encounter_id": r.encounter,
            "idempotency_key": r.idempotency_key,
            "inputs": [s.versioned for s in r.inputs],
            "prompt_id": r.prompt.id,
            "prompt_version": r.prompt.version,
            "prompt_sha256": r.prompt.sha256,
            "model_name": r.model.name,
            "model_file": r.model.file_name,
            "model_sha256": r.model.sha256,
            "sampling": r.model.sampling,
            "seed": svc.settings.llm.seed,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "claims_kept": len(r.kept),
            "claims_dropped": len(r.dropped),
            "seconds_fetch": r.seconds_fetch,
            "seconds_generate": r.seconds_generate,
            "seconds_total": r.seconds,
            "outcome": "dry-run" if r.dry_run else ("written" if w and w.created else "unchanged"),
            "document_reference": w.document_reference if w else None,
            "provenance": w.provenance if w else None,
            "device": w.device if w else None,
            "superseded": w.superseded if w else None,
        },
    )
    if svc.observer is not None:
        svc.observer(r)


__all__ = [
    "PackedContext", "PreparedSummary", "Services", "SummaryResult", "complete_summary", "compose_markdown",
    "ground_narration", "narrate_summary", "prepare_summary", "summarize_patient",
]
