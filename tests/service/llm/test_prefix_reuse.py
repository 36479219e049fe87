"""Each prompt template's fixed prefix (chat template opening + system message) is read once per
process, even when templates alternate; outputs stay those of an engine that reads everything."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.config import LlmSettings
from service.llm import GenerationRequest
from service.llm.prefix_cache import PrefixStates, common_prefix_length, fixed_prefix_length
from service.prompts import load_prompt

# --- the store -------------------------------------------------------------------------------


def test_the_store_forgets_the_least_recently_used_prefix_to_stay_within_its_bytes() -> None:
    store = PrefixStates(capacity_bytes=10)
    assert store.put([1, 2], b"aaaa") and store.put([3], b"bbbb")
    assert store.longest_prefix_of([1, 2, 9]) == ((1, 2), b"aaaa")  # [1, 2] is now the most recent
    assert store.put([4], b"cccc")
    assert [3] not in store and [1, 2] in store and [4] in store
    assert store.size_bytes == 8 <= store.capacity_bytes


def test_a_state_larger_than_the_whole_store_is_not_kept() -> None:
    store = PrefixStates(capacity_bytes=4)
    assert store.put([1], b"abcd")
    assert not store.put([2], b"abcde")
    assert len(store) == 1 and store.size_bytes == 4


def test_the_longest_kept_prefix_wins_and_a_prompt_must_start_with_it() -> None:
    store = PrefixStates(capacity_bytes=100)
    store.put([1], b"short")
    store.put([1, 2, 3], b"long")
    assert store.longest_prefix_of([1, 2, 3, 4]) == ((1, 2, 3), b"long")
    assert store.longest_prefix_of([1, 2, 4]) == ((1,), b"short")
    assert store.longest_prefix_of([2, 1]) is None


def test_the_fixed_prefix_ends_with_the_last_token_inside_the_system_text() -> None:
    pieces = {1: b"<|im_start|>", 2: b"system\n", 3: b"Be brief", 4: b".", 5: b"<|im_end|>", 6: b"user"}
    assert fixed_prefix_length([1, 2, 3, 4, 5, 6], pieces.__getitem__, b"Be brief.") == 4
    # a token that runs past the end of the system text is not part of the prefix
    merged = {**pieces, 4: b".\nuser"}
    assert fixed_prefix_length([1, 2, 3, 4], merged.__getitem__, b"Be brief.") == 3
    assert fixed_prefix_length([1, 2, 6], pieces.__getitem__, b"Be brief.") == 0
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2


# --- the real model ----------------------------------------------------------------------------

V1, V2 = load_prompt("summary/v1"), load_prompt("summary/v2")


def _request(system: str, user: str, schema: dict[str, Any] | None) -> GenerationRequest:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return GenerationRequest(messages=messages, max_tokens=40, json_schema=schema)


# Four calls alternating two templates, as the narrative does (coded part, then one call per note).
CALLS = [
    _request(V1.system, "Patient: male, born 1958\n\nFacts:\n[C1] Hypertension (active)", V1.output_schema),
    _request(V2.system, "Patient: male, born 1958\n\n| Came in for a cough. Chest clear.", V2.output_schema),
    _request(V1.system, "Patient: female, born 1971\n\nFacts:\n[C1] Asthma (active)", V1.output_schema),
    _request(
        V2.system, "Patient: female, born 1971\n\n| Follow-up of knee pain. Improving.", V2.output_schema
    ),
]


def _engine(tmp_path: Path, **settings: Any) -> Any:
    from service.llm.llamacpp import LlamaCppEngine

    # One thread: llama.cpp's threads spin while waiting for each other on a busy, shared CPU.
    return LlamaCppEngine(LlmSettings(n_ctx=2048, n_threads=1, **settings), cache_dir=tmp_path)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def reference(model_cache: Path) -> Iterator[list[str]]:
    """The outputs of an engine that reuses nothing: every prompt read from its first token."""
    engine = _engine(model_cache, prompt_cache_mib=0, reuse_previous_prompt=False)
    outputs = []
    for request in CALLS:
        before = engine.stats
        generation = asyncio.run(engine.generate(request))
        after = engine.stats
        # no reuse at all: every prompt token read, none reused
        assert after.prompt_tokens_evaluated - before.prompt_tokens_evaluated == generation.prompt_tokens
        assert after.prompt_tokens_reused == 0 and after.prefix_saves == 0
        outputs.append(generation.text)
    asyncio.run(engine.aclose())
    yield outputs


def _system_tokens(engine: Any, request: GenerationRequest) -> int:
    return int(engine.count_tokens(request.messages[0]["content"]))


@pytest.mark.model
async def test_alternating_templates_read_each_system_prefix_once(
    model_cache: Path, reference: list[str]
) -> None:
    engine = _engine(model_cache)
    try:
        evaluated, reused, outputs = [], [], []
        for request in CALLS:
            before = engine.stats
            generation = await engine.generate(request)
            after = engine.stats
            evaluated.append(after.prompt_tokens_evaluated - before.prompt_tokens_evaluated)
            reused.append(after.prompt_tokens_reused - before.prompt_tokens_reused)
            outputs.append(generation.text)
            assert evaluated[-1] + reused[-1] == generation.prompt_tokens
        stats = engine.stats
        assert stats.prefix_saves == 2 and stats.prefix_restores == 2
        assert 0 < engine.prefix_cache_bytes <= 256 * 2**20
        # the first reading of each template reads its whole system message ...
        assert reused[0] == 0 and reused[1] < _system_tokens(engine, CALLS[1])
        # ... its second reading only what follows it
        for second in (2, 3):
            assert reused[second] >= _system_tokens(engine, CALLS[second])
            assert evaluated[second] < 60
        assert outputs == reference
    finally:
        await engine.aclose()


@pytest.mark.model
async def test_without_kept_prefixes_only_the_previous_prompt_is_reused(
    model_cache: Path, reference: list[str]
) -> None:
    engine = _engine(model_cache, prompt_cache_mib=0)
    try:
        reused, outputs = [], []
        for request in CALLS:
            before = engine.stats
            outputs.append((await engine.generate(request)).text)
            reused.append(engine.stats.prompt_tokens_reused - before.prompt_tokens_reused)
        # the template changes at every call, so each system message is read again
        assert all(r < _system_tokens(engine, CALLS[1]) for r in reused)
        assert engine.stats.prefix_saves == 0 and engine.prefix_cache_bytes == 0
        assert outputs == reference
    finally:
        await engine.aclose()


@pytest.mark.model
async def test_a_store_too_small_for_one_prefix_keeps_nothing_and_changes_nothing(
    model_cache: Path, reference: list[str]
) -> None:
    engine = _engine(model_cache, prompt_cache_mib=1)  # a system prefix's KV state is several MiB
    try:
        outputs = [(await engine.generate(request)).text for request in CALLS]
        assert engine.stats.prefix_saves == 0 and engine.prefix_cache_bytes == 0
        assert outputs == reference
    finally:
        await engine.aclose()
