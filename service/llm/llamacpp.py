"""The default engine: a GGUF model run in-process by llama.cpp (llama-cpp-python).

The model is loaded once per engine. Native inference runs in a worker thread so the event loop
stays free; an asyncio.Lock queues callers (one inference at a time per model, waiting callers
hold no thread) and a threading.Lock guards the native model itself, because a stream whose
reader went away may still be finishing in its thread.

When a request carries a JSON schema it is turned into a llama.cpp grammar here, so the model
can only emit JSON of that shape. (llama-cpp-python's `response_format={"type": "json_object",
"schema": ...}` does the same conversion but silently falls back to "any JSON" when the schema
cannot be converted; converting here makes that failure loud.)

Errors: everything llama.cpp raises is translated to `EngineError` here. This module must never
log prompt or completion text: they carry patient data. It logs token counts and seconds only.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import structlog
from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

from fhir_adapters.models import ModelIdentity
from service.config import LlmSettings
from service.llm.base import EngineError, Generation, GenerationRequest, generation_of
from service.llm.grammar import chat_params, gbnf_for_schema
from service.llm.model_files import MODEL_PATH_SETTING, context_window, model_identity, resolve_model_path

log = structlog.get_logger(__name__)

_DONE = object()


def grammar_for_schema(schema: dict[str, Any]) -> LlamaGrammar:
    """A llama.cpp grammar that only accepts JSON matching `schema`."""
    return LlamaGrammar.from_string(gbnf_for_schema(schema), verbose=False)


def _gguf_metadata(path: Path) -> dict[str, str]:
    """The GGUF's metadata, read with the vocabulary only (no weights, no context)."""
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(vocab.metadata)
    finally:
        vocab.close()


class LlamaCppEngine:
    """An `Engine` backed by one `llama_cpp.Llama` loaded from `settings.model_path` (or the default)."""

    def __init__(self, settings: LlmSettings, *, cache_dir: Path | None = None) -> None:
        path = resolve_model_path(settings)
        started = time.perf_counter()
        # llama.cpp's own default decodes on half the cores; a summary is one request at a time.
        threads = settings.n_threads or os.cpu_count() or 1
        try:
            n_ctx = settings.n_ctx or context_window(settings, _gguf_metadata(path))
            self._llama = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=settings.n_gpu_layers,
                seed=settings.seed,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(f"{MODEL_PATH_SETTING}: llama.cpp could not load {path}: {exc}") from exc
        self._identity = model_identity(
            path, settings, metadata=self._llama.metadata, cache_dir=cache_dir, n_ctx=self.n_ctx
        )
        self._lock = asyncio.Lock()
        self._native_lock = threading.Lock()
        self._grammars: dict[str, LlamaGrammar] = {}
        self._closed = False
        log.info(
            "model_loaded",
            file=self._identity.file_name,
            sha256=self._identity.sha256[:12],
            n_ctx=self.n_ctx,
            n_gpu_layers=settings.n_gpu_layers,
            seconds=round(time.perf_counter() - started, 2),
        )

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def n_ctx(self) -> int:
        return int(self._llama.n_ctx())

    def count_tokens(self, text: str) -> int:
        # special=True: the chat formatter tokenizes prompts the same way, so the budget matches.
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    async def generate(self, request: GenerationRequest) -> Generation:
        kwargs = self._completion_kwargs(request)
        async with self._lock:
            return await asyncio.to_thread(self._generate_blocking, kwargs)

    def _generate_blocking(self, kwargs: dict[str, Any]) -> Generation:
        started = time.perf_counter()
        with self._native_lock:
            self._check_open()
            try:
                response = cast(dict[str, Any], self._llama.create_chat_completion(**kwargs))
            except (ValueError, RuntimeError) as exc:
                raise EngineError(f"llama.cpp generation failed: {type(exc).__name__}") from exc
        seconds = time.perf_counter() - started
        generation = generation_of(response, seconds)
        log.info(
            "generation_done",
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            seconds=round(seconds, 2),
            finish_reason=generation.finish_reason,
        )
        return generation

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        """Yield the completion as it is produced, piece by piece."""
        kwargs = self._completion_kwargs(request)
        kwargs["stream"] = True
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancelled.set()

        def produce() -> None:
            try:
                with self._native_lock:
                    self._check_open()
                    chunks = cast(Iterator[dict[str, Any]], self._llama.create_chat_completion(**kwargs))
                    for chunk in chunks:
                        if cancelled.is_set():
                            break
                        piece = chunk["choices"][0].get("delta", {}).get("content")
                        if piece:
                            put(piece)
            except Exception as exc:  # handed to the reader, who raises it as an EngineError
                put(exc)
            finally:
                put(_DONE)

        async with self._lock:
            worker = asyncio.ensure_future(asyncio.to_thread(produce))
            try:
                while (item := await queue.get()) is not _DONE:
                    if isinstance(item, EngineError):
                        raise item
                    if isinstance(item, Exception):
                        raise EngineError(f"llama.cpp generation failed: {type(item).__name__}") from item
                    yield cast(str, item)
            finally:
                # Stop the native loop at the next token and wait for it, so the lock is only
                # released once the model is really free.
                cancelled.set()
                await asyncio.shield(worker)

    async def aclose(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._close_blocking)

    def _close_blocking(self) -> None:
        with self._native_lock:
            if not self._closed:
                self._closed = True
                self._llama.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the model engine was closed")

    def _completion_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        kwargs = chat_params(request)
        if request.json_schema is not None:
            kwargs["grammar"] = self._grammar(request.json_schema)
        return kwargs

    def _grammar(self, schema: dict[str, Any]) -> LlamaGrammar:
        # The parsed grammar is reused too: batch jobs send the same schema thousands of times.
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            if len(self._grammars) > 32:
                self._grammars.clear()
            grammar = self._grammars[key] = grammar_for_schema(schema)
        return grammar
