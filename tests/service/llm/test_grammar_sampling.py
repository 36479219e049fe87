"""Grammar-second sampling: the chosen token is checked against the grammar first, the whole
vocabulary only when it is rejected. Greedy output must be exactly the stock full-vocabulary
sampler's; the `model`-marked tests prove it with the real default GGUF."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama
from llama_cpp import _internals as internals
from llama_cpp.llama_grammar import LlamaGrammar

from fhir_adapters.models import ClinicalContext, Fact, SourceRef
from service.config import LlmSettings
from service.llm import GenerationRequest
from service.llm.grammar import gbnf_for_schema
from service.llm.model_files import default_model_path
from service.llm.sampling import Candidates, DecodeStats, GrammarSecondSampler
from service.prompts import build_request, load_prompt

# --- the sampler's decision, on the real vocabulary with hand-made logits --------------------


@pytest.fixture(scope="module")
def vocab_model() -> Iterator[Llama]:
    vocab = Llama(model_path=str(default_model_path()), vocab_only=True, verbose=False)
    yield vocab
    vocab.close()


_CANDIDATES: dict[int, Candidates] = {}


def _sampler(model: Llama, gbnf: str | LlamaGrammar, stats: DecodeStats) -> GrammarSecondSampler:
    chain = internals.LlamaSampler()
    chain.add_greedy()
    grammar = LlamaGrammar.from_string(gbnf, verbose=False) if isinstance(gbnf, str) else gbnf
    # one candidate array per model, as the engine keeps it
    if id(model) not in _CANDIDATES:
        _CANDIDATES[id(model)] = Candidates(model.n_vocab())
    candidates = _CANDIDATES[id(model)]
    return GrammarSecondSampler(chain, model._model.vocab, candidates, grammar, greedy=True, stats=stats)


def _token(model: Llama, text: str) -> int:
    tokens = model.tokenize(text.encode(), add_bos=False, special=False)
    assert len(tokens) == 1, f"{text!r} is not one token of this vocabulary"
    return tokens[0]


def _logits(model: Llama, favourites: list[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Logits that rank `favourites` first, in that order."""
    logits = np.zeros(model.n_vocab(), dtype=np.float32)
    for rank, text in enumerate(favourites):
        logits[_token(model, text)] = 100.0 - rank
    return logits


def test_a_token_the_grammar_allows_is_taken_after_one_check(vocab_model: Llama) -> None:
    stats = DecodeStats()
    sampler = _sampler(vocab_model, 'root ::= "yes" | "no"', stats)
    try:
        assert sampler.choose(_logits(vocab_model, ["yes", "no"])) == _token(vocab_model, "yes")
    finally:
        sampler.close()
    assert (stats.tokens, stats.grammar_checks, stats.fallbacks) == (1, 1, 0)


def test_a_rejected_token_falls_back_to_the_best_token_the_grammar_allows(vocab_model: Llama) -> None:
    stats = DecodeStats()
    sampler = _sampler(vocab_model, 'root ::= "yes" | "no"', stats)
    try:
        # "maybe" is the model's favourite but not allowed; "no" is the best allowed one, and the
        # highest logits settle it (every token left out has a lower logit)
        chosen = sampler.choose(_logits(vocab_model, ["maybe", "the", "no", "yes"]))
        assert chosen == _token(vocab_model, "no")
        assert (stats.fallbacks, stats.full_masks) == (1, 0)
        # the fallback's token was accepted into the grammar: now only the end may follow "no".
        # The end tokens' logits tie with thousands of others, so the whole vocabulary is masked.
        ending = sampler.choose(_logits(vocab_model, ["yes", "no"]))
        assert llama_cpp.llama_vocab_is_eog(vocab_model._model.vocab, ending)
        assert (stats.fallbacks, stats.full_masks) == (2, 1)
    finally:
        sampler.close()
    assert (stats.tokens, stats.grammar_checks) == (2, 2)


def test_among_equal_logits_the_fallback_takes_the_lowest_id_like_the_stock_greedy_sampler(
    vocab_model: Llama,
) -> None:
    stats = DecodeStats()
    sampler = _sampler(vocab_model, 'root ::= "yes" | "no"', stats)
    yes, no = _token(vocab_model, "yes"), _token(vocab_model, "no")
    logits = _logits(vocab_model, ["maybe"])
    logits[yes] = logits[no] = 50.0
    try:
        assert sampler.choose(logits) == min(yes, no)
    finally:
        sampler.close()
    assert (stats.fallbacks, stats.full_masks) == (1, 0)


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from /proc")
def test_thousands_of_samplers_leave_no_native_grammar_behind(vocab_model: Llama) -> None:
    # The summary schema's native grammar takes about 50 KiB: 2000 leaked ones would be ~100 MiB.
    # parsed once, as the engine caches it per schema
    grammar = LlamaGrammar.from_string(
        gbnf_for_schema(load_prompt("summary/v1").output_schema or {}), verbose=False
    )
    stats = DecodeStats()
    _sampler(vocab_model, grammar, stats).close()  # allocator warm-up
    before = _rss_mib()
    for i in range(2000):
        sampler = _sampler(vocab_model, grammar, stats)
        if i % 2:
            sampler.close()  # the engine closes it after each call; otherwise collection frees it
    assert _rss_mib() - before < 20


# --- the real model: identical to the stock path ---------------------------------------------


RECORD = ClinicalContext(
    patient=SourceRef("Patient", "p1", "1"),
    patient_summary="female, born 1971",
    facts=[
        Fact("P1", "patient", "female, born 1971", SourceRef("Patient", "p1", "1")),
        Fact("C1", "condition", "Type 2 diabetes mellitus (active, since 2015-03-02)",
             SourceRef("Condition", "c1", "1"), status="active", display="Type 2 diabetes mellitus"),
        Fact("M1", "medication", "Metformin 500 MG Oral Tablet (active)",
             SourceRef("MedicationRequest", "m1", "1"), status="active", display="Metformin 500 MG Oral Tablet"),
        Fact("V1", "observation", "Hemoglobin A1c: 7.1 % on 2024-01-09", SourceRef("Observation", "o1", "1"),
             date="2024-01-09", display="Hemoglobin A1c", value="7.1 %"),
    ],
)  # fmt: skip

# The model answers "blue"; the grammar only allows colours it would not pick, so it rejects often.
COLOUR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["vermilion-orange", "chartreuse"]},
        "certain": {"type": "boolean"},
    },
    "required": ["colour", "certain"],
}
COLOUR_MESSAGES = [
    {"role": "system", "content": "Answer with JSON only."},
    {"role": "user", "content": "What colour is the sky on a clear day?"},
]


def _engine(sampling: str, tmp_path: Path) -> Any:
    from service.llm.llamacpp import LlamaCppEngine

    # One thread: llama.cpp's threads spin while waiting for each other on a busy, shared CPU.
    return LlamaCppEngine(
        LlmSettings(n_ctx=2048, n_threads=1, grammar_sampling=sampling),  # type: ignore[arg-type]
        cache_dir=tmp_path,
    )


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    cache = tmp_path_factory.mktemp("model-cache")
    fast, stock = _engine("grammar-second", cache), _engine("full-vocabulary", cache)
    yield fast, stock
    asyncio.run(fast.aclose())
    asyncio.run(stock.aclose())


def _summary_request(engine: Any) -> GenerationRequest:
    settings = LlmSettings(n_ctx=2048, max_tokens=1024)  # room for the grammar to close the JSON
    request, _, packed = build_request(load_prompt("summary/v1"), RECORD, engine, settings)
    assert packed.omitted == {}
    return request


def _assert_summary_schema(document: Any, schema: dict[str, Any]) -> None:
    """The checks the v1 output schema makes (the citation pattern, or the request's key enum)."""
    citation = schema["properties"]["claims"]["items"]["properties"]["citations"]["items"]
    assert isinstance(document, dict) and set(document) == {"claims"}
    assert 1 <= len(document["claims"]) <= 6
    for claim in document["claims"]:
        assert set(claim) == {"text", "citations"}
        assert isinstance(claim["text"], str) and 1 <= len(claim["text"]) <= 300
        assert 1 <= len(claim["citations"]) <= 3
        for key in claim["citations"]:
            assert key in citation["enum"] if "enum" in citation else re.fullmatch(citation["pattern"], key)


@pytest.mark.model
async def test_greedy_summary_is_identical_to_the_stock_full_vocabulary_sampler(
    engines: tuple[Any, Any],
) -> None:
    fast, stock = engines
    request = _summary_request(fast)
    before = fast.stats

    fast_out, stock_out = await fast.generate(request), await stock.generate(request)

    assert fast_out.text == stock_out.text
    assert fast_out.finish_reason == stock_out.finish_reason == "stop"
    assert request.json_schema is not None
    _assert_summary_schema(json.loads(fast_out.text), request.json_schema)
    after = fast.stats
    assert after.tokens - before.tokens == fast_out.completion_tokens + 1  # + the end of generation
    assert after.grammar_checks - before.grammar_checks == after.tokens - before.tokens
    # the stock engine never used the grammar-second sampler
    assert stock.stats.grammar_checks == 0


@pytest.mark.model
async def test_greedy_output_stays_identical_when_the_grammar_rejects_the_models_choices(
    engines: tuple[Any, Any],
) -> None:
    fast, stock = engines
    request = GenerationRequest(messages=COLOUR_MESSAGES, max_tokens=40, json_schema=COLOUR_SCHEMA)
    before = fast.stats

    fast_out, stock_out = await fast.generate(request), await stock.generate(request)

    assert fast.stats.fallbacks - before.fallbacks >= 2  # rejections really happened
    assert fast_out.text == stock_out.text
    document = json.loads(fast_out.text)
    assert document["colour"] in COLOUR_SCHEMA["properties"]["colour"]["enum"]
    assert isinstance(document["certain"], bool)


@pytest.mark.model
async def test_streaming_samples_through_the_same_grammar_second_path(engines: tuple[Any, Any]) -> None:
    fast, stock = engines
    request = GenerationRequest(messages=COLOUR_MESSAGES, max_tokens=40, json_schema=COLOUR_SCHEMA)
    before = fast.stats

    streamed = "".join([piece async for piece in fast.stream(request)])

    assert fast.stats.grammar_checks > before.grammar_checks
    assert streamed == (await stock.generate(request)).text
    assert json.loads(streamed)["colour"] in COLOUR_SCHEMA["properties"]["colour"]["enum"]


@pytest.mark.model
async def test_sampled_output_at_temperature_follows_the_schema(engines: tuple[Any, Any]) -> None:
    fast, _ = engines
    for seed in (1, 2, 3):
        request = GenerationRequest(
            messages=COLOUR_MESSAGES,
            max_tokens=40,
            json_schema=COLOUR_SCHEMA,
            temperature=0.9,
            top_p=0.95,
            seed=seed,
        )
        document = json.loads((await fast.generate(request)).text)
        assert document["colour"] in COLOUR_SCHEMA["properties"]["colour"]["enum"]
        assert isinstance(document["certain"], bool)
