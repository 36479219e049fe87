"""The model's figures: engine overhead against raw llama.cpp, decode speed against the memory
bandwidth bound (free, constrained as llama-cpp-python does it, constrained as chartbrief does it,
one thread against the default), and time to first token with and without reusing the fixed
instruction prefix.

Every comparison runs its variants interleaved (A B C, A B C, ...) so that a machine that slows
down during the run slows every variant alike, and reports the median.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

from bench.performance.common import Bar, BenchContext, Section, ratio
from fhir_adapters.client import FhirClient
from fhir_adapters.models import ModelIdentity
from service.config import LlmSettings, Settings
from service.llm.base import Engine, Generation, GenerationRequest
from service.llm.grammar import chat_params, gbnf_for_schema
from service.llm.llamacpp import LlamaCppEngine
from service.llm.model_files import resolve_model_path
from service.pipeline import Services, prepare_summary

GRAMMAR_SETTING = "grammar_sampling"
STOCK, FAST = "full-vocabulary", "grammar-second"


def llm_settings(base: LlmSettings, **changes: Any) -> LlmSettings:
    """`base` with `changes`; a change to a setting this build does not have is left out."""
    known = {k: v for k, v in changes.items() if k in LlmSettings.model_fields}
    return base.model_copy(update=known)


def forget_context(engine: Any) -> None:
    """Make the next call read its whole prompt again, as a fresh process would: nothing of the
    previous prompt and no kept template prefix."""
    if isinstance(engine, LlamaCppEngine):
        llama = engine._llama  # noqa: SLF001 - the bench's own probe
        llama.clear_context()
        llama.prefix_states.clear()
    elif isinstance(engine, Llama):
        engine.reset()  # type: ignore[no-untyped-call]
    elif isinstance(engine, RecordingEngine):
        forget_context(engine.inner)


# --- one probe run ------------------------------------------------------------------------------


@dataclass
class Timed:
    ttft: float  # seconds to the first piece
    total: float
    pieces: int

    @property
    def decode_tokens_per_second(self) -> float | None:
        span = self.total - self.ttft
        return (self.pieces - 1) / span if self.pieces > 1 and span > 0 else None


async def stream_timed(engine: Engine, request: GenerationRequest) -> Timed:
    started = time.perf_counter()
    first = None
    pieces = 0
    async for _piece in engine.stream(request):
        pieces += 1
        if first is None:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    return Timed(first if first is not None else total, total, pieces)


def raw_timed(llama: Llama, request: GenerationRequest, grammar: LlamaGrammar | None) -> Timed:
    started = time.perf_counter()
    first = None
    pieces = 0
    kwargs = chat_params(request) | {"stream": True}
    if grammar is not None:
        kwargs["grammar"] = grammar
    for chunk in llama.create_chat_completion(**kwargs):
        if chunk["choices"][0].get("delta", {}).get("content"):  # type: ignore[index]
            pieces += 1
            if first is None:
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    return Timed(first if first is not None else total, total, pieces)


def memory_bandwidth(megabytes: int = 256, repetitions: int = 5) -> float:
    """Bytes per second of a large copy (each byte read once and written once), the best of a few."""
    src = np.ones(megabytes * 1024 * 1024 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(repetitions):
        started = time.perf_counter()
        np.copyto(dst, src)
        seconds = time.perf_counter() - started
        best = max(best, 2 * src.nbytes / seconds)
    return best


# --- the request every comparison sends ---------------------------------------------------------


async def rendered_request(
    ctx: BenchContext, settings: Settings, engine: Engine, patient_id: str
) -> GenerationRequest:
    """The record-wide prompt (summary/v1) as the pipeline renders it for `patient_id`."""
    async with FhirClient(ctx.fhir_base) as client:
        svc = Services(settings, client, engine, _NoStore())  # type: ignore[arg-type]
        prep = await prepare_summary(svc, patient_id)
    return prep.calls[0].request


class _NoStore:
    """prepare_summary reads nothing from the store."""


def with_max_tokens(request: GenerationRequest, max_tokens: int) -> GenerationRequest:
    return replace(request, max_tokens=max_tokens)


def free(request: GenerationRequest) -> GenerationRequest:
    """The same request without its grammar, and without stops so it decodes as long as asked."""
    return replace(request, stop=[], json_schema=None)


# --- the API in-process --------------------------------------------------------------------------


@dataclass
class RecordingEngine:
    """Passes every call to `inner` and keeps the requests and the seconds spent inside."""

    inner: Engine
    requests: list[GenerationRequest] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def identity(self) -> ModelIdentity:
        return self.inner.identity

    @property
    def n_ctx(self) -> int:
        return self.inner.n_ctx

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    async def generate(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        forget_context(self.inner)
        started = time.perf_counter()
        try:
            return await self.inner.generate(request)
        finally:
            self.seconds.append(time.perf_counter() - started)

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        return self.inner.stream(request)

    async def aclose(self) -> None:
        """The inner engine is the bench's to close."""


async def api_summary(
    settings: Settings, engine: RecordingEngine, patient_id: str, work: Path
) -> dict[str, Any]:
    """One `POST /api/summaries` to its end, in-process, on a fresh database: the job's result."""
    from service.api import create_app
    from service.db import apikeys
    from service.db.store import SqlSummaryStore

    url = f"sqlite:///{work / f'api-{time.monotonic_ns()}.db'}"
    settings = settings.model_copy(update={"db": settings.db.model_copy(update={"url": url})})
    store = SqlSummaryStore.from_url(url)
    try:
        _kid, secret = apikeys.create(store.sessions, "bench", ["summaries.write"])
    finally:
        store.close()
    app = create_app(settings, engine=engine)
    auth = {"Authorization": f"Bearer {secret}"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            started = time.perf_counter()
            answer = await http.post("/api/summaries", json={"patient": patient_id}, headers=auth)
            if answer.status_code != 202:
                raise SystemExit(f"POST /api/summaries answered {answer.status_code}: {answer.text[:500]}")
            location = answer.headers["location"]
            while True:
                job = (await http.get(location, headers=auth)).json()
                if job["status"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.02)
            wall = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise SystemExit(f"the API summary failed: {job.get('error')}")
    return job["result"] | {"wall_seconds": wall}


# --- the section ---------------------------------------------------------------------------------


def run(ctx: BenchContext, settings: Settings) -> list[Section]:
    return asyncio.run(_run(ctx, settings))


async def _run(ctx: BenchContext, settings: Settings) -> list[Section]:
    reps = ctx.repetitions
    max_tokens = 24 if ctx.tiny else 150
    settings = settings.model_copy(update={"prompt": "summary/v1"})
    base = settings.llm
    threads = base.n_threads or os.cpu_count() or 1
    path = resolve_model_path(base)
    # Every comparison but prefix reuse reads each prompt whole, like the raw baseline after reset().
    whole = {"prompt_cache_mib": 0, "reuse_previous_prompt": False}
    stock = LlamaCppEngine(llm_settings(base, **whole, **{GRAMMAR_SETTING: STOCK}))
    fast = LlamaCppEngine(llm_settings(base, **whole, **{GRAMMAR_SETTING: FAST}))
    one_thread = LlamaCppEngine(llm_settings(base, n_threads=1, **whole, **{GRAMMAR_SETTING: FAST}))
    default = LlamaCppEngine(base)  # as chartbrief runs: the previous prompt and template prefixes reused
    raw = Llama(
        model_path=str(path), n_ctx=stock.n_ctx, n_threads=threads, n_threads_batch=threads,
        n_gpu_layers=base.n_gpu_layers, seed=base.seed, verbose=False,
    )  # fmt: skip
    try:
        # Page every model's weights in and start its threads before anything is timed.
        warm = GenerationRequest(messages=[{"role": "user", "content": "Say hello."}], max_tokens=4)
        for e in (stock, fast, one_thread, default):
            await e.generate(warm)
        raw.create_chat_completion(**chat_params(warm))
        patient = ctx.patients[0] if ctx.tiny else ctx.overhead_patient
        request = with_max_tokens(await rendered_request(ctx, settings, stock, patient.id), max_tokens)
        assert request.json_schema is not None
        grammar = LlamaGrammar.from_string(gbnf_for_schema(request.json_schema), verbose=False)
        sections = [
            await _overhead(ctx, settings, raw, stock, fast, request, grammar, patient.id, reps),
            await _decode(stock, fast, one_thread, request, path, threads, reps),
            await _prefix(ctx, settings, default, fast, reps),
        ]
    finally:
        for e in (stock, fast, one_thread, default):
            await e.aclose()
        raw.close()
    return sections


async def _overhead(
    ctx: BenchContext, settings: Settings, raw: Llama, stock: LlamaCppEngine, fast: LlamaCppEngine,
    request: GenerationRequest, grammar: LlamaGrammar, patient_id: str, reps: int,
) -> Section:  # fmt: skip
    raw_s, engine_s, fast_s, api_s, api_wall = [], [], [], [], []
    prompt_tokens = completion_tokens = 0
    work = Path(tempfile.mkdtemp(dir=ctx.work_dir))
    for _ in range(reps):
        raw.reset()
        started = time.perf_counter()
        kwargs = chat_params(request) | {"grammar": grammar}
        out = raw.create_chat_completion(**kwargs)
        raw_s.append(time.perf_counter() - started)
        prompt_tokens = out["usage"]["prompt_tokens"]  # type: ignore[index]
        completion_tokens = out["usage"]["completion_tokens"]  # type: ignore[index]
        forget_context(stock)
        started = time.perf_counter()
        await stock.generate(request)
        engine_s.append(time.perf_counter() - started)
        forget_context(fast)
        started = time.perf_counter()
        await fast.generate(request)
        fast_s.append(time.perf_counter() - started)
        recorder = RecordingEngine(stock)
        api_settings = settings.model_copy(
            update={"llm": settings.llm.model_copy(update={"max_tokens": request.max_tokens})}
        )
        result = await api_summary(api_settings, recorder, patient_id, work)
        if [r.messages for r in recorder.requests] != [request.messages]:
            raise SystemExit("the API sent another prompt than the one rendered for the comparison")
        api_s.append(result["seconds_generate"])
        api_wall.append(result["wall_seconds"])
    med = statistics.median
    section = Section("overhead", "Engine overhead: the same prompt, grammar and sampling")
    section.ratios = {
        "engine_overhead": ratio(med(engine_s), med(raw_s)),
        "api_overhead": ratio(med(api_s), med(raw_s)),
        "engine_default_vs_raw": ratio(med(fast_s), med(raw_s)),
    }
    section.targets = {"engine_overhead": "<= 1.05", "api_overhead": "<= 1.05"}
    section.figures = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "raw_seconds": round(med(raw_s), 3),
        "engine_seconds": round(med(engine_s), 3),
        "engine_default_seconds": round(med(fast_s), 3),
        "api_generate_seconds": round(med(api_s), 3),
        "api_job_wall_seconds": round(med(api_wall), 3),
        "repetitions": reps,
    }
    rows = [
        ("llama_cpp.Llama (llama-cpp-python's grammar sampling)", "raw llama.cpp", raw_s, 1.0),
        (f"chartbrief engine, {GRAMMAR_SETTING}={STOCK}", "engine", engine_s,
         section.ratios["engine_overhead"]),
        ("service API job (generation part), same engine", "API job", api_s, section.ratios["api_overhead"]),
        (f"chartbrief engine, default ({GRAMMAR_SETTING}={FAST})", "engine, default", fast_s,
         section.ratios["engine_default_vs_raw"]),
    ]  # fmt: skip
    section.table = [{"path": p, "seconds": round(med(t), 3), "ratio": r} for p, _, t, r in rows]
    section.bars = [Bar(label, med(t), "s") for _, label, t, _ in rows]
    section.notes = [
        "Every run reads its whole prompt (the context is cleared first), so prefix reuse favours no path.",
        "The API figure is the generation time of a real `POST /api/summaries` job (in-process ASGI, fresh "
        "database, the patient read from the FHIR server); the job's wall time, fetch and write included, "
        "is in the figures.",
    ]
    return section


async def _decode(
    stock: LlamaCppEngine, fast: LlamaCppEngine, one_thread: LlamaCppEngine,
    request: GenerationRequest, path: Path, threads: int, reps: int,
) -> Section:  # fmt: skip
    runs: dict[str, list[Timed]] = {k: [] for k in ("free", "stock", "fast", "one_thread")}
    for _ in range(reps):
        for name, engine, req in (
            ("free", fast, free(request)),
            ("stock", stock, request),
            ("fast", fast, request),
            ("one_thread", one_thread, request),
        ):
            forget_context(engine)
            runs[name].append(await stream_timed(engine, req))
    rates = {k: statistics.median([t.decode_tokens_per_second or 0.0 for t in v]) for k, v in runs.items()}
    bandwidth = memory_bandwidth()
    model_bytes = path.stat().st_size
    bound = bandwidth / model_bytes
    section = Section("decode", "Decode speed against the hardware bound")
    section.ratios = {
        "constrained_vs_free_decode": ratio(rates["fast"], rates["free"]),
        "stock_constrained_vs_free_decode": ratio(rates["stock"], rates["free"]),
        "decode_vs_bandwidth_bound": ratio(rates["free"], bound),
        "constrained_decode_vs_bandwidth_bound": ratio(rates["fast"], bound),
        "default_threads_vs_one_thread": ratio(rates["fast"], rates["one_thread"]),
    }
    section.targets = {"constrained_vs_free_decode": ">= 0.8"}
    section.figures = {
        "memory_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "model_file_bytes": model_bytes,
        "bandwidth_bound_tokens_per_second": round(bound, 1),
        "threads_default": threads,
        "tokens_per_second": {k: round(v, 1) for k, v in rates.items()},
        "pieces": {k: statistics.median([t.pieces for t in v]) for k, v in runs.items()},
        "repetitions": reps,
    }
    labels = {
        "free": "free decoding (no grammar)",
        "stock": f"constrained, {GRAMMAR_SETTING}={STOCK} (llama-cpp-python's way)",
        "fast": f"constrained, {GRAMMAR_SETTING}={FAST} (default)",
        "one_thread": "constrained default, n_threads=1",
    }
    section.table = [
        {"decoding": labels[k], "tokens/s": round(rates[k], 1), "vs free": ratio(rates[k], rates["free"])}
        for k in labels
    ]
    section.table.append(
        {
            "decoding": "memory-bandwidth bound (bandwidth / model bytes)",
            "tokens/s": round(bound, 1),
            "vs free": ratio(bound, rates["free"]),
        }
    )
    section.bars = [Bar(k.replace("_", " "), round(rates[k], 1), "tokens/s") for k in labels]
    section.notes = [
        "Decode rate = (pieces streamed - 1) / (last piece - first piece): prompt reading excluded.",
        "Bytes per token = the GGUF file's size (every weight read once per token); the KV cache read is "
        "left out, so the bound is optimistic for long contexts.",
    ]
    return section


async def _prefix(
    ctx: BenchContext, settings: Settings, engine: LlamaCppEngine, whole: LlamaCppEngine, reps: int
) -> Section:
    """Time to first token of the note prompt (summary/v2) over several notes and patients, with a
    record-wide call (summary/v1) between patients: as the default engine runs (the previous prompt
    and each template's fixed prefix reused) and with every prompt read whole."""
    requests = await note_requests(ctx, settings, engine)
    reused: list[float] = []
    without: list[float] = []
    first_reads: list[float] = []
    full_reads = 0
    for _ in range(reps):
        forget_context(engine)  # each repetition is a fresh process
        seen: set[str] = set()
        for r in requests:
            before = engine.stats
            ttft = (await stream_timed(engine, with_max_tokens(r, 1))).ttft
            after = engine.stats
            if after.prompt_tokens_reused == before.prompt_tokens_reused:
                full_reads += 1
            system = r.messages[0]["content"]
            # The first call of each prompt reads its prefix in both modes: the cost paid once.
            (reused if system in seen else first_reads).append(ttft)
            seen.add(system)
        for r in requests:
            without.append((await stream_timed(whole, with_max_tokens(r, 1))).ttft)
    per_rep = len(requests)
    templates = len({r.messages[0]["content"] for r in requests})

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    section = Section("prefix", "Prefix reuse: time to first token of each call")
    section.ratios = {
        "prefix_reuse_ttft_ratio": ratio(med(reused), med(without)),
        "prefix_full_reads_per_template": ratio(full_reads / reps, templates, 2),
    }
    section.targets = {
        "prefix_reuse_ttft_ratio": "< 1",
        "prefix_full_reads_per_template": "1 (each fixed prefix read once per process)",
    }
    section.figures = {
        "calls_per_process": per_rep,
        "templates": templates,
        "prompts_read_from_the_first_token_per_process": full_reads / reps,
        "system_message_tokens": sorted(
            engine.count_tokens(t) for t in {r.messages[0]["content"] for r in requests}
        ),
        "prompt_tokens_median": med(
            [sum(engine.count_tokens(m["content"]) for m in r.messages) for r in requests]
        ),
        "ttft_with_reuse_seconds": round(med(reused), 3),
        "ttft_first_call_of_each_prompt_seconds": round(med(first_reads), 3),
        "ttft_without_reuse_seconds": round(med(without), 3),
        "prefix_cache_bytes": engine.prefix_cache_bytes,
        "repetitions": reps,
    }
    section.table = [
        {"mode": "every prompt read whole", "median TTFT s": round(med(without), 3)},
        {"mode": "first call of each template (default engine)", "median TTFT s": round(med(first_reads), 3)},
        {"mode": "later calls (default engine)", "median TTFT s": round(med(reused), 3)},
    ]
    section.bars = [
        Bar("read whole", med(without), "s"),
        Bar("first of a template", med(first_reads), "s"),
        Bar("prefix reused", med(reused), "s"),
    ]
    section.notes = [
        f"{per_rep} calls per simulated process: two note calls (summary/v2) and one record-wide call "
        "(summary/v1) per patient, so the template changes between patients.",
        "TTFT includes reading the part of the prompt that is not reused.",
    ]
    return section


async def note_requests(ctx: BenchContext, settings: Settings, engine: Engine) -> list[GenerationRequest]:
    """The note calls (summary/v2) the pipeline plans for the patients with notes, interleaved with
    a record-wide call, as a process serving several kinds of request sees them."""
    notes_settings = settings.model_copy(update={"prompt": "summary/v2"})
    wide_settings = settings.model_copy(update={"prompt": "summary/v1"})
    out: list[GenerationRequest] = []
    async with FhirClient(ctx.fhir_base) as client:
        for p in ctx.patients[: 1 if ctx.tiny else 3]:
            prep = await prepare_summary(Services(notes_settings, client, engine, _NoStore()), p.id)  # type: ignore[arg-type]
            out.extend(c.request for c in prep.calls[:2])
            wide = await prepare_summary(Services(wide_settings, client, engine, _NoStore()), p.id)  # type: ignore[arg-type]
            out.extend(c.request for c in wide.calls[:1])
    if len(out) < 2:  # no patient with notes (the smoke run): the same call twice still exercises it
        out = out * 2
    return out
