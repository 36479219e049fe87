"""The server pool spreads requests, bounds each server, and moves past a failing one."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import respx

from service.config import LlmSettings
from service.llm.base import EngineError, GenerationRequest
from service.llm.remote import RemoteLlamaPool, ServerPool

A = "http://gpu-a.test/v1"
B = "http://gpu-b.test/v1"
SCHEMA = {
    "type": "object",
    "properties": {"claims": {"type": "array", "items": {"type": "string"}}},
    "required": ["claims"],
}


def _completion(text: str = '{"claims": []}') -> dict:
    return {
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 5},
    }


def _request() -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=16, json_schema=SCHEMA)


def test_pick_prefers_the_server_with_most_free_slots_and_skips_resting_ones() -> None:
    pool = ServerPool.of([A, B], per_server=2)
    a, b = pool.servers
    a.in_flight = 1
    assert pool.pick(set(), now=0.0) is b
    b.in_flight = 2
    assert pool.pick(set(), now=0.0) is a
    a.resting_until = 10.0
    assert pool.pick(set(), now=5.0) is None
    assert pool.pick(set(), now=11.0) is a
    assert pool.pick({A}, now=11.0) is None


def test_pick_alternates_between_equally_free_servers() -> None:
    pool = ServerPool.of([A, B], per_server=1)
    picked = {pool.pick(set(), now=0.0).base_url for _ in range(4)}  # type: ignore[union-attr]
    assert picked == {A, B}


async def test_a_failing_server_rests_and_the_request_moves_on() -> None:
    engine = RemoteLlamaPool(LlmSettings(servers=[A, B]))
    try:
        with respx.mock(assert_all_called=False) as router:
            bad = router.post(f"{A}/chat/completions").mock(return_value=httpx.Response(503))
            good = router.post(f"{B}/chat/completions").mock(
                return_value=httpx.Response(200, json=_completion())
            )
            results = [await engine.generate(_request()) for _ in range(3)]
        assert [r.text for r in results] == ['{"claims": []}'] * 3
        assert bad.call_count == 1  # tried once, then resting
        assert good.call_count == 3
        sent = json.loads(good.calls[0].request.content)
        assert "grammar" in sent and "root" in sent["grammar"]  # the schema travels as a GBNF grammar
        assert sent["seed"] == 42 and sent["temperature"] == 0.0
    finally:
        await engine.aclose()


async def test_every_server_failing_is_a_clear_engine_error() -> None:
    engine = RemoteLlamaPool(LlmSettings(servers=[A, B]))
    try:
        with respx.mock() as router:
            router.post(url__regex=r".*/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
            with pytest.raises(EngineError, match="CHARTBRIEF_LLM__SERVERS"):
                await engine.generate(_request())
    finally:
        await engine.aclose()


async def test_no_server_takes_more_than_its_bound() -> None:
    engine = RemoteLlamaPool(LlmSettings(servers=[A, B], per_server_concurrency=2))
    in_flight: dict[str, int] = {A: 0, B: 0}
    peak: dict[str, int] = {A: 0, B: 0}

    async def answer(request: httpx.Request) -> httpx.Response:
        base = A if "gpu-a" in str(request.url) else B
        in_flight[base] += 1
        peak[base] = max(peak[base], in_flight[base])
        await asyncio.sleep(0.02)
        in_flight[base] -= 1
        return httpx.Response(200, json=_completion())

    try:
        with respx.mock() as router:
            router.post(url__regex=r".*/chat/completions").mock(side_effect=answer)
            await asyncio.gather(*(engine.generate(_request()) for _ in range(12)))
        assert peak == {A: 2, B: 2}
        assert sum(s.served for s in engine.pool.servers) == 12
    finally:
        await engine.aclose()


def test_token_counts_use_the_models_own_tokenizer() -> None:
    engine = RemoteLlamaPool(LlmSettings(servers=[A]))
    try:
        assert engine.identity.file_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert 0 < engine.count_tokens("Hemoglobin A1c 7.2 %") < 20
    finally:
        asyncio.run(engine.aclose())
