"""Context packing: the tokens of the record-wide prompt (summary/v1) with chartbrief's packing
against a naive dump of the same resources' JSON, for every fixture patient, and the key facts
(every active problem, medication and allergy, as `chartbrief eval` counts them) each one puts in
front of the model.

The naive dump often does not fit the model's window; the model would see only its start. So its
coverage is given twice: for the whole dump (what it would need) and for the part that fits the
same token budget chartbrief packs into (what the model would really read).
"""

from __future__ import annotations

import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

from bench.performance.common import REPO, Bar, BenchContext, Section, ratio
from fhir_adapters.bundle_source import BundleFolder
from fhir_adapters.models import PatientRecord
from fhir_adapters.normalize import normalize
from service.config import Settings
from service.eval.measures import key_fact_coverage
from service.llm.base import Engine
from service.prompts import build_request, load_prompt, message_overhead, render
from service.safety import neutralized_coded, quarantine_instructions

PROMPT = "summary/v1"
FIXTURES = REPO / "tests" / "fixtures" / "synthea"


def naive_dump(record: PatientRecord) -> str:
    """Every resource read, as compact JSON, one per line: what a prompt without packing would hold."""
    resources = [record.patient] + [r for rtype in sorted(record.resources) for r in record.resources[rtype]]
    return "\n".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in resources)


def cut_to_tokens(text: str, budget: int, engine: Engine) -> str:
    """The longest prefix of `text` (whole lines) within `budget` tokens."""
    kept: list[str] = []
    used = 0
    for line in text.split("\n"):
        cost = engine.count_tokens(line + "\n")
        if used + cost > budget:
            break
        kept.append(line)
        used += cost
    return "\n".join(kept)


def _found(coverage: tuple[Any, ...]) -> int:
    return sum(1 for k in coverage if k.found)


def measure_patient(record: PatientRecord, engine: Engine, settings: Settings) -> dict[str, Any]:
    tpl = load_prompt(PROMPT, settings.prompts_dir)
    ctx = neutralized_coded(quarantine_instructions(normalize(record)))
    request, _rendered, packed = build_request(tpl, ctx, engine, settings.llm)
    packed_tokens = sum(engine.count_tokens(m["content"]) for m in request.messages)
    dump = naive_dump(record)
    naive = render(tpl, {"patient_summary": ctx.patient_summary, "facts": dump}, citation_keys=["X0"])
    naive_tokens = sum(engine.count_tokens(m["content"]) for m in naive.messages)
    empty = render(tpl, {"patient_summary": ctx.patient_summary, "facts": ""}, citation_keys=["X0"])
    budget = (
        engine.n_ctx
        - (settings.llm.max_tokens or tpl.max_tokens)
        - message_overhead(empty, engine.count_tokens)
    )
    fitting = cut_to_tokens(dump, budget, engine)
    whole_cov = key_fact_coverage(record, dump)
    fit_cov = key_fact_coverage(record, fitting)
    packed_cov = key_fact_coverage(record, packed.text)
    return {
        "patient": record.patient.get("id"),
        "resources": sum(len(v) for v in record.resources.values()) + 1,
        "naive_tokens": naive_tokens,
        "packed_tokens": packed_tokens,
        "token_ratio": ratio(naive_tokens, packed_tokens, 2),
        "fits_window": naive_tokens <= engine.n_ctx,
        "key_facts": len(packed_cov),
        "naive_key_facts": _found(whole_cov),
        "naive_in_window_key_facts": _found(fit_cov),
        "packed_key_facts": _found(packed_cov),
        "packed_omitted": dict(packed.omitted),
    }


async def _records(folder: BundleFolder, limit: int | None) -> list[PatientRecord]:
    ids = folder.patient_ids()[:limit] if limit else folder.patient_ids()
    return [await folder.read_record(pid) for pid in ids]


def run(ctx: BenchContext, engine: Engine, settings: Settings, fixtures: Path = FIXTURES) -> Section:
    folder = BundleFolder.scan(fixtures)
    records = asyncio.run(_records(folder, 1 if ctx.tiny else None))
    rows = [measure_patient(r, engine, settings) for r in records]
    naive = sum(r["naive_tokens"] for r in rows)
    packed = sum(r["packed_tokens"] for r in rows)
    facts = sum(r["key_facts"] for r in rows)
    found_packed = sum(r["packed_key_facts"] for r in rows)
    found_fit = sum(r["naive_in_window_key_facts"] for r in rows)
    found_whole = sum(r["naive_key_facts"] for r in rows)
    plural = "s" if len(rows) != 1 else ""
    section = Section("packing", f"Context packing ({PROMPT}, {len(rows)} fixture patient{plural})")
    section.ratios = {
        "packing_token_ratio": ratio(naive, packed, 2),
        "packing_token_ratio_median_patient": round(statistics.median(r["token_ratio"] for r in rows), 2),
        "packed_key_fact_coverage": ratio(found_packed, facts),
        "naive_in_window_key_fact_coverage": ratio(found_fit, facts),
    }
    section.targets = {
        "packing_token_ratio": ">= 3",
        "packed_key_fact_coverage": ">= naive_in_window_key_fact_coverage",
    }
    section.figures = {
        "naive_tokens_total": naive,
        "packed_tokens_total": packed,
        "n_ctx": engine.n_ctx,
        "naive_prompts_over_window": sum(1 for r in rows if not r["fits_window"]),
        "key_facts": facts,
        "key_facts_in_naive_dump": found_whole,
        "key_facts_in_naive_within_window": found_fit,
        "key_facts_in_packed": found_packed,
    }
    section.table = [
        {k: r[k] for k in ("patient", "resources", "naive_tokens", "packed_tokens", "token_ratio",
                           "key_facts", "naive_in_window_key_facts", "packed_key_facts")}
        for r in rows
    ]  # fmt: skip
    section.bars = [
        Bar("naive JSON dump", naive, "prompt tokens"),
        Bar("chartbrief packing", packed, "prompt tokens"),
    ]
    section.notes = [
        "Key facts are counted as `chartbrief eval` counts coverage: an active problem, medication or "
        "allergy is in a context when its name appears in it.",
        "'naive within window' is the part of the dump that fits the same token budget the packing gets.",
    ]
    return section
