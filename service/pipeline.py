"""One patient, end to end: fetch -> normalize -> structured part + model narrative -> grounding
-> write-back -> record.

This module wires the stages; each stage lives in its own module and is tested there. It must
not hold state between calls: everything it needs is passed in (`Services`), so the CLI, the
API and batch workers share it.
"""

from __future__ import annotations

import time
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
from fhir_adapters.writer import WriteResult, idempotency_key, write_summary
from service.config import Settings
from service.db.store import SummaryStore
from service.grounding import Claim, DroppedClaim, ground, parse_claims
from service.llm.base import Engine, Generation, GenerationRequest
from service.prompts import PackedContext, build_request, load_prompt
from service.safety import (
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
    write: WriteResult | None = None
    dry_run: bool = False
    facts: int = 0
    unchanged: bool = False  # an earlier summary of the same key stands; nothing was generated

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
            "kept": [{"text": c.text, "citations": list(c.citations)} for c in self.kept],
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
            "skipped": [{"resource": s.resource, "reason": s.reason} for s in self.skipped],
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
) -> str:
    """The document a clinician reads in the EHR. Pure.

    Only grounded statements appear as text; dropped ones are counted, never written as fact
    (their text and reasons travel in the structured JSON attachment and the result).
    """
    lines = ["# Patient summary (AI draft)", "", AI_BANNER, "", f"Patient: {ctx.patient_summary}", ""]
    lines.append(structured.to_markdown().rstrip())
    lines += ["", "## Narrative (model-written, each statement verified against its sources)", ""]
    if kept:
        lines += [f"- {c.text} [{', '.join(c.citations)}]" for c in kept]
    else:
        lines.append(
            "_No model statement could be verified against the record; see the coded sections above._"
        )
    if dropped:
        lines += [
            "",
            f"_{len(dropped)} model statement(s) removed: the cited sources do not support them._",
        ]
    if omitted:
        left = ", ".join(f"{n} {kind}" for kind, n in sorted(omitted.items()))
        lines += ["", f"_Not shown to the model (context window): {left}._"]
    keys = sorted(structured.cited_keys() | {k for c in kept for k in c.citations}, key=_key_order)
    by_key = ctx.by_key()
    lines += ["", "## Sources", ""]
    for key in keys:
        fact = by_key.get(key)
        if fact is not None:
            when = f", {fact.date}" if fact.date else ""
            lines.append(f"- [{key}] {fact.source.versioned}{when}")
    return "\n".join(lines) + "\n"


def _key_order(key: str) -> tuple[str, int]:
    prefix = key.rstrip("0123456789")
    digits = key[len(prefix) :]
    return (prefix, int(digits) if digits else 0)


def structured_json(
    structured: StructuredSummary, kept: list[Claim], dropped: list[DroppedClaim], ctx: ClinicalContext
) -> dict[str, Any]:
    by_key = ctx.by_key()
    keys = (
        structured.cited_keys()
        | {k for c in kept for k in c.citations}
        | {k for d in dropped for k in d.claim.citations if k in by_key}
    )
    return {
        "structured": structured.to_json(),
        "narrative": [{"text": c.text, "citations": list(c.citations)} for c in kept],
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
    }


@dataclass
class PreparedSummary:
    """Everything decided before the model runs: what was read, what the model will see, the key."""

    patient_id: str
    encounter_id: str | None
    ctx: ClinicalContext
    structured: StructuredSummary
    request: GenerationRequest
    prompt: PromptIdentity
    packed: PackedContext
    model: ModelIdentity
    inputs: list[SourceRef]
    idempotency_key: str
    notes: int
    started: float
    seconds_fetch: float


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
    request, rendered, packed = build_request(template, ctx, svc.engine, settings.llm)
    model = svc.engine.identity
    inputs = record.sources
    return PreparedSummary(
        patient_id=patient_id,
        encounter_id=encounter_id,
        ctx=ctx,
        structured=build_structured(ctx),
        request=request,
        prompt=rendered.identity,
        packed=packed,
        model=model,
        inputs=inputs,
        idempotency_key=idempotency_key(inputs, rendered.identity, model, ctx.encounter),
        notes=len(record.notes),
        started=started,
        seconds_fetch=fetched - started,
    )


async def complete_summary(
    svc: Services, prep: PreparedSummary, generation: Generation, *, dry_run: bool = False
) -> SummaryResult:
    """Ground the model's output, write the draft back (unless dry run), record it."""
    ctx, structured = prep.ctx, prep.structured
    claims, unparsable = parse_claims(generation.text)
    # The one place model text enters the summary: made inert (no HTML, link, image or URL) before
    # it is checked, so what is verified is what the markdown, the JSON and the review screen show.
    claims, unparsable = neutralized_claims(claims), neutralized_dropped(unparsable)
    grounded = ground(claims, ctx)
    dropped = unparsable + grounded.dropped
    markdown = compose_markdown(ctx, structured, grounded.kept, dropped, prep.packed.omitted)
    cited_keys = structured.cited_keys() | {k for c in grounded.kept for k in c.citations}
    draft = SummaryDraft(
        patient=ctx.patient,
        markdown=markdown,
        structured=structured_json(structured, grounded.kept, dropped, ctx),
        cited=cited_refs(ctx, cited_keys),
        inputs=prep.inputs,
        model=prep.model,
        prompt=prep.prompt,
        idempotency_key=prep.idempotency_key,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        encounter=ctx.encounter,
        **_period(ctx),
    )
    write = None if dry_run else await write_summary(svc.client, draft, svc.settings.writer)
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
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        finish_reason=generation.finish_reason,
        seconds=time.perf_counter() - prep.started,
        seconds_fetch=prep.seconds_fetch,
        seconds_generate=generation.seconds,
        write=write,
        dry_run=dry_run,
        facts=len(ctx.facts),
    )
    _record(svc, result)
    log.info(
        "summary.done",
        kept=len(result.kept),
        dropped=len(result.dropped),
        written=bool(write and write.created),
        document_reference=write.document_reference if write else None,
        seconds=round(result.seconds, 2),
    )
    return result


def unchanged_result(svc: Services, prep: PreparedSummary) -> SummaryResult | None:
    """The earlier summary of exactly these inputs, prompt and model, if one was written: then a
    rerun costs one hash and no generation."""
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
            earlier = unchanged_result(svc, prep)
            if earlier is not None:
                return earlier
        log.info(
            "summary.generate",
            facts=len(prep.ctx.facts),
            notes=prep.notes,
            packed=len(prep.packed.facts_included),
        )
        generation = await svc.engine.generate(prep.request)
        return await complete_summary(svc, prep, generation, dry_run=dry_run)
    finally:
        structlog.contextvars.unbind_contextvars("patient_id")


def _period(ctx: ClinicalContext) -> dict[str, str | None]:
    dates = sorted(f.date for f in ctx.facts if f.date and f.kind != "patient")
    return {"period_start": dates[0] if dates else None, "period_end": dates[-1] if dates else None}


def _record(svc: Services, r: SummaryResult) -> None:
    w = r.write
    svc.store.record(
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
        }
    )


__all__ = [
    "PackedContext",
    "PreparedSummary",
    "Services",
    "SummaryResult",
    "complete_summary",
    "compose_markdown",
    "prepare_summary",
    "summarize_patient",
]
